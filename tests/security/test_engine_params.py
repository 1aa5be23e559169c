"""Engine params are an allowlist, recursively: the attacks of issue 9 against a real app.

Each attack is sent to `/v1/model/validate` and `/v1/model/load` of an app whose registry has the
real vLLM, SGLang and DeepSeek adapters; each must be a 422 naming the key path, and nothing may
happen: a plugin file that would write a marker is never imported, no engine starts.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from adapters.base import AdapterContext
from adapters.kit import Limits, Obj, ParamPolicy, check_bounds
from adapters.sglang import SGLANG_EXTRA
from adapters.vllm import VLLM_EXTRA, VllmParams, check_extra, engine_kwargs
from helpers import ADMIN, make_registry, make_settings
from registry.config import RegistryError, parse_registry
from registry.planning import mask_tree
from registry.registry import AdapterRegistry
from registry.secrets import SecretStore
from schemas.errors import ParamsValidationError
from service.app import create_app

MODEL = "bundled:smollm2-135m"
REPO = Path(__file__).resolve().parents[2]

REGISTRY = """
adapters:
  vllm:
    module: adapters.vllm:VllmAdapter
  sglang:
    module: adapters.sglang:SglangAdapter
  vllm-spec:
    module: adapters.vllm:VllmAdapter
    extra_allow: [speculative_config, hf_overrides]
"""


def _nested(depth: int) -> dict[str, Any]:
    """`{"a": {"a": ... {}}}`, `depth` objects deep, built without recursion."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A plugin file that writes a marker file when imported; yields (plugin, marker)."""
    mark = tmp_path / "PLUGIN_RAN"
    plugin = tmp_path / "evil_plugin.py"
    plugin.write_text(
        textwrap.dedent(f"""
            from pathlib import Path
            Path({str(mark)!r}).write_text("ran")
        """)
    )
    yield plugin, mark
    assert not mark.exists(), "the plugin was imported"


@pytest.fixture
def app(tmp_path: Path) -> Litestar:
    """An app over the real engine adapters (nothing is loaded; engines are never imported)."""
    return create_app(make_settings(), registry=make_registry(tmp_path, REGISTRY))


@pytest.fixture
def client(app: Litestar) -> Iterator[TestClient[Litestar]]:
    """A test client over `app`."""
    with TestClient(app) as c:
        yield c


def _both(client: TestClient[Litestar], body: dict[str, Any]) -> list[Any]:
    """The answers of validate (dry run) and load to the same body."""
    return [client.post(f"/v1/model/{op}", json=body, headers=ADMIN) for op in ("validate", "load")]


def _attacks(plugin: str) -> list[tuple[str, dict[str, Any], str]]:
    """(backend, engine_params, refused param path below $.engine_params)."""
    return [
        (
            "vllm",
            {"extra": {"structured_outputs_config": {"reasoning_parser_plugin": plugin}}},
            "extra.structured_outputs_config.reasoning_parser_plugin",
        ),
        (
            "vllm",
            {"extra": {"structured_outputs_config": json.dumps({"reasoning_parser": plugin})}},
            "extra.structured_outputs_config.reasoning_parser",
        ),
        ("vllm", {"extra": {"reasoning_parser_plugin": plugin}}, "extra.reasoning_parser_plugin"),
        (
            "vllm",
            {"extra": {"compilation_config": json.dumps({"backend": "evil_plugin.fn"})}},
            "extra.compilation_config.backend",
        ),
        (
            "vllm",
            {"extra": {"compilation_config": {"inductor_passes": {"p": "evil_plugin.fn"}}}},
            "extra.compilation_config.inductor_passes",
        ),
        (
            "vllm",
            {"extra": {"speculative_config": {"model": "/etc", "num_speculative_tokens": 2}}},
            "extra.speculative_config",
        ),
        ("vllm", {"extra": {"hf_overrides": {"architectures": ["X"]}}}, "extra.hf_overrides"),
        (
            "vllm",
            {"extra": {"kv_transfer_config": {"kv_connector": "x"}}},
            "extra.kv_transfer_config",
        ),
        ("vllm", {"extra": {"logits_processors": ["evil_plugin.LP"]}}, "extra.logits_processors"),
        ("vllm", {"extra": {"worker_cls": "evil_plugin.W"}}, "extra.worker_cls"),
        (
            "vllm",
            {"extra": {"model_loader_extra_config": {"a": 1}}},
            "extra.model_loader_extra_config",
        ),
        ("vllm", {"extra": {"download_dir": "/var/cache"}}, "extra.download_dir"),
        ("vllm", {"extra": {"tokenizer": "/etc"}}, "extra.tokenizer"),
        ("vllm", {"extra": {"dtype": "float16"}}, "extra.dtype"),
        ("sglang", {"extra": {"download_dir": "/var/cache"}}, "extra.download_dir"),
        ("sglang", {"extra": {"host": "0.0.0.0"}}, "extra.host"),
        ("sglang", {"extra": {"custom_weight_loader": [plugin]}}, "extra.custom_weight_loader"),
        (
            "sglang",
            {"extra": {"model_loader_extra_config": "{}"}},
            "extra.model_loader_extra_config",
        ),
        ("sglang", {"extra": {"json_model_override_args": "{}"}}, "extra.json_model_override_args"),
        ("sglang", {"extra": {"tokenizer_path": "/etc"}}, "extra.tokenizer_path"),
        ("sglang", {"extra": {"forward_hooks": [plugin]}}, "extra.forward_hooks"),
    ]


@pytest.mark.parametrize("case", range(len(_attacks("p"))))
def test_code_file_and_host_params_are_refused_and_nothing_runs(
    client: TestClient[Litestar], marker: tuple[Path, Path], case: int
) -> None:
    """Keys naming code, files, folders or hosts (nested, JSON strings) are 422 param_refused."""
    plugin, _ = marker
    backend, params, where = _attacks(str(plugin))[case]
    body = {"backend": backend, "model": MODEL, "engine_params": params}
    for r in _both(client, body):
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == f"$.engine_params.{where}"
        assert error["code"] == "param_refused"
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert status["state"] == "empty"


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_reasoning_parser_is_a_name_from_the_allowlist_never_code(
    client: TestClient[Litestar], marker: tuple[Path, Path], backend: str
) -> None:
    """A load's `reasoning_parser` naming a plugin file or a module is 422, nothing imported."""
    plugin, _ = marker
    for name in (str(plugin), "evil_plugin:Parser", "evil_plugin"):
        body = {"backend": backend, "model": MODEL, "reasoning_parser": name}
        for r in _both(client, body):
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert error["param"] == "$.reasoning_parser"
            # a long path stops at the field's length cap, a short name at the allowlist
            assert "known: deepseek_r1, none, think" in error["message"] or (
                error["message"] == "reasoning_parser: must be at most 64 characters long"
            )


@pytest.mark.parametrize(
    ("backend", "key", "hint"),
    [("vllm", "max_num_seq", "max_num_seqs"), ("sglang", "max_total_tokns", "max_total_tokens")],
)
def test_unknown_key_is_named_with_a_suggestion(
    client: TestClient[Litestar], backend: str, key: str, hint: str
) -> None:
    """A key no allowlist declares is 422 unknown_param with the closest declared name."""
    body = {"backend": backend, "model": MODEL, "engine_params": {"extra": {key: 4}}}
    for r in _both(client, body):
        assert r.status_code == 422
        error = r.json()["error"]
        assert (error["param"], error["code"]) == (f"$.engine_params.extra.{key}", "unknown_param")
        assert f"did you mean '{hint}'" in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        # under the body's own depth limit (64), over the allowlist's (8)
        ({"hf_overrides": _nested(40)}, "$.engine_params.extra.hf_overrides"),
        (
            {"compilation_config": "[" * 3000 + "]" * 3000},
            "$.engine_params.extra.compilation_config",
        ),
        ({"compilation_config": {"custom_ops": ["+rms_norm"] * 300}}, None),
        ({"block_size": "x" * 5000}, "$.engine_params.extra.block_size"),
    ],
)
@pytest.mark.parametrize("backend", ["vllm", "vllm-spec"])
def test_deep_and_large_values_are_422_never_500(
    client: TestClient[Litestar], backend: str, extra: dict[str, Any], param: str | None
) -> None:
    """Depth, string length and item counts are bounded: 422 even where the key is opted in."""
    body = {"backend": backend, "model": MODEL, "engine_params": {"extra": extra}}
    for r in _both(client, body):
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"].startswith(param or "$.engine_params.extra.compilation_config")


@pytest.mark.parametrize("backend", ["vllm", "vllm-spec"])
def test_a_400_deep_value_is_refused_at_the_body(
    client: TestClient[Litestar], backend: str
) -> None:
    """A value nested 400 deep (once a RecursionError and a 500) is refused before any parsing."""
    extra = {"hf_overrides": _nested(400)}
    body = {"backend": backend, "model": MODEL, "engine_params": {"extra": extra}}
    for r in _both(client, body):
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]["message"]


def test_operator_opt_in_allows_that_key_only(client: TestClient[Litestar]) -> None:
    """`extra_allow` opens the listed keys for that backend alone; the rest stay refused."""
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}
    opted = {"backend": "vllm-spec", "model": MODEL, "engine_params": {"extra": spec}}
    r = client.post("/v1/model/validate", json=opted, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["plan"]["engine_params"]["extra"] == spec
    plain = {**opted, "backend": "vllm"}
    r = client.post("/v1/model/validate", json=plain, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "param_refused")
    other = {**opted, "engine_params": {"extra": {"worker_cls": "x.Y"}}}
    r = client.post("/v1/model/validate", json=other, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "$.engine_params.extra.worker_cls")


def test_vetted_knobs_pass_typed() -> None:
    """The capacity knobs operators use pass, nested and JSON-string ones included, typed."""
    extra = {
        "kv_cache_memory_bytes": 1 << 30,
        "block_size": 16,
        "enable_chunked_prefill": True,
        "cpu_offload_gb": 0.5,
        "data_parallel_size": 1,
        "scheduling_policy": "fcfs",
        "compilation_config": json.dumps(
            {"mode": 3, "cudagraph_mode": "PIECEWISE", "custom_ops": ["+rms_norm"]}
        ),
        "structured_outputs_config": {"backend": "xgrammar"},
    }
    checked = check_extra(extra)
    assert checked["compilation_config"] == {
        "mode": 3,
        "cudagraph_mode": "PIECEWISE",
        "custom_ops": ["+rms_norm"],
    }
    kwargs = engine_kwargs("/m", VllmParams(extra=extra))
    assert kwargs["compilation_config"] == checked["compilation_config"]  # parsed, as checked
    for bad, code in (
        ({"block_size": True}, "invalid_params"),
        ({"block_size": 0}, "invalid_params"),
        ({"compilation_config": {"mode": 9}}, "invalid_params"),
        ({"compilation_config": "{not json"}, "invalid_params"),
        ({"compilation_config": {"custom_ops": ["../x"]}}, "invalid_params"),
        ({"scheduling_policy": "lifo"}, "invalid_params"),
        ({"scheduling_policy": {}}, "invalid_params"),  # unhashable: once a TypeError
        ({"compilation_config": {"mode": [3]}}, "invalid_params"),
    ):
        with pytest.raises(ParamsValidationError) as caught:
            check_extra(bad)
        assert (caught.value.status_code, caught.value.code) == (422, code)


def test_shipped_presets_pass_the_allowlist() -> None:
    """Every preset in the shipped adapters.yaml (smollm2-135m-vllm's KV cache size) passes."""
    registry = AdapterRegistry.from_file(REPO / "adapters.yaml", use_entry_points=False)
    checked = 0
    for preset in registry.presets.values():
        registered = registry.resolve(preset.backend)
        policy: ParamPolicy | None = getattr(registered.adapter_cls, "extra_policy", None)
        if policy is None:
            continue
        params = registry.build_params(preset.backend, preset.engine_params)
        # a backend with an extra_policy has `extra` in its params (the class is known at run
        # time only); not recursed, so the policy sees the very value the adapter would
        policy.check(
            attrs.asdict(params, recurse=False)["extra"], allow=registered.entry.extra_allow
        )
        context = AdapterContext(name=preset.backend, extra_allow=registered.entry.extra_allow)
        if preset.model.startswith("bundled:"):
            # a hub model's reachability is the load's question (these machines are offline)
            registered.adapter_cls(context).check(preset.model, params)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize(
    ("allow", "message"),
    [
        ("[speculative_confg]", "did you mean 'speculative_config'"),
        ("[block_size]", "allowed already"),
        ("[dtype]", "cannot be allowed"),
        ('["a b"]', "(line 5)"),
    ],
)
def test_extra_allow_is_checked_at_start_up(allow: str, message: str) -> None:
    """A typo, a needless or reserved key, or a malformed entry in extra_allow stops start-up."""
    text = (
        f"adapters:\n  vllm:\n    module: adapters.vllm:VllmAdapter\n\n    extra_allow: {allow}\n"
    )
    with pytest.raises(RegistryError) as caught:
        AdapterRegistry(parse_registry(text), use_entry_points=False)
    assert "adapters.vllm.extra_allow" in str(caught.value)
    assert message in str(caught.value)


def test_every_declared_key_is_a_real_engine_argument() -> None:
    """The vLLM allowlist names only real vLLM 0.32 fields, nested ones too (read from source)."""
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    assert spec is not None
    assert spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations)))
    sources = {
        "": root / "engine" / "arg_utils.py",
        "compilation_config": root / "config" / "compilation.py",
        "structured_outputs_config": root / "config" / "structured_outputs.py",
    }
    for prefix, source in sources.items():
        text = source.read_text("utf-8")
        fields = VLLM_EXTRA.spec.fields
        nested = fields[prefix] if prefix else VLLM_EXTRA.spec
        assert isinstance(nested, Obj)
        for name in nested.fields:
            assert f"\n    {name}: " in text, f"{prefix}.{name}"
    assert set(SGLANG_EXTRA.spec.fields)  # sglang's names are pinned by the contract tests


def test_bounds_walk_is_iterative_and_mask_tree_is_capped() -> None:
    """A 5000-deep value is a 422 from the bounds walk, and masking it cannot recurse out."""
    deep = _nested(5000)
    with pytest.raises(ParamsValidationError) as caught:
        check_bounds(deep, "$.x", Limits())
    assert caught.value.code == "param_limit"
    masked = mask_tree({"x": deep}, SecretStore())
    assert isinstance(masked, dict)
