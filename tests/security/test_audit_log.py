"""Control-plane audit log: one masked JSON line per call, in the log and a 0600 file."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from helpers import ADMIN, ADMIN_KEY, API, chat_body

TOKEN = "hf_audit_canary_0123456789"


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_control_calls_are_audited_to_a_0600_file(app_factory: Any, tmp_path: Path) -> None:
    """Load/validate/status/unload each leave one line: key id, action, params, status, time."""
    path = tmp_path / "audit.log"
    with TestClient(app_factory(audit_log=path)) as client:
        body = {
            "preset": "echo",
            "env": {"HF_TOKEN": TOKEN},
            "engine_params": {"token_delay_ms": 0},
        }
        assert client.post("/v1/model/validate", json=body, headers=ADMIN).status_code == 200
        assert client.post("/v1/model/load", json=body, headers=ADMIN).status_code == 200
        assert client.get("/v1/model/status", headers=ADMIN).status_code == 200
        assert client.post("/v1/chat/completions", json=chat_body(), headers=API).status_code == 200
        assert client.post("/v1/model/unload", headers=ADMIN).status_code == 200
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert ADMIN_KEY not in text
    assert TOKEN not in text
    lines = _lines(path)
    assert [line["action"] for line in lines] == ["validate", "load", "status", "unload"]
    expected_id = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:12]
    load_line = lines[1]
    assert load_line["key_id"] == expected_id
    assert load_line["preset"] == "echo"
    assert load_line["status"] == 200
    assert load_line["params"]["env_keys"] == ["HF_TOKEN"]
    assert load_line["params"]["engine_params"] == {"token_delay_ms": 0}
    assert load_line["duration_ms"] >= 0
    assert all(line["request_id"] for line in lines)


def test_refused_calls_are_audited_without_the_key(app_factory: Any, tmp_path: Path) -> None:
    """A wrong key's attempt is recorded with status 401 and a hash, never the key itself."""
    path = tmp_path / "audit.log"
    wrong = "wrong-key-attempt-000001"
    with TestClient(app_factory(audit_log=path)) as client:
        r = client.post("/v1/model/load", json={"preset": "echo"}, headers={"X-API-Key": wrong})
        assert r.status_code == 401
        r = client.post("/v1/model/unload")
        assert r.status_code == 401
    assert wrong not in path.read_text()
    first, second = _lines(path)
    assert first["status"] == 401
    assert first["key_id"] == hashlib.sha256(wrong.encode()).hexdigest()[:12]
    assert second["key_id"] is None


def test_secret_params_are_masked_in_audit_lines(
    app_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret inside engine params or served name is masked in the audit logger's line."""
    with TestClient(app_factory()) as client, caplog.at_level(logging.INFO, "inference_wrapper"):
        body = {"preset": "echo", "served_model_name": ADMIN_KEY}
        assert client.post("/v1/model/load", json=body, headers=ADMIN).status_code == 200
    audit = [r for r in caplog.records if r.name == "inference_wrapper.audit"]
    assert len(audit) == 1
    message = audit[0].getMessage()
    assert ADMIN_KEY not in message
    assert json.loads(message)["params"]["served_model_name"] == "***"
