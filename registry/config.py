"""adapters.yaml: the operator's declarative map from backend names to adapter classes.

Parsed with the project's strict converter into frozen attrs classes. A bad file is a start-up
error whose message names the key path and the line (`adapters.vllm.defaults.max_model_len,
line 12`), never a traceback.

Must never: import an adapter module (that is `registry.registry`'s job, after validation).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from attrs import field, frozen

from schemas.converter import StructureError, structure
from schemas.validators import FieldValueError

_MODULE_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
BACKEND_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_ENV_PATTERN = re.compile(r"^[A-Za-z_*][A-Za-z0-9_*]*$")
#: an `extra_allow` item: an engine argument name or a dotted path into one (no wildcards: an
#: opt-in names exactly what the operator vetted)
_EXTRA_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,63}(\.[a-z_][a-z0-9_]{0,63}){0,7}$")


class RegistryError(Exception):
    """adapters.yaml (or an adapter it names) is unusable; the service must not start."""


def _module_path(_: Any, attribute: Any, value: str) -> None:
    if not _MODULE_PATH.fullmatch(value):
        raise FieldValueError(
            attribute.name, f"{attribute.name} must look like 'package.module:ClassName'"
        )


def _env_patterns(_: Any, attribute: Any, value: tuple[str, ...]) -> None:
    for pattern in value:
        if not _ENV_PATTERN.fullmatch(pattern):
            raise FieldValueError(
                attribute.name,
                f"invalid env pattern {pattern!r} (letters, digits, _ and * only)",
            )


def _extra_keys(_: Any, attribute: Any, value: tuple[str, ...]) -> None:
    for key in value:
        if not _EXTRA_KEY.fullmatch(key):
            raise FieldValueError(
                attribute.name,
                f"invalid extra_allow entry {key!r} (an engine argument name or a dotted path "
                "into one, e.g. speculative_config or compilation_config.backend)",
            )


@frozen
class AdapterEntry:
    """One backend: which class implements it and what the operator allows it."""

    module: str = field(validator=_module_path)
    """Adapter class as `package.module:ClassName`; imported from here, never from a request."""
    description: str = ""
    """Shown in `GET /v1/adapters`."""
    defaults: dict[str, Any] = field(factory=dict)
    """Engine params applied under each load request's `engine_params`."""
    env: dict[str, str] = field(factory=dict)
    """Environment the operator sets for this engine at every load (not secret: it is in this
    file); a load's own `env` wins on a clash. Keys on the always-refused list are refused."""
    env_allow: tuple[str, ...] = field(default=(), validator=_env_patterns)
    """Env keys a load request may set (`*` wildcards); the always-refused list still applies."""
    trust_remote_code_allowed: bool = False
    """Whether a load may set `trust_remote_code: true` (runs code shipped with the model)."""
    allowed_hosts: tuple[str, ...] = ()
    """Hosts an adapter may connect to (upstream adapters); empty means none."""
    extra_allow: tuple[str, ...] = field(default=(), validator=_extra_keys)
    """`engine_params.extra` keys (or dotted paths into them) a load may set although the
    adapter refuses them by default because they name code, files, folders, hosts or plugins
    (e.g. `speculative_config`); each stays bounded in size and depth."""


@frozen
class PresetEntry:
    """A named model the orchestrator can load by alias."""

    backend: str
    model: str
    engine_params: dict[str, Any] = field(factory=dict)
    served_model_name: str | None = None
    description: str = ""


def _backend_names(_: Any, attribute: Any, value: dict[str, Any]) -> None:
    for name in value:
        if not BACKEND_NAME.fullmatch(name):
            raise FieldValueError(
                attribute.name, f"name {name!r} must be lowercase letters, digits, _ or -"
            )


@frozen
class RegistryConfig:
    """The whole of adapters.yaml."""

    adapters: dict[str, AdapterEntry] = field(validator=_backend_names)
    models: dict[str, PresetEntry] = field(factory=dict, validator=_backend_names)


def parse_registry(text: str, source: str = "adapters.yaml") -> RegistryConfig:
    """Parse adapters.yaml text; raise `RegistryError` naming the key path and line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise RegistryError(f"{source}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: expected a mapping with an 'adapters' key")
    try:
        return structure(data, RegistryConfig, path="")
    except StructureError as exc:
        first = exc.errors[0]
        line = _line_of(text, first.path)
        where = f" (line {line})" if line else ""
        raise RegistryError(f"{source}: {first.message} @ {first.path or '$'}{where}") from None


def load_registry_file(path: Path) -> RegistryConfig:
    """Read and parse an adapters.yaml file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read registry file {path}: {exc.strerror}") from None
    return parse_registry(text, source=str(path))


def _line_of(text: str, path: str) -> int | None:
    """Best-effort 1-based line of a dotted key path in the YAML source."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+", path):
        if not isinstance(node, yaml.MappingNode):
            break
        key = part.strip("'\"")
        match = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line
