"""Engine adapters, one module per engine; each imports its engine only inside load().

This package's `__all__` is the public surface for adapter authors (README, "Write an adapter"):
the contract (`BaseAdapter[P]`, `Capabilities`, `LoadInfo`, ...), the request and delta types, the
errors an adapter raises, and the kit (thread bridge, process reaper, context rule, error-text
cleaner, params allowlist, sampling field list, stop strings). An adapter that imports only these
names keeps working across releases; everything else in `adapters.*` is internal. A test keeps
the list complete: every name an in-tree adapter imports from the kit is exported here.

Must never: import an engine, `service` or `registry` (importing any adapter module runs this).
"""

from adapters.base import (
    Adapter,
    AdapterContext,
    BaseAdapter,
    Capabilities,
    EngineStats,
    LoadInfo,
    MemoryEstimate,
    ModelRef,
    check_trust_remote_code,
    parse_model_ref,
)
from adapters.bundled import bundled_gguf
from adapters.kit import (
    ERROR_TEXT_LIMIT,
    AnyJson,
    Bool,
    Float,
    Int,
    Limits,
    ListOf,
    Name,
    Nullable,
    Obj,
    OneOf,
    ParamPolicy,
    ParamSpec,
    Refused,
    Reserved,
    check_bounds,
    clean_error_text,
    no_mask,
    valid_allow_entry,
)
from adapters.kit.context import context_exceeded, fit_max_tokens
from adapters.kit.logprobs import logprob_from_logits
from adapters.kit.models import check_hub_model, check_local_folder, check_reachable
from adapters.kit.processes import ChildProcesses, child_pids, reap
from adapters.kit.sampling import (
    GATED_FIELDS,
    OPENAI_FIELDS,
    SAMPLING_FIELDS,
    VLLM_EXTENSION_FIELDS,
)
from adapters.kit.threads import (
    BridgeClosedError,
    Emit,
    Job,
    ThreadBridge,
    each_choice,
    stream_deltas,
)
from adapters.kit.tokens import TokenOps, template_variables
from adapters.text import StopMatcher, tag_overlap
from schemas.errors import (
    ConflictError,
    EngineError,
    InvalidRequestError,
    ParamsValidationError,
    RateLimitError,
    ServiceUnavailableError,
    UnsupportedParameterError,
    UpstreamError,
    UpstreamTimeoutError,
    WrapperError,
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
    ToolCall,
)
from schemas.validators import FieldValueError, in_range, max_length

__all__ = [
    "ERROR_TEXT_LIMIT",
    "GATED_FIELDS",
    "OPENAI_FIELDS",
    "SAMPLING_FIELDS",
    "VLLM_EXTENSION_FIELDS",
    "Adapter",
    "AdapterContext",
    "AnyJson",
    "BaseAdapter",
    "Bool",
    "BridgeClosedError",
    "Capabilities",
    "ChatOptions",
    "ChildProcesses",
    "ConflictError",
    "Emit",
    "EngineError",
    "EngineStats",
    "FieldValueError",
    "FinishReason",
    "Float",
    "GenerationRequest",
    "Int",
    "InvalidRequestError",
    "Job",
    "Limits",
    "ListOf",
    "LoadInfo",
    "MemoryEstimate",
    "Message",
    "ModelRef",
    "Name",
    "Nullable",
    "Obj",
    "OneOf",
    "ParamPolicy",
    "ParamSpec",
    "ParamsValidationError",
    "PromptPosition",
    "RateLimitError",
    "Refused",
    "Reserved",
    "SamplingOptions",
    "ServiceUnavailableError",
    "StopMatcher",
    "StructuredOutput",
    "ThreadBridge",
    "TokenDelta",
    "TokenLogprob",
    "TokenOps",
    "ToolCall",
    "UnsupportedParameterError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "WrapperError",
    "bundled_gguf",
    "check_bounds",
    "check_hub_model",
    "check_local_folder",
    "check_reachable",
    "check_trust_remote_code",
    "child_pids",
    "clean_error_text",
    "context_exceeded",
    "each_choice",
    "fit_max_tokens",
    "in_range",
    "logprob_from_logits",
    "max_length",
    "no_mask",
    "parse_model_ref",
    "reap",
    "stream_deltas",
    "tag_overlap",
    "template_variables",
    "valid_allow_entry",
]
