"""Keys: deny by default, admin vs API keys, Bearer and X-API-Key, open data plane."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import TestClient

from helpers import ADMIN, ADMIN_KEY, API, API_KEY, chat_body, load

CONTROL = [
    ("POST", "/v1/model/load"),
    ("POST", "/v1/model/unload"),
    ("POST", "/v1/model/validate"),
    ("GET", "/v1/model/status"),
    ("GET", "/v1/adapters"),
]
DATA = [("POST", "/v1/chat/completions"), ("GET", "/v1/models")]
OPS = [("GET", "/metrics"), ("GET", "/v1/telemetry")]


@pytest.mark.parametrize(("method", "path"), CONTROL + DATA + OPS)
def test_every_route_needs_a_key(client: Any, method: str, path: str) -> None:
    """Without a key every route but /health and /ready is 401 in the OpenAI envelope."""
    r = client.request(method, path, json={})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error"
    assert err["code"] == "missing_api_key"


def test_health_and_ready_are_open(client: Any) -> None:
    """Probes answer without a key."""
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503


@pytest.mark.parametrize(("method", "path"), CONTROL)
def test_api_key_does_not_open_control_plane(client: Any, method: str, path: str) -> None:
    """A valid data-plane key on the control plane is 403, a wrong key 401, each with a code."""
    r = client.request(method, path, json={}, headers=API)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "insufficient_permissions")
    r = client.request(method, path, json={}, headers={"X-API-Key": "nope"})
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key")


def test_key_forms(client: Any) -> None:
    """Both `Authorization: Bearer` and `X-API-Key` carry keys; admin keys open the data plane."""
    load(client, preset="echo")
    for headers in (
        {"Authorization": f"Bearer {API_KEY}"},
        {"X-API-Key": API_KEY},
        {"Authorization": f"bearer {ADMIN_KEY}"},
        ADMIN,
    ):
        assert (
            client.post("/v1/chat/completions", json=chat_body(), headers=headers).status_code
            == 200
        )
    for headers, code in (
        ({"Authorization": API_KEY}, "malformed_authorization"),
        ({"Authorization": "Bearer "}, "malformed_authorization"),
        ({"Authorization": f"Basic {API_KEY}"}, "malformed_authorization"),
        ({"X-API-Key": API_KEY + "x"}, "invalid_api_key"),
        ({"X-API-Key": API_KEY[:-1]}, "invalid_api_key"),
    ):
        r = client.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (401, code), headers
        assert API_KEY not in r.text  # a refusal never echoes what was sent


def test_open_data_plane_when_no_api_key(app_factory: Any) -> None:
    """With no API key configured the data plane is open, the control plane is not."""
    with TestClient(app_factory(api_keys=())) as client:
        load(client, preset="echo")
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert client.post("/v1/model/unload").status_code == 401


def test_metrics_open_only_when_configured(app_factory: Any) -> None:
    """/metrics needs a key unless IW_METRICS_OPEN; telemetry always needs one."""
    with TestClient(app_factory(metrics_open=True)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/telemetry").status_code == 401
        assert client.get("/v1/telemetry", headers=API).status_code == 200
