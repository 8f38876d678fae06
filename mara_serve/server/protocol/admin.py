"""/admin/agents wire types (the agent registry API)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AgentLoadRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="the agent (directory, .safetensors or .pth) relative to the agent dir",
    )


class AgentInfo(BaseModel):
    name: str
    version: int = Field(description="1 on first load, +1 on every replacement")
    loaded_at: float = Field(description="unix time")
    source: str = Field(description="the file or directory it was loaded from")
    hidden_size: int
    inner_dim: int
    base_model: str | None = None
    description: str = ""
    replaced: bool | None = Field(None, exclude_if=lambda v: v is None)


class AgentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AgentInfo]


class AgentUnloaded(BaseModel):
    name: str
    version: int
    unloaded: Literal[True] = True
