"""The agent registry's management: startup agents and the admin API's load/replace/unload.

The admin API loads only from inside the agent directory. A requested path must be relative,
contain no `..`, and resolve — symlinks followed — inside the directory; so must the files an
agent directory or a `.safetensors` file brings along (weights, card). The loading itself is
the engine's (`torch.load(weights_only=True)`, never unpickling code; hidden size checked at
load time) and runs in a worker thread. Loads are serialised; the registry swap is atomic and
requests keep the agent they pinned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from starlette.concurrency import run_in_threadpool

from mara_serve.engine.agent import CARD_FILE, WEIGHTS_FILE
from mara_serve.engine.registry import AgentEntry, AgentRegistry
from mara_serve.server.errors import APIError, ConflictError, NotFoundError
from mara_serve.server.metrics import ServerMetrics
from mara_serve.server.protocol.admin import AgentInfo, AgentList, AgentUnloaded
from mara_serve.server.settings import AGENT_NAME_RE

log = logging.getLogger(__name__)


def agent_info(entry: AgentEntry, replaced: bool | None = None) -> AgentInfo:
    card = entry.agent.card
    return AgentInfo(
        name=entry.name,
        version=entry.version,
        loaded_at=entry.loaded_at,
        source=entry.source,
        hidden_size=card.hidden_size,
        inner_dim=card.inner_dim,
        base_model=card.base_model,
        description=card.description,
        replaced=replaced,
    )


def _path_error(message: str) -> APIError:
    return APIError(message, param="path", code="invalid_agent_path")


def resolve_agent_path(agent_dir: Path, requested: str) -> Path:
    """`requested` (relative to `agent_dir`) → a real path inside it, or a 400/404."""
    if "\x00" in requested or "\\" in requested:
        raise _path_error("path contains a forbidden character")
    rel = PurePosixPath(requested)
    if rel.is_absolute():
        raise _path_error("path must be relative to the agent directory")
    if ".." in rel.parts:
        raise _path_error("path must not contain '..'")
    try:
        return _resolve_inside(agent_dir.resolve(), rel, requested)
    except (OSError, RuntimeError) as e:
        # The OS refuses the path itself (a component over NAME_MAX, a symlink loop, ...):
        # the client's input, so a 400, never a 500. strerror names no server paths.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "symlink loop"
        raise _path_error(f"path cannot be resolved: {reason}") from None


def _resolve_inside(base: Path, rel: PurePosixPath, requested: str) -> Path:
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise _path_error("path resolves outside the agent directory (symlink)")
    if not target.exists():
        raise NotFoundError(
            f"no agent at {requested!r} in the agent directory",
            param="path",
            code="agent_path_not_found",
        )
    companions = (
        [target / WEIGHTS_FILE, target / CARD_FILE]
        if target.is_dir()
        else [target.with_suffix(".json")]
    )
    for f in companions:
        if f.exists() and not f.resolve().is_relative_to(base):
            raise _path_error(f"{f.name} resolves outside the agent directory (symlink)")
    return target


class AgentAdmin:
    def __init__(
        self,
        registry: AgentRegistry,
        agent_dir: Path | None,
        base_id: str,
        metrics: ServerMetrics,
        run_torch: Callable[[Callable[[], AgentEntry]], AgentEntry] = lambda fn: fn(),
    ):
        """`run_torch` runs a load where the process runs torch: the server passes
        `AsyncEngine.run` (the engine thread; async_engine.py says why)."""
        self.registry = registry
        self.run_torch = run_torch
        self.agent_dir = agent_dir
        self.base_id = base_id
        self.metrics = metrics
        self._lock = asyncio.Lock()

    def check_name(self, name: str) -> None:
        if not AGENT_NAME_RE.match(name):
            raise APIError(
                f"invalid agent name {name!r} (letters, digits, '.', '_', '-'; "
                "max 128, starting with a letter or digit)",
                param="name",
            )
        if name == self.base_id:
            raise ConflictError(
                f"{name!r} is the base model's id; pick another agent name", param="name"
            )

    def load_sync(self, name: str, path: Path | str) -> AgentEntry:
        """Startup loading (any path the operator gave): raises AgentLoadError."""
        entry = self.run_torch(lambda: self.registry.load(name, path))
        self.metrics.agent_loaded(name)
        log.info("agent %s v%d loaded from %s", name, entry.version, path)
        return entry

    async def load(self, name: str, requested: str) -> AgentInfo:
        self.check_name(name)
        if self.agent_dir is None:
            raise APIError(
                "no agent directory is configured: start the server with "
                "--agent-dir (MARA_AGENT_DIR)",
                code="agent_dir_not_configured",
                status_code=403,
            )
        path = resolve_agent_path(self.agent_dir, requested)
        async with self._lock:
            replaced = name in self.registry
            entry = await run_in_threadpool(self.load_sync, name, path)
        return agent_info(entry, replaced=replaced)

    def unload(self, name: str) -> AgentUnloaded:
        entry = self.registry.unload(name)
        if entry is None:
            raise NotFoundError(
                f"no agent named {name!r} is loaded", param="name", code="agent_not_found"
            )
        self.metrics.agent_unloaded(name)
        log.info("agent %s v%d unloaded", name, entry.version)
        return AgentUnloaded(name=name, version=entry.version)

    def list(self) -> AgentList:
        return AgentList(data=[agent_info(e) for e in self.registry.list()])
