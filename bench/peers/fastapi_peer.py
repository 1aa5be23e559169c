"""A plain FastAPI + pydantic OpenAI wrapper over the echo engine: what most wrappers are.

The peer of `bench/overhead.py`. It does what a typical hand-written wrapper does (and what vLLM's
own OpenAI server does): a pydantic request model validated by FastAPI, a bearer-key dependency,
and one pydantic chunk model per token rendered with `model_dump_json`, streamed by Starlette's
`StreamingResponse`. Its engine is the project's own `EchoAdapter`, driven exactly as the wrapper
drives it, so that only the serving layer differs. No telemetry, no admission queue, no access
log: where it does less than the wrapper, the comparison favours the peer.

Must never: be imported by the service (fastapi and pydantic are bench-only dependencies).
"""

from __future__ import annotations

import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from adapters.base import AdapterContext
from adapters.echo import EchoAdapter, EchoParams
from schemas.generation import GenerationRequest, Message, SamplingOptions

API_KEY = os.environ.get("BENCH_API_KEY", "bench-api-key").encode()
MODEL = "echo"


class ChatMessage(BaseModel):
    """One request message."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    """`stream_options`."""

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The parts of an OpenAI chat request this peer honours."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    temperature: float | None = None
    top_p: float | None = None


class DeltaMessage(BaseModel):
    """A chunk's delta."""

    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One choice of a stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatChunk(BaseModel):
    """`chat.completion.chunk`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


class AssistantMessage(BaseModel):
    """The non-streaming answer."""

    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    """One choice of a whole response."""

    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class Usage(BaseModel):
    """Token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """`chat.completion`."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


engine = EchoAdapter(AdapterContext("echo"))


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """Load the echo engine once, as the wrapper's preload does."""
    await engine.load(MODEL, EchoParams())
    yield
    await engine.unload()


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)


def require_key(authorization: Annotated[str | None, Header()] = None) -> None:
    """A bearer key compared in constant time."""
    token = (authorization or "").removeprefix("Bearer ").encode()
    if not hmac.compare_digest(token, API_KEY):
        raise HTTPException(status_code=401, detail="invalid API key")


def _generation(req: ChatRequest) -> GenerationRequest:
    messages = tuple(Message(m.role, m.content, m.name) for m in req.messages)
    sampling = SamplingOptions(
        max_tokens=req.max_tokens or 16, ignore_eos=req.ignore_eos, temperature=req.temperature
    )
    return GenerationRequest(uuid.uuid4().hex, messages, sampling, MODEL)


@app.get("/health")
async def health() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


@app.post("/v1/chat/completions", dependencies=[Depends(require_key)], response_model=None)
async def chat(req: ChatRequest) -> Any:
    """Stream (SSE) or answer whole, like every OpenAI-compatible wrapper."""
    gen = _generation(req)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        return StreamingResponse(_stream(gen, cid, created), media_type="text/event-stream")
    texts: list[str] = []
    finish: str | None = None
    prompt = completion = 0
    async for delta in engine.generate(gen):
        texts.append(delta.text)
        completion += delta.token_count
        prompt = delta.prompt_tokens or prompt
        finish = delta.finish_reason or finish
    return ChatCompletion(
        id=cid,
        created=created,
        model=MODEL,
        choices=[Choice(index=0, message=AssistantMessage(content="".join(texts)),
                        finish_reason=finish)],
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion),
    )  # fmt: skip


async def _stream(gen: GenerationRequest, cid: str, created: int) -> AsyncIterator[str]:
    first = True
    async for delta in engine.generate(gen):
        if delta.text:
            chunk = ChatChunk(
                id=cid,
                created=created,
                model=MODEL,
                choices=[
                    ChunkChoice(
                        index=0,
                        delta=DeltaMessage(role="assistant" if first else None, content=delta.text),
                    )
                ],
            )
            first = False
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
        if delta.finish_reason is not None:
            chunk = ChatChunk(
                id=cid,
                created=created,
                model=MODEL,
                choices=[
                    ChunkChoice(index=0, delta=DeltaMessage(), finish_reason=delta.finish_reason)
                ],
            )
            yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
    yield "data: [DONE]\n\n"
