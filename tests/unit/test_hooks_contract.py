"""The hook contract: order, refusals, failure isolation, budgets, amendments, start-up checks."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
from litestar.testing import TestClient

from fakes.hooks import SECRET_TEXT, RecordHook
from helpers import (
    ADMIN,
    API,
    TEST_REGISTRY,
    chat_body,
    load,
    make_registry,
    make_settings,
)
from hooks.chain import HookSet
from registry.config import RegistryError
from registry.registry import AdapterRegistry
from schemas.generation import TokenDelta
from service.app import create_app
from service.serving import with_text

ECHO = """
adapters:
  echo:
    module: adapters.echo:EchoAdapter
    defaults: {token_delay_ms: 0}
"""


def registry_with(hooks_yaml: str) -> str:
    """The test registry plus a global `hooks:` list."""
    return TEST_REGISTRY + "hooks:\n" + hooks_yaml


def hooked_client(app_factory: Any, text: str) -> TestClient[Any]:
    """A client over an app with `text` as adapters.yaml and the echo preset loaded."""
    client = TestClient(app_factory(registry_text=text))
    client.__enter__()
    load(client, preset="echo")
    return client


def chat(client: TestClient[Any], text: str, **extra: Any) -> Any:
    """POST a chat request with the API key."""
    return client.post("/v1/chat/completions", json=chat_body(text, **extra), headers=API)


def metric(client: TestClient[Any], name: str, hook: str) -> float:
    """The value of `name{hook="..."}` on /metrics (0 when absent)."""
    for line in client.get("/metrics", headers=API).text.splitlines():
        if line.startswith(f'{name}{{hook="{hook}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate: Any, timeout_s: float = 3.0) -> bool:
    """Poll `predicate` until true or the time is up (background work)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_order_is_global_then_backend_then_preset(app_factory: Any) -> None:
    """Hooks run global first, then the backend's, then the preset's, whatever the file order."""
    text = """
models:
  echo:
    backend: echo
    model: echo
    hooks:
      - {module: "fakes.hooks:AppendHook", name: p1, params: {suffix: " P1"}}
      - {module: "fakes.hooks:AppendHook", name: p2, params: {suffix: " P2"}}
  other:
    backend: echo
    model: echo
adapters:
  echo:
    module: adapters.echo:EchoAdapter
    hooks:
      - {module: "fakes.hooks:AppendHook", name: b, params: {suffix: " B"}}
hooks:
  - {module: "fakes.hooks:AppendHook", name: g, params: {suffix: " G"}}
"""
    client = hooked_client(app_factory, text)
    try:
        r = chat(client, "hi")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "hi G B P1 P2"
        load(client, preset="other", replace=True)
        r = client.post(
            "/v1/chat/completions", json={**chat_body("hi"), "model": "other"}, headers=API
        )
        assert r.json()["choices"][0]["message"]["content"] == "hi G B"
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (403, "permission_error"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_refusal_is_the_hooks_openai_error(
    app_factory: Any, status: int, error_type: str, stream: bool
) -> None:
    """A hook refuses with the status and code it chose, in the OpenAI envelope, before a slot."""
    hooks = (
        f'  - {{module: "fakes.hooks:RefuseHook", name: policy, params: {{status: {status}}}}}\n'
    )
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        r = chat(client, "please refuse-me", stream=stream)
        assert r.status_code == status
        assert r.json() == {
            "error": {
                "message": "refused by policy (policy)",
                "type": error_type,
                "param": None,
                "code": "policy",
            }
        }
        assert client.get("/v1/model/status", headers=ADMIN).json()["in_flight"] == 0
        assert chat(client, "fine").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_refusal_with_another_status_is_a_hook_failure(app_factory: Any) -> None:
    """Only 400/403/422/429 are refusals: a hook raising a 500-class error is a hook failure."""
    hooks = '  - {module: "fakes.hooks:RefuseHook", name: policy, params: {status: 500}}\n'
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        r = chat(client, "refuse-me")
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "hook_failed"
    finally:
        client.__exit__(None, None, None)


def test_raising_hook_fails_that_request_only(
    app_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising hook: 500 hook_failed naming it (not its text), logged, counted; next one is ok."""
    hooks = '  - {module: "fakes.hooks:FailHook", name: flaky}\n'
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        with caplog.at_level(logging.ERROR):
            r = chat(client, "please fail-me")
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["code"] == "hook_failed"
        assert error["type"] == "server_error"
        assert "flaky" in error["message"]
        assert SECRET_TEXT not in r.text
        assert any("hook flaky failed in before_request" in m for m in caplog.messages)
        assert metric(client, "iw_hook_errors_total", "flaky") == 1.0
        ok = chat(client, "all good")
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["message"]["content"] == "all good"
    finally:
        client.__exit__(None, None, None)


def test_on_chunk_failure_is_a_hook_failed_500(app_factory: Any) -> None:
    """A raising on_chunk hook fails the request with 500 hook_failed, streamed or whole.

    The hook raises on the first chunk, before the stream's first frame: so the stream's 200 was
    not sent yet and the answer is the plain JSON error (service.datapath.stream_response); a
    failure after the stream started is an error event (tests/api/test_chat.py).
    """
    hooks = '  - {module: "fakes.hooks:FailHook", name: chunky, params: {point: on_chunk}}\n'
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        r = chat(client, "one fail-me three", stream=True)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "hook_failed"
        assert SECRET_TEXT not in r.text
        whole = chat(client, "one fail-me three")
        assert whole.status_code == 500
        assert whole.json()["error"]["code"] == "hook_failed"
        assert chat(client, "one two", stream=True).text.endswith("data: [DONE]\n\n")
        assert metric(client, "iw_hook_errors_total", "chunky") == 2.0
        assert client.get("/v1/model/status", headers=ADMIN).json()["in_flight"] == 0
    finally:
        client.__exit__(None, None, None)


def test_after_response_failure_never_reaches_the_client(app_factory: Any) -> None:
    """after_response runs after the response; its failure is only logged and counted."""
    hooks = '  - {module: "fakes.hooks:FailHook", name: late, params: {point: after_response}}\n'
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        r = chat(client, "fail-me later")
        assert r.status_code == 200
        assert wait_for(lambda: metric(client, "iw_hook_errors_total", "late") == 1.0)
    finally:
        client.__exit__(None, None, None)


def test_after_response_sees_the_exchange_as_sent(app_factory: Any) -> None:
    """after_response gets the amended request, the text sent, usage, metrics and status."""
    hooks = (
        '  - {module: "fakes.hooks:AppendHook", name: add, params: {suffix: " more"}}\n'
        '  - {module: "fakes.hooks:RecordHook", name: record}\n'
    )
    RecordHook.seen.clear()
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        for stream in (False, True):
            r = chat(client, "some words", stream=stream)
            assert r.status_code == 200
        assert wait_for(lambda: len(RecordHook.seen) == 2)
        whole, streamed = RecordHook.seen
        for ex in (whole, streamed):
            assert ex.request.messages[-1].content == "some words more"
            assert ex.completions == ("some words more",)
            assert ex.status == "ok"
            assert ex.usage["completion_tokens"] == 3
            assert ex.metrics["e2e_ms"] is not None
            assert ex.metrics["hooks_ms"] is not None
        assert (whole.stream, streamed.stream) == (False, True)
    finally:
        client.__exit__(None, None, None)


def test_budget_overrun_is_reported_not_stopped(
    app_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook slower than budget_ms: the request succeeds, a warning and a counter report it."""
    hooks = (
        '  - {module: "fakes.hooks:SlowHook", name: slow, budget_ms: 5, params: {sleep_ms: 30}}\n'
    )
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        with caplog.at_level(logging.WARNING):
            r = chat(client, "slowly")
        assert r.status_code == 200
        assert r.json()["metrics"]["hooks_ms"] >= 30
        assert any("hook slow took" in m and "budget 5.00 ms" in m for m in caplog.messages)
        assert metric(client, "iw_hook_budget_exceeded_total", "slow") == 1.0
    finally:
        client.__exit__(None, None, None)


def test_chunk_budget_is_reported_once_per_request(app_factory: Any) -> None:
    """An on_chunk hook over chunk_budget_ms is counted once per request, not once per token."""
    hooks = (
        '  - {module: "fakes.hooks:SlowHook", name: burn, chunk_budget_ms: 0.1,'
        " params: {sleep_ms: 0, busy_chunk_ms: 1}}\n"
    )
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        assert chat(client, "a b c d e", stream=True).status_code == 200
        assert metric(client, "iw_hook_budget_exceeded_total", "burn") == 1.0
    finally:
        client.__exit__(None, None, None)


def test_hook_past_its_timeout_fails_the_request(app_factory: Any) -> None:
    """A before_request hook running past timeout_ms is cancelled: 500 hook_failed."""
    hooks = (
        '  - {module: "fakes.hooks:SlowHook", name: stuck, timeout_ms: 50,'
        " params: {sleep_ms: 5000}}\n"
    )
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        started = time.monotonic()
        r = chat(client, "wait")
        assert time.monotonic() - started < 2
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "hook_failed"
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize("what", ["max_tokens", "model", "type"])
def test_amendment_beyond_the_limits_is_a_hook_failure(app_factory: Any, what: str) -> None:
    """A hook cannot lift the service's limits, reroute the model or return a non-request."""
    hooks = f'  - {{module: "fakes.hooks:BadAmendHook", name: bad, params: {{what: {what}}}}}\n'
    client = hooked_client(app_factory, registry_with(hooks))
    try:
        r = chat(client, "hello")
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "hook_failed"
    finally:
        client.__exit__(None, None, None)


def test_no_hooks_means_no_chain(tmp_path: Path) -> None:
    """With no hooks for a (backend, preset) the chain is None: the per-token path is untouched."""
    text = ECHO + "models:\n  x:\n    backend: echo\n    model: echo\n    hooks:\n"
    text += '      - {module: system_prompt, params: {text: "be brief"}}\n'
    registry = make_registry(tmp_path, text)
    hooks = HookSet(registry.hook_specs)
    assert hooks.chain_for("echo", None) is None
    chain = hooks.chain_for("echo", "x")
    assert chain is not None
    assert (len(chain.before), chain.chunk, chain.after) == (1, (), ())
    assert not HookSet(())


@pytest.mark.parametrize(
    ("hooks_yaml", "where", "line", "says"),
    [
        (
            "  - module: regex_redact\n    params:\n      patterns: ['[a-z]+@x']\n",
            "hooks[0].params.patterns",
            9,
            "unbounded",
        ),
        (
            "  - module: regex_redact\n    params: {patterns: ['^a']}\n",
            "hooks[0].params.patterns",
            8,
            "anchors",
        ),
        (
            (
                "  - {module: system_prompt, params: {text: hi}}\n"
                "  - module: max_prompt_tokens\n    params: {max_tokens: 10, colour: red}\n"
            ),
            "hooks[1].params.colour",
            9,
            "unknown field",
        ),
        (
            "  - {module: system_prompt, params: {}}\n",
            "hooks[0].params.text",
            7,
            "required",
        ),
        ("  - {module: no_such_hook}\n", "hooks[0].module", 7, "unknown hook 'no_such_hook'"),
        ("  - {module: 'fakes.hooks:NotAHook'}\n", "hooks[0].module", 7, "not a hook class"),
        ("  - {module: 'fakes.nowhere:Hook'}\n", "hooks[0].module", 7, "cannot import"),
        (
            "  - {module: header_tags, params: {headers: {authorization: {}}}}\n",
            "hooks[0].params.headers",
            7,
            "credentials",
        ),
        (
            (
                "  - {module: system_prompt, params: {text: a}}\n"
                "  - {module: system_prompt, params: {text: b}}\n"
            ),
            "hooks[1].name",
            8,
            "two hooks named",
        ),
    ],
)
def test_startup_refuses_bad_hooks_naming_key_and_line(
    tmp_path: Path, hooks_yaml: str, where: str, line: int, says: str
) -> None:
    """A bad hook stops start-up with the key path and the line in adapters.yaml."""
    text = ECHO + "hooks:\n" + hooks_yaml
    with pytest.raises(RegistryError) as info:
        make_registry(tmp_path, text)
    message = str(info.value)
    assert f"@ {where} (line {line})" in message, message
    assert says in message


def test_bad_budget_is_refused_with_its_line(tmp_path: Path) -> None:
    """budget_ms out of range is refused by the file's own schema, with its line."""
    text = ECHO + "hooks:\n  - {module: system_prompt, budget_ms: -1, params: {text: a}}\n"
    with pytest.raises(RegistryError, match=r"budget_ms.*line 7"):
        make_registry(tmp_path, text)


def test_third_party_hook_through_the_entry_point_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, app_factory: Any
) -> None:
    """An installed package's hook, found by short name in `inference_wrapper.hooks`, runs."""
    site = tmp_path / "site"
    pkg = site / "shout_hook"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from hooks import Hook\n\n\n"
        "class ShoutHook(Hook):\n"
        '    """Upper-cases completions."""\n\n'
        "    def on_chunk(self, call, index, kind, text):\n"
        "        return text.upper()\n"
    )
    dist = site / "shout_hook-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-hook\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[inference_wrapper.hooks]\nshout = shout_hook:ShoutHook\n"
        # a package cannot take over a built-in's name
        "system_prompt = shout_hook:ShoutHook\n"
    )
    monkeypatch.syspath_prepend(str(site))
    text = (
        TEST_REGISTRY
        + "hooks:\n  - {module: shout}\n  - {module: system_prompt, params: {text: x}}\n"
    )
    path = tmp_path / "adapters.yaml"
    path.write_text(text)
    registry = AdapterRegistry.from_file(path, use_entry_points=True)
    specs = {s.name: s for s in registry.hook_specs}
    assert (specs["shout"].source, specs["shout"].cls.__name__) == ("entry-point", "ShoutHook")
    assert specs["system_prompt"].source == "built-in"
    with pytest.raises(RegistryError, match="unknown hook 'shout'"):
        make_registry(tmp_path, text)  # entry points off: the short name is unknown
    with TestClient(create_app(make_settings(), registry=registry)) as client:
        load(client, preset="echo")
        r = chat(client, "quiet words", stream=True)
        assert '"content":" WORDS"' in r.text


def test_with_text_keeps_every_other_field_of_a_delta() -> None:
    """The token-path copy of a delta changes text and reasoning only, for every field there is."""
    values: dict[str, Any] = {}
    for i, name in enumerate(attrs.fields_dict(TokenDelta)):
        values[name] = {"text": "t", "reasoning": "r", "logprobs": ()}.get(name, i + 0.5)
    values["finish_reason"] = "stop"
    delta = TokenDelta(**values)
    copy = with_text(delta, "new", "why")
    assert (copy.text, copy.reasoning) == ("new", "why")
    assert {**attrs.asdict(copy), "text": "t", "reasoning": "r"} == attrs.asdict(delta)
