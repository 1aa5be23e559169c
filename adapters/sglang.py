"""The SGLang adapter: an in-process `sglang.Engine`, streamed, aborted on disconnect.

Written against sglang **0.5.23** as its wheel's source shows it, not its docs. What was matched
(file: function), and what the code below relies on:

- `sglang/srt/entrypoints/engine.py`: `Engine.__init__(**kwargs)` builds `ServerArgs(**kwargs)`
  (`log_level` defaults to "error"), starts the scheduler and detokenizer processes and blocks
  until they are ready; it registers `atexit` shutdown, writes `os.environ` (NCCL_*,
  CUDA_DEVICE_MAX_CONNECTIONS, SGLANG_RUN_ID), sets the multiprocessing start method to spawn, and
  installs a SIGQUIT handler that kills the whole process tree when built on the main thread (so
  we build it on a worker thread). Importing the module sets uvloop's event-loop policy.
  `Engine.async_generate(input_ids=…, sampling_params={…}, stream=True, rid=…)` is a coroutine
  that returns `TokenizerManager.generate_request`'s async generator. `Engine.shutdown()` kills
  every child process of this process (`kill_process_tree(os.getpid(), include_parent=False,
  wait_timeout=60)`) and blocks. `Engine.get_all_child_pids()`.
- `sglang/srt/managers/tokenizer_manager.py`: `generate_request` aborts a dispatched request
  when its generator is closed or cancelled (`except BaseException` →
  `_release_req_states_on_failure` → `abort_request`); `abort_request(rid)` is sync and
  idempotent (`ReqState.abort_sent`); `_handle_batch_output` builds `meta_info` with `id`,
  `finish_reason`, `prompt_tokens`, `completion_tokens` (a running total), ...; with the default
  `incremental_streaming_output=False` every chunk's `text` is the whole text so far, with `True`
  it is the new piece; `_handle_abort_req` (an abort while queued) sends the whole text and no
  `prompt_tokens` in both modes; `auto_create_handle_loop` starts its receive loop on the running
  loop and, on the main thread, takes over SIGTERM/SIGQUIT (`loop.add_signal_handler`);
  `self.tokenizer` (the HF tokenizer), `self.context_len`, `self.asyncio_tasks`,
  `self.load_snapshot_reader`.
- `sglang/srt/managers/scheduler.py: Scheduler.abort_request` aborts every request whose rid
  *starts with* the given rid, so our rids are prefix-free (`_engine_rid`).
- `sglang/srt/managers/schedule_batch.py`: `finish_reason` is `None` until the end, then
  `{"type": "stop", "matched": int | str}`, `{"type": "length", "length": n}` or
  `{"type": "abort", "message", "status_code", "err_type"}` (`status_code` set = an error).
- `sglang/srt/managers/scheduler_components/output_streamer.py: accept` holds a chunk back while
  the text ends with the start of a stop string, and `detokenizer_manager.py: trim_matched_stop`
  cuts the stop string from the final text: SGLang's streamed text needs no stop handling here.
- `sglang/srt/sampling/sampling_params.py: SamplingParams`: `max_new_tokens`, `min_new_tokens`,
  `sampling_seed`, ...; `sampling_batch_info.py` uses `sampling_seed` only under
  `enable_deterministic_inference`, so `seed` is offered only then.
- `sglang/srt/server_args.py`: `ServerArgs` is a msgspec Struct assembled from
  `arg_groups/fields/*`; its 546 field names are pinned in `SERVER_ARGS_FIELDS` below (generated
  from the wheel; the contract tests check the fake against the same list).
- `sglang/srt/managers/load_snapshot.py`: `load_snapshot_reader.read_all()` gives one
  `LoadSnapshot` per DP rank (`num_running_reqs`, `num_waiting_reqs`, `token_usage`) from shared
  memory, published every `load_snapshot_publish_interval` (15) decode steps: cheap, a bit late.

SGLang cannot run on the development machines (CUDA-only kernels): this module is tested by
contract against `tests/fakes/fake_sglang` and must be checked on a GPU with sglang installed.

Must never: import sglang outside `load()` (and what it calls); pass a request string to
`importlib`; let `engine_params.extra` set what a typed param, the registry or the model roots
decide (`trust_remote_code`, `model_path`, ...); put a local path or traceback in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import msgspec
from attrs import evolve, field, frozen

from adapters.base import (
    BaseAdapter,
    Capabilities,
    EngineStats,
    LoadInfo,
    check_trust_remote_code,
)
from adapters.bundled import check_model_source, resolve_model_source
from adapters.kit import (
    Bool,
    Float,
    Int,
    ListOf,
    Obj,
    OneOf,
    ParamPolicy,
    Refused,
    Reserved,
    clean_error_text,
    no_mask,
)
from adapters.kit.context import fit_max_tokens
from schemas.errors import (
    ConflictError,
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    ServiceUnavailableError,
)
from schemas.generation import FinishReason, GenerationRequest, Message, TokenDelta
from schemas.validators import FieldValueError, in_range, max_length

if TYPE_CHECKING:
    from adapters.base import AdapterContext

__all__ = [
    "SERVER_ARGS_FIELDS",
    "SGLANG_EXTRA",
    "SGLANG_VERSION",
    "SglangAdapter",
    "SglangParams",
]

log = logging.getLogger(__name__)

#: the sglang release whose API this module matches (pyproject's `sglang` extra pins it)
SGLANG_VERSION = "0.5.23"

#: how long `unload()` waits for aborted requests to report their end before shutting down
ABORT_GRACE_S = 5.0

# 0.5.23 `ServerArgs.dtype` choices (arg_groups/fields/model.py)
Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]

# 0.5.23 `QUANTIZATION_CHOICES` and `ATTENTION_BACKEND_CHOICES` (arg_groups/choices.py). Word
# lists generated from the wheel stay one `split()` string each (SIM905): diffable against a dump.
QUANTIZATION_CHOICES = frozenset(
    """
    auto-round auto-round-int8 awq awq_marlin bitsandbytes compressed-tensors fp8 gguf gptq
    gptq_marlin humming mlx_q4 mlx_q8 modelopt modelopt_fp4 modelopt_fp8 modelopt_mixed modelslim
    moe_wna16 mxfp4 mxfp8 mxfp_w4a8 nvfp4_online petit_nvfp4 quark quark_int4fp8_moe quark_mxfp4
    unquant w4afp8 w8a8_fp8 w8a8_int8
    """.split()  # noqa: SIM905
)
ATTENTION_BACKEND_CHOICES = frozenset(
    """
    aiter ascend compressed cutedsl_mla dsa dsv4 fa3 fa4 flashinfer flashmla flex_attention hpc_ops
    intel_amx intel_xpu llada2_cfg_flashinfer minicpm_flashattn minicpm_flashinfer nsa qsa
    tokenspeed_mla torch_native triton trtllm_mha trtllm_mla wave
    """.split()  # noqa: SIM905
)

_TYPED_PARAMS = (
    "dtype",
    "context_length",
    "mem_fraction_static",
    "tp_size",
    "dp_size",
    "max_running_requests",
    "chunked_prefill_size",
    "quantization",
    "attention_backend",
    "trust_remote_code",
)

_CREDENTIAL = "secrets are not engine params (they would show in status)"
_FOLDER = "names a model, a tokenizer, a file, a folder or a host"
_CODE = "names code to import, a plugin or a parser"

#: what `engine_params.extra` may carry to sglang 0.5.23 `ServerArgs` (names pinned in
#: `SERVER_ARGS_FIELDS`; a contract test checks every key here is one); all else is refused
SGLANG_EXTRA = ParamPolicy(
    "sglang",
    Obj(
        {
            # memory and scheduling
            "kv_cache_dtype": OneOf(
                frozenset({"auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16", "fp4_e2m1"})
            ),
            "max_total_tokens": Int(1, 100_000_000),
            "max_prefill_tokens": Int(1, 10_000_000),
            "max_queued_requests": Int(1, 1_000_000),
            "page_size": Int(1, 4096),
            "schedule_policy": OneOf(
                frozenset({"lpm", "random", "fcfs", "dfs-weight", "lof", "priority"})
            ),
            "schedule_conservativeness": Float(0.0, 10.0),
            "disable_radix_cache": Bool(),
            "disable_chunked_prefix_cache": Bool(),
            "enable_mixed_chunk": Bool(),
            "disable_overlap_schedule": Bool(),
            "num_continuous_decode_steps": Int(1, 1024),
            "stream_interval": Int(1, 1024),
            "incremental_streaming_output": Bool(),
            "allow_auto_truncate": Bool(),
            "cpu_offload_gb": Float(0, 1_000_000),
            "enable_hierarchical_cache": Bool(),
            "hicache_ratio": Float(0.0, 100.0),
            "enable_memory_saver": Bool(),
            # parallelism and kernels
            "pp_size": Int(1, 64),
            "ep_size": Int(1, 1024),
            "enable_dp_attention": Bool(),
            "device": OneOf(frozenset({"cuda", "cpu", "xpu", "hpu", "npu"})),
            "sampling_backend": OneOf(frozenset({"flashinfer", "pytorch"})),
            "grammar_backend": OneOf(frozenset({"xgrammar", "outlines", "llguidance", "none"})),
            "disable_cuda_graph": Bool(),
            "cuda_graph_max_bs_decode": Int(1, 65_536),
            "cuda_graph_bs_decode": ListOf(Int(1, 65_536), max_items=128),
            "enable_torch_compile": Bool(),
            "torch_compile_max_bs": Int(1, 65_536),
            # behaviour
            "random_seed": Int(0, 2**63 - 1),
            "enable_deterministic_inference": Bool(),
            "log_level": OneOf(frozenset({"debug", "info", "warning", "error", "critical"})),
            "watchdog_timeout": Float(1.0, 86_400.0),
            # set by a typed param, the registry, the adapter; or a secret
            **{name: Reserved(f"set it as engine_params.{name}") for name in _TYPED_PARAMS},
            "model_path": Reserved("the model comes from the load request (model roots)"),
            "tokenizer_path": Reserved("the tokenizer comes with the model of the load request"),
            "skip_tokenizer_init": Reserved("the adapter renders prompts with its tokenizer"),
            "tokenizer_worker_num": Reserved("multi-process tokenizers are not supported here"),
            **dict.fromkeys(
                (
                    "api_key",
                    "admin_api_key",
                    "ssl_keyfile_password",
                    "watermark_key",
                    "watermark_key_b",
                    "watermark_config",
                ),
                Reserved(_CREDENTIAL),
            ),
            # known, refused unless adapters.yaml opts in (extra_allow)
            **dict.fromkeys(
                (
                    "download_dir",
                    "load_format",
                    "revision",
                    "speculative_algorithm",
                    "speculative_draft_model_path",
                    "json_model_override_args",
                    "lora_paths",
                    "enable_lora",
                    "chat_template",
                    "host",
                    "port",
                    "dist_init_addr",
                    "nnodes",
                    "node_rank",
                    "file_storage_path",
                    "decrypted_config_file",
                    "crash_dump_folder",
                    "hicache_storage_backend",
                    "disaggregation_mode",
                    "served_model_name",
                    "tokenizer_mode",
                ),
                Refused(_FOLDER),
            ),
            **dict.fromkeys(
                (
                    "custom_weight_loader",
                    "forward_hooks",
                    "model_loader_extra_config",
                    "reasoning_parser",
                    "tool_call_parser",
                    "preferred_sampling_params",
                    "custom_sigquit_handler",
                ),
                Refused(_CODE),
            ),
        }
    ),
)

_PATHLIKE = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s/'\"():,]+){2,}/?")


def _one_of(choices: frozenset[str]) -> Any:
    """Validator: `None` or one of `choices` (the pinned 0.5.23 choice lists)."""

    def check(_: Any, attribute: Any, value: str | None) -> None:
        if value is not None and value not in choices:
            raise FieldValueError(
                attribute.name, f"{attribute.name} must be one of: {', '.join(sorted(choices))}"
            )

    return check


def _chunked_prefill(_: Any, attribute: Any, value: int | None) -> None:
    if value is not None and value != -1 and value < 1:
        raise FieldValueError(attribute.name, f"{attribute.name} must be -1 (off) or at least 1")


@frozen
class SglangParams:
    """Engine params of the SGLang backend; names follow sglang's `ServerArgs`."""

    dtype: Dtype = "auto"
    """Weights and activations dtype; "auto" takes the checkpoint's (fp32 checkpoints run fp16)."""
    context_length: int | None = field(default=None, validator=in_range(16))
    """Largest prompt + completion in tokens; unset means the model config's value."""
    mem_fraction_static: float | None = field(default=None, validator=in_range(0.05, 0.98))
    """Fraction of GPU memory for weights and KV cache; unset lets sglang choose. Lower on OOM."""
    tp_size: int = field(default=1, validator=in_range(1, 64))
    """Tensor-parallel GPUs per replica."""
    dp_size: int = field(default=1, validator=in_range(1, 64))
    """Data-parallel replicas of the model."""
    max_running_requests: int | None = field(default=None, validator=in_range(1))
    """Most requests decoded at once; more wait in sglang's queue. Unset: derived from memory."""
    chunked_prefill_size: int | None = field(default=None, validator=_chunked_prefill)
    """Largest prefill chunk in tokens; -1 turns chunked prefill off. Unset: sglang's choice."""
    quantization: str | None = field(default=None, validator=_one_of(QUANTIZATION_CHOICES))
    """Quantisation method (e.g. fp8, awq, gptq); unset reads it from the checkpoint."""
    attention_backend: str | None = field(
        default=None, validator=_one_of(ATTENTION_BACKEND_CHOICES)
    )
    """Attention kernels (e.g. flashinfer, fa3, triton); unset lets sglang pick for the GPU."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model; refused unless adapters.yaml allows it."""
    extra: dict[str, Any] = field(factory=dict, validator=max_length(64))
    """Further sglang 0.5.23 `ServerArgs` fields from a vetted allowlist, each typed (e.g.
    `kv_cache_dtype`, `enable_deterministic_inference`); unknown names are refused, and so are
    names that set a typed param, a secret, code, files, folders or hosts (unless adapters.yaml
    `extra_allow` lists them)."""


def _engine_rid(request_id: str) -> str:
    """A rid no other rid starts with: sglang's scheduler aborts by prefix."""
    # length-prefixed: "5:abcde" can only be a prefix of itself
    return f"{len(request_id)}:{request_id}"


def _clean(text: str, mask: Callable[[str], str] = no_mask) -> str:
    """Engine text masked whole, paths replaced, then cut short (the kit's one cleaner)."""
    return clean_error_text(text, lambda t: _PATHLIKE.sub("<path>", mask(t)))


def _describe(exc: BaseException, mask: Callable[[str], str] = no_mask) -> str:
    """First line of an engine exception, masked, paths replaced, short: safe to show a client."""
    text = _clean(str(exc), mask)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def sampling_params(options: Any, *, seed_allowed: bool) -> dict[str, Any]:
    """Map `SamplingOptions` to sglang's `SamplingParams` names (`None` means its default)."""
    params: dict[str, Any] = {
        "max_new_tokens": options.max_tokens,
        # sglang checks min_new_tokens <= max_new_tokens; a request asking more gets max
        "min_new_tokens": min(options.min_tokens, options.max_tokens),
        "ignore_eos": options.ignore_eos,
    }
    # same names on both sides
    for name in (
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(options, name)
        if value is not None:
            params[name] = value
    if options.top_k is not None:
        # OpenAI/vLLM clients send 0 or -1 for "no top-k"; sglang's spelling is -1
        params["top_k"] = options.top_k if options.top_k > 0 else -1
    if options.stop:
        params["stop"] = list(options.stop)
    if options.stop_token_ids:
        params["stop_token_ids"] = list(options.stop_token_ids)
    if options.seed is not None and seed_allowed:
        params["sampling_seed"] = options.seed
    return params


def finish_reason(
    raw: Any, mask: Callable[[str], str] = no_mask
) -> tuple[FinishReason | None, str | int | None]:
    """Map sglang's `finish_reason` dict to ours and the matched stop; raise for error aborts."""
    if raw is None:
        return None, None
    kind = raw.get("type")
    if kind == "length":
        return "length", None
    if kind == "abort":
        status = raw.get("status_code")
        if status is None:
            return "abort", None
        message = _clean(str(raw.get("message") or "aborted"), mask)
        if 400 <= int(status) < 500:
            raise InvalidRequestError(f"sglang refused the request: {message}")
        raise EngineError(f"sglang aborted the request: {message}")
    matched = raw.get("matched")
    return "stop", matched if isinstance(matched, str | int) else None


class SglangAdapter(BaseAdapter[SglangParams]):
    """SGLang's offline `Engine` in this process; its scheduler runs in processes of its own."""

    params_type = SglangParams
    #: completions run token ids (or text) straight into the engine
    declared_features: ClassVar[frozenset[str]] = frozenset({"/v1/completions"})
    #: the `extra` allowlist (DeepSeek applies it to its nested params too)
    extra_policy: ClassVar[ParamPolicy] = SGLANG_EXTRA

    def __init__(self, context: AdapterContext) -> None:
        super().__init__(context)
        self.params = SglangParams()
        self._engine: Any = None
        self._tokenizer: Any = None
        self._max_context: int | None = None
        self._incremental = False
        self._inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- what the service and the reasoning parser read ------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """Sampling sglang applies; `seed` only under `enable_deterministic_inference`."""
        sampling = {
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "min_tokens",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        }
        if self._seed_allowed:
            sampling.add("seed")
        return Capabilities(
            sampling=frozenset(sampling),
            max_context=self._max_context or self.params.context_length,
            features=self.declared_features,
        )

    @property
    def _seed_allowed(self) -> bool:
        return bool(self.params.extra.get("enable_deterministic_inference"))

    @property
    def chat_template(self) -> str | None:
        """The loaded model's chat template (None before load)."""
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the model's chat template makes of `messages`, generation prompt on."""
        if self._tokenizer is None:
            raise ServiceUnavailableError("no sglang model is loaded")
        conversation = []
        for message in messages:
            # chat templates know "system"; OpenAI's "developer" role means the same thing
            role = "system" if message.role == "developer" else message.role
            turn = {"role": role, "content": message.content}
            if message.name is not None:
                turn["name"] = message.name
            conversation.append(turn)
        try:
            rendered = self._tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:
            # template errors ("roles must alternate") are the request's fault and safe to show
            detail = _describe(exc, self.context.mask)
            raise InvalidRequestError(
                f"the model's chat template refused the messages: {detail}", param="messages"
            ) from None
        return str(rendered)

    # --- lifecycle ---------------------------------------------------------------------------

    def check(self, model: str, params: SglangParams) -> None:
        """Model reference (bundled names too), registry gates and the `extra` allowlist."""
        check_model_source(model, self.context)
        check_trust_remote_code(params, self.context)
        SGLANG_EXTRA.check(params.extra, allow=self.context.extra_allow)

    async def load(self, model: str, params: SglangParams) -> LoadInfo:
        """Resolve the model, import sglang, build the engine off the event loop, take its loop."""
        if self._engine is not None:
            raise ConflictError("an sglang model is already loaded; unload it first")
        self.check(model, params)
        self.params = params
        source = await asyncio.to_thread(resolve_model_source, model, self.context)
        started = time.perf_counter()
        try:
            from sglang.srt.entrypoints.engine import Engine  # noqa: PLC0415
            from sglang.srt.server_args import ServerArgs  # noqa: PLC0415
            from sglang.version import __version__ as version  # noqa: PLC0415
        except ImportError as exc:
            raise EngineError(
                f"sglang is not importable here ({_describe(exc, self.context.mask)}); install "
                f"'inference-wrapper[sglang]' (sglang=={SGLANG_VERSION}) on a CUDA machine"
            ) from None
        imported = time.perf_counter()
        if version != SGLANG_VERSION:
            log.warning("sglang %s installed; this adapter matches %s", version, SGLANG_VERSION)
        known = {f.name for f in msgspec.structs.fields(ServerArgs)}
        for key in params.extra:
            if key not in known:
                raise ParamsValidationError(
                    f"sglang {version} has no server arg {key!r}",
                    param=f"$.engine_params.extra.{key}",
                )
        # blocking for minutes (weights, KV cache, CUDA graphs); off the main thread it also
        # skips the SIGQUIT handler that would kill this whole process if a child failed
        building = asyncio.ensure_future(
            asyncio.to_thread(Engine, **engine_kwargs(source, params, self.context.extra_allow))
        )
        try:
            self._engine = await asyncio.shield(building)
        except asyncio.CancelledError:
            # the thread cannot be stopped: shut the engine down once it exists
            building.add_done_callback(_shut_down_when_built)
            raise
        except Exception as exc:
            raise EngineError(
                f"sglang failed to start: {_describe(exc, self.context.mask)}"
            ) from None
        built = time.perf_counter()
        manager = self._engine.tokenizer_manager
        self._tokenizer = manager.tokenizer
        if self._tokenizer is None or not self.chat_template:
            raise EngineError("the model has no chat template; sglang chat needs one")
        self._max_context = int(manager.context_len)
        self._incremental = bool(getattr(manager, "incremental_streaming_output", False))
        _start_receive_loop(manager)
        return LoadInfo(
            import_s=imported - started,
            init_s=built - imported,
            device=str(params.extra.get("device") or "cuda"),
            max_context=self._max_context,
            engine_pids=tuple(int(p) for p in self._engine.get_all_child_pids()),
            details={
                "engine": "sglang",
                "sglang_version": version,
                "dtype": params.dtype,
                "context_length": self._max_context,
                "incremental_streaming_output": self._incremental,
            },
        )

    async def unload(self) -> None:
        """Abort in-flight requests, shut the engine down, free what we hold. Idempotent."""
        engine, self._engine = self._engine, None
        self._tokenizer = None
        self._max_context = None
        if engine is None:
            return
        manager = getattr(engine, "tokenizer_manager", None)
        if manager is not None:
            for rid in list(self._inflight):
                with contextlib.suppress(Exception):
                    manager.abort_request(rid)
            if self._inflight:
                # aborted streams end with finish "abort" once the scheduler answers
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), ABORT_GRACE_S)
        try:
            await asyncio.to_thread(engine.shutdown)
        except Exception as exc:
            log.warning("sglang shutdown failed: %s", _describe(exc, self.context.mask))
        finally:
            if manager is not None:
                # its receive loop lives on our event loop and would outlive the engine
                tasks = [t for t in getattr(manager, "asyncio_tasks", ()) if not t.done()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=ABORT_GRACE_S)
            _close_private_loop(engine)
            del engine, manager
            gc.collect()

    def stats(self) -> EngineStats:
        """Running/waiting requests and KV use from sglang's load snapshots (shared memory)."""
        engine = self._engine
        if engine is None:
            return EngineStats()
        try:
            loads = list(engine.tokenizer_manager.load_snapshot_reader.read_all())
        except Exception:
            return EngineStats()
        if not loads:
            return EngineStats()
        return EngineStats(
            running=sum(int(s.num_running_reqs) for s in loads),
            waiting=sum(int(s.num_waiting_reqs) for s in loads),
            kv_cache_usage=max(float(s.token_usage) for s in loads),
            extra={
                "gen_throughput": sum(float(s.gen_throughput) for s in loads),
                "cache_hit_rate": max(float(s.cache_hit_rate) for s in loads),
            },
        )

    # --- generation --------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """Stream one choice; closing or cancelling this generator aborts the sglang request."""
        engine = self._engine
        if engine is None or self._tokenizer is None:
            raise ServiceUnavailableError("no sglang model is loaded")
        prompt_ids = self._prompt_ids(req)
        sampling = req.sampling
        if self._max_context:
            # the one context rule (adapters/kit/context.py), before sglang's own wording
            max_tokens = fit_max_tokens(len(prompt_ids), sampling, self._max_context)
            sampling = evolve(sampling, max_tokens=max_tokens)
        params = sampling_params(sampling, seed_allowed=self._seed_allowed)
        rid = _engine_rid(req.request_id)
        self._inflight.add(rid)
        self._idle.clear()
        finished = False
        stream: Any = None
        try:
            try:
                # the template already holds BOS and role tokens: ids, so nothing is added twice
                stream = await engine.async_generate(
                    input_ids=prompt_ids, sampling_params=params, stream=True, rid=rid
                )
                async for delta in self._deltas(stream, len(prompt_ids)):
                    finished = delta.finish_reason is not None
                    yield delta
            except ValueError as exc:
                # sglang validates requests (length, sampling ranges) with ValueError
                finished = True
                raise InvalidRequestError(
                    f"sglang refused the request: {_describe(exc, self.context.mask)}"
                ) from None
            if not finished:
                raise EngineError("sglang ended the stream without a finish reason")
        finally:
            self._inflight.discard(rid)
            if not self._inflight:
                self._idle.set()
            if not finished:
                with contextlib.suppress(Exception):
                    engine.tokenizer_manager.abort_request(rid)
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The ids to run: the templated messages, or a raw prompt (`/v1/completions`).

        Raw text is tokenized with special tokens (BOS), as sglang's own completions route does;
        raw token ids are run as given, within the vocabulary.
        """
        tokenizer = self._tokenizer
        assert tokenizer is not None  # noqa: S101  (checked by the caller)
        if isinstance(req.prompt, str):
            return list(tokenizer.encode(req.prompt, add_special_tokens=True))
        if req.prompt is not None:
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise InvalidRequestError(
                    f"prompt token ids must lie between 0 and {vocab - 1}", param="prompt"
                )
            return list(req.prompt)
        # the template already holds BOS and role tokens: no special tokens added twice
        return list(tokenizer.encode(self.render_prompt(req.messages), add_special_tokens=False))

    async def _deltas(self, stream: Any, prompt_len: int) -> AsyncIterator[TokenDelta]:
        """Turn sglang's chunks (whole text so far, or new pieces) into deltas."""
        seen_chars = 0
        seen_tokens = 0
        pending_tokens = 0
        first = True
        async for out in stream:
            meta = out["meta_info"]
            text = out.get("text") or ""
            # the queued-abort chunk (no prompt_tokens) carries the whole text even in
            # incremental mode (tokenizer_manager.py: _handle_abort_req)
            if self._incremental and "prompt_tokens" in meta:
                piece = text
                seen_chars += len(text)
            else:
                piece = text[seen_chars:]
                seen_chars = len(text)
            total = int(meta.get("completion_tokens") or 0)
            pending_tokens += max(total - seen_tokens, 0)
            seen_tokens = max(seen_tokens, total)
            reason, matched = finish_reason(meta.get("finish_reason"), self.context.mask)
            if not piece and reason is None:
                continue  # tokens that made no text yet (held back): count them with the next
            prompt = int(meta.get("prompt_tokens", prompt_len))
            yield TokenDelta(
                piece,
                pending_tokens,
                0,
                reason,
                prompt if first or reason is not None else None,
                stop_reason=matched,
            )
            first = False
            pending_tokens = 0
            if reason is not None:
                return


def engine_kwargs(source: str, params: SglangParams, allow: Sequence[str] = ()) -> dict[str, Any]:
    """`sglang.Engine(**kwargs)`: 0.5.23 `ServerArgs` names; unset params keep sglang's default."""
    kwargs: dict[str, Any] = {
        "model_path": source,
        "dtype": params.dtype,
        "tp_size": params.tp_size,
        "dp_size": params.dp_size,
        "trust_remote_code": params.trust_remote_code,
    }
    for name in (
        "context_length",
        "mem_fraction_static",
        "max_running_requests",
        "chunked_prefill_size",
        "quantization",
        "attention_backend",
    ):
        value = getattr(params, name)
        if value is not None:
            kwargs[name] = value
    # disjoint from the above: the allowlist reserves the typed names
    kwargs.update(SGLANG_EXTRA.check(params.extra, allow=allow))
    return kwargs


def _shut_down_when_built(building: asyncio.Future[Any]) -> None:
    """Done-callback of an engine build whose load was cancelled: shut the engine down."""
    if building.cancelled() or building.exception() is not None:
        return
    engine = building.result()

    def shut_down() -> None:
        try:
            engine.shutdown()
        except Exception as exc:
            log.warning("sglang shutdown failed: %s", _describe(exc))
        finally:
            _close_private_loop(engine)

    # shutdown() blocks for seconds; a callback runs on the event loop
    threading.Thread(target=shut_down, name="sglang-orphan-shutdown", daemon=True).start()


def _close_private_loop(engine: Any) -> None:
    """Close the loop `Engine._ensure_event_loop` made on the worker thread that built it.

    Only the engine's sync methods (`generate`, `flush_cache`) run on it; we never call them,
    and nothing else closes it.
    """
    loop = getattr(engine, "loop", None)
    if not isinstance(loop, asyncio.AbstractEventLoop) or loop.is_running() or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):
        if loop is asyncio.get_running_loop():
            return
    loop.close()


def _start_receive_loop(manager: Any) -> None:
    """Start sglang's receive loop on our event loop without letting it keep our signals.

    `auto_create_handle_loop` (tokenizer_manager.py) would do this on the first request, and on
    the main thread it installs its own SIGTERM (drain, then kill the process tree) and SIGQUIT
    handlers over the server's. We start it here and put the server's handlers back.
    """
    on_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGTERM, signal.SIGQUIT)
    saved = {sig: signal.getsignal(sig) for sig in signals} if on_main else {}
    try:
        manager.auto_create_handle_loop()
    finally:
        loop = asyncio.get_running_loop()
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(sig)
            if handler is not None:
                signal.signal(sig, handler)


# `ServerArgs` field names of sglang 0.5.23, in declaration order: generated from the wheel with
# `msgspec.structs.fields(sglang.srt.server_args.ServerArgs)`. The fake sglang used by the
# contract tests carries the same list (with defaults) in its own data file; a test compares them.
SERVER_ARGS_FIELDS: frozenset[str] = frozenset(
    """
    model_path tokenizer_path tokenizer_mode tokenizer_backend tokenizer_worker_num
    detokenizer_worker_num skip_tokenizer_init load_format model_loader_extra_config
    trust_remote_code context_length is_embedding enable_multimodal revision model_impl
    model_config_parser json_model_override_args dtype quantization quantization_param_path
    kv_cache_dtype enable_fp32_lm_head modelopt_quant modelopt_checkpoint_restore_path
    modelopt_checkpoint_save_path modelopt_export_path quantize_and_serve rl_quant_profile
    enable_tf32_matmul mem_fraction_static max_running_requests max_queued_requests max_total_tokens
    chunked_prefill_size prefill_decode_interval enable_dynamic_chunking max_prefill_tokens
    prefill_max_requests schedule_policy enable_priority_scheduling disable_priority_preemption
    default_priority_value abort_on_priority_when_disabled schedule_low_priority_values_first
    priority_scheduling_preemption_threshold retraction_policy schedule_conservativeness page_size
    c128_page_size swa_full_tokens_ratio disable_hybrid_swa_memory radix_eviction_policy
    radix_eviction_policy_config prefill_only_disable_kv_cache disable_radix_cache
    enable_page_major_kv_layout enable_unified_memory disable_chunked_prefix_cache
    disable_overlap_schedule num_continuous_decode_steps scheduler_recv_interval enable_mixed_chunk
    nccl_port dist_timeout dist_init_addr gated_launch_port nnodes node_rank tp_size dcp_size
    pp_size pp_max_micro_batch_size pp_async_batch_depth dp_size attn_dp_size load_balance_method
    attn_cp_size moe_dp_size dwdp_size dcp_comm_backend dcp_replicate_q_proj enable_prefill_cp
    cp_strategy enable_dsa_cache_layer_split enable_cp_decode_attn_tp enable_kv_cache_sharding
    enable_dp_attention enable_dp_attention_local_control_broadcast enable_dp_lm_head
    enable_tp_lm_head_all_to_all enable_attn_tp_input_scattered enable_shared_experts_attn_tp
    shared_experts_tp_size enable_dense_mlp_attn_tp enable_layernorm_sp disable_attn_tp_gather
    enable_p2p_check device base_gpu_id gpu_id_step random_seed mlx_enable_sampling watchdog_timeout
    soft_watchdog_timeout sleep_on_idle use_ray custom_sigquit_handler numa_node gc_threshold host
    port fastapi_root_path smg_grpc_mode grpc_mode grpc_port grpc_worker_threads sidecar
    sidecar_args skip_server_warmup warmups enable_http2 http2_max_concurrent_streams
    http2_initial_connection_window_size ssl_keyfile ssl_certfile ssl_ca_certs ssl_keyfile_password
    enable_ssl_refresh api_key admin_api_key served_model_name weight_version chat_template
    trust_request_chat_template hf_chat_template_name completion_template file_storage_path
    enable_cache_report return_input_ids return_output_ids reasoning_parser
    default_chat_template_kwargs strip_thinking_cache enable_strict_thinking tool_call_parser
    tool_server sampling_defaults asr_max_buffer_seconds asr_max_concurrent_sessions
    preferred_sampling_params allow_auto_truncate stream_interval batch_notify_size
    stream_response_default_include_usage incremental_streaming_output enable_streaming_session
    enable_session_radix_cache log_level log_level_http log_requests log_requests_level
    log_requests_format log_requests_target uvicorn_access_log_exclude_prefixes crash_dump_folder
    show_time_cost enable_metrics smg_http_sidecar_port enable_mfu_metrics
    enable_metrics_for_all_schedulers load_snapshot_publish_interval
    tokenizer_metrics_custom_labels_header tokenizer_metrics_allowed_custom_labels
    extra_metric_labels bucket_time_to_first_token bucket_inter_token_latency
    bucket_e2e_request_latency prompt_tokens_buckets generation_tokens_buckets
    gc_warning_threshold_secs decode_log_interval enable_request_time_stats_logging kv_events_config
    load_publish_endpoint enable_forward_pass_metrics forward_pass_metrics_worker_id
    forward_pass_metrics_ipc_name enable_trace trace_modules otlp_traces_endpoint
    export_metrics_to_file export_metrics_to_file_dir stat_loggers
    constrained_json_whitespace_pattern constrained_json_disable_any_whitespace
    constrained_json_max_whitespace_cnt attention_backend decode_attention_backend
    enable_lean_attention prefill_attention_backend sampling_backend grammar_backend
    radix_cache_backend mm_attention_backend fp8_gemm_runner_backend fp4_gemm_runner_backend
    bf16_gemm_backend dsa_prefill_backend dsv4_prefill_backend dsa_decode_backend
    dsa_paged_mqa_logits_backend dsa_topk_backend disable_flashinfer_autotune
    flashinfer_autotune_skip_ops mamba_backend cuda_graph_config cuda_graph_backend_decode
    cuda_graph_backend_prefill cuda_graph_max_bs_decode cuda_graph_max_bs_prefill
    cuda_graph_bs_decode cuda_graph_bs_prefill cuda_graph_prefill_max_context
    disable_prefill_cuda_graph disable_decode_cuda_graph disable_cuda_graph
    disable_cuda_graph_padding enable_profile_cuda_graph enable_cudagraph_gc debug_cuda_graph
    enable_layerwise_nvtx_marker enable_nccl_nvls enable_symm_mem triton_attention_reduce_in_fp32
    triton_attention_num_kv_splits triton_attention_split_tile_size flashinfer_mla_disable_ragged
    enable_fused_qk_norm_rope enable_precise_embedding_interpolation enable_fused_moe_sum_all_reduce
    enable_deepseek_v4_fp4_indexer disable_custom_all_reduce enable_mscclpp enable_torch_symm_mem
    enable_scattered_sconv pre_warm_nccl boundary_reduction enable_quant_communications
    enable_flashinfer_allreduce_fusion enforce_disable_flashinfer_allreduce_fusion
    flashinfer_allreduce_fusion_backend enable_aiter_allreduce_fusion enable_torch_compile
    enable_torch_compile_debug_mode torch_compile_max_bs speculative_algorithm uno_lora_path
    speculative_draft_model_path speculative_draft_model_revision speculative_draft_load_format
    speculative_num_steps speculative_eagle_topk speculative_num_draft_tokens
    speculative_dflash_block_size speculative_dspark_block_size speculative_dspark_sps_table_path
    speculative_dspark_confidence_sts_path speculative_dspark_align_verify_tokens_to_graph_tier
    speculative_accept_threshold_single speculative_accept_threshold_acc
    speculative_use_rejection_sampling speculative_token_map speculative_attention_mode
    speculative_draft_attention_backend speculative_dsa_topk_backend
    speculative_draft_kv_cache_dtype speculative_draft_window_size speculative_moe_runner_backend
    speculative_moe_a2a_backend speculative_enable_w4a4_mxfp4_megamoe
    speculative_draft_model_quantization _speculative_draft_quantization_explicitly_set
    enable_multi_layer_eagle speculative_adaptive speculative_adaptive_config
    decoupled_spec_bind_endpoint decoupled_spec_connect_endpoints decoupled_spec_rank
    decoupled_spec_role spec_trace_dir speculative_ngram_min_bfs_breadth
    speculative_ngram_max_bfs_breadth speculative_ngram_match_type speculative_ngram_max_trie_depth
    speculative_ngram_capacity speculative_ngram_external_corpus_path
    speculative_ngram_external_sam_budget speculative_ngram_external_corpus_max_tokens ep_size
    moe_a2a_backend enable_w4a4_mxfp4_megamoe deepep_v2_mode moe_runner_backend
    flashinfer_mxfp4_moe_precision deepep_mode fuseep_mode deepep_dispatcher_output_dtype
    ep_num_redundant_experts ep_dispatch_algorithm init_expert_location enable_eplb eplb_algorithm
    eplb_rebalance_num_iterations eplb_rebalance_layers_per_chunk
    eplb_min_rebalancing_utilization_threshold expert_distribution_recorder_mode
    expert_distribution_recorder_buffer_size expert_balancedness_report_mode deepep_config
    moe_dense_tp_size elastic_ep_backend enable_elastic_expert_backup mooncake_ib_device
    enable_waterfill ep_join_mode ep_join_rank_offset elastic_ep_initial_size max_ep_size
    elastic_ep_scale_timeout disable_flashinfer_cutlass_moe_fp4_allgather
    disable_shared_experts_fusion enforce_shared_experts_fusion max_mamba_cache_size mamba_ssm_dtype
    mamba_max_states_per_path enable_mamba_cache_stochastic_rounding mamba_cache_philox_rounds
    mamba_full_memory_ratio mamba_radix_cache_strategy uses_mamba_radix_cache mamba_track_interval
    enable_int8_mamba_checkpoint int8_mamba_ckpt_size linear_attn_backend linear_attn_decode_backend
    linear_attn_prefill_backend linear_attn_verify_backend enable_linear_replayssm
    linear_replayssm_cache_len enable_linear_replayssm_spec enable_hierarchical_cache
    hicache_host_memory_mode hicache_ratio hicache_size hicache_write_policy hicache_io_backend
    hicache_mem_layout hicache_storage_backend hicache_storage_prefetch_policy
    hicache_storage_backend_extra_config hicache_storage_prefetch_retry_poll_interval
    hicache_storage_prefetch_retry_max_attempts enable_unified_cache_external_linker
    unified_cache_external_linker_backend enable_hisparse hisparse_config
    enable_broadcast_mm_inputs_process enable_prefix_mm_cache mm_enable_dp_encoder mm_process_config
    mm_processor_worker_num mm_io_worker_num allowed_media_domains media_url_max_file_size_mb
    mm_preprocess_cache_size_mb trust_mm_content_hashes limit_mm_data_per_request
    enable_mm_global_cache image_processor_backend mm_global_cache_backend
    disable_fast_image_processor mm_feature_transport enable_lora enable_lora_overlap_loading
    max_lora_rank lora_target_modules lora_paths max_loaded_loras max_loras_per_batch
    lora_eviction_policy lora_backend max_lora_chunk_size experts_shared_outer_loras
    lora_use_virtual_experts lora_strict_loading lora_drain_wait_threshold enable_two_batch_overlap
    enable_single_batch_overlap tbo_token_distribution_threshold cpu_offload_gb offload_group_size
    offload_num_in_group offload_prefetch_step offload_mode enable_lmcache lmcache_config_file
    enable_flexkv flexkv_config_file kt_weight_path kt_method kt_cpuinfer kt_threadpool_count
    kt_num_gpu_experts kt_max_deferred_experts_per_token dllm_algorithm dllm_algorithm_config
    dllm_fdfo disaggregation_mode disaggregation_transfer_backend disaggregation_bootstrap_port
    disaggregation_ib_device disaggregation_decode_enable_radix_cache
    disaggregation_decode_enable_offload_kvcache disaggregation_decode_retraction_backup
    num_reserved_decode_tokens disaggregation_decode_extra_slots
    disaggregation_decode_polling_interval optimistic_prefill_attempts encoder_only language_only
    language_model_only encoder_transfer_backend encoder_urls encoder_bootstrap_port
    encoder_register_urls enable_adaptive_dispatch_to_encoder enable_pdmux pdmux_config_path
    sm_group_num startup_weight_load_mode custom_weight_loader weight_loader_disable_mmap
    weight_loader_prefetch_checkpoints weight_loader_prefetch_num_threads
    weight_loader_drop_cache_after_load remote_instance_weight_loader_seed_instance_ip
    remote_instance_weight_loader_seed_instance_service_port
    remote_instance_weight_loader_send_weights_group_ports remote_instance_weight_loader_backend
    remote_instance_weight_loader_start_seed_via_transfer_engine engine_info_bootstrap_port
    modelexpress_config download_dir model_checksum delete_ckpt_after_loading decrypted_config_file
    decrypted_draft_config_file checkpoint_engine_wait_weights_before_ready enable_prefill_delayer
    prefill_delayer_max_delay_passes prefill_delayer_token_usage_low_watermark
    prefill_delayer_forward_passes_buckets prefill_delayer_wait_seconds_buckets
    prefill_delayer_queue_min_ratio prefill_delayer_max_delay_ms min_free_slots_delay
    enable_deterministic_inference rl_on_policy_target kv_canary kv_canary_real_data
    kv_canary_sweep_interval enable_dynamic_batch_tokenizer dynamic_batch_tokenizer_batch_size
    dynamic_batch_tokenizer_batch_timeout enable_tokenizer_batch_encode
    disable_tokenizer_batch_decode debug_tensor_dump_output_folder debug_tensor_dump_layers
    debug_tensor_dump_input_file enable_memory_saver enable_weights_cpu_backup
    enable_draft_weights_cpu_backup enable_custom_logit_processor enable_return_hidden_states
    return_hidden_states_mode enable_return_routed_experts enable_return_indexer_topk
    sampling_mask_max_tokens disable_outlines_disk_cache enable_mis weight_cache_mode
    weight_cache_socket weight_cache_timeout forward_hooks msprobe_dump_config ple_offload_embedding
    ple_offload_backend ple_offload_dir disaggregation_enable_kv_checksum enable_pd_role_switch
    speculative_domino_candidate_pool_size flashinfer_a2a_dispatch_type
    cuda_graph_max_seq_len_prefill prefill_kv_cache_dequant_dtype dsv4_attn_backend
    otlp_service_name _radix_eviction_policy_explicitly_set hicache_host_memory_fraction
    enable_linker_mla_dedup _swa_full_tokens_ratio_explicitly_set swa_prefix_tails
    enable_encoder_swa_bounded_replay enable_decoder_swa_bounded_replay enable_response_store
    disaggregation_decode_host_receive_threshold qsa_indexer_dtype
    disaggregation_decode_allocation_policy speculative_boundary_reduction
    speculative_use_block_verification speculative_draft_sink_size
    disable_aiter_allreduce_fusion_in_prefill disable_aiter_allreduce_fusion_in_decode
    enable_amd_monokernel dsa_triton_union enable_dsa_fused_indexer enable_cp_tp_group_sharing
    enable_watermark watermark_config watermark_key watermark_key_b watermark_context_window
    watermark_mixing_probability watermark_max_probability watermark_default_enabled
    watermark_enforce_all grpc_response_timeout_secs enable_paged_experts paged_experts_num_resident
    enable_nvidia_megakernel enable_megamoe_for_layernorm_sp enable_http_worker_reuseport
    prefill_decode_interval_min_bs unified_cache_external_linker_config
    enable_return_aux_hidden_states aux_hidden_state_capture return_aux_hidden_state_layer_ids
    """.split()  # noqa: SIM905
)
