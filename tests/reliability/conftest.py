"""Fixtures for the reliability tier: the HTTP tier's tiny model, agents and live servers.

The fixtures are the HTTP tier's (tests/live_server.py), so both tiers test the same model and
agents. Everything runs on the tiny random model: these tests prove behaviour
under hostile input, faults and concurrency, not model quality. Helpers the test modules share
live in `reliability/support.py` (tests cannot import a conftest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import live_server as _http
import pytest
from live_server import (  # noqa: F401  (fixtures pytest finds by name)
    ADMIN_KEY,
    API_KEY,
    agent_dir,
    start_server,
    tiny_lm,
    tiny_model_dir,
)

from mara_serve.server.settings import Settings


@pytest.fixture(scope="module")
def serve(tiny_lm: Any) -> Iterator[Callable[..., Any]]:  # noqa: F811
    """`serve(**settings)`: a live server on the tiny model for this module (stopped after it)."""
    started: list[Any] = []

    def start(**settings: Any) -> Any:
        live = _http._start(tiny_lm, Settings(**settings))
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture(scope="module")
def module_server(serve: Callable[..., Any], agent_dir: Path) -> Any:  # noqa: F811
    """A server of this module's own (tests may load, unload and break its agents): API and
    admin keys, agent 'half' loaded at start, the agent dir, a 10 s request timeout and 48
    chat tokens by default (fuzzed requests stay short)."""
    return serve(
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        agent_dir=agent_dir,
        agents={"half": agent_dir / "half"},
        max_concurrent=8,
        max_waiting=32,
        max_request_body_bytes=64 * 1024,
        max_n=4,
        request_timeout_s=10,
        max_tokens_default=48,
    )
