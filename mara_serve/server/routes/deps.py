"""Dependencies the routers share: the lifecycle state, and the services once ready."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from mara_serve.server.services import Services
from mara_serve.server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.mara


def get_ready_services(request: Request) -> Services:
    """The loaded services, once the model is loaded, the engine works and the server is not
    draining (else the 503 that says why)."""
    state: ServerState = request.app.state.mara
    return state.ready_services()


State = Annotated[ServerState, Depends(get_state)]
Ready = Annotated[Services, Depends(get_ready_services)]
