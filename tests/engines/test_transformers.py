"""The transformers backend through the whole service: REST load, the `openai` client, unload.

A real uvicorn serves the app built from the repository's own adapters.yaml; the preset
`smollm2-135m` loads the bundled SmolLM2 (fp32, CPU). Texts are never compared with fixed strings
(greedy output is a near tie between dtypes); stop strings are taken from the model's own greedy
answer, so the test holds whatever that answer is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import completions_checks as checks
import httpx
import openai
import psutil
import pytest

import sampling_checks
from helpers import ADMIN, API, API_KEY, ROOT, LiveServer, make_settings
from registry.registry import AdapterRegistry
from service.app import create_app

pytestmark = [pytest.mark.engine, pytest.mark.transformers]

MODEL = "smollm2-135m"
MSGS: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
MIB = 2**20
#: growth of process RSS allowed over 10 load/unload cycles (one leaked model is ~540 MiB fp32)
CYCLE_RSS_BOUND_MIB = 200


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """The app over the repository's adapters.yaml, under a real uvicorn."""
    registry = AdapterRegistry.from_file(ROOT / "adapters.yaml", use_entry_points=False)
    with LiveServer(create_app(make_settings(), registry=registry)) as live:
        yield live


def admin(server: LiveServer, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """POST to the control plane."""
    return httpx.post(f"{server.url}{path}", json=body or {}, headers=ADMIN, timeout=300)


@pytest.fixture
def loaded(server: LiveServer) -> LiveServer:
    """The server with the smollm2 preset ready."""
    status = httpx.get(f"{server.url}/v1/model/status", headers=ADMIN).json()
    if status["state"] != "ready":
        r = admin(server, "/v1/model/load", {"preset": MODEL})
        assert r.status_code == 200, r.text
    return server


@pytest.fixture
def oai(loaded: LiveServer) -> Iterator[openai.OpenAI]:
    """The official client on the data plane."""
    with openai.OpenAI(base_url=f"{loaded.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_rest_load_reports_real_figures(server: LiveServer) -> None:
    """Loading the preset through REST reports time split, RSS delta and the resolved dtype."""
    admin(server, "/v1/model/unload")
    r = admin(server, "/v1/model/load", {"preset": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["plan"]["backend"] == "transformers"
    assert body["plan"]["engine_params"]["dtype"] == "float32"
    assert body["timings"]["init_s"] > 0
    assert body["memory"]["rss_delta_mib"] > 100  # 135M params in fp32 are ~520 MiB
    assert body["device"] == "cpu"
    assert body["max_context"] == 2048


def test_openai_client_non_streaming_and_streaming(oai: openai.OpenAI, loaded: LiveServer) -> None:
    """Both modes give non-empty text with usage that adds up; records carry RSS deltas."""
    r = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16)
    assert r.choices[0].message.content
    assert r.usage is not None
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.prompt_tokens > 10
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=16, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    records = httpx.get(f"{loaded.url}/v1/telemetry", headers=ADMIN).json()["records"]
    last = records[-1]
    assert last["backend"] == "transformers"
    assert last["rss_delta_mib"] is not None
    assert "psutil" in last["memory_method"]
    assert last["time_to_first_token_ms"] > 0
    assert (
        last["engine_ttft_ms"] is None or last["engine_ttft_ms"] <= last["time_to_first_token_ms"]
    )


def test_max_tokens_gives_length(oai: openai.OpenAI) -> None:
    """With ignore_eos the answer is exactly max_tokens long and finishes with length."""
    r = oai.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 5


def test_stop_string_is_honoured(oai: openai.OpenAI) -> None:
    """A stop string taken from the greedy answer cuts the answer just before it."""
    greedy = oai.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=24, temperature=0)
    text = greedy.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = oai.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_no_max_tokens_fills_the_context_then_length(oai: openai.OpenAI) -> None:
    """Without max_tokens the answer may use the whole context left, ending with length."""
    long_prompt: list[Any] = [{"role": "user", "content": "word " * 2000}]
    chunks = list(
        oai.chat.completions.create(
            model=MODEL, messages=long_prompt, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens + usage.completion_tokens == 2048
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]


def test_seed_makes_sampling_repeatable(oai: openai.OpenAI) -> None:
    """The same seed gives the same sampled text; the temperature really samples."""

    def sample(seed: int) -> str:
        r = oai.chat.completions.create(
            model=MODEL, messages=MSGS, max_tokens=12, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content or ""

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_completions_token_prompt(oai: openai.OpenAI) -> None:
    """/v1/completions with a token-id prompt equals its text prompt; whole and streamed."""
    checks.check_token_prompt(oai, MODEL)


def test_completions_echo(oai: openai.OpenAI) -> None:
    """`echo` prepends the prompt (text, or token ids decoded by the model's tokenizer)."""
    checks.check_echo(oai, MODEL)


def test_completions_logprobs(oai: openai.OpenAI) -> None:
    """`logprobs: N` in OpenAI's completions shape, from the scores (vLLM's raw logprobs)."""
    checks.check_logprobs(oai, MODEL)


def test_completions_token_ids(oai: openai.OpenAI) -> None:
    """`return_token_ids` and a streamed `echo` carry the ids where vLLM's server puts them."""
    checks.check_token_ids(oai, MODEL)


def test_completions_prompt_logprobs_refused(oai: openai.OpenAI) -> None:
    """The transformers backend computes no prompt logprobs: refused by name, with echo's too."""
    checks.check_prompt_logprobs_refused(oai, MODEL)


def test_tokenize_detokenize_round_trip(loaded: LiveServer) -> None:
    """/tokenize and /detokenize use the loaded tokenizer: the ids are the model tokenizer's."""
    checks.check_tokenize_round_trip(loaded.url, MODEL, 2048)


def test_preset_default_sampling_answers_paris(oai: openai.OpenAI, loaded: LiveServer) -> None:
    """README's first request, no sampling set: the preset's temperature 0 / top_p 0.9 apply."""
    sampling_checks.preset_defaults_answer_paris(oai, loaded, MODEL)


def test_n_logprobs_streamed_equal_whole(oai: openai.OpenAI) -> None:
    """n=2 with top_logprobs, seeded: OpenAI's logprobs shape, usage summed, stream == whole."""
    sampling_checks.n_logprobs_streamed_equal_whole(oai, MODEL)


def test_chat_template_extensions(oai: openai.OpenAI) -> None:
    """The template and detokenisation switches (vLLM's) through the client's extra_body."""
    sampling_checks.template_switches(oai, MODEL)


def test_token_ids_and_echo(oai: openai.OpenAI) -> None:
    """return_token_ids and echo, whole and streamed, as vLLM's server shapes them."""
    sampling_checks.token_ids_and_echo(oai, MODEL)


def test_logit_bias_through_the_client(oai: openai.OpenAI) -> None:
    """A token id past the vocabulary is a 400 naming logit_bias; a -100 bias bans a token."""
    sampling_checks.logit_bias_bans_and_is_checked(oai, MODEL)


def test_disconnect_frees_the_slot(loaded: LiveServer) -> None:
    """A client that hangs up stops generation: the next request is not stuck behind it."""
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 400, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream(
        "POST", f"{loaded.url}/v1/chat/completions", json=body, headers=API, timeout=60
    ) as r:
        lines = r.iter_lines()
        got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert got
    manager = loaded.app.state.manager
    deadline = time.monotonic() + 30
    while manager.in_flight or manager.current.adapter.stats().running:
        assert time.monotonic() < deadline, "the abandoned generation kept running"
        time.sleep(0.05)
    r2 = httpx.post(
        f"{loaded.url}/v1/chat/completions",
        json={"model": MODEL, "messages": MSGS, "max_tokens": 4},
        headers=API,
        timeout=60,
    )
    assert r2.status_code == 200
    # 400 abandoned tokens at ~20 tokens/s would hold the one slot for ~20 s
    assert r2.json()["metrics"]["queue_time_ms"] < 5000


def test_unload_while_streaming_ends_with_error_and_frees_memory(loaded: LiveServer) -> None:
    """Unload past its drain timeout ends the open stream with an error event, frees RSS."""
    events: list[str] = []

    def consume() -> None:
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 400, "stream": True,
                "ignore_eos": True}  # fmt: skip
        with httpx.stream(
            "POST", f"{loaded.url}/v1/chat/completions", json=body, headers=API, timeout=120
        ) as r:
            events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 60
    while len(events) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = admin(loaded, "/v1/model/unload", {"drain_timeout_s": 0})
    thread.join(timeout=60)
    body = r.json()
    assert body["aborted"] == 1
    assert body["memory"]["rss_delta_mib"] < -200
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "model_unloaded"


def test_ten_load_unload_cycles_do_not_grow_rss(server: LiveServer) -> None:
    """RSS after unload stays within a bound over 10 cycles; later cycles report it returned."""
    admin(server, "/v1/model/unload")
    proc = psutil.Process()
    after: list[float] = []
    reports = []
    for _ in range(10):
        assert admin(server, "/v1/model/load", {"preset": MODEL}).status_code == 200
        reports.append(admin(server, "/v1/model/unload").json())
        after.append(proc.memory_info().rss / MIB)
    growth = max(after) - min(after)
    assert growth < CYCLE_RSS_BOUND_MIB, after
    # each report compares with the backend's first baseline and with the previous unload
    assert all(r["memory_vs_first_baseline_mib"] is not None for r in reports)
    assert all(r["memory_vs_previous_unload_mib"] is not None for r in reports[1:])
    returned = [r["memory_returned"] for r in reports]
    assert returned.count(True) >= 8, reports
