"""The adapter registry: backend name → adapter class, defaults, and what the operator allows.

Built once at start-up from adapters.yaml plus the `inference_wrapper.adapters` entry-point group
(adapters.yaml wins on a name clash). Every adapter module is imported here, at start-up, so that
a typo in a module path or a default that does not fit the params schema stops the service with a
clear message instead of failing the first load. Adapter modules are light by contract: engines
are imported inside `load()`.

Must never: import a module whose path came from a request; only adapters.yaml and installed
entry points name modules.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeAlias, cast

import attrs
from attrs import AttrsInstance, frozen

from adapters.base import Adapter, AdapterContext, P
from adapters.bundled import default_cache_dir
from adapters.reasoning import reasoning_parser
from adapters.reasoning_adapter import ReasoningAdapter
from hooks.chain import HookSpec, describe_spec
from registry.config import (
    BACKEND_NAME,
    AdapterEntry,
    PresetEntry,
    RegistryConfig,
    RegistryError,
    parse_registry,
    read_registry_text,
)
from registry.env import is_refused
from registry.hooks import build_hook_specs
from schemas.converter import StructureError, structure, unstructure
from schemas.errors import NotFoundError, ParamsValidationError
from schemas.jsonschema import attrs_json_schema
from schemas.sampling import check_sampling_defaults
from schemas.suggest import NAME_LIMIT, shown, unknown

ENTRY_POINT_GROUP = "inference_wrapper.adapters"

#: A params instance of a backend named at run time. Its class comes from adapters.yaml or an
#: entry point, so mypy cannot know it; erased to the bound every params class meets (a frozen
#: attrs class, which `import_adapter_class` checks) rather than to Any, so everything that does
#: not depend on the class stays checked. Adapter and params meet only in a `LoadPlan` built
#: from one `RegisteredAdapter` (`registry.planning`), which pairs them by construction.
SomeParams: TypeAlias = AttrsInstance


@frozen
class RegisteredAdapter(Generic[P]):
    """A backend ready to instantiate: its class, its yaml entry and its structured defaults."""

    name: str
    entry: AdapterEntry
    adapter_cls: type[Adapter[P]]
    source: str  # "adapters.yaml" | "entry-point"

    @property
    def params_type(self) -> type[P]:
        """The adapter's frozen attrs params class."""
        return self.adapter_cls.params_type

    def build_params(self, overrides: Mapping[str, Any]) -> P:
        """Merge `overrides` over the yaml defaults and structure them; 422 naming the field."""
        merged = deep_merge(self.entry.defaults, overrides)
        try:
            return structure(merged, self.params_type, path="$.engine_params")
        except StructureError as exc:
            first = exc.first
            message = first.render()
            if first.message == "unknown field":  # nothing close, and too many to list here
                message += f"; GET /v1/adapters lists the params of backend {self.name!r}"
            raise ParamsValidationError(message, param=first.param or "$") from None


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, nested objects merged key by key.

    A load's `extra` or a wrapper adapter's nested `engine_params` then adds to the yaml defaults
    instead of replacing them wholesale.
    """
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def import_adapter_class(path: str, *, where: str) -> type[Adapter[SomeParams]]:
    """Import `package.module:Class` and check it looks like an adapter."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RegistryError(
            f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise RegistryError(f"{where}: module {module_name!r} has no class {class_name!r}")
    params_type = getattr(cls, "params_type", None)
    if params_type is None or not hasattr(params_type, "__attrs_attrs__"):
        raise RegistryError(f"{where}: {path} has no attrs `params_type`")
    for method in ("load", "generate", "unload", "check", "stats"):
        if not callable(getattr(cls, method, None)):
            raise RegistryError(f"{where}: {path} lacks `{method}()`")
    # checked as far as runtime can; mypy checks in-tree adapters against the contract statically
    return cast("type[Adapter[SomeParams]]", cls)


def make_adapter(
    backend: RegisteredAdapter[P], context: AdapterContext, parser: str | None = None
) -> Adapter[P]:
    """A fresh adapter instance of `backend`, behind reasoning parser `parser` if one is named."""
    adapter = backend.adapter_cls(context)
    chosen = reasoning_parser(parser) if parser is not None else None
    return adapter if chosen is None else ReasoningAdapter(adapter, chosen)


def _check_parser(where: str, name: str | None) -> None:
    """A `reasoning_parser` named in adapters.yaml is one of the allowlist."""
    if name is None:
        return
    try:
        reasoning_parser(name)
    except ValueError as exc:
        raise RegistryError(f"{where}.reasoning_parser: {exc}") from None


def _check_entry(registered: RegisteredAdapter[SomeParams]) -> None:
    """Start-up checks of one backend: its env defaults and its params defaults."""
    name = registered.name
    _check_parser(f"adapters.{name}", registered.entry.reasoning_parser)
    refused = [k for k in registered.entry.env if is_refused(k)]
    if refused:
        raise RegistryError(f"adapters.{name}.env: {refused[0]} is never allowed")
    allow = registered.entry.extra_allow
    check_allow = getattr(registered.adapter_cls, "check_extra_allow", None)
    if allow and check_allow is None:
        raise RegistryError(f"adapters.{name}.extra_allow: this backend takes no extra_allow")
    try:
        if allow and check_allow is not None:
            check_allow(allow)
    except ValueError as exc:
        raise RegistryError(f"adapters.{name}.extra_allow: {exc}") from None
    try:
        structure(registered.entry.defaults, registered.params_type, path="")
    except StructureError as exc:
        # defaults may leave required params (e.g. an upstream's base_url) to each load
        real = [e for e in exc.errors if e.message != "required field missing"]
        if real:
            where = f"adapters.{name}.defaults"
            if real[0].param is not None:
                where += f".{real[0].param}"
            raise RegistryError(f"{where}: {real[0].message}") from None


class AdapterRegistry:
    """Resolves backend names and presets; structures engine params over yaml defaults."""

    def __init__(
        self,
        config: RegistryConfig,
        *,
        model_roots: tuple[Path, ...] = (),
        cache_dir: Path | None = None,
        use_entry_points: bool = True,
        source_text: str | None = None,
        source: str = "adapters.yaml",
    ) -> None:
        self.config = config
        self.model_roots = model_roots
        # the same default the Makefile's `prepare-model` converts into
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        # heterogeneous: each backend its own params class, erased to `SomeParams` (see there)
        self._adapters: dict[str, RegisteredAdapter[SomeParams]] = {}
        if use_entry_points:
            self._add_entry_points()
        for name, entry in config.adapters.items():
            cls = import_adapter_class(entry.module, where=f"adapters.{name}.module")
            self._adapters[name] = RegisteredAdapter(name, entry, cls, "adapters.yaml")
        for registered in self._adapters.values():
            _check_entry(registered)
        for alias, preset in config.models.items():
            if preset.backend not in self._adapters:
                raise RegistryError(
                    f"models.{alias}.backend: {unknown('backend', preset.backend, self.names)}"
                )
            try:
                self.build_params(preset.backend, preset.engine_params)
            except ParamsValidationError as exc:
                raise RegistryError(f"models.{alias}.{exc.message}") from None
            self._check_sampling_defaults(alias, preset)
            _check_parser(f"models.{alias}", preset.reasoning_parser)
        self.hook_specs: tuple[HookSpec, ...] = build_hook_specs(
            config, text=source_text, source=source, use_entry_points=use_entry_points
        )

    def _check_sampling_defaults(self, alias: str, preset: PresetEntry) -> None:
        """The preset's sampling_defaults: known fields, in range, applied by its backend."""
        if not preset.sampling_defaults:
            return
        # adapters are light to construct (engines load in load()); capabilities before a
        # load list the sampling fields the backend applies
        adapter = self._adapters[preset.backend].adapter_cls(self.context(preset.backend))
        try:
            check_sampling_defaults(preset.sampling_defaults, adapter.capabilities.sampling)
        except ValueError as exc:
            raise RegistryError(f"models.{alias}.sampling_defaults.{exc}") from None

    def _add_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.config.adapters or not BACKEND_NAME.fullmatch(ep.name):
                continue  # adapters.yaml wins on a clash
            cls = import_adapter_class(ep.value, where=f"entry point {ep.name}")
            entry = AdapterEntry(module=ep.value, description=f"entry point {ep.value}")
            self._adapters[ep.name] = RegisteredAdapter(ep.name, entry, cls, "entry-point")

    @classmethod
    def from_file(cls, path: Path, **kwargs: Any) -> AdapterRegistry:
        """Load adapters.yaml from disk and build the registry."""
        text = read_registry_text(path)
        config = parse_registry(text, source=str(path))
        # the text travels along for the line numbers of hook errors
        return cls(config, source_text=text, source=str(path), **kwargs)

    @property
    def names(self) -> tuple[str, ...]:
        """Backend names, sorted."""
        return tuple(sorted(self._adapters))

    @property
    def presets(self) -> Mapping[str, PresetEntry]:
        """Named model presets from adapters.yaml."""
        return self.config.models

    def resolve(self, name: str) -> RegisteredAdapter[SomeParams]:
        """The backend called `name`, or 404."""
        try:
            return self._adapters[name]
        except KeyError:
            message = unknown("backend", name, self.names, listed_by="GET /v1/adapters")
            # a family served through presets over an engine (deepseek): point at them
            like = sorted(a for a in self.config.models if a.startswith(f"{name}-"))
            if like and len(name) <= NAME_LIMIT:
                message += f"; presets for {shown(name)}: {', '.join(like)} (load with 'preset')"
            raise NotFoundError(message, param="$.backend", code="backend_not_found") from None

    def preset(self, alias: str) -> PresetEntry:
        """The preset called `alias`, or 404."""
        try:
            return self.config.models[alias]
        except KeyError:
            raise NotFoundError(
                unknown("preset", alias, self.config.models, listed_by="GET /v1/adapters"),
                param="$.preset",
                code="preset_not_found",
            ) from None

    def context(self, name: str) -> AdapterContext:
        """What the operator decided for backend `name`, for its adapter instance."""
        entry = self.resolve(name).entry
        return AdapterContext(
            name=name,
            trust_remote_code_allowed=entry.trust_remote_code_allowed,
            allowed_hosts=entry.allowed_hosts,
            extra_allow=entry.extra_allow,
            model_roots=self.model_roots,
            cache_dir=self.cache_dir,
        )

    def reasoning_parser(
        self, name: str, preset: str | None = None, requested: str | None = None
    ) -> str | None:
        """The load's reasoning parser: the request's, else the preset's, else the backend's.

        `none` at any level turns off what the level below named; an unknown requested name
        is a 422 at `$.reasoning_parser` with the closest known one.
        """
        chosen = requested
        if chosen is None and preset is not None:
            chosen = self.preset(preset).reasoning_parser
        if chosen is None:
            chosen = self.resolve(name).entry.reasoning_parser
        if chosen is None:
            return None
        try:
            parser = reasoning_parser(chosen)
        except ValueError as exc:
            raise ParamsValidationError(str(exc), param="$.reasoning_parser") from None
        return parser.name if parser is not None else None

    def build_params(self, name: str, overrides: Mapping[str, Any]) -> SomeParams:
        """Backend `name`'s params: `overrides` over its yaml defaults; 404/422 naming the field."""
        return self.resolve(name).build_params(overrides)

    @staticmethod
    def _effective_defaults(registered: RegisteredAdapter[SomeParams]) -> dict[str, Any]:
        """Class defaults overlaid with the yaml defaults; required params are left out."""
        out: dict[str, Any] = {}
        for a in attrs.fields(registered.params_type):
            if a.default is attrs.NOTHING:
                continue
            value = a.default.factory() if isinstance(a.default, attrs.Factory) else a.default  # type: ignore[arg-type]
            out[a.name] = unstructure(value)
        out.update(registered.entry.defaults)
        return out

    def describe(self, name: str) -> dict[str, Any]:
        """Registry entry for `GET /v1/adapters`: defaults and the params JSON Schema."""
        registered = self.resolve(name)
        entry = registered.entry
        return {
            "name": name,
            "module": entry.module,
            "source": registered.source,
            "description": entry.description,
            "defaults": self._effective_defaults(registered),
            "env_allow": list(entry.env_allow),
            "trust_remote_code_allowed": entry.trust_remote_code_allowed,
            "allowed_hosts": list(entry.allowed_hosts),
            "extra_allow": list(entry.extra_allow),
            "reasoning_parser": entry.reasoning_parser,
            "params_schema": attrs_json_schema(registered.params_type),
            "hooks": [
                describe_spec(s) for s in self.hook_specs if s.scope == f"adapters.{name}.hooks"
            ],
        }

    def describe_hooks(self, scope: str) -> list[dict[str, Any]]:
        """The hooks configured at `scope` (`hooks`, `models.<alias>.hooks`) for `/v1/adapters`."""
        return [describe_spec(s) for s in self.hook_specs if s.scope == scope]


__all__ = ["AdapterRegistry", "RegisteredAdapter", "RegistryError", "SomeParams", "make_adapter"]
