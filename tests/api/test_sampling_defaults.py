"""Default sampling: request, then the preset's `sampling_defaults`, then the model's, then none.

A fake echo (tests/fakes) answers with the sampling it received, its own "generation_config"
filled in, so the whole chain is visible in the answer; status and /v1/adapters show the values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from helpers import ADMIN, API, chat_body, load, make_registry, make_settings
from registry.config import RegistryError
from service.app import create_app

REGISTRY = """
adapters:
  sampling-echo:
    module: fakes.adapters:SamplingEchoAdapter
models:
  tuned:
    backend: sampling-echo
    model: echo
    sampling_defaults: {temperature: 0.2, top_p: 0.9}
  plain:
    backend: sampling-echo
    model: echo
"""


@pytest.fixture
def client(tmp_path: Path) -> Any:
    """A test client over the registry above."""
    app = create_app(make_settings(), registry=make_registry(tmp_path, REGISTRY))
    with TestClient(app) as c:
        yield c


def answer(client: Any, model: str, **extra: Any) -> str:
    """The text of a whole (non-streamed) answer."""
    r = client.post(
        "/v1/chat/completions", json={**chat_body(), "model": model, **extra}, headers=API
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_completions_take_the_preset_defaults_too(client: Any) -> None:
    """/v1/completions fills unset sampling from the preset, like chat (and vLLM)."""
    load(client, preset="tuned")
    body = {"model": "tuned", "prompt": "hi", "max_tokens": 4}
    r = client.post("/v1/completions", json=body, headers=API)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "temperature=0.2 top_p=0.9 top_k=40"
    r = client.post("/v1/completions", json={**body, "temperature": 1.5}, headers=API)
    assert r.json()["choices"][0]["text"] == "temperature=1.5 top_p=0.9 top_k=40"


def test_preset_over_model_under_request(client: Any) -> None:
    """Unset fields take the preset's value, then the model's; a request's own value wins."""
    load(client, preset="tuned")
    assert answer(client, "tuned") == "temperature=0.2 top_p=0.9 top_k=40"
    assert answer(client, "tuned", temperature=1.5, top_p=1) == "temperature=1.5 top_p=1.0 top_k=40"
    caps = client.get("/v1/model/status", headers=ADMIN).json()["capabilities"]
    assert caps["sampling_defaults"] == {
        "effective": {"top_k": 40, "top_p": 0.9, "temperature": 0.2},
        "preset": {"temperature": 0.2, "top_p": 0.9},
        "model": {"top_k": 40, "top_p": 0.5},
    }
    assert "top_k" in caps["sampling"]
    assert caps["max_n"] == 4
    presets = client.get("/v1/adapters", headers=ADMIN).json()["presets"]
    assert presets["tuned"]["sampling_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    assert presets["plain"]["sampling_defaults"] == {}


def test_no_preset_defaults_leaves_the_model_and_engine(client: Any) -> None:
    """Without sampling_defaults the model's values apply and temperature stays the engine's."""
    load(client, preset="plain")
    assert answer(client, "plain") == "temperature=None top_p=0.5 top_k=40"


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ("{temprature: 0.2}", "temprature: not a sampling field"),
        ("{temperature: 3}", "temperature: must be at least 0 and at most 2"),
        ("{top_p: 0}", "top_p: must be greater than 0 and at most 1"),
        ("{top_k: 1.5}", "top_k: must be an integer"),
        ("{temperature: true}", "temperature: must be a number"),
        ("{min_p: 0.1}", "min_p: the backend does not apply it"),
    ],
)
def test_bad_sampling_defaults_stop_the_start(tmp_path: Path, defaults: str, message: str) -> None:
    """Unknown keys, values out of the request's range and fields the backend ignores."""
    text = REGISTRY.replace("{temperature: 0.2, top_p: 0.9}", defaults)
    with pytest.raises(RegistryError, match=f"models.tuned.sampling_defaults.{message}"):
        make_registry(tmp_path, text)
