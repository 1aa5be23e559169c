"""The transformers backend bounds a request's wait for its grammar compile (xgrammar runs on).

A stand-in compiler holds each compile until released, so the bound is what ends the wait: without
it these compiles return a grammar (or block the caller) instead of a 400/429.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from adapters.transformers import TransformersParams, _Grammars
from schemas.converter import StructureError, structure
from schemas.errors import InvalidRequestError, RateLimitError
from schemas.generation import StructuredOutput

#: a compile the stand-in holds is released after this at the latest (a safety net, not a speed)
HOLD = 10
#: the caller's wait must end long before the held compile would (the bound, plus slack)
PROMPT = 2.0
SCHEMA = StructuredOutput("json", '{"type": "object"}', "response_format.json_schema.schema")


class HeldCompiler:
    """xgrammar's `GrammarCompiler` surface; every compile waits for `release` (or fails)."""

    def __init__(self, *, hold: bool = True, error: str | None = None) -> None:
        self.release = threading.Event()
        self.hold = hold
        self.error = error
        self.started = 0

    def _compile(self, kind: str, spec: str) -> tuple[str, str]:
        self.started += 1
        if self.hold:
            self.release.wait(HOLD)
        if self.error is not None:
            raise RuntimeError(self.error)
        return (kind, spec)

    def compile_json_schema(self, spec: str) -> Any:
        """A JSON schema."""
        return self._compile("json", spec)

    def compile_regex(self, spec: str) -> Any:
        """A regex."""
        return self._compile("regex", spec)

    def compile_grammar(self, spec: str) -> Any:
        """An EBNF grammar."""
        return self._compile("grammar", spec)


@pytest.fixture
def held() -> Any:
    """A held compiler and its `_Grammars`, released and closed after the test."""
    compiler = HeldCompiler()
    grammars = _Grammars(compiler, timeout_s=0.1)
    yield compiler, grammars
    compiler.release.set()
    grammars.close()


@pytest.mark.parametrize(
    "structured",
    [
        SCHEMA,
        StructuredOutput("json", '{"type": "object"}', "structured_outputs.json"),
        StructuredOutput("regex", "[a-z]{200}", "structured_outputs.regex"),
        StructuredOutput("grammar", 'root ::= "a"', "structured_outputs.grammar"),
    ],
    ids=lambda s: s.param,
)
def test_a_compile_past_the_bound_is_a_400_naming_the_field(
    held: Any, structured: StructuredOutput
) -> None:
    """A 400 on the constraint's field once the bound passes, not when the compile ends."""
    _, grammars = held
    started = time.monotonic()
    with pytest.raises(InvalidRequestError) as info:
        grammars.compile(structured)
    assert time.monotonic() - started < PROMPT
    error = info.value
    assert (error.status_code, error.param) == (400, structured.param)
    assert error.code == "grammar_compile_timeout"
    assert "grammar_compile_timeout_s" in error.message


def test_a_compile_within_the_bound_returns_its_grammar() -> None:
    """A compile that ends in time is returned as the compiler made it."""
    compiler = HeldCompiler(hold=False)
    grammars = _Grammars(compiler, timeout_s=5)
    try:
        assert grammars.compile(SCHEMA) == ("json", SCHEMA.spec)
        regex = StructuredOutput("regex", "a+", "structured_outputs.regex")
        assert grammars.compile(regex) == ("regex", "a+")
    finally:
        grammars.close()


def test_a_refused_constraint_is_still_a_400_with_the_compilers_reason() -> None:
    """What xgrammar refuses stays a 400 `does not compile` naming the field."""
    compiler = HeldCompiler(hold=False, error="undefined rule foo\nmore lines")
    grammars = _Grammars(compiler, timeout_s=5)
    try:
        bad = StructuredOutput("grammar", "root ::= foo", "structured_outputs.grammar")
        with pytest.raises(InvalidRequestError) as info:
            grammars.compile(bad)
        assert info.value.param == "structured_outputs.grammar"
        assert info.value.message == "the grammar constraint does not compile: undefined rule foo"
        assert info.value.code == "invalid_constraint"
    finally:
        grammars.close()


def test_an_internal_compiler_check_reaches_the_client_without_its_build_paths() -> None:
    """A C++ assertion's text (timestamp, source path, line) is named, not relayed."""
    error = (
        "[16:11:49] /project/cpp/grammar_functor.cc:3567: Check failed: (x.has_value()) is false:"
    )
    grammars = _Grammars(HeldCompiler(hold=False, error=error), timeout_s=5)
    try:
        bad = StructuredOutput("json", '{"type": "object"}', "response_format.json_schema.schema")
        with pytest.raises(InvalidRequestError) as info:
            grammars.compile(bad)
        assert info.value.param == "response_format.json_schema.schema"
        assert "/project" not in info.value.message
        assert "grammar_functor" not in info.value.message
        assert "internal check failed" in info.value.message
    finally:
        grammars.close()


def test_when_every_compile_thread_is_held_the_next_request_is_a_429(held: Any) -> None:
    """Runaway compiles hold the pool: a new constraint is refused 429 (never tried), not a 400."""
    compiler, grammars = held
    for _ in range(_Grammars.THREADS):
        with pytest.raises(InvalidRequestError):
            grammars.compile(SCHEMA)
    assert compiler.started == _Grammars.THREADS
    with pytest.raises(RateLimitError) as info:
        grammars.compile(SCHEMA)
    assert info.value.status_code == 429
    assert info.value.code == "grammar_compiler_busy"
    assert info.value.headers == {"Retry-After": "1"}
    # the refused compile never ran: it was taken off the queue
    compiler.release.set()
    grammars.pool.shutdown(wait=True)
    assert compiler.started == _Grammars.THREADS


def test_a_compile_that_waited_for_a_thread_gets_its_whole_bound() -> None:
    """Queue time does not eat the compile's bound: it counts from when the compile began."""
    compiler = HeldCompiler(hold=False)
    grammars = _Grammars(compiler, timeout_s=1.0)
    blockers = threading.Event()

    def block() -> None:
        blockers.wait(HOLD)

    try:
        # both threads busy for 0.6 s, then a compile of 0.6 s: 1.2 s in all, each part in time
        for _ in range(_Grammars.THREADS):
            grammars.pool.submit(block)
        threading.Timer(0.6, blockers.set).start()
        original = compiler._compile

        def slow(kind: str, spec: str) -> tuple[str, str]:
            time.sleep(0.6)
            return original(kind, spec)

        compiler._compile = slow  # type: ignore[method-assign]
        assert grammars.compile(SCHEMA) == ("json", SCHEMA.spec)
    finally:
        blockers.set()
        grammars.close()


def test_the_bound_is_an_engine_param_with_limits() -> None:
    """`grammar_compile_timeout_s` defaults to 10 s and refuses values outside 0.01-600 s."""
    assert TransformersParams().grammar_compile_timeout_s == 10.0
    assert (
        structure({"grammar_compile_timeout_s": 2}, TransformersParams).grammar_compile_timeout_s
        == 2.0
    )
    for bad in (0, 601):
        with pytest.raises(StructureError) as info:
            structure(
                {"grammar_compile_timeout_s": bad}, TransformersParams, path="$.engine_params"
            )
        assert info.value.errors[0].path == "$.engine_params.grammar_compile_timeout_s"
