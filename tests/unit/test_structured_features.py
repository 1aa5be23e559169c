"""The structured-output and tool features each adapter declares are catalogued and consistent."""

from __future__ import annotations

import attrs

from adapters.base import AdapterContext, Capabilities
from adapters.deepseek import DeepseekAdapter
from adapters.echo import EchoAdapter
from adapters.transformers import _FEATURES as TRANSFORMERS
from adapters.vllm import _FEATURES as VLLM
from schemas.features import FEATURES, check_declared

STRUCTURED = {f for f in FEATURES if f.startswith(("response_format.", "structured_outputs."))}
FORCED_TOOLS = {"tools", "tool_choice.required", "tool_choice.named", "parallel_tool_calls"}


def test_engines_declare_catalogued_names() -> None:
    """Both engines declare every constraint and the forced tools; no parser, so no `auto`."""
    for declared in (TRANSFORMERS, VLLM):
        check_declared(declared)
        assert declared >= STRUCTURED | FORCED_TOOLS
        assert "tool_choice.auto" not in declared


def test_echo_and_deepseek_declare_none() -> None:
    """Echo constrains nothing; DeepSeek drops its inner engine's (a constraint binds <think>)."""
    assert not EchoAdapter(AdapterContext(name="echo")).capabilities.features & STRUCTURED
    adapter = DeepseekAdapter(AdapterContext(name="deepseek"))
    inner = attrs.evolve(Capabilities(), features=frozenset(VLLM | {"logit_bias"}))
    adapter._inner = type("Inner", (), {"capabilities": inner})()
    assert adapter.capabilities.features == {"logit_bias"}
