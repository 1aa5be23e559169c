"""Test helpers: keys, the test registry, request builders, live servers.

Fakes come in through `create_app` arguments (a registry naming test adapters), never through
monkeypatching. `LiveServer` runs the real app under uvicorn in a thread, on a free port, for the
official `openai` client; `ServiceProcess` runs `python -m service serve` as a subprocess, the
shape real engines (vLLM's spawned engine core) need.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn
from litestar import Litestar

from registry.registry import AdapterRegistry
from service.http_limits import server_options
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "admin-key-for-tests-0001"
API_KEY = "api-key-for-tests-0001"
ADMIN = {"X-API-Key": ADMIN_KEY}
API = {"Authorization": f"Bearer {API_KEY}"}

TEST_REGISTRY = """
adapters:
  echo:
    module: adapters.echo:EchoAdapter
    description: echo for tests
    defaults: {token_delay_ms: 0}
    env_allow: [HF_TOKEN, "ECHO_*"]
  crashing:
    module: fakes.adapters:CrashingAdapter
    env_allow: [HF_TOKEN]
models:
  echo:
    backend: echo
    model: echo
  slow-echo:
    backend: echo
    model: echo
    engine_params: {token_delay_ms: 20}
"""


def make_registry(tmp_path: Path, text: str = TEST_REGISTRY, **kwargs: Any) -> AdapterRegistry:
    """Write `text` as adapters.yaml under tmp_path and build a registry from it."""
    path = tmp_path / "adapters.yaml"
    path.write_text(text)
    return AdapterRegistry.from_file(path, use_entry_points=False, **kwargs)


def make_settings(**overrides: Any) -> Settings:
    """Settings with test keys; `overrides` win."""
    values: dict[str, Any] = {"admin_keys": (ADMIN_KEY,), "api_keys": (API_KEY,)}
    values.update(overrides)
    return Settings(**values)


def load(client: Any, expect: int = 200, **body: Any) -> dict[str, Any]:
    """POST /v1/model/load with the admin key and check the status."""
    r = client.post("/v1/model/load", json=body, headers=ADMIN)
    assert r.status_code == expect, r.text
    return r.json()  # type: ignore[no-any-return]


def chat_body(text: str = "alpha beta gamma delta", **extra: Any) -> dict[str, Any]:
    """A minimal chat request for the echo model."""
    return {"model": "echo", "messages": [{"role": "user", "content": text}], **extra}


def sse_events(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [block[len("data: ") :] for block in raw.split("\n\n") if block.startswith("data: ")]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The app under a real uvicorn, in a thread of this process."""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # the same edge limits `inference-wrapper serve` runs with
        limits = server_options(app.state.settings)
        config = uvicorn.Config(app, log_config=None, lifespan="on", access_log=True, **limits)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


class ServiceProcess:
    """`python -m service serve` as a subprocess, with its log captured to a file."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None, registry: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"service-{self.port}.log"
        self.env = {
            **os.environ,
            "IW_ADMIN_KEY": ADMIN_KEY,
            "IW_API_KEY": API_KEY,
            "IW_PORT": str(self.port),
            "IW_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            # pytest puts the checkout and tests/ on sys.path (pyproject's `pythonpath`), not in
            # the environment: the child needs them for the test registry's fakes
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p
            ),
            **(env or {}),
        }
        if registry is not None:
            self.env["IW_REGISTRY"] = str(registry)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"service did not become healthy:\n{self.log()}")

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *_: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()
