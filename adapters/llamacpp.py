"""The llama.cpp adapter (llama-cpp-python): a GGUF served in process, on the public kit only.

`bundled:NAME` is the GGUF in its installed package, read directly (no conversion); a local folder
under the model roots must hold one `.gguf`. The GGUF's chat template is rendered and tokenized
before the engine runs, so the kit's context rule applies. Requests take turns (one sequence per
`llama_context`) in the kit's `ThreadBridge`, each a `Llama.generate` run whose worker matches
stop strings, reads the step's logits for logprobs and checks the cancel flag before every token.

Must never: import llama_cpp at module level, or anything from `adapters` but its public names
(this is the README's worked example); let a closed stream keep decoding; show a path in an error.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from attrs import field, frozen
from attrs.validators import optional

from adapters import (
    SAMPLING_FIELDS,
    AdapterContext,
    BaseAdapter,
    Capabilities,
    Emit,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Job,
    LoadInfo,
    ParamsValidationError,
    ServiceUnavailableError,
    StopMatcher,
    ThreadBridge,
    TokenDelta,
    bundled_gguf,
    clean_error_text,
    fit_max_tokens,
    in_range,
    logprob_from_logits,
    parse_model_ref,
    stream_deltas,
)

__all__ = ["LlamaCppAdapter", "LlamaCppParams"]

#: llama.cpp's sampler chain has no min_tokens; one sequence per request
_SAMPLING = SAMPLING_FIELDS - {"min_tokens", "n"}
_MAX_TOP_LOGPROBS = 20


@frozen
class LlamaCppParams:
    """Engine params of the llama.cpp backend."""

    max_model_len: int = field(default=2048, validator=in_range(16, 131072))
    """Context size (`n_ctx`): prompt + completion tokens of one request."""
    n_threads: int | None = field(default=None, validator=optional(in_range(1, 256)))
    """CPU threads for decoding; unset: llama.cpp's default (half the cores)."""
    n_batch: int = field(default=512, validator=in_range(1, 8192))
    """Prompt tokens evaluated per batch."""


class LlamaCppAdapter(BaseAdapter[LlamaCppParams]):
    """One GGUF model in llama.cpp; see the module docstring."""

    params_type = LlamaCppParams

    def __init__(self, context: AdapterContext) -> None:
        super().__init__(context)
        self._llama: Any = None
        self._bridge: ThreadBridge[TokenDelta] | None = None
        self._formatter: Any = None
        self._params = LlamaCppParams()

    @property
    def capabilities(self) -> Capabilities:
        """Sampling llama.cpp's sampler chain applies; logprobs from the step's logits."""
        loaded = self._llama is not None
        return Capabilities(
            sampling=_SAMPLING,
            max_top_logprobs=_MAX_TOP_LOGPROBS,
            max_context=self._params.max_model_len if loaded else None,
        )

    def check(self, model: str, params: LlamaCppParams) -> None:
        """The model must resolve to one readable GGUF file."""
        self._gguf(model)

    def _gguf(self, model: str) -> Path:
        ref = parse_model_ref(model, self.context)
        if ref.kind == "bundled":
            return bundled_gguf(ref.value)
        if ref.kind == "local":
            found = sorted(Path(ref.value).glob("*.gguf"))
            if len(found) == 1:
                return found[0]
            raise ParamsValidationError("the folder must hold one .gguf file", param="$.model")
        raise ParamsValidationError("llama.cpp serves bundled or local GGUFs", param="$.model")

    async def load(self, model: str, params: LlamaCppParams) -> LoadInfo:
        """Import llama_cpp, map the GGUF, build the chat formatter; refuse a second load."""
        if self._llama is not None:
            raise EngineError("a model is loaded; unload first")
        path = self._gguf(model)
        started = time.perf_counter()
        llama_cpp = await asyncio.to_thread(__import__, "llama_cpp")
        imported = time.perf_counter()
        try:
            self._llama = await asyncio.to_thread(
                llama_cpp.Llama,
                model_path=str(path),
                n_ctx=params.max_model_len,
                n_threads=params.n_threads,
                n_batch=params.n_batch,
                verbose=False,
            )
        except Exception as exc:
            why = clean_error_text(str(exc), self.context.mask)
            raise EngineError(f"llama.cpp could not load the model: {why}") from None
        self._formatter = _formatter(self._llama)
        self._params = params
        self._bridge = ThreadBridge(1, name="iw-llamacpp")
        return LoadInfo(
            import_s=imported - started,
            init_s=time.perf_counter() - imported,
            max_context=params.max_model_len,
            details={"gguf": path.name, "n_threads": self._llama.n_threads},
        )

    def stats(self) -> EngineStats:
        """Generations decoding now and waiting for the context."""
        b = self._bridge
        return EngineStats(running=b.running, waiting=b.waiting) if b else EngineStats()

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream one choice; the worker stops within a token when this stream is closed."""
        llama, bridge = self._llama, self._bridge
        if llama is None or bridge is None or bridge.closed:
            raise ServiceUnavailableError("no model is loaded")
        prompt = await asyncio.to_thread(_encode, llama, self._formatter, req)
        max_tokens = fit_max_tokens(len(prompt), req.sampling, self._params.max_model_len)

        def work(job: Job, emit: Emit[TokenDelta]) -> None:
            _decode(llama, req, prompt, max_tokens, job, emit)

        try:
            # aclosing: closing this stream joins the worker now, not when the GC finalises it
            stream = stream_deltas(bridge, work, Job(), prompt)
            async with contextlib.aclosing(stream) as deltas:
                async for delta in deltas:
                    yield delta
        except (RuntimeError, ValueError, OSError) as exc:
            why = clean_error_text(str(exc), self.context.mask)
            raise EngineError(f"llama.cpp failed: {why}") from None

    async def unload(self) -> None:
        """Stop and join every generation, then free the model and its context; idempotent."""
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            await bridge.aclose()
        llama, self._llama = self._llama, None
        if llama is not None:
            await asyncio.to_thread(llama.close)


def _encode(llama: Any, formatter: Any, req: GenerationRequest) -> list[int]:
    """The prompt's tokens: the chat template rendered, then tokenized with its special tokens."""
    try:
        out = formatter(messages=[{"role": m.role, "content": m.content} for m in req.messages])
    except Exception as exc:  # jinja2 errors: the template refuses these messages
        why = clean_error_text(str(exc))
        raise InvalidRequestError(f"the chat template refused the messages: {why}") from None
    tokens: list[int] = llama.tokenize(out.prompt.encode(), not out.added_special, special=True)
    return tokens


def _formatter(llama: Any) -> Any:
    """The GGUF's own chat template, as llama-cpp-python renders it."""
    from llama_cpp import llama_chat_format  # noqa: PLC0415  (engine import, load time only)

    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        raise EngineError("the GGUF has no chat template; this backend serves chat models only")
    eos, bos = llama.token_eos(), llama.token_bos()
    text = llama._model.token_get_text  # noqa: SLF001  (what Llama.__init__ itself uses)
    return llama_chat_format.Jinja2ChatFormatter(
        template, eos_token=text(eos) if eos >= 0 else "", bos_token=text(bos) if bos >= 0 else ""
    )


def _decode(
    llama: Any, req: GenerationRequest, prompt: list[int], max_tokens: int, job: Job,
    emit: Emit[TokenDelta],
) -> None:  # fmt: skip
    """The worker: one `Llama.generate` run, checked for cancel, stop and length every token."""
    import llama_cpp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415  (llama-cpp-python's own dependency)

    def piece(token: int) -> str:
        return str(llama.detokenize([token]).decode(errors="replace"))

    s = req.sampling
    llama.set_seed(s.seed if s.seed is not None else secrets.randbits(31))
    stops, utf8 = StopMatcher(s.stop), codecs.getincrementaldecoder("utf-8")("replace")
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    tokens = llama.generate(
        prompt, temp=1.0 if s.temperature is None else s.temperature, top_p=s.top_p or 1.0,
        top_k=s.top_k or 0, min_p=s.min_p or 0.0, repeat_penalty=s.repetition_penalty or 1.0,
        presence_penalty=s.presence_penalty or 0.0, frequency_penalty=s.frequency_penalty or 0.0,
    )  # fmt: skip
    made = 0
    try:
        for token in tokens:
            if job.cancelled:
                emit(TokenDelta(stops.flush(), 0, finish_reason="abort"))
                return
            eog = not s.ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token)
            if token in s.stop_token_ids or eog:
                tail = stops.flush() + utf8.decode(b"", final=True)
                reason = None if eog else token
                emit(TokenDelta(tail, 0, finish_reason="stop", stop_reason=reason))
                return
            made += 1
            raw = llama.detokenize([token])
            text = stops.feed(utf8.decode(raw))
            finish: FinishReason | None = "stop" if stops.stopped else None
            if finish is None and made >= max_tokens:
                text, finish = text + stops.flush() + utf8.decode(b"", final=True), "length"
            lp = None
            if s.logprobs:
                step = llama_cpp.llama_get_logits_ith(llama.ctx, -1)  # what `token` came from
                logits = np.ctypeslib.as_array(step, shape=(llama.n_vocab(),))
                lp = (logprob_from_logits(logits, token, raw, s.top_logprobs or 0, piece),)
            emit(TokenDelta(text, 1, finish_reason=finish, logprobs=lp))
            if finish is not None:
                return
    finally:
        tokens.close()
