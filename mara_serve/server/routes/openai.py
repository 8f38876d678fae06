"""POST /v1/chat/completions, /v1/completions and /v1/responses (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from mara_serve.server.auth import require_api_key
from mara_serve.server.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from mara_serve.server.protocol.completion import CompletionRequest, CompletionResponse
from mara_serve.server.protocol.errors import error_responses
from mara_serve.server.protocol.responses import ResponseObject, ResponsesRequest
from mara_serve.server.routes.deps import Ready

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 404, 408, 413, 429, 500, 503),
)
# With `stream: true` the 200 is an SSE stream, not JSON; `itemSchema` describes one event.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a JSON chunk (chat.completion.chunk / text_completion), an "
            "in-band error object, or the last event, [DONE]",
        }
    },
}
STREAM_RESPONSE = {
    200: {
        "description": "the completion; with `stream: true` an SSE stream of chunks",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
    }
}


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, services: Ready
) -> Response:
    """Creates a model response for the chat conversation (SSE stream with `stream: true`)."""
    return await services.chat.create(body, request)


@router.post("/completions", response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def create_completion(body: CompletionRequest, request: Request, services: Ready) -> Response:
    """Creates a completion for the prompt(s) (SSE stream with `stream: true`)."""
    return await services.completions.create(body, request)


@router.post("/responses", response_model=ResponseObject, responses=STREAM_RESPONSE)
async def create_response(body: ResponsesRequest, request: Request, services: Ready) -> Response:
    """Creates a model response (OpenAI's Responses API, served through the chat path; nothing
    is stored). SSE events with `stream: true`."""
    return await services.responses.create(body, request)
