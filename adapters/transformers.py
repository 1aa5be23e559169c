"""The HuggingFace transformers adapter: one in-process model, `model.generate` per request.

Each generation runs `generate` in a worker of the kit's `ThreadBridge` (`max_concurrency` slots;
more requests wait in order; cancel flag, join on close, abort on unload), its `n` choices in turn
(`each_choice`). One object per request rides along as a stopping criterion: after every new
token it detokenises incrementally, matches stop strings, emits the text as a `TokenDelta` through
the bridge and says "stop" when a stop string, an end token or the cancel flag says so, all
within the same decoding step. Sampling is done by our own last logits processor with a
`torch.Generator` per request, so a seed repeats its text even while other requests sample
concurrently (torch's global generator is shared by every thread); `generate` itself runs greedy
over the one token that processor leaves.

Must never: import torch or transformers at module level; let a consumer that went away keep a
generation running past the next token; show a path, traceback or token in a request's error
message (a failed load's root cause, paths included, goes to the admin-only load response);
write to `os.environ` (hub credentials such as HF_TOKEN are put there by the registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from attrs import field, frozen

from adapters.base import (
    AdapterContext,
    BaseAdapter,
    Capabilities,
    EngineStats,
    LoadInfo,
    parse_model_ref,
)
from adapters.bundled import check_model_source, resolve_model_source
from adapters.kit.context import fit_max_tokens
from adapters.kit.errors import clean_error_text
from adapters.kit.models import check_reachable
from adapters.kit.threads import (
    BridgeClosedError,
    Emit,
    Job,
    ThreadBridge,
    each_choice,
    stream_deltas,
)
from adapters.kit.tokens import TokenOps, template_variables
from adapters.text import StopMatcher
from adapters.tool_parsing import ToolCallParser, check_parser_name, parsers_available
from schemas.errors import (
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    RateLimitError,
    ServiceUnavailableError,
    UnsupportedParameterError,
    WrapperError,
)
from schemas.features import (
    FORCED_TOOLS,
    STRUCTURED_OUTPUT,
    TEMPLATE_SWITCHES,
    TOKENIZER_ROUTES,
)
from schemas.generation import (
    FinishReason,
    GenerationRequest,
    Message,
    SamplingOptions,
    StructuredOutput,
    TokenDelta,
    TokenLogprob,
)
from schemas.structured import choice_grammar
from schemas.tools import template_message, template_tools
from schemas.validators import FieldValueError, in_range

if TYPE_CHECKING:
    from types import ModuleType

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")
#: prompt tokens fed to the detokeniser ahead of the output, so the first word gets its space
_DETOK_CONTEXT = 5
_WARMUP_TOKENS = 2


def _device_spec(_: Any, attribute: Any, value: str) -> None:
    if not _DEVICE.fullmatch(value):
        raise FieldValueError(attribute.name, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


@frozen
class TransformersParams:
    """Engine params of the transformers backend."""

    dtype: Dtype = "auto"
    """Weight and compute dtype; `auto` is float32 on CPU and bfloat16 on CUDA."""
    device: str = field(default="auto", validator=_device_spec)
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    max_model_len: int = field(default=2048, validator=in_range(16, 524_288))
    """Prompt plus completion tokens one request may use; longer prompts are refused (400)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model; refused unless adapters.yaml allows it."""
    attn_implementation: AttnImplementation | None = None
    """Attention kernel; unset lets transformers choose (sdpa where the model supports it)."""
    max_concurrency: int = field(default=1, validator=in_range(1, 64))
    """Generations that run at once, each in its own thread; further requests wait in order."""
    torch_threads: int | None = field(default=None, validator=in_range(1, 1024))
    """CPU threads torch uses per operation; unset keeps torch's default (all cores)."""
    tool_call_parser: str | None = field(default=None, validator=check_parser_name)
    """vLLM's tool parser for the model's format (`hermes`): enables `tool_choice: "auto"`."""
    grammar_compile_timeout_s: float = field(default=10.0, validator=in_range(0.01, 600))
    """Longest a request waits for xgrammar to compile its `response_format`/`structured_outputs`
    constraint; past it the request is a 400 naming the field (xgrammar cannot stop a compile:
    it finishes in the background, at most two at once)."""


_SAMPLING = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "min_tokens",
        "repetition_penalty",
        "n",
        "logprobs",
        "top_logprobs",
    }
)
_log = logging.getLogger(__name__)

#: catalogued features (schemas/features.py) this backend honours; forced tool calls are
#: structured output, `auto` would need a tool parser
_FEATURES = (
    TOKENIZER_ROUTES
    | STRUCTURED_OUTPUT
    | FORCED_TOOLS
    | TEMPLATE_SWITCHES
    | {"logit_bias", "stream_options.continuous_usage_stats"}
)
#: choices of one request, generated one after the other in the request's slot
_MAX_N = 8
#: alternatives per token, as OpenAI bounds `top_logprobs`
_MAX_TOP_LOGPROBS = 20


# --- per-request plan and the pieces that run inside `generate` ---------------------------------


@frozen
class _Plan:
    """A request turned into what the worker thread needs; built before it waits for a slot."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    min_tokens: int
    temperature: float
    """0 means greedy."""
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    grammar: Any = None
    """The request's compiled xgrammar grammar (structured output), or None."""
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    echo: bool = False
    """The first delta carries the prompt's ids (a streamed completions echo sends them)."""


#: xgrammar's C++ log prefix (`[16:11:49] /project/cpp/grammar_functor.cc:3567: `)
_CPP_PREFIX = re.compile(r"^\[[\d:.]+\]\s*\S+:\d+:\s*")


def _compiler_reason(exc: BaseException) -> str:
    """The reason xgrammar gives (first line, no build paths); an internal check is named so."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if _CPP_PREFIX.match(line):
        # a C++ assertion inside the compiler, not a reason the client can act on
        return "the grammar compiler rejected it (an internal check failed)"
    return clean_error_text(line, limit=200)


class _StepHook:
    """Stopping criterion called by `generate` after each new token (see module docstring).

    It must not have an `eos_token_id` attribute: transformers would take it for its own EOS
    criterion and start padding.
    """

    def __init__(
        self, engine: _Engine, plan: _Plan, job: Job, emit: Emit[TokenDelta], index: int = 0
    ) -> None:
        self.engine = engine
        self.index = index
        self.recorder: _LogprobRecorder | None = None
        """Set by `_generate` when the request asks for logprobs."""
        self.lps: list[TokenLogprob] = []
        """Logprobs of the tokens produced since the last emitted piece."""
        self.pending_ids: list[int] = []
        """Ids of the tokens produced since the last emitted piece (return_token_ids)."""
        self.plan = plan
        self.job = job
        self.emit = emit
        self.end_ids = plan.stop_token_ids | (frozenset() if plan.ignore_eos else engine.eos_ids)
        self.stops = StopMatcher(plan.stop)
        self.ids = list(plan.prompt_ids[-_DETOK_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.generated = 0
        self.pending = 0
        """Tokens produced since the last emitted piece (their text may still be held back)."""
        self.first_at: float | None = None
        self.emitted = False
        """Whether a text delta went out (the request's first one carries `first_at`)."""
        self.last_at: float | None = None
        self.ended_by: int | None = None
        self.stop_string: str | None = None
        self.longest_stop = max((len(x) for x in plan.stop), default=0)
        self.recent = ""
        """The last text fed to the stop matcher, to tell which stop string completed."""
        self.constraint = _Constraint(engine, plan.grammar) if plan.grammar is not None else None

    def __call__(self, input_ids: Any, _scores: Any, **_: Any) -> Any:
        token = int(input_ids[0, -1])
        self.last_at = time.perf_counter()
        self.generated += 1
        self.pending += 1
        if self.first_at is None:
            self.first_at = self.last_at
        if self.recorder is not None:
            self.lps.append(self.recorder.entry(token, self.plan.top_logprobs))
        if self.plan.return_token_ids:
            self.pending_ids.append(token)
        stop = self.job.cancelled
        if token in self.end_ids:
            # `_MinTokens` masked these until min_tokens: reaching one here ends the choice
            self.ended_by = token
            stop = True
        elif self.constraint is not None and self.constraint.accept(token):
            # the grammar is complete (it accepted an end token that ignore_eos let through)
            self.ended_by = token
            stop = True
        else:
            piece = self._detokenise(token)
            if piece:
                stop = self._emit(piece) or stop
        torch = self.engine.torch
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def _emit(self, piece: str) -> bool:
        """Pass `piece` through the stop matcher and out; True when a stop string completed."""
        # like vLLM, stop strings count only once min_tokens tokens exist
        if self.plan.stop and self.generated >= self.plan.min_tokens:
            window = self.recent + piece
            piece = self.stops.feed(piece)
            if self.stops.stopped:
                # the matcher keeps the earliest hit; any hit must end inside this piece
                hits = [(window.find(s), s) for s in self.plan.stop if s and s in window]
                self.stop_string = min(hits)[1] if hits else None
            else:
                self.recent = window[-self.longest_stop :]
        if piece:
            # choices run in turn: the request's first text delta is choice 0's first
            first = not self.emitted and self.index == 0
            self.emit(
                TokenDelta(
                    piece,
                    self.pending,
                    self.index,
                    logprobs=tuple(self.lps) or None,
                    engine_first_token_at=self.first_at if first else None,
                    token_ids=tuple(self.pending_ids) if self.plan.return_token_ids else None,
                )
            )
            self.emitted = True
            self.pending = 0
            self.lps.clear()
            self.pending_ids = []
        return self.stops.stopped

    def _detokenise(self, token: int) -> str:
        """Incremental detokenisation as vLLM does it: decode a short window, emit what it added."""
        self.ids.append(token)
        prefix, full = self._window()
        # a trailing U+FFFD is half of a multi-byte character: wait for the rest of it
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def _window(self) -> tuple[str, str]:
        decode = self.engine.tokenizer.decode
        skip = self.plan.skip_special_tokens
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        return prefix, full

    def final(self) -> TokenDelta:
        """The choice's last delta: how it ended, with whatever text was still held back."""
        tail = ""
        if not self.stops.stopped:
            prefix, full = self._window()
            rest = full[len(prefix) :] if len(full) > len(prefix) else ""
            if rest:
                self._emit(rest)
            tail = self.stops.flush()
        finish: FinishReason
        stop_reason: str | int | None = None
        if self.stops.stopped:
            finish, stop_reason = "stop", self.stop_string
        elif self.ended_by is not None:
            finish = "stop"
            stop_reason = self.ended_by if self.ended_by in self.plan.stop_token_ids else None
        elif self.job.cancelled:
            finish = "abort"
        else:
            finish = "length"
        return TokenDelta(
            tail,
            self.pending,
            self.index,
            finish_reason=finish,
            logprobs=tuple(self.lps) if self.plan.logprobs else None,
            engine_last_token_at=self.last_at,
            stop_reason=stop_reason,
            token_ids=tuple(self.pending_ids) if self.plan.return_token_ids else None,
        )


class _Constraint:
    """Structured output on transformers: xgrammar's matcher masks the logits at every step.

    xgrammar rather than llguidance or outlines: it comes with vLLM already (the same engine, so
    both backends accept the same grammars), compiles JSON Schema, regex and EBNF, and runs on
    CPU. xgrammar's own `contrib.hf.LogitsProcessor` is not used: it asserts on every accepted
    token and leaves a stale mask after the grammar ends; here `_StepHook` feeds the matcher the
    token it just chose, in the same step, and ends the choice when the grammar is complete.
    """

    def __init__(self, engine: _Engine, compiled: Any) -> None:
        xgr = engine.xgr
        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if scores.device.type == "cpu":
            self.xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        else:
            self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
        return scores

    def accept(self, token: int) -> bool:
        """Advance the grammar by the chosen token; True when the grammar has ended."""
        if not self.matcher.accept_token(token):
            # the mask allowed only grammar tokens: this cannot happen unless a later processor
            # brought a masked token back; end here rather than emit text outside the grammar
            return True
        return bool(self.matcher.is_terminated())


class _Grammars:
    """xgrammar's compiler for the loaded tokenizer: its cache bounded, each compile timed.

    xgrammar cannot interrupt a compile, so the bound is on the request, not the work: the
    compile runs in a small pool of its own and the request waits at most
    `grammar_compile_timeout_s` for it (a 400 naming the field past that); a compile that runs
    over goes on in its pool thread (its result lands in the cache) and no request waits for it.
    The pool's size bounds how many such compiles can hold a core; a request that finds every
    compile thread taken for its whole bound is a 429 (the client's constraint was never tried).
    """

    #: compiled grammars kept (xgrammar's cache evicts the least recently used past this)
    CACHE_BYTES = 64 * 1024 * 1024
    #: compiles that run at once (xgrammar releases the GIL while it compiles)
    THREADS = 2

    def __init__(self, compiler: Any, timeout_s: float) -> None:
        self.compiler = compiler
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=self.THREADS, thread_name_prefix="iw-grammar")

    @classmethod
    def build(cls, engine: _Engine) -> _Grammars:
        """The compiler for the engine's tokenizer (the engine imported xgrammar already)."""
        xgr = engine.xgr
        info = xgr.TokenizerInfo.from_huggingface(
            engine.tokenizer,
            vocab_size=int(engine.model.config.vocab_size),
            stop_token_ids=sorted(engine.eos_ids),
        )
        compiler = xgr.GrammarCompiler(
            info, max_threads=1, cache_enabled=True, cache_limit_bytes=cls.CACHE_BYTES
        )
        return cls(compiler, engine.params.grammar_compile_timeout_s)

    def compile(self, structured: StructuredOutput) -> Any:
        """The compiled grammar of `structured`, or a 400 naming its field.

        400 when xgrammar refuses it or does not finish within the bound; 429 when no compile
        thread came free within the bound.
        """
        started: list[float] = []

        def run() -> Any:
            started.append(time.monotonic())
            return self._compile(structured)

        future = self.pool.submit(run)
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:  # concurrent.futures' (the builtin since 3.11)
            if future.cancel():
                raise RateLimitError(
                    "every grammar compile thread is busy; retry shortly",
                    param=structured.param,
                    code="grammar_compiler_busy",
                    headers={"Retry-After": "1"},
                ) from None
        # it began while we waited: its own bound counts from its start (which `run` may not
        # have recorded yet if it began this instant)
        began = started[0] if started else time.monotonic()
        left = began + self.timeout_s - time.monotonic()
        try:
            return future.result(timeout=max(left, 0.0))
        except TimeoutError:  # concurrent.futures' (the builtin since 3.11)
            raise InvalidRequestError(
                f"the {structured.kind} constraint did not compile within "
                f"{self.timeout_s:g} s (grammar_compile_timeout_s); simplify it",
                param=structured.param,
                code="grammar_compile_timeout",
            ) from None

    def _compile(self, structured: StructuredOutput) -> Any:
        kind, spec = structured.kind, structured.spec
        compiler = self.compiler
        try:
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}')
            if kind == "choice":
                assert isinstance(spec, tuple)  # noqa: S101  (the service builds it so)
                return compiler.compile_grammar(choice_grammar(spec))
            assert isinstance(spec, str)  # noqa: S101
            if kind == "json":
                return compiler.compile_json_schema(spec)
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_grammar(spec)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(
                f"the {kind} constraint does not compile: {_compiler_reason(exc)}",
                param=structured.param,
                code="invalid_constraint",
            ) from None

    def close(self) -> None:
        """Let the pool's threads end once their compile returns (unload; nothing waits)."""
        self.pool.shutdown(wait=False, cancel_futures=True)


class _MinTokens:
    """Masks end tokens until `min_tokens` tokens exist (what vLLM's `min_tokens` does)."""

    def __init__(self, prompt_len: int, min_tokens: int, end_ids: Any) -> None:
        self.prompt_len = prompt_len
        self.min_tokens = min_tokens
        self.end_ids = end_ids

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[1] - self.prompt_len < self.min_tokens:
            scores[:, self.end_ids] = float("-inf")
        return scores


class _LogprobRecorder:
    """First processor: keeps the log-softmax of the model's raw logits for the step.

    vLLM's default `logprobs_mode` is `raw_logprobs`: log-probabilities before penalties,
    logit_bias, temperature and top-k/p; this matches it. The step hook reads `entry()` once
    the token of that step is known.
    """

    def __init__(self, torch: Any, tokenizer: Any) -> None:
        self.torch = torch
        self.tokenizer = tokenizer
        self.last: Any = None

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        self.last = self.torch.log_softmax(scores[0].float(), dim=-1)
        return scores

    def entry(self, token: int, top_n: int) -> TokenLogprob:
        """The sampled token's logprob and the `top_n` best of the step (vLLM's shape)."""
        row = self.last
        text = self._text(token)
        top: tuple[tuple[str, float], ...] = ()
        if top_n:
            values, ids = self.torch.topk(row, top_n)
            top = tuple(
                (self._text(int(i)), _clamp_logprob(float(v)))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            )
        return TokenLogprob(
            token=text,
            logprob=_clamp_logprob(float(row[token])),
            bytes=tuple(text.encode("utf-8", errors="replace")),
            top=top,
        )

    def _text(self, token: int) -> str:
        # as vLLM's logprobs detokenise one id at a time (special tokens kept)
        return str(self.tokenizer.decode([token]))


def _clamp_logprob(value: float) -> float:
    """-inf is no JSON number: vLLM's server sends -9999.0 in its place."""
    return max(value, -9999.0)


class _LogitBias:
    """Adds the request's `logit_bias` to its tokens' logits (before any sampling warper)."""

    def __init__(self, torch: Any, bias: tuple[tuple[int, float], ...], device: Any) -> None:
        self.ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device)
        self.values = torch.tensor([b for _, b in bias], dtype=torch.float32, device=device)

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class _SeededSampler:
    """Samples one token with this request's generator and leaves only it for greedy `generate`."""

    def __init__(self, torch: Any, generator: Any) -> None:
        self.torch = torch
        self.generator = generator

    def __call__(self, _input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        probs = torch.softmax(scores, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice, 0.0)


# --- the loaded engine --------------------------------------------------------------------------


class _Engine:
    """Everything one load built; dropped as a whole by `unload()`."""

    def __init__(
        self, torch: ModuleType, transformers: ModuleType, params: TransformersParams
    ) -> None:
        self.torch: Any = torch
        self.tf: Any = transformers
        self.params = params
        self.tool_parser: ToolCallParser | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: Any = None
        self.eos_ids: frozenset[int] = frozenset()
        self.pad_id = 0
        self.sampling_defaults: dict[str, float] = {}
        self.template_errors: tuple[type[Exception], ...] = (ValueError, TypeError)
        self.template_vars: frozenset[str] = frozenset()
        """What the model's chat template reads: the only `chat_template_kwargs` passed on."""
        self.previous_threads: int | None = None
        self.xgr: Any = None
        self.grammars: _Grammars | None = None
        self.grammars_lock = threading.Lock()

    def grammar(self, structured: StructuredOutput) -> Any:
        """Compile `structured` for this tokenizer (the compiler is built on first use)."""
        with self.grammars_lock:
            if self.grammars is None:
                import xgrammar  # noqa: PLC0415  (imports torch: only once a request needs it)

                self.xgr = xgrammar
                self.grammars = _Grammars.build(self)
        return self.grammars.compile(structured)

    # -- building (load thread) --

    def encode(self, req: GenerationRequest) -> tuple[int, ...]:
        """Chat template + tokenisation; template refusals become 400s.

        A raw prompt (`/v1/completions`) skips the template: text is tokenised with the
        tokenizer's special tokens (BOS), as vLLM's completions server does; token ids are
        checked against the model's vocabulary and run as given.
        """
        if isinstance(req.prompt, str):
            return tuple(int(i) for i in self.tokenizer.encode(req.prompt))
        if req.prompt is not None:
            vocab = int(self.model.config.vocab_size)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise InvalidRequestError(
                    f"prompt token ids must lie between 0 and {vocab - 1}", param="prompt"
                )
            return req.prompt
        conversation = [
            # templates know system/user/assistant/tool; OpenAI's developer role is a system turn
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            if not (m.tool_calls or m.tool_call_id)
            else template_message(m, arguments_as_objects=True)
            for m in req.messages
        ]
        options = req.options
        try:
            # as vLLM's server: the request's template variables, then its own two switches
            text = self.tokenizer.apply_chat_template(
                conversation,
                tools=template_tools(req.tools),
                **{k: v for k, v in options.chat_template_kwargs if k in self.template_vars},
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                tokenize=False,
            )
        except self.template_errors as exc:
            # jinja's raise_exception() in a template: its text is the template author's message
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise InvalidRequestError(
                f"the model's chat template refused the messages: {detail}", param="messages"
            ) from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return tuple(int(i) for i in ids)

    def plan(self, req: GenerationRequest) -> _Plan:
        """Check the request against the model and turn it into a `_Plan` (runs in a thread)."""
        s = req.sampling
        prompt = self.encode(req)
        # the one context rule (adapters/kit/context.py): a 400, or the room left when the
        # request set no max_tokens
        max_tokens = fit_max_tokens(len(prompt), s, self.params.max_model_len)
        vocab = int(self.model.config.vocab_size)
        bad = [t for t in s.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids must lie between 0 and {vocab - 1}", param="stop_token_ids"
            )
        bad_bias = [t for t, _ in s.logit_bias if not 0 <= t < vocab]
        if bad_bias:
            raise InvalidRequestError(
                f"logit_bias token ids must lie between 0 and {vocab - 1}", param="logit_bias"
            )
        if s.repetition_penalty is not None and s.repetition_penalty <= 0:
            raise InvalidRequestError(
                "repetition_penalty must be greater than 0", param="repetition_penalty"
            )
        grammar = None
        if req.structured is not None:
            if s.min_tokens:
                # masking end tokens could leave a finished grammar no token at all
                raise UnsupportedParameterError(
                    "min_tokens cannot be combined with structured output on this backend",
                    param="min_tokens",
                )
            grammar = self.grammar(req.structured)
        defaults = self.sampling_defaults
        temperature = s.temperature if s.temperature is not None else defaults.get("temperature")
        top_k = s.top_k if s.top_k is not None else defaults.get("top_k")
        return _Plan(
            prompt_ids=prompt,
            max_tokens=max_tokens,
            min_tokens=min(s.min_tokens, max_tokens),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=_float(s.top_p if s.top_p is not None else defaults.get("top_p")),
            # vLLM's "-1 (or 0) means no top-k"
            top_k=int(top_k) if top_k is not None and top_k > 0 else None,
            min_p=_float(s.min_p if s.min_p is not None else defaults.get("min_p")),
            repetition_penalty=_float(
                s.repetition_penalty
                if s.repetition_penalty is not None
                else defaults.get("repetition_penalty")
            ),
            seed=s.seed,
            stop=s.stop,
            stop_token_ids=frozenset(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            grammar=grammar,
            n=s.n,
            logprobs=s.logprobs,
            top_logprobs=s.top_logprobs or 0,
            logit_bias=s.logit_bias,
            skip_special_tokens=req.options.skip_special_tokens,
            return_token_ids=req.options.return_token_ids,
            echo=req.options.echo,
        )

    # -- generating (worker thread) --

    def run(self, plan: _Plan, job: Job, emit: Emit[TokenDelta], index: int = 0) -> TokenDelta:
        """Run `generate` for one choice of a request; its final delta.

        Raises `EngineError` with a message that shows no engine text when the engine fails.
        """
        hook = _StepHook(self, plan, job, emit, index)
        try:
            if self.params.torch_threads is not None:
                # the intra-op thread count is per OS thread for OpenMP: set it where we compute
                self.torch.set_num_threads(self.params.torch_threads)
            self._generate(plan, hook)
            return hook.final()
        except Exception as exc:
            raise EngineError(_engine_failure(exc)) from None

    def run_all(self, plan: _Plan, job: Job, emit: Emit[TokenDelta]) -> None:
        """The bridge's worker: each of the `n` choices in turn (see `each_choice`)."""
        each_choice(plan.n, job, emit, lambda index: self.run(plan, job, emit, index))

    def _generate(self, plan: _Plan, hook: _StepHook) -> None:  # noqa: C901  (one flat setup)
        torch, tf = self.torch, self.tf
        ids = torch.tensor([plan.prompt_ids], dtype=torch.long, device=self.device)
        processors = tf.LogitsProcessorList()
        if plan.logprobs:
            # first: vLLM reports logprobs of the raw logits by default
            hook.recorder = _LogprobRecorder(torch, self.tokenizer)
            processors.append(hook.recorder)
        if plan.logit_bias:
            processors.append(_LogitBias(torch, plan.logit_bias, self.device))
        if plan.repetition_penalty is not None and plan.repetition_penalty != 1.0:
            # ours, not generate's: its own processors would run before the recorder
            processors.append(tf.RepetitionPenaltyLogitsProcessor(plan.repetition_penalty))
        end_ids = plan.stop_token_ids | (frozenset() if plan.ignore_eos else self.eos_ids)
        if plan.min_tokens > 0 and end_ids:
            mask = torch.tensor(sorted(end_ids), dtype=torch.long, device=self.device)
            processors.append(_MinTokens(len(plan.prompt_ids), plan.min_tokens, mask))
        if hook.constraint is not None:
            # before the warpers: top-k/top-p must choose among the tokens the grammar allows
            processors.append(hook.constraint)
        if plan.temperature > 0:
            if plan.temperature != 1.0:
                processors.append(tf.TemperatureLogitsWarper(plan.temperature))
            if plan.top_k is not None:
                processors.append(tf.TopKLogitsWarper(top_k=plan.top_k))
            if plan.top_p is not None and plan.top_p < 1.0:
                processors.append(tf.TopPLogitsWarper(top_p=plan.top_p))
            if plan.min_p is not None and plan.min_p > 0:
                processors.append(tf.MinPLogitsWarper(min_p=plan.min_p))
            generator = torch.Generator(device=self.device)
            # choice i of a seeded request: seed + i, so each choice repeats and they differ
            seed = (
                plan.seed + hook.index
                if plan.seed is not None
                else int.from_bytes(os.urandom(8), "little")
            )
            generator.manual_seed(seed % (2**63))
            processors.append(_SeededSampler(torch, generator))
        config = tf.GenerationConfig(
            max_new_tokens=plan.max_tokens,
            do_sample=False,
            num_beams=1,
            # end tokens are ours to handle (ignore_eos, stop_token_ids, min_tokens); an empty
            # list keeps transformers from filling in the model's EOS
            eos_token_id=[],
            pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=tf.StoppingCriteriaList([hook]),
            )


def _float(value: float | None) -> float | None:
    """The warpers of transformers check `isinstance(x, float)`: a JSON 1 must arrive as 1.0."""
    return None if value is None else float(value)


def _engine_failure(exc: BaseException) -> str:
    """A message for an engine exception that shows no path or engine text."""
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "the engine ran out of device memory"
    return f"generation failed ({name})"


def _import_engine() -> tuple[ModuleType, ModuleType]:
    import torch  # noqa: PLC0415  (engine imports happen in load only)
    import transformers  # noqa: PLC0415

    return torch, transformers


def _auto_tools(engine: _Engine | None) -> frozenset[str]:
    """`tool_choice.auto` while a model with a tool parser is loaded."""
    if engine is None or engine.tool_parser is None:
        return frozenset()
    return frozenset({"tool_choice.auto"})


# --- the adapter --------------------------------------------------------------------------------


class TransformersAdapter(BaseAdapter[TransformersParams]):
    """Serves one HF causal LM with `generate`; see the module docstring."""

    params_type = TransformersParams
    # `tool_choice.auto` where the preset names a `tool_call_parser`
    declared_features: ClassVar[frozenset[str]] = _FEATURES | {"tool_choice.auto"}

    def __init__(self, context: AdapterContext) -> None:
        super().__init__(context)
        self._engine: _Engine | None = None
        self._bridge: ThreadBridge[TokenDelta] | None = None

    @property
    def capabilities(self) -> Capabilities:
        """Sampling fields applied by our processors; one choice per request."""
        engine = self._engine
        return Capabilities(
            sampling=_SAMPLING,
            max_n=_MAX_N,
            max_top_logprobs=_MAX_TOP_LOGPROBS,
            max_context=engine.params.max_model_len if engine is not None else None,
            features=_FEATURES | _auto_tools(engine),
        )

    def token_ops(self) -> TokenOps | None:
        """The loaded tokenizer (`/tokenize`, `/detokenize`); None while nothing is loaded."""
        engine = self._engine
        if engine is None or engine.tokenizer is None:
            return None
        return TokenOps(engine.tokenizer, engine.params.max_model_len, engine.template_errors)

    def check(self, model: str, params: TransformersParams) -> None:
        """Model reference (including the bundled name) and trust_remote_code, nothing loaded."""
        super().check(model, params)
        check_model_source(model, self.context)
        # reachable now, in about a second, rather than a load that retries for a minute
        ref = parse_model_ref(model, self.context)
        check_reachable(ref.kind, ref.value)
        # a preset naming a parser still loads where vllm is absent (the transformers-only
        # serving venv, its image): `tool_choice: auto` then stays refused by name, and the
        # load's details and log say why

    def tool_parser(self) -> ToolCallParser | None:
        """The preset's `tool_call_parser`, built with the loaded tokenizer."""
        engine = self._engine
        return engine.tool_parser if engine is not None else None

    def stats(self) -> EngineStats:
        """Generations running now and waiting for a slot."""
        b = self._bridge
        # nothing loaded: nothing runs (zero, not unknown)
        return EngineStats(running=b.running if b else 0, waiting=b.waiting if b else 0)

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int | None:
        """Tokens of the templated prompt, exactly as `generate` would encode it (blocking)."""
        engine = self._engine
        if engine is None or engine.tokenizer is None:
            return None
        req = GenerationRequest("count", tuple(messages), SamplingOptions(max_tokens=1))
        return len(engine.encode(req))

    # -- load --

    async def load(self, model: str, params: TransformersParams) -> LoadInfo:
        """Import torch/transformers, build tokenizer and model, run one tiny generation."""
        if self._engine is not None:
            raise EngineError(
                "a model is loaded (or a failed load was not cleaned up); unload first"
            )
        self.check(model, params)
        kind = check_model_source(model, self.context)
        started = time.perf_counter()
        torch, transformers = await asyncio.to_thread(_import_engine)
        imported = time.perf_counter()
        engine = _Engine(torch, transformers, params)
        self._engine = engine
        details = await asyncio.to_thread(self._build, engine, model, kind)
        built = time.perf_counter()
        await asyncio.to_thread(self._warm_up, engine)
        warmed = time.perf_counter()
        self._bridge = ThreadBridge(params.max_concurrency, name="iw-transformers")
        return LoadInfo(
            import_s=imported - started,
            init_s=built - imported,
            warmup_s=warmed - built,
            device=_device_name(engine.device),
            max_context=params.max_model_len,
            details=details,
        )

    def _build(self, engine: _Engine, model: str, kind: str) -> dict[str, Any]:
        """Resolve the source, pick device and dtype, load tokenizer and weights (load thread)."""
        torch, tf, params = engine.torch, engine.tf, engine.params
        started = time.perf_counter()
        source = resolve_model_source(model, self.context)
        prepare_s = time.perf_counter() - started
        engine.device = _pick_device(torch, params.device)
        dtype_name = params.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if engine.device.type == "cuda" else "float32"
        if params.torch_threads is not None:
            engine.previous_threads = torch.get_num_threads()
            torch.set_num_threads(params.torch_threads)
        import jinja2  # noqa: PLC0415  (transformers renders chat templates with it)

        engine.template_errors = (jinja2.TemplateError, ValueError, TypeError)
        options: dict[str, Any] = {"trust_remote_code": params.trust_remote_code}
        engine.tokenizer = _from_pretrained(tf.AutoTokenizer, source, model, kind, options)
        engine.template_vars = template_variables(engine.tokenizer.chat_template)
        if not engine.tokenizer.chat_template:
            raise EngineError(
                "the model's tokenizer has no chat template; this backend serves chat models only"
            )
        if params.tool_call_parser is not None and parsers_available():
            engine.tool_parser = ToolCallParser(params.tool_call_parser, engine.tokenizer)
        elif params.tool_call_parser is not None:
            _log.warning(
                "tool_call_parser %r needs vLLM's tool parsers and vllm is not installed: "
                "tool_choice 'auto' stays refused (required and named tool choices work)",
                params.tool_call_parser,
            )
        options["dtype"] = getattr(torch, dtype_name)
        if params.attn_implementation is not None:
            options["attn_implementation"] = params.attn_implementation
        if engine.device.type == "cuda":
            # straight onto the GPU: no full CPU copy first
            options["device_map"] = str(engine.device)
        engine.model = _from_pretrained(tf.AutoModelForCausalLM, source, model, kind, options)
        engine.model.eval()
        _check_context(engine.model.config, params.max_model_len)
        engine.eos_ids = _eos_ids(engine.model.generation_config, engine.tokenizer)
        pad = engine.tokenizer.pad_token_id
        engine.pad_id = int(pad) if pad is not None else min(engine.eos_ids, default=0)
        engine.sampling_defaults = _sampling_defaults(engine.model.generation_config)
        return {
            "source": kind,
            "dtype": dtype_name,
            "device": _device_name(engine.device),
            "attn_implementation": getattr(engine.model.config, "_attn_implementation", None),
            "torch_threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in engine.model.parameters()),
            "prepare_s": round(prepare_s, 3),
            "sampling_defaults": dict(engine.sampling_defaults),
        }

    def _warm_up(self, engine: _Engine) -> None:
        """One short greedy generation: first-call allocations happen here, not in a request."""
        try:
            ids = engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:
            raise EngineError("the model's chat template fails on a plain user message") from exc
        prompt = tuple(engine.tokenizer(ids, add_special_tokens=False)["input_ids"])
        plan = _Plan(
            prompt_ids=prompt,
            max_tokens=_WARMUP_TOKENS,
            min_tokens=0,
            temperature=0.0,
            top_p=None,
            top_k=None,
            min_p=None,
            repetition_penalty=None,
            seed=None,
            stop=(),
            stop_token_ids=frozenset(),
            ignore_eos=True,
        )
        try:
            engine.run(plan, Job(), lambda _: None)
        except EngineError as exc:
            raise EngineError(f"warm-up {exc.message}") from None

    # -- generate --

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream the request's choices; the worker stops within a token when this is closed."""
        engine, bridge = self._engine, self._bridge
        if engine is None or bridge is None or bridge.closed:
            raise ServiceUnavailableError("no model is loaded")
        job = Job()  # queued from here: encoding and grammar compiling count as queue time
        _refuse_unsupported(req.sampling)
        try:
            plan = await asyncio.to_thread(engine.plan, req)
        except WrapperError:
            raise
        except Exception as exc:
            if self._engine is not engine:
                raise ServiceUnavailableError("the model was unloaded") from None
            raise EngineError(f"could not prepare the request ({type(exc).__name__})") from None

        def work(job: Job, emit: Emit[TokenDelta]) -> None:
            engine.run_all(plan, job, emit)

        stream = stream_deltas(
            bridge, work, job, plan.prompt_ids, prompt_token_ids=plan.return_token_ids or plan.echo
        )
        try:
            # aclosing: closing us must close the bridge's stream now (it joins the worker),
            # not whenever the garbage collector finalises it
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    yield delta
        except BridgeClosedError:
            # unloading began while this request waited for a slot: it ends like running ones
            yield TokenDelta("", 0, finish_reason="abort", prompt_tokens=len(plan.prompt_ids))

    # -- unload --

    async def unload(self) -> None:
        """Abort in-flight generations, wait for their threads, drop the model and free memory."""
        engine, self._engine = self._engine, None
        bridge = self._bridge
        if bridge is not None:
            # closed at once (no new job starts), then every worker aborts and is joined
            await bridge.aclose()
            self._bridge = None
        if engine is None:
            return
        await asyncio.to_thread(_release, engine)


def _release(engine: _Engine) -> None:
    """Drop the engine's objects and give memory back (unload thread)."""
    torch = engine.torch
    on_cuda = engine.device is not None and engine.device.type == "cuda"
    if engine.grammars is not None:
        engine.grammars.close()
    engine.grammars = None
    engine.model = None
    engine.tokenizer = None
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    if engine.previous_threads is not None:
        torch.set_num_threads(engine.previous_threads)


# --- load helpers -------------------------------------------------------------------------------


def _pick_device(torch: Any, spec: str) -> Any:
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    param = "$.engine_params.device"
    if not torch.cuda.is_available():
        raise ParamsValidationError("device 'cuda' asked for, but no GPU is available", param=param)
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ParamsValidationError(
            f"device cuda:{index} does not exist ({count} GPUs)", param=param
        )
    return torch.device(f"cuda:{index}")


def _device_name(device: Any) -> str:
    if device is None or device.type != "cuda":
        return "cpu"
    return f"cuda:{device.index or 0}"


def _from_pretrained(
    auto_class: Any, source: str, model: str, kind: str, options: dict[str, Any]
) -> Any:
    """`auto_class.from_pretrained(source)`, its failures turned into clean engine errors."""
    try:
        return auto_class.from_pretrained(source, **options)
    except Exception as exc:
        # chained, not `from None`: the manager reports the root cause and logs the whole chain
        raise _load_failure(exc, model, kind) from exc


def _load_failure(exc: Exception, model: str, kind: str) -> EngineError:
    """Our summary of a failed `from_pretrained`; the manager adds the engine's root cause."""
    name = type(exc).__name__
    if kind == "hub" and (
        isinstance(exc, OSError) or type(exc).__module__.startswith("huggingface")
    ):
        return EngineError(
            f"could not fetch model '{model}' from the Hugging Face hub (offline or no access)"
        )
    if "trust_remote_code" in str(exc):
        return EngineError("the model needs trust_remote_code, which this load did not enable")
    if "OutOfMemory" in name:
        return EngineError("not enough device memory to load the model")
    return EngineError("could not load the model")


def _check_context(config: Any, max_model_len: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_model_len > limit:
        raise ParamsValidationError(
            f"max_model_len {max_model_len} exceeds the model's {limit} positions",
            param="$.engine_params.max_model_len",
        )


def _eos_ids(generation_config: Any, tokenizer: Any) -> frozenset[int]:
    """End tokens from the model's generation config and the tokenizer (chat models add some)."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, Sequence):
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _sampling_defaults(generation_config: Any) -> dict[str, float]:
    """Sampling values the model's generation_config.json sets (vLLM uses them as defaults)."""
    explicit = generation_config.to_diff_dict()
    return {
        key: explicit[key]
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        if isinstance(explicit.get(key), int | float) and not isinstance(explicit.get(key), bool)
    }


def _refuse_unsupported(s: SamplingOptions) -> None:
    """Refuse what `capabilities` does not list (the service checks first; this is the backstop)."""
    unsupported = {
        "n": not 1 <= s.n <= _MAX_N,
        "top_logprobs": (s.top_logprobs or 0) > _MAX_TOP_LOGPROBS,
        "presence_penalty": bool(s.presence_penalty),
        "frequency_penalty": bool(s.frequency_penalty),
    }
    for name, present in unsupported.items():
        if present:
            raise UnsupportedParameterError(
                f"'{name}' is not supported by the transformers backend", param=name
            )
