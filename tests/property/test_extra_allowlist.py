"""Generated nested `extra` payloads against the vLLM and SGLang allowlists.

Keys are drawn from each allowlist's own declared names (allowed, refused, reserved, at every
nesting level), near-misses and random names; values from any JSON, deep and wide ones included,
and JSON strings of nested objects. Whatever comes in: either every key path of what is accepted
is declared and allowed, or a 422 `ParamsValidationError` names a path under the payload's root.
Nothing else is raised (no RecursionError, no TypeError, no 500).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.kit import ListOf, Nullable, Obj, ParamPolicy, ParamSpec, Refused, Reserved
from adapters.sglang import SGLANG_EXTRA
from adapters.vllm import VLLM_EXTRA
from schemas.errors import ParamsValidationError

ROOT = "$.engine_params.extra"
POLICIES = {"vllm": VLLM_EXTRA, "sglang": SGLANG_EXTRA}

json_leaf: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
any_json = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=30,
)


def _names(spec: ParamSpec) -> list[str]:
    """Declared names of `spec` and of every object nested in it."""
    out: list[str] = []
    stack = [spec]
    while stack:
        current = stack.pop()
        if isinstance(current, Nullable):
            stack.append(current.inner)
        elif isinstance(current, ListOf):
            stack.append(current.item)
        elif isinstance(current, Obj):
            out.extend(current.fields)
            stack.extend(current.fields.values())
    return sorted(set(out))


def _keys(policy: ParamPolicy) -> st.SearchStrategy[str]:
    names = _names(policy.spec)
    near = [n[:-1] for n in names] + [n + "s" for n in names]
    return st.sampled_from(names) | st.sampled_from(near) | st.text(max_size=16)


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def _payloads(policy: ParamPolicy) -> st.SearchStrategy[dict[str, Any]]:
    keys = _keys(policy)
    values = st.recursive(
        any_json | st.builds(_deep, st.integers(1, 20)),
        lambda inner: (
            st.dictionaries(keys, inner, max_size=5)
            | st.lists(inner, max_size=5)
            | st.dictionaries(keys, inner, max_size=5).map(json.dumps)
        ),
        max_leaves=15,
    )
    return st.dictionaries(keys, values, max_size=6)


def _assert_only_allowed_paths(value: Any, spec: ParamSpec, path: str) -> None:
    """Every key path in an accepted `value` is declared by `spec` and not refused/reserved."""
    if isinstance(spec, Nullable):
        if value is not None:
            _assert_only_allowed_paths(value, spec.inner, path)
        return
    assert not isinstance(spec, Refused | Reserved), f"{path} passed although refused"
    if isinstance(spec, Obj):
        assert isinstance(value, dict), f"{path} is not an object after the check"
        for key, sub in value.items():
            assert key in spec.fields, f"{path}.{key} is not declared"
            _assert_only_allowed_paths(sub, spec.fields[key], f"{path}.{key}")
    elif isinstance(spec, ListOf):
        assert isinstance(value, list)
        for i, item in enumerate(value):
            _assert_only_allowed_paths(item, spec.item, f"{path}[{i}]")
    else:
        assert not isinstance(value, dict | list), f"{path} holds a container where a scalar is"


def _outcome(policy: ParamPolicy, extra: dict[str, Any]) -> Any:
    """What the policy accepted, or the 422 it raised (anything else propagates)."""
    try:
        return policy.check(extra)
    except ParamsValidationError as exc:
        return exc


@pytest.mark.parametrize("engine", sorted(POLICIES))
def test_generated_extra_is_allowlisted_or_a_422(engine: str) -> None:
    """Accepted payloads hold only allowlisted key paths; the rest are 422s under the root."""
    policy = POLICIES[engine]

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_payloads(policy))
    def check(extra: dict[str, Any]) -> None:
        outcome = _outcome(policy, extra)
        if isinstance(outcome, ParamsValidationError):
            assert outcome.status_code == 422
            assert outcome.param is not None
            assert outcome.param.startswith(ROOT)
        else:
            _assert_only_allowed_paths(outcome, policy.spec, ROOT)

    check()


@pytest.mark.parametrize("engine", sorted(POLICIES))
@given(depth=st.integers(9, 3000))
@settings(max_examples=10, deadline=None)
def test_any_depth_past_the_limit_is_a_422(engine: str, depth: int) -> None:
    """However deep a value under any declared key, the answer is a 422, never an exception."""
    policy = POLICIES[engine]
    deep = _deep(depth)
    for key in _names(policy.spec):
        outcome = _outcome(policy, {key: deep})
        assert isinstance(outcome, ParamsValidationError), f"{key}: {depth} deep was accepted"
        assert outcome.status_code == 422
