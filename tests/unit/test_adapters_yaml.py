"""The repository's own adapters.yaml: every backend the mission names, each documented."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT
from registry.registry import AdapterRegistry


def registry() -> AdapterRegistry:
    """The registry exactly as `make serve` builds it."""
    return AdapterRegistry.from_file(ROOT / "adapters.yaml", use_entry_points=False)


def test_every_backend_is_registered_without_importing_an_engine() -> None:
    """All six backends load from adapters.yaml; building the app imports no engine package."""
    names = set(registry().names)
    assert names == {"echo", "transformers", "vllm", "sglang", "openai-upstream", "llamacpp"}
    # a fresh interpreter: this test process may have imported engines for other tests
    probe = (
        "import sys; from service.app import create_app; from service.settings import Settings; "
        "create_app(Settings(admin_keys=('k-123456',)));"
        "print(sorted({'torch', 'vllm', 'sglang', 'transformers', 'llama_cpp'} & set(sys.modules)))"
    )
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_param_of_every_backend_is_documented() -> None:
    """/v1/adapters shows a description for each params field of each backend."""
    reg = registry()
    for name in reg.names:
        described = reg.describe(name)
        assert described["description"], name
        props = described["params_schema"]["properties"]
        undocumented = [p for p, schema in props.items() if not schema.get("description")]
        assert undocumented == [], (name, undocumented)


def test_presets_resolve() -> None:
    """Each preset names a registered backend and params its schema accepts."""
    reg = registry()
    assert {"smollm2-135m", "smollm2-135m-vllm", "echo", "deepseek-api"} <= set(reg.presets)
    for preset in reg.presets.values():
        reg.build_params(preset.backend, preset.engine_params)


def test_deepseek_r1_is_a_preset_over_each_engine() -> None:
    """DeepSeek-R1 loads as an engine preset with the deepseek_r1 parser and the card's sampling."""
    reg = registry()
    for alias, backend in (("deepseek-r1", "vllm"), ("deepseek-r1-sglang", "sglang")):
        preset = reg.preset(alias)
        assert (preset.backend, preset.reasoning_parser) == (backend, "deepseek_r1")
        assert preset.sampling_defaults == {"temperature": 0.6, "top_p": 0.95}
        assert reg.reasoning_parser(backend, alias) == "deepseek_r1"
        assert reg.reasoning_parser(backend, alias, "none") is None
    assert all(reg.resolve(name).entry.reasoning_parser is None for name in reg.names)
