"""One context-length rule on every backend: the same request gets the same answer everywhere.

`max_tokens` beyond the context, or prompt + `max_tokens` beyond it when the request set
`max_tokens`, is a 400 `context_length_exceeded`; without `max_tokens` the completion gets the
room the prompt leaves. Echo and the fake SGLang run always; the real transformers and vLLM
adapters run under their engine markers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.base import AdapterContext
from adapters.bundled import default_cache_dir
from schemas.errors import InvalidRequestError
from schemas.generation import GenerationRequest, Message, SamplingOptions

LIMIT = 128
FAKE_SGLANG = Path(__file__).resolve().parents[1] / "fakes" / "fake_sglang"
BUNDLED = "bundled:smollm2-135m"

Factory = Callable[[pytest.MonkeyPatch], Awaitable[Any]]


async def _echo(_: pytest.MonkeyPatch) -> Any:
    from adapters.echo import EchoAdapter, EchoParams  # noqa: PLC0415

    adapter = EchoAdapter(AdapterContext(name="echo"))
    await adapter.load("echo", EchoParams(max_context=LIMIT))
    return adapter


async def _sglang(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(FAKE_SGLANG))
    from sglang import fake_control  # noqa: PLC0415  (only importable with the fake)

    from adapters.sglang import SglangAdapter, SglangParams  # noqa: PLC0415

    fake_control.reset()
    adapter = SglangAdapter(AdapterContext(name="sglang"))
    await adapter.load("acme/fake-model", SglangParams(context_length=LIMIT))
    return adapter


async def _transformers(_: pytest.MonkeyPatch) -> Any:
    from adapters.transformers import TransformersAdapter, TransformersParams  # noqa: PLC0415

    adapter = TransformersAdapter(
        AdapterContext(name="transformers", cache_dir=default_cache_dir())
    )
    params = TransformersParams(dtype="float32", device="cpu", max_model_len=LIMIT)
    await adapter.load(BUNDLED, params)
    return adapter


async def _vllm(monkeypatch: pytest.MonkeyPatch) -> Any:
    from adapters.vllm import VllmAdapter, VllmParams  # noqa: PLC0415

    # vLLM's CPU environment, as tests/engines/conftest.py sets it; vLLM's own writes are undone
    # by the test's environment restore
    for key, value in {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CONFIGURE_LOGGING": "0",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    adapter = VllmAdapter(AdapterContext(name="vllm", cache_dir=default_cache_dir()))
    params = VllmParams(
        dtype="float32",
        max_model_len=LIMIT,
        enforce_eager=True,
        extra={"kv_cache_memory_bytes": 256 * 1024 * 1024},
    )
    await adapter.load(BUNDLED, params)
    return adapter


async def _run(adapter: Any, text: str, **sampling: Any) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of one generation."""
    req = GenerationRequest("ctx-test", (Message("user", text),), SamplingOptions(**sampling))
    prompt, completion = 0, 0
    async for delta in adapter.generate(req):
        completion += delta.token_count
        prompt = delta.prompt_tokens or prompt
    return prompt, completion


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(_echo, id="echo"),
        pytest.param(_sglang, id="sglang-fake"),
        pytest.param(
            _transformers, id="transformers", marks=[pytest.mark.engine, pytest.mark.transformers]
        ),
        pytest.param(
            _vllm,
            id="vllm",
            marks=[
                pytest.mark.engine,
                pytest.mark.vllm,
                pytest.mark.slow,
                # as in tests/engines/test_vllm*.py: vllm-cpu imports a deprecated torch API
                pytest.mark.filterwarnings(
                    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
                ),
            ],
        ),
    ],
)
async def test_context_limit_rule_is_the_same_on_every_backend(
    factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too many asked tokens is a 400 with one wording; no max_tokens means clamp to the room."""
    saved = dict(os.environ)
    adapter = await factory(monkeypatch)
    try:
        prompt, _ = await _run(adapter, "Say hi", max_tokens=1)
        assert 0 < prompt < LIMIT
        room = LIMIT - prompt
        for asked in (LIMIT + 1, room + 1):
            with pytest.raises(InvalidRequestError) as refused:
                await _run(adapter, "Say hi", max_tokens=asked)
            assert refused.value.status_code == 400
            assert (refused.value.code, refused.value.param) == (
                "context_length_exceeded",
                "max_tokens",
            )
            assert refused.value.message == (
                f"This model's maximum context length is {LIMIT} tokens; the request asks for "
                f"{prompt + asked} ({prompt} in the prompt, max_tokens {asked}). "
                "Shorten the prompt or lower max_tokens."
            )
        # the request set no max_tokens: the service passes the whole context, the room is used
        _, completion = await _run(
            adapter, "Say hi", max_tokens=LIMIT, max_tokens_default=True, temperature=0.0
        )
        assert 0 < completion <= room
        with pytest.raises(InvalidRequestError) as too_long:
            await _run(adapter, "word " * (2 * LIMIT), max_tokens=LIMIT, max_tokens_default=True)
        assert (too_long.value.code, too_long.value.param) == (
            "context_length_exceeded",
            "messages",
        )
        assert too_long.value.message.startswith(
            f"This model's maximum context length is {LIMIT} tokens; the prompt takes "
        )
    finally:
        await adapter.unload()
        os.environ.clear()
        os.environ.update(saved)
