"""Structured output on vLLM's CPU build (its own structured-output backend) through the service.

The same cases and assertions as tests/engines/test_structured_transformers.py (shared in
tests/structured_cases.py), whole and streamed, over one engine start for the module.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from structured_cases import CASES, QUESTION, UNCOMPILABLE, check_case

from helpers import ADMIN, API, ROOT, LiveServer, make_settings
from registry.registry import AdapterRegistry
from service.app import create_app

pytestmark = [
    pytest.mark.engine,
    pytest.mark.vllm,
    # importing vLLM 0.32 on torch 2.13 warns about torch.jit; the service thread imports it here
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

PRESET = "smollm2-135m-vllm"


@pytest.fixture(scope="module")
def url(vllm_env: None) -> Iterator[str]:
    """The app over adapters.yaml with the vLLM preset loaded (tests/engines/conftest.py env)."""
    registry = AdapterRegistry.from_file(ROOT / "adapters.yaml", use_entry_points=False)
    with LiveServer(create_app(make_settings(), registry=registry)) as live:
        r = httpx.post(
            f"{live.url}/v1/model/load", json={"preset": PRESET}, headers=ADMIN, timeout=600
        )
        assert r.status_code == 200, r.text
        try:
            yield live.url
        finally:
            httpx.post(f"{live.url}/v1/model/unload", json={}, headers=ADMIN, timeout=600)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_constraint_is_met(url: str, case: str, stream: bool) -> None:
    """The answer ends by itself and satisfies the constraint, whole and streamed."""
    check_case(url, PRESET, case, stream=stream)


@pytest.mark.parametrize(("fields", "param"), UNCOMPILABLE)
def test_uncompilable_constraint_is_a_400(url: str, fields: dict[str, object], param: str) -> None:
    """What vLLM's backend cannot compile is a 400, not an engine error."""
    body = {"model": PRESET, "messages": QUESTION, "max_tokens": 4, **fields}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
