"""adapters.yaml parsing and the registry built from it: every start-up refusal names its key."""

from __future__ import annotations

import importlib.metadata
import textwrap
from pathlib import Path
from typing import Any

import pytest

from adapters.echo import EchoAdapter, EchoParams
from fakes.adapters import CrashingAdapter
from registry.config import (
    AdapterEntry,
    PresetEntry,
    RegistryConfig,
    RegistryError,
    load_registry_file,
    parse_registry,
)
from registry.registry import ENTRY_POINT_GROUP, AdapterRegistry
from schemas.errors import NotFoundError, ParamsValidationError

ECHO = "adapters:\n  echo:\n    module: adapters.echo:EchoAdapter\n"


def yaml_text(text: str) -> str:
    """Dedented YAML."""
    return textwrap.dedent(text).lstrip("\n")


def parse_error(text: str) -> str:
    """The RegistryError message for parsing `text`."""
    with pytest.raises(RegistryError) as info:
        parse_registry(yaml_text(text))
    return str(info.value)


def build_error(text: str, **kwargs: Any) -> str:
    """The RegistryError message for building a registry from `text`."""
    kwargs.setdefault("use_entry_points", False)
    with pytest.raises(RegistryError) as info:
        AdapterRegistry(parse_registry(yaml_text(text)), **kwargs)
    return str(info.value)


# --- parsing -------------------------------------------------------------------------------------


def test_a_good_file_parses_into_attrs_classes() -> None:
    """Entries, defaults, allowlists and presets land in their frozen classes."""
    config = parse_registry(
        yaml_text("""
        adapters:
          echo:
            module: adapters.echo:EchoAdapter
            description: dev backend
            defaults: {token_delay_ms: 5}
            env_allow: [HF_TOKEN, "ECHO_*"]
            trust_remote_code_allowed: true
        models:
          fast:
            backend: echo
            model: echo
            engine_params: {max_n: 2}
        """)
    )
    assert config == RegistryConfig(
        adapters={
            "echo": AdapterEntry(
                module="adapters.echo:EchoAdapter",
                description="dev backend",
                defaults={"token_delay_ms": 5},
                env_allow=("HF_TOKEN", "ECHO_*"),
                trust_remote_code_allowed=True,
            )
        },
        models={"fast": PresetEntry(backend="echo", model="echo", engine_params={"max_n": 2})},
    )


def test_invalid_yaml_names_the_line() -> None:
    """A YAML syntax error is a RegistryError with the file and the line, no traceback."""
    message = parse_error("""
        adapters:
          echo:
            module: adapters.echo:EchoAdapter
            defaults: {token_delay_ms: [1, 2}
        """)
    assert message.startswith("adapters.yaml: not valid YAML, line ")
    assert "Traceback" not in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n", "42\n"])
def test_a_file_that_is_not_a_mapping_is_refused(text: str) -> None:
    """An empty file, a list or a scalar is refused with what was expected."""
    assert "expected a mapping with an 'adapters' key" in parse_error(text)


def test_unknown_key_names_its_path_and_line() -> None:
    """An unknown key inside an entry names the entry, the key and the entry's line."""
    message = parse_error("""
        adapters:
          echo:
            module: adapters.echo:EchoAdapter
            defualts: {}
        """)
    assert "unknown field; did you mean 'defaults'? @ adapters.echo.defualts (line 4)" in message


def test_unknown_top_level_key_is_refused() -> None:
    """A top-level key other than adapters/models/hooks is refused by name."""
    message = parse_error(ECHO + "extra: 1\n")
    assert "unknown field; known: adapters, hooks, models @ extra" in message


def test_missing_adapters_key_is_named() -> None:
    """A file without `adapters:` says that key is required."""
    assert "required field missing @ adapters" in parse_error("models: {}\n")


def test_wrong_type_names_the_field_and_its_line() -> None:
    """A value of the wrong kind names the full key path and the line of that key."""
    message = parse_error("""
        adapters:
          echo:
            module: adapters.echo:EchoAdapter
            trust_remote_code_allowed: "yes"
        """)
    assert "expected a boolean, got a string" in message
    assert "adapters.echo.trust_remote_code_allowed (line 4)" in message


def test_preset_missing_model_names_the_preset() -> None:
    """A preset without `model` names models.<alias>.model and its line."""
    message = parse_error(
        ECHO
        + yaml_text("""
        models:
          fast:
            backend: echo
        """)
    )
    assert "required field missing @ models.fast.model" in message


@pytest.mark.parametrize("name", ["Echo", "1echo", "echo.v2", "x" * 65])
def test_backend_and_preset_names_are_lowercase_identifiers(name: str) -> None:
    """Backend names and preset aliases must be lowercase letters, digits, `_` or `-`."""
    assert "must be lowercase letters" in parse_error(
        f"adapters:\n  {name}:\n    module: adapters.echo:EchoAdapter\n"
    )
    assert "must be lowercase letters" in parse_error(
        ECHO + f"models:\n  '{name}':\n    backend: echo\n    model: m\n"
    )


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        (
            """
            adapters:
              echo:
                description: dev
                module: adapters/echo.py
            """,
            "adapters.echo.module",
            4,
        ),
        (
            """
            adapters:
              echo:
                module: adapters.echo:EchoAdapter
                env_allow: [HF_TOKEN, "BAD-KEY"]
            """,
            "adapters.echo.env_allow",
            4,
        ),
    ],
)
def test_field_validators_name_the_field_and_its_line(text: str, key: str, line: int) -> None:
    """A bad module path or env pattern names its own key path and line, not just the entry."""
    message = parse_error(text)
    assert f"@ {key} (line {line})" in message


def test_unreadable_file_is_a_registry_error(tmp_path: Path) -> None:
    """A missing file is a RegistryError naming the path, not an OSError."""
    with pytest.raises(RegistryError, match="cannot read registry file"):
        load_registry_file(tmp_path / "nope.yaml")


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    """Errors from a file on disk start with that file's path."""
    path = tmp_path / "adapters.yaml"
    path.write_text("adapters: [\n")
    with pytest.raises(RegistryError) as info:
        load_registry_file(path)
    assert str(info.value).startswith(f"{path}: not valid YAML")


# --- building the registry -----------------------------------------------------------------------


def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    """Make `name` importable from tmp_path with `body` as its source."""
    (tmp_path / f"{name}.py").write_text(yaml_text(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_module_that_is_not_installed() -> None:
    """A module path that does not import names the key and the module."""
    message = build_error("adapters:\n  echo:\n    module: no_such_pkg.mod:Adapter\n")
    assert message.startswith("adapters.echo.module: cannot import module 'no_such_pkg.mod'")
    assert "ModuleNotFoundError" in message


def test_module_that_raises_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module whose import raises is refused with the exception's type and first words."""
    write_module(tmp_path, monkeypatch, "iw_test_raises_on_import", "raise RuntimeError('boom')")
    message = build_error("adapters:\n  bad:\n    module: iw_test_raises_on_import:Adapter\n")
    assert message == (
        "adapters.bad.module: cannot import module 'iw_test_raises_on_import' (RuntimeError: boom)"
    )


def test_class_that_is_missing() -> None:
    """A class name the module lacks is named."""
    message = build_error("adapters:\n  echo:\n    module: adapters.echo:NoSuchAdapter\n")
    assert message == "adapters.echo.module: module 'adapters.echo' has no class 'NoSuchAdapter'"


def test_class_without_params_type() -> None:
    """A class that has no attrs `params_type` is not an adapter."""
    message = build_error("adapters:\n  x:\n    module: fakes.adapters:CrashingParams\n")
    assert message == "adapters.x.module: fakes.adapters:CrashingParams has no attrs `params_type`"


def test_class_without_adapter_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class with params but without the adapter methods names the first one it lacks."""
    write_module(
        tmp_path,
        monkeypatch,
        "iw_test_half_adapter",
        """
        from adapters.echo import EchoParams

        class Half:
            params_type = EchoParams

            async def load(self, model, params): ...
        """,
    )
    message = build_error("adapters:\n  half:\n    module: iw_test_half_adapter:Half\n")
    assert message == "adapters.half.module: iw_test_half_adapter:Half lacks `generate()`"


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ("{token_delay_ms: fast}", "adapters.echo.defaults.token_delay_ms: expected a number"),
        ("{max_n: 0}", "adapters.echo.defaults.max_n: must be between 1 and 16"),
        ("{bogus: 1}", "adapters.echo.defaults.bogus: unknown field; known: "),
    ],
)
def test_defaults_are_checked_against_the_params_schema(defaults: str, expected: str) -> None:
    """Defaults that do not fit the adapter's params stop start-up, naming the key path."""
    message = build_error(ECHO + f"    defaults: {defaults}\n")
    assert message.startswith(expected)


def test_preset_naming_an_unknown_backend() -> None:
    """A preset whose backend is not registered names the preset's backend key."""
    message = build_error(ECHO + "models:\n  p:\n    backend: nope\n    model: m\n")
    assert message == "models.p.backend: unknown backend 'nope'; known: echo"


def test_preset_params_are_checked_over_the_defaults() -> None:
    """A preset's engine_params are structured like a load's, and the field is named."""
    message = build_error(
        ECHO + "models:\n  p:\n    backend: echo\n    model: m\n    engine_params: {max_n: 99}\n"
    )
    assert message == "models.p.engine_params.max_n: must be between 1 and 16"


def _registered_class(registry: AdapterRegistry, name: str) -> type:
    """Backend `name`'s adapter class, as a plain class to compare.

    The registry types it `type[Adapter[SomeParams]]` (params class erased), which mypy rightly
    sees as no supertype of `type[EchoAdapter]`.
    """
    return registry.resolve(name).adapter_cls


def test_registry_resolves_builds_and_describes() -> None:
    """Names resolve to classes; params merge over defaults; unknown names are 404."""
    text = ECHO + "    defaults: {max_n: 3}\nmodels:\n  e:\n    backend: echo\n    model: m\n"
    registry = AdapterRegistry(parse_registry(text), use_entry_points=False)
    assert registry.names == ("echo",)
    assert _registered_class(registry, "echo") is EchoAdapter
    assert registry.build_params("echo", {"token_delay_ms": 2}) == EchoParams(
        token_delay_ms=2.0, max_n=3
    )
    with pytest.raises(ParamsValidationError) as info:
        registry.build_params("echo", {"max_n": "x"})
    assert info.value.param == "$.engine_params.max_n"
    with pytest.raises(NotFoundError):
        registry.resolve("nope")
    with pytest.raises(NotFoundError):
        registry.preset("nope")
    described = registry.describe("echo")
    assert described["defaults"]["max_n"] == 3
    assert described["params_schema"]["title"] == "EchoParams"
    assert described["source"] == "adapters.yaml"


# --- entry points --------------------------------------------------------------------------------


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, points: list[tuple[str, str]]) -> list[str]:
    """Make `importlib.metadata.entry_points` return `points`; returns the groups asked for."""
    asked: list[str] = []

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        asked.append(group)
        return [importlib.metadata.EntryPoint(n, v, group) for n, v in points]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


def test_entry_points_add_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed entry point registers a backend with its source marked."""
    asked = fake_entry_points(monkeypatch, [("crash", "fakes.adapters:CrashingAdapter")])
    registry = AdapterRegistry(parse_registry(ECHO))
    assert asked == [ENTRY_POINT_GROUP]
    assert registry.names == ("crash", "echo")
    assert _registered_class(registry, "crash") is CrashingAdapter
    assert registry.resolve("crash").source == "entry-point"
    assert registry.describe("crash")["module"] == "fakes.adapters:CrashingAdapter"


def test_yaml_wins_on_a_name_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point with a name adapters.yaml also uses is ignored, not imported."""
    fake_entry_points(monkeypatch, [("echo", "no_such_pkg:Adapter")])
    registry = AdapterRegistry(parse_registry(ECHO))
    assert _registered_class(registry, "echo") is EchoAdapter
    assert registry.resolve("echo").source == "adapters.yaml"


def test_entry_point_with_a_bad_name_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point whose name is not a backend name is ignored."""
    fake_entry_points(monkeypatch, [("Bad.Name", "no_such_pkg:Adapter")])
    assert AdapterRegistry(parse_registry(ECHO)).names == ("echo",)


def test_broken_entry_point_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point that does not import is a RegistryError naming the entry point."""
    fake_entry_points(monkeypatch, [("broken", "no_such_pkg.mod:Adapter")])
    message = build_error(ECHO, use_entry_points=True)
    assert message.startswith("entry point broken: cannot import module 'no_such_pkg.mod'")


def test_entry_points_are_not_read_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """`use_entry_points=False` never looks at installed entry points."""
    asked = fake_entry_points(monkeypatch, [("crash", "fakes.adapters:CrashingAdapter")])
    registry = AdapterRegistry(parse_registry(ECHO), use_entry_points=False)
    assert asked == []
    assert registry.names == ("echo",)
