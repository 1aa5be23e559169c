"""Legacy completions (`POST /v1/completions`) and vLLM's tokenize/detokenize, over `ChatServing`.

A completion is a generation like a chat one, from a raw prompt instead of templated messages:
`CompletionServing` parses and checks the request (vLLM's completions server is the reference
for what each field does), then hands it to `ChatServing.reserve`, so admission, hooks,
telemetry, the unload/stop rules and the disconnect handling are the chat route's own, not a
copy. `CompletionRun` is the chat `Run` with OpenAI's `text_completion` objects for output.

vLLM's extensions, shaped as its completions server (`completion/serving.py`) shapes them:
`prompt_logprobs` (on the whole choice; a stream refuses it above 0, as vLLM), `return_token_ids`
(`token_ids` per choice or chunk, `prompt_token_ids` on the whole choice and on each choice's
first chunk), and `echo` with `logprobs` (the prompt's positions first, the first one null).
A streamed `echo` carries `prompt_token_ids` on each choice's first chunk too, as vLLM's does.

Refused by name (400 + `param`): `suffix` (no adapter renders fill-in-the-middle prompts),
`best_of` other than `n` (no adapter ranks extra candidates), `echo` with `logprobs` or
`prompt_logprobs` where the adapter does not compute the prompt's logprobs, `return_token_ids`
where it does not declare them, several prompts in one request; a backend whose adapter does not
declare the route gets a 400 naming it (code `unsupported_route`).

Must never: apply a chat template to a raw prompt; build a frame per token beyond one
concatenation; answer a field it did not honour.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
from litestar import Request
from litestar.types import Receive

from adapters.base import Capabilities
from adapters.kit.tokens import TokenOps
from registry.manager import LoadedModel
from schemas.completions import (
    COMPLETION_REQUEST_FIELDS,
    MAX_PROMPT_TOKENS,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    check_completion_request,
    token_ids,
)
from schemas.converter import StructureError, structure
from schemas.errors import (
    ErrorDetail,
    InvalidRequestError,
    NotFoundError,
    UnsupportedParameterError,
    WrapperError,
)
from schemas.features import set_value
from schemas.generation import (
    ChatOptions,
    GenerationRequest,
    Message,
    PromptPosition,
    TokenDelta,
)
from schemas.openai import ChatMessageIn, prompt_logprobs_json
from service.aio import shielded
from service.context import RequestContext
from service.errors import require_json_body
from service.serving import (
    ChatServing,
    Run,
    check_sampling_caps,
    parse_body,
    request_sampling,
)
from service.sse import DONE, SSEStream, error_event

COMPLETIONS_ROUTE = "/v1/completions"
T = TypeVar("T")
_encode = msgspec.json.encode


def check_model(name: str | None, loaded: LoadedModel) -> None:
    """404 `model_not_found` unless `name` is the served name or the model it loads."""
    served = loaded.plan.served_model_name
    if name is not None and name not in (served, loaded.plan.model):
        raise NotFoundError(
            f"The model `{name}` does not exist; this server serves `{served}`",
            param="model",
            code="model_not_found",
        )


def require_feature(loaded: LoadedModel, route: str) -> Capabilities:
    """The adapter's capabilities, or 400 naming `route` when the backend does not serve it."""
    caps: Capabilities = loaded.adapter.capabilities
    if route not in caps.features:
        raise InvalidRequestError(
            f"{route} is not supported by backend '{loaded.plan.backend.name}'",
            code="unsupported_route",
        )
    return caps


class CompletionServing:
    """Turns OpenAI completions requests into adapter generations, through `ChatServing`."""

    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat
        self.admission = chat.admission

    def parse(self, body: bytes) -> CompletionRequest:
        """JSON → CompletionRequest, or 400 naming the first bad field or broken rule.

        The request-only rules (`check_completion_request`) run here, before any model wait.
        """
        req: CompletionRequest = parse_body(body, CompletionRequest, COMPLETION_REQUEST_FIELDS)
        check_completion_request(req)
        return req

    def build(
        self, req: CompletionRequest, loaded: LoadedModel, request_id: str
    ) -> GenerationRequest:
        """Check the request against the adapter and the server's limits; build the engine request.

        `req` has passed `parse`'s request-only rules; what is left depends on what is loaded.
        """
        check_model(req.model, loaded)
        caps = require_feature(loaded, COMPLETIONS_ROUTE)
        backend = loaded.plan.backend.name
        if req.suffix:
            raise UnsupportedParameterError(
                f"suffix is not supported by backend '{backend}'", param="suffix"
            )
        if set_value(req.logit_bias) and "logit_bias" not in caps.features:
            raise UnsupportedParameterError(
                f"logit_bias is not supported by backend '{backend}'", param="logit_bias"
            )
        check_sampling_caps(req, caps, backend)
        prompt_lps = _logprob_requests(req, caps, backend)
        if req.return_token_ids and "return_token_ids" not in caps.features:
            raise UnsupportedParameterError(
                f"return_token_ids is not supported by backend '{backend}'",
                param="return_token_ids",
            )
        if req.echo and not isinstance(req.prompt, str) and loaded.adapter.token_ops() is None:
            raise UnsupportedParameterError(
                f"echo of a token-id prompt needs a tokenizer; backend '{backend}' has none",
                param="echo",
            )
        cap = self.chat.settings.max_tokens_cap
        if req.max_tokens > cap:
            raise InvalidRequestError(
                f"max_tokens: must be at most {cap} (the server's limit, IW_MAX_TOKENS)",
                param="max_tokens",
            )
        # the preset's sampling defaults apply here too, as vLLM's completions server applies
        # its default sampling params
        sampling = request_sampling(
            req,
            loaded,
            max_tokens=req.max_tokens,
            logprobs=req.logprobs is not None,
            top_logprobs=req.logprobs,
        )
        options = ChatOptions(
            return_token_ids=bool(req.return_token_ids),
            prompt_logprobs=prompt_lps,
            # only to an adapter that declares it: it then sends the prompt's ids (streamed echo)
            echo=req.echo and "echo" in caps.features,
        )
        return GenerationRequest(
            request_id,
            (),
            sampling,
            loaded.plan.served_model_name,
            prompt=req.prompt,
            options=options,
        )

    async def open_run(
        self,
        body: bytes,
        content_type: str | None,
        ctx: RequestContext,
        raw_headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> Run:
        """Check a request and reserve its place: a `CompletionRun` whose `close()` is owed."""
        require_json_body(content_type, body)
        req = self.parse(body)
        build = functools.partial(self.build, req)
        return await self.chat.reserve(req, build, ctx, raw_headers, CompletionRun)

    async def handle(self, request: Request[Any, Any, Any], ctx: RequestContext) -> Any:
        """Serve one request through Litestar (`service.datapath` serves it at the edge)."""
        self.admission.check_open()  # stopping: refuse before reading the body
        body = await request.body()
        run = await self.open_run(
            body, request.headers.get("content-type"), ctx, request.scope["headers"]
        )
        if run.req.stream:
            frames = run.frames()
            run.attach(frames)
            return SSEStream(frames, on_close=run.close)
        try:
            return await run.complete(request.receive)
        finally:
            await run.close()


class CompletionRun(Run):
    """A chat `Run` whose output is `text_completion` objects (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.completion_id = f"cmpl-{uuid.uuid4().hex}"
        req = self.req
        self.want_ids = self.gen.options.return_token_ids
        self.echo_on = isinstance(req, CompletionRequest) and req.echo
        self.top_n = req.logprobs if isinstance(req, CompletionRequest) else None
        # vLLM's rule: the prompt's positions lead each choice's logprobs with echo and logprobs
        self.echo_logprobs = self.echo_on and self.top_n is not None
        # what the adapter sent on its first delta, kept for every choice
        self.prompt_ids: tuple[int, ...] | None = None
        self.positions: tuple[PromptPosition, ...] | None = None

    def _note_prompt(self, delta: TokenDelta) -> None:
        if delta.prompt_token_ids is not None and self.prompt_ids is None:
            self.prompt_ids = delta.prompt_token_ids
        if delta.prompt_logprobs is not None and self.positions is None:
            self.positions = delta.prompt_logprobs

    async def _echo_text(self) -> str | None:
        """The prompt as text when `echo` is on (a token-id prompt decoded by the tokenizer).

        With `return_token_ids` too the echoed text is empty, as vLLM's server sends it (the ids
        say what the prompt was; its renderer skips detokenising the prompt then).
        """
        req = self.req
        if not isinstance(req, CompletionRequest) or not req.echo:
            return None
        if self.want_ids:
            return ""
        prompt = req.prompt
        if isinstance(prompt, str):
            return prompt
        ops = self.adapter.token_ops()
        if ops is None:  # checked in build; the model may have been swapped since
            raise InvalidRequestError("echo of a token-id prompt needs a tokenizer", param="echo")
        return await asyncio.to_thread(ops.decode, prompt)

    def _prompt_logprobs(self) -> dict[str, list[Any]]:
        """The prompt's positions in OpenAI's completions logprobs (echo with logprobs).

        As vLLM's `_create_completion_logprobs` over the prompt: the first position has no
        logprob (its token decoded alone, nulls); each other one the prompt token's own
        logprob and the first `logprobs + 1` entries of the position (the token, then the top
        alternatives), floors at -9999 as vLLM's JSON.
        """
        out = _empty_logprobs()
        ids, positions = self.prompt_ids, self.positions
        if ids is None or positions is None:
            return out
        ops = self.adapter.token_ops()
        keep = (self.top_n or 0) + 1
        offset = 0
        for token_id, position in zip(ids, positions, strict=False):
            if position is None:
                token = ops.decode((token_id,)) if ops is not None else ""
                logprob, top = None, None
            else:
                entries = {entry[0]: entry for entry in position}
                own = entries.get(token_id)
                token = own[3] if own is not None else ""
                logprob = max(own[1], -9999.0) if own is not None else None
                top = {text: max(lp, -9999.0) for _, lp, _, text in position[:keep]}
            out["tokens"].append(token)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(token)
        return out

    def _fail(self, exc: BaseException) -> WrapperError:
        # the context rule names chat's field (adapters.kit.context): name ours
        if isinstance(exc, InvalidRequestError) and exc.param == "messages":
            exc.param = "prompt"
        return super()._fail(exc)

    # --- streaming -----------------------------------------------------------------------------

    def _first_extras(self) -> bytes:
        """`prompt_token_ids` for a choice's first chunk (vLLM's, with echo or return_token_ids)."""
        if (self.echo_on or self.want_ids) and self.prompt_ids is not None:
            return b',"prompt_token_ids":' + _encode(self.prompt_ids)
        return b""

    async def frames(self) -> AsyncIterator[bytes]:  # noqa: C901, PLR0912, PLR0915  (one stream)
        """The SSE body: text chunks, finish chunks, optional usage chunk, `[DONE]`."""
        req = self.req
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = (
            b'data: {"id":'
            + _encode(self.completion_id)
            + b',"object":"text_completion","created":'
            + str(self.created).encode()
            + b',"model":'
            + _encode(self.model)
            + b',"choices":[{"index":'
        )
        tail = b"}]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        n = self.gen.sampling.n
        offsets = [0] * n
        frame = self.timer.frame
        ctx = self.ctx
        want_ids = self.want_ids
        try:
            echo = await self._echo_text()
            echoed = [echo is None] * n
            # a choice's first chunk carries the prompt's ids (echo, return_token_ids)
            first = [True] * n
            agen = await self._start()
            try:
                async for delta in agen:
                    if ctx.cut:  # the stall watch dropped the connection: nobody reads on
                        return
                    self._observe(delta)
                    self._note_prompt(delta)
                    index, text = delta.index, delta.text
                    lp_parts = None
                    if not echoed[index] and (text or delta.token_count):
                        text = f"{echo}{text}"
                        echoed[index] = True
                        if self.echo_logprobs:
                            lp_parts = self._prompt_logprobs()
                            offsets[index] = sum(len(t) for t in lp_parts["tokens"])
                    ids = delta.token_ids if want_ids else None
                    if not text and not delta.logprobs and not ids and lp_parts is None:
                        continue
                    lp = b"null"
                    if delta.logprobs or lp_parts is not None:
                        part = _logprobs(delta.logprobs or (), offsets, index)
                        if lp_parts is not None:
                            for key, values in part.items():
                                lp_parts[key].extend(values)
                            part = lp_parts
                        lp = _encode(part)
                    extras = b""
                    if first[index]:
                        first[index] = False
                        extras = self._first_extras()
                    if ids is not None:
                        extras += b',"token_ids":' + _encode(ids)
                    frame()
                    yield (
                        head
                        + str(index).encode()
                        + b',"text":'
                        + _encode(text)
                        + b',"logprobs":'
                        + lp
                        + b',"finish_reason":null,"stop_reason":null'
                        + extras
                        + tail
                    )
            finally:
                await shielded(agen.aclose())  # the engine's abort must run to its end
            self._check_end()
            self.status = "ok"
            metrics = self._metrics()
            for index in range(n):
                last = index == n - 1 and not include_usage
                extra = b',"metrics":' + _encode(metrics) if last else b""
                yield (
                    head
                    + str(index).encode()
                    + b',"text":'
                    + _encode("" if echoed[index] else echo)
                    + b',"logprobs":null,"finish_reason":'
                    + _encode(self.finish[index] or "stop")
                    + b',"stop_reason":'
                    + _encode(self.stop_reasons[index])
                    + (self._first_extras() if first[index] else b"")
                    + b"}]"
                    + extra
                    + tail[2:]
                )
            if include_usage:
                yield (
                    b"data: "
                    + _encode(
                        {
                            "id": self.completion_id,
                            "object": "text_completion",
                            "created": self.created,
                            "model": self.model,
                            "choices": [],
                            "usage": self._usage(),
                            "metrics": metrics,
                        }
                    )
                    + b"\n\n"
                )
        except Exception as exc:
            err = self._fail(exc)
            yield error_event(ErrorDetail(err.message, err.error_type, err.param, err.code))
        yield DONE

    # --- non-streaming -------------------------------------------------------------------------

    async def _collect(self) -> Completion:  # type: ignore[override]
        n = self.gen.sampling.n
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[dict[str, list[Any]]] = [_empty_logprobs() for _ in range(n)]
        token_ids: list[list[int]] = [[] for _ in range(n)]
        offsets = [0] * n
        frame = self.timer.frame
        echo = await self._echo_text()
        agen = await self._start()
        try:
            async for delta in agen:
                self._observe(delta)
                self._note_prompt(delta)
                if delta.text or (delta.token_count and self.timer.frames == 0):
                    frame()
                    texts[delta.index].append(delta.text)
                if delta.logprobs:
                    part = _logprobs(delta.logprobs, offsets, delta.index)
                    for key, values in part.items():
                        logprobs[delta.index][key].extend(values)
                if delta.token_ids:
                    token_ids[delta.index].extend(delta.token_ids)
        finally:
            await shielded(agen.aclose())
        self._check_end()
        self.status = "ok"
        metrics = self._metrics()
        want_logprobs = self.top_n is not None
        if self.echo_logprobs:
            # the prompt's positions first, the output's offsets moved past them (vLLM's)
            lead = self._prompt_logprobs()
            shift = sum(len(t) for t in lead["tokens"])
            for i in range(n):
                output = logprobs[i]
                output["text_offset"] = [o + shift for o in output["text_offset"]]
                logprobs[i] = {key: [*lead[key], *output[key]] for key in lead}
        want_ids = self.want_ids
        prompt_lps = prompt_logprobs_json(self.positions) if self.positions is not None else None
        choices = [
            CompletionChoice(
                index=i,
                text=(echo or "") + "".join(texts[i]),
                logprobs=CompletionLogprobs(**logprobs[i]) if want_logprobs else None,
                finish_reason=self.finish[i],
                stop_reason=self.stop_reasons[i],
                token_ids=token_ids[i] if want_ids else None,
                prompt_logprobs=prompt_lps,
                prompt_token_ids=list(self.prompt_ids or ()) if want_ids else None,
            )
            for i in range(n)
        ]
        return Completion(
            self.completion_id,
            "text_completion",
            self.created,
            self.model,
            choices,
            CompletionUsage(**self._usage()),
            metrics,
        )

    async def complete(self, receive: Receive) -> Completion:  # type: ignore[override]
        """Run to the end unless the client goes away first (chat's `complete`)."""
        result: Any = await super().complete(receive)
        completion: Completion = result
        return completion


def _empty_logprobs() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _logprobs(lps: Sequence[Any], offsets: list[int], index: int) -> dict[str, list[Any]]:
    """OpenAI's completions logprobs of one delta; `offsets[index]` runs on over the choice.

    As vLLM's server: each position's `top_logprobs` holds the sampled token first, then the
    alternatives; `text_offset` advances by each token's length.
    """
    out = _empty_logprobs()
    offset = offsets[index]
    for lp in lps:
        top = {lp.token: lp.logprob}
        top.update(lp.top)
        out["tokens"].append(lp.token)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(lp.token)
    offsets[index] = offset
    return out


# --- tokenize / detokenize -----------------------------------------------------------------------


_TOKENIZE_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "add_special_tokens",
        "add_generation_prompt",
        "continue_final_message",
        "return_token_strs",
    }
)
_DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


class TokenServing:
    """vLLM's `/tokenize` and `/detokenize` over the loaded adapter's tokenizer."""

    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def _with_ops(
        self, name: str | None, route: str, request_id: str, work: Callable[[TokenOps], T]
    ) -> T:
        """`work(ops)` in a thread, holding the model like a generation (an unload waits)."""
        manager = self.chat.manager
        loaded, ticket = await manager.acquire(request_id, name)
        try:
            check_model(name, loaded)
            require_feature(loaded, route)
            ops = loaded.adapter.token_ops()
            if ops is None:
                raise InvalidRequestError(
                    f"{route}: the loaded model has no tokenizer", code="unsupported_route"
                )
            return await asyncio.to_thread(work, ops)
        finally:
            manager.release(ticket)

    async def tokenize(
        self, body: bytes, content_type: str | None, request_id: str
    ) -> TokenizeResponse:
        """Token ids of a prompt or a templated conversation."""
        require_json_body(content_type, body)
        req: TokenizeRequest = parse_body(body, TokenizeRequest, _TOKENIZE_FIELDS)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give either prompt or messages", param="prompt")
        if req.continue_final_message and req.add_generation_prompt:
            raise InvalidRequestError(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                param="continue_final_message",
            )
        messages: tuple[Message, ...] = ()
        if req.messages is not None:
            if not req.messages or len(req.messages) > self.chat.settings.max_messages:
                raise InvalidRequestError(
                    f"messages: 1 to {self.chat.settings.max_messages} messages", param="messages"
                )
            try:
                parsed = structure(req.messages, list[ChatMessageIn], path="messages")
            except StructureError as exc:
                raise InvalidRequestError(exc.first.render(), param=exc.first.param) from None
            messages = tuple(Message(m.role, m.text(), m.name) for m in parsed)

        def run(ops: TokenOps) -> TokenizeResponse:
            if req.prompt is not None:
                special = True if req.add_special_tokens is None else req.add_special_tokens
                ids = ops.encode_prompt(req.prompt, add_special_tokens=special)
            else:
                ids = ops.encode_chat(
                    messages,
                    add_generation_prompt=req.add_generation_prompt,
                    continue_final_message=req.continue_final_message,
                    add_special_tokens=bool(req.add_special_tokens),
                )
            strs = ops.token_strs(ids) if req.return_token_strs else None
            return TokenizeResponse(len(ids), ops.max_model_len, list(ids), strs)

        return await self._with_ops(req.model, "/tokenize", request_id, run)

    async def detokenize(
        self, body: bytes, content_type: str | None, request_id: str
    ) -> DetokenizeResponse:
        """The text of token ids."""
        require_json_body(content_type, body)
        req: DetokenizeRequest = parse_body(body, DetokenizeRequest, _DETOKENIZE_FIELDS)
        try:
            ids = token_ids(req.tokens)
        except ValueError as exc:
            raise InvalidRequestError(f"tokens: {exc}", param="tokens") from None

        def run(ops: TokenOps) -> DetokenizeResponse:
            return DetokenizeResponse(ops.decode(ids))

        return await self._with_ops(req.model, "/detokenize", request_id, run)


def _logprob_requests(req: CompletionRequest, caps: Capabilities, backend: str) -> int | None:
    """Check `logprobs`, `prompt_logprobs` and echo's against `caps`; the prompt logprobs asked."""
    if req.logprobs is not None:
        if caps.max_top_logprobs == 0:
            raise UnsupportedParameterError(
                f"logprobs are not available on backend '{backend}'", param="logprobs"
            )
        if req.logprobs > caps.max_top_logprobs:
            raise UnsupportedParameterError(
                f"logprobs must be at most {caps.max_top_logprobs}", param="logprobs"
            )
    # vLLM's rule (`CompletionRequest.to_sampling_params`): echo with logprobs asks the
    # prompt's logprobs with as many alternatives as `logprobs`
    prompt_lps = req.prompt_logprobs
    if prompt_lps is None and req.echo:
        prompt_lps = req.logprobs
    if prompt_lps is not None and "prompt_logprobs" not in caps.features:
        name = "prompt_logprobs" if req.prompt_logprobs is not None else "echo"
        raise UnsupportedParameterError(
            f"{name} needs the prompt's logprobs, which backend '{backend}' does not compute",
            param=name,
        )
    if req.prompt_logprobs and req.stream:
        # vLLM's check and wording (0 asks nothing beyond the prompt token itself)
        raise InvalidRequestError(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    return prompt_lps


__all__ = [
    "COMPLETIONS_ROUTE",
    "MAX_PROMPT_TOKENS",
    "CompletionRun",
    "CompletionServing",
    "TokenServing",
    "check_model",
]
