"""The SGLang adapter against a fake sglang 0.5.23 (tests/fakes/fake_sglang): the contract.

sglang cannot run here (CUDA-only kernels). The fake reproduces the 0.5.23 signatures and output
shapes (each cited to the wheel's source), and two data files dumped from the wheel pin what the
fake must match: `server_args_0_5_23.json` and `engine_api_0_5_23.json`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import msgspec
import pytest

from adapters.base import AdapterContext
from adapters.sglang import (
    SERVER_ARGS_FIELDS,
    SGLANG_EXTRA,
    SGLANG_VERSION,
    SglangAdapter,
    SglangParams,
    finish_reason,
)
from registry.config import AdapterEntry, RegistryConfig
from registry.registry import AdapterRegistry
from schemas.errors import (
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    ServiceUnavailableError,
)
from schemas.generation import GenerationRequest, Message, SamplingOptions, TokenDelta

FAKE_ROOT = Path(__file__).resolve().parents[1] / "fakes" / "fake_sglang"
PINNED = FAKE_ROOT / "sglang" / "srt"
MODEL = "acme/fake-model"
TEXT = "Hello, world!"  # the fake script's default pieces, joined


def _purge_sglang() -> None:
    for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        del sys.modules[name]


@pytest.fixture
def control(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake sglang on sys.path (this module only), reset; yields its `fake_control`."""
    _purge_sglang()
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    from sglang import fake_control  # noqa: PLC0415  (only importable with the fake)

    fake_control.reset()
    yield fake_control
    _purge_sglang()


@pytest.fixture
async def adapter(control: ModuleType) -> AsyncIterator[SglangAdapter]:
    """An unloaded SGLang adapter; unloaded again at the end of the test."""
    instance = SglangAdapter(AdapterContext(name="sglang"))
    yield instance
    await instance.unload()


def _params(**values: Any) -> SglangParams:
    return SglangParams(**values)


def _request(
    text: str = "Say hello", request_id: str = "req-1", **sampling: Any
) -> GenerationRequest:
    options = SamplingOptions(**{"max_tokens": 32, **sampling})
    return GenerationRequest(request_id, (Message("user", text),), options)


async def _collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    return [delta async for delta in stream]


async def _next(stream: AsyncIterator[TokenDelta]) -> TokenDelta:
    return await anext(stream)


def _engine(control: ModuleType) -> Any:
    return control.ENGINES[-1]


async def _settle(condition: Callable[[], bool]) -> None:
    """Let the fake scheduler run until `condition` holds (bounded by steps, not by time)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the fake engine did not reach the expected state")


# --- the fake against what was pinned from the 0.5.23 wheel ------------------------------------


def test_pinned_server_args_fields_match_the_fake(control: ModuleType) -> None:
    """The adapter's pinned ServerArgs names are exactly the fake's, both dumped from 0.5.23."""
    from sglang.srt.server_args import ServerArgs  # noqa: PLC0415

    data = json.loads((PINNED / "server_args_0_5_23.json").read_text("utf-8"))
    fake_names = [f.name for f in msgspec.structs.fields(ServerArgs)]
    assert data["version"] == SGLANG_VERSION
    assert len(fake_names) == len(set(fake_names)) == 546
    assert set(fake_names) == SERVER_ARGS_FIELDS
    assert set(SGLANG_EXTRA.spec.fields) <= SERVER_ARGS_FIELDS  # every vetted key is a real field


def test_fake_signatures_match_the_0_5_23_source(control: ModuleType) -> None:
    """Every method the adapter calls has the real parameter names, order and async-ness."""
    from sglang.srt.entrypoints.engine import Engine  # noqa: PLC0415
    from sglang.srt.managers.load_snapshot import LoadSnapshot  # noqa: PLC0415
    from sglang.srt.managers.tokenizer_manager import TokenizerManager  # noqa: PLC0415
    from sglang.srt.sampling.sampling_params import FIELDS  # noqa: PLC0415

    api = json.loads((PINNED / "engine_api_0_5_23.json").read_text("utf-8"))
    methods = {
        "Engine.async_generate": Engine.async_generate,
        "Engine.shutdown": Engine.shutdown,
        "TokenizerManager.abort_request": TokenizerManager.abort_request,
        "TokenizerManager.auto_create_handle_loop": TokenizerManager.auto_create_handle_loop,
        "TokenizerManager.generate_request": TokenizerManager.generate_request,
    }
    for name, method in methods.items():
        assert list(inspect.signature(method).parameters) == api[name]["params"], name
        is_async = inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method)
        assert is_async == api[name]["async"], name
    init = inspect.signature(Engine.__init__).parameters
    assert [p.kind for p in init.values()][-1] is inspect.Parameter.VAR_KEYWORD
    assert list(FIELDS) == api["SamplingParams"]["fields"]
    assert set(LoadSnapshot.__struct_fields__) <= set(api["LoadSnapshot"]["fields"])


def test_sampling_names_are_sglang_names(control: ModuleType) -> None:
    """Every key the adapter can put in sampling_params is a 0.5.23 SamplingParams field."""
    from adapters.sglang import sampling_params  # noqa: PLC0415

    api = json.loads((PINNED / "engine_api_0_5_23.json").read_text("utf-8"))
    full = SamplingOptions(
        max_tokens=8,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=7,
        stop=("x",),
        stop_token_ids=(3,),
        ignore_eos=True,
        min_tokens=2,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
    )
    mapped = sampling_params(full, seed_allowed=True)
    assert set(mapped) <= set(api["SamplingParams"]["fields"])
    assert mapped["max_new_tokens"] == 8
    assert mapped["min_new_tokens"] == 2
    assert mapped["sampling_seed"] == 7
    assert "sampling_seed" not in sampling_params(full, seed_allowed=False)


# --- params ------------------------------------------------------------------------------------


def _registry(**entry: Any) -> AdapterRegistry:
    config = RegistryConfig(
        adapters={"sglang": AdapterEntry(module="adapters.sglang:SglangAdapter", **entry)}
    )
    return AdapterRegistry(config, use_entry_points=False)


def _check(extra: dict[str, Any]) -> None:
    """The dry run of a load: params built by the registry, then the adapter's check()."""
    params = _registry().build_params("sglang", {"extra": extra})
    assert isinstance(params, SglangParams)  # the registry knows it at run time only
    SglangAdapter(AdapterContext(name="sglang")).check(MODEL, params)


def test_extra_typo_is_a_422_naming_the_key() -> None:
    """A misspelt ServerArgs name in extra is refused with the key's full path and a hint."""
    with pytest.raises(ParamsValidationError) as caught:
        _check({"max_total_tokns": 4096})
    assert caught.value.status_code == 422
    assert caught.value.param == "$.engine_params.extra.max_total_tokns"
    assert caught.value.code == "unknown_param"
    assert "did you mean 'max_total_tokens'" in caught.value.message


@pytest.mark.parametrize("key", ["trust_remote_code", "model_path", "dtype", "api_key"])
def test_extra_cannot_set_what_others_decide(key: str) -> None:
    """Typed, registry-gated, model-root and secret fields cannot come in through extra."""
    with pytest.raises(ParamsValidationError) as caught:
        _check({key: "x"})
    assert caught.value.param == f"$.engine_params.extra.{key}"
    assert caught.value.code == "param_refused"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quantization", "fp9"),
        ("attention_backend", "flashinfr"),
        ("chunked_prefill_size", 0),
        ("tp_size", 0),
        ("mem_fraction_static", 1.5),
        ("dtype", "fp32"),
    ],
)
def test_typed_params_are_validated(field: str, value: Any) -> None:
    """Out-of-range or unknown values of typed params are 422s naming the field."""
    with pytest.raises(ParamsValidationError) as caught:
        _registry().build_params("sglang", {field: value})
    assert caught.value.param == f"$.engine_params.{field}"


def test_params_fields_are_documented() -> None:
    """Every params field has a docstring (it becomes the JSON Schema description)."""
    from schemas.jsonschema import field_docs  # noqa: PLC0415

    docs = field_docs(SglangParams)
    assert {f.name for f in attrs.fields(SglangParams)} == set(docs)


async def test_params_map_to_server_args_names(adapter: SglangAdapter, control: ModuleType) -> None:
    """Typed params and extra reach ServerArgs under sglang's names; unset ones keep defaults."""
    params = _params(
        dtype="bfloat16",
        context_length=2048,
        tp_size=2,
        dp_size=1,
        max_running_requests=8,
        chunked_prefill_size=-1,
        quantization="fp8",
        attention_backend="triton",
        extra={"kv_cache_dtype": "fp8_e5m2", "random_seed": 3},
    )
    info = await adapter.load(MODEL, params)
    args = _engine(control).server_args
    assert args.model_path == MODEL
    assert (args.dtype, args.context_length, args.tp_size, args.dp_size) == ("bfloat16", 2048, 2, 1)
    assert (args.max_running_requests, args.chunked_prefill_size) == (8, -1)
    assert (args.quantization, args.attention_backend) == ("fp8", "triton")
    assert (args.kv_cache_dtype, args.random_seed) == ("fp8_e5m2", 3)
    assert args.trust_remote_code is False
    assert args.mem_fraction_static is None  # sglang's own default, not ours
    assert args.log_level == "error"  # Engine's default when none is given
    assert info.max_context == 2048
    assert info.details["sglang_version"] == SGLANG_VERSION


def test_trust_remote_code_needs_the_registry() -> None:
    """trust_remote_code is refused unless adapters.yaml allows it for the backend."""
    refused = SglangAdapter(AdapterContext(name="sglang"))
    with pytest.raises(ParamsValidationError) as caught:
        refused.check(MODEL, _params(trust_remote_code=True))
    assert caught.value.param == "$.engine_params.trust_remote_code"
    allowed = SglangAdapter(AdapterContext(name="sglang", trust_remote_code_allowed=True))
    allowed.check(MODEL, _params(trust_remote_code=True))


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("incremental", [False, True])
@pytest.mark.parametrize("interval", [1, 3])
async def test_deltas_rebuild_the_text(
    adapter: SglangAdapter, control: ModuleType, incremental: bool, interval: int
) -> None:
    """Cumulative (sglang's default) or incremental chunks give the same deltas and counts."""
    extra = {"incremental_streaming_output": incremental, "stream_interval": interval}
    await adapter.load(MODEL, _params(extra=extra))
    deltas = await _collect(adapter.generate(_request()))
    assert "".join(d.text for d in deltas) == TEXT
    assert sum(d.token_count for d in deltas) == 5  # four pieces and the EOS token
    assert [d.finish_reason for d in deltas][-1] == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    if interval == 1:
        assert [d.text for d in deltas] == ["Hello", ",", " world", "!", ""]


async def test_usage_and_eos_finish(adapter: SglangAdapter, control: ModuleType) -> None:
    """Prompt tokens ride on the first and last delta; EOS is a `stop` naming its token id."""
    await adapter.load(MODEL, _params())
    deltas = await _collect(adapter.generate(_request()))
    received = _engine(control).tokenizer_manager.received[-1]
    assert deltas[0].prompt_tokens == deltas[-1].prompt_tokens == len(received["input_ids"])
    assert all(d.prompt_tokens is None for d in deltas[1:-1])
    assert deltas[-1].stop_reason == control.SCRIPT.eos_token_id


async def test_prompt_is_the_chat_template_without_a_second_bos(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """The rendered template goes in as ids, with no BOS added on top of the template's."""
    await adapter.load(MODEL, _params())
    request = GenerationRequest(
        "r",
        (Message("developer", "Be brief."), Message("user", "Hi")),
        SamplingOptions(max_tokens=4),
    )
    await _collect(adapter.generate(request))
    manager = _engine(control).tokenizer_manager
    rendered = adapter.render_prompt(request.messages)
    assert rendered.startswith("<|im_start|>system\nBe brief.")  # developer → system
    assert rendered.endswith("<|im_start|>assistant\n")
    assert manager.received[-1]["input_ids"] == manager.tokenizer.encode(
        rendered, add_special_tokens=False
    )
    assert manager.received[-1]["input_ids"][0] != manager.tokenizer.bos_token_id


async def test_max_tokens_finishes_with_length(adapter: SglangAdapter, control: ModuleType) -> None:
    """`max_tokens` maps to max_new_tokens and ends the stream with `length`."""
    await adapter.load(MODEL, _params())
    deltas = await _collect(adapter.generate(_request(max_tokens=2)))
    assert "".join(d.text for d in deltas) == "Hello,"
    assert sum(d.token_count for d in deltas) == 2
    assert deltas[-1].finish_reason == "length"


async def test_ignore_eos_and_min_tokens(adapter: SglangAdapter, control: ModuleType) -> None:
    """ignore_eos runs to max_tokens; min_tokens above max_tokens is capped, not refused."""
    await adapter.load(MODEL, _params())
    deltas = await _collect(adapter.generate(_request(max_tokens=6, ignore_eos=True)))
    assert sum(d.token_count for d in deltas) == 6
    assert deltas[-1].finish_reason == "length"
    deltas = await _collect(adapter.generate(_request("again", "r2", max_tokens=3, min_tokens=9)))
    assert deltas[-1].finish_reason == "length"
    sent = _engine(control).tokenizer_manager.received[-1]["sampling_params"]
    assert sent["min_new_tokens"] == 3


@pytest.mark.parametrize("incremental", [False, True])
async def test_stop_string_is_trimmed_and_reported(
    adapter: SglangAdapter, control: ModuleType, incremental: bool
) -> None:
    """A stop string ends with `stop` naming it; neither it nor its held-back start leaks."""
    control.SCRIPT.pieces = ["Hello", ",", " wor", "ld", "!"]
    await adapter.load(MODEL, _params(extra={"incremental_streaming_output": incremental}))
    deltas = await _collect(adapter.generate(_request(stop=(" world",))))
    assert "".join(d.text for d in deltas) == "Hello,"
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", " world")
    assert sum(d.token_count for d in deltas) == 4


async def test_stop_token_ids_and_top_k_zero(adapter: SglangAdapter, control: ModuleType) -> None:
    """stop_token_ids stop at that token; top_k 0 (OpenAI's "off") becomes sglang's -1."""
    await adapter.load(MODEL, _params())
    manager = _engine(control).tokenizer_manager
    comma = manager.tokenizer.id_of(",")
    deltas = await _collect(adapter.generate(_request(stop_token_ids=(comma,), top_k=0)))
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", comma)
    assert manager.received[-1]["sampling_params"]["top_k"] == -1


async def test_seed_is_offered_only_when_deterministic(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """`seed` maps to sampling_seed, which 0.5.23 honours only under deterministic inference."""
    await adapter.load(MODEL, _params())
    assert "seed" not in adapter.capabilities.sampling
    await adapter.unload()
    await adapter.load(MODEL, _params(extra={"enable_deterministic_inference": True}))
    assert "seed" in adapter.capabilities.sampling
    await _collect(adapter.generate(_request(seed=11)))
    assert _engine(control).tokenizer_manager.received[-1]["sampling_params"]["sampling_seed"] == 11


async def test_engine_validation_errors_are_400(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """A ValueError from sglang (prompt past the context) becomes a 400, not a 500."""
    await adapter.load(MODEL, _params(context_length=16))
    with pytest.raises(InvalidRequestError) as caught:
        await _collect(adapter.generate(_request("word " * 40)))
    assert caught.value.status_code == 400
    assert "context length" in caught.value.message
    assert _engine(control).tokenizer_manager.rid_to_state == {}


@pytest.mark.parametrize(("status", "error"), [(503, EngineError), (400, InvalidRequestError)])
async def test_error_aborts_raise(
    adapter: SglangAdapter, control: ModuleType, status: int, error: type[Exception]
) -> None:
    """An abort with a status code is an error (4xx: the request's, else the engine's)."""
    control.SCRIPT.error_abort = (status, "scheduler said no")
    await adapter.load(MODEL, _params())
    with pytest.raises(error, match="scheduler said no"):
        await _collect(adapter.generate(_request()))


def test_finish_reason_shapes() -> None:
    """Each 0.5.23 finish_reason dict maps to an OpenAI reason (and the matched stop)."""
    assert finish_reason(None) == (None, None)
    assert finish_reason({"type": "stop", "matched": 2}) == ("stop", 2)
    assert finish_reason({"type": "stop", "matched": "\n\n"}) == ("stop", "\n\n")
    assert finish_reason({"type": "length", "length": 9}) == ("length", None)
    aborted = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    assert finish_reason(aborted) == ("abort", None)
    assert finish_reason({"type": "abort", "message": "Abort in waiting queue"}) == ("abort", None)


# --- cancellation and lifecycle ----------------------------------------------------------------


async def test_aclose_aborts_the_engine_request(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """Closing the stream (client gone) aborts the sglang request and frees its state."""
    control.SCRIPT.pause_after = 2
    await adapter.load(MODEL, _params())
    manager = _engine(control).tokenizer_manager
    stream = adapter.generate(_request())
    first = await anext(stream)
    assert first.text == "Hello"
    await stream.aclose()
    rid = manager.received[-1]["rid"]
    assert manager.aborts == [(rid, False)]
    await _settle(lambda: not manager.rid_to_state)
    assert adapter.stats().running == 0


async def test_cancel_aborts_the_engine_request(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """Cancelling the consuming task aborts the sglang request."""
    control.SCRIPT.pause_after = 1
    await adapter.load(MODEL, _params())
    manager = _engine(control).tokenizer_manager
    seen: list[TokenDelta] = []

    async def consume() -> None:
        async for delta in adapter.generate(_request()):
            seen.append(delta)  # noqa: PERF401  (the test watches deltas arrive one by one)

    task = asyncio.create_task(consume())
    await _settle(lambda: len(seen) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [rid for rid, _ in manager.aborts] == [manager.received[-1]["rid"]]


async def test_rids_are_prefix_free(adapter: SglangAdapter, control: ModuleType) -> None:
    """Aborting request "a" leaves request "ab" running (sglang aborts by rid prefix)."""
    control.SCRIPT.pause_after = 1
    await adapter.load(MODEL, _params())
    manager = _engine(control).tokenizer_manager
    short, long = (
        adapter.generate(_request(request_id="a")),
        adapter.generate(_request(request_id="ab")),
    )
    await anext(short)
    await anext(long)
    await short.aclose()
    await _settle(lambda: len(manager.rid_to_state) == 1)
    (survivor,) = manager.rid_to_state
    assert survivor.endswith(":ab")
    await long.aclose()


async def test_queued_abort_chunk_repeats_no_text(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """In incremental mode the queued-abort chunk carries the whole text: none is repeated."""
    control.SCRIPT.pause_after = 2
    await adapter.load(MODEL, _params(extra={"incremental_streaming_output": True}))
    manager = _engine(control).tokenizer_manager
    stream = adapter.generate(_request())
    got = [await anext(stream), await anext(stream)]
    manager._handle_abort_req(manager.received[-1]["rid"])  # as for a retracted request
    got += [delta async for delta in stream]
    assert "".join(d.text for d in got) == "Hello,"
    assert got[-1].finish_reason == "abort"


async def test_unload_aborts_in_flight_and_is_idempotent(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """Unload ends live streams with `abort`, shuts down once, stops sglang's loop task."""
    control.SCRIPT.pause_after = 1
    await adapter.load(MODEL, _params())
    engine = _engine(control)
    stream = adapter.generate(_request())
    await anext(stream)
    rest = asyncio.create_task(_collect(stream))
    await adapter.unload()
    await adapter.unload()
    deltas = await rest
    assert deltas[-1].finish_reason == "abort"
    assert engine.shutdown_calls == 1
    assert all(task.done() for task in engine.tokenizer_manager.asyncio_tasks)
    assert adapter.stats().running is None
    with pytest.raises(ServiceUnavailableError):  # 503 like every adapter, not a 500
        await _collect(adapter.generate(_request()))


async def test_load_failure_leaves_a_clean_state(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """A failing engine start is a sanitised EngineError; unload works; the next load succeeds."""
    control.SCRIPT.fail_init = "CUDA out of memory in /opt/secret/weights/model.py line 3"
    with pytest.raises(EngineError) as caught:
        await adapter.load(MODEL, _params())
    assert "/opt/secret" not in caught.value.message
    assert "CUDA out of memory" in caught.value.message
    await adapter.unload()
    control.SCRIPT.fail_init = None
    await adapter.load(MODEL, _params())
    assert "".join(d.text for d in await _collect(adapter.generate(_request()))) == TEXT


async def test_cancelled_load_shuts_the_engine_down_once_built(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """A load cancelled while the engine builds leaves no engine behind once the build ends."""
    gate = threading.Event()
    control.SCRIPT.init_gate = gate
    task = asyncio.create_task(adapter.load(MODEL, _params()))
    assert await asyncio.to_thread(control.SCRIPT.init_started.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await asyncio.to_thread(control.SCRIPT.shut_down.wait, 30)
    assert _engine(control).shutdown_calls == 1
    assert adapter._engine is None


async def test_missing_chat_template_fails_the_load(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """A model without a chat template is refused at load; unload then stops the engine."""
    control.SCRIPT.chat_template = None
    with pytest.raises(EngineError, match="chat template"):
        await adapter.load(MODEL, _params())
    await adapter.unload()
    assert _engine(control).shutdown_calls == 1


async def test_missing_sglang_is_a_clear_engine_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without sglang installed, load fails with an install hint, not an ImportError."""
    _purge_sglang()
    monkeypatch.setitem(sys.modules, "sglang", None)
    adapter = SglangAdapter(AdapterContext(name="sglang"))
    with pytest.raises(EngineError, match=r"inference-wrapper\[sglang\]"):
        await adapter.load(MODEL, _params())
    await adapter.unload()


async def test_load_keeps_the_servers_signal_handlers(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """The engine's receive loop starts at load without taking over SIGTERM/SIGQUIT."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGQUIT)}
    await adapter.load(MODEL, _params())
    manager = _engine(control).tokenizer_manager
    assert manager.event_loop is asyncio.get_running_loop()
    assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_stats_come_from_load_snapshots(adapter: SglangAdapter, control: ModuleType) -> None:
    """Running/waiting counts and KV use are read from the engine's load snapshot."""
    assert adapter.stats().running is None
    control.SCRIPT.pause_after = 1
    await adapter.load(MODEL, _params(max_running_requests=1))
    first, second = adapter.generate(_request()), adapter.generate(_request(request_id="req-2"))
    await anext(first)
    pending = asyncio.create_task(_next(second))
    manager = _engine(control).tokenizer_manager
    await _settle(lambda: len(manager.received) == 2)
    stats = adapter.stats()
    assert (stats.running, stats.waiting) == (1, 1)
    assert stats.kv_cache_usage is not None
    assert stats.kv_cache_usage > 0
    await first.aclose()
    await pending
    await second.aclose()


# --- raw prompts (`/v1/completions`) -------------------------------------------------------------


async def test_raw_text_prompt_skips_the_template_and_adds_bos(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """A completions prompt goes in as the tokenizer's ids of the text, BOS first, no template."""
    await adapter.load(MODEL, _params())
    assert "/v1/completions" in adapter.capabilities.features
    request = GenerationRequest("r", (), SamplingOptions(max_tokens=4), prompt="Once upon a")
    deltas = await _collect(adapter.generate(request))
    manager = _engine(control).tokenizer_manager
    ids = manager.received[-1]["input_ids"]
    assert ids == manager.tokenizer.encode("Once upon a", add_special_tokens=True)
    assert ids[0] == manager.tokenizer.bos_token_id
    assert deltas[0].prompt_tokens == len(ids)
    assert deltas[-1].finish_reason is not None


async def test_raw_token_prompt_runs_as_given_within_the_vocabulary(
    adapter: SglangAdapter, control: ModuleType
) -> None:
    """Token ids go to sglang unchanged; an id outside the vocabulary is a 400 on `prompt`."""
    await adapter.load(MODEL, _params())
    request = GenerationRequest("r", (), SamplingOptions(max_tokens=4), prompt=(1, 11, 12, 13))
    await _collect(adapter.generate(request))
    assert _engine(control).tokenizer_manager.received[-1]["input_ids"] == [1, 11, 12, 13]
    bad = GenerationRequest("r2", (), SamplingOptions(max_tokens=4), prompt=(1, 10**9))
    with pytest.raises(InvalidRequestError) as info:
        await _collect(adapter.generate(bad))
    assert info.value.param == "prompt"
