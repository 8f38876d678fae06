"""POST /tokenize and /detokenize, in vLLM's shapes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from mara_serve.server.protocol.chat import ChatCompletionMessageParam
from mara_serve.server.protocol.common import RequestModel


class TokenizeRequest(RequestModel):
    """Either `prompt` (raw text) or `messages` (rendered with the chat template)."""

    model: str | None = Field(None, description="the base model's or an agent's id (optional)")
    prompt: str | None = None
    messages: list[ChatCompletionMessageParam] | None = None
    add_special_tokens: bool | None = Field(
        None, description="default: true for a prompt, false for messages (the template adds them)"
    )
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str
