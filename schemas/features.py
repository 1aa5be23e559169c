"""The catalogue of OpenAI (and vLLM-extension) features an adapter may declare it honours.

Every route and request field beyond plain chat is a named feature. An adapter lists the ones it
honours in `Capabilities.features`; the service refuses (400 naming the field) a request that uses
a feature the loaded adapter does not list, so nothing is ever silently ignored. The README's
table of features x backends is generated from this catalogue and the adapters' declarations
(`python -m schemas.features --markdown`), so it cannot drift from what the code does.

Names: a route is its path (`/v1/completions`); a request field is its name (`logit_bias`), or
`field.value` where a field's values are honoured one by one (`response_format.json_schema`,
`tool_choice.required`).

Must never: import the service or an adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from attrs import frozen


@frozen
class Feature:
    """One route or request field, as the README's table shows it."""

    name: str
    group: str
    summary: str


_CATALOGUE = (
    # routes
    Feature("/v1/completions", "routes", "legacy completions: prompt as text or token ids"),
    Feature("/tokenize", "routes", "vLLM's tokenize (prompt or chat messages)"),
    Feature("/detokenize", "routes", "vLLM's detokenize"),
    # structured output
    Feature("response_format.json_object", "structured output", "any JSON object"),
    Feature("response_format.json_schema", "structured output", "JSON matching a schema"),
    Feature("structured_outputs.json", "structured output", "vLLM extension: JSON schema"),
    Feature("structured_outputs.regex", "structured output", "vLLM extension: regex"),
    Feature("structured_outputs.choice", "structured output", "vLLM extension: one of strings"),
    Feature("structured_outputs.grammar", "structured output", "vLLM extension: EBNF grammar"),
    # tools
    Feature("tools", "tools", "function tools, tool_choice none, tool calls in the history"),
    Feature("tool_choice.required", "tools", "the model must call a tool"),
    Feature("tool_choice.named", "tools", "the model must call the named function"),
    Feature("parallel_tool_calls", "tools", "several tool calls in one answer"),
    Feature("tool_choice.auto", "tools", "the model decides (needs the model's tool parser)"),
    # sampling and scoring
    Feature("logit_bias", "sampling", "token id -> bias"),
    Feature("prompt_logprobs", "sampling", "vLLM extension: logprobs of the prompt tokens"),
    Feature("return_token_ids", "sampling", "vLLM extension: prompt and output token ids"),
    # chat template and detokenization
    Feature("echo", "template", "vLLM extension: the last message is echoed in the answer"),
    Feature("add_generation_prompt", "template", "vLLM extension: false to skip it"),
    Feature("continue_final_message", "template", "vLLM extension: continue the last message"),
    Feature("chat_template_kwargs", "template", "vLLM extension: extra template variables"),
    Feature("skip_special_tokens", "template", "vLLM extension: false keeps special tokens"),
    Feature(
        "spaces_between_special_tokens", "template", "vLLM extension: false joins special tokens"
    ),
    Feature("stream_options.continuous_usage_stats", "streaming", "usage in every streamed chunk"),
    # content
    Feature("image_url", "content", "image content parts (multimodal models)"),
)

FEATURES: Mapping[str, Feature] = {f.name: f for f in _CATALOGUE}


def catalogue() -> Iterator[Feature]:
    """Every feature, in the README's order."""
    return iter(_CATALOGUE)


def is_feature(name: str) -> bool:
    """Whether `name` is in the catalogue (adapters may only declare catalogued names)."""
    return name in FEATURES


def check_declared(features: frozenset[str]) -> None:
    """Refuse (`ValueError`) a declared feature name the catalogue lacks.

    A typo would otherwise refuse a field the adapter meant to honour.
    """
    unknown = sorted(features - FEATURES.keys())
    if unknown:
        raise ValueError(f"unknown feature names {unknown}; see schemas/features.py")


def set_value(value: Any) -> bool:
    """Whether a request field holds something other than "not set"."""
    return value not in (None, [], {})


#: (feature, param, "does this request use it?") for the fields honoured one by one
_CHAT_USES: tuple[tuple[str, str, Callable[[Any], bool]], ...] = (
    ("response_format.json_object", "response_format",
     lambda r: r.response_format is not None and r.response_format.get("type") == "json_object"),
    ("response_format.json_schema", "response_format",
     lambda r: r.response_format is not None and r.response_format.get("type") == "json_schema"),
    *(
        (f"structured_outputs.{k}", f"structured_outputs.{k}",
         lambda r, k=k: r.structured_outputs is not None and k in r.structured_outputs)
        for k in ("json", "regex", "choice", "grammar")
    ),
    ("tools", "tools", lambda r: set_value(r.tools)),
    ("tool_choice.required", "tool_choice",
     lambda r: set_value(r.tools) and r.tool_choice == "required"),
    ("tool_choice.named", "tool_choice",
     lambda r: set_value(r.tools) and isinstance(r.tool_choice, dict)),
    ("parallel_tool_calls", "parallel_tool_calls",
     lambda r: set_value(r.tools) and bool(r.parallel_tool_calls)),
    ("tool_choice.auto", "tool_choice",
     lambda r: set_value(r.tools) and r.tool_choice in (None, "auto")),
    ("logit_bias", "logit_bias", lambda r: set_value(r.logit_bias)),
    ("prompt_logprobs", "prompt_logprobs", lambda r: r.prompt_logprobs is not None),
    ("return_token_ids", "return_token_ids", lambda r: bool(r.return_token_ids)),
    ("echo", "echo", lambda r: r.echo),
    ("add_generation_prompt", "add_generation_prompt", lambda r: not r.add_generation_prompt),
    ("continue_final_message", "continue_final_message", lambda r: r.continue_final_message),
    ("chat_template_kwargs", "chat_template_kwargs", lambda r: set_value(r.chat_template_kwargs)),
    ("skip_special_tokens", "skip_special_tokens", lambda r: not r.skip_special_tokens),
    ("spaces_between_special_tokens", "spaces_between_special_tokens",
     lambda r: not r.spaces_between_special_tokens),
    ("stream_options.continuous_usage_stats", "stream_options.continuous_usage_stats",
     lambda r: r.stream_options is not None and r.stream_options.continuous_usage_stats),
)  # fmt: skip


def chat_request_features(req: Any) -> Iterator[tuple[str, str]]:
    """(feature, param) for each catalogued feature a chat request uses, in field order.

    `req` is a `schemas.openai.ChatCompletionRequest` (typed loosely: that module may import this
    one). Defaults that change nothing (`add_generation_prompt: true`, `echo: false`, ...) are not
    uses; only a value that asks the engine for something is.
    """
    return ((feature, param) for feature, param, used in _CHAT_USES if used(req))
