"""Fixtures shared by the real-engine tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The process environment vLLM's CPU build needs (its engine processes inherit it).

    vLLM itself writes keys into `os.environ` while it builds an engine (worker start method,
    thread counts, its IPC folder); the whole environment is put back for the tests after us.
    """
    saved = dict(os.environ)
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"  # else one of two cores stays idle
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # its lines through our handlers, as the CLI does
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
