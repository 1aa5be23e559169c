"""IW_LOG_FORMAT=json: every line the service writes to stdout or stderr is one JSON object."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from helpers import ADMIN, API, ROOT, ServiceProcess, chat_body

NOISY_REGISTRY = """
adapters:
  noisy:
    module: fakes.adapters:NoisyAdapter
  echo:
    module: adapters.echo:EchoAdapter
models:
  echo: {backend: echo, model: echo}
"""


def parsed_lines(text: str) -> list[dict[str, object]]:
    """Each line as a JSON object; fails naming the first line that is not one."""
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(value, dict), line
        out.append(value)
    return out


def exercise(url: str, load_body: dict[str, object], model: str) -> None:
    """Load, chat (whole and streamed), unload, with checks on each status."""
    r = httpx.post(f"{url}/v1/model/load", json=load_body, headers=ADMIN, timeout=300)
    assert r.status_code == 200, r.text
    body = {**chat_body("hello there"), "model": model, "max_tokens": 4}
    assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=API, timeout=120).is_success
    streamed = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=API, timeout=120
    )
    assert streamed.is_success
    assert httpx.post(f"{url}/v1/model/unload", headers=ADMIN, timeout=120).is_success


def test_engine_noise_and_the_key_notice_are_json_lines(tmp_path: Path) -> None:
    """print, fd writes, warnings, bars and subprocess output all arrive as JSON; no raw key."""
    registry = tmp_path / "adapters.yaml"
    registry.write_text(NOISY_REGISTRY)
    env = {
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "IW_CACHE_DIR": str(tmp_path / "cache"),
    }
    service = ServiceProcess(tmp_path, env=env, registry=registry)
    # no IW_ADMIN_KEY: the generated one goes to a 0600 file, never to the log
    service.env.pop("IW_ADMIN_KEY")
    with service:
        key = (tmp_path / "cache" / "admin-key").read_text().strip()
        headers = {"X-API-Key": key}
        r = httpx.post(
            f"{service.url}/v1/model/load",
            json={"backend": "noisy", "model": "m"},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert httpx.post(f"{service.url}/v1/model/unload", headers=headers).is_success
        r = httpx.post(
            f"{service.url}/v1/model/load", json={"preset": "echo"}, headers=headers, timeout=60
        )
        assert r.status_code == 200
        body = {**chat_body("hello there"), "model": "echo"}
        assert httpx.post(f"{service.url}/v1/chat/completions", json=body, headers=API).is_success
    text = service.log()
    lines = parsed_lines(text)
    messages = [str(line.get("message")) for line in lines]
    for noise in (
        "engine banner on stdout",
        "engine note on stderr",
        "raw C-level line on fd 2",
        "an engine future warning",
        "Loading: 100%|###|",
        "engine subprocess line",
    ):
        assert any(noise in m for m in messages), noise
    assert key not in text
    assert any("admin-key" in m for m in messages)


@pytest.mark.engine
@pytest.mark.transformers
@pytest.mark.slow
def test_transformers_output_is_json_lines(tmp_path: Path) -> None:
    """The default preset (transformers, bundled SmolLM2) loads, serves and unloads in JSON."""
    with ServiceProcess(tmp_path, env={"HF_HUB_OFFLINE": "1"}) as service:
        exercise(service.url, {"preset": "smollm2-135m"}, "smollm2-135m")
    lines = parsed_lines(service.log())
    assert any(line.get("logger") == "registry.manager" for line in lines)
