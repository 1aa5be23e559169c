"""Data plane: OpenAI `POST /v1/chat/completions` and `GET /v1/models`.

Must never: hold serving logic (it lives in `service.serving`); answer before auth.
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency

from registry.manager import ModelManager, ModelState
from schemas.openai import ModelCard, ModelList
from service.auth import require_api
from service.context import context_of
from service.errors import json_response
from service.serving import ChatServing


class ChatController(Controller):
    """OpenAI-compatible inference routes (API key, or open when none is configured)."""

    path = "/v1"
    guards = [require_api]  # noqa: RUF012
    tags = ["data plane"]  # noqa: RUF012

    @post(
        "/chat/completions",
        operation_id="createChatCompletion",
        name="chat:create",
        status_code=200,
    )
    async def chat_completions(
        self, request: Request[Any, Any, Any], serving: NamedDependency[ChatServing]
    ) -> Any:
        """Create a chat completion, streamed as SSE when `stream: true`.

        The response (or the final stream chunk) carries a `metrics` object with this request's
        TTFT, TPOT, ITL, E2E and queue time as DESIGN.md defines them.
        """
        ctx = context_of(request.scope)
        ctx.handler_at = time.perf_counter()
        result = await serving.handle(request, ctx)
        if isinstance(result, Response):
            return result
        return json_response(result)

    @get("/models", operation_id="listModels", name="models:list")
    async def list_models(self, manager: NamedDependency[ModelManager]) -> Response[bytes]:
        """The served model, when one is ready (an empty list otherwise)."""
        cards = []
        current = manager.current
        if manager.state is ModelState.READY and current is not None:
            cards.append(
                ModelCard(
                    # the name is the operator's or the loader's choice: a secret there stays masked
                    id=manager.secrets.mask(current.plan.served_model_name),
                    object="model",
                    created=int(current.loaded_at),
                    owned_by="inference-wrapper",
                    root=manager.secrets.mask(current.plan.model),
                    max_model_len=current.info.max_context,
                )
            )
        return json_response(ModelList("list", cards))
