"""/v1/models wire types: the base model and one entry per agent (vLLM's LoRA convention)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mara_serve.server.protocol.common import optional_field

OWNED_BY = "mara-serve"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNED_BY
    root: str | None = Field(None, description="the base model for agents, else itself")
    parent: str | None = Field(None, description="agents: the base model's id")
    max_model_len: int | None = None
    description: str | None = optional_field(description="agents: the card's description")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
