"""The structured-output and tool features each adapter declares are catalogued and consistent."""

from __future__ import annotations

import attrs
import pytest

from adapters.base import AdapterContext, Capabilities
from adapters.echo import EchoAdapter
from adapters.reasoning import PARSERS
from adapters.reasoning_adapter import ReasoningAdapter
from adapters.tool_parsing import TOOL_CALL_PARSERS
from adapters.transformers import _FEATURES as TRANSFORMERS
from adapters.transformers import TransformersAdapter, TransformersParams
from adapters.vllm import _FEATURES as VLLM
from adapters.vllm import VllmAdapter, VllmParams
from schemas.features import FEATURES, check_declared
from schemas.validators import FieldValueError

STRUCTURED = {f for f in FEATURES if f.startswith(("response_format.", "structured_outputs."))}
FORCED_TOOLS = {"tools", "tool_choice.required", "tool_choice.named", "parallel_tool_calls"}


def test_engines_declare_catalogued_names() -> None:
    """Both engines declare every constraint and the forced tools; `auto` only with a parser."""
    for declared in (TRANSFORMERS, VLLM):
        check_declared(declared)
        assert declared >= STRUCTURED | FORCED_TOOLS
        assert "tool_choice.auto" not in declared  # added at load when a parser is named
    for cls in (TransformersAdapter, VllmAdapter):
        assert "tool_choice.auto" in cls.declared_features
        unloaded = cls(AdapterContext(name="x")).capabilities.features
        assert "tool_choice.auto" not in unloaded


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's, as vLLM imports it
def test_tool_call_parser_names_are_allowlisted() -> None:
    """`tool_call_parser` takes vLLM's names from the allowlist only (400/422 otherwise)."""
    from vllm.tool_parsers import ToolParserManager  # noqa: PLC0415

    assert set(ToolParserManager.list_registered()) >= TOOL_CALL_PARSERS
    for params in (TransformersParams, VllmParams):
        assert params(tool_call_parser="hermes").tool_call_parser == "hermes"
        with pytest.raises(FieldValueError, match="tool_call_parser"):
            params(tool_call_parser="some.module:Plugin")


class _Inner(EchoAdapter):
    """Echo claiming vLLM's constraints and forced tools, as a loaded vLLM would."""

    @property
    def capabilities(self) -> Capabilities:
        """The features of vLLM plus logit_bias."""
        return attrs.evolve(Capabilities(), features=frozenset(VLLM | {"logit_bias"}))


def test_echo_and_a_reasoning_parser_declare_none() -> None:
    """Echo constrains nothing; a reasoning parser drops its inner engine's (they bind <think>)."""
    assert not EchoAdapter(AdapterContext(name="echo")).capabilities.features & STRUCTURED
    for parser in PARSERS.values():
        adapter = ReasoningAdapter(_Inner(AdapterContext(name="vllm")), parser)
        features = adapter.capabilities.features
        assert not features & (STRUCTURED | FORCED_TOOLS - {"tools"})
        assert "logit_bias" in features
