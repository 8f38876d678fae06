"""Dependency aliases the routers share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.mara


def get_ready_state(request: Request) -> ServerState:
    """The state, once the model is loaded and the server is not draining (else 503)."""
    state: ServerState = request.app.state.mara
    state.require_ready()
    return state


State = Annotated[ServerState, Depends(get_state)]
ReadyState = Annotated[ServerState, Depends(get_ready_state)]
