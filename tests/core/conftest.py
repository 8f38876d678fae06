"""Fixtures for engine tests: a tiny random Llama and agents (see tests/tiny_models.py)."""

from __future__ import annotations

import pytest
from tiny_models import make_agent, tiny_llama

from mara_serve.engine.agent import Agent
from mara_serve.engine.loading import LoadedModel


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="session")
def agents(tiny_lm: LoadedModel) -> dict[str, Agent]:
    return {m: make_agent(m, lm=tiny_lm) for m in ("accept", "reject", "half")}
