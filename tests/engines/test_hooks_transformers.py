"""max_prompt_tokens counts with the loaded transformers model's own tokenizer (bundled SmolLM2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import TestClient

from adapters.base import AdapterContext
from adapters.bundled import default_cache_dir, resolve_model_source
from helpers import API, ROOT, load, make_registry, make_settings
from service.app import create_app

pytestmark = [pytest.mark.engine, pytest.mark.transformers]

SHORT = "What is the capital of France?"


def template_tokens(text: str) -> int:
    """Prompt tokens of one user message as the transformers adapter encodes it."""
    from transformers import AutoTokenizer  # noqa: PLC0415  (engine import, test-only)

    folder = resolve_model_source(
        "bundled:smollm2-135m",
        AdapterContext(name="transformers", cache_dir=default_cache_dir()),
        progress=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_max_prompt_tokens_uses_the_model_tokenizer(tmp_path: Path) -> None:
    """A prompt of exactly the limit passes with that many tokens; a longer one is refused."""
    limit = template_tokens(SHORT)
    text = (ROOT / "adapters.yaml").read_text() + (
        "  smollm2-limited:\n"
        "    backend: transformers\n"
        "    model: bundled:smollm2-135m\n"
        "    engine_params: {dtype: float32, device: cpu, max_model_len: 2048}\n"
        "    hooks:\n"
        f"      - {{module: max_prompt_tokens, params: {{max_tokens: {limit}}}}}\n"
    )
    registry = make_registry(tmp_path, text)
    with TestClient(create_app(make_settings(), registry=registry)) as client:
        load(client, preset="smollm2-limited")
        body = {
            "model": "smollm2-limited",
            "messages": [{"role": "user", "content": SHORT}],
            "max_tokens": 2,
        }
        ok = client.post("/v1/chat/completions", json=body, headers=API)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] == limit
        body["messages"] = [{"role": "user", "content": SHORT + " Answer in one word."}]
        refused = client.post("/v1/chat/completions", json=body, headers=API)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "prompt_too_long"
        assert "(tokenizer)" in error["message"]
