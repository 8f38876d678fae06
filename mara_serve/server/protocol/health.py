"""/health and /ready bodies (the same object; the status code carries the verdict)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ServerStatus(BaseModel):
    status: Literal["ok", "unhealthy", "ready", "not_ready"]
    phase: Literal["loading", "ready", "draining", "stopped", "failed"]
    engine_alive: bool
    error: str | None = Field(description="why startup failed or the engine died, if it did")
    in_flight: int = Field(description="generation requests admitted and not yet answered")
