"""Data plane through Litestar's test client: shapes, SSE rules, parameters, limits, errors."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from litestar.testing import TestClient

from helpers import ADMIN, API, chat_body, load, sse_events


@pytest.fixture
def echo(client: Any) -> Any:
    """The test client with the echo preset loaded."""
    load(client, preset="echo")
    return client


def post(client: Any, body: dict[str, Any], headers: dict[str, str] = API) -> Any:
    """POST a chat request."""
    return client.post("/v1/chat/completions", json=body, headers=headers)


def test_non_streaming_shape_and_usage(echo: Any) -> None:
    """The response has OpenAI's shape, the echoed text, consistent usage and metrics."""
    r = post(echo, chat_body("one two three"))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "echo"
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "one two three"},
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
    }
    usage = body["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    metrics = body["metrics"]
    assert metrics["time_to_first_token_ms"] <= metrics["e2e_ms"]
    assert metrics["completion_tokens"] == 3
    assert r.headers["x-request-id"]


def test_stream_framing_usage_and_role(echo: Any) -> None:
    """SSE: LF framing, one id, role with the first token, usage last, then [DONE]."""
    r = post(echo, chat_body("a b c", stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    raw = r.text
    assert "\r\n" not in raw
    assert raw.endswith("data: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert chunks[-1]["metrics"]["completion_tokens"] == 3
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": "a"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "a b c"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert all(f is None for f in finishes[:-1])


def test_stream_without_usage_has_no_usage_key(echo: Any) -> None:
    """Without include_usage no chunk carries `usage` and every chunk has a choice."""
    r = post(echo, chat_body("x y", stream=True))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert "metrics" in chunks[-1]


def test_max_tokens_gives_length(echo: Any) -> None:
    """max_tokens and max_completion_tokens cut the output with finish_reason length."""
    for key in ("max_tokens", "max_completion_tokens"):
        body = post(echo, chat_body("a b c d e", **{key: 2})).json()
        assert body["choices"][0]["message"]["content"] == "a b"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 2


def test_stop_string_and_list(echo: Any) -> None:
    """A stop string ends the output before it, whether given alone or in a list."""
    body = post(echo, chat_body("alpha beta gamma", stop="gam")).json()
    assert body["choices"][0]["message"]["content"] == "alpha beta "
    assert body["choices"][0]["finish_reason"] == "stop"
    body = post(echo, chat_body("alpha beta gamma", stop=["zzz", " beta"])).json()
    assert body["choices"][0]["message"]["content"] == "alpha"


def test_ignore_eos_gives_fixed_length(echo: Any) -> None:
    """ignore_eos (vLLM's extension) makes the output exactly max_tokens long."""
    body = post(echo, chat_body("a b", ignore_eos=True, max_tokens=7)).json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_n_choices(echo: Any) -> None:
    """N > 1 gives n choices (echo repeats); streaming indexes them."""
    body = post(echo, chat_body("hi there", n=2)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 4
    r = post(echo, chat_body("hi there", n=2, stream=True))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1]


def test_n_above_adapter_limit_is_400(echo: Any) -> None:
    """N beyond the adapter's capability is refused with param n."""
    r = post(echo, chat_body(n=9))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "n"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": [1]}, "stop"),
        ({"n": "2"}, "n"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"top_k": 5}, "top_k"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 10**9}, "max_tokens"),
        # vLLM's chat extensions: refused by name where the backend does not declare them
        ({"echo": True}, "echo"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"return_token_ids": True}, "return_token_ids"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_bad_or_unsupported_params_name_param(echo: Any, extra: dict[str, Any], param: str) -> None:
    """Each bad or unsupported parameter is a 400 that names it, never ignored."""
    r = post(echo, chat_body(**extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert err["code"] is None or isinstance(err["code"], str)


def test_bad_messages(echo: Any) -> None:
    """Roles, content parts and an empty conversation are checked with paths."""
    r = post(echo, {"model": "echo", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.json()["error"]["param"] == "messages[0].role"
    r = post(echo, {"model": "echo", "messages": []})
    assert r.json()["error"]["param"] == "messages"
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    r = post(echo, {"model": "echo", "messages": [{"role": "user", "content": image}]})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages[0].content")
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": " two"}]
    r = post(echo, {"model": "echo", "messages": [{"role": "user", "content": parts}]})
    assert r.json()["choices"][0]["message"]["content"] == "part one two"


def test_not_json_and_not_object(echo: Any) -> None:
    """Bodies that are not JSON objects are 400, not 500."""
    for raw in (b"", b"nope", b"[1,2]", b'"x"', b"{"):
        headers = {**API, "Content-Type": "application/json"}
        r = echo.post("/v1/chat/completions", content=raw, headers=headers)
        assert r.status_code == 400, raw


def test_wrong_model_is_404(echo: Any) -> None:
    """A model name the server does not serve is model_not_found."""
    r = post(echo, {**chat_body(), "model": "gpt-4"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")


def test_message_count_cap(app_factory: Any) -> None:
    """More messages than IW_MAX_MESSAGES is a 400 on messages."""
    with TestClient(app_factory(max_messages=2)) as client:
        load(client, preset="echo")
        msgs = [{"role": "user", "content": "x"}] * 3
        r = post(client, {"model": "echo", "messages": msgs})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "messages")


def test_body_size_limit_is_413(app_factory: Any) -> None:
    """A body over IW_MAX_BODY_BYTES is refused with 413 in the error envelope."""
    with TestClient(app_factory(max_body_bytes=2048)) as client:
        load(client, preset="echo")
        r = post(client, chat_body("x" * 5000))
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"


def test_no_model_is_503_with_retry_after(client: Any) -> None:
    """Before any load the data plane answers 503 with Retry-After."""
    r = post(client, chat_body())
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) > 0
    assert client.get("/v1/models", headers=API).json() == {"object": "list", "data": []}


def test_client_request_id_is_kept(echo: Any) -> None:
    """A client's x-request-id comes back and is used in telemetry; junk ids are replaced."""
    r = post(echo, chat_body(), headers={**API, "x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    records = echo.get("/v1/telemetry", headers=ADMIN).json()["records"]
    assert records[-1]["request_id"] == "trace-42"
    r = post(echo, chat_body(), headers={**API, "x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"] != "bad id\twith spaces"


def test_engine_failure_mid_stream_is_an_error_event(client: Any) -> None:
    """An engine that dies after some tokens ends the stream with an error event and [DONE]."""
    load(client, backend="echo", model="echo", engine_params={"fail_after_tokens": 2})
    r = post(client, chat_body("a b c d", stream=True))
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "engine_error"
    assert "failing after 2 tokens" in err["message"]
    contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2]]
    assert contents == ["a", " b"]
    r = post(client, chat_body("a b c d"))
    assert (r.status_code, r.json()["error"]["code"]) == (500, "engine_error")


def test_queue_full_is_429(app_factory: Any) -> None:
    """Past max_concurrency + max_queue, requests get 429 with Retry-After, others finish."""
    with TestClient(app_factory(max_concurrency=1, max_queue=1)) as client:
        load(client, backend="echo", model="echo", engine_params={"token_delay_ms": 100})
        codes: list[int] = []

        def slow() -> None:
            codes.append(post(client, chat_body("a b c d e")).status_code)

        threads = [threading.Thread(target=slow) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while client.app.state.admission.running + client.app.state.admission.queued < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = post(client, chat_body())
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        for t in threads:
            t.join()
        assert codes == [200, 200]
        assert client.app.state.admission.running == client.app.state.admission.queued == 0


def test_dead_engine_is_unloaded_and_ready_says_so(client: Any) -> None:
    """An engine that dies under a request is unloaded: /ready turns 503, last_error says why."""
    load(
        client,
        backend="echo",
        model="echo",
        engine_params={"fail_after_tokens": 1, "fail_fatal": True},
    )
    r = post(client, chat_body("a b c"))
    assert (r.status_code, r.json()["error"]["code"]) == (500, "engine_dead")
    deadline = time.monotonic() + 10
    while client.get("/v1/model/status", headers=ADMIN).json()["state"] != "empty":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert status["last_error"].startswith("engine died")
    assert client.get("/ready").status_code == 503
    load(client, preset="echo")
    assert post(client, chat_body()).status_code == 200
