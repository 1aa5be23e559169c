"""GPU check of issue 3: the transformers adapter on CUDA with a random-weight ~1B Llama.

The GPU machine reaches no hub, so the model is built there: a Llama config at about 1.1B
parameters (hidden 2048, 22 layers, 32 heads, 4 KV heads) with SmolLM2's vocabulary, random
weights in bf16, saved next to SmolLM2's tokenizer files (brought in `--tokenizer-dir`, a few MB).
Then, through `TransformersAdapter` exactly as the service drives it:

- device memory (NVML, all processes, and this process) before CUDA, after CUDA init (the
  baseline), after load, after the runs, after unload; torch allocator figures beside them;
- TTFT and TPOT at concurrency 1 and 8 with a fixed output length (`ignore_eos`);
- what unload gives back against the post-CUDA-init baseline.

A short table is printed last; the full results go to `$OUT/transformers_cuda.json` (and the
table to `$OUT/transformers_cuda.txt`) when `$OUT` is set. `--cpu-smoke` runs the same path with
a tiny model on CPU, so the script can be checked where there is no GPU.

    python bench/gpu/transformers_cuda.py --tokenizer-dir shared/smollm2-tokenizer

Must never: download anything; leave the model folder half written (it is reused when complete).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

# run as a script from the repository root or anywhere: the project's packages sit two levels up
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from adapters.base import AdapterContext  # noqa: E402
from adapters.transformers import Dtype, TransformersAdapter, TransformersParams  # noqa: E402
from schemas.generation import GenerationRequest, Message, SamplingOptions  # noqa: E402

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
MIB = 2**20
#: (hidden, layers, heads, kv heads, intermediate): ~1.1B with a 49152 vocabulary
GPU_SHAPE = (2048, 22, 32, 4, 5632)
SMOKE_SHAPE = (64, 2, 4, 2, 128)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Check the transformers adapter on CUDA with a random-weight ~1B Llama."
    )
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="folder with SmolLM2's tokenizer.json, tokenizer_config.json, chat_template.jinja "
        "(default: the converted bundled folder in the cache, when present)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "iw-bench-llama",
        help="where the random model is built (reused when complete)",
    )
    parser.add_argument("--prompt-words", type=int, default=60, help="words in each prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="fixed output length")
    parser.add_argument(
        "--requests",
        type=int,
        default=4,
        help="requests per level (at least two waves: 2 x concurrency)",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8], help="concurrency levels to run"
    )
    parser.add_argument("--device", default="cuda:0", help="adapter device (cuda or cuda:N)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny model on CPU, no NVML: checks the script where there is no GPU",
    )
    return parser.parse_args(argv)


# --- device memory ------------------------------------------------------------------------------


class Nvml:
    """NVML device memory, all processes and ours; every figure `None` where NVML is absent."""

    def __init__(self, index: int | None) -> None:
        self.handle: Any = None
        self.name = "unknown"
        if index is None:
            self.name = "cpu (smoke run, no NVML)"
            return
        try:
            import pynvml  # noqa: PLC0415

            pynvml.nvmlInit()
            self.nvml: Any = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception as exc:
            print(f"NVML unavailable ({type(exc).__name__}); device figures will be empty")

    def used_mib(self) -> float | None:
        """Device memory in use by every process."""
        if self.handle is None:
            return None
        return float(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) / MIB

    def ours_mib(self) -> float | None:
        """Device memory NVML charges to this process."""
        if self.handle is None:
            return None
        pid = os.getpid()
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return float(proc.usedGpuMemory) / MIB
        return 0.0


def snapshot(label: str, nvml: Nvml, torch: Any, on_cuda: bool) -> dict[str, Any]:
    """Device memory now, NVML and torch allocator side by side."""
    snap: dict[str, Any] = {
        "label": label,
        "nvml_used_mib": nvml.used_mib(),
        "nvml_process_mib": nvml.ours_mib(),
        "rss_mib": psutil.Process().memory_info().rss / MIB,
    }
    if on_cuda and torch.cuda.is_initialized():
        snap["torch_allocated_mib"] = torch.cuda.memory_allocated() / MIB
        snap["torch_reserved_mib"] = torch.cuda.memory_reserved() / MIB
        snap["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    return snap


# --- the model ----------------------------------------------------------------------------------


def find_tokenizer_dir(explicit: Path | None) -> Path:
    """The folder with SmolLM2's tokenizer files."""
    if explicit is not None:
        return explicit
    from adapters.bundled import BUNDLED, bundled_dir, default_cache_dir, locate_gguf  # noqa: PLC0415

    folder = bundled_dir("smollm2-135m", default_cache_dir(), locate_gguf(BUNDLED["smollm2-135m"]))
    if not folder.is_dir():
        msg = "no --tokenizer-dir given and no converted bundled model in the cache"
        raise SystemExit(msg)
    return folder


def build_model(work_dir: Path, tokenizer_dir: Path, shape: tuple[int, ...], dtype: str) -> Path:
    """Random-weight Llama with SmolLM2's tokenizer, saved as an HF folder (reused if there)."""
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    hidden, layers, heads, kv_heads, intermediate = shape
    target = work_dir / f"llama-{hidden}x{layers}-{dtype}"
    if (target / "DONE").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=8192,
        rope_theta=100_000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    tmp = work_dir / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    (tmp / "DONE").write_text(f"{sum(p.numel() for p in model.parameters())}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return target


# --- the runs -----------------------------------------------------------------------------------


async def one_request(
    adapter: TransformersAdapter, prompt: str, max_tokens: int, index: int
) -> dict[str, float]:
    """One request; times from the adapter's side (no HTTP): TTFT, TPOT, E2E."""
    req = GenerationRequest(
        f"bench-{index}",
        (Message("user", prompt),),
        SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    started = time.perf_counter()
    first: float | None = None
    last = started
    tokens = 0
    prompt_tokens = 0
    async for delta in adapter.generate(req):
        now = time.perf_counter()
        if delta.token_count and first is None:
            first = now
        if delta.token_count:
            last = now
        tokens += delta.token_count
        prompt_tokens = delta.prompt_tokens or prompt_tokens
    ttft = (first or last) - started
    tpot = (last - (first or last)) / (tokens - 1) if tokens > 1 else float("nan")
    return {
        "ttft_ms": ttft * 1000,
        "tpot_ms": tpot * 1000,
        "e2e_ms": (last - started) * 1000,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
    }


async def run_level(
    adapter: TransformersAdapter, concurrency: int, count: int, prompt: str, max_tokens: int
) -> dict[str, Any]:
    """`count` requests with at most `concurrency` in flight; medians and throughput."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> dict[str, float]:
        async with gate:
            return await one_request(adapter, prompt, max_tokens, i)

    started = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(count)))
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": count,
        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in results),
        "ttft_ms_max": max(r["ttft_ms"] for r in results),
        "tpot_ms_median": statistics.median(r["tpot_ms"] for r in results),
        "output_tokens_per_s": tokens / wall,
        "prompt_tokens": results[0]["prompt_tokens"],
        "wall_s": wall,
        "per_request": results,
    }


async def check(args: argparse.Namespace) -> dict[str, Any]:
    """Build, load, run, unload; return every figure."""
    import torch  # noqa: PLC0415

    on_cuda = not args.cpu_smoke
    device = args.device if on_cuda else "cpu"
    index = int(device.partition(":")[2] or 0) if on_cuda else 0
    nvml = Nvml(index if on_cuda else None)
    memory = [snapshot("before CUDA init", nvml, torch, on_cuda)]
    if on_cuda:
        torch.cuda.init()
        torch.zeros(1, device=device)  # creates the context the baseline is measured against
        torch.cuda.synchronize()
    memory.append(snapshot("after CUDA init (baseline)", nvml, torch, on_cuda))

    dtype: Dtype = "bfloat16" if on_cuda else "float32"
    shape = GPU_SHAPE if on_cuda else SMOKE_SHAPE
    started = time.perf_counter()
    folder = build_model(args.work_dir, find_tokenizer_dir(args.tokenizer_dir), shape, dtype)
    build_s = time.perf_counter() - started

    context = AdapterContext(name="transformers", model_roots=(args.work_dir,))
    adapter = TransformersAdapter(context)
    params = TransformersParams(
        dtype=dtype,
        device=device,
        max_model_len=2048,
        max_concurrency=max(args.concurrency),
    )
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    info = await adapter.load(str(folder), params)
    memory.append(snapshot("after load", nvml, torch, on_cuda))

    prompt = " ".join(f"word{i % 50}" for i in range(args.prompt_words))
    levels = [
        await run_level(adapter, c, max(args.requests, 2 * c), prompt, args.max_tokens)
        for c in args.concurrency
    ]
    memory.append(snapshot("after runs", nvml, torch, on_cuda))
    started = time.perf_counter()
    await adapter.unload()
    unload_s = time.perf_counter() - started
    memory.append(snapshot("after unload", nvml, torch, on_cuda))
    return {
        "card": nvml.name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": {
            "shape": dict(
                zip(["hidden", "layers", "heads", "kv_heads", "ffn"], shape, strict=True)
            ),
            "parameters": info.details.get("parameters"),
            "dtype": dtype,
            "build_s": build_s,
        },
        "load": {
            "import_s": info.import_s,
            "init_s": info.init_s,
            "warmup_s": info.warmup_s,
            "device": info.device,
            "details": info.details,
        },
        "unload_s": unload_s,
        "memory": memory,
        "levels": levels,
    }


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    """The short table printed last."""
    mem = {m["label"]: m for m in result["memory"]}
    base = mem["after CUDA init (baseline)"]
    loaded = mem["after load"]
    after = mem["after unload"]

    def delta(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
        if a.get(key) is None or b.get(key) is None:
            return None
        return float(a[key]) - float(b[key])

    load = result["load"]
    lines = [
        f"card: {result['card']}  torch {result['torch']}  transformers {result['transformers']}",
        f"model: {result['model']['parameters']:,} parameters, {result['model']['dtype']}",
        (
            f"load: import {load['import_s']:.2f} s, init {load['init_s']:.2f} s, "
            f"warm-up {load['warmup_s']:.2f} s; unload {result['unload_s']:.2f} s"
        ),
        "",
        "memory (MiB)                 NVML used   NVML ours   torch alloc   torch reserved    RSS",
    ]
    lines.extend(
        f"{m['label']:<28} {_fmt(m['nvml_used_mib']):>9}   {_fmt(m['nvml_process_mib']):>9}"
        f"   {_fmt(m.get('torch_allocated_mib')):>11}   {_fmt(m.get('torch_reserved_mib')):>14}"
        f"   {_fmt(m['rss_mib']):>5}"
        for m in result["memory"]
    )
    lines += [
        (
            f"load delta vs baseline: NVML {_fmt(delta(loaded, base, 'nvml_used_mib'))} MiB, "
            f"torch allocated {_fmt(loaded.get('torch_allocated_mib'))} MiB"
        ),
        (
            f"after unload vs baseline: NVML {_fmt(delta(after, base, 'nvml_used_mib'))} MiB, "
            f"torch allocated {_fmt(after.get('torch_allocated_mib'))} MiB"
        ),
        "",
        "concurrency  requests  prompt tok  TTFT med ms  TTFT max ms  TPOT med ms  out tok/s",
    ]
    lines.extend(
        f"{lvl['concurrency']:>11}  {lvl['requests']:>8}  {lvl['prompt_tokens']:>10}"
        f"  {lvl['ttft_ms_median']:>11.1f}  {lvl['ttft_ms_max']:>11.1f}"
        f"  {lvl['tpot_ms_median']:>11.1f}  {lvl['output_tokens_per_s']:>9.1f}"
        for lvl in result["levels"]
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the check; print the table; write results under $OUT when set."""
    args = parse_args(argv)
    result = asyncio.run(check(args))
    table = render(result)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "transformers_cuda.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "transformers_cuda.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
