"""The kit's sampling field list names real fields; its reaper kills only what outlives a wait."""

from __future__ import annotations

import subprocess
import sys
import time

import attrs
import psutil

from adapters.kit.processes import ChildProcesses, child_pids, reap
from adapters.kit.sampling import (
    GATED_FIELDS,
    OPENAI_FIELDS,
    SAMPLING_FIELDS,
    VLLM_EXTENSION_FIELDS,
)
from schemas.generation import SamplingOptions
from schemas.openai import ChatCompletionRequest


def test_every_sampling_name_is_a_field_of_the_options_and_the_request() -> None:
    """A typo here would let a set field through unchecked: every name must exist on both."""
    options = {f.name for f in attrs.fields(SamplingOptions)}
    request = {f.name for f in attrs.fields(ChatCompletionRequest)}
    assert options >= SAMPLING_FIELDS
    assert request >= SAMPLING_FIELDS
    assert set(GATED_FIELDS) | OPENAI_FIELDS | VLLM_EXTENSION_FIELDS <= SAMPLING_FIELDS
    assert len(GATED_FIELDS) == len(set(GATED_FIELDS))


def test_the_reaper_kills_a_child_that_outlives_the_wait_and_spares_the_rest() -> None:
    """A child started after the snapshot is killed; one started before is left alone."""
    before = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        watch = ChildProcesses()
        watch.snapshot()
        engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        assert watch.started() == {engine.pid}
        started = time.monotonic()
        killed = watch.reap(timeout=0.2)
        assert killed == [engine.pid]
        engine.wait(5)  # psutil reaped it already; Popen just learns it is gone
        assert not psutil.pid_exists(engine.pid)
        assert time.monotonic() - started < 5
        assert before.poll() is None
        assert before.pid in child_pids()
    finally:
        before.kill()
        before.wait()


def test_reaping_gone_processes_is_a_no_op() -> None:
    """Processes that exited on their own are not an error, and nothing is reported killed."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert reap({done.pid}, timeout=0.1) == []
