"""A failed load says why: the engine's root cause reaches the response, last_error and the log."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from litestar.testing import TestClient

from adapters.bundled import default_cache_dir, ensure_bundled
from helpers import ADMIN, TEST_REGISTRY, make_registry, make_settings
from registry.manager import describe_load_failure, root_cause
from registry.secrets import SecretStore
from schemas.errors import EngineError
from service.app import create_app

REGISTRY = TEST_REGISTRY.replace(
    "models:\n",
    "  transformers:\n    module: adapters.transformers:TransformersAdapter\n"
    "    defaults: {device: cpu, dtype: float32}\nmodels:\n",
)
BOGUS = "iw-bogus-architecture"


@pytest.fixture
def bad_model(tmp_path: Path) -> Path:
    """A model folder whose tokenizer is fine and whose config.json names no real architecture."""
    source = ensure_bundled("smollm2-135m", default_cache_dir(), progress=False)
    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy(item, folder / item.name)
    (folder / "config.json").write_text(json.dumps({"model_type": BOGUS}))
    return folder


def test_bad_config_root_cause_reaches_response_status_and_log(
    bad_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Transformers' own complaint about config.json is in the 500, in last_error and logged."""
    registry = make_registry(bad_model.parent, REGISTRY, model_roots=(bad_model.parent,))
    app = create_app(make_settings(), registry=registry)
    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="registry.manager"):
        r = client.post(
            "/v1/model/load",
            json={"backend": "transformers", "model": str(bad_model)},
            headers=ADMIN,
        )
        assert r.status_code == 500, r.text
        message = r.json()["error"]["message"]
        assert "could not load the model" in message
        assert BOGUS in message
        status = client.get("/v1/model/status", headers=ADMIN).json()
        assert status["state"] == "empty"
        assert BOGUS in status["last_error"]
    failures = [rec for rec in caplog.records if rec.getMessage().startswith("load of backend")]
    assert failures, caplog.text
    assert BOGUS in failures[-1].getMessage()
    # the whole chain is logged: our summary and, beneath it, the engine's exception
    assert failures[-1].exc_info is not None
    assert BOGUS in str(root_cause(failures[-1].exc_info[1]))  # type: ignore[arg-type]


def test_config_that_is_not_json_is_refused_before_loading(bad_model: Path) -> None:
    """A config.json that does not parse is a 422 from validate, naming the JSON error."""
    (bad_model / "config.json").write_text("{not json")
    registry = make_registry(bad_model.parent, REGISTRY, model_roots=(bad_model.parent,))
    with TestClient(create_app(make_settings(), registry=registry)) as client:
        r = client.post(
            "/v1/model/validate",
            json={"backend": "transformers", "model": str(bad_model)},
            headers=ADMIN,
        )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "model_unreachable"
    assert "config.json is not valid JSON" in r.json()["error"]["message"]


def _disk_error() -> None:
    raise OSError("disk says no for hf_secret_token_123")


def _wrapped() -> None:
    try:
        _disk_error()
    except OSError as inner:
        raise RuntimeError("wrapper") from inner


def _summarised() -> None:
    try:
        _wrapped()
    except RuntimeError:
        raise EngineError("could not load the model") from None


def test_root_cause_walks_the_chain_and_masks_secrets() -> None:
    """The innermost exception's text is reported after our summary, with secrets masked."""
    secrets = SecretStore()
    secrets.add("hf_secret_token_123")
    with pytest.raises(EngineError) as caught:
        _summarised()
    suppressed = caught.value
    # `from None` hides the chain: only our own summary is left
    assert describe_load_failure(suppressed, secrets) == "could not load the model"
    outer = EngineError("could not load the model")
    outer.__cause__ = suppressed.__context__
    assert isinstance(root_cause(outer), OSError)
    text = describe_load_failure(outer, secrets)
    assert text.startswith("could not load the model: OSError: disk says no for ")
    assert "hf_secret_token_123" not in text
