"""Shared fixtures: apps built through `create_app(...)` over the test registry; live servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from helpers import ADMIN, TEST_REGISTRY, LiveServer, make_registry, make_settings
from registry.secrets import SecretStore
from service.app import create_app


@pytest.fixture
def app_factory(tmp_path: Path) -> Any:
    """Build an app over the test registry: `app_factory(registry_text=..., **settings)`."""

    def make(
        registry_text: str = TEST_REGISTRY, secrets: SecretStore | None = None, **overrides: Any
    ) -> Litestar:
        registry = make_registry(tmp_path, registry_text)
        return create_app(make_settings(**overrides), registry=registry, secrets=secrets)

    return make


@pytest.fixture
def client(app_factory: Any) -> Iterator[TestClient[Litestar]]:
    """A test client over a fresh app (lifespan entered)."""
    with TestClient(app_factory()) as c:
        yield c


@pytest.fixture
def live(app_factory: Any) -> Iterator[LiveServer]:
    """A live server over the test registry with the echo preset loaded."""
    with LiveServer(app_factory()) as server:
        r = httpx.post(f"{server.url}/v1/model/load", json={"preset": "echo"}, headers=ADMIN)
        assert r.status_code == 200, r.text
        yield server
