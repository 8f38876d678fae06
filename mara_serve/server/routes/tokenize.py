"""POST /tokenize and /detokenize (vLLM's routes; API key required): the model's own
tokenizer and chat template, so a client can count tokens or build token-id prompts."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from mara_serve.engine.errors import InvalidRequestError
from mara_serve.engine.loading import render_chat
from mara_serve.server.auth import require_api_key
from mara_serve.server.errors import APIError
from mara_serve.server.protocol.errors import error_responses
from mara_serve.server.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from mara_serve.server.routes.deps import Ready

router = APIRouter(
    tags=["tokenizer"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 404, 503),
)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, services: Ready) -> TokenizeResponse:
    """Token ids of a prompt, or of messages rendered with the chat template."""
    if body.model is not None:
        services.models.resolve(body.model)  # 404 model_not_found
    if (body.prompt is None) == (body.messages is None):
        raise APIError("give exactly one of prompt or messages", param="prompt")
    tok = services.lm.tokenizer
    if body.messages is not None:
        messages = [m.to_template() for m in body.messages]
        try:
            ids = await run_in_threadpool(
                render_chat, tok, messages, None,
                body.add_generation_prompt and not body.continue_final_message,
                body.continue_final_message,
            )  # fmt: skip
        except Exception as e:  # the template refused the conversation
            raise APIError(f"the model's chat template rejected the messages: {e}",
                           param="messages") from None  # fmt: skip
        if body.add_special_tokens:
            ids = tok.build_inputs_with_special_tokens(ids)
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await run_in_threadpool(
            lambda: list(tok(body.prompt, add_special_tokens=special)["input_ids"])
        )
    strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=services.models.max_model_len,
                            tokens=ids, token_strs=strs)  # fmt: skip


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, services: Ready) -> DetokenizeResponse:
    """The text of token ids (special tokens included)."""
    if body.model is not None:
        services.models.resolve(body.model)
    vocab = services.lm.vocab_size
    if body.tokens and max(body.tokens) >= vocab:
        raise InvalidRequestError(f"token ids must be in [0, {vocab})", "tokens")
    text = services.lm.tokenizer.decode(body.tokens, skip_special_tokens=False)
    return DetokenizeResponse(prompt=text)
