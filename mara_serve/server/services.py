"""`Services`: everything the routes use once the model is loaded, built in one piece.

`lifecycle.wire` builds it at startup (the engine, the loaded model, the agent registry and the
serving objects around them) and stores it in `ServerState.services`; the routes receive it
through the `Ready` dependency (routes/deps.py), which answers 503 until it exists. No field is
optional, so no route checks for a missing piece.
"""

from __future__ import annotations

from dataclasses import dataclass

from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.loading import LoadedModel
from mara_serve.engine.registry import AgentRegistry
from mara_serve.server.serving.agents import AgentAdmin
from mara_serve.server.serving.chat import ChatServing
from mara_serve.server.serving.completion import CompletionServing
from mara_serve.server.serving.models import ServedModels
from mara_serve.server.serving.responses import ResponsesServing


@dataclass(frozen=True)
class Services:
    engine: AsyncEngine
    lm: LoadedModel
    registry: AgentRegistry
    models: ServedModels
    agents: AgentAdmin
    chat: ChatServing
    completions: CompletionServing
    responses: ResponsesServing
