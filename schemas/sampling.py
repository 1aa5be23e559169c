"""Default sampling: what a request that sets no temperature (top_p, ...) is sampled with.

The rule, as vLLM's server applies it (`ModelConfig.get_diff_sampling_param`): a field the
request sets wins; else the operator's value (here: the preset's `sampling_defaults` in
adapters.yaml, vLLM's `--override-generation-config`); else the model's own
`generation_config.json`; else the engine's neutral default (temperature 1, top_p 1, no top_k).
The service applies the preset's values (`fill_defaults`); each adapter applies the model's.

Must never: accept a key or a value a request could not send itself (same fields, same ranges).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from schemas.generation import SamplingOptions

#: field -> (lowest, highest, integer?, lowest excluded?): the request's own bounds (vLLM's
#: where it is stricter: top_p and repetition_penalty must be > 0, top_k -1 or more)
DEFAULTABLE: Mapping[str, tuple[float, float, bool, bool]] = {
    "temperature": (0.0, 2.0, False, False),
    "top_p": (0.0, 1.0, False, True),
    "top_k": (-1, 1_000_000, True, False),
    "min_p": (0.0, 1.0, False, False),
    "presence_penalty": (-2.0, 2.0, False, False),
    "frequency_penalty": (-2.0, 2.0, False, False),
    "repetition_penalty": (0.0, 10.0, False, True),
}


def check_sampling_defaults(
    values: Mapping[str, Any], honoured: frozenset[str] | None = None
) -> dict[str, float | int]:
    """Validated `sampling_defaults`; `ValueError` naming the key otherwise.

    `honoured`: the sampling fields the preset's backend applies (a default it would ignore is
    refused at start-up rather than dropped at every request).
    """
    out: dict[str, float | int] = {}
    for key, value in values.items():
        bounds = DEFAULTABLE.get(key)
        if bounds is None:
            raise ValueError(f"{key}: not a sampling field (one of {', '.join(DEFAULTABLE)})")
        lo, hi, integer, open_low = bounds
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (integer and not isinstance(value, int))
        ):
            # one error type: the registry turns it into its start-up message
            kind = "an integer" if integer else "a number"
            raise ValueError(f"{key}: must be {kind}")
        if value < lo or value > hi or (open_low and value == lo):
            low = f"greater than {lo:g}" if open_low else f"at least {lo:g}"
            raise ValueError(f"{key}: must be {low} and at most {hi:g}")
        if honoured is not None and key not in honoured:
            raise ValueError(f"{key}: the backend does not apply it")
        out[key] = value if integer else float(value)
    return out


def fill_defaults(sampling: SamplingOptions, defaults: Mapping[str, Any]) -> SamplingOptions:
    """`sampling` with the fields the request left unset (None) taken from `defaults`."""
    missing = {k: v for k, v in defaults.items() if getattr(sampling, k, 0) is None}
    return attrs.evolve(sampling, **missing) if missing else sampling


def effective_defaults(
    model: Mapping[str, Any], preset: Mapping[str, Any]
) -> dict[str, float | int]:
    """What an unset field is sampled with: the preset's value over the model's."""
    return {k: v for k, v in {**model, **preset}.items() if k in DEFAULTABLE}
