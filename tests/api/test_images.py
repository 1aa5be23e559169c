"""Image content parts: parsed and bounded; refused by name unless the backend takes images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from helpers import API, load, make_registry, make_settings
from schemas.openai import MAX_HTTP_URL_CHARS, MAX_IMAGES
from service.app import create_app

REGISTRY = """
adapters:
  echo:
    module: adapters.echo:EchoAdapter
  image-echo:
    module: fakes.adapters:ImageEchoAdapter
models:
  echo: {backend: echo, model: echo}
  vision: {backend: image-echo, model: vision}
"""
#: a 1x1 PNG
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQ"
    "ABpfZFQAAAAABJRU5ErkJggg=="
)


@pytest.fixture
def client(tmp_path: Path) -> Any:
    """A test client over the registry above."""
    app = create_app(make_settings(), registry=make_registry(tmp_path, REGISTRY))
    with TestClient(app) as c:
        yield c


def ask(client: Any, model: str, parts: list[dict[str, Any]]) -> Any:
    """A two-message request whose second message holds `parts`."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": parts}]
    return client.post(
        "/v1/chat/completions", json={"model": model, "messages": messages}, headers=API
    )


def image(url: str, **extra: Any) -> dict[str, Any]:
    """An image_url part."""
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def test_text_backend_refuses_images_naming_the_message(client: Any) -> None:
    """A valid image on a text-only backend: 400 on messages[1].content."""
    load(client, preset="echo")
    r = ask(client, "echo", [{"type": "text", "text": "what is this?"}, image(PNG)])
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[1].content"


def test_image_backend_gets_the_parts_in_order(client: Any) -> None:
    """A backend that declares image_url receives text and images in their order."""
    load(client, preset="vision")
    parts = [{"type": "text", "text": "a"}, image(PNG, detail="low"), image("https://x.test/i.png")]
    r = ask(client, "vision", parts)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "text:a image_url:data image_url:https"


@pytest.mark.parametrize(
    "part",
    [
        image("file:///etc/passwd"),
        image("/etc/passwd"),
        image("ftp://x.test/i.png"),
        image("data:text/plain;base64,aGk="),
        image("https://x.test/" + "a" * MAX_HTTP_URL_CHARS),
        image(PNG, detail="ultra"),
        {"type": "image_url", "image_url": "https://x.test/i.png"},
        {"type": "input_audio", "input_audio": {}},
    ],
)
def test_malformed_parts_are_400_on_the_content(client: Any, part: dict[str, Any]) -> None:
    """Only data:image or http(s) URLs, bounded; other part types refused, with the path."""
    load(client, preset="vision")
    r = ask(client, "vision", [part])
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("messages[1].content")


def test_image_count_is_bounded(client: Any) -> None:
    """More than MAX_IMAGES images in one message is refused."""
    load(client, preset="vision")
    r = ask(client, "vision", [image(PNG)] * (MAX_IMAGES + 1))
    assert r.status_code == 400
    assert r.json()["error"]["param"].startswith("messages[1].content")
