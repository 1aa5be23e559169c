"""Data plane: OpenAI chat and legacy completions, the model list and retrieve; vLLM's tokenize.

Must never: hold serving logic (it lives in `service.serving`); answer before auth.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from registry.manager import LoadedModel, ModelManager, ModelState
from schemas.errors import NotFoundError
from schemas.openai import ModelCard, ModelList, ModelPermission
from service.auth import require_api
from service.completions import CompletionServing, TokenServing
from service.context import context_of
from service.errors import json_response
from service.serving import ChatServing


def _card(manager: ModelManager, current: LoadedModel) -> ModelCard:
    """The served model as `GET /v1/models` and its retrieve show it."""
    # the name is the operator's or the loader's choice: a secret there stays masked
    name = manager.secrets.mask(current.plan.served_model_name)
    # vLLM draws a new permission id per answer; ours is fixed per load, so the listed card and
    # the retrieved one are equal
    perm_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{name}@{current.loaded_at}").hex
    return ModelCard(
        id=name,
        object="model",
        created=int(current.loaded_at),
        # not vLLM's "vllm": the card describes this server, whatever engine runs behind it
        # (the backend is in GET /v1/model/status); clients do not branch on it
        owned_by="inference-wrapper",
        root=manager.secrets.mask(current.plan.model),
        max_model_len=current.info.max_context,
        parent=None,
        permission=[ModelPermission(f"modelperm-{perm_id}", created=int(current.loaded_at))],
    )


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
            cards.append(_card(manager, current))
        return json_response(ModelList("list", cards))

    @get("/models/{model:path}", operation_id="retrieveModel", name="models:retrieve")
    async def retrieve_model(
        self, model: FromPath[str], manager: NamedDependency[ModelManager]
    ) -> Response[bytes]:
        """One model, by the id `GET /v1/models` lists (404 `model_not_found` for another id)."""
        current = manager.current
        name = model.removeprefix("/")
        if manager.state is ModelState.READY and current is not None:
            card = _card(manager, current)
            if name == card.id:
                return json_response(card)
        raise NotFoundError(
            f"The model `{manager.secrets.mask(name)[:256]}` does not exist",
            param="model",
            code="model_not_found",
        )

    @post(
        "/completions",
        operation_id="createCompletion",
        name="completions:create",
        status_code=200,
    )
    async def completions(
        self, request: Request[Any, Any, Any], completions: NamedDependency[CompletionServing]
    ) -> Any:
        """Create a legacy text completion, streamed as SSE when `stream: true`.

        `prompt` is text or token ids; `echo`, `logprobs` (an integer), `n`, `stop` and the
        sampling fields of chat are honoured where the backend can, refused by name elsewhere;
        `suffix` and `best_of` (other than `n`) are refused. The response carries `metrics`.
        """
        ctx = context_of(request.scope)
        ctx.handler_at = time.perf_counter()
        result = await completions.handle(request, ctx)
        if isinstance(result, Response):
            return result
        return json_response(result)


class TokenizeController(Controller):
    """vLLM's `/tokenize` and `/detokenize`, on backends with a tokenizer (API key)."""

    path = "/"
    guards = [require_api]  # noqa: RUF012
    tags = ["data plane"]  # noqa: RUF012

    @post("/tokenize", operation_id="tokenize", name="tokens:tokenize", status_code=200)
    async def tokenize(
        self, request: Request[Any, Any, Any], tokens: NamedDependency[TokenServing]
    ) -> Response[bytes]:
        """Token ids of a prompt, or of chat messages through the model's template (vLLM's shape).

        400 on a backend without a tokenizer.
        """
        body = await request.body()
        ctx = context_of(request.scope)
        result = await tokens.tokenize(body, request.headers.get("content-type"), ctx.request_id)
        return json_response(result)

    @post("/detokenize", operation_id="detokenize", name="tokens:detokenize", status_code=200)
    async def detokenize(
        self, request: Request[Any, Any, Any], tokens: NamedDependency[TokenServing]
    ) -> Response[bytes]:
        """The text of token ids (vLLM's shape); ids outside the vocabulary are a 400."""
        body = await request.body()
        ctx = context_of(request.scope)
        result = await tokens.detokenize(body, request.headers.get("content-type"), ctx.request_id)
        return json_response(result)
