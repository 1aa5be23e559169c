"""Plan resolution in the registry: a load request becomes a checked `LoadPlan`, nothing loaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.echo import EchoAdapter, EchoParams
from fakes.adapters import EnvSeeingAdapter
from helpers import TEST_REGISTRY, make_registry
from registry.planning import plan_load
from registry.registry import AdapterRegistry
from registry.secrets import SecretStore
from schemas.control import LoadRequest
from schemas.errors import NotFoundError, ParamsValidationError

REGISTRY = TEST_REGISTRY.replace(
    "models:\n",
    """  env-seeing:
    module: fakes.adapters:EnvSeeingAdapter
    env_allow: [HF_TOKEN]
    env: {HF_HUB_OFFLINE: "1"}
models:
  tuned:
    backend: echo
    model: echo-model
    served_model_name: tuned-echo
    sampling_defaults: {temperature: 0.2, top_p: 0.9}
""",
)


@pytest.fixture
def registry(tmp_path: Path) -> AdapterRegistry:
    """The test registry plus a preset with sampling defaults and an env-recording backend."""
    return make_registry(tmp_path, REGISTRY)


@pytest.fixture
def no_token() -> Iterator[None]:
    """HF_TOKEN and HF_HUB_OFFLINE are unset around the test (a plan must put them back so)."""
    saved = {k: os.environ.pop(k) for k in ("HF_TOKEN", "HF_HUB_OFFLINE") if k in os.environ}
    yield
    os.environ.update(saved)


def _plan(registry: AdapterRegistry, **body: Any) -> Any:
    return plan_load(registry, LoadRequest(**body), SecretStore())


def test_a_preset_plans_its_backend_model_params_and_sampling(registry: AdapterRegistry) -> None:
    """A preset gives backend, model, served name, params over the defaults and its sampling."""
    plan = _plan(registry, preset="tuned", engine_params={"max_n": 2})
    assert (plan.backend.name, plan.model, plan.served_model_name) == (
        "echo",
        "echo-model",
        "tuned-echo",
    )
    assert plan.preset == "tuned"
    assert isinstance(plan.adapter, EchoAdapter)
    assert plan.params == EchoParams(token_delay_ms=0, max_n=2)
    assert plan.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert plan.view(SecretStore()).sampling_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_a_backend_request_has_no_sampling_defaults_and_serves_its_model(
    registry: AdapterRegistry,
) -> None:
    """Without a preset: the model is the served name and unset sampling stays unset."""
    plan = _plan(registry, backend="echo", model="m1")
    assert (plan.preset, plan.served_model_name, plan.sampling_defaults) == (None, "m1", {})
    assert plan.serves("m1")
    assert not plan.serves("echo")


def test_a_preset_served_name_defaults_to_the_preset(registry: AdapterRegistry) -> None:
    """A preset without served_model_name serves under its own name, the request's name wins."""
    assert _plan(registry, preset="slow-echo").served_model_name == "slow-echo"
    assert _plan(registry, preset="slow-echo", served_model_name="x").served_model_name == "x"


def test_unknown_preset_and_backend_are_404(registry: AdapterRegistry) -> None:
    """Names the registry does not know are 404s with their own codes and params."""
    with pytest.raises(NotFoundError) as caught:
        _plan(registry, preset="nope")
    assert (caught.value.code, caught.value.param) == ("preset_not_found", "$.preset")
    with pytest.raises(NotFoundError) as caught:
        _plan(registry, backend="nope", model="m")
    assert (caught.value.code, caught.value.param) == ("backend_not_found", "$.backend")
    # the backend first: without a model it is still the unknown name that is named
    with pytest.raises(NotFoundError) as caught:
        _plan(registry, backend="nope")
    assert (caught.value.code, caught.value.param) == ("backend_not_found", "$.backend")


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "$", "exactly one of 'backend' or 'preset'"),
        ({"backend": "echo", "preset": "echo"}, "$", "exactly one of 'backend' or 'preset'"),
        ({"backend": "echo"}, "$.model", "'model' is required with 'backend'"),
    ],
)
def test_backend_or_preset_shape_is_422(
    registry: AdapterRegistry, body: dict[str, Any], param: str, message: str
) -> None:
    """Exactly one of backend or preset, and a model with a backend."""
    with pytest.raises(ParamsValidationError) as caught:
        _plan(registry, **body)
    assert (caught.value.status_code, caught.value.param) == (422, param)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("engine_params", "param", "message"),
    [
        ({"max_n": 99}, "$.engine_params.max_n", "between 1 and 16"),
        ({"token_dealy_ms": 1}, "$.engine_params.token_dealy_ms", "did you mean"),
        ({"qqqqqqqq": 1}, "$.engine_params.qqqqqqqq", "unknown field; known: claims_memory_mib"),
    ],
)
def test_params_errors_name_the_field(
    registry: AdapterRegistry, engine_params: dict[str, Any], param: str, message: str
) -> None:
    """Params over the preset are structured by the backend's schema; a 422 names the field."""
    with pytest.raises(ParamsValidationError) as caught:
        _plan(registry, preset="echo", engine_params=engine_params)
    assert caught.value.param == param
    assert message in caught.value.message


def test_env_outside_the_allowlist_is_refused_before_the_dry_run(
    registry: AdapterRegistry,
) -> None:
    """The env allowlist is the backend's; a refused key never reaches the adapter's check."""
    EnvSeeingAdapter.seen.clear()
    with pytest.raises(ParamsValidationError) as caught:
        _plan(registry, backend="env-seeing", model="m", env={"AWS_KEY": "v"})
    assert caught.value.param == "$.env.AWS_KEY"
    assert EnvSeeingAdapter.seen == []


@pytest.mark.usefixtures("no_token")
def test_the_dry_run_sees_the_loads_env_and_ours_comes_back(registry: AdapterRegistry) -> None:
    """check() runs with the load's env (and the backend's) applied, restored right after."""
    EnvSeeingAdapter.seen.clear()
    plan = _plan(registry, backend="env-seeing", model="m", env={"HF_TOKEN": "hf_plan1"})
    assert EnvSeeingAdapter.seen == ["hf_plan1"]
    assert "HF_TOKEN" not in os.environ
    assert "HF_HUB_OFFLINE" not in os.environ
    assert sorted(plan.env.keys) == ["HF_HUB_OFFLINE", "HF_TOKEN"]
    assert plan.adapter.context.load_env == {"HF_TOKEN": "hf_plan1"}


def test_a_plan_loads_again_with_a_fresh_adapter(registry: AdapterRegistry) -> None:
    """`again()` keeps everything but the adapter instance, which keeps its context."""
    plan = _plan(registry, preset="echo", env={"HF_TOKEN": "hf_again"})
    again = plan.again()
    assert again.adapter is not plan.adapter
    assert again.adapter.context is plan.adapter.context
    assert (again.params, again.model, again.env) == (plan.params, plan.model, plan.env)


def test_the_view_masks_secrets_and_shows_env_key_names_only(registry: AdapterRegistry) -> None:
    """Status and responses show params and names masked, env by key name alone."""
    secrets = SecretStore()
    secrets.add_many(["echo-model"])
    plan = plan_load(registry, LoadRequest(preset="tuned", env={"HF_TOKEN": "hf_v"}), secrets)
    view = plan.view(secrets)
    assert "echo-model" not in str(view)
    assert "hf_v" not in str(view)
    assert view.env_keys == ["HF_TOKEN"]
