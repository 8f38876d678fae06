"""The agent registry API under /admin (admin key required; disabled without one).

PUT loads or replaces an agent from a path relative to the agent directory, DELETE unloads it.
Requests already running keep the agent they started with.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse

from mara_serve.server.auth import require_admin_key
from mara_serve.server.protocol.admin import AgentInfo, AgentList, AgentLoadRequest, AgentUnloaded
from mara_serve.server.protocol.errors import error_responses
from mara_serve.server.routes.deps import Ready

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin_key)],
    responses=error_responses(401, 403, 503),
)


@router.get("/agents", response_model=AgentList)
async def list_agents(services: Ready) -> AgentList:
    """Lists the loaded agents with their versions and sources."""
    return services.agents.list()


@router.put(
    "/agents/{name}",
    response_model=AgentInfo,
    status_code=200,
    responses={
        201: {"model": AgentInfo, "description": "loaded under a new name"},
        **error_responses(400, 404, 409, 413),
    },
)
async def put_agent(name: str, body: AgentLoadRequest, services: Ready) -> JSONResponse:
    """Loads an agent from the agent directory under `name`, replacing any agent of that name
    atomically (201 when the name is new, 200 when replaced)."""
    info = await services.agents.load(name, body.path)
    return JSONResponse(info.model_dump(mode="json"), status_code=200 if info.replaced else 201)


@router.delete("/agents/{name}", response_model=AgentUnloaded, responses=error_responses(404))
async def delete_agent(name: str, services: Ready) -> AgentUnloaded:
    """Unloads an agent; requests using it finish with it."""
    return services.agents.unload(name)
