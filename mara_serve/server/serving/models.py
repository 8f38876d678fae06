"""The model names the API serves: the base model (plain decoding) and every loaded agent.

Following vLLM's LoRA convention, a request's `model` picks the agent: the base model's id means
no alignment, an agent's name means MARA decoding with it. Resolution happens once per request,
and the request keeps (pins) the `Agent` object it got, so a later swap never touches it.
"""

from __future__ import annotations

from mara_serve.engine.registry import AgentEntry, AgentRegistry
from mara_serve.server.errors import ModelNotFoundError
from mara_serve.server.protocol.models import ModelCard, ModelList


class ServedModels:
    def __init__(self, base_id: str, max_model_len: int, registry: AgentRegistry, created: int):
        self.base_id = base_id
        self.max_model_len = max_model_len
        self.registry = registry
        self.created = created

    def resolve(self, name: str) -> AgentEntry | None:
        """None for the base model, the agent's registry entry otherwise; 404 if unknown."""
        if name == self.base_id:
            return None
        entry = self.registry.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"The model `{name}` does not exist. Served models: {', '.join(self.ids())}",
                param="model",
            )
        return entry

    def ids(self) -> list[str]:
        return [self.base_id] + [e.name for e in self.registry.list()]

    def _base_card(self) -> ModelCard:
        return ModelCard(
            id=self.base_id,
            created=self.created,
            root=self.base_id,
            max_model_len=self.max_model_len,
        )

    def _agent_card(self, entry: AgentEntry) -> ModelCard:
        return ModelCard(
            id=entry.name,
            created=int(entry.loaded_at),
            root=self.base_id,
            parent=self.base_id,
            max_model_len=self.max_model_len,
            description=entry.agent.card.description or None,
        )

    def list(self) -> ModelList:
        return ModelList(
            data=[self._base_card()] + [self._agent_card(e) for e in self.registry.list()]
        )

    def card(self, name: str) -> ModelCard:
        entry = self.resolve(name)
        return self._base_card() if entry is None else self._agent_card(entry)
