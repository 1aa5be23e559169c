r"""Do the wrapper's own metrics agree with what a client measures? Prints both, side by side.

Drives N streaming chat requests at each concurrency level against a wrapper serving a real
model (by default it starts one: `python -m service serve --preload smollm2-135m`, the
transformers backend on CPU) and measures each request twice: on the client, the way
`vllm bench serve` does (TTFT from just before the request is sent to the first content chunk,
E2E to the last one, TPOT = (E2E - TTFT) / (tokens - 1), ITL = gaps between content chunks), and
on the server (the `metrics` object of the final chunk). Prints, per metric, client and server
p50/p99 and their difference. The server's window starts later (ASGI receipt) and ends earlier
(frame handed to uvicorn), so its figures should be lower by the transport time only.

    .venv/bin/python bench/telemetry_agreement.py                    # start a wrapper, 1 and 16
    .venv/bin/python bench/telemetry_agreement.py --url http://127.0.0.1:8000 --key sk-local \\
        --model smollm2-135m --requests 64 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Tell me a short story about a lighthouse keeper and a storm."


def pct(values: list[float], q: float) -> float:
    """Linear-interpolated percentile."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> dict[str, float]:
    """One streamed request measured on both sides."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times: list[float] = []
    server: dict[str, Any] = {}
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
            if chunk.get("metrics"):
                server = chunk["metrics"]
    n = server["completion_tokens"]
    ttft = (times[0] - start) * 1000
    e2e = (times[-1] - start) * 1000
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    return {
        "client_ttft": ttft,
        "server_ttft": server["time_to_first_token_ms"],
        "client_e2e": e2e,
        "server_e2e": server["e2e_ms"],
        "client_tpot": (e2e - ttft) / (n - 1),
        "server_tpot": server["tpot_ms"],
        "client_itl": statistics.fmean(gaps) if gaps else 0.0,
        "server_itl": server["mean_itl_ms"] or 0.0,
    }


async def level(
    url: str, key: str, model: str, n: int, conc: int, tokens: int
) -> list[dict[str, float]]:
    """N requests, at most `conc` at a time, one kept-alive connection pool."""
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        await one(client, url, model, 4)  # open connections, warm caches
        gate = asyncio.Semaphore(conc)

        async def guarded() -> dict[str, float]:
            async with gate:
                return await one(client, url, model, tokens)

        return await asyncio.gather(*(guarded() for _ in range(n)))


def start_wrapper(port: int, preset: str) -> subprocess.Popen[bytes]:
    """`python -m service serve --preload PRESET` in the background, ready when it returns."""
    env = {**os.environ, "IW_API_KEY": "bench-key", "IW_ADMIN_KEY": "bench-admin",
           "IW_PORT": str(port), "IW_LOG_LEVEL": "WARNING", "IW_MAX_CONCURRENCY": "64"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--preload", preset],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("wrapper did not become ready")


def main() -> None:
    """Run the levels and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", help="a running wrapper (default: start one)")
    parser.add_argument("--key", default="bench-key")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="smollm2-135m", help="preset for the started wrapper")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc = start_wrapper(args.port, args.preset)
        url = f"http://127.0.0.1:{args.port}"
    try:
        print(f"# {args.requests} streamed requests x {args.tokens} tokens, model {args.model}")
        for conc in args.concurrency:
            rows = asyncio.run(level(url, args.key, args.model, args.requests, conc, args.tokens))
            print(f"\nconcurrency {conc}")
            print(f"{'metric':<6} {'client p50':>11} {'server p50':>11} {'diff p50':>9}"
                  f" {'client p99':>11} {'server p99':>11} {'diff p99':>9}  (ms)")  # fmt: skip
            for m in ("ttft", "tpot", "itl", "e2e"):
                c = [r[f"client_{m}"] for r in rows]
                s = [r[f"server_{m}"] for r in rows]
                d = [a - b for a, b in zip(c, s, strict=True)]
                p50 = f"{pct(c, 0.5):>11.2f} {pct(s, 0.5):>11.2f} {pct(d, 0.5):>9.2f}"
                p99 = f"{pct(c, 0.99):>11.2f} {pct(s, 0.99):>11.2f} {pct(d, 0.99):>9.2f}"
                print(f"{m:<6} {p50} {p99}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
