"""vLLM (the CPU build) and DeepSeek-on-vLLM through the whole service, driven by the openai client.

A real uvicorn serves the app over the repository's adapters.yaml, with a model root that holds a
folder that is not a model. The preset `smollm2-135m-vllm` loads the bundled SmolLM2 on vLLM
(fp32, eager, 1 GiB KV cache); the engine core runs in processes of its own, which the tests
follow by pid. One engine start per backend: about 20-30 s each on 2 cores.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import completions_checks as checks
import httpx
import openai
import psutil
import pytest

import sampling_checks
from helpers import ADMIN, API, API_KEY, ROOT, LiveServer, make_settings
from registry.registry import AdapterRegistry
from schemas.generation import Message
from service.app import create_app

pytestmark = [
    pytest.mark.engine,
    pytest.mark.vllm,
    # importing vLLM 0.32 on torch 2.13 warns about torch.jit; the service thread imports it here
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

PRESET = "smollm2-135m-vllm"
MSGS: list[Any] = [{"role": "user", "content": "Name three colours."}]
CPU_ENGINE = {
    "dtype": "float32",
    "max_model_len": 2048,
    "enforce_eager": True,
    "extra": {"kv_cache_memory_bytes": 1 << 30},
}


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding a folder that is not a loadable model."""
    root = tmp_path_factory.mktemp("models")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return root


@pytest.fixture(scope="module")
def server(vllm_env: None, model_root: Path) -> Iterator[LiveServer]:
    """The app over adapters.yaml, in vLLM's CPU environment (tests/engines/conftest.py)."""
    registry = AdapterRegistry.from_file(
        ROOT / "adapters.yaml", use_entry_points=False, model_roots=(model_root,)
    )
    with LiveServer(create_app(make_settings(), registry=registry)) as live:
        yield live


def admin(server: LiveServer, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """POST to the control plane (engine starts take a while)."""
    return httpx.post(f"{server.url}{path}", json=body or {}, headers=ADMIN, timeout=600)


def children() -> set[int]:
    """Our live child processes (the engine core and its workers while loaded)."""
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}


@pytest.fixture(scope="module")
def loaded(server: LiveServer) -> dict[str, Any]:
    """Load the vLLM preset through REST once for the module; its load report."""
    r = admin(server, "/v1/model/load", {"preset": PRESET})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def oai(server: LiveServer, loaded: dict[str, Any]) -> Iterator[openai.OpenAI]:
    """The official client on the data plane."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_load_through_rest(loaded: dict[str, Any]) -> None:
    """The load reports vLLM's processes' memory, the engine's context and the time split."""
    assert loaded["plan"]["backend"] == "vllm"
    assert loaded["max_context"] == 2048
    assert loaded["timings"]["init_s"] > 1
    assert loaded["memory"]["rss_delta_mib"] > 500  # engine core + worker + weights + KV cache


def test_chat_both_modes(oai: openai.OpenAI, server: LiveServer) -> None:
    """Non-streaming and streaming answers with usage; engine-side timings in the record."""
    r = oai.chat.completions.create(model=PRESET, messages=MSGS, max_tokens=12)
    assert r.choices[0].message.content
    assert r.usage is not None
    assert 0 < r.usage.completion_tokens <= 12
    chunks = list(
        oai.chat.completions.create(
            model=PRESET, messages=MSGS, max_tokens=12, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None
    record = httpx.get(f"{server.url}/v1/telemetry", headers=ADMIN).json()["records"][-1]
    assert record["backend"] == "vllm"
    assert record["engine_ttft_ms"] is not None
    assert record["engine_ttft_ms"] <= record["time_to_first_token_ms"]
    assert record["kv_cache_usage"] is not None


def test_preset_default_sampling_answers_paris(oai: openai.OpenAI, server: LiveServer) -> None:
    """README's first request, no sampling set: the preset's temperature 0 / top_p 0.9 apply."""
    sampling_checks.preset_defaults_answer_paris(oai, server, PRESET)


def test_n_logprobs_streamed_equal_whole(oai: openai.OpenAI) -> None:
    """n=2 with top_logprobs, seeded: the same checks as on transformers."""
    sampling_checks.n_logprobs_streamed_equal_whole(oai, PRESET)


def test_chat_template_extensions(oai: openai.OpenAI) -> None:
    """The template and detokenisation switches (vLLM's) through the client's extra_body."""
    sampling_checks.template_switches(oai, PRESET)


def test_token_ids_and_echo(oai: openai.OpenAI) -> None:
    """return_token_ids and echo, whole and streamed, as vLLM's server shapes them."""
    sampling_checks.token_ids_and_echo(oai, PRESET, prompt_logprobs=True)


def test_prompt_logprobs(oai: openai.OpenAI) -> None:
    """One entry per prompt token (null first) holding the prompt's own token; no streams.

    vLLM refuses prompt_logprobs with stream=True, and so does the service.
    """
    r = oai.chat.completions.create(
        model=PRESET,
        messages=MSGS,
        max_tokens=1,
        extra_body={"prompt_logprobs": 2, "return_token_ids": True},
    )
    assert r.model_extra is not None
    positions, prompt_ids = r.model_extra["prompt_logprobs"], r.model_extra["prompt_token_ids"]
    assert r.usage is not None
    assert len(positions) == len(prompt_ids) == r.usage.prompt_tokens
    assert positions[0] is None
    for token, position in zip(prompt_ids[1:], positions[1:], strict=True):
        assert str(token) in position
        assert 2 <= len(position) <= 3  # the top 2, plus the prompt's token when not among them
        assert all(
            v["logprob"] <= 0 and isinstance(v["decoded_token"], str) for v in position.values()
        )
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=PRESET, messages=MSGS, max_tokens=1, stream=True,
            extra_body={"prompt_logprobs": 2},
        )  # fmt: skip
    assert refused.value.body["param"] == "prompt_logprobs"  # type: ignore[index]


def test_logit_bias_through_the_client(oai: openai.OpenAI) -> None:
    """Out-of-vocabulary ids are a 400 naming logit_bias; -100 bans a token."""
    sampling_checks.logit_bias_bans_and_is_checked(oai, PRESET)


def test_no_max_tokens_fills_the_context_then_length(oai: openai.OpenAI) -> None:
    """Without max_tokens vLLM may use the whole context left, ending with length."""
    long_prompt: list[Any] = [{"role": "user", "content": "word " * 2000}]
    out = oai.chat.completions.create(
        model=PRESET, messages=long_prompt, extra_body={"ignore_eos": True}
    )
    assert out.usage is not None
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 2048
    assert out.choices[0].finish_reason == "length"


def test_completions_token_prompt(oai: openai.OpenAI) -> None:
    """/v1/completions with a token-id prompt equals its text prompt; whole and streamed."""
    checks.check_token_prompt(oai, PRESET)


def test_completions_echo(oai: openai.OpenAI) -> None:
    """`echo` prepends the prompt (text, or token ids decoded by the engine's tokenizer)."""
    checks.check_echo(oai, PRESET)


def test_completions_logprobs(oai: openai.OpenAI) -> None:
    """Logprobs from vLLM in OpenAI's completions shape, whole and streamed."""
    checks.check_logprobs(oai, PRESET)


def test_completions_token_ids(oai: openai.OpenAI) -> None:
    """`return_token_ids` and a streamed `echo` carry the ids where vLLM's server puts them."""
    checks.check_token_ids(oai, PRESET)


def test_completions_prompt_logprobs(oai: openai.OpenAI) -> None:
    """`prompt_logprobs` and `echo` with `logprobs`: the prompt's logprobs, vLLM's shapes."""
    checks.check_prompt_logprobs(oai, PRESET)


def test_tokenize_detokenize_round_trip(server: LiveServer, loaded: dict[str, Any]) -> None:
    """/tokenize and /detokenize use vLLM's tokenizer: the ids are the model tokenizer's."""
    checks.check_tokenize_round_trip(server.url, PRESET, 2048)


def test_eight_concurrent_streams(server: LiveServer, loaded: dict[str, Any]) -> None:
    """8 streams at once all finish with exactly max_tokens tokens of usage each."""
    results: list[int] = []

    def stream() -> None:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
            chunks = list(
                c.chat.completions.create(
                    model=PRESET, messages=MSGS, max_tokens=16, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )
            )  # fmt: skip
            usage = chunks[-1].usage
            results.append(usage.completion_tokens if usage else -1)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == [16] * 8


def test_disconnect_aborts_in_the_engine(server: LiveServer, loaded: dict[str, Any]) -> None:
    """Hanging up mid-stream aborts the request inside vLLM: its running count drops to 0."""
    adapter = server.app.state.manager.current.adapter
    body = {"model": PRESET, "messages": MSGS, "max_tokens": 1000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=API, timeout=120
    ) as r:
        lines = r.iter_lines()
        for _ in range(8):
            next(lines)
        assert adapter.stats().running == 1
    deadline = time.monotonic() + 30
    while adapter.stats().running:
        assert time.monotonic() < deadline, "the engine kept the request running"
        time.sleep(0.05)
    record = httpx.get(f"{server.url}/v1/telemetry", headers=ADMIN).json()["records"][-1]
    assert record["status"] == "cancelled"
    assert record["completion_tokens"] < 1000


def test_failing_loads_leave_a_clean_state(
    server: LiveServer, loaded: dict[str, Any], model_root: Path
) -> None:
    """A typo in extra is a 422 before any engine starts; a broken model folder fails cleanly."""
    r = admin(
        server,
        "/v1/model/validate",
        {"preset": PRESET, "engine_params": {"extra": {"max_num_seqz": 4}}},
    )
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "$.engine_params.extra.max_num_seqz"
    # the broken folder loads on top of the served model, so unload that first
    assert admin(server, "/v1/model/unload").status_code == 200
    before = children()
    broken = str(model_root / "broken")
    r = admin(
        server, "/v1/model/load", {"backend": "vllm", "model": broken, "engine_params": CPU_ENGINE}
    )
    assert r.status_code == 500, r.text
    assert broken not in r.text  # no paths of ours in the message
    status = httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json()
    assert status["state"] == "empty"
    assert status["last_error"]
    time.sleep(1)
    assert children() <= before, "the failed load left an engine process behind"
    # and the next load works
    assert admin(server, "/v1/model/load", {"preset": PRESET}).status_code == 200


def test_deepseek_r1_parser_on_vllm_is_all_content(server: LiveServer) -> None:
    """The deepseek_r1 parser on vLLM: the bundled model writes no <think>, so all content."""
    r = admin(
        server,
        "/v1/model/load",
        {"backend": "vllm", "model": "bundled:smollm2-135m", "served_model_name": "ds",
         "engine_params": CPU_ENGINE, "reasoning_parser": "deepseek_r1", "replace": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    # vLLM shows its rendered prompt, so the parser need not take R1's all-reasoning assumption
    assert r.json()["details"]["reasoning_reads_prompt"] is True
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        out = c.chat.completions.create(model="ds", messages=MSGS, max_tokens=12)
        assert out.choices[0].message.content
        assert out.choices[0].message.model_extra.get("reasoning_content") is None  # type: ignore[union-attr]
        assert out.usage is not None
        assert 0 < out.usage.completion_tokens <= 12
        chunks = list(
            c.chat.completions.create(model="ds", messages=MSGS, max_tokens=12, stream=True)
        )
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas).strip()
    assert not any((d.model_extra or {}).get("reasoning_content") for d in deltas)
    # the inner vLLM adapter renders its template: SmolLM2's opens no <think>
    wrapped = server.app.state.manager.current.adapter
    prompt = wrapped.inner.render_prompt((Message("user", "hi"),))
    assert "hi" in prompt
    assert not prompt.rstrip().endswith("<think>")


def test_unload_leaves_no_engine_process(server: LiveServer) -> None:
    """Unload stops every engine process and gives back the engine's memory."""
    r = admin(server, "/v1/model/load", {"preset": PRESET, "replace": True})
    assert r.status_code == 200, r.text
    pids = server.app.state.manager.current.info.engine_pids
    rpc_dir = Path(server.app.state.manager.current.adapter._rpc_dir)
    assert pids
    assert rpc_dir.is_dir()
    r = admin(server, "/v1/model/unload")
    body = r.json()
    assert body["status"] == "unloaded"
    assert body["memory"]["rss_delta_mib"] < -500
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []
    assert not rpc_dir.exists()  # vLLM's IPC socket files went with the engine
    assert json.loads(httpx.get(f"{server.url}/ready").text)["error"]["code"] == "model_not_ready"
