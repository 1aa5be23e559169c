"""Control plane through Litestar's test client: load, unload, validate, status, adapters."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from litestar.testing import TestClient

from helpers import ADMIN, API, chat_body, load


def test_load_reports_plan_timings_and_memory(client: Any) -> None:
    """A load answers with the effective params, the time split and the memory change."""
    body = load(client, backend="echo", model="echo", engine_params={"token_delay_ms": 1})
    assert body["status"] == "loaded"
    assert body["plan"]["backend"] == "echo"
    assert body["plan"]["engine_params"]["token_delay_ms"] == 1.0
    assert body["plan"]["engine_params"]["max_n"] == 4  # default merged under the request
    assert set(body["timings"]) == {"import_s", "init_s", "warmup_s", "total_s"}
    assert body["memory"]["rss_before_mib"] > 0
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert status["state"] == "ready"
    assert status["plan"]["served_model_name"] == "echo"


def test_preset_load_and_served_name(client: Any) -> None:
    """A preset supplies backend, model and params; served_model_name overrides the alias."""
    body = load(client, preset="slow-echo", served_model_name="my-echo")
    assert body["plan"]["engine_params"]["token_delay_ms"] == 20.0
    models = client.get("/v1/models", headers=API).json()
    assert [m["id"] for m in models["data"]] == ["my-echo"]


def test_load_while_loaded_is_409_unless_replace(client: Any) -> None:
    """A second load conflicts; `replace: true` swaps the model."""
    load(client, preset="echo")
    r = client.post("/v1/model/load", json={"preset": "slow-echo"}, headers=ADMIN)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "model_already_loaded"
    body = load(client, preset="slow-echo", replace=True)
    assert body["plan"]["preset"] == "slow-echo"


def test_bad_engine_param_is_422_naming_the_field(client: Any) -> None:
    """A wrong type or an unknown param names its JSON path; nothing is loaded."""
    r = client.post(
        "/v1/model/load",
        json={"backend": "echo", "model": "echo", "engine_params": {"token_delay_ms": "fast"}},
        headers=ADMIN,
    )
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "$.engine_params.token_delay_ms"
    r = client.post(
        "/v1/model/load",
        json={"backend": "echo", "model": "echo", "engine_params": {"token_dealy_ms": 1}},
        headers=ADMIN,
    )
    assert r.status_code == 422
    assert "token_dealy_ms" in r.json()["error"]["message"]
    assert client.get("/v1/model/status", headers=ADMIN).json()["state"] == "empty"


def test_validator_message_survives(client: Any) -> None:
    """A range validator's own message reaches the client with the field path."""
    r = client.post(
        "/v1/model/load",
        json={"backend": "echo", "model": "echo", "engine_params": {"token_delay_ms": -5}},
        headers=ADMIN,
    )
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == "$.engine_params.token_delay_ms"
    assert "between 0 and 60000" in err["message"]


def test_unknown_backend_and_preset_are_404(client: Any) -> None:
    """Names that the registry does not know are 404 with their own codes."""
    r = client.post("/v1/model/load", json={"backend": "nope", "model": "x"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "backend_not_found")
    r = client.post("/v1/model/load", json={"preset": "nope"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "preset_not_found")


def test_malformed_load_bodies(client: Any) -> None:
    """Bad JSON is 400; both or neither of backend/preset, or a missing model, is 422."""
    json_type = {**ADMIN, "Content-Type": "application/json"}
    r = client.post("/v1/model/load", content=b"{not json", headers=json_type)
    assert r.status_code == 400
    r = client.post("/v1/model/load", json={"backend": "echo"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "$.model")
    r = client.post("/v1/model/load", json={}, headers=ADMIN)
    assert r.status_code == 422
    r = client.post("/v1/model/load", json={"preset": "echo", "replace": "yes"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (422, "$.replace")


def test_failed_load_leaves_clean_state_and_next_load_works(client: Any) -> None:
    """An engine failure is a sanitised 500, state goes back to empty, last_error says why."""
    r = client.post(
        "/v1/model/load",
        json={"backend": "echo", "model": "echo", "engine_params": {"fail_on_load": "no GPU"}},
        headers=ADMIN,
    )
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "engine_error"
    assert "no GPU" in r.json()["error"]["message"]
    status = client.get("/v1/model/status", headers=ADMIN).json()
    assert status["state"] == "empty"
    assert "no GPU" in status["last_error"]
    r = client.post("/v1/chat/completions", json=chat_body(), headers=API)
    assert r.status_code == 503
    assert r.json()["error"]["message"] == (
        "no model is loaded: the last load failed: see last_error in GET /v1/model/status"
    )
    load(client, preset="echo")
    assert client.post("/v1/chat/completions", json=chat_body(), headers=API).status_code == 200


def test_unload_is_idempotent_and_reports_memory(client: Any) -> None:
    """Unload frees and reports; a second unload says the server is already empty."""
    load(client, preset="echo")
    r = client.post("/v1/model/unload", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "unloaded"
    assert body["memory"]["rss_after_mib"] > 0
    assert body["memory_settled"] is True
    r = client.post("/v1/model/unload", json={}, headers=ADMIN)
    assert r.json()["status"] == "empty"
    r = client.post("/v1/chat/completions", json=chat_body(), headers=API)
    assert r.status_code == 503
    assert r.headers["retry-after"]
    assert r.json()["error"]["message"] == "no model is loaded: load one with POST /v1/model/load"


def test_validate_is_a_dry_run(client: Any) -> None:
    """Validate merges params and checks env without loading anything."""
    r = client.post(
        "/v1/model/validate",
        json={"preset": "slow-echo", "engine_params": {"max_n": 2}, "env": {"HF_TOKEN": "hf_x1"}},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["engine_params"]["max_n"] == 2
    assert plan["engine_params"]["token_delay_ms"] == 20.0
    assert plan["env_keys"] == ["HF_TOKEN"]
    assert client.get("/v1/model/status", headers=ADMIN).json()["state"] == "empty"
    assert "HF_TOKEN" not in os.environ or os.environ["HF_TOKEN"] != "hf_x1"


def test_env_allowlist_and_always_refused_keys(client: Any) -> None:
    """Keys outside the allowlist, and keys that load code, are refused by name."""
    for key in ("LD_PRELOAD", "PYTHONPATH", "PATH", "HTTPS_PROXY", "https_proxy", "HF_ENDPOINT"):
        r = client.post(
            "/v1/model/validate", json={"preset": "echo", "env": {key: "x"}}, headers=ADMIN
        )
        assert r.status_code == 422, key
        assert r.json()["error"]["code"] == "env_refused"
    r = client.post(
        "/v1/model/validate", json={"preset": "echo", "env": {"AWS_X": "v"}}, headers=ADMIN
    )
    assert r.status_code == 422
    assert "not allowed for backend 'echo'" in r.json()["error"]["message"]


def test_env_is_set_while_loaded_and_restored_at_unload(client: Any) -> None:
    """Injected env is visible to the engine while loaded and gone after unload."""
    assert "ECHO_TEST_VAR" not in os.environ
    load(client, preset="echo", env={"ECHO_TEST_VAR": "value-123"})
    assert os.environ["ECHO_TEST_VAR"] == "value-123"
    client.post("/v1/model/unload", headers=ADMIN)
    assert "ECHO_TEST_VAR" not in os.environ


def test_failed_load_restores_env(client: Any) -> None:
    """A load that fails removes the env it set."""
    r = client.post(
        "/v1/model/load",
        json={"backend": "crashing", "model": "x", "env": {"HF_TOKEN": "hf_canary_restore"}},
        headers=ADMIN,
    )
    assert r.status_code == 500
    assert os.environ.get("HF_TOKEN") != "hf_canary_restore"


def test_concurrent_load_gets_409(app_factory: Any) -> None:
    """While one load runs, another lifecycle call conflicts; a chat request waits for it."""
    with TestClient(app_factory()) as client:
        results: dict[str, int] = {}

        def slow_load() -> None:
            r = client.post(
                "/v1/model/load",
                json={"preset": "echo", "engine_params": {"load_delay_ms": 1500}},
                headers=ADMIN,
            )
            results["first"] = r.status_code

        t = threading.Thread(target=slow_load)
        t.start()
        deadline = time.monotonic() + 5
        while client.get("/v1/model/status", headers=ADMIN).json()["state"] != "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = client.post("/v1/model/load", json={"preset": "echo"}, headers=ADMIN)
        assert r.status_code == 409
        assert r.json()["error"] == {
            "message": "a load is in progress",
            "type": "conflict_error",
            "param": None,
            "code": "lifecycle_busy",
        }
        assert client.post("/v1/model/unload", headers=ADMIN).status_code == 409
        r = client.post("/v1/chat/completions", json=chat_body(), headers=API)
        assert r.status_code == 200, r.text
        t.join()  # the chat can finish before the loading thread has stored its answer
        assert results["first"] == 200


def test_adapters_lists_schemas_with_descriptions(client: Any) -> None:
    """GET /v1/adapters shows every backend with defaults and a documented JSON Schema."""
    r = client.get("/v1/adapters", headers=ADMIN)
    assert r.status_code == 200
    data = {a["name"]: a for a in r.json()["data"]}
    assert set(data) == {"echo", "crashing"}
    schema = data["echo"]["params_schema"]
    assert schema["additionalProperties"] is False
    prop = schema["properties"]["token_delay_ms"]
    assert prop["type"] == "number"
    assert "decode speed" in prop["description"]
    assert data["echo"]["defaults"]["token_delay_ms"] == 0.0
    assert "echo" in r.json()["presets"]
