"""GET /v1/models and /v1/models/{id}: the base model and every agent (API key required)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mara_serve.server.auth import require_api_key
from mara_serve.server.protocol.errors import error_responses
from mara_serve.server.protocol.models import ModelCard, ModelList
from mara_serve.server.routes.deps import Ready

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 503),
)


@router.get("/models", response_model=ModelList)
async def list_models(services: Ready) -> ModelList:
    """Lists the base model (plain decoding) and each agent (MARA decoding), agents with
    `parent` = the base model."""
    return services.models.list()


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=error_responses(404))
async def retrieve_model(model_id: str, services: Ready) -> ModelCard:
    """Describes one model or agent (404 `model_not_found` if unknown)."""
    return services.models.card(model_id)
