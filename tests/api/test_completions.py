"""Legacy completions, model retrieve, tokenize/detokenize refusal and /version on the echo backend.

Echo echoes the prompt (token ids as their decimal spelling), so every path of the route can be
checked exactly and fast; the official `openai` client's typed calls run against a live server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from helpers import (
    ADMIN,
    API,
    API_KEY,
    TEST_REGISTRY,
    LiveServer,
    load,
    make_registry,
    make_settings,
    sse_events,
)
from service.app import create_app
from service.version import package_version


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    """One test client with the echo preset loaded, shared by the module (no test changes it)."""
    registry = make_registry(tmp_path_factory.mktemp("completions"), TEST_REGISTRY)
    with TestClient(create_app(make_settings(), registry=registry)) as c:
        load(c, preset="echo")
        yield c


def post(client: Any, body: dict[str, Any], headers: dict[str, str] = API) -> Any:
    """POST a completions request (model `echo` unless given)."""
    return client.post("/v1/completions", json={"model": "echo", **body}, headers=headers)


def chunks_of(r: Any) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE answer, checked to end with `[DONE]`."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "\r\n" not in r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def refused(r: Any, param: str | None, status: int = 400) -> dict[str, Any]:
    """`r` is an OpenAI error envelope with `status` naming `param`."""
    assert r.status_code == status, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error


def test_whole_answer_shape_usage_and_metrics(echo: Any) -> None:
    """`text_completion` with OpenAI's choice shape, usage that adds up, and our metrics."""
    r = post(echo, {"prompt": "one two three"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "echo"
    assert body["choices"] == [
        {
            "index": 0,
            "text": "one two three",
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["metrics"]["completion_tokens"] == 3
    assert body["metrics"]["time_to_first_token_ms"] <= body["metrics"]["e2e_ms"]
    assert r.headers["x-request-id"]


def test_max_tokens_defaults_to_16(echo: Any) -> None:
    """Without max_tokens at most 16 tokens come back (OpenAI's default), finish `length`."""
    words = " ".join(f"w{i}" for i in range(40))
    body = post(echo, {"prompt": words}).json()
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == " ".join(f"w{i}" for i in range(16))


def test_prompt_forms_give_the_same_answer(echo: Any) -> None:
    """A string equals a list of one string; token ids equal a list of one list of them."""
    assert post(echo, {"prompt": ["a b c"]}).json()["choices"][0]["text"] == "a b c"
    by_ids = post(echo, {"prompt": [5, 6, 7]}).json()
    nested = post(echo, {"prompt": [[5, 6, 7]]}).json()
    assert by_ids["choices"][0]["text"] == nested["choices"][0]["text"] == " 5 6 7"
    assert by_ids["usage"]["prompt_tokens"] == 3


def test_stream_chunks_usage_and_done(echo: Any) -> None:
    """Streamed: one id, `text_completion` chunks, finish last, then the usage chunk and [DONE]."""
    r = post(echo, {"prompt": "a b c", "stream": True, "stream_options": {"include_usage": True}})
    chunks = chunks_of(r)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert chunks[-1]["metrics"]["completion_tokens"] == 3
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert "".join(texts) == "a b c"
    assert texts[0] == "a"  # the first token travels alone, at once
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes[-1] == "stop"
    assert all(f is None for f in finishes[:-1])


def test_stream_without_usage_has_no_usage_key(echo: Any) -> None:
    """Without include_usage no chunk carries `usage`; the last choice chunk carries metrics."""
    chunks = chunks_of(post(echo, {"prompt": "x y", "stream": True}))
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert chunks[-1]["metrics"]["completion_tokens"] == 2


def test_n_choices_whole_and_streamed(echo: Any) -> None:
    """`n` gives n indexed choices with the same echo; usage counts them all."""
    body = post(echo, {"prompt": "p q", "n": 3}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["text"] for c in body["choices"]} == {"p q"}
    assert body["usage"]["completion_tokens"] == 6
    chunks = chunks_of(post(echo, {"prompt": "p q", "n": 2, "stream": True}))
    for index in (0, 1):
        parts = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(p["text"] for p in parts) == "p q"
        assert parts[-1]["finish_reason"] == "stop"


def test_echo_prepends_the_prompt(echo: Any) -> None:
    """`echo: true` puts the prompt before the completion, whole and streamed (vLLM's way)."""
    body = post(echo, {"prompt": "hello there", "echo": True, "max_tokens": 1}).json()
    assert body["choices"][0]["text"] == "hello therehello"
    assert body["usage"]["completion_tokens"] == 1
    chunks = chunks_of(post(echo, {"prompt": "hello there", "echo": True, "stream": True}))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "hello there" + "hello there"
    assert chunks[0]["choices"][0]["text"] == "hello therehello"


def test_stop_string_is_trimmed(echo: Any) -> None:
    """A stop string ends the text before it, finish `stop`, whole and streamed."""
    body = post(echo, {"prompt": "one two three four", "stop": [" three"]}).json()
    assert body["choices"][0]["text"] == "one two"
    assert body["choices"][0]["finish_reason"] == "stop"
    chunks = chunks_of(
        post(echo, {"prompt": "one two three four", "stop": "three", "stream": True})
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == "one two "


def test_sampling_fields_chat_takes_are_taken(echo: Any) -> None:
    """Chat's sampling fields are taken here too (echo accepts them and stays deterministic)."""
    body = post(
        echo,
        {"prompt": "a", "temperature": 0.5, "top_p": 0.9, "seed": 7, "ignore_eos": True,
         "max_tokens": 3},
    ).json()  # fmt: skip
    assert body["choices"][0]["text"] == "aaa"
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 1}, "logprobs"),  # echo gives no logprobs
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"top_k": 5}, "top_k"),  # not in echo's sampling set
        ({"n": 99}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"echo": True, "prompt": [1, 2]}, "echo"),  # echo has no tokenizer to decode ids
        ({"prompt_logprobs": 1}, "prompt_logprobs"),  # echo computes no prompt logprobs
        ({"prompt_logprobs": 0}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"return_token_ids": True}, "return_token_ids"),  # echo has no token ids
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),  # a batch of prompts
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": {"x": 1}}, "prompt"),
        ({"temperature": 3}, "temperature"),
        ({"promt": "typo"}, "promt"),
    ],
)
def test_refusals_name_the_field(echo: Any, extra: dict[str, Any], param: str) -> None:
    """What the backend cannot honour, or a malformed field, is a 400 naming it."""
    body = {"prompt": "a b", **extra}
    error = refused(post(echo, body), param)
    if param == "promt":
        assert "prompt" in error["message"]  # the nearest field is suggested


def test_best_of_equal_to_n_is_accepted(echo: Any) -> None:
    """`best_of` equal to `n` asks for nothing more: accepted (as vLLM does)."""
    body = post(echo, {"prompt": "z", "best_of": 2, "n": 2}).json()
    assert len(body["choices"]) == 2


def test_suffix_empty_is_no_suffix(echo: Any) -> None:
    """An empty suffix asks for nothing: accepted."""
    assert post(echo, {"prompt": "z", "suffix": ""}).status_code == 200


def test_unknown_model_is_404(echo: Any) -> None:
    """A model the server does not serve is 404 `model_not_found`."""
    error = refused(post(echo, {"prompt": "x", "model": "gpt-nope"}), "model", 404)
    assert error["code"] == "model_not_found"


def test_no_model_is_503_and_bad_key_401(client: Any) -> None:
    """Before a load: 503 with Retry-After; a wrong key is 401 before anything else."""
    r = post(client, {"prompt": "x"})
    assert r.status_code == 503
    assert r.headers["retry-after"]
    bad = post(client, {"prompt": "x"}, headers={"Authorization": "Bearer nope-0000"})
    assert bad.status_code == 401


def test_malformed_json_is_400(echo: Any) -> None:
    """A body that is not JSON is a 400 envelope, never a 500."""
    r = echo.post(
        "/v1/completions", content=b"{", headers={**API, "content-type": "application/json"}
    )
    refused(r, None)


def test_requests_are_recorded_in_telemetry(echo: Any) -> None:
    """Completions land in the telemetry records like chat requests."""
    post(echo, {"prompt": "count me"})
    records = echo.get("/v1/telemetry", headers=API).json()["records"]
    assert any(r["completion_tokens"] == 2 and r["status"] == "ok" for r in records)


def test_model_retrieve(echo: Any) -> None:
    """GET /v1/models/{id}: the card /v1/models lists; another id is 404 `model_not_found`."""
    listed = echo.get("/v1/models", headers=API).json()["data"][0]
    r = echo.get("/v1/models/echo", headers=API)
    assert r.status_code == 200
    assert r.json() == listed
    error = refused(echo.get("/v1/models/other-model", headers=API), "model", 404)
    assert error["code"] == "model_not_found"
    assert echo.get("/v1/models/echo").status_code == 401


def test_model_retrieve_with_nothing_loaded_is_404(client: Any) -> None:
    """With no model loaded no id exists."""
    refused(client.get("/v1/models/echo", headers=API), "model", 404)


def test_tokenize_and_detokenize_refused_on_echo(echo: Any) -> None:
    """Echo has no tokenizer: both routes are a 400 naming the route."""
    r = echo.post("/tokenize", json={"model": "echo", "prompt": "hi"}, headers=API)
    assert "/tokenize" in refused(r, None)["message"]
    r = echo.post("/detokenize", json={"model": "echo", "tokens": [1, 2]}, headers=API)
    assert refused(r, None)["code"] == "unsupported_route"


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": list(range(300_000))}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
        ("/tokenize", {}, "prompt"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "a"}], "continue_final_message": True},
            "continue_final_message",
        ),
        ("/tokenize", {"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
        ("/tokenize", {"prompt": "a", "extra": 1}, "extra"),
    ],
)
def test_tokenize_inputs_are_bounded_and_checked(
    echo: Any, route: str, body: dict[str, Any], param: str
) -> None:
    """Malformed or oversized tokenize/detokenize input is a 400 naming the field."""
    error = refused(echo.post(route, json=body, headers=API), param)
    assert error["type"] == "invalid_request_error"


def test_tokenize_needs_the_key(echo: Any) -> None:
    """The tokenize routes are data plane: no key, 401."""
    assert echo.post("/tokenize", json={"prompt": "a"}).status_code == 401


def test_version(client: Any) -> None:
    """GET /version answers the package version without a key."""
    r = client.get("/version")
    assert r.status_code == 200
    assert r.json() == {"version": package_version()}


# --- the official openai client against a live server -----------------------------------------


@pytest.fixture
def oai(live: LiveServer) -> Iterator[openai.OpenAI]:
    """A client with the data-plane key, no retries."""
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_openai_client_completions_create(oai: openai.OpenAI) -> None:
    """completions.create returns a parsed Completion: text, finish reason, usage."""
    r = oai.completions.create(model="echo", prompt="alpha beta gamma", max_tokens=2)
    assert r.object == "text_completion"
    assert r.choices[0].text == "alpha beta"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + 2
    ids = oai.completions.create(model="echo", prompt=[3, 4], echo=False)
    assert ids.choices[0].text == " 3 4"


def test_openai_client_completions_stream(oai: openai.OpenAI) -> None:
    """completions.create(stream=True) parses every chunk; usage rides on the last one."""
    chunks = list(
        oai.completions.create(
            model="echo",
            prompt="alpha beta gamma",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "alpha beta gamma"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"


def test_openai_client_refusals(oai: openai.OpenAI) -> None:
    """`suffix` and `best_of` raise BadRequestError naming the field."""
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="echo", prompt="x", suffix="y")
    assert info.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="echo", prompt="x", best_of=3)
    assert info.value.param == "best_of"


def test_openai_client_models_retrieve(oai: openai.OpenAI) -> None:
    """models.retrieve returns the served model; an unknown id raises NotFoundError."""
    model = oai.models.retrieve("echo")
    assert model.id == "echo"
    assert model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("nope")
    assert info.value.code == "model_not_found"


def test_admin_key_also_serves_completions(echo: Any) -> None:
    """The admin key is accepted on the data plane, as on chat."""
    assert post(echo, {"prompt": "k"}, headers=ADMIN).status_code == 200
