"""Fake `sglang.srt.entrypoints.engine.Engine` (sglang 0.5.23 `srt/entrypoints/engine.py`).

Same constructor contract (`Engine(**kwargs)` → `ServerArgs(**kwargs)`, engine.py:278-330),
same `async_generate` signature (engine.py:545-648: parameter names, order and defaults; a
coroutine that returns the manager's async generator when `stream=True`), same `shutdown`
(engine.py:1450) and `get_all_child_pids` (engine.py:398). What it leaves out: subprocesses,
ZMQ, `atexit.register(self.shutdown)` (engine.py:326; it would outlive the test), the
environment writes of `_set_envs_and_config` (engine.py:1878).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal, Self

from sglang import fake_control
from sglang.srt.managers.tokenizer_manager import GenerateReqInput, TokenizerManager
from sglang.srt.server_args import ServerArgs


class Engine:
    """engine.py:248: the offline engine."""

    server_args_class: Any = ServerArgs

    def __init__(self, **kwargs: Any) -> None:
        """engine.py:278-398, minus the processes."""
        if "server_args" in kwargs:
            server_args = kwargs["server_args"]
        else:
            if "log_level" not in kwargs:
                kwargs["log_level"] = "error"  # engine.py:294-296
            server_args = self.server_args_class(**kwargs)  # TypeError on an unknown name
        self.server_args = server_args
        self.tokenizer_manager: TokenizerManager | None = None  # engine.py:323
        self.shutdown_calls = 0  # fake-only
        fake_control.ENGINES.append(self)
        fake_control.SCRIPT.init_started.set()
        if fake_control.SCRIPT.init_gate is not None:
            fake_control.SCRIPT.init_gate.wait(timeout=30)  # stands for minutes of weight loading
        if fake_control.SCRIPT.fail_init is not None:
            raise RuntimeError(fake_control.SCRIPT.fail_init)
        self.tokenizer_manager = TokenizerManager(server_args)
        self.loop = self._ensure_event_loop()

    @staticmethod
    def _ensure_event_loop() -> asyncio.AbstractEventLoop:
        """engine.py:1404-1414."""
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            pass
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop

    def get_all_child_pids(self) -> list[int]:
        """engine.py:398: the scheduler/detokenizer processes (none in the fake)."""
        return []

    async def async_generate(  # the real signature, engine.py:545-585
        self,
        prompt: list[str] | str | None = None,
        sampling_params: list[dict[str, Any]] | dict[str, Any] | None = None,
        input_ids: list[list[int]] | list[int] | None = None,
        image_data: Any = None,
        audio_data: Any = None,
        video_data: Any = None,
        mm_hashes: Any = None,
        mm_content_hashes: Any = None,
        return_logprob: list[bool] | bool | None = False,
        logprob_start_len: list[int] | int | None = None,
        top_logprobs_num: list[int] | int | None = None,
        token_ids_logprob: list[list[int]] | list[int] | None = None,
        lora_path: list[str | None] | None = None,
        custom_logit_processor: list[str] | str | None = None,
        require_reasoning: bool = False,
        return_hidden_states: Any = False,
        return_routed_experts: bool = False,
        routed_experts_start_len: int = 0,
        stream: bool = False,
        bootstrap_host: list[str] | str | None = None,
        bootstrap_port: list[int] | int | None = None,
        bootstrap_room: list[int] | int | None = None,
        routed_dp_rank: int | None = None,
        disagg_prefill_dp_rank: int | None = None,
        kv_hints: dict[str, Any] | None = None,
        data_parallel_rank: int | None = None,
        external_trace_header: dict[str, Any] | None = None,
        rid: list[str] | str | None = None,
        session_params: dict[str, Any] | None = None,
        priority: int | None = None,
        session_id: str | None = None,
        *,
        cache_salt: list[str] | str | None = None,
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """engine.py:602-648: build the request, hand back the stream (or its one result)."""
        assert self.tokenizer_manager is not None
        obj = GenerateReqInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            stream=stream,
            rid=rid,
            other={"return_logprob": return_logprob, "priority": priority},
        )
        generator: AsyncIterator[dict[str, Any]] = self.tokenizer_manager.generate_request(
            obj, None
        )
        if stream is True:
            return generator
        first: dict[str, Any] = await generator.__anext__()
        return first

    def shutdown(self) -> None:
        """engine.py:1450-1497: blocks until the processes are gone (here: at once)."""
        self.shutdown_calls += 1
        if self.tokenizer_manager is not None:
            self.tokenizer_manager.kill()
        fake_control.SCRIPT.shut_down.set()

    def __enter__(self) -> Self:
        """engine.py:1499."""
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        """engine.py:1502-1504."""
        self.shutdown()
        return False
