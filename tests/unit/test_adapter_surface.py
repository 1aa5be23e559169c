"""The adapter seam: every adapter type-checks against the contract; the public surface is whole.

The `_CONTRACT` assignments below are what mypy strict checks (tests/ is in its `files`): each
adapter class must be a `type[Adapter[ItsParams]]`, so a wrong signature, a missing method or a
params class that differs from the one `check`/`load` take fails `make typecheck`. The tests then
check at runtime what mypy cannot see: `adapters.__all__` resolves, and it names every kit name an
in-tree adapter imports, so an outside author can write the same adapter from it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import adapters
from adapters.base import Adapter, AdapterContext
from adapters.echo import EchoAdapter, EchoParams
from adapters.llamacpp import LlamaCppAdapter, LlamaCppParams
from adapters.openai_upstream import OpenAIUpstreamAdapter, OpenAIUpstreamParams
from adapters.sglang import SglangAdapter, SglangParams
from adapters.transformers import TransformersAdapter, TransformersParams
from adapters.vllm import VllmAdapter, VllmParams
from fakes.thirdparty import CountingAdapter, CountingParams

_CONTRACT: tuple[
    tuple[type[Adapter[EchoParams]], type[EchoParams]],
    tuple[type[Adapter[TransformersParams]], type[TransformersParams]],
    tuple[type[Adapter[VllmParams]], type[VllmParams]],
    tuple[type[Adapter[SglangParams]], type[SglangParams]],
    tuple[type[Adapter[OpenAIUpstreamParams]], type[OpenAIUpstreamParams]],
    tuple[type[Adapter[LlamaCppParams]], type[LlamaCppParams]],
    tuple[type[Adapter[CountingParams]], type[CountingParams]],
] = (
    (EchoAdapter, EchoParams),
    (TransformersAdapter, TransformersParams),
    (VllmAdapter, VllmParams),
    (SglangAdapter, SglangParams),
    (OpenAIUpstreamAdapter, OpenAIUpstreamParams),
    (LlamaCppAdapter, LlamaCppParams),
    (CountingAdapter, CountingParams),
)

ROOT = Path(__file__).resolve().parents[2]
KIT_MODULES = (
    "adapters.kit", "adapters.base", "adapters.text", "schemas.errors", "schemas.generation",
    "schemas.validators",
)  # fmt: skip


@pytest.mark.parametrize(("cls", "params"), _CONTRACT, ids=lambda v: v.__name__)
def test_every_adapter_declares_its_params_and_satisfies_the_protocol(
    cls: type[Adapter[object]], params: type[object]
) -> None:
    """The params class mypy checked is the one the registry structures loads into."""
    assert cls.params_type is params
    assert isinstance(cls(AdapterContext(name="t")), Adapter)


def test_every_public_name_resolves_and_none_is_listed_twice() -> None:
    """`from adapters import X` works for every X in `__all__`."""
    names = adapters.__all__
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(adapters, name, None) is not None, name


def _kit_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(KIT_MODULES):
            names |= {alias.name for alias in node.names}
    return names


def test_every_kit_name_an_in_tree_adapter_uses_is_public() -> None:
    """An outside author can import whatever the in-tree adapters import from the kit."""
    modules = [p for p in (ROOT / "adapters").glob("*.py") if p.name != "__init__.py"]
    assert len(modules) >= 8
    used: dict[str, set[str]] = {}
    for path in modules:
        for name in _kit_imports(path):
            used.setdefault(name, set()).add(path.name)
    # private helpers (leading underscore) and the protocol's type variables are not surface
    missing = {
        name: sorted(files)
        for name, files in used.items()
        if not name.startswith("_")
        and name not in adapters.__all__
        and name not in {"ParamsT", "ParamsT_contra", "P", "BUNDLED_PREFIX"}
    }
    assert missing == {}


@pytest.mark.parametrize("path", ["adapters/llamacpp.py", "tests/fakes/thirdparty.py"])
def test_the_worked_examples_use_only_the_public_surface(path: str) -> None:
    """The llama.cpp adapter and the third-party example import `adapters`, nothing below it."""
    project = ("adapters", "schemas", "service", "registry", "hooks")
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        module = node.module if isinstance(node, ast.ImportFrom) else None
        if module is not None and module.split(".")[0] in project:
            assert module == "adapters", f"{path} imports {module}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in project, f"{path} imports {alias.name}"
    importlib.import_module(path.removesuffix(".py").replace("/", ".").removeprefix("tests."))
