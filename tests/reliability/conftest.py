"""Fixtures for the reliability tier: the HTTP tier's tiny model, agents and live servers.

The fixtures are those of tests/server/conftest.py, loaded from that file (a conftest is not
importable by module name, and `server` is the application package), so both tiers test the
same model and agents. Everything runs on the tiny random model: these tests prove behaviour
under hostile input, faults and concurrency, not model quality. Helpers the test modules share
live in `reliability/support.py` (tests cannot import a conftest).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings


def _load_http_fixtures() -> Any:
    path = Path(__file__).resolve().parents[1] / "server" / "conftest.py"
    spec = importlib.util.spec_from_file_location("mara_http_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_http = _load_http_fixtures()
tiny_model_dir = _http.tiny_model_dir
tiny_lm = _http.tiny_lm
agent_dir = _http.agent_dir
start_server = _http.start_server
API_KEY, ADMIN_KEY = _http.API_KEY, _http.ADMIN_KEY


@pytest.fixture(scope="module")
def serve(tiny_lm: Any) -> Iterator[Callable[..., Any]]:
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
def module_server(serve: Callable[..., Any], agent_dir: Path) -> Any:
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
