"""The secret store as an attack surface: bounded, cheap per line, only accepted values stored."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from helpers import ADMIN, LiveServer
from registry.secrets import MASK, SecretStore, SecretStoreFullError, _forms


def _env(count: int, tag: str = "v") -> dict[str, str]:
    return {f"ECHO_{i}": f"secret-{tag}-{i:05d}-abcdefgh" for i in range(count)}


def test_300_env_values_do_not_freeze_the_server(app_factory: Any) -> None:
    """A load with 300 env values completes fast and /health answers within 1 s meanwhile."""
    env = _env(300)
    with LiveServer(app_factory()) as server:
        result: dict[str, Any] = {}

        def do_load() -> None:
            started = time.monotonic()
            r = httpx.post(
                f"{server.url}/v1/model/load",
                json={"preset": "echo", "env": env},
                headers=ADMIN,
                timeout=30,
            )
            result["status"] = r.status_code
            result["seconds"] = time.monotonic() - started

        loader = threading.Thread(target=do_load)
        loader.start()
        worst = 0.0
        with httpx.Client(base_url=server.url, timeout=1.0) as client:
            while loader.is_alive():
                started = time.monotonic()
                assert client.get("/health").status_code == 200
                worst = max(worst, time.monotonic() - started)
                time.sleep(0.02)
        loader.join()
        store: SecretStore = server.app.state.secrets
        assert result["status"] == 200
        assert result["seconds"] < 5
        assert worst < 1.0
        assert all(value in store for value in env.values())
        line = "x" * 150 + " nothing secret here " + "y" * 30
        started = time.perf_counter()
        for _ in range(200):
            store.mask(line)
        assert (time.perf_counter() - started) / 200 < 0.002  # the old store took ~1 ms/300


def test_refused_env_keys_values_are_never_stored(client: TestClient[Any]) -> None:
    """Values of env keys the allowlist refuses are not registered, on load and on validate."""
    store: SecretStore = client.app.state.secrets
    before = store.count
    for route in ("/v1/model/load", "/v1/model/validate"):
        body = {
            "preset": "echo",
            "env": {"ECHO_OK": "allowed-value-0001", "LD_PRELOAD": "x-evil-1"},
        }
        r = client.post(route, json=body, headers=ADMIN)
        assert r.status_code in (400, 422), r.text
        assert "allowed-value-0001" not in store
        assert "x-evil-1" not in store
    # a key outside the backend's allowlist, alone
    body = {"preset": "echo", "env": {"NOT_ALLOWED": "refused-value-0002"}}
    assert client.post("/v1/model/load", json=body, headers=ADMIN).status_code in (400, 422)
    assert "refused-value-0002" not in store
    assert store.count == before


@pytest.mark.parametrize("canary", ["CANARY\x7fsec8a", "CANARY\x85sec8b", "CANARY\u2028'q\"c"])
def test_a_secret_quoted_by_repr_in_an_error_stays_masked(
    client: TestClient[Any], canary: str
) -> None:
    """Error messages quote a field with `!r`: its escapes are a form of the secret too."""
    store: SecretStore = client.app.state.secrets
    store.add(canary)
    for body in (
        {"preset": "echo", "reasoning_parser": canary},
        {"preset": "echo", "engine_params": {f"x{canary}": 1}},
    ):
        r = client.post("/v1/model/validate", json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
        for form in (canary, repr(canary)[1:-1], ascii(canary)[1:-1], "sec8"):
            assert form not in r.text, (form, r.text)


def test_the_bound_refuses_the_load_and_keeps_masking(app_factory: Any) -> None:
    """Past IW_MAX_SECRETS a load is refused by name; values already stored stay masked."""
    app = app_factory(max_secrets=12)
    with TestClient(app) as client:
        store: SecretStore = app.state.secrets
        first = _env(5, "a")
        r = client.post("/v1/model/validate", json={"preset": "echo", "env": first}, headers=ADMIN)
        assert r.status_code == 200, r.text
        r = client.post(
            "/v1/model/load", json={"preset": "echo", "env": _env(20, "b")}, headers=ADMIN
        )
        assert r.status_code == 422
        err = r.json()["error"]
        assert err["code"] == "too_many_secrets"
        assert "IW_MAX_SECRETS" in err["message"]
        assert client.get("/v1/model/status", headers=ADMIN).json()["state"] == "empty"
        assert all(store.mask(f"x {v} y") == f"x {MASK} y" for v in first.values())
        assert not any(v in store for v in _env(20, "b").values())


def test_store_bound_is_all_or_nothing() -> None:
    """add_many past the bound registers none of the batch and raises the 422 error."""
    store = SecretStore(max_secrets=3)
    store.add_many(["aaaa-1", "bbbb-2"])
    try:
        store.add_many(["cccc-3", "dddd-4"])
    except SecretStoreFullError:
        pass
    else:
        raise AssertionError("the bound was not enforced")
    assert "cccc-3" not in store
    assert store.count == 2
    store.add("operator-key-0001")  # operator-configured values are always taken
    assert store.mask("operator-key-0001") == MASK


def _reference(values: list[str], text: str) -> str:
    """The old masking: one alternation of every form, longest first."""
    forms = set().union(*(_forms(v) for v in values))
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("|".join(re.escape(f) for f in ordered)).sub(MASK, text)


_SECRET = st.text(alphabet='ab "/%é', min_size=4, max_size=8)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_SECRET, min_size=1, max_size=6), filler=st.text('ab "/%é', max_size=40))
def test_window_index_masks_like_the_regex(values: list[str], filler: str) -> None:
    """The indexed masker (any store size) masks exactly what the old regex masked."""
    text = filler.join([*values, filler, values[0]])
    indexed = SecretStore(regex_forms=0)
    indexed.add_many(values)
    assert indexed.mask(text) == _reference(values, text)


def test_masking_cost_does_not_grow_with_the_store() -> None:
    """Masking a line with 1000 secrets costs about what it costs with 150 (same index path)."""
    line = '{"level":"info","message":"POST /v1/chat/completions 200","request_id":"abc"}' * 2

    def cost(count: int) -> float:
        store = SecretStore(max_secrets=count, regex_forms=0)
        store.add_many(f"tok{i:06d}-{i * 7919 % 100003:06d}-zz" for i in range(count))
        started = time.perf_counter()
        for _ in range(300):
            store.mask(line)
        return time.perf_counter() - started

    small, large = min(cost(150) for _ in range(3)), min(cost(1000) for _ in range(3))
    assert large < small * 3, (small, large)
