"""POST /v1/chat/completions and /v1/completions (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from server.auth import require_api_key
from server.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from server.protocol.completion import CompletionRequest, CompletionResponse
from server.routes.deps import ReadyState

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ReadyState
) -> Response:
    """Creates a model response for the chat conversation (SSE stream with `stream: true`)."""
    assert state.chat is not None
    return await state.chat.create(body, request)


@router.post("/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest, request: Request, state: ReadyState
) -> Response:
    """Creates a completion for the prompt(s) (SSE stream with `stream: true`)."""
    assert state.completions is not None
    return await state.completions.create(body, request)
