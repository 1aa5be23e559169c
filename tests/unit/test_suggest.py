"""Near-miss suggestions: the closest known name, the short list, and bounds on what is echoed."""

from __future__ import annotations

import pytest

from schemas.converter import StructureError, structure
from schemas.openai import ChatMessageIn
from schemas.suggest import NAME_LIMIT, closest, hint, unknown

PRESETS = ["deepseek-api", "echo", "smollm2-135m", "smollm2-135m-vllm"]


def test_closest_finds_the_typo_it_was_meant_to_be() -> None:
    """Prefixes, dropped and added letters and case differences find their known name."""
    assert closest("smollm2", PRESETS) == "smollm2-135m"
    assert closest("dtyp", ["device", "dtype", "max_model_len"]) == "dtype"
    assert closest("max_model_length", ["max_num_seqs", "max_model_len"]) == "max_model_len"
    assert closest("Temperature", ["temperature", "top_p"]) == "temperature"
    assert closest("colour", ["dtype", "max_model_len"]) is None


def test_the_known_list_is_shown_only_when_short() -> None:
    """Up to ten names are listed; more are not, and `listed_by` says where they are."""
    assert hint("x", ["a", "b"]) == "known: a, b"
    many = [f"name{i:02d}" for i in range(11)]
    assert hint("zzz", many) == ""
    assert unknown("preset", "zzz", many, listed_by="GET /v1/adapters") == (
        "unknown preset 'zzz' (all listed by GET /v1/adapters)"
    )


def test_a_huge_name_is_cut_and_not_searched() -> None:
    """A 100 kB name is echoed cut to NAME_LIMIT characters and gets no suggestion."""
    name = "smollm2" + "x" * 100_000
    assert closest(name, PRESETS) is None
    message = unknown("preset", name, PRESETS)
    assert len(message) < NAME_LIMIT + 100 + sum(len(p) + 2 for p in PRESETS)
    with pytest.raises(StructureError) as info:
        structure({"role": "user", name: 1}, ChatMessageIn)
    assert len(info.value.first.render()) < 300
    assert len(info.value.first.path) < NAME_LIMIT + 10
