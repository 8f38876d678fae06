"""GET /v1/models and /v1/models/{id}: the base model and every agent (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import require_api_key
from server.protocol.errors import error_responses
from server.protocol.models import ModelCard, ModelList
from server.routes.deps import ReadyState

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 503),
)


@router.get("/models", response_model=ModelList)
async def list_models(state: ReadyState) -> ModelList:
    """Lists the base model (plain decoding) and each agent (MARA decoding), agents with
    `parent` = the base model."""
    assert state.models is not None
    return state.models.list()


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404))
async def retrieve_model(model_id: str, state: ReadyState) -> ModelCard:
    """Describes one model or agent (404 `model_not_found` if unknown)."""
    assert state.models is not None
    return state.models.card(model_id)
