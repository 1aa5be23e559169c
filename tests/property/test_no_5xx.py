"""No body, byte string or header combination makes the service fail with a 5xx.

Every route is driven through Litestar's test client with arbitrary JSON, request-shaped JSON with
fuzzed values and types, raw bytes, and arbitrary auth / content-type / x-request-id headers. The
only 5xx allowed are the documented ones: 503 while no model is ready, 503 when a load claims more
memory than is free, and 500 for an engine failure the request asked for (`fail_on_load`, the
`crashing` test backend). Every error is the OpenAI envelope and every response has x-request-id.

Each test function builds one app (through the `app_factory` fixture) and runs its hypothesis
examples against it inside the test, so examples share the app on purpose: whatever state earlier
examples left (a model loaded, a failed load, secrets registered) is part of what later examples
meet.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient

from helpers import ADMIN, ADMIN_KEY, API, API_KEY, chat_body, load, sse_events
from service.context import _SANE_ID

EXAMPLES = settings(max_examples=120, deadline=None)
MAX_BODY = 16 * 1024

# --- strategies ----------------------------------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=16,
)


def fuzz(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value or any JSON at all."""
    return plausible | JSON


_TEXT_PART = st.fixed_dictionaries(
    {"type": fuzz(st.sampled_from(["text", "image_url"]))},
    optional={"text": fuzz(st.text(max_size=10))},
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"])},
    optional={
        "content": st.none() | st.text(max_size=30) | st.lists(_TEXT_PART, max_size=3),
        "name": st.text(max_size=8),
    },
)
# values a client could mean, in and out of range; `fuzz` mixes in any JSON
_CHAT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(-2, 80),
    "max_completion_tokens": st.integers(-2, 80),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 6),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {},
        optional={
            "include_usage": st.booleans(),
            "continuous_usage_stats": st.booleans(),
            "include_obfuscation": st.booleans(),
        },
    ),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=18),
    "seed": st.integers(),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "user": st.text(max_size=8),
    "metadata": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
    "store": st.booleans(),
    "service_tier": st.sampled_from(["auto", "default", "flex"]),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "tools": st.lists(JSON, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto"]),
    "modalities": st.lists(st.sampled_from(["text", "audio"]), max_size=2),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(-0.5, 1.5),
    "repetition_penalty": st.floats(-1, 11),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(-1, 80),
    "stop_token_ids": st.lists(st.integers(0, 10), max_size=3),
    "unknown_field": JSON,
}
#: chat fields the completions request does not take (they are unknown parameters there)
_CHAT_ONLY = frozenset(
    {"max_completion_tokens", "top_logprobs", "metadata", "store", "service_tier",
     "response_format", "tools", "tool_choice", "modalities"}
)  # fmt: skip
WELL_FORMED_CHAT = st.fixed_dictionaries(
    {"model": st.just("echo"), "messages": st.lists(_MESSAGE, min_size=1, max_size=3)},
    optional=_CHAT_VALUES,
)
FUZZED_CHAT = st.fixed_dictionaries(
    {
        "model": fuzz(st.sampled_from(["echo", "other"])),
        "messages": fuzz(st.lists(fuzz(_MESSAGE), max_size=3)),
    },
    optional={k: fuzz(v) for k, v in _CHAT_VALUES.items()},
)

_PROMPT = (
    st.text(max_size=30)
    | st.lists(st.integers(-2, 60_000), max_size=6)
    | st.lists(st.text(max_size=8), max_size=2)
    | st.lists(st.lists(st.integers(0, 100), max_size=4), max_size=2)
)
_COMPLETION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **{k: v for k, v in _CHAT_VALUES.items() if k not in _CHAT_ONLY},
    "logprobs": st.integers(-1, 25),
    "echo": st.booleans(),
    "suffix": st.text(max_size=4),
    "best_of": st.integers(-1, 6),
}
WELL_FORMED_COMPLETION = st.fixed_dictionaries(
    {
        "model": st.just("echo"),
        "prompt": st.text(min_size=1, max_size=30)
        | st.lists(st.integers(0, 1000), min_size=1, max_size=6),
    },
    optional=_COMPLETION_VALUES,
)
FUZZED_COMPLETION = st.fixed_dictionaries(
    {"model": fuzz(st.sampled_from(["echo", "other"])), "prompt": fuzz(_PROMPT)},
    optional={k: fuzz(v) for k, v in _COMPLETION_VALUES.items()},
)
TOKENIZE = st.fixed_dictionaries(
    {},
    optional={
        "model": fuzz(st.sampled_from(["echo", "other"])),
        "prompt": fuzz(st.text(max_size=20)),
        "messages": fuzz(st.lists(fuzz(_MESSAGE), max_size=3)),
        "tokens": fuzz(st.lists(st.integers(-2, 60_000), max_size=6)),
        "add_special_tokens": fuzz(st.booleans()),
        "add_generation_prompt": fuzz(st.booleans()),
        "continue_final_message": fuzz(st.booleans()),
        "return_token_strs": fuzz(st.booleans()),
    },
)

# delays are never fuzzed with arbitrary numbers: a valid 10-minute load delay would stall the run
_DELAY: st.SearchStrategy[Any] = st.sampled_from([0, 1, 0.5, -1, 700_000, "1", None, [], True])
_ENGINE_PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "token_delay_ms": _DELAY,
        "first_token_delay_ms": _DELAY,
        "load_delay_ms": _DELAY,
        "fail_on_load": fuzz(st.text(max_size=10)),
        "fail_after_tokens": fuzz(st.integers(-1, 5)),
        "max_n": fuzz(st.integers(-1, 20)),
        "max_context": fuzz(st.integers(0, 100)),
        "claims_memory_mib": fuzz(st.sampled_from([0, 1, -1, 1e12])),
        "crash": fuzz(st.booleans()),
        "bogus": JSON,
    },
)
_ENV_KEYS = st.sampled_from(
    ["HF_TOKEN", "ECHO_FUZZ", "LD_PRELOAD", "path", "IW_API_KEY", "a-b", ""]
)
LOAD = st.fixed_dictionaries(
    {},
    optional={
        "backend": fuzz(st.sampled_from(["echo", "crashing", "nope", "Echo"])),
        "preset": fuzz(st.sampled_from(["echo", "slow-echo", "nope"])),
        "model": fuzz(st.sampled_from(["echo", "bundled:x", "bundled:", "/etc", "../x", "a/b"])),
        "engine_params": _ENGINE_PARAMS | JSON,
        "env": fuzz(st.dictionaries(_ENV_KEYS | st.text(max_size=5), st.text(max_size=12))),
        "served_model_name": fuzz(st.text(max_size=10) | st.text(min_size=257, max_size=260)),
        "replace": fuzz(st.booleans()),
        "drain_timeout_s": fuzz(st.sampled_from([0, 0.01, -1, 5000])),
        "unknown": JSON,
    },
)

_EDGE_BODIES = [
    b"",
    b" ",
    b"\n",
    b"null",
    b"[]",
    b"{}",
    b"{",
    b'{"model":',
    b"\xef\xbb\xbf{}",
    b'{"a":1}{"b":2}',
    b"[" * 64 + b"]" * 64,
    b'{"x":' * 64 + b"1" + b"}" * 64,
    b'"\\ud800"',
    b'{"model":"\xff\xfe"}',
    b"1e400",
    b"NaN",
    b'{"messages": Infinity}',
    b'{"model": "echo", "messages": [{"role": "user", "content": "\\u0000"}]}',
    b" " * (MAX_BODY + 1),
]


def encoded(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON values from `strategy`, as the bytes a client sends."""
    return strategy.map(msgspec.json.encode)


def bodies(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Request-shaped JSON, any JSON, raw bytes, and known awkward bodies."""
    return st.one_of(
        encoded(shaped),
        encoded(JSON),
        st.binary(max_size=64),
        st.sampled_from(_EDGE_BODIES),
    )


_LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
_GARBAGE = st.text(_LATIN1, max_size=40).map(lambda s: s.encode("latin-1"))


def _fixed(*values: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from([v.encode("latin-1") for v in values])


HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "x-api-key": _fixed(ADMIN_KEY, API_KEY, "", "wrong", ADMIN_KEY + " ") | _GARBAGE,
        "authorization": _fixed(
            f"Bearer {ADMIN_KEY}",
            f"Bearer {API_KEY}",
            f"bearer   {API_KEY}  ",
            "Bearer",
            "Bearer ",
            API_KEY,
            f"Basic {API_KEY}",
        )
        | _GARBAGE,
        "content-type": _fixed(
            "application/json",
            "text/plain",
            "application/json; charset=latin-1",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        )
        | _GARBAGE,
        "content-encoding": _fixed("gzip", "identity"),
        "x-request-id": st.from_regex(_SANE_ID, fullmatch=True).map(str.encode)
        | _GARBAGE
        | _fixed("x" * 129, "id with spaces", "ïd"),
        "accept": _fixed("text/event-stream", "application/json", "*/*") | _GARBAGE,
    },
)

# --- checks --------------------------------------------------------------------------------------

Allowed = Callable[[int, str | None], bool]


def nothing(status: int, code: str | None) -> bool:
    """No 5xx is acceptable."""
    return False


def no_model(status: int, code: str | None) -> bool:
    """The documented 503 while no model is ready."""
    return status == 503 and code == "model_not_ready"


def check_envelope(r: httpx.Response) -> dict[str, Any]:
    """The OpenAI error envelope, and nothing else, as JSON."""
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = msgspec.json.decode(r.content)
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) - {"details"} == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str), err
    assert err["message"]
    assert isinstance(err["type"], str), err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return err  # type: ignore[no-any-return]


def check(r: httpx.Response, headers: dict[str, bytes], allowed: Allowed) -> None:
    """x-request-id (kept when sane, fresh otherwise), the envelope, and only allowed 5xx."""
    rid = r.headers.get("x-request-id")
    assert rid, r.headers
    sent = headers.get("x-request-id")
    if sent is not None and _SANE_ID.fullmatch(sent.decode("latin-1")):
        assert rid == sent.decode()
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    if r.status_code >= 400:
        err = check_envelope(r)
        if r.status_code >= 500:
            assert allowed(r.status_code, err["code"]), (r.status_code, err)
        if r.status_code == 503:
            assert r.headers.get("retry-after"), r.headers


def check_chat_success(r: httpx.Response) -> None:
    """A 200 chat answer is a whole completion or a stream that ends well with [DONE]."""
    if r.status_code != 200:
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        assert "\r" not in r.text
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            chunk = msgspec.json.decode(event)
            assert "error" not in chunk, chunk
            assert chunk["object"] == "chat.completion.chunk"
    else:
        assert r.json()["object"] == "chat.completion"


@pytest.fixture
def one_app(app_factory: Any) -> Iterator[TestClient[Litestar]]:
    """A client over one app for the whole test function (see the module docstring)."""
    application = app_factory(max_tokens_cap=64, max_body_bytes=MAX_BODY)
    with TestClient(application) as client:
        # the unload report's settle poll waits for RSS to stop moving (>= 0.2 s a time); these
        # tests look at statuses, not memory figures, and unload often
        application.state.manager.memory.settle_timeout_s = 0.0
        yield client


def as_bytes(headers: dict[str, bytes]) -> dict[bytes, bytes]:
    """Header names as bytes too, so that httpx sends the values' bytes untouched."""
    return {k.encode(): v for k, v in headers.items()}


def post(client: TestClient[Litestar], path: str, body: bytes, headers: dict[str, bytes]) -> Any:
    """POST raw bytes with exactly these headers."""
    return client.post(path, content=body, headers=as_bytes(headers))


# --- tests ---------------------------------------------------------------------------------------


def test_chat_without_a_model_never_5xx(one_app: TestClient[Litestar]) -> None:
    """With no model loaded, chat answers 4xx or the documented 503, never another 5xx."""
    client = one_app

    @EXAMPLES
    @given(body=bodies(WELL_FORMED_CHAT | FUZZED_CHAT), headers=HEADERS)
    def run(body: bytes, headers: dict[str, bytes]) -> None:
        r = post(client, "/v1/chat/completions", body, headers)
        check(r, headers, no_model)
        assert r.status_code != 200

    run()


def test_chat_with_the_echo_model_never_5xx(one_app: TestClient[Litestar]) -> None:
    """With echo loaded, any chat body and headers give a 2xx/4xx and well-formed output."""
    client = one_app
    load(client, preset="echo")

    @EXAMPLES
    @given(body=bodies(WELL_FORMED_CHAT | FUZZED_CHAT), headers=HEADERS)
    def run(body: bytes, headers: dict[str, bytes]) -> None:
        r = post(client, "/v1/chat/completions", body, headers)
        check(r, headers, nothing)
        check_chat_success(r)

    run()
    # the model is still there and nothing is left in flight
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert (status["state"], status["in_flight"]) == ("ready", 0)


def test_well_formed_chat_reaches_the_model(one_app: TestClient[Litestar]) -> None:
    """Well-formed chat bodies with a valid key get a completion or a 400 naming the param."""
    client = one_app
    load(client, preset="echo")
    answered: list[int] = []

    @EXAMPLES
    @given(body=WELL_FORMED_CHAT)
    def run(body: dict[str, Any]) -> None:
        r = client.post("/v1/chat/completions", json=body, headers=API)
        check(r, {}, nothing)
        check_chat_success(r)
        answered.append(r.status_code)
        if r.status_code >= 400:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"], r.text  # a refusal names what to change

    run()
    assert answered.count(200) >= len(answered) // 10  # the bodies do reach the model


def _asked_for(body: bytes, *words: bytes) -> bool:
    return any(w in body for w in words)


def test_control_plane_never_5xx(one_app: TestClient[Litestar]) -> None:
    """Load, unload and validate answer 2xx/4xx, or the documented 500/503 the body asked for."""
    client = one_app

    @EXAMPLES
    @given(
        path=st.sampled_from(["/v1/model/load", "/v1/model/validate", "/v1/model/unload"]),
        body=bodies(LOAD),
        headers=HEADERS | st.just({"x-api-key": ADMIN_KEY.encode()}),
    )
    def run(path: str, body: bytes, headers: dict[str, bytes]) -> None:
        def allowed(status: int, code: str | None) -> bool:
            if path != "/v1/model/load":
                return False
            if (status, code) == (500, "engine_error"):
                return _asked_for(body, b"fail_on_load", b"crashing")
            if (status, code) == (503, "insufficient_memory"):
                return _asked_for(body, b"claims_memory_mib")
            return False

        r = post(client, path, body, headers)
        check(r, headers, allowed)
        status = client.get("/v1/model/status", headers=ADMIN).json()
        assert status["state"] in ("empty", "ready")
        assert status["in_flight"] == 0

    run()


def check_completion_success(r: httpx.Response) -> None:
    """A 200 completions answer is a whole `text_completion` or a stream ending with [DONE]."""
    if r.status_code != 200:
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            chunk = msgspec.json.decode(event)
            assert "error" not in chunk, chunk
            assert chunk["object"] == "text_completion"
    else:
        assert r.json()["object"] == "text_completion"


def test_completions_and_tokenize_never_5xx(one_app: TestClient[Litestar]) -> None:
    """Completions and tokenize bodies, empty or with echo loaded: only the documented 503."""
    client = one_app

    @EXAMPLES
    @given(
        path=st.sampled_from(["/v1/completions", "/tokenize", "/detokenize"]),
        body=bodies(WELL_FORMED_COMPLETION | FUZZED_COMPLETION | TOKENIZE),
        headers=HEADERS,
    )
    def run(path: str, body: bytes, headers: dict[str, bytes]) -> None:
        r = post(client, path, body, headers)
        check(r, headers, no_model)
        assert r.status_code != 200

    run()
    load(client, preset="echo")

    @EXAMPLES
    @given(
        path=st.sampled_from(["/v1/completions", "/tokenize", "/detokenize"]),
        body=bodies(WELL_FORMED_COMPLETION | FUZZED_COMPLETION | TOKENIZE),
        headers=HEADERS,
    )
    def run_loaded(path: str, body: bytes, headers: dict[str, bytes]) -> None:
        r = post(client, path, body, headers)
        check(r, headers, nothing)
        check_completion_success(r)

    run_loaded()
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert (status["state"], status["in_flight"]) == ("ready", 0)


def test_well_formed_completions_reach_the_model(one_app: TestClient[Litestar]) -> None:
    """Well-formed completions with a valid key get an answer or a 400 naming the param."""
    client = one_app
    load(client, preset="echo")
    answered: list[int] = []

    @EXAMPLES
    @given(body=WELL_FORMED_COMPLETION)
    def run(body: dict[str, Any]) -> None:
        r = client.post("/v1/completions", json=body, headers=API)
        check(r, {}, nothing)
        check_completion_success(r)
        answered.append(r.status_code)
        if r.status_code >= 400:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"], r.text

    run()
    assert answered.count(200) >= len(answered) // 10


_PATHS = [
    "/health",
    "/version",
    "/v1/models/echo",
    "/v1/models/a/b",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/adapters",
    "/v1/model/status",
    "/v1/telemetry",
    "/v1/telemetry/resources",
    "/v1/chat/completions",
    "/v1/model/load",
    "/v1/model/unload",
    "/",
    "/v1",
    "/nope",
    "/v1/models/",
    "/v1//models",
    "/v1/%ff",
    "/v1/m%C3%B6dels",
]
_QUERIES = st.sampled_from(
    [
        "",
        "?limit=5",
        "?limit=0",
        "?limit=-1",
        "?limit=abc",
        "?limit=99999999999999999999",
        "?window_s=60",
        "?window_s=0",
        "?window_s=nan",
        "?window_s=inf",
        "?window_s=1e400",
        "?limit=1&limit=2",
    ]
) | st.text(_LATIN1, max_size=12).map(lambda s: "?limit=" + s)


@pytest.mark.parametrize("loaded", [False, True], ids=["empty", "loaded"])
def test_other_routes_never_5xx(one_app: TestClient[Litestar], loaded: bool) -> None:
    """Ops and read routes under any method, query and headers: only /ready may say 503."""
    client = one_app
    if loaded:
        load(client, preset="echo")
        for _ in range(3):  # give telemetry and /metrics records to render
            client.post("/v1/chat/completions", json=chat_body(stream=True), headers=API)

    def allowed(path: str) -> Allowed:
        def ok(status: int, code: str | None) -> bool:
            return (
                path == "/ready"
                and status == 503
                and code in ("model_not_ready", "memory_pressure")
            )

        return ok

    @EXAMPLES
    @given(
        method=st.sampled_from(["GET", "GET", "GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
        path=st.sampled_from(_PATHS),
        query=_QUERIES,
        headers=HEADERS,
    )
    def run(method: str, path: str, query: str, headers: dict[str, bytes]) -> None:
        r = client.request(method, path + query, headers=as_bytes(headers))
        check(r, headers, allowed(path))
        if path == "/ready" and method == "GET" and loaded and r.status_code == 200:
            assert r.json()["model"] == "echo"

    run()


_POSTS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
    "/v1/model/load",
    "/v1/model/validate",
    "/v1/model/unload",
]


@pytest.mark.parametrize("path", _POSTS)
@pytest.mark.parametrize(
    "body",
    [b"[" * 2000 + b"]" * 2000, b'{"model": "\xff"}', b'{"\x80": 1}'],
    ids=["nested-2000-deep", "invalid-utf8-value", "invalid-utf8-key"],
)
def test_undecodable_json_is_a_client_error(
    one_app: TestClient[Litestar], path: str, body: bytes
) -> None:
    """Bodies the JSON decoder cannot take (too deep, invalid UTF-8 in a string) are a 400."""
    client = one_app
    headers = {"x-api-key": ADMIN_KEY.encode(), "content-type": b"application/json"}
    r = post(client, path, body, headers)
    check(r, headers, nothing)
    assert r.status_code == 400
