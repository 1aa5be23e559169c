"""`logit_bias` parsing: token ids as strings, biases in [-100, 100], a bounded count."""

from __future__ import annotations

import pytest

from schemas.errors import InvalidRequestError
from service.serving import MAX_LOGIT_BIAS, parse_logit_bias


def test_pairs_in_request_order() -> None:
    """String ids become ints; biases floats; none is an empty tuple."""
    assert parse_logit_bias({"5": 1, "0": -100.0, "42": 100}) == (
        (5, 1.0),
        (0, -100.0),
        (42, 100.0),
    )
    assert parse_logit_bias(None) == ()
    assert parse_logit_bias({}) == ()


@pytest.mark.parametrize(
    "value",
    [
        {"abc": 1.0},
        {"-1": 1.0},
        {"1.5": 1.0},
        {"\u0661": 1.0},  # an Arabic-Indic one: a digit to str.isdigit, not an id
        {"9999999999": 1.0},
        {"1": 100.5},
        {"1": -101},
        {"1": float("nan")},
        {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)},
    ],
)
def test_refusals_name_logit_bias(value: dict[str, float]) -> None:
    """Every malformed map is a 400 with param logit_bias."""
    with pytest.raises(InvalidRequestError) as refused:
        parse_logit_bias(value)
    assert refused.value.param == "logit_bias"
