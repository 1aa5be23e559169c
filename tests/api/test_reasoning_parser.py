"""`reasoning_parser`: a post-processor chosen by name, applied to any backend's output.

The echo backend (no reasoning of its own) echoes a text that holds `<think>…</think>`: with a
parser named in the load, a preset or the backend's adapters.yaml entry, the thinking leaves as
`reasoning_content`, whole and streamed, for the official `openai` client too; without one the
same text is all content and no `reasoning_content` key appears. Unknown names are refused with
the closest known one, at start-up and at load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from helpers import ADMIN, API, API_KEY, LiveServer, chat_body, load, make_registry, sse_events
from registry.config import RegistryError

REGISTRY = """
adapters:
  echo:
    module: adapters.echo:EchoAdapter
    defaults: {token_delay_ms: 0}
  think-echo:
    module: adapters.echo:EchoAdapter
    reasoning_parser: think
  crashing:
    module: fakes.adapters:CrashingAdapter
  sampling-echo:
    module: fakes.adapters:SamplingEchoAdapter
  constrained-echo:
    module: fakes.adapters:ConstrainedEchoAdapter
models:
  echo: {backend: echo, model: echo}
  r1-echo: {backend: echo, model: echo, reasoning_parser: deepseek_r1}
  plain-think-echo: {backend: think-echo, model: echo, reasoning_parser: none}
  r1-sampling:
    backend: sampling-echo
    model: echo
    reasoning_parser: think
    sampling_defaults: {temperature: 0.6, top_p: 0.95}
"""

CHAT = "/v1/chat/completions"
THOUGHT = "<think>let me see</think> Paris is the capital"
TOKENS = 7  # echo's tokens: "<think>let", " me", " see</think>", " Paris", " is", " the", ...


@pytest.fixture
def client(app_factory: Any) -> Iterator[TestClient[Litestar]]:
    """A test client over the registry above, nothing loaded."""
    with TestClient(app_factory(registry_text=REGISTRY)) as c:
        yield c


def whole(client: Any, text: str = THOUGHT, model: str = "echo") -> dict[str, Any]:
    """The message and usage of a whole answer."""
    r = client.post(CHAT, json=chat_body(text, model=model), headers=API)
    assert r.status_code == 200, r.text
    body = r.json()
    return {"message": body["choices"][0]["message"], "usage": body["usage"]}


def streamed(client: Any, text: str = THOUGHT, model: str = "echo") -> list[dict[str, Any]]:
    """The choice deltas of a streamed answer, then the usage chunk's usage as the last item."""
    body = chat_body(text, model=model, stream=True, stream_options={"include_usage": True})
    r = client.post(CHAT, json=body, headers=API)
    assert r.status_code == 200, r.text
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    return [c["choices"][0]["delta"] for c in chunks if c["choices"]] + [chunks[-1]["usage"]]


def joined(deltas: list[dict[str, Any]], key: str) -> str:
    """The concatenated `key` of the deltas."""
    return "".join(d.get(key) or "" for d in deltas)


@pytest.mark.parametrize("parser", ["deepseek_r1", "think"])
def test_echo_output_is_split_whole_and_streamed(client: Any, parser: str) -> None:
    """A backend with no reasoning of its own gets reasoning_content from the named parser."""
    load(client, backend="echo", model="echo", reasoning_parser=parser)
    got = whole(client)
    assert got["message"] == {
        "role": "assistant",
        "content": " Paris is the capital",
        "reasoning_content": "let me see",
    }
    assert got["usage"]["completion_tokens"] == TOKENS  # the tag tokens still count
    *deltas, usage = streamed(client)
    assert joined(deltas, "reasoning_content") == "let me see"
    assert joined(deltas, "content") == " Paris is the capital"
    assert deltas[0]["role"] == "assistant"
    assert "<think>" not in json.dumps(deltas)
    assert usage["completion_tokens"] == TOKENS


def test_without_a_parser_the_same_text_is_all_content(client: Any) -> None:
    """No parser: the tags stay in the content and no reasoning_content key appears anywhere."""
    load(client, backend="echo", model="echo")
    assert whole(client)["message"] == {"role": "assistant", "content": THOUGHT}
    *deltas, _ = streamed(client)
    assert joined(deltas, "content") == THOUGHT
    assert not any("reasoning_content" in d for d in deltas)


@pytest.mark.parametrize(
    ("parser", "expected"),
    [
        ("deepseek_r1", {"content": None, "reasoning_content": "Paris is the capital"}),
        ("think", {"content": "Paris is the capital", "reasoning_content": None}),
    ],
)
def test_untagged_output_follows_each_parsers_rule(
    client: Any, parser: str, expected: dict[str, Any]
) -> None:
    """Echo cannot show a rendered prompt: deepseek_r1 takes vLLM's rule, think gives content."""
    load(client, backend="echo", model="echo", reasoning_parser=parser)
    assert whole(client, "Paris is the capital")["message"] == {"role": "assistant", **expected}


def test_a_field_only_the_parser_refuses_says_so(client: Any) -> None:
    """The backend has response_format; under a parser the 400 blames the parser, not it."""
    body = chat_body("hi", response_format={"type": "json_object"})
    load(client, backend="constrained-echo", model="echo")
    assert client.post(CHAT, json=body, headers=API).status_code == 200
    load(client, backend="constrained-echo", model="echo", reasoning_parser="think", replace=True)
    r = client.post(CHAT, json=body, headers=API)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format"
    assert "reasoning parser 'think'" in error["message"]
    assert "backend 'constrained-echo' has it" in error["message"]
    # what the backend itself lacks keeps the backend's own refusal
    load(client, backend="echo", model="echo", reasoning_parser="think", replace=True)
    r = client.post(CHAT, json=body, headers=API)
    assert r.status_code == 400, r.text
    assert "reasoning parser" not in r.json()["error"]["message"]


def test_completions_pass_through_unsplit(client: Any) -> None:
    """A raw prompt's text is not split, as vLLM's completions route does not parse reasoning."""
    load(client, backend="echo", model="echo", reasoning_parser="think")
    body = {"model": "echo", "prompt": THOUGHT, "max_tokens": 32}
    r = client.post("/v1/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == THOUGHT


@pytest.mark.parametrize(
    ("body", "parser"),
    [
        ({"preset": "r1-echo"}, "deepseek_r1"),
        ({"preset": "r1-echo", "reasoning_parser": "think"}, "think"),
        ({"preset": "r1-echo", "reasoning_parser": "none"}, None),
        ({"backend": "think-echo", "model": "echo"}, "think"),
        ({"backend": "think-echo", "model": "echo", "reasoning_parser": "none"}, None),
        ({"preset": "plain-think-echo"}, None),
    ],
)
def test_the_load_then_the_preset_then_the_backend_decide(
    client: Any, body: dict[str, Any], parser: str | None
) -> None:
    """The request's name wins over the preset's, which wins over the backend's; none is off."""
    r = client.post("/v1/model/validate", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["plan"]["reasoning_parser"] == parser
    loaded = load(client, **body)
    assert loaded["plan"]["reasoning_parser"] == parser
    assert loaded["details"].get("reasoning_parser") == parser
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert status["plan"]["reasoning_parser"] == parser
    model = loaded["plan"]["served_model_name"]
    message = whole(client, model=model)["message"]
    assert ("reasoning_content" in message) == (parser is not None)


def test_adapters_listing_shows_parsers(client: Any) -> None:
    """GET /v1/adapters names each backend's and preset's parser, and the parsers there are."""
    listing = client.get("/v1/adapters", headers=ADMIN).json()
    by_name = {a["name"]: a for a in listing["data"]}
    assert by_name["think-echo"]["reasoning_parser"] == "think"
    assert by_name["echo"]["reasoning_parser"] is None
    assert listing["presets"]["r1-echo"]["reasoning_parser"] == "deepseek_r1"
    assert set(listing["reasoning_parsers"]) == {"deepseek_r1", "think"}


@pytest.mark.parametrize("route", ["/v1/model/load", "/v1/model/validate"])
def test_an_unknown_name_is_refused_with_a_suggestion(client: Any, route: str) -> None:
    """A misspelt parser is 422 at `$.reasoning_parser` naming the closest and all known ones."""
    body = {"backend": "echo", "model": "echo", "reasoning_parser": "deepseek-r1"}
    r = client.post(route, json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "$.reasoning_parser"
    assert error["message"] == (
        "unknown reasoning parser 'deepseek-r1'; did you mean 'deepseek_r1'? "
        "known: deepseek_r1, none, think"
    )
    assert client.get("/v1/model/status", headers=ADMIN).json()["state"] == "empty"


@pytest.mark.parametrize(
    ("where", "entry"),
    [
        ("adapters.echo", "adapters:\n  echo:\n    module: adapters.echo:EchoAdapter\n"),
        ("models.e", "models:\n  e: {backend: echo, model: echo, reasoning_parser: qwen3}\n"),
    ],
)
def test_an_unknown_name_in_adapters_yaml_stops_the_start(
    tmp_path: Path, where: str, entry: str
) -> None:
    """adapters.yaml naming a parser outside the allowlist is a start-up error naming the key."""
    if where == "adapters.echo":
        text = entry + "    reasoning_parser: qwen3\n"
    else:
        text = "adapters:\n  echo:\n    module: adapters.echo:EchoAdapter\n" + entry
    with pytest.raises(RegistryError) as caught:
        make_registry(tmp_path, text)
    assert str(caught.value) == (
        f"{where}.reasoning_parser: unknown reasoning parser 'qwen3'; "
        "known: deepseek_r1, none, think"
    )


def test_a_failed_replace_restores_the_model_with_its_parser(client: Any) -> None:
    """The rollback rebuilds the previous adapter behind the same parser."""
    load(client, backend="echo", model="echo", reasoning_parser="think")
    r = client.post(
        "/v1/model/load", json={"backend": "crashing", "model": "x", "replace": True}, headers=ADMIN
    )
    assert r.status_code == 500, r.text
    assert r.json()["status"] == "rolled_back"
    assert whole(client)["message"]["reasoning_content"] == "let me see"


def test_preset_sampling_defaults_reach_the_engine_through_the_parser(client: Any) -> None:
    """The DeepSeek presets' shape: a parser and sampling_defaults; unset fields get the values."""
    load(client, preset="r1-sampling")
    message = whole(client, "hi", model="r1-sampling")["message"]
    assert message["content"] == "temperature=0.6 top_p=0.95 top_k=40"
    assert message["reasoning_content"] is None


def test_a_family_name_as_backend_points_at_its_presets(app_factory: Any) -> None:
    """`backend: deepseek` (once an adapter) answers 404 naming the deepseek presets to load."""
    text = REGISTRY + "  deepseek-r1: {backend: echo, model: echo, reasoning_parser: deepseek_r1}\n"
    with TestClient(app_factory(registry_text=text)) as client:
        r = client.post("/v1/model/load", json={"backend": "deepseek", "model": "x"}, headers=ADMIN)
    assert r.status_code == 404
    assert r.json()["error"]["message"].endswith(
        "; presets for 'deepseek': deepseek-r1 (load with 'preset')"
    )


def test_the_openai_client_reads_reasoning_content(app_factory: Any) -> None:
    """The official client sees reasoning_content as an extra field, whole and streamed."""
    with LiveServer(app_factory(registry_text=REGISTRY)) as server:
        body = {"backend": "echo", "model": "echo", "reasoning_parser": "deepseek_r1"}
        r = httpx.post(f"{server.url}/v1/model/load", json=body, headers=ADMIN)
        assert r.status_code == 200, r.text
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as oai:
            messages: list[Any] = [{"role": "user", "content": THOUGHT}]
            out = oai.chat.completions.create(model="echo", messages=messages)
            message = out.choices[0].message
            assert message.content == " Paris is the capital"
            assert (message.model_extra or {}).get("reasoning_content") == "let me see"
            chunks = list(oai.chat.completions.create(model="echo", messages=messages, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == "let me see"
    assert "".join(d.content or "" for d in deltas) == " Paris is the capital"
