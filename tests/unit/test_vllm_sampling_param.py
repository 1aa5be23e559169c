"""The `param` of a refusal by vLLM's own `SamplingParams` (adapters/vllm.py `_sampling_param`).

bench/parity_vllm.py found `n=2` at temperature 0 refused naming `messages`: vLLM's refusal names
no parameter and the adapter fell back to the prompt. The refusals here are raised by the
installed vLLM's real `SamplingParams` (no engine), so a changed wording in vLLM shows up here.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm.sampling_params import SamplingParams

from adapters.vllm import _sampling_param


def refusal(**params: Any) -> Exception:
    """What `SamplingParams.from_optional(**params)` raises."""
    with pytest.raises(Exception) as caught:
        SamplingParams.from_optional(**params)
    assert isinstance(caught.value, Exception)
    return caught.value


def test_n_above_one_at_temperature_0_names_n() -> None:
    """The refusal "n must be 1 when using greedy sampling" carries no parameter: ours names n."""
    exc = refusal(n=2, temperature=0.0)
    assert "greedy" in str(exc)
    assert getattr(exc, "parameter", None) is None
    assert _sampling_param(exc) == "n"


def test_unnamed_refusal_names_the_field_it_starts_with() -> None:
    """Other unnamed checks name their field first (presence_penalty, min_p)."""
    assert _sampling_param(refusal(presence_penalty=3.0)) == "presence_penalty"
    assert _sampling_param(refusal(min_p=2.0)) == "min_p"


def test_named_refusal_keeps_vllms_parameter() -> None:
    """A refusal vLLM names keeps that name (in our spelling: logprobs -> top_logprobs)."""
    assert _sampling_param(refusal(temperature=-1.0)) == "temperature"
    assert _sampling_param(refusal(logprobs=-2)) == "top_logprobs"


def test_a_refusal_about_no_request_field_names_none() -> None:
    """Never the misleading `messages`: null when the message names no request field."""
    assert _sampling_param(ValueError("something else went wrong")) is None
    assert _sampling_param(ValueError("thinking_token_budget must be >= 0")) is None
