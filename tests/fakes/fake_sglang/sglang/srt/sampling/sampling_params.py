"""Fake `SamplingParams`: the 0.5.23 field names and the checks the adapter can trip.

Real: sampling/sampling_params.py:140 `class SamplingParams(msgspec.Struct, kw_only=True,
array_like=True)`, built by tokenizer_manager.py:1564 `self.sampling_params_class(**kwargs)`
(an unknown name is a `TypeError`), then `normalize()` and `verify()` (ValueError on ranges).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_API = json.loads((Path(__file__).parents[1] / "engine_api_0_5_23.json").read_text("utf-8"))
FIELDS: tuple[str, ...] = tuple(_API["SamplingParams"]["fields"])


class SamplingParams:
    """Keyword-only, like the real msgspec Struct; holds what the fake scheduler reads."""

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            # msgspec's message for an unexpected keyword on a Struct
            raise TypeError(f"Unexpected keyword argument '{unknown[0]}'")
        self.max_new_tokens: int = kwargs.get("max_new_tokens", 128)  # sampling_params.py:150
        self.min_new_tokens: int = kwargs.get("min_new_tokens", 0)
        self.ignore_eos: bool = kwargs.get("ignore_eos", False)
        stop = kwargs.get("stop")
        self.stop_strs: list[str] = [stop] if isinstance(stop, str) else list(stop or [])
        self.stop_token_ids: set[int] = set(kwargs.get("stop_token_ids") or [])
        self.top_p: float = kwargs.get("top_p", 1.0)
        self.top_k: int = kwargs.get("top_k", -1)
        self.raw = dict(kwargs)

    def verify(self) -> None:
        """The subset of sampling_params.py:252-295 `verify` the contract tests exercise."""
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got "
                f"{self.min_new_tokens}."
            )
