"""Chat-completions serving: request checks, the generation run, OpenAI responses and streams.

The controller stays thin (vLLM's entrypoints split it the same way): it hands the raw body here.
`ChatServing.parse` parses the request and applies the rules that depend on it alone
(`schemas.openai.check_chat_request`); `ChatServing.build` checks it against the loaded adapter's
capabilities and the server's limits, refusing by name (400 + `param`) anything the adapter
cannot honour. A `Run` then owns one request's resources (in-flight ticket, admission slot,
timer) and releases them exactly once in `close()`, which every path reaches: normal end, error,
client disconnect, unload.

Structured output (`schemas.structured`) and tools (`schemas.tools`) become one decoding
constraint on the `GenerationRequest`; a forced tool call's answer (that constraint's JSON) is
turned into `tool_calls` here, in `_tool_frames` and `_tool_choice`, off the plain-text path.

Hooks (hooks/, configured in adapters.yaml): `before_request` runs after the request is built
and before admission, so a refused request never takes a slot; `on_chunk` wraps the adapter's
stream (streamed and whole responses alike); `after_response` is queued from `close()`. With no
hooks for the served (backend, preset) the chain is `None`, decided once per request: the
per-token path is exactly what it is without hooks.

Must never: do per-token work beyond building one frame and one timestamp; let an engine's
exception text out unmasked; keep a slot after the client is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar, get_args

import anyio
import attrs
from litestar import Request
from litestar.types import Receive

from adapters.base import BaseAdapter, Capabilities
from adapters.kit.sampling import GATED_FIELDS
from adapters.text import tag_overlap
from adapters.tool_parsing import CallStream, ToolCallParser
from hooks.base import HIDDEN_HEADERS, Exchange, HookCall
from hooks.chain import HookChain, HookSet
from registry.manager import InflightTicket, LoadedModel, ModelManager, sanitize_exception
from registry.secrets import SecretStore
from schemas.chat_options import check_template_kwargs
from schemas.completions import MAX_PROMPT_CHARS, CompletionRequest
from schemas.converter import StructureError, structure
from schemas.errors import (
    EngineError,
    ErrorDetail,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    UnsupportedParameterError,
    WrapperError,
)
from schemas.features import chat_request_features
from schemas.generation import (
    ChatOptions,
    GenerationRequest,
    Message,
    Role,
    SamplingOptions,
    StructuredOutput,
    TokenDelta,
    Tool,
    ToolCall,
)
from schemas.openai import (
    CHAT_REQUEST_FIELDS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageIn,
    Choice,
    ImagePart,
    PromptLogprobs,
    TextPart,
    Usage,
    check_chat_request,
    prompt_logprobs_json,
)
from schemas.sampling import fill_defaults
from schemas.structured import from_request as structured_from_request
from schemas.suggest import NAME_LIMIT, closest
from schemas.tools import ToolMode, call_id, history_calls, parse_output, wire_calls
from schemas.tools import from_request as tools_from_request
from service.admission import Admission, Slot, shutting_down
from service.aio import shielded
from service.context import RequestContext
from service.errors import decode_json, require_json_body
from service.settings import Settings
from service.sse import DONE, ChunkEncoder, SSEStream, error_event
from service.telemetry import (
    MemoryMark,
    RequestMemoryMeter,
    RequestRecord,
    RequestTimer,
    TelemetryManager,
    build_record,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: request field → SamplingOptions field, for the capability check
_SAMPLING_FIELDS = GATED_FIELDS


def parse_body(body: bytes, cls: type[T], fields: frozenset[str]) -> T:
    """JSON → `cls`, or 400 naming the first unknown or bad field (OpenAI's wording)."""
    payload = decode_json(body)
    if not isinstance(payload, dict):
        raise InvalidRequestError("request body must be a JSON object")
    unknown = sorted(k for k in payload if k not in fields)
    if unknown:
        # OpenAI's own wording, plus the nearest field a typo was probably meant to be
        name = unknown[0][:NAME_LIMIT]
        best = closest(name, fields)
        more = f". Did you mean {best!r}?" if best else ""
        raise InvalidRequestError(
            f"Unrecognized request argument supplied: {name}{more}",
            param=name,
            code="unknown_parameter",
        )
    try:
        return structure(payload, cls, path="")
    except StructureError as exc:
        raise InvalidRequestError(exc.first.render(), param=exc.first.param) from None


def request_sampling(
    req: ChatCompletionRequest | CompletionRequest,
    loaded: LoadedModel,
    *,
    max_tokens: int,
    max_tokens_default: bool = False,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    logit_bias: tuple[tuple[int, float], ...] = (),
) -> SamplingOptions:
    """The sampling both generating routes share, unset fields from the preset's defaults.

    The adapter then fills what is still unset from the model's generation_config.
    """
    stop: tuple[str, ...] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    sampling = SamplingOptions(
        max_tokens=max_tokens,
        max_tokens_default=max_tokens_default,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        n=req.n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=logit_bias,
    )
    return fill_defaults(sampling, loaded.plan.sampling_defaults)


def _unloaded_error() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "the model was unloaded while this request was in flight", code="model_unloaded"
    )


def check_sampling_caps(
    req: ChatCompletionRequest | CompletionRequest, caps: Capabilities, backend: str
) -> None:
    """Sampling fields and `n` beyond what the backend honours, refused by name (both routes)."""
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value not in (None, False, 0, [], "") and name not in caps.sampling:
            raise UnsupportedParameterError(
                f"{name} is not supported by backend '{backend}'", param=name
            )
    if req.n > caps.max_n:
        raise UnsupportedParameterError(
            f"n must be at most {caps.max_n} for backend '{backend}'", param="n"
        )


def _blame_parser(
    exc: UnsupportedParameterError, req: ChatCompletionRequest, loaded: LoadedModel
) -> UnsupportedParameterError:
    """`exc`, reworded when the backend has the field and only the reasoning parser refuses it.

    A reasoning parser narrows the backend's features (`adapters.reasoning_adapter`); its refusal
    must say so, or the user is told the backend lacks what it has.
    """
    parser = loaded.plan.reasoning_parser
    inner = getattr(loaded.adapter, "inner", None)
    if parser is None or inner is None:
        return exc
    try:
        check_capabilities(req, inner.capabilities, loaded.plan.backend.name)
    except UnsupportedParameterError:
        return exc  # the backend itself refuses it: its own message says why
    return UnsupportedParameterError(
        f"{exc.param} is not available with reasoning parser '{parser}': backend "
        f"'{loaded.plan.backend.name}' has it, but it would fight the reasoning split "
        "(load without the parser, or with reasoning_parser 'none', to use it)",
        param=exc.param,
    )


def check_capabilities(req: ChatCompletionRequest, caps: Capabilities, backend: str) -> None:
    """What a chat request asks of the loaded adapter, refused by name where it cannot honour it.

    Runs after `check_chat_request`, so `top_logprobs` here always comes with `logprobs`.
    """
    check_tool_features(req, caps, backend)
    check_auto_stream(req, caps)
    images = "image_url" in caps.features
    for i, m in enumerate(req.messages):
        if m.has_images() and not images:
            raise UnsupportedParameterError(
                f"image content parts are not supported by backend '{backend}' "
                "(the loaded model takes text only)",
                param=f"messages[{i}].content",
            )
    for feature, param in chat_request_features(req):
        if feature not in caps.features:
            raise UnsupportedParameterError(
                f"{param} is not supported by backend '{backend}'", param=param
            )
    check_sampling_caps(req, caps, backend)
    if req.logprobs and caps.max_top_logprobs == 0:
        raise UnsupportedParameterError("logprobs are not available", param="logprobs")
    if req.top_logprobs and req.top_logprobs > caps.max_top_logprobs:
        raise UnsupportedParameterError(
            f"top_logprobs must be at most {caps.max_top_logprobs}", param="top_logprobs"
        )


class ChatServing:
    """Turns OpenAI chat requests into adapter generations and back."""

    def __init__(
        self,
        manager: ModelManager,
        admission: Admission,
        telemetry: TelemetryManager,
        settings: Settings,
        secrets: SecretStore,
        meter: RequestMemoryMeter | None = None,
        hooks: HookSet | None = None,
    ) -> None:
        self.meter = meter
        self.hooks = hooks or None
        self.manager = manager
        self.admission = admission
        self.telemetry = telemetry
        self.settings = settings
        self.secrets = secrets

    # --- request checks ------------------------------------------------------------------------

    def parse(self, body: bytes) -> ChatCompletionRequest:
        """JSON → ChatCompletionRequest, or 400 naming the first bad field or broken rule.

        The request-only rules (`check_chat_request`) run here, before the request waits for a
        model: one that no backend could serve never takes a ticket or waits out a load.
        """
        req = parse_body(body, ChatCompletionRequest, CHAT_REQUEST_FIELDS)
        check_chat_request(req)
        return req

    def build(
        self, req: ChatCompletionRequest, loaded: LoadedModel, request_id: str
    ) -> GenerationRequest:
        """Check the request against the adapter and the server's limits; build the engine request.

        `req` has passed `parse`'s request-only rules; what is left depends on what is loaded.
        """
        served = loaded.plan.served_model_name
        if req.model not in (served, loaded.plan.model):
            raise NotFoundError(
                f"The model `{req.model}` does not exist; this server serves `{served}`",
                param="model",
                code="model_not_found",
            )
        caps: Capabilities = loaded.adapter.capabilities
        try:
            check_capabilities(req, caps, loaded.plan.backend.name)
        except UnsupportedParameterError as exc:
            raise _blame_parser(exc, req, loaded) from None
        # after the capability check: a backend without the feature refuses it by name first
        structured, tools = constraint_of(req)
        max_tokens, default_max = self._token_budget(req, caps)
        sampling = request_sampling(
            req,
            loaded,
            max_tokens=max_tokens,
            max_tokens_default=default_max,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs,
            logit_bias=parse_logit_bias(req.logit_bias),
        )
        messages = tuple(
            Message(m.role, m.text(), m.name)
            if m.tool_calls is None and m.tool_call_id is None and not m.has_images()
            else Message(
                m.role,
                m.text(),
                m.name,
                tool_calls=history_calls(i, m.tool_calls) if m.tool_calls is not None else (),
                tool_call_id=m.tool_call_id,
                parts=_parts(m) if m.has_images() else (),
            )
            for i, m in enumerate(req.messages)
        )
        return GenerationRequest(
            request_id,
            messages,
            sampling,
            served,
            structured=structured,
            tools=tools,
            options=_parser_options(
                req, chat_options(req, "prompt_logprobs" in caps.features), loaded.adapter
            ),
        )

    def _token_budget(self, req: ChatCompletionRequest, caps: Capabilities) -> tuple[int, bool]:
        """The server's limits on a request (IW_MAX_MESSAGES, IW_MAX_TOKENS), 400 beyond them.

        Returns the max_tokens to ask for and whether it is the default (the request set none).
        """
        if len(req.messages) > self.settings.max_messages:
            raise InvalidRequestError(
                f"messages: at most {self.settings.max_messages} messages"
                f" (the server's limit, IW_MAX_MESSAGES), got {len(req.messages)}",
                param="messages",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens
        cap = self.settings.max_tokens_cap
        if max_tokens is None:
            return (min(cap, caps.max_context) if caps.max_context else cap), True
        if max_tokens > cap:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise InvalidRequestError(
                f"{param}: must be at most {cap} (the server's limit, IW_MAX_TOKENS)", param=param
            )
        return max_tokens, False

    def check_amended(  # noqa: C901, PLR0912  (one flat list of limits)
        self, old: GenerationRequest, new: GenerationRequest, loaded: LoadedModel
    ) -> None:
        """A hook's amended request must keep within what `build` allows; ValueError if not."""
        if new.request_id != old.request_id or new.model != old.model:
            raise ValueError("a hook may not change the request id or the model")
        if new.structured != old.structured:
            raise ValueError("a hook may not change the structured-output constraint")
        if new.prompt != old.prompt and not (
            isinstance(new.prompt, str)
            and isinstance(old.prompt, str)
            and 0 < len(new.prompt) <= MAX_PROMPT_CHARS
        ):
            # text may be amended (redaction), within the same bound; never ids, never the kind
            raise ValueError(
                f"a raw prompt may only become other text of 1 to {MAX_PROMPT_CHARS} chars"
            )
        if new.prompt is not None:
            if new.messages:
                raise ValueError("a raw-prompt request has no messages")
        elif not new.messages or len(new.messages) > self.settings.max_messages:
            raise ValueError(f"messages must number 1 to {self.settings.max_messages}")
        for m in new.messages:
            if not isinstance(m, Message) or m.role not in _ROLES or not isinstance(m.content, str):
                raise ValueError("messages must be Message(role, content) with a known role")
        if new.options != old.options:
            raise ValueError("a hook may not change the chat template options")
        s = new.sampling
        if not isinstance(s, SamplingOptions):
            raise TypeError("sampling must be SamplingOptions")
        if s == old.sampling:
            return
        caps: Capabilities = loaded.adapter.capabilities
        if not 1 <= s.max_tokens <= self.settings.max_tokens_cap:
            raise ValueError(f"max_tokens must be 1 to {self.settings.max_tokens_cap}")
        if not 1 <= s.n <= caps.max_n:
            raise ValueError(f"n must be 1 to {caps.max_n}")
        for name in _SAMPLING_FIELDS:
            if getattr(s, name) not in (None, False, 0, (), "") and name not in caps.sampling:
                raise ValueError(f"{name} is not supported by this backend")
        if (s.logprobs or s.top_logprobs) and (s.top_logprobs or 0) > caps.max_top_logprobs:
            raise ValueError("logprobs beyond what this backend gives")
        if s.logprobs and caps.max_top_logprobs == 0:
            raise ValueError("logprobs are not available")

    def _hook_call(
        self,
        raw_headers: Iterable[tuple[bytes, bytes]],
        req: ChatCompletionRequest | CompletionRequest,
        loaded: LoadedModel,
        ctx: RequestContext,
    ) -> HookCall:
        headers: dict[str, str] = {}
        mask = self.secrets.mask
        for raw_name, raw_value in raw_headers:
            name = raw_name.decode("latin-1").lower()
            if name not in HIDDEN_HEADERS and name not in headers:
                # a key sent in some other header is still a key: hooks log and tag these
                headers[name] = mask(raw_value.decode("latin-1"))
        adapter = loaded.adapter
        counter = None
        method = getattr(type(adapter), "count_prompt_tokens", None)
        # a raw prompt has no messages to count: hooks fall back to their approximation
        raw_prompt = isinstance(req, CompletionRequest)
        if not raw_prompt and method is not None and method is not BaseAdapter.count_prompt_tokens:
            counter = functools.partial(_count_tokens, adapter)
        return HookCall(
            request_id=ctx.request_id,
            backend=loaded.plan.backend.name,
            model=loaded.plan.served_model_name,
            preset=loaded.plan.preset,
            stream=bool(req.stream),
            headers=headers,
            counter=counter,
        )

    # --- entry points --------------------------------------------------------------------------

    async def open_run(
        self,
        body: bytes,
        content_type: str | None,
        ctx: RequestContext,
        raw_headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> Run:
        """Check a request and reserve its place: a `Run` whose `close()` the caller owes.

        Waits (bounded) while a load or swap is under way; `raw_headers` are what hooks see.
        """
        require_json_body(content_type, body)
        req = self.parse(body)
        return await self.reserve(req, functools.partial(self.build, req), ctx, raw_headers, Run)

    async def reserve(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        build: Callable[[LoadedModel, str], GenerationRequest],
        ctx: RequestContext,
        raw_headers: Iterable[tuple[bytes, bytes]],
        run_type: type[Run],
    ) -> Run:
        """Acquire the model, build the request, run the hooks, take a slot: a `Run` of `run_type`.

        Shared by every generating route (chat, completions): `build(loaded, request_id)` is the
        route's own checks against the loaded adapter.
        """
        # waits (bounded) while a load or swap is under way, instead of a 503
        loaded, ticket = await self.manager.acquire(ctx.request_id, req.model)
        chain: HookChain | None = None
        call: HookCall | None = None
        try:
            gen = build(loaded, ctx.request_id)
            if self.hooks is not None:
                chain = self.hooks.chain_for(loaded.plan.backend.name, loaded.plan.preset)
            if chain is not None:
                # the ticket holds the model while hooks run (an unload drains it first)
                call = self._hook_call(raw_headers, req, loaded, ctx)
                check = functools.partial(self.check_amended, loaded=loaded)
                gen = await chain.before_request(call, gen, check)
            slot = self.admission.reserve()
        except BaseException:
            self.manager.release(ticket)
            raise
        run = run_type(self, req, gen, loaded, ticket, slot, ctx, chain, call)
        ctx.ticket = ticket  # the stall watch cuts an aborted request's blocked send sooner
        return run

    async def handle(self, request: Request[Any, Any, Any], ctx: RequestContext) -> Any:
        """Serve one chat request through Litestar: a JSON response or an SSE stream.

        `service.datapath` serves the route without Litestar; this stays for mounts it skips.
        """
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


class Run:
    """One chat request from admission to its telemetry record; `close()` is idempotent."""

    def __init__(
        self,
        serving: ChatServing,
        req: ChatCompletionRequest | CompletionRequest,
        gen: GenerationRequest,
        loaded: LoadedModel,
        ticket: InflightTicket,
        slot: Slot,
        ctx: RequestContext,
        chain: HookChain | None = None,
        call: HookCall | None = None,
    ) -> None:
        self.serving = serving
        self.req = req
        self.gen = gen
        self.adapter = loaded.adapter
        # the message carries `reasoning_content` only when the backend produces reasoning
        self.with_reasoning = loaded.adapter.capabilities.reasoning
        self.engine_pids = loaded.info.engine_pids
        self.mem_mark: MemoryMark | None = None
        self.backend = loaded.plan.backend.name
        self.model = loaded.plan.served_model_name
        self.ticket = ticket
        self.slot = slot
        self.ctx = ctx
        self.timer = RequestTimer(ctx.t0, ctx.handler_at or time.perf_counter())
        self.completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        n = gen.sampling.n
        self.finish: list[str | None] = [None] * n
        # vLLM's `stop_reason` per choice, from the delta that finished it
        self.stop_reasons: list[str | int | None] = [None] * n
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.status = "cancelled"
        self.first_delta: TokenDelta | None = None
        self.last_delta: TokenDelta | None = None
        self._frames: AsyncIterator[bytes] | None = None
        self._closed = False
        self._record: RequestRecord | None = None
        self.preset = loaded.plan.preset
        self.chain = chain
        self.call = call
        self.error: ErrorDetail | None = None
        # the error `_fail` judged, with its status: the ASGI edge answers it as a plain JSON error
        # when it came before the stream's first frame (service.datapath.stream_response)
        self.failure: WrapperError | None = None
        self.tool_mode, self.tool_name = _tool_mode(req, gen)
        # vLLM's `get_chat_request_role`: with no generation prompt the model continues the
        # last turn, in that turn's role
        self.role: Role = (
            req.messages[-1].role
            if isinstance(req, ChatCompletionRequest) and not req.add_generation_prompt
            else "assistant"
        )
        self.auto_parser = _auto_parser(req, self.tool_mode, loaded.adapter)
        # text as sent, per choice: kept only when an after_response hook will read it
        self.sent: list[list[str]] | None = (
            [[] for _ in range(n)] if chain and chain.after else None
        )

    def attach(self, frames: AsyncIterator[bytes]) -> None:
        """Remember the stream so `close()` can finish it if the server abandons it."""
        self._frames = frames

    def _observe(self, delta: TokenDelta) -> None:
        self.completion_tokens += delta.token_count
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.finish_reason is not None:
            self.finish[delta.index] = delta.finish_reason
            self.stop_reasons[delta.index] = delta.stop_reason
        if self.first_delta is None:
            self.first_delta = delta
        self.last_delta = delta

    async def _start(self) -> AsyncGenerator[TokenDelta, None]:
        await self.slot.acquire()
        if self.ticket.aborted:  # unloaded (or stopping) while it queued: never reach the engine
            self._check_end()
        self.timer.admitted_at = time.perf_counter()
        meter = self.serving.meter
        if meter is not None:
            alone = self.serving.admission.running == 1
            self.mem_mark = meter.start(self.engine_pids, alone)
        stream: AsyncGenerator[TokenDelta, None] = self.adapter.generate(self.gen)
        chain = self.chain
        if chain is not None and (chain.chunk or chain.after):
            return self._hooked(stream, chain)
        return stream

    async def _hooked(
        self, stream: AsyncGenerator[TokenDelta, None], chain: HookChain
    ) -> AsyncGenerator[TokenDelta, None]:
        """The adapter's stream through the `on_chunk` hooks (and kept, for `after_response`)."""
        call = self.call
        assert call is not None  # noqa: S101  (a chain always comes with its call)
        on_chunk, on_end = chain.on_chunk, chain.on_chunk_end
        filtering = bool(chain.chunk)
        sent = self.sent
        try:
            async for delta in stream:
                text, reasoning, index = delta.text, delta.reasoning, delta.index
                if filtering:
                    if text:
                        text = on_chunk(call, index, "content", text)
                    if reasoning:
                        reasoning = on_chunk(call, index, "reasoning", reasoning)
                    if delta.finish_reason is not None:
                        text += on_end(call, index, "content")
                        reasoning += on_end(call, index, "reasoning")
                    if text != delta.text or reasoning != delta.reasoning:
                        delta = with_text(delta, text, reasoning)  # noqa: PLW2901
                if sent is not None and text:
                    sent[index].append(text)
                yield delta
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _check_end(self) -> None:
        """After the adapter's stream ended: was it cut short by unload or by the engine?"""
        if self.ticket.aborted and self.serving.admission.closing:
            raise shutting_down()
        if self.ticket.aborted or "abort" in self.finish:
            raise (
                _unloaded_error()
                if self.ticket.aborted
                else EngineError("the engine aborted the request", code="engine_abort")
            )
        if "error" in self.finish:
            raise EngineError("the engine failed while generating")
        if None in self.finish:
            raise EngineError("the engine ended the stream without a finish reason")

    def _fail(self, exc: BaseException) -> WrapperError:
        """The one place a failed generation is judged: status, dead engine, masked error."""
        self.status = "aborted" if self.ticket.aborted else "error"
        if isinstance(exc, EngineError) and exc.code == "engine_dead":
            self.serving.manager.engine_failed(exc.message)
        if isinstance(exc, WrapperError):
            exc.message = self.serving.secrets.mask(exc.message)
            err = exc
        else:
            logger.error("generation failed", exc_info=exc)
            err = EngineError(f"engine error: {sanitize_exception(exc, self.serving.secrets)}")
        self.error = ErrorDetail(err.message, err.error_type, err.param, err.code)
        self.failure = err
        return err

    def _memory(self) -> dict[str, Any]:
        meter, mark = self.serving.meter, self.mem_mark
        if meter is None or mark is None:
            return {}
        try:
            kv = self.adapter.stats().kv_cache_usage
        except Exception:
            kv = None
        return meter.finish(mark, self.engine_pids, kv)

    def _metrics(self) -> dict[str, Any]:
        """Build the request's record now (its status as it stands); the `metrics` object."""
        first, last = self.first_delta, self.last_delta
        extra = self._memory()
        call = self.call
        if call is not None:
            extra["hooks_ms"] = round(call.hooks_s * 1000, 3)
            extra["tags"] = call.tags
        self._record = build_record(
            self.timer,
            request_id=self.ctx.request_id,
            # a label and a stored field: masked like everything that leaves the request
            model=self.serving.secrets.mask(self.model),
            backend=self.backend,
            stream=self.req.stream,
            status=self.status,
            finish_reason=self.finish[-1] if self.finish else None,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            engine_queued_at=first.engine_queued_at if first else None,
            engine_scheduled_at=first.engine_scheduled_at if first else None,
            engine_first_token_at=first.engine_first_token_at if first else None,
            engine_last_token_at=last.engine_last_token_at if last else None,
            extra=extra,
        )
        return self._record.metrics()

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    # --- streaming -----------------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[bytes]:  # noqa: C901, PLR0912, PLR0915  (one stream)
        """The SSE body: token frames, finish chunks, optional usage chunk, `[DONE]`."""
        if self.tool_mode is not None:
            async for chunk in self._tool_frames():
                yield chunk
            return
        if self.auto_parser is not None:
            async for chunk in self._auto_frames(self.auto_parser):
                yield chunk
            return
        options = self.req.stream_options
        include_usage = bool(options and options.include_usage)
        # vLLM's rule: continuous usage only together with include_usage
        continuous = bool(include_usage and options and options.continuous_usage_stats)
        enc = ChunkEncoder(self.completion_id, self.created, self.model, include_usage, self.role)
        n = self.gen.sampling.n
        role_sent = [False] * n
        frame = self.timer.frame
        # the per-token path, bound once: one clock read and one append per frame (what
        # `RequestTimer.frame` does, without the call), the request's state updated inline
        stamp, clock = self.timer.stamps.append, time.perf_counter
        ctx = self.ctx
        observe = self._observe
        extended = continuous or self.gen.options.return_token_ids
        try:
            agen = await self._start()
            echo = self.echoed()
            try:
                text_frame = enc.text
                async for delta in agen:
                    if ctx.cut:  # the stall watch dropped the connection: nobody reads on
                        return
                    if echo:
                        # as vLLM: the echoed text first, one chunk per choice, at the engine's
                        # first output (not before: a refusal before it is still a plain error)
                        for i in range(n):
                            chunk = enc.delta(i, echo, role=True)
                            role_sent[i] = True
                            yield enc.with_usage(chunk, self._usage()) if continuous else chunk
                        echo = ""
                    text, reasoning = delta.text, delta.reasoning
                    index = delta.index
                    if extended:
                        observe(delta)
                        extra = self._extension_chunk(enc, delta, role_sent, continuous)
                        if extra:
                            frame()
                            yield extra
                        continue
                    if (
                        text
                        and role_sent[index]
                        and self.first_delta is not None  # role_sent early: echo's chunk
                        and not reasoning
                        and not delta.logprobs
                        and delta.finish_reason is None
                        and delta.prompt_tokens is None
                    ):
                        # the common frame: only the count and the last delta move (`_observe`)
                        self.completion_tokens += delta.token_count
                        self.last_delta = delta
                        chunk = text_frame(index, text)  # built in one go
                        stamp(clock())
                        yield chunk
                        continue
                    observe(delta)
                    # a first token without text (a special token, or text held back for a stop
                    # string) still sends the role chunk, as vLLM does: clients time TTFT on it
                    if (
                        text
                        or reasoning
                        or delta.logprobs
                        or (delta.token_count and not role_sent[index])
                    ):
                        chunk = enc.delta(
                            index,
                            text if text or not reasoning else None,
                            role=not role_sent[index],
                            reasoning=reasoning or None,
                            logprobs=_logprobs(delta) if delta.logprobs else None,
                        )
                        role_sent[index] = True
                        frame()
                        yield chunk
            finally:
                await shielded(agen.aclose())  # the engine's abort must run to its end
            self._check_end()
            self.status = "ok"
            metrics = self._metrics()
            for index in range(n):
                chunk = enc.finish(
                    index,
                    self.finish[index] or "stop",
                    role=not role_sent[index],
                    metrics=metrics if index == n - 1 and not include_usage else None,
                    stop_reason=self.stop_reasons[index],
                )
                yield enc.with_usage(chunk, self._usage()) if continuous else chunk
            if include_usage:
                yield enc.usage(self._usage(), metrics)
        except Exception as exc:
            err = self._fail(exc)
            yield error_event(ErrorDetail(err.message, err.error_type, err.param, err.code))
        yield DONE

    async def _tool_frames(self) -> AsyncIterator[bytes]:  # noqa: C901, PLR0912, PLR0915
        """The SSE body of a forced tool call (`required` or named), as vLLM streams it.

        Named: the call's id, type and name on the first delta, then the arguments as the engine
        makes them. Required: the answer is a JSON array of calls (a role delta goes first, at
        the first token); each call's id, type and name go out once its name is complete, then
        its arguments in pieces as they grow (`CallStream`), joining to the whole answer's.
        Text that never held a call (cut by max_tokens early) is sent as content.
        """
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        enc = ChunkEncoder(self.completion_id, self.created, self.model, include_usage, self.role)
        n = self.gen.sampling.n
        named = self.tool_mode == "named"
        texts: list[list[str]] = [[] for _ in range(n)]
        started = [False] * n
        ids = [call_id() for _ in range(n)]
        streams = [CallStream(args_key="parameters", start_tag=None) for _ in range(n)]
        call_ids: list[dict[int, str]] = [{} for _ in range(n)]
        frame = self.timer.frame
        try:
            agen = await self._start()
            try:
                async for delta in agen:
                    if self.ctx.cut:
                        return
                    self._observe(delta)
                    i = delta.index
                    if delta.text:
                        texts[i].append(delta.text)
                    if not named and not started[i] and delta.token_count:
                        started[i] = True
                        frame()
                        yield enc.delta(i, None, role=True)
                    if not named and delta.text:
                        events = streams[i].feed(delta.text)
                        for chunk in _call_chunks(enc, i, events, call_ids[i], None):
                            frame()
                            yield chunk
                    elif named and delta.text:
                        fn: dict[str, Any] = {"arguments": delta.text}
                        call: dict[str, Any] = {"index": 0, "function": fn}
                        if not started[i]:
                            call.update(id=ids[i], type="function")
                            fn["name"] = self.tool_name
                        frame()
                        yield enc.tool_calls(i, [call], role=not started[i])
                        started[i] = True
            finally:
                await shielded(agen.aclose())
            self._check_end()
            self.status = "ok"
            metrics = self._metrics()
            for i in range(n):
                reason = self.finish[i] or "stop"
                if not named:
                    calls = parse_output("".join(texts[i]), "required", None)
                    if calls:
                        for chunk in _settle_calls(enc, i, streams[i], calls, call_ids[i], None):
                            yield chunk
                        reason = "tool_calls" if reason == "stop" else reason
                    elif call_ids[i]:
                        # calls went out before the text broke off: they stay the answer
                        reason = "tool_calls" if reason == "stop" else reason
                    elif texts[i]:
                        yield enc.delta(i, "".join(texts[i]))
                yield enc.finish(
                    i,
                    reason,
                    role=not started[i],
                    metrics=metrics if i == n - 1 and not include_usage else None,
                    stop_reason=self.stop_reasons[i],
                )
            if include_usage:
                yield enc.usage(self._usage(), metrics)
        except Exception as exc:
            err = self._fail(exc)
            yield error_event(ErrorDetail(err.message, err.error_type, err.param, err.code))
        yield DONE

    async def _auto_frames(self, parser: ToolCallParser) -> AsyncIterator[bytes]:  # noqa: C901, PLR0912, PLR0915
        """The SSE body with `tool_choice: "auto"`: content until a call starts, then the calls.

        Text streams as content until the parser's start tag (`<tool_call>`) appears; a suffix
        that may begin that tag is held back. From the tag on, the calls are read as the text
        grows (`CallStream`), as vLLM's server streams them: each call's id, type and name once
        its name is complete, then its arguments in pieces. At the end the whole text is
        parsed as the whole answer is (vLLM's parser), and what the pieces lack is sent, so
        they join to the whole answer's calls. Text the parser cannot read, where no call went
        out, is sent as content.
        """
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        enc = ChunkEncoder(self.completion_id, self.created, self.model, include_usage, self.role)
        n = self.gen.sampling.n
        texts: list[list[str]] = [[] for _ in range(n)]
        # per choice, the text not yet sent as content: before the start tag at most a suffix
        # that may begin it, so the per-token work stays constant however long the answer
        pending = [""] * n
        sent = [0] * n  # characters of the text already sent as content
        held = [False] * n  # a call started: nothing more is sent before the end
        role_sent = [False] * n
        streams: list[CallStream | None] = [None] * n
        call_ids: list[dict[int, str]] = [{} for _ in range(n)]
        frame = self.timer.frame
        start = parser.start
        try:
            agen = await self._start()
            try:
                async for delta in agen:
                    if self.ctx.cut:
                        return
                    self._observe(delta)
                    i = delta.index
                    if delta.text:
                        texts[i].append(delta.text)
                    reader = streams[i]
                    if reader is not None:
                        events = reader.feed(delta.text) if delta.text else []
                        for chunk in _call_chunks(enc, i, events, call_ids[i], role_sent):
                            frame()
                            yield chunk
                        continue
                    tail = pending[i] + delta.text
                    at = tail.find(start)
                    if at >= 0:
                        held[i] = True
                        upto = at
                    else:
                        upto = len(tail) - tag_overlap(tail, start)
                    pending[i] = tail[upto:]
                    if upto or (delta.token_count and not role_sent[i]):
                        chunk = enc.delta(i, tail[:upto], role=not role_sent[i])
                        sent[i] += upto
                        role_sent[i] = True
                        frame()
                        yield chunk
                    if at >= 0:
                        reader = streams[i] = parser.stream()
                        events = reader.feed(tail[at:])
                        for chunk in _call_chunks(enc, i, events, call_ids[i], role_sent):
                            frame()
                            yield chunk
            finally:
                await shielded(agen.aclose())
            self._check_end()
            self.status = "ok"
            metrics = self._metrics()
            for i in range(n):
                reason = self.finish[i] or "stop"
                text = "".join(texts[i])
                parsed = parser.extract(text) if held[i] else None
                if parsed is not None:
                    calls = list(parsed.calls)
                    for chunk in _settle_calls(enc, i, streams[i], calls, call_ids[i], role_sent):
                        yield chunk
                    reason = "tool_calls" if reason == "stop" else reason
                elif call_ids[i]:
                    # calls went out before the text turned unreadable: they stay the answer
                    reason = "tool_calls" if reason == "stop" else reason
                elif len(text) > sent[i]:
                    yield enc.delta(i, text[sent[i] :], role=not role_sent[i])
                    role_sent[i] = True
                yield enc.finish(
                    i,
                    reason,
                    role=not role_sent[i],
                    metrics=metrics if i == n - 1 and not include_usage else None,
                )
            if include_usage:
                yield enc.usage(self._usage(), metrics)
        except Exception as exc:
            err = self._fail(exc)
            yield error_event(ErrorDetail(err.message, err.error_type, err.param, err.code))
        yield DONE

    def _extension_chunk(
        self, enc: ChunkEncoder, delta: TokenDelta, role_sent: list[bool], continuous: bool
    ) -> bytes | None:
        """The chunk of `delta` with vLLM's extras: usage so far, token ids; None if empty."""
        text, reasoning, index = delta.text, delta.reasoning, delta.index
        if not (
            text
            or reasoning
            or delta.logprobs
            or delta.token_ids
            or (delta.token_count and not role_sent[index])
        ):
            return None
        chunk = enc.delta(
            index,
            text if text or not reasoning else None,
            role=not role_sent[index],
            reasoning=reasoning or None,
            logprobs=_logprobs(delta) if delta.logprobs else None,
            token_ids=delta.token_ids if self.gen.options.return_token_ids else None,
        )
        role_sent[index] = True
        if delta.prompt_token_ids is not None and self.gen.options.return_token_ids:
            chunk = enc.with_prompt_token_ids(chunk, delta.prompt_token_ids)
        return enc.with_usage(chunk, self._usage()) if continuous else chunk

    def echoed(self) -> str:
        """The `echo` extension: the last message's text if the assistant's, else nothing."""
        req = self.req
        # a completions request echoes its prompt itself (CompletionRun), never through here
        if not isinstance(req, ChatCompletionRequest) or not req.echo:
            return ""
        last = req.messages[-1]
        if last.role != "assistant" or last.content is None:
            return ""
        if isinstance(last.content, str):
            return last.content
        return "\n".join(p.text for p in last.content if isinstance(p, TextPart))

    # --- non-streaming -------------------------------------------------------------------------

    async def _collect(self) -> ChatCompletion:
        n = self.gen.sampling.n
        texts: list[list[str]] = [[] for _ in range(n)]
        reasoning: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        token_ids: list[list[int]] = [[] for _ in range(n)]
        prompt_ids: list[int] | None = None
        prompt_lps: PromptLogprobs | None = None
        frame = self.timer.frame
        agen = await self._start()
        try:
            async for delta in agen:
                self._observe(delta)
                if delta.text or delta.reasoning or (delta.token_count and self.timer.frames == 0):
                    frame()
                    texts[delta.index].append(delta.text)
                    if delta.reasoning:
                        reasoning[delta.index].append(delta.reasoning)
                if delta.logprobs:
                    logprobs[delta.index].extend(_logprobs(delta)["content"])
                if delta.token_ids:
                    token_ids[delta.index].extend(delta.token_ids)
                if delta.prompt_token_ids is not None and prompt_ids is None:
                    prompt_ids = list(delta.prompt_token_ids)
                if delta.prompt_logprobs is not None and prompt_lps is None:
                    prompt_lps = prompt_logprobs_json(delta.prompt_logprobs)
        finally:
            await shielded(agen.aclose())
        self._check_end()
        self.status = "ok"
        metrics = self._metrics()
        with_reasoning = self.with_reasoning
        echo = self.echoed()
        want_ids = self.gen.options.return_token_ids
        choices = [
            Choice(
                index=i,
                message=AssistantMessage(
                    self.role,
                    # vLLM's reasoning parsers give no answer part as null, not ""
                    (echo + "".join(texts[i])) or (None if with_reasoning else ""),
                    "".join(reasoning[i]) or None,
                    with_reasoning,
                ),
                logprobs={"content": logprobs[i]} if self.req.logprobs else None,
                finish_reason=self.finish[i],
                token_ids=token_ids[i] if want_ids else None,
                stop_reason=self.stop_reasons[i],
            )
            for i in range(n)
        ]
        if self.tool_mode is not None:
            choices = [self._tool_choice(c) for c in choices]
        if self.auto_parser is not None:
            choices = [_auto_choice(self.auto_parser, c) for c in choices]
        usage = Usage(**self._usage())
        return ChatCompletion(
            self.completion_id,
            "chat.completion",
            self.created,
            self.model,
            choices,
            usage,
            metrics,
            prompt_token_ids=prompt_ids if want_ids else None,
            prompt_logprobs=prompt_lps,
        )

    def _tool_choice(self, choice: Choice) -> Choice:
        """A forced tool call's choice: its JSON as `tool_calls` (vLLM's shape and reasons)."""
        text = choice.message.content or ""
        calls = parse_output(text, self.tool_mode or "required", self.tool_name)
        if calls is None:  # cut before the JSON was complete: the text as it is, no calls
            return attrs.evolve(choice, message=attrs.evolve(choice.message, tool_calls=[]))
        message = attrs.evolve(choice.message, content="", tool_calls=wire_calls(calls))
        reason = choice.finish_reason
        # vLLM: "tool_calls" for required; a named function keeps the engine's reason
        if self.tool_mode == "required" and reason == "stop":
            reason = "tool_calls"
        return attrs.evolve(choice, message=message, finish_reason=reason)

    async def complete(self, receive: Receive) -> ChatCompletion:
        """Run to the end, unless the client goes away first (then stop the engine's work)."""
        work = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            # `cancel()` only asks: the work is cancelled (its engine request aborted) once it
            # has run its `finally`, so wait for that, shielded from our own cancellation
            with anyio.CancelScope(shield=True):
                await asyncio.wait({work, gone})
        client_gone = gone.done() and not gone.cancelled() and gone.exception() is None
        if work.cancelled() or client_gone:
            # the client is gone: whatever the work became, nobody reads it, and an exception
            # it ended with is the cancellation's doing, not an engine failure
            if not work.cancelled():
                work.exception()  # retrieved: never "exception was never retrieved"
            self.status = "cancelled"
            raise InvalidRequestError("client disconnected", code="client_disconnected")
        try:
            return work.result()
        except Exception as exc:
            raise self._fail(exc) from None

    # --- the end -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Release ticket and slot, record telemetry. Runs once, whatever happened."""
        if self._closed:
            return
        self._closed = True
        if self._frames is not None:
            with contextlib.suppress(Exception):
                await self._frames.aclose()  # type: ignore[attr-defined]
        self.slot.release()
        self.serving.manager.release(self.ticket)
        if self._record is None:  # ended before its metrics were built (error, disconnect)
            self._metrics()
        assert self._record is not None  # noqa: S101
        self.serving.telemetry.record(self._record, self.timer.gaps)
        if self.chain is not None and self.chain.after:
            self.chain.after_response(self._exchange(self._record))

    def _exchange(self, record: RequestRecord) -> Exchange:
        call = self.call
        return Exchange(
            request_id=self.ctx.request_id,
            backend=self.backend,
            model=self.model,
            preset=self.preset,
            stream=bool(self.req.stream),
            status=record.status,
            request=self.gen,
            completions=tuple("".join(parts) for parts in self.sent or ()),
            finish_reasons=tuple(self.finish),
            usage=self._usage(),
            metrics=record.metrics(),
            tags=dict(call.tags) if call is not None else {},
            error=self.error,
        )


def constraint_of(req: ChatCompletionRequest) -> tuple[StructuredOutput | None, tuple[Tool, ...]]:
    """The request's one decoding constraint (structured output or forced tool calls); its tools."""
    structured = structured_from_request(req.response_format, req.structured_outputs)
    plan = tools_from_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    if plan is None:
        return structured, ()
    if plan.structured is not None:
        if req.stream and req.logprobs:
            # the streamed tool_calls deltas carry no logprobs (nor do vLLM's)
            raise UnsupportedParameterError(
                "logprobs cannot be streamed with a forced tool call", param="logprobs"
            )
        if structured is not None:
            raise InvalidRequestError(
                "response_format/structured_outputs cannot be combined with tool_choice"
                " 'required' or a named function (both constrain the whole answer)",
                param="tool_choice",
            )
        structured = plan.structured
    return structured, plan.tools


def _auto_parser(
    req: ChatCompletionRequest | CompletionRequest, mode: ToolMode | None, adapter: Any
) -> ToolCallParser | None:
    """The adapter's tool parser when the request lets the model decide (`auto`)."""
    if (
        mode is not None
        or not isinstance(req, ChatCompletionRequest)
        or not req.tools
        or req.tool_choice not in (None, "auto")
    ):
        return None
    getter = getattr(adapter, "tool_parser", None)
    parser = getter() if callable(getter) else None
    return parser if isinstance(parser, ToolCallParser) else None


def _auto_choice(parser: ToolCallParser, choice: Choice) -> Choice:
    """An `auto` answer's calls as `tool_calls`, the text outside them as content (vLLM's)."""
    parsed = parser.extract(choice.message.content or "")
    if parsed is None:
        return choice
    message = attrs.evolve(
        choice.message, content=parsed.content, tool_calls=wire_calls(list(parsed.calls))
    )
    # vLLM's non-streamed rule: any parsed call makes the reason "tool_calls"
    return attrs.evolve(choice, message=message, finish_reason="tool_calls")


def _parser_options(req: ChatCompletionRequest, options: ChatOptions, adapter: Any) -> ChatOptions:
    """The options as the model's tool parser adjusts them (vLLM's `adjust_request`).

    Hermes keeps special tokens whenever tools are in play (some models mark `<tool_call>`
    special, and a skipped tag would hide the call from the parser); end tokens stay out of the
    text either way.
    """
    if not req.tools or req.tool_choice == "none":
        return options
    getter = getattr(adapter, "tool_parser", None)
    parser = getter() if callable(getter) else None
    if isinstance(parser, ToolCallParser) and parser.keeps_special_tokens:
        return attrs.evolve(options, skip_special_tokens=False)
    return options


def _call_chunks(
    enc: ChunkEncoder,
    index: int,
    events: list[tuple[int, str | None, str]],
    ids: dict[int, str],
    role_sent: list[bool] | None,
) -> list[bytes]:
    """`tool_calls` chunks of a `CallStream`'s events, one call delta each, as vLLM sends them.

    A call's first delta has its index, id, type, name and the arguments read so far; later
    ones the index and the new arguments. `role_sent`: the role goes on the first chunk.
    """
    chunks = []
    for k, name, arguments in events:
        call: dict[str, Any]
        if name is not None:
            ids[k] = call_id()
            call = {"index": k, "id": ids[k], "type": "function",
                    "function": {"name": name, "arguments": arguments}}  # fmt: skip
        else:
            call = {"index": k, "function": {"arguments": arguments}}
        role = role_sent is not None and not role_sent[index]
        chunks.append(enc.tool_calls(index, [call], role=role))
        if role_sent is not None:
            role_sent[index] = True
    return chunks


def _settle_calls(
    enc: ChunkEncoder,
    index: int,
    reader: CallStream | None,
    calls: list[ToolCall],
    ids: dict[int, str],
    role_sent: list[bool] | None,
) -> list[bytes]:
    """What the streamed calls lack of the whole text's `calls`: the rest, or whole calls.

    The pieces a call streamed are a prefix of its whole arguments (`CallStream`); a call the
    stream never named goes out whole. Where the two part (arguments that repeat a key), the
    streamed call is complete JSON already and stays as it is.
    """
    events: list[tuple[int, str | None, str]] = []
    whole = []
    for k, call in enumerate(calls):
        streamed = reader.calls[k] if reader is not None and k < len(reader.calls) else None
        if streamed is None or k not in ids:
            whole.append((k, call))
            continue
        done = streamed.arguments
        if call.arguments.startswith(done) and len(call.arguments) > len(done):
            events.append((k, None, call.arguments[len(done) :]))
    chunks = _call_chunks(enc, index, events, ids, role_sent)
    for k, call in whole:
        ids[k] = call.id
        wire = {"index": k, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}  # fmt: skip
        role = role_sent is not None and not role_sent[index]
        chunks.append(enc.tool_calls(index, [wire], role=role))
        if role_sent is not None:
            role_sent[index] = True
    return chunks


def check_auto_stream(req: ChatCompletionRequest, caps: Capabilities) -> None:
    """Fields a streamed `auto` answer cannot carry (its calls are parsed from the whole text)."""
    if not (
        req.stream
        and req.tools
        and req.tool_choice in (None, "auto")
        and "tool_choice.auto" in caps.features
    ):
        return
    options = req.stream_options
    for param, used in (
        ("logprobs", bool(req.logprobs)),
        ("return_token_ids", bool(req.return_token_ids)),
        ("echo", bool(req.echo)),
        ("stream_options.continuous_usage_stats", bool(options and options.continuous_usage_stats)),
    ):
        if used:
            raise UnsupportedParameterError(
                f"{param} cannot be streamed with tool_choice 'auto' (the answer is parsed for"
                " tool calls as a whole)",
                param=param,
            )


def _tool_mode(
    req: ChatCompletionRequest | CompletionRequest, gen: GenerationRequest
) -> tuple[ToolMode | None, str]:
    """Whether the answer is a forced tool call (its constraint came from `tool_choice`)."""
    if (
        not isinstance(req, ChatCompletionRequest)
        or gen.structured is None
        or gen.structured.param != "tool_choice"
    ):
        return None, ""
    if req.tool_choice == "required":
        return "required", ""
    return "named", str(req.tool_choice["function"]["name"])


def check_tool_features(req: ChatCompletionRequest, caps: Capabilities, backend: str) -> None:
    """Tool fields the backend cannot honour, refused by name with what does work."""
    features = caps.features
    if (
        req.tools
        and req.tool_choice in (None, "auto")
        and "tools" in features  # else `tools` itself is refused by name
        and "tool_choice.auto" not in features
    ):
        works = [
            f"'{name}'"
            for name, feature in (("required", "tool_choice.required"),
                                  ("a named function", "tool_choice.named"))
            if feature in features
        ]  # fmt: skip
        hint = f"; {' and '.join(works)} work (enforced by structured output)" if works else ""
        raise UnsupportedParameterError(
            f"tool_choice 'auto' (the default with tools) needs a tool parser, and backend"
            f" '{backend}' has none configured{hint}",
            param="tool_choice",
        )
    if "tools" not in features:
        for i, m in enumerate(req.messages):
            if m.tool_calls is not None or m.tool_call_id is not None:
                param = (
                    f"messages[{i}].{'tool_calls' if m.tool_calls is not None else 'tool_call_id'}"
                )
                raise UnsupportedParameterError(
                    f"{param}: tool calls are not supported by backend '{backend}'", param=param
                )


#: most `logit_bias` entries one request may give (OpenAI's documented limit is 300)
MAX_LOGIT_BIAS = 300


def parse_logit_bias(value: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; 400 naming `logit_bias` when it is malformed.

    Keys are token ids as strings (OpenAI's form); biases lie in [-100, 100] as OpenAI documents
    them (vLLM clamps larger ones silently; a refusal says so instead). The adapter checks the
    ids against the model's vocabulary.
    """
    if not value:
        return ()
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"logit_bias: at most {MAX_LOGIT_BIAS} entries", param="logit_bias"
        )
    out: list[tuple[int, float]] = []
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise InvalidRequestError(
                "logit_bias keys must be token ids (non-negative integers as strings)",
                param="logit_bias",
            )
        if not -100 <= bias <= 100:
            raise InvalidRequestError(
                "logit_bias values must lie between -100 and 100", param="logit_bias"
            )
        out.append((int(key), float(bias)))
    return tuple(out)


def chat_options(req: ChatCompletionRequest, prompt_logprobs: bool = False) -> ChatOptions:
    """The chat-template extensions of `req` (features already checked); 400 when refused.

    `prompt_logprobs`: the backend computes them, so a whole `echo` answer carries the prompt's
    logprobs unasked, with `top_logprobs` alternatives, as vLLM's chat server does
    (`ChatCompletionRequest.to_sampling_params`: echo without prompt_logprobs takes
    top_logprobs, default 0).
    """
    if req.prompt_logprobs and req.stream:
        # vLLM's own rule and wording: prompt logprobs come with whole responses only
        raise InvalidRequestError(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    if req.continue_final_message and req.add_generation_prompt:
        # vLLM's own rule and wording (ChatCompletionRequest.check_generation_prompt)
        raise InvalidRequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    return ChatOptions(
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=check_template_kwargs(req.chat_template_kwargs),
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        return_token_ids=bool(req.return_token_ids),
        prompt_logprobs=(
            req.top_logprobs or 0
            if req.prompt_logprobs is None and req.echo and prompt_logprobs and not req.stream
            else req.prompt_logprobs
        ),
        echo=req.echo,
    )


def _parts(message: ChatMessageIn) -> tuple[tuple[Literal["text", "image_url"], str], ...]:
    """A message's text and image parts in order, for a backend that takes images."""
    out: list[tuple[Literal["text", "image_url"], str]] = []
    for p in message.content or ():
        if isinstance(p, TextPart):
            out.append(("text", p.text))
        elif isinstance(p, ImagePart):
            out.append(("image_url", p.image_url.url))
    return tuple(out)


def with_text(delta: TokenDelta, text: str, reasoning: str) -> TokenDelta:
    """`delta` with other text: positional, 3x cheaper than `attrs.evolve` on the token path.

    Every field is passed on; tests/unit/test_hooks_contract.py checks that against
    `attrs.fields(TokenDelta)`, so a new field cannot be dropped silently.
    """
    d = delta
    return TokenDelta(
        text,
        d.token_count,
        d.index,
        d.finish_reason,
        d.prompt_tokens,
        reasoning,
        d.logprobs,
        d.engine_queued_at,
        d.engine_scheduled_at,
        d.engine_first_token_at,
        d.engine_last_token_at,
        d.stop_reason,
        d.token_ids,
        d.prompt_token_ids,
        d.prompt_logprobs,
    )


#: roles a hook's amended messages may use
_ROLES = frozenset(get_args(Role))


async def _count_tokens(adapter: Any, messages: Sequence[Message]) -> int | None:
    """The adapter's tokenizer count, in a worker thread (tokenising can take milliseconds)."""
    try:
        count: int | None = await asyncio.to_thread(adapter.count_prompt_tokens, messages)
    except WrapperError:
        raise  # e.g. the chat template refused the messages: a 400 like generate would give
    except Exception:
        logger.warning("counting prompt tokens failed; hooks fall back to approximation")
        return None
    return count


async def _disconnected(receive: Receive) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _logprobs(delta: TokenDelta) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.bytes) if lp.bytes is not None else None,
                "top_logprobs": [
                    {"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in lp.top
                ],
            }
            for lp in delta.logprobs or ()
        ]
    }
