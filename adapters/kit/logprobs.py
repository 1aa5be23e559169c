"""Token logprobs from a decoding step's raw logits, for engines that expose logits, not logprobs.

The logprob is the model's own distribution (log-softmax of the raw logits, before temperature,
penalties or truncation), which is what vLLM reports by default; the `top` alternatives are the
likeliest tokens of that same distribution, each with the text `piece(token_id)` gives.

Must never: import numpy at module level (it comes with every engine that needs this, not with
the service); compute in float32 (a 50k-entry sum loses the small probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from schemas.generation import TokenLogprob

__all__ = ["logprob_from_logits"]


def logprob_from_logits(
    logits: Any, token: int, raw: bytes, top: int, piece: Callable[[int], str]
) -> TokenLogprob:
    """`token`'s logprob (and the `top` likeliest tokens') from one step's logits (array-like)."""
    import numpy as np  # noqa: PLC0415  (see the module docstring)

    values = np.asarray(logits, dtype=np.float64)
    values = values - values.max()
    values -= math.log(float(np.exp(values).sum()))
    best = [int(i) for i in np.argsort(-values)[: max(top, 0)]] if top else []
    alternatives = tuple((piece(i), float(values[i])) for i in best)
    text = raw.decode(errors="replace")
    return TokenLogprob(text, float(values[token]), tuple(raw), alternatives)
