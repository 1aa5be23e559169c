"""What does the wrapper cost per token and per request, next to the least any server must spend?

Three servers, all on uvicorn with the same settings, all answering `POST /v1/chat/completions`
from the same echo "engine" (no delay, `ignore_eos`, 64 tokens), all checking a bearer key:

- **floor**: a bare ASGI callable (`floor_app` below) that parses the body with msgspec and
  sends, one `send` per token, SSE bytes identical to the wrapper's echo stream (checked at start:
  the streams differ only in ids, timestamps and metric values). No framework, no telemetry.
- **wrapper**: this project (`python -m service serve`, the echo preset preloaded).
- **fastapi**: `bench/peers/fastapi_peer.py`, a plain FastAPI + pydantic wrapper over the same
  `EchoAdapter`, which is what most wrappers (and vLLM's own server) look like.

The three run side by side (idle ones cost nothing) and are measured in turns, level by level, so
that the noise of a shared machine falls on all of them alike. At each concurrency (1, 16, 64, 256)
a client in a separate process (raw asyncio HTTP/1.1 on keep-alive connections, uvloop, so that it
spends little CPU of its own) warms every connection up, then runs a fixed number of streamed
requests and a fixed number of non-streaming `max_tokens: 1` requests. Printed per server and
level:

- server CPU µs per streamed token: the server process's CPU time (all its threads, from
  `/proc/<pid>/task/*/schedstat`, nanosecond resolution) over the streamed phase, divided by
  the token frames the client received;
- TTFT (request written → first token frame parsed) and E2E (→ `[DONE]`) p50/p99, client-side;
- non-streaming requests/s with `max_tokens: 1`;
- the ratios to the floor (CPU x, TTFT/E2E +ms, req/s x), and the wrapper's streamed tokens per
  server CPU second over the FastAPI peer's.

The machine this runs on is usually shared: absolute figures move from run to run, the ratios
measured within one run are what counts. Results go to `bench/results/overhead.{md,json,png}`.

    python -m bench.overhead                      # all three servers, c = 1 16 64 256 (~3 min)
    python -m bench.overhead --scale 0.3          # fewer requests (quick look)
    python -m bench.overhead --servers floor,wrapper --concurrency 1,64

Must never: leave a server behind (each runs in a process group of its own, stopped in
`finally`); talk to anything but 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
API_KEY = "bench-api-key"
ADMIN_KEY = "bench-admin-key"
MODEL = "echo"
TOKENS = 64
PROMPT = "The quick brown fox jumps over the lazy dog while the benchmark counts every frame."
SERVERS = ("floor", "wrapper", "fastapi")
LEVELS = (1, 16, 64, 256)
#: streamed requests per level at --scale 1: enough frames for a stable CPU figure, few enough
#: that the whole run stays well inside 10 minutes on 2 shared cores
STREAM_REQUESTS = {1: 150, 16: 320, 64: 512, 256: 768}
JSON_REQUESTS = {1: 300, 16: 800, 64: 1024, 256: 1536}

_TOKEN = re.compile(r"\s*\S+")
_encode = msgspec.json.encode
_decode = msgspec.json.decode


# --- the floor: the least a server can do to stream these bytes --------------------------------

#: the wrapper's final chunk carries a `metrics` object; the floor sends one of the same shape
#: (every field of `RequestRecord.metrics()`, null where not applicable, as the wrapper sends it;
#: tests/unit/test_bench_floor.py keeps the two in step)
_FLOOR_METRICS = {
    "finish_reason": "length", "prompt_tokens": 0, "completion_tokens": 0,
    "time_to_first_token_ms": 0.0, "e2e_ms": 0.0, "tpot_ms": 0.0, "mean_itl_ms": 0.0,
    "p50_itl_ms": 0.0, "max_itl_ms": 0.0, "queue_time_ms": 0.0, "handler_start_ms": 0.0,
    "generation_time_ms": 0.0, "tokens_per_second": 0.0, "engine_ttft_ms": None,
    "engine_tpot_ms": None, "vram_delta_mib": None, "peak_vram_mib": None, "rss_delta_mib": 0.0,
    "memory_method": "rss: psutil process tree", "gpu_util_mean": None,
    "device_memory_max_mib": None, "cpu_percent_mean": None, "kv_cache_usage": None,
    "hooks_ms": None,
}  # fmt: skip
_SSE_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
]
_FLOOR_KEY = ("Bearer " + API_KEY).encode()


async def _floor_lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _floor_plain(send: Any, status: int, body: bytes, headers: list[Any]) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [length, *headers]})
    await send({"type": "http.response.body", "body": body})


async def floor_app(scope: Any, receive: Any, send: Any) -> None:
    """A bare ASGI app streaming the wrapper's echo bytes with no framework around them."""
    if scope["type"] == "lifespan":
        await _floor_lifespan(receive, send)
        return
    rid = (b"x-request-id", uuid.uuid4().hex.encode())
    if scope["path"] == "/health":
        await _floor_plain(send, 200, b'{"status":"ok"}', [rid])
        return
    auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
    if not hmac.compare_digest(auth, _FLOOR_KEY):
        await _floor_plain(send, 401, b'{"error":"invalid API key"}', [rid])
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    req = _decode(body)
    user = next(m["content"] for m in reversed(req["messages"]) if m["role"] == "user")
    source = _TOKEN.findall(user)
    prompt_tokens = sum(len(_TOKEN.findall(m["content"])) + 1 for m in req["messages"])
    n = req.get("max_tokens") or 16
    head = (
        b'{"id":' + _encode(f"chatcmpl-{uuid.uuid4().hex}")
        + b',"object":"chat.completion' + (b".chunk" if req.get("stream") else b"")
        + b'","created":' + str(int(time.time())).encode()
        + b',"model":' + _encode(req["model"])
    )  # fmt: skip
    metrics = {**_FLOOR_METRICS, "prompt_tokens": prompt_tokens, "completion_tokens": n}
    if not req.get("stream"):
        text = "".join(source[i % len(source)] for i in range(n))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                 "total_tokens": prompt_tokens + n}  # fmt: skip
        body = (
            head + b',"choices":[{"index":0,"message":{"role":"assistant","content":'
            + _encode(text) + b'},"logprobs":null,'
            b'"finish_reason":"length","stop_reason":null}],"usage":' + _encode(usage)
            + b',"metrics":' + _encode(metrics) + b',"system_fingerprint":null}'
        )  # fmt: skip
        await _floor_plain(send, 200, body, [(b"content-type", b"application/json"), rid])
        return
    await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, rid]})
    head = b"data: " + head + b',"choices":[{"index":0,"delta":{'
    tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    role = b'"role":"assistant",'
    for i in range(n):
        frame = head + (role if i == 0 else b"") + b'"content":' + _encode(source[i % len(source)])
        await send({"type": "http.response.body", "body": frame + tail, "more_body": True})
    finish = (
        head + b'},"logprobs":null,"finish_reason":"length","stop_reason":null}],"metrics":'
        + _encode(metrics) + b"}\n\n"
    )  # fmt: skip
    await send({"type": "http.response.body", "body": finish, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def serve(name: str, port: int) -> None:
    """Run the floor or the FastAPI peer on uvicorn with the wrapper's uvicorn settings."""
    import uvicorn  # noqa: PLC0415

    app: Any = floor_app
    if name == "fastapi":
        from bench.peers.fastapi_peer import app  # noqa: PLC0415
    from service.http_limits import server_options  # noqa: PLC0415
    from service.settings import Settings  # noqa: PLC0415

    # the settings `service.cli` gives uvicorn: the same protocol class with the same edge
    # limits; no logging config (the wrapper configures its own logging; here that leaves
    # uvicorn's access log without a handler, i.e. off)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        timeout_graceful_shutdown=30,
        **server_options(Settings.from_env()),
    )


# --- the client: raw HTTP/1.1 on keep-alive connections ----------------------------------------


def _request_bytes(stream: bool, max_tokens: int) -> bytes:
    body = _encode(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": stream,
        }
    )
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class ClientError(RuntimeError):
    """A response the benchmark did not expect."""


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[float, float, int]:
    """One request on an open connection: (TTFT s, E2E s, token frames)."""
    perf = time.perf_counter
    started = perf()
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ClientError(head.split(b"\r\n", 1)[0].decode("latin-1"))
    lower = head.lower()
    if b"transfer-encoding: chunked" not in lower:
        length = int(re.search(rb"content-length: *(\d+)", lower).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        done = perf() - started
        return done, done, 1
    first: float | None = None
    frames = 0
    pending = b""
    while True:
        size = int(await reader.readuntil(b"\r\n"), 16)
        if size == 0:
            await reader.readexactly(2)
            break
        pending += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in pending:
            event, pending = pending.split(b"\n\n", 1)
            if b'"content":' in event:
                frames += 1
                if first is None:
                    first = perf() - started
    end = perf() - started
    return (end if first is None else first), end, frames


async def _client(
    port: int, concurrency: int, requests: int, stream: bool, server_pid: int
) -> dict[str, Any]:
    request = _request_bytes(stream, TOKENS if stream else 1)
    conns = [
        await asyncio.open_connection("127.0.0.1", port, limit=1 << 20) for _ in range(concurrency)
    ]
    # every connection once (warm-up: route caches, first-use allocations), not measured
    await asyncio.gather(*(_exchange(r, w, request) for r, w in conns))
    remaining = [requests]
    ttft: list[float] = []
    e2e: list[float] = []
    frames = [0]

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            first, end, got = await _exchange(reader, writer, request)
            ttft.append(first)
            e2e.append(end)
            frames[0] += got

    cpu0 = server_cpu_s(server_pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    wall = time.perf_counter() - t0
    cpu = server_cpu_s(server_pid) - cpu0
    for _, writer in conns:
        writer.close()
    return {"wall_s": wall, "cpu_s": cpu, "frames": frames[0], "ttft": ttft, "e2e": e2e}


def server_cpu_s(pid: int) -> float:
    """CPU seconds the process's threads have run, in ns resolution where Linux gives it.

    `/proc/<pid>/task/*/schedstat` counts nanoseconds on the CPU per thread; psutil's user +
    system times tick in 10 ms steps, too coarse for the short phases at concurrency 1.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return total / 1e9


def client_main(argv: list[str]) -> None:
    """`python -m bench.overhead _client PORT C N stream|json PID`: one measured phase as JSON."""
    port, concurrency, requests, mode, pid = argv
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        uvloop.install()
    result = asyncio.run(
        _client(int(port), int(concurrency), int(requests), mode == "stream", int(pid))
    )
    sys.stdout.write(json.dumps(result))


# --- orchestration ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One server process, in a process group of its own, logging to a file."""

    def __init__(self, name: str, logs: Path) -> None:
        self.name = name
        self.port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_API_KEY=API_KEY)
        if name == "wrapper":
            cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port)]
            env.update(IW_API_KEY=API_KEY, IW_ADMIN_KEY=ADMIN_KEY, IW_PRELOAD="echo")
            env.update(IW_MAX_QUEUE="1024")  # c=256 must queue, never be refused
        else:
            cmd = [sys.executable, "-m", "bench.overhead", "_serve", name, str(self.port)]
        self.log = logs / f"{name}.log"
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until a streamed request succeeds (the wrapper's model is loaded then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError, ClientError, asyncio.IncompleteReadError):
                self.sample()
                return
            time.sleep(0.3)
        raise SystemExit(
            f"{self.name} not ready in {timeout:.0f} s:\n{self.log.read_text()[-3000:]}"
        )

    def sample(self, stream: bool = True, max_tokens: int = 4) -> bytes:
        """One whole response (headers and body), raw."""
        request = _request_bytes(stream, max_tokens).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise ClientError(data[:200].decode("latin-1"))
        return data

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after 10 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


@contextlib.contextmanager
def running(names: list[str], logs: Path) -> Iterator[dict[str, Server]]:
    """Start the servers, wait until each answers, stop them all at the end."""
    servers: dict[str, Server] = {}
    try:
        for name in names:
            servers[name] = Server(name, logs)
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _normalise(raw: bytes) -> tuple[bytes, int]:
    """A response's body with what differs per request blanked out, and its number of chunks.

    Ids, timestamps and metric values differ; the event bytes must not. How the events are cut
    into writes may differ (the wrapper joins frames that are ready together).
    """
    head, body = raw.split(b"\r\n\r\n", 1)
    chunks = [body]
    if b"transfer-encoding: chunked" in head.lower():
        chunks = []
        while body:
            size, _, body = body.partition(b"\r\n")
            chunks.append(body[: int(size, 16)])
            body = body[int(size, 16) + 2 :]
    out = b"".join(chunks)
    out = re.sub(rb"chatcmpl-[0-9a-f]{32}", b"chatcmpl-ID", out)
    out = re.sub(rb'"created":\d+', b'"created":0', out)
    return re.sub(rb'":(-?[0-9][0-9.e+-]*|null)', b'":#', out), len([c for c in chunks if c])


def check_identical(servers: dict[str, Server]) -> str:
    """Compare the floor's stream and response with the wrapper's (after `_normalise`)."""
    if "floor" not in servers or "wrapper" not in servers:
        return "not checked (floor and wrapper are not both running)"
    writes = ""
    for stream in (True, False):
        floor, floor_chunks = _normalise(servers["floor"].sample(stream, TOKENS))
        wrapper, wrapper_chunks = _normalise(servers["wrapper"].sample(stream, TOKENS))
        if floor != wrapper:
            kind = "stream" if stream else "response"
            at = next(
                (i for i, (a, b) in enumerate(zip(floor, wrapper, strict=False)) if a != b),
                min(len(floor), len(wrapper)),
            )
            lo = max(0, at - 200)
            return (
                f"DIFFERENT {kind} at byte {at}:\nfloor:   {floor[lo : at + 300]!r}\n"
                f"wrapper: {wrapper[lo : at + 300]!r}"
            )
        if stream:
            writes = f"; body chunks per stream: floor {floor_chunks}, wrapper {wrapper_chunks}"
    return f"identical (ids, timestamps and metric values aside){writes}"


def phase(server: Server, concurrency: int, requests: int, stream: bool) -> dict[str, Any]:
    """Run one measured phase in a client process of its own."""
    mode = "stream" if stream else "json"
    out = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "_client", str(server.port), str(concurrency),
         str(requests), mode, str(server.proc.pid)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"client failed against {server.name}:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return (ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)) * 1000


def summarise(stream: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    """The figures of one server at one level."""
    return {
        "cpu_us_per_token": stream["cpu_s"] / max(stream["frames"], 1) * 1e6,
        "tokens_per_cpu_s": stream["frames"] / max(stream["cpu_s"], 1e-9),
        "ttft_p50": _pct(stream["ttft"], 50),
        "ttft_p99": _pct(stream["ttft"], 99),
        "e2e_p50": _pct(stream["e2e"], 50),
        "e2e_p99": _pct(stream["e2e"], 99),
        "stream_tokens_per_s": stream["frames"] / stream["wall_s"],
        "json_rps": len(plain["e2e"]) / plain["wall_s"],
        "json_cpu_us_per_request": plain["cpu_s"] / max(len(plain["e2e"]), 1) * 1e6,
        "frames": stream["frames"],
    }


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    """The markdown table: one row per server and level, ratios to the floor beside."""
    lines = [
        (
            "| server | c | CPU µs/token | x floor | TTFT p50 ms | TTFT p99 ms | E2E p50 ms "
            "| E2E p99 ms | +TTFT p50 ms | +E2E p50 ms | req/s (max_tokens 1) | x floor |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, by_server in results.items():
        floor = by_server.get("floor")
        for name, row in by_server.items():
            cpu_x = f"{row['cpu_us_per_token'] / floor['cpu_us_per_token']:.2f}" if floor else "-"
            rps_x = f"{row['json_rps'] / floor['json_rps']:.2f}" if floor else "-"
            d_ttft = f"{row['ttft_p50'] - floor['ttft_p50']:+.2f}" if floor else "-"
            d_e2e = f"{row['e2e_p50'] - floor['e2e_p50']:+.2f}" if floor else "-"
            lines.append(
                f"| {name} | {level} | {row['cpu_us_per_token']:.1f} | {cpu_x} "
                f"| {row['ttft_p50']:.2f} | {row['ttft_p99']:.2f} | {row['e2e_p50']:.2f} "
                f"| {row['e2e_p99']:.2f} | {d_ttft} | {d_e2e} | {row['json_rps']:.0f} | {rps_x} |"
            )
    return "\n".join(lines)


def verdict(results: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    """The three targets, each PASS or MISS with the figure that decides it."""
    out = []
    levels = [lv for lv, rows in results.items() if {"floor", "wrapper"} <= rows.keys()]
    if levels:
        worst = max(
            results[lv]["wrapper"]["cpu_us_per_token"] / results[lv]["floor"]["cpu_us_per_token"]
            for lv in levels
        )
        out.append(f"{'PASS' if worst <= 2 else 'MISS'}: CPU per token ≤ 2x floor "
                   f"at every level (worst {worst:.2f}x)")  # fmt: skip
    if 1 in levels:
        w, f = results[1]["wrapper"], results[1]["floor"]
        d_ttft, d_e2e = w["ttft_p50"] - f["ttft_p50"], w["e2e_p50"] - f["e2e_p50"]
        ok = d_ttft <= 0.5 and d_e2e <= 0.5
        out.append(f"{'PASS' if ok else 'MISS'}: added latency at c=1 ≤ 0.5 ms "
                   f"(TTFT p50 {d_ttft:+.2f} ms, E2E p50 {d_e2e:+.2f} ms)")  # fmt: skip
    peer = [lv for lv, rows in results.items() if {"fastapi", "wrapper"} <= rows.keys()]
    if peer:
        worst = min(
            results[lv]["wrapper"]["tokens_per_cpu_s"] / results[lv]["fastapi"]["tokens_per_cpu_s"]
            for lv in peer
        )
        out.append(f"{'PASS' if worst >= 1.5 else 'MISS'}: ≥ 1.5x the FastAPI peer's streamed "
                   f"tokens per server CPU second (worst {worst:.2f}x)")  # fmt: skip
    return out


def plot(results: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    """Four panels against concurrency: CPU/token, TTFT p50, E2E p50, non-streaming req/s."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = (
        ("cpu_us_per_token", "server CPU µs per streamed token"),
        ("ttft_p50", "TTFT p50 (ms, client)"),
        ("e2e_p50", "E2E p50 (ms, client, 64 tokens)"),
        ("json_rps", "non-streaming req/s (max_tokens 1)"),
    )
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    levels = sorted(results)
    names = [n for n in SERVERS if any(n in results[lv] for lv in levels)]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for name in names:
            xs = [lv for lv in levels if name in results[lv]]
            ax.plot(xs, [results[lv][name][key] for lv in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(lv) for lv in levels])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(visible=True, alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("inference-wrapper overhead on the echo backend (64 tokens, ignore_eos)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--concurrency", default=",".join(map(str, LEVELS)))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the request counts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [n for n in args.servers.split(",") if n]
    unknown = set(names) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    results: dict[int, dict[str, dict[str, float]]] = {}
    with running(names, logs) as servers:
        identical = check_identical(servers)
        print(f"floor vs wrapper bytes: {identical}", flush=True)
        for level in levels:
            n_stream = max(level, round(STREAM_REQUESTS.get(level, 4 * level) * args.scale))
            n_json = max(level, round(JSON_REQUESTS.get(level, 6 * level) * args.scale))
            results[level] = {}
            for name in names:
                server = servers[name]
                stream = phase(server, level, n_stream, stream=True)
                plain = phase(server, level, n_json, stream=False)
                results[level][name] = row = summarise(stream, plain)
                print(f"  c={level:<4} {name:<8} {row['cpu_us_per_token']:7.1f} µs/token  "
                      f"TTFT p50 {row['ttft_p50']:7.2f} ms  E2E p50 {row['e2e_p50']:8.2f} ms  "
                      f"{row['json_rps']:7.0f} req/s", flush=True)  # fmt: skip
    elapsed = time.monotonic() - started
    load = os.getloadavg()
    md = table(results)
    checks = verdict(results)
    host = f"{psutil.cpu_count()} CPUs, load average {load[0]:.1f} at the end"
    report = (
        f"{md}\n\n" + "\n".join(f"- {line}" for line in checks) + "\n\n"
        f"{TOKENS} tokens per streamed request (echo backend, no delay, `ignore_eos`); "
        "CPU = the server process's CPU time (all threads, /proc schedstat) over the streamed "
        f"phase / token frames received; latencies measured by the client; floor vs wrapper bytes: "
        f"{identical.splitlines()[0]}. {host}; {elapsed:.0f} s in all. On a shared machine the "
        "absolute figures move from run to run: the ratios within one run are what counts.\n"
    )
    print("\n" + report)
    (args.out / "overhead.md").write_text(report)
    (args.out / "overhead.json").write_text(
        json.dumps({"results": results, "checks": checks, "identical": identical}, indent=1)
    )
    plot(results, args.out / "overhead.png")
    print(f"written: {args.out / 'overhead.md'}, overhead.json, overhead.png")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        main()
