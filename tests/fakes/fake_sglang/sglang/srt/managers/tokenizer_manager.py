"""Fake `TokenizerManager`, with the scheduler and detokenizer it talks to folded into its loop.

The real manager (sglang 0.5.23 `srt/managers/tokenizer_manager.py`) tokenizes, sends requests
to the scheduler process over ZMQ and turns the detokenizer's batches into per-request dicts.
Here the "scheduler" is a step function run by the same `handle_loop` task, producing tokens
from `fake_control.SCRIPT`; everything the adapter can observe (method names and signatures,
the dicts it receives, abort and stop behaviour) copies the real code, cited line by line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from sglang import fake_control
from sglang.srt.managers.load_snapshot import LoadSnapshot, ShmLoadSnapshotReader
from sglang.srt.managers.schedule_batch import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_MATCHED_STR,
    FINISH_MATCHED_TOKEN,
    BaseFinishReason,
)
from sglang.srt.sampling.sampling_params import SamplingParams

_PIECE = re.compile(r"<\|[a-z_]+\|>|\s*[^\s<]+|\s+|<")


class FakeTokenizer:
    """The HF tokenizer surface sglang exposes as `tokenizer_manager.tokenizer` (line 642)."""

    bos_token_id = 1

    def __init__(self) -> None:
        self.chat_template: str | None = fake_control.SCRIPT.chat_template
        self.generation_prompt = fake_control.SCRIPT.generation_prompt
        self.eos_token_id = fake_control.SCRIPT.eos_token_id
        self._ids: dict[str, int] = {}
        self._pieces: dict[int, str] = {}

    def id_of(self, piece: str) -> int:
        """A stable id per distinct piece (ids below 10 are special tokens)."""
        if piece not in self._ids:
            self._ids[piece] = 10 + len(self._ids)
            self._pieces[self._ids[piece]] = piece
        return self._ids[piece]

    def apply_chat_template(  # transformers' signature, abridged
        self,
        conversation: list[dict[str, str]],
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """ChatML rendering; raises like transformers when the tokenizer has no template."""
        del tools, documents, chat_template, continue_final_message, return_dict, kwargs
        if not self.chat_template:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template")
        roles = [turn["role"] for turn in conversation]
        if "developer" in roles:
            raise ValueError("unknown role: developer")  # as many real templates do
        text = "".join(
            f"<|im_start|>{turn['role']}\n{turn['content']}<|im_end|>\n" for turn in conversation
        )
        if add_generation_prompt:
            text += self.generation_prompt
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        """Pieces of `text` to ids; BOS first when `add_special_tokens` (Llama/SmolLM style)."""
        del kwargs
        ids = [self.id_of(piece) for piece in _PIECE.findall(text)]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __len__(self) -> int:
        """Vocabulary size, as HF's `len(tokenizer)` (the fake's ids stay far below it)."""
        return 50_000

    def decode(self, ids: list[int]) -> str:
        """Ids back to text (special ids decode to nothing, as with skip_special_tokens)."""
        return "".join(self._pieces.get(i, "") for i in ids)


@dataclasses.dataclass
class GenerateReqInput:
    """io_struct.py `GenerateReqInput`: the fields `Engine.async_generate` fills (engine.py:604)."""

    text: Any = None  # str | list[str] | None in the real one
    input_ids: Any = None  # list[int] | list[list[int]] | None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    other: dict[str, Any] = dataclasses.field(default_factory=dict)

    def normalize_batch_and_arguments(self) -> None:
        """io_struct.py:454 and `_normalize_single_inputs` (rid and sampling defaults)."""
        if self.text is None and self.input_ids is None:
            raise ValueError("Either text, input_ids or input_embeds should be provided.")
        if isinstance(self.text, list) or isinstance(self.rid, list):
            raise NotImplementedError("the fake reproduces single requests only")
        if self.sampling_params is None:
            self.sampling_params = {}
        if self.rid is None:
            self.rid = uuid.uuid4().hex


@dataclasses.dataclass
class ReqState:
    """tokenizer_manager.py:268-303."""

    out_list: list[dict[str, Any]]
    finished: bool
    event: asyncio.Event
    obj: GenerateReqInput
    dispatched: bool = False
    abort_sent: bool = False
    last_output_offset: int = 0
    text: str = ""
    text_chunks: list[str] = dataclasses.field(default_factory=list)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.perf_counter)

    def append_text(self, chunk: str) -> None:
        """tokenizer_manager.py:295."""
        if chunk:
            self.text_chunks.append(chunk)

    def get_text(self) -> str:
        """tokenizer_manager.py:299."""
        if self.text_chunks:
            self.text += "".join(self.text_chunks)
            self.text_chunks.clear()
        return self.text


@dataclasses.dataclass
class _Req:
    """What the scheduler keeps per request (schedule_batch.py `Req`, the parts used here)."""

    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool
    output_ids: list[int] = dataclasses.field(default_factory=list)
    pieces: list[str] = dataclasses.field(default_factory=list)
    finished_reason: BaseFinishReason | None = None
    to_finish: BaseFinishReason | None = None
    send_token_offset: int = 0  # output_streamer: tokens already sent
    sent_offset: int = 0  # detokenizer DecodeStatus.sent_offset: characters already sent


class SignalHandler:
    """tokenizer_manager.py:4062: what sglang installs for SIGTERM/SIGQUIT."""

    def __init__(self, tokenizer_manager: TokenizerManager) -> None:
        self.tokenizer_manager = tokenizer_manager

    def sigterm_handler(self, signum: int | None = None, frame: object = None) -> None:
        """tokenizer_manager.py:4066: drain, then (in the real one) kill the process tree."""
        del signum, frame
        self.tokenizer_manager.gracefully_exit = True

    def running_phase_sigquit_handler(
        self, signum: int | None = None, frame: object = None
    ) -> None:
        """tokenizer_manager.py:4072: the real one kills the whole process tree."""
        del signum, frame
        self.tokenizer_manager.gracefully_exit = True


class TokenizerManager:
    """The attributes and methods of the real manager that the adapter touches."""

    def __init__(self, server_args: Any) -> None:
        script = fake_control.SCRIPT
        self.server_args = server_args
        self.model_path = server_args.model_path  # line 596
        self.context_len: int = server_args.context_length or script.context_len  # line 600
        self.incremental_streaming_output = server_args.incremental_streaming_output  # line 543
        self.allow_auto_truncate = server_args.allow_auto_truncate  # line 546
        # lines 631-646: no tokenizer under skip_tokenizer_init
        self.tokenizer = None if server_args.skip_tokenizer_init else FakeTokenizer()
        self.event_loop: asyncio.AbstractEventLoop | None = None  # line 712
        self.asyncio_tasks: set[asyncio.Task[None]] = set()  # line 713
        self.gracefully_exit = False  # line 719
        self.rid_to_state: dict[str, ReqState] = {}
        self.signal_handler_class = SignalHandler  # line 893
        self.load_snapshot_reader = ShmLoadSnapshotReader(self._snapshot)  # line 693
        # fake-only records, for tests
        self.aborts: list[tuple[str, bool]] = []
        self.received: list[dict[str, Any]] = []  # rid, input_ids, sampling_params per request
        self.dead = False
        # the "scheduler"
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._wake = asyncio.Event()

    # --- real API -------------------------------------------------------------------------------

    def auto_create_handle_loop(self) -> None:
        """tokenizer_manager.py:2440-2463, the real code minus the watchdog task."""
        if self.event_loop is not None:
            return
        loop = asyncio.get_running_loop()  # utils/common.py:5074 get_or_create_event_loop
        self.asyncio_tasks.add(loop.create_task(self.handle_loop()))
        self.event_loop = loop
        if threading.current_thread() is threading.main_thread():
            handler = self.signal_handler_class(self)
            loop.add_signal_handler(signal.SIGTERM, handler.sigterm_handler)
            loop.add_signal_handler(signal.SIGQUIT, handler.running_phase_sigquit_handler)

    async def generate_request(
        self, obj: GenerateReqInput, request: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """tokenizer_manager.py:895-966 for a single request."""
        self.auto_create_handle_loop()
        obj.normalize_batch_and_arguments()
        self._init_req_state(obj)
        assert isinstance(obj.rid, str)
        request_states = {obj.rid: self.rid_to_state[obj.rid]}
        try:
            tokenized = self._tokenize_one_request(obj)
            self._send_one_request(obj, tokenized)
            async for response in self._wait_one_response(obj, request):
                yield response
        except BaseException:
            # line 958-966: a closed or cancelled generator aborts its dispatched request
            self._release_req_states_on_failure(request_states)
            raise

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """tokenizer_manager.py:2241-2262."""
        if not abort_all and not rid:
            return
        state = None if abort_all else self.rid_to_state.get(rid)
        if not abort_all:
            if state is not None:
                if state.abort_sent:
                    return
                state.abort_sent = True
            elif self.server_args.tokenizer_worker_num == 1:
                return
        self.aborts.append((rid, abort_all))
        self._scheduler_abort(rid, abort_all)

    # --- request path (tokenizer side) ----------------------------------------------------------

    def _init_req_state(self, obj: GenerateReqInput) -> None:
        """tokenizer_manager.py:3798-3840."""
        assert isinstance(obj.rid, str)
        if obj.rid in self.rid_to_state:
            raise ValueError(f"Duplicate request ID detected: {obj.rid}")
        self.rid_to_state[obj.rid] = ReqState(
            out_list=[], finished=False, event=asyncio.Event(), obj=obj
        )

    def _tokenize_one_request(self, obj: GenerateReqInput) -> tuple[list[int], SamplingParams]:
        """Tokenize, check lengths (lines 1333-1378), build SamplingParams (lines 1549-1567)."""
        assert self.tokenizer is not None
        if obj.input_ids is not None:
            input_ids = [int(i) for i in obj.input_ids]
        else:
            assert isinstance(obj.text, str)
            input_ids = self.tokenizer.encode(obj.text)
        count = len(input_ids)
        if count >= self.context_len:
            raise ValueError(
                f"The input ({count} tokens) is longer than the "
                f"model's context length ({self.context_len} tokens)."
            )
        assert obj.sampling_params is not None
        max_new = obj.sampling_params.get("max_new_tokens")
        if max_new is not None and max_new + count > self.context_len:
            raise ValueError(
                "Requested token count exceeds the model's maximum context length "
                f"of {self.context_len} tokens. You requested a total of {max_new + count} "
                f"tokens: {count} tokens from the input messages and "
                f"{max_new} tokens for the completion. Please reduce the number "
                "of tokens in the input messages or the completion to fit within the limit."
            )
        self.received.append(
            {"rid": obj.rid, "input_ids": input_ids, "sampling_params": dict(obj.sampling_params)}
        )
        sampling = SamplingParams(**obj.sampling_params)
        sampling.verify()
        return input_ids, sampling

    def _send_one_request(
        self, obj: GenerateReqInput, tokenized: tuple[list[int], SamplingParams]
    ) -> None:
        assert isinstance(obj.rid, str)
        self.rid_to_state[obj.rid].dispatched = True
        input_ids, sampling = tokenized
        self._waiting.append(_Req(obj.rid, input_ids, sampling, obj.stream))
        self._wake.set()

    def _release_req_states_on_failure(self, request_states: dict[str, ReqState]) -> None:
        """tokenizer_manager.py:3850-3875."""
        for rid, state in request_states.items():
            current = self.rid_to_state.get(rid)
            if current is not None and current is state:
                if state.dispatched:
                    self.abort_request(rid)
                else:
                    del self.rid_to_state[rid]

    async def _wait_one_response(
        self, obj: GenerateReqInput, request: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        """tokenizer_manager.py:1936-2076 (`_wait_one_response`, `_stream_one_response`)."""
        del request
        assert isinstance(obj.rid, str)
        state = self.rid_to_state[obj.rid]
        is_stream = obj.stream
        while True:
            await state.event.wait()
            out_list = state.out_list
            state.out_list = []
            finished = state.finished
            state.event.clear()
            incremental_stream = is_stream and self.incremental_streaming_output
            if incremental_stream and len(out_list) > 1:
                out = _coalesce_streaming_chunks(out_list)  # line 1988
            else:
                out = out_list[-1]
            if is_stream and not incremental_stream and "text" in out and out["text"] is None:
                out["text"] = state.get_text()  # line 2005-2012: deferred text
            if finished:
                out["meta_info"]["response_sent_to_client_ts"] = time.time()
                finish = out["meta_info"].get("finish_reason")
                if isinstance(finish, dict):  # line 2042-2048
                    abort_out = self._handle_abort_finish_reason(out, state, is_stream)
                    if abort_out is not None:
                        yield abort_out
                        break
                yield out
                break
            if is_stream:
                out["meta_info"]["response_sent_to_client_ts"] = time.time()
                yield out

    def _handle_abort_finish_reason(
        self, out: dict[str, Any], state: ReqState, is_stream: bool
    ) -> dict[str, Any] | None:
        """tokenizer_manager.py:1891-1926."""
        finish_reason = out["meta_info"]["finish_reason"]
        status_code = finish_reason.get("status_code")
        if finish_reason.get("type") != "abort" or status_code is None:
            return None
        if not HTTPStatus.BAD_REQUEST <= status_code < 600:
            return None
        if self.rid_to_state.get(str(state.obj.rid)) is state:
            del self.rid_to_state[str(state.obj.rid)]
        if not is_stream:
            raise ValueError(finish_reason["message"])
        return out

    def _handle_batch_output(
        self,
        req: _Req,
        finish: dict[str, Any] | None,
        delta_text: str,
        delta_ids: list[int],
        completion_tokens: int,
    ) -> None:
        """tokenizer_manager.py:2480-2776 for one `BatchStrOutput` item."""
        state = self.rid_to_state.get(req.rid)
        if state is None:
            return  # line 2497-2504: state deleted (e.g. error abort already handled)
        meta_info: dict[str, Any] = {  # line 2507-2513
            "id": req.rid,
            "finish_reason": finish,
            "prompt_tokens": len(req.input_ids),
            "weight_version": "default",
            "num_retractions": 0,
        }
        meta_info.update(  # line 2553-2559
            {"reasoning_tokens": 0, "completion_tokens": completion_tokens, "cached_tokens": 0}
        )
        state.finished = finish is not None  # line 2619
        is_stream = state.obj.stream
        incremental = is_stream and self.incremental_streaming_output
        state.append_text(delta_text)
        state.output_ids.extend(delta_ids)
        out: dict[str, Any] | None
        if is_stream:
            if incremental:  # line 2635-2647
                state.last_output_offset = len(state.output_ids)
                out = {"text": delta_text, "output_ids": delta_ids, "meta_info": meta_info}
            elif state.finished:  # line 2648-2653
                out = {
                    "text": state.get_text(),
                    "output_ids": state.output_ids.copy(),
                    "meta_info": meta_info,
                }
            else:  # line 2654-2662: text deferred to _stream_one_response
                out = {"text": None, "output_ids": state.output_ids, "meta_info": meta_info}
        elif state.finished:
            out = {
                "text": state.get_text(),
                "output_ids": state.output_ids.copy(),
                "meta_info": meta_info,
            }
        else:
            out = None
        if state.finished:
            meta_info["e2e_latency"] = time.perf_counter() - state.created  # line 2753
            del self.rid_to_state[req.rid]  # line 2774
        if out is not None:
            state.out_list.append(out)
            state.event.set()

    def _handle_abort_req(self, rid: str) -> None:
        """tokenizer_manager.py:3577-3637: an abort that caught the request in the queue."""
        state = self.rid_to_state.get(rid)
        if state is None:
            return
        state.finished = True
        meta_info: dict[str, Any] = {
            "id": rid,
            "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "weight_version": "default",
            "e2e_latency": time.perf_counter() - state.created,
        }
        output_ids = state.output_ids
        meta_info["completion_tokens"] = len(output_ids)
        if state.obj.stream and self.incremental_streaming_output:
            output_ids = [output_ids[-1]] if output_ids else []
        # the whole text, in incremental mode too (line 3629-3633)
        out = {"text": state.get_text(), "output_ids": output_ids, "meta_info": meta_info}
        del self.rid_to_state[rid]
        state.out_list.append(out)
        state.event.set()

    # --- the "scheduler" and "detokenizer" ------------------------------------------------------

    async def handle_loop(self) -> None:
        """Stands for tokenizer_manager.py:2465 plus the scheduler and detokenizer processes."""
        while not self.dead:
            if self._step():
                await asyncio.sleep(0)
            else:
                self._wake.clear()
                await self._wake.wait()
        # the real loop stays blocked on a ZMQ socket nobody writes to once the engine is gone
        await asyncio.Event().wait()

    def kill(self) -> None:
        """What `Engine.shutdown` does to the scheduler side (callable from any thread)."""
        self.dead = True
        if self.event_loop is not None and not self.event_loop.is_closed():
            self.event_loop.call_soon_threadsafe(self._wake.set)

    def _scheduler_abort(self, rid: str, abort_all: bool) -> None:
        """scheduler.py:5675-5812 `abort_request`: by rid *prefix*, queued or running."""
        for req in list(self._waiting):
            if abort_all or req.rid.startswith(rid):
                self._waiting.remove(req)
                self._handle_abort_req(req.rid)
        for req in self._running:
            if req.finished_reason is None and (abort_all or req.rid.startswith(rid)):
                req.to_finish = FINISH_ABORT()
        self._wake.set()

    def _step(self) -> bool:
        """One scheduler iteration over running requests; True when anything happened."""
        limit = self.server_args.max_running_requests or 1 << 30
        while self._waiting and len(self._running) < limit:
            self._running.append(self._waiting.pop(0))
        progressed = False
        for req in list(self._running):
            if self._advance(req):
                progressed = True
                self._accept(req)
            if req.finished_reason is not None:
                self._running.remove(req)
        return progressed

    def _advance(self, req: _Req) -> bool:
        """Decode one token and update the finish state (schedule_batch.py:2007-2046)."""
        script = fake_control.SCRIPT
        if req.to_finish is not None:  # line 2011-2014
            req.finished_reason, req.to_finish = req.to_finish, None
            return True
        if script.error_abort is not None:
            status, message = script.error_abort
            req.finished_reason = FINISH_ABORT(message, HTTPStatus(status), "ScriptedError")
            return True
        if script.pause_after is not None and len(req.output_ids) >= script.pause_after:
            return False
        assert self.tokenizer is not None
        sampling = req.sampling
        index = len(req.output_ids)
        if (
            index >= len(script.pieces)
            and not sampling.ignore_eos
            and index >= sampling.min_new_tokens
        ):
            token, piece = self.tokenizer.eos_token_id, ""
        else:
            piece = script.pieces[index % len(script.pieces)] if script.pieces else "."
            token = self.tokenizer.id_of(piece)
        req.output_ids.append(token)
        req.pieces.append(piece)
        decoded = "".join(req.pieces)
        stop = next((s for s in sampling.stop_strs if s and s in decoded), None)
        if stop is not None:  # line 1911-1929: stop strings first
            req.finished_reason = FINISH_MATCHED_STR(matched=stop)
        elif not sampling.ignore_eos and (
            token in sampling.stop_token_ids or token == self.tokenizer.eos_token_id
        ):  # line 1856-1877
            req.finished_reason = FINISH_MATCHED_TOKEN(matched=token)
        elif len(req.output_ids) >= sampling.max_new_tokens:  # line 2038-2043
            req.finished_reason = FINISH_LENGTH(length=sampling.max_new_tokens)
        return True

    def _accept(self, req: _Req) -> None:
        """output_streamer.py:444-500 `accept`, then the detokenizer (detokenizer_manager.py)."""
        finished = req.finished_reason is not None
        if not finished:
            if not req.stream:
                return
            interval = self.server_args.stream_interval
            unsent = len(req.output_ids) - req.send_token_offset
            should = (
                interval == 1 or unsent >= interval or (req.send_token_offset == 0 and unsent > 0)
            )
            if not should or self._match_stop_prefix(req):  # line 471-473
                return
        delta_ids = req.output_ids[req.send_token_offset :]
        req.send_token_offset = len(req.output_ids)
        decoded = "".join(req.pieces)
        finish = req.finished_reason.to_json() if req.finished_reason is not None else None
        if finish is None:  # detokenizer_manager.py:398-414: stream what is decoded
            text = decoded[req.sent_offset :]
            req.sent_offset = len(decoded)
        else:  # detokenizer_manager.py:419-427: trim the matched stop, send the tail
            trimmed = _trim_matched_stop(
                decoded, finish, req.sampling.raw.get("no_stop_trim", False)
            )
            text = trimmed[req.sent_offset :]
            req.sent_offset = len(trimmed)
        self._handle_batch_output(req, finish, text, delta_ids, len(req.output_ids))

    @staticmethod
    def _match_stop_prefix(req: _Req) -> bool:
        """schedule_batch.py:1830-1853 `check_match_stop_str_prefix`."""
        tail = "".join(req.pieces)
        for stop in req.sampling.stop_strs:
            if stop and (stop in tail or any(tail.endswith(stop[:i]) for i in range(1, len(stop)))):
                return True
        return False

    def _snapshot(self) -> list[LoadSnapshot]:
        used = sum(len(r.input_ids) + len(r.output_ids) for r in self._running)
        return [
            LoadSnapshot(
                timestamp=time.time(),
                num_running_reqs=len(self._running),
                num_waiting_reqs=len(self._waiting),
                max_running_requests=self.server_args.max_running_requests or 0,
                token_usage=round(used / (self.context_len * 4), 4),
            )
        ]


def _trim_matched_stop(output: str, finished_reason: dict[str, Any], no_stop_trim: bool) -> str:
    """detokenizer_manager.py:194-212 (the string branch)."""
    matched = finished_reason.get("matched")
    if not isinstance(matched, str):
        return output
    pos = output.find(matched)
    if pos == -1:
        return output
    end = pos + len(matched)
    return output[:end] if no_stop_trim else output[:pos]


def _coalesce_streaming_chunks(out_list: list[dict[str, Any]]) -> dict[str, Any]:
    """tokenizer_manager.py:1854-1889 (text and output_ids joined, last meta_info kept)."""
    out = dict(out_list[-1])
    out["output_ids"] = [i for chunk in out_list for i in chunk["output_ids"]]
    out["text"] = "".join(chunk["text"] for chunk in out_list)
    return out
