"""Request-only rules answer before any model is consulted: a 400 naming the field, never a wait."""

from __future__ import annotations

from typing import Any

from helpers import API, chat_body, load


def test_chat_rule_is_400_with_nothing_loaded(client: Any) -> None:
    """With no model, a request no backend could serve gets its 400, not a 503 to retry."""
    body = chat_body(stream_options={"include_usage": True})
    r = client.post("/v1/chat/completions", json=body, headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stream_options"


def test_completion_rule_is_400_with_nothing_loaded(client: Any) -> None:
    """The completions route checks its request-only rules before the model as well."""
    body = {"model": "echo", "prompt": "a", "best_of": 3}
    r = client.post("/v1/completions", json=body, headers=API)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "best_of"


def test_request_rule_is_named_before_the_model(client: Any) -> None:
    """A request broken on its own is refused for that, whatever model name it asks for."""
    load(client, preset="echo")
    r = client.post("/v1/chat/completions", json=chat_body(model="gpt-4", store=True), headers=API)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "store")
    r = client.post("/v1/chat/completions", json=chat_body(model="gpt-4"), headers=API)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found")
