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
from schemas.validators import FieldValueError, in_range

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


_HOOK_REF = re.compile(r"^([A-Za-z_][\w.]*:[A-Za-z_]\w*|[a-z][a-z0-9_-]{0,63})$")
_HOOK_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _hook_ref(_: Any, attribute: Any, value: str) -> None:
    if not _HOOK_REF.fullmatch(value):
        raise FieldValueError(
            attribute.name,
            f"{attribute.name} must be a short name (regex_redact) or 'package.module:ClassName'",
        )


def _hook_name(_: Any, attribute: Any, value: str | None) -> None:
    if value is not None and not _HOOK_NAME.fullmatch(value):
        raise FieldValueError(attribute.name, f"{attribute.name} must be 1-64 of A-Za-z0-9_.:-")


@frozen
class HookEntry:
    """One hook: which class, its params, its time budgets (README, "Custom logic (hooks)")."""

    module: str = field(validator=_hook_ref)
    """A built-in or entry-point short name, or `package.module:Class`; imported at start-up."""
    name: str | None = field(default=None, validator=_hook_name)
    """Names the hook in errors, logs and metric labels (default: the short or class name)."""
    params: dict[str, Any] = field(factory=dict)
    """The hook's params, validated against its `params_type` at start-up."""
    budget_ms: float = field(default=50.0, validator=in_range(0.01, 600_000))
    """before_request / after_response time above which a warning and a counter report it."""
    chunk_budget_ms: float = field(default=1.0, validator=in_range(0.001, 10_000))
    """The same for one on_chunk call (the per-token path)."""
    timeout_ms: float = field(default=5000.0, validator=in_range(1, 600_000))
    """before_request / after_response time after which the call is cancelled as a failure."""

    @property
    def label(self) -> str:
        """The hook's name: `name`, else the short name or class name of `module`."""
        return self.name or self.module.rpartition(":")[2]


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
    hooks: tuple[HookEntry, ...] = ()
    """Hooks for every model served by this backend (after the global ones)."""
    extra_allow: tuple[str, ...] = field(default=(), validator=_extra_keys)
    """`engine_params.extra` keys (or dotted paths into them) a load may set although the
    adapter refuses them by default because they name code, files, folders, hosts or plugins
    (e.g. `speculative_config`); each stays bounded in size and depth."""
    reasoning_parser: str | None = None
    """Split `<think>…</think>` out of every model this backend serves, by parser name
    (`adapters.reasoning.PARSERS`: deepseek_r1, think); a preset's or a load's name wins."""


@frozen
class PresetEntry:
    """A named model the orchestrator can load by alias."""

    backend: str
    model: str
    engine_params: dict[str, Any] = field(factory=dict)
    served_model_name: str | None = None
    description: str = ""
    hooks: tuple[HookEntry, ...] = ()
    """Hooks for this preset (after the global and the backend's)."""
    sampling_defaults: dict[str, Any] = field(factory=dict)
    """Sampling for fields a request leaves unset, over the model's generation_config.json
    (`schemas.sampling`); checked at start-up against the request's ranges and the backend."""
    reasoning_parser: str | None = None
    """Reasoning parser for this preset (over the backend's): deepseek_r1, think, or none."""


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
    hooks: tuple[HookEntry, ...] = ()
    """Hooks for every request, first in every chain."""


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
        line = line_of(text, first.path)
        where = f" (line {line})" if line else ""
        raise RegistryError(f"{source}: {first.message} @ {first.path or '$'}{where}") from None


def load_registry_file(path: Path) -> RegistryConfig:
    """Read and parse an adapters.yaml file."""
    return parse_registry(read_registry_text(path), source=str(path))


def read_registry_text(path: Path) -> str:
    """The text of an adapters.yaml file; `RegistryError` when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read registry file {path}: {exc.strerror}") from None


def line_of(text: str, path: str) -> int | None:
    """Best-effort 1-based line of a key path (`hooks[0].params.x`) in the YAML source."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in re.findall(r"[^.\[\]]+", path):
        key = part.strip("'\"")
        if isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            match = node.value[int(key)]
        elif isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == key), None)
        else:
            break
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    return line
