"""Fixtures for the HTTP tier (defined in tests/live_server.py, shared with tests/reliability)."""

from live_server import (  # noqa: F401  (fixtures pytest finds by name)
    agent_dir,
    client,
    long_context_model_dir,
    scratch_agent_dir,
    server,
    start_server,
    tiny_lm,
    tiny_model_dir,
)
