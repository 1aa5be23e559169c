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
    """All seven backends load from adapters.yaml; building the app imports no engine package."""
    names = set(registry().names)
    assert names == {
        "echo", "transformers", "vllm", "sglang", "deepseek", "openai-upstream", "llamacpp"
    }  # fmt: skip
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
