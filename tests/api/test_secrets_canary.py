"""Canary secrets: planted in keys and env, driven through every route, found nowhere outside.

The log is captured from the service's own masked handler (JSON lines, DEBUG level, uvicorn's
access log included) while a real uvicorn serves the app; response bodies and headers of every
call are kept too. The test also proves the masking was exercised (a failing load's traceback
quoted the env token and arrived as `***`), so it cannot pass by never logging anything.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import TEST_REGISTRY, LiveServer, make_registry, make_settings
from registry.secrets import SecretStore
from service.app import create_app
from service.logs import configure_logging

ADMIN_CANARY = "adm-CANARY-7f3a9c1e5b"
API_CANARY = "api-CANARY-2d8e4f6a0c"
ENV_CANARY = "hf_CANARY_b41c9e77d2aa"
ENV_CANARY_2 = "ech-CANARY-5150e0ff"


@pytest.fixture
def log_buffer() -> Iterator[io.StringIO]:
    """Route the root logger through the service's masked handler into a buffer."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_canaries_never_leave_the_process(tmp_path: Any, log_buffer: io.StringIO) -> None:
    """No canary appears in any response, header, metric or log line."""
    secrets = SecretStore()
    configure_logging(secrets, fmt="json", level="DEBUG", stream=log_buffer)
    settings = make_settings(admin_keys=(ADMIN_CANARY,), api_keys=(API_CANARY,))
    app = create_app(settings, registry=make_registry(tmp_path, TEST_REGISTRY), secrets=secrets)
    admin = {"X-API-Key": ADMIN_CANARY}
    api = {"Authorization": f"Bearer {API_CANARY}"}
    seen: list[str] = []

    def call(method: str, path: str, **kw: Any) -> httpx.Response:
        r = httpx.request(method, f"{server.url}{path}", timeout=30, **kw)
        seen.append(r.text)
        seen.append(str(dict(r.headers)))
        return r

    with LiveServer(app) as server:
        # a load whose engine error quotes the injected token, twice, inside a URL too
        r = call(
            "POST", "/v1/model/load", headers=admin,
            json={"backend": "crashing", "model": "m", "env": {"HF_TOKEN": ENV_CANARY}},
        )  # fmt: skip
        assert r.status_code == 500
        status = call("GET", "/v1/model/status", headers=admin).json()
        assert status["last_error"]
        assert "***" in status["last_error"]
        # a load failing with a message that contains the other env value
        r = call(
            "POST", "/v1/model/load", headers=admin,
            json={"backend": "echo", "model": "echo", "env": {"ECHO_SECRET": ENV_CANARY_2},
                  "engine_params": {"fail_on_load": f"bad credential {ENV_CANARY_2}"}},
        )  # fmt: skip
        assert r.status_code == 500
        # validation errors with secrets in the body
        call("POST", "/v1/model/validate", headers=admin,
             json={"preset": "echo", "env": {"PATH": ENV_CANARY}})  # fmt: skip
        call("POST", "/v1/model/load", headers=admin,
             json={"preset": "echo", "env": {"HF_TOKEN": 12345}, "model": ENV_CANARY})  # fmt: skip
        # a successful load with env, then every route
        r = call(
            "POST", "/v1/model/load", headers=admin,
            json={"preset": "echo", "env": {"HF_TOKEN": ENV_CANARY, "ECHO_X": ENV_CANARY_2}},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["plan"]["env_keys"] == ["ECHO_X", "HF_TOKEN"]
        call("POST", "/v1/model/validate", headers=admin,
             json={"preset": "echo", "env": {"HF_TOKEN": ENV_CANARY}})  # fmt: skip
        call("GET", "/v1/model/status", headers=admin)
        call("GET", "/v1/adapters", headers=admin)
        body = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
        assert call("POST", "/v1/chat/completions", headers=api, json=body).status_code == 200
        call("POST", "/v1/chat/completions", headers=api, json={**body, "stream": True})
        call("POST", "/v1/chat/completions", headers=admin, json={**body, "temperature": "x"})
        call("POST", "/v1/chat/completions", headers={"X-API-Key": "nope-nope"}, json=body)
        call("GET", "/v1/models", headers=api)
        call("GET", "/v1/telemetry", headers=api)
        call("GET", "/metrics", headers=admin)
        call("GET", "/health")
        call("GET", "/ready")
        call("GET", f"/no/such/route?key={API_CANARY}")
        call("POST", "/v1/model/unload", headers=admin)
        call("GET", "/v1/model/status", headers=admin)

    log = log_buffer.getvalue()
    outside = "\n".join(seen)
    for canary in (ADMIN_CANARY, API_CANARY, ENV_CANARY, ENV_CANARY_2):
        assert canary not in outside, f"{canary} leaked in a response"
        assert canary not in log, f"{canary} leaked in the log"
    # the masking was exercised, not bypassed: the engine's traceback arrived masked
    assert "401 Client Error for url https://hub/api?token=***" in log
    assert "uvicorn.access" in log  # access log lines were captured and carry no key
    assert '"level":"error"' in log
