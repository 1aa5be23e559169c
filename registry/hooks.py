"""Hooks named in adapters.yaml: resolved, imported and validated at start-up.

`module:` is a built-in short name (`hooks.builtin.BUILTIN_HOOKS`), the short name of an installed
package's entry point in the group `inference_wrapper.hooks`, or `package.module:Class`. Built-in
names win over entry points (an installed package cannot replace `regex_redact`). Params are
structured into the hook's `params_type` here, so a bad pattern or a missing field stops the
service with the key path and line (`hooks[0].params.patterns (line 4)`), never the first request.

Must never: import a module whose path came from a request; instantiate a hook (the service does,
in its lifespan, once the secret store and telemetry exist).
"""

from __future__ import annotations

import importlib
import importlib.metadata

import attrs

from hooks.base import Hook
from hooks.builtin import BUILTIN_HOOKS
from hooks.chain import HookSpec
from registry.config import HookEntry, RegistryConfig, RegistryError, line_of
from schemas.converter import StructureError, structure

HOOK_ENTRY_POINT_GROUP = "inference_wrapper.hooks"


def import_hook_class(path: str, *, where: str) -> type[Hook]:
    """Import `package.module:Class` and check it is a hook with an attrs params class."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise RegistryError(
            f"{where}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, Hook):
        raise RegistryError(f"{where}: {path} is not a hook class (subclass hooks.Hook)")
    if not attrs.has(cls.params_type):
        raise RegistryError(f"{where}: {path} has no attrs `params_type`")
    return cls


def _entry_points() -> dict[str, str]:
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group=HOOK_ENTRY_POINT_GROUP)
        if ":" in ep.value
    }


class _Resolver:
    """Short names → class paths, entry points read once and only when a short name needs them."""

    def __init__(self, use_entry_points: bool) -> None:
        self.use_entry_points = use_entry_points
        self._eps: dict[str, str] | None = None

    def resolve(self, ref: str, where: str) -> tuple[str, str]:
        """(class path, source) of a `module:` value."""
        if ":" in ref:
            return ref, "module"
        if ref in BUILTIN_HOOKS:
            return BUILTIN_HOOKS[ref], "built-in"
        if self.use_entry_points:
            if self._eps is None:
                self._eps = _entry_points()
            if ref in self._eps:
                return self._eps[ref], "entry-point"
        known = sorted({*BUILTIN_HOOKS, *(self._eps or {})})
        raise RegistryError(f"{where}: unknown hook {ref!r}; known: {', '.join(known)}")


def _scopes(config: RegistryConfig) -> list[tuple[str, tuple[HookEntry, ...]]]:
    """Every hook list in file order of precedence: global, backends, presets."""
    out = [("hooks", config.hooks)]
    out += [(f"adapters.{name}.hooks", a.hooks) for name, a in config.adapters.items()]
    out += [(f"models.{alias}.hooks", m.hooks) for alias, m in config.models.items()]
    return [(scope, entries) for scope, entries in out if entries]


def build_hook_specs(
    config: RegistryConfig,
    *,
    text: str | None = None,
    source: str = "adapters.yaml",
    use_entry_points: bool = True,
) -> tuple[HookSpec, ...]:
    """Resolve, import and validate every hook of the file; `RegistryError` naming key and line."""

    def fail(path: str, message: str) -> RegistryError:
        line = line_of(text, path) if text is not None else None
        where = f" (line {line})" if line else ""
        return RegistryError(f"{source}: {message} @ {path}{where}")

    resolver = _Resolver(use_entry_points)
    specs: list[HookSpec] = []
    for scope, entries in _scopes(config):
        names: set[str] = set()
        for i, entry in enumerate(entries):
            at = f"{scope}[{i}]"
            try:
                path, how = resolver.resolve(entry.module, at)
                cls = import_hook_class(path, where=f"{at}.module")
            except RegistryError as exc:
                raise fail(f"{at}.module", str(exc).removeprefix(f"{at}.module: ")) from None
            if entry.label in names:
                raise fail(f"{at}.name", f"two hooks named {entry.label!r}; give each a name")
            names.add(entry.label)
            try:
                params = structure(entry.params, cls.params_type, path=f"{at}.params")
            except StructureError as exc:
                first = exc.errors[0]
                raise fail(first.path, first.message) from None
            specs.append(
                HookSpec(
                    name=entry.label,
                    module=entry.module,
                    cls=cls,
                    params=params,
                    scope=scope,
                    source=how,
                    budget_ms=entry.budget_ms,
                    chunk_budget_ms=entry.chunk_budget_ms,
                    timeout_ms=entry.timeout_ms,
                )
            )
    return tuple(specs)


__all__ = ["HOOK_ENTRY_POINT_GROUP", "build_hook_specs", "import_hook_class"]
