"""Each built-in hook on the echo backend through the HTTP API, streamed and whole."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the dev dependencies
import pytest
from litestar.testing import TestClient

from fakes.hooks import HeaderSpyHook
from helpers import ADMIN, ADMIN_KEY, API, API_KEY, TEST_REGISTRY, load, sse_events


def client_with(app_factory: Any, hooks_yaml: str) -> Iterator[TestClient[Any]]:
    """A client over the test registry with a global `hooks:` list, echo loaded."""
    with TestClient(app_factory(registry_text=TEST_REGISTRY + "hooks:\n" + hooks_yaml)) as c:
        load(c, preset="echo")
        yield c


def post(client: TestClient[Any], messages: Any, stream: bool = False, **kw: Any) -> Any:
    """A chat request with the API key (extra headers in `headers`)."""
    headers = {**API, **kw.pop("headers", {})}
    body = {"model": "echo", "messages": messages, "stream": stream, **kw}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def content(r: Any, stream: bool) -> str:
    """The assistant text of a response, joined from the chunks when streamed."""
    assert r.status_code == 200, r.text
    if not stream:
        return str(r.json()["choices"][0]["message"]["content"])
    return "".join(
        choice["delta"].get("content") or ""
        for event in sse_events(r.text)[:-1]
        for choice in json.loads(event).get("choices", [])
    )


def user(text: str) -> list[dict[str, str]]:
    """One user message."""
    return [{"role": "user", "content": text}]


def read_lines(path: Path, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Wait (bounded) for the log writer thread to have written `count` lines."""
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.02)
    return [json.loads(line) for line in lines]


@pytest.fixture
def prompt_limit(app_factory: Any) -> Iterator[TestClient[Any]]:
    """max_prompt_tokens at 12 tokens (echo has no tokenizer: the approximation counts)."""
    yield from client_with(
        app_factory, "  - {module: max_prompt_tokens, params: {max_tokens: 12}}\n"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_max_prompt_tokens_refuses_long_prompts(
    prompt_limit: TestClient[Any], stream: bool
) -> None:
    """Over the policy limit: 400 prompt_too_long on `messages`; under it the request runs."""
    assert content(post(prompt_limit, user("short one"), stream), stream) == "short one"
    r = post(prompt_limit, user("x" * 40), stream)  # ceil(40/4) + 4 = 14 > 12
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "prompt_too_long",
        "messages",
        "invalid_request_error",
    )
    assert "14 tokens (approximation)" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["prepend", "enforce"])
def test_system_prompt_reaches_the_engine(
    app_factory: Any, tmp_path: Path, stream: bool, mode: str
) -> None:
    """system_prompt puts the operator's message first; enforce drops the client's own."""
    log = tmp_path / "exchanges.jsonl"
    hooks = (
        f'  - {{module: system_prompt, params: {{text: "Answer briefly.", mode: {mode}}}}}\n'
        f"  - {{module: jsonl_log, params: {{path: '{log}'}}}}\n"
    )
    msgs = [{"role": "system", "content": "client rules"}, {"role": "user", "content": "hi"}]
    for client in client_with(app_factory, hooks):
        assert content(post(client, msgs, stream), stream) == "hi"
        (line,) = read_lines(log, 1)
    expected = [{"role": "system", "content": "Answer briefly.", "name": None}]
    if mode == "prepend":
        expected.append({"role": "system", "content": "client rules", "name": None})
    expected.append({"role": "user", "content": "hi", "name": None})
    assert line["messages"] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_regex_redact_completion_across_chunks(app_factory: Any, stream: bool) -> None:
    """A phone number split over two tokens is redacted; no chunk carries any part of it."""
    hooks = (
        "  - module: regex_redact\n"
        "    params: {patterns: ['\\d{3} \\d{4}'], apply_to: [completion],"
        " replacement: '[PHONE]'}\n"
    )
    for client in client_with(app_factory, hooks):
        r = post(client, user("call 555 1234 today"), stream)
        assert content(r, stream) == "call [PHONE] today"
        if stream:
            deltas = [
                c["delta"].get("content") or ""
                for e in sse_events(r.text)[:-1]
                for c in json.loads(e)["choices"]
            ]
            assert len(deltas) > 2
            assert not any("555" in d or "1234" in d for d in deltas)


@pytest.mark.parametrize("stream", [False, True])
def test_regex_redact_prompt_before_the_engine(app_factory: Any, stream: bool) -> None:
    """apply_to: [prompt] redacts the messages, so the engine (echo) never sees the address."""
    hooks = (
        "  - module: regex_redact\n"
        "    params:\n"
        "      patterns: ['[a-z.]{1,64}@[a-z.]{1,64}\\.[a-z]{2,6}']\n"
        "      apply_to: [prompt]\n"
        "      ignore_case: true\n"
    )
    for client in client_with(app_factory, hooks):
        r = post(client, user("mail Jane.Doe@Example.com please"), stream)
        assert content(r, stream) == "mail [REDACTED] please"


@pytest.mark.parametrize("stream", [False, True])
def test_jsonl_log_writes_masked_exchanges(app_factory: Any, tmp_path: Path, stream: bool) -> None:
    """Each exchange is a JSON line with prompt, completion, usage, metrics; secrets masked."""
    log = tmp_path / "audit.jsonl"
    hooks = f"  - {{module: jsonl_log, params: {{path: '{log}'}}}}\n"
    for client in client_with(app_factory, hooks):
        r = post(client, user(f"my key is {ADMIN_KEY} ok"), stream)
        assert r.status_code == 200
        (line,) = read_lines(log, 1)
    raw = log.read_text()
    assert ADMIN_KEY not in raw
    assert line["messages"][0]["content"] == "my key is *** ok"
    assert line["completions"] == ["my key is *** ok"]
    assert line["usage"]["completion_tokens"] == 5
    assert line["metrics"]["e2e_ms"] is not None
    assert (line["status"], line["stream"], line["backend"]) == ("ok", stream, "echo")


def test_jsonl_log_rotates_by_size(app_factory: Any, tmp_path: Path) -> None:
    """Past max_bytes the file rolls over to .1, .2 (backups kept), every line whole."""
    log = tmp_path / "audit.jsonl"
    hooks = f"  - {{module: jsonl_log, params: {{path: '{log}', max_bytes: 4096, backups: 2}}}}\n"
    for client in client_with(app_factory, hooks):
        for i in range(12):
            assert post(client, user(f"n{i} " + "word " * 100)).status_code == 200
    # closing the app drained the writer: every line is on disk
    files = [log, log.with_name("audit.jsonl.1"), log.with_name("audit.jsonl.2")]
    assert all(f.exists() for f in files)
    assert not log.with_name("audit.jsonl.3").exists()
    for f in files:
        assert f.stat().st_size <= 4096
        for line in f.read_text().splitlines():
            json.loads(line)


def test_header_tags_bounded_labels(app_factory: Any) -> None:
    """Allowlisted header values become tags and labels; others, and the N+1th value, `other`."""
    hooks = (
        "  - module: header_tags\n"
        "    params:\n"
        "      headers:\n"
        "        x-tenant: {tag: tenant, allow: [acme, globex]}\n"
        "        x-app: {max_distinct: 2}\n"
    )
    for client in client_with(app_factory, hooks):
        sends = [
            {"x-tenant": "acme", "x-app": "one"},
            {"x-tenant": "evil-corp", "x-app": "two"},
            {"x-tenant": "globex", "x-app": "three"},
            {"x-app": "bad value!"},
        ]
        for headers in sends:
            assert post(client, user("hi"), stream=True, headers=headers).status_code == 200
        records = client.get("/v1/telemetry", headers=API).json()["records"]
        assert [r["tags"] for r in records[-4:]] == [
            {"tenant": "acme", "x_app": "one"},
            {"tenant": "other", "x_app": "two"},
            {"tenant": "globex", "x_app": "other"},
            {"x_app": "other"},
        ]
        metrics = client.get("/metrics", headers=API).text
        assert 'iw_request_tags_total{tag="tenant",value="acme"} 1.0' in metrics
        assert 'iw_request_tags_total{tag="tenant",value="other"} 1.0' in metrics
        assert 'iw_request_tags_total{tag="x_app",value="other"} 2.0' in metrics
        assert "evil-corp" not in metrics
        assert "three" not in metrics


def test_hooks_never_see_credentials(app_factory: Any) -> None:
    """Auth headers are removed before hooks run: a hook cannot tag or log a key."""
    HeaderSpyHook.seen.clear()
    for client in client_with(app_factory, "  - {module: 'fakes.hooks:HeaderSpyHook'}\n"):
        headers = {
            "x-api-key": API_KEY,
            "x-trace": "t1",
            "cookie": "session=abcdef",
            "x-forwarded-key": ADMIN_KEY,
        }
        r = post(client, user("hi"), headers=headers)
        assert r.status_code == 200
        assert "tags" not in r.json()["metrics"]
    (seen,) = HeaderSpyHook.seen
    assert seen["x-trace"] == "t1"
    assert not {"authorization", "x-api-key", "cookie"} & set(seen)
    assert seen["x-forwarded-key"] == "***"
    assert API_KEY not in json.dumps(seen)


def test_adapters_route_shows_hooks_and_their_schemas(app_factory: Any, tmp_path: Path) -> None:
    """GET /v1/adapters lists global, backend and preset hooks with params and params schema."""
    text = TEST_REGISTRY.replace(
        "    engine_params: {token_delay_ms: 20}\n",
        "    engine_params: {token_delay_ms: 20}\n"
        "    hooks:\n      - {module: system_prompt, params: {text: be kind}}\n",
    ).replace(
        "    defaults: {token_delay_ms: 0}\n",
        "    defaults: {token_delay_ms: 0}\n"
        "    hooks:\n      - {module: regex_redact, params: {patterns: ['\\d{4}']}}\n",
    )
    text += "hooks:\n  - {module: max_prompt_tokens, name: policy, params: {max_tokens: 500}}\n"
    with TestClient(app_factory(registry_text=text)) as client:
        body = client.get("/v1/adapters", headers=ADMIN).json()
    (top,) = body["hooks"]
    assert top["name"] == "policy"
    assert top["source"] == "built-in"
    assert top["points"] == ["before_request"]
    assert top["budget_ms"] == 50.0
    jsonschema.validate(top["params"], top["params_schema"])
    assert top["params_schema"]["required"] == ["max_tokens"]
    echo = next(a for a in body["data"] if a["name"] == "echo")
    (redact,) = echo["hooks"]
    assert redact["points"] == ["before_request", "on_chunk"]
    assert redact["params"]["patterns"] == ["\\d{4}"]
    assert "patterns" in redact["params_schema"]["properties"]
    jsonschema.validate(redact["params"], redact["params_schema"])
    (system,) = body["presets"]["slow-echo"]["hooks"]
    assert system["params"] == {"text": "be kind", "mode": "prepend"}
    assert body["presets"]["echo"]["hooks"] == []
    assert body["presets"]["slow-echo"]["hooks"][0]["scope"] == "models.slow-echo.hooks"


# --- the same hooks on raw prompts (/v1/completions) -------------------------------------------


def complete(client: TestClient[Any], prompt: Any, stream: bool = False) -> Any:
    """A completions request with the API key."""
    body = {"model": "echo", "prompt": prompt, "stream": stream}
    return client.post("/v1/completions", json=body, headers=API)


def completion_text(r: Any, stream: bool) -> str:
    """The completion text, joined from the chunks when streamed."""
    assert r.status_code == 200, r.text
    if not stream:
        return str(r.json()["choices"][0]["text"])
    return "".join(
        c["text"] for e in sse_events(r.text)[:-1] for c in json.loads(e).get("choices", [])
    )


@pytest.mark.parametrize("stream", [False, True])
def test_hooks_apply_to_completions(app_factory: Any, tmp_path: Path, stream: bool) -> None:
    """Raw prompts get the prompt hooks too: counted, redacted as text, logged; no bypass."""
    log = tmp_path / "exchanges.jsonl"
    hooks = (
        "  - {module: max_prompt_tokens, params: {max_tokens: 6}}\n"
        "  - module: regex_redact\n"
        "    params: {patterns: ['\\d{4}'], apply_to: [prompt, completion]}\n"
        f"  - {{module: jsonl_log, params: {{path: '{log}'}}}}\n"
    )
    for client in client_with(app_factory, hooks):
        assert completion_text(complete(client, "pin 1234", stream), stream) == "pin [REDACTED]"
        (line,) = read_lines(log, 1)
        assert line["prompt"] == "pin [REDACTED]"
        assert line["completions"] == ["pin [REDACTED]"]
        too_long = complete(client, list(range(7)), stream)
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "prompt"
        assert too_long.json()["error"]["code"] == "prompt_too_long"
        ids = complete(client, [1, 2], stream)  # ids cannot be redacted: refused, not let by
        assert ids.status_code == 400
        assert ids.json()["error"]["code"] == "redaction_requires_text"


def test_system_prompt_policy_refuses_raw_prompts(app_factory: Any) -> None:
    """An operator's system prompt cannot ride on a raw prompt: 400, never run without it."""
    hooks = "  - {module: system_prompt, params: {text: 'Be kind.'}}\n"
    for client in client_with(app_factory, hooks):
        r = complete(client, "hello")
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "system_prompt_required"
        assert content(post(client, user("hello")), stream=False) == "hello"
