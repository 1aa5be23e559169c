"""What do hooks cost? The chain's per-chunk and per-request time, measured directly.

Streams of `--tokens` deltas (~4 characters each, the size of a real token's text) are pushed
through the same code the service runs (`Run._hooked` wrapping the adapter's stream, `HookChain`
methods), against the same stream without hooks:

- no hooks: the service's per-token path with `chain is None` (the baseline);
- a chain whose hook has no on_chunk (e.g. only system_prompt): what the per-token path pays;
- one trivial on_chunk hook: the chain's own per-chunk cost (timing, budget check);
- regex_redact on completions (an e-mail pattern, 33 characters held back);
- before_request of system_prompt + max_prompt_tokens (approximation), per request.

    .venv/bin/python bench/hooks_cost.py --tokens 2000 --repeats 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from hooks.base import ChunkKind, Hook, HookCall  # noqa: E402
from hooks.builtin.policy import (  # noqa: E402
    MaxPromptTokensHook,
    MaxPromptTokensParams,
    SystemPromptHook,
    SystemPromptParams,
)
from hooks.builtin.redaction import RegexRedactHook, RegexRedactParams  # noqa: E402
from hooks.chain import HookChain, HookSet, HookSpec  # noqa: E402
from schemas.generation import (  # noqa: E402
    GenerationRequest,
    Message,
    SamplingOptions,
    TokenDelta,
)
from service.serving import Run  # noqa: E402

WORDS = ["The", " quick", " brown", " fox", " mails", " jane", "@exa", "mple", ".com", " now"]
EMAIL = r"[a-z0-9.]{1,16}@[a-z0-9]{1,10}\.[a-z]{2,4}"


class NoopChunk(Hook):
    """An on_chunk hook that does nothing (the chain's own cost)."""

    def on_chunk(self, call: HookCall, index: int, kind: ChunkKind, text: str) -> str:
        """Unchanged."""
        return text


def deltas(n: int) -> list[TokenDelta]:
    """`n` token deltas, the last with a finish reason."""
    out = [TokenDelta(WORDS[i % len(WORDS)], 1) for i in range(n - 1)]
    out.append(TokenDelta(" end", 1, 0, "stop", 10))
    return out


async def source(items: list[TokenDelta]) -> AsyncGenerator[TokenDelta, None]:
    """An adapter's stream."""
    for d in items:
        yield d


def make_chain(hooks: list[tuple[type[Hook], Any]]) -> HookChain | None:
    """A chain over the given hook classes and params (global scope)."""
    specs = [
        HookSpec(name=f"h{i}", module="bench", cls=cls, params=params, scope="hooks")
        for i, (cls, params) in enumerate(hooks)
    ]
    return HookSet(specs).chain_for("echo", None)


def new_call() -> HookCall:
    """A request's hook context."""
    return HookCall(
        request_id="bench", backend="echo", model="m", preset=None, stream=True, headers={}
    )


async def consume(items: list[TokenDelta], chain: HookChain | None) -> float:
    """Seconds to drain the stream as the service would (wrapped when the chain has work)."""
    stream: AsyncGenerator[TokenDelta, None] = source(items)
    if chain is not None and (chain.chunk or chain.after):
        run = SimpleNamespace(call=new_call(), sent=None)
        stream = Run._hooked(run, stream, chain)  # type: ignore[arg-type]  # noqa: SLF001
    started = time.perf_counter()
    async for delta in stream:
        _ = delta.text
    return time.perf_counter() - started


async def before_cost(repeats: int) -> float:
    """Seconds per request of system_prompt + max_prompt_tokens before_request."""
    chain = make_chain(
        [
            (SystemPromptHook, SystemPromptParams(text="Be brief.")),
            (MaxPromptTokensHook, MaxPromptTokensParams(max_tokens=4096)),
        ]
    )
    assert chain is not None
    req = GenerationRequest(
        "bench", (Message("user", "hello " * 50),), SamplingOptions(max_tokens=16)
    )

    def check(_old: GenerationRequest, _new: GenerationRequest) -> None:
        return None

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(1000):
            await chain.before_request(new_call(), req, check)
        times.append((time.perf_counter() - started) / 1000)
    return statistics.median(times)


async def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    items = deltas(args.tokens)
    redact = RegexRedactParams(patterns=(EMAIL,), apply_to=("completion",))
    cases: list[tuple[str, HookChain | None]] = [
        ("no hooks (chain is None)", None),
        ("hooks without on_chunk", make_chain([(SystemPromptHook, SystemPromptParams("x"))])),
        ("one no-op on_chunk hook", make_chain([(NoopChunk, None)])),
        ("regex_redact (e-mail)", make_chain([(RegexRedactHook, redact)])),
    ]
    # overruns on a shared machine are expected here; the figures are what this prints
    logging.getLogger("hooks").setLevel(logging.ERROR)
    results = {}
    for name, chain in cases:
        runs = [await consume(items, chain) for _ in range(args.repeats)]
        results[name] = (statistics.median(runs) / args.tokens, min(runs) / args.tokens)
    _, base_min = results["no hooks (chain is None)"]
    print(f"{args.tokens} deltas per stream, {args.repeats} streams per case")
    print(f"{'case':32} {'median us/chunk':>16} {'min us/chunk':>13} {'+min vs none':>13}")
    for name, (median, low) in results.items():
        print(f"{name:32} {median * 1e6:16.3f} {low * 1e6:13.3f} {(low - base_min) * 1e6:13.3f}")
    per_request = await before_cost(max(3, args.repeats // 4))
    print(f"before_request system_prompt + max_prompt_tokens: {per_request * 1e6:.1f} us/request")
    hookset = HookSet([])
    started = time.perf_counter()
    for _ in range(100_000):
        hookset.chain_for("echo", None)
    print(f"chain_for lookup: {(time.perf_counter() - started) / 100_000 * 1e9:.0f} ns/request")


if __name__ == "__main__":
    asyncio.run(main())
