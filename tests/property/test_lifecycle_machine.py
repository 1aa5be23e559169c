"""A state machine over load / unload / validate / chat that keeps the lifecycle invariants.

Hypothesis drives one app (echo backend, through Litestar's test client) per example with random
sequences of control- and data-plane calls, and after every step checks that status, /ready,
/v1/models, in-flight and admission counts, `last_error` and the process environment agree with
the model the machine believes is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from litestar import Litestar
from litestar.testing import TestClient

from helpers import ADMIN, API, TEST_REGISTRY, make_settings, sse_events
from registry.config import parse_registry
from registry.registry import AdapterRegistry
from service.app import create_app

ENV_KEY = "ECHO_IW_MACHINE_TOKEN"  # on the echo backend's allowlist (ECHO_*)
ENV_VALUE = "machine-env-value-0001"
PROMPT = "alpha beta"


class LifecycleMachine(RuleBasedStateMachine):
    """The model the machine expects to be loaded, and the calls that change it."""

    def __init__(self) -> None:
        super().__init__()
        registry = AdapterRegistry(parse_registry(TEST_REGISTRY), use_entry_points=False)
        self.app: Litestar = create_app(make_settings(), registry=registry)
        self.client: TestClient[Litestar] = TestClient(self.app)
        self.client.__enter__()
        # the unload report's settle poll waits for RSS to stop moving (>= 0.2 s per unload);
        # the machine checks states, not memory figures, and unloads often
        self.app.state.manager.memory.settle_timeout_s = 0.0
        self.model: str | None = None
        """Served name of the ready model; None when the state must be empty."""
        self.env: str | None = None
        """Value ENV_KEY must have in os.environ now (None: absent)."""
        self.last_error: str | None = None
        """Text status.last_error must contain (None: it must be null)."""
        self.failures = 0

    def teardown(self) -> None:
        """Shut the app down; its shutdown unload must put the environment back."""
        self.client.__exit__(None, None, None)
        assert ENV_KEY not in os.environ

    # --- rules -----------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return self.client.post(path, json=body, headers=ADMIN)

    @rule(
        preset=st.sampled_from(["echo", "slow-echo"]),
        replace=st.booleans(),
        fail=st.booleans(),
        with_env=st.booleans(),
        name=st.none() | st.sampled_from(["my-echo", "other-echo"]),
    )
    def load(
        self, preset: str, replace: bool, fail: bool, with_env: bool, name: str | None
    ) -> None:
        """Load a preset: 409 over a loaded model without replace, 500 when asked to fail.

        A failed load with replace leaves the previous model serving again (`rolled_back`).
        """
        body: dict[str, Any] = {"preset": preset, "replace": replace}
        if fail:
            self.failures += 1
            body["engine_params"] = {"fail_on_load": f"planned failure {self.failures}"}
        if with_env:
            body["env"] = {ENV_KEY: ENV_VALUE}
        if name is not None:
            body["served_model_name"] = name
        r = self._post("/v1/model/load", body)
        if self.model is not None and not replace:
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "model_already_loaded"
            return
        if fail:
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["code"] == "engine_error"
            assert f"planned failure {self.failures}" in error["message"]
            self.last_error = f"planned failure {self.failures}"
            if self.model is not None:
                # a failed replace restores the model that was serving, with its env
                assert r.json()["rolled_back"] is True
                assert r.json()["plan"]["served_model_name"] == self.model
                return
            self.model, self.env = None, None
            return
        assert r.status_code == 200, r.text
        plan = r.json()["plan"]
        self.model = name or preset
        assert plan["served_model_name"] == self.model
        assert plan["env_keys"] == ([ENV_KEY] if with_env else [])
        self.env = ENV_VALUE if with_env else None
        self.last_error = None

    @rule()
    def load_with_bad_params(self) -> None:
        """Params that fail their schema are a 422 naming the field, whatever the state."""
        r = self._post("/v1/model/load", {"preset": "echo", "engine_params": {"max_n": 0}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "$.engine_params.max_n"

    @rule(drain=st.none() | st.sampled_from([0, 1]), with_body=st.booleans())
    def unload(self, drain: int | None, with_body: bool) -> None:
        """Unload is idempotent: `unloaded` with a model, `empty` without one."""
        body = {"drain_timeout_s": drain} if with_body else None
        r = self._post("/v1/model/unload", body)
        assert r.status_code == 200, r.text
        report = r.json()
        if self.model is None:
            assert report["status"] == "empty"
        else:
            assert report["status"] == "unloaded"
            assert report["model"] == self.model
            assert (report["drained"], report["aborted"]) == (0, 0)
        self.model, self.env = None, None

    @rule(preset=st.sampled_from(["echo", "slow-echo"]), fail=st.booleans(), with_env=st.booleans())
    def validate(self, preset: str, fail: bool, with_env: bool) -> None:
        """Validate is a dry run in every state: 200 with the plan, nothing changes."""
        body: dict[str, Any] = {"preset": preset}
        if fail:
            body["engine_params"] = {"fail_on_load": "would fail"}
        if with_env:
            body["env"] = {ENV_KEY: "validate-only-value"}
        r = self._post("/v1/model/validate", body)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["valid"] is True
        assert answer["plan"]["preset"] == preset
        assert answer["plan"]["env_keys"] == ([ENV_KEY] if with_env else [])

    @rule(stream=st.booleans(), include_usage=st.booleans())
    def chat(self, stream: bool, include_usage: bool) -> None:
        """Chat answers 200 with the echo iff a model is ready, else 503 with Retry-After."""
        body: dict[str, Any] = {
            "model": self.model or "echo",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": stream,
        }
        if stream and include_usage:
            body["stream_options"] = {"include_usage": True}
        r = self.client.post("/v1/chat/completions", json=body, headers=API)
        if self.model is None:
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_not_ready"
            assert r.headers["retry-after"]
            return
        assert r.status_code == 200, r.text
        if not stream:
            answer = r.json()
            assert answer["model"] == self.model
            assert answer["choices"][0]["message"]["content"] == PROMPT
            return
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [httpx.Response(200, content=e).json() for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == PROMPT
        assert all(c["model"] == self.model for c in chunks)
        assert (chunks[-1]["choices"] == []) is include_usage

    @rule()
    def chat_wrong_model(self) -> None:
        """A model name that is not served is 404 while ready, 503 while nothing is."""
        body = {"model": "not-served", "messages": [{"role": "user", "content": PROMPT}]}
        r = self.client.post("/v1/chat/completions", json=body, headers=API)
        assert r.status_code == (404 if self.model else 503), r.text

    @rule()
    def status(self) -> None:
        """Status shows the load report of the ready model, and none while empty."""
        status = self.client.get("/v1/model/status", headers=ADMIN).json()
        if self.model is None:
            assert status["load"] is None
            assert status["engine"] is None
        else:
            assert status["load"]["status"] == "loaded"
            assert status["load"]["plan"]["served_model_name"] == self.model

    # --- invariants ------------------------------------------------------------------------------

    @invariant()
    def state_is_settled_and_agrees(self) -> None:
        """No step leaves loading/unloading; status, /ready and /v1/models agree with the model."""
        status = self.client.get("/v1/model/status", headers=ADMIN).json()
        assert status["state"] == ("ready" if self.model else "empty"), status
        assert status["in_flight"] == 0
        if self.model is None:
            assert status["plan"] is None
        else:
            assert status["plan"]["served_model_name"] == self.model
        if self.last_error is None:
            assert status["last_error"] is None, status["last_error"]
        else:
            assert self.last_error in (status["last_error"] or ""), status["last_error"]
        ready = self.client.get("/ready")
        if ready.status_code == 503 and ready.json()["error"]["code"] == "memory_pressure":
            pass  # the host itself is short of RAM: /ready says so whatever the model state
        elif self.model is None:
            assert ready.status_code == 503, ready.text
            assert ready.json()["error"]["code"] == "model_not_ready"
        else:
            assert ready.status_code == 200, ready.text
            assert ready.json()["model"] == self.model
        models = self.client.get("/v1/models", headers=API).json()
        assert [m["id"] for m in models["data"]] == ([self.model] if self.model else [])

    @invariant()
    def nothing_is_held(self) -> None:
        """No request is in flight and admission holds no running or queued place."""
        state = self.app.state
        assert state.manager.in_flight == 0
        assert (state.admission.running, state.admission.queued) == (0, 0)

    @invariant()
    def environment_matches_the_loaded_model(self) -> None:
        """The injected env key is set exactly while a model loaded with it is ready."""
        assert os.environ.get(ENV_KEY) == self.env


@pytest.fixture
def clean_env() -> Iterator[None]:
    """The machine's env key is absent before and after the run."""
    assert ENV_KEY not in os.environ
    yield
    assert ENV_KEY not in os.environ


def test_lifecycle_keeps_its_invariants(clean_env: None) -> None:
    """Any sequence of load/unload/validate/chat/status keeps the lifecycle invariants."""
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(max_examples=30, stateful_step_count=15, deadline=None),
    )
