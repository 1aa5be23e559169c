"""The wrapper's answers where bench/parity_vllm.py found them unlike vLLM's, on the echo backend.

Each test pins one difference that was the wrapper's fault (bench/results/parity_vllm.md):
`stop_reason` on chat choices, whole and streamed; a streamed request the engine refuses before
its first token answered as a plain JSON error (vLLM checks before it streams), not 200 + an
error event.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from adapters.echo import EchoAdapter
from helpers import API, TEST_REGISTRY, chat_body, load, make_registry, make_settings, sse_events
from service.app import create_app

#: echo's context here: a max_tokens above it passes the request checks and is refused by the
#: engine (adapters.kit.context), as vLLM refuses it
CONTEXT = 64


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    """One test client with the echo preset loaded, shared by the module (no test changes it)."""
    registry = make_registry(tmp_path_factory.mktemp("parity"), TEST_REGISTRY)
    with TestClient(create_app(make_settings(), registry=registry)) as c:
        load(c, preset="echo", engine_params={"max_context": CONTEXT})
        yield c


def chat(client: Any, body: dict[str, Any]) -> Any:
    """POST a chat request."""
    return client.post("/v1/chat/completions", json=body, headers=API)


def chunks(r: Any) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE answer, checked to end with `[DONE]`."""
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_choice_has_stop_reason_null_without_a_stop(echo: Any) -> None:
    """A whole answer that ended at its natural end: `stop_reason` sent, null (as vLLM)."""
    choice = chat(echo, chat_body("one two three")).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "stop_reason" in choice
    assert choice["stop_reason"] is None


def test_chat_choice_names_the_stop_string_that_ended_it(echo: Any) -> None:
    """Ended by a stop string: `stop_reason` is that string, and the text stops before it."""
    choice = chat(echo, chat_body("one two three four", stop=["zzz", "three"])).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "three")
    assert choice["message"]["content"] == "one two "


def test_streamed_finish_chunk_carries_stop_reason(echo: Any) -> None:
    """Streamed: only the finish chunk carries `stop_reason` (vLLM sends it on that one)."""
    stopped = chunks(chat(echo, chat_body("one two three", stop=["two"], stream=True)))
    finish = stopped[-1]["choices"][0]
    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", "two")
    assert all("stop_reason" not in c["choices"][0] for c in stopped[:-1])
    plain = chunks(chat(echo, chat_body("one two", max_tokens=1, stream=True)))
    last = plain[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("length", None)
    assert "stop_reason" in last


def test_completions_report_the_echo_stop_string_too(echo: Any) -> None:
    """The completions route already sent `stop_reason`; echo now fills it like vLLM."""
    r = echo.post(
        "/v1/completions",
        json={"model": "echo", "prompt": "a b c d", "stop": ["c"]},
        headers=API,
    )
    assert r.json()["choices"][0]["stop_reason"] == "c"


def test_streamed_refusal_before_the_first_token_is_a_plain_400(echo: Any) -> None:
    """max_tokens above the context, streamed: a JSON 400 as vLLM answers, not 200 + error event."""
    r = chat(echo, chat_body("one two", max_tokens=100, stream=True))
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], "100" in error["message"]) == ("max_tokens", True)
    # the completions route is served the same way
    r = echo.post(
        "/v1/completions",
        json={"model": "echo", "prompt": "a b", "max_tokens": 100, "stream": True},
        headers=API,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens"


def test_streamed_answers_still_stream_after_the_change(echo: Any) -> None:
    """The first frame follows the 200 (role and first token), the finish and [DONE] after it."""
    events = chunks(chat(echo, chat_body("one two three", stream=True)))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "one"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "one two three"


def test_streamed_echo_extension_still_leads(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VLLM's `echo`, now sent at the first engine output: still first, alone, then the tokens."""
    # echo does not declare the extension; the serving implements it, so declare it here
    monkeypatch.setattr(EchoAdapter, "declared_features", EchoAdapter.declared_features | {"echo"})
    registry = make_registry(tmp_path, TEST_REGISTRY)
    with TestClient(create_app(make_settings(), registry=registry)) as c:
        load(c, preset="echo", engine_params={"max_context": CONTEXT})
        body = chat_body("one two", stream=True, echo=True)
        body["messages"].append({"role": "assistant", "content": "Sure:"})
        events = chunks(chat(c, body))
        deltas = [e["choices"][0]["delta"] for e in events]
        assert deltas[0] == {"role": "assistant", "content": "Sure:"}
        assert deltas[1] == {"content": "one"}
        # refused before its first token, the echo is not sent either: a plain 400
        body["max_tokens"] = 100
        assert chat(c, body).status_code == 400


def test_model_card_has_vllms_parent_and_permission(echo: Any) -> None:
    """`/v1/models` and its retrieve: vLLM's `root`, `parent` null and one ModelPermission."""
    listed = echo.get("/v1/models", headers=API).json()["data"]
    one = echo.get("/v1/models/echo", headers=API).json()
    for card in (listed[0], one):
        assert card["root"] == "echo"
        assert "parent" in card
        assert card["parent"] is None
        (perm,) = card["permission"]
        assert perm == listed[0]["permission"][0]  # fixed per load: list and retrieve agree
        assert perm["id"].startswith("modelperm-")
        assert perm["object"] == "model_permission"
        assert isinstance(perm["created"], int)
        assert (perm["allow_sampling"], perm["allow_fine_tuning"], perm["organization"]) == (
            True,
            False,
            "*",
        )
        assert set(perm) == {
            "id", "object", "created", "allow_create_engine", "allow_sampling", "allow_logprobs",
            "allow_search_indices", "allow_view", "allow_fine_tuning", "organization", "group",
            "is_blocking",
        }  # fmt: skip
        assert perm["group"] is None
        assert card["owned_by"] == "inference-wrapper"
