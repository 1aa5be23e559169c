"""/metrics as scrapers and dashboards read it: one content type, the series dashboards query."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import TestClient

from helpers import ADMIN


def test_metrics_content_type_has_one_charset(client: TestClient[Litestar]) -> None:
    """The exposition's content type names its charset once (strict scrapers reject two)."""
    r = client.get("/metrics", headers=ADMIN)
    assert r.status_code == 200
    content_type = r.headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert content_type.lower().count("charset") == 1
