"""Startup and shutdown: load the model and agents in the background, drain on the way out.

Startup runs as a task, so uvicorn serves /health (200) and /ready (503) while the model loads;
the blocking work (weights, agents) runs in worker threads, never on the event loop. Success →
phase ready; any failure → phase failed (/health 503) and `state.on_fatal` (the CLI stops the server
and exits non-zero: an operator who asked for an agent gets no server without it).

`drain` stops admission (new requests 503, /ready 503), waits up to the grace period for the
in-flight requests, then aborts the rest (they end with an in-band error). `mara serve` calls it
on SIGTERM before uvicorn stops listening; the lifespan's exit calls it too (a no-op if done).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI

from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.default_model import DEFAULT_MODEL_NAME, default_agents
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.loading import ModelConfig, load_model
from mara_serve.engine.registry import AgentRegistry
from mara_serve.server.cpu_quota import quota_threads
from mara_serve.server.services import Services
from mara_serve.server.serving.agents import AgentAdmin
from mara_serve.server.serving.chat import ChatServing
from mara_serve.server.serving.completion import CompletionServing
from mara_serve.server.serving.context import ServingContext
from mara_serve.server.serving.logprobs import LogprobRenderer
from mara_serve.server.serving.models import ServedModels
from mara_serve.server.serving.responses import ResponsesServing
from mara_serve.server.serving.structured import StructuredOutputs
from mara_serve.server.serving.trace import TraceRenderer
from mara_serve.server.settings import Settings
from mara_serve.server.state import Phase, ServerState

log = logging.getLogger(__name__)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's configuration from the server's settings."""
    return EngineConfig(
        max_running=settings.max_concurrent,
        max_waiting=settings.max_waiting,
        chunk_size=settings.candidate_chunk_size,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefix_cache_tokens=settings.prefix_cache_tokens,
        batch_prefill=settings.batch_prefill,
        split_matmuls=settings.cpu_split_matmuls,
        native_decode=settings.cpu_native_decode,
        captured_steps=False if settings.enforce_eager else None,
        kv_cache_memory=settings.kv_cache_memory,
        gpu_memory_utilization=settings.gpu_memory_utilization,
    )


def build_engine(settings: Settings) -> AsyncEngine:
    """Start the engine thread and load the base model on it (blocking; seconds to minutes):
    the engine thread is the process's only torch thread (async_engine.py says why)."""
    return AsyncEngine.launch(lambda: build_llm_engine(settings))


def build_llm_engine(settings: Settings) -> LLMEngine:
    """Load the base model and build the engine the server runs, on the calling thread."""
    threads = settings.torch_threads or quota_threads()
    if threads:
        # Here, on the engine thread (AsyncEngine.launch), before anything runs on it: torch's
        # OpenMP team belongs to the thread that first runs a parallel op.
        torch.set_num_threads(threads)
        if not settings.torch_threads:
            log.info("torch threads: %d (the cgroup CPU quota; --torch-threads overrides)",
                     threads)  # fmt: skip
    lm = load_model(
        ModelConfig(
            model=settings.model,
            revision=settings.revision,
            device=settings.device,
            dtype=settings.dtype,
            quantization=settings.quantization,
            cache_dir=settings.cache_dir,
            max_model_len=settings.max_model_len,
        )
    )
    return LLMEngine(lm, engine_config(settings))


def startup_agents(settings: Settings, model_name: str) -> dict[str, Path | str]:
    """The shipped default agents (embedded default model only), then --agent (which wins)."""
    agents: dict[str, Path | str] = {}
    if settings.default_agents and settings.model is None and model_name == DEFAULT_MODEL_NAME:
        agents.update(default_agents())
    agents.update(settings.agents)
    return agents


def wire(state: ServerState, engine: AsyncEngine) -> Services:
    """Registry, startup agents and serving objects around a running engine (blocking)."""
    settings, lm = state.settings, engine.engine.lm
    base_id = settings.served_model_name or lm.name
    registry = AgentRegistry(lm.hidden_size, lm.device)
    admin = AgentAdmin(registry, settings.agent_dir, base_id, state.metrics, engine.run)
    for name, path in startup_agents(settings, lm.name).items():
        admin.check_name(name)
        admin.load_sync(name, path)
    state.metrics.bind_engine(
        lambda: engine.engine.num_running,
        lambda: engine.engine.num_waiting,
        engine.engine.stats,
    )
    models = ServedModels(base_id, engine.engine.max_model_len, registry, state.started_at)
    traces = TraceRenderer(lm.tokenizer)
    ctx = ServingContext(
        engine=engine,
        tokenizer=lm.tokenizer,
        models=models,
        settings=settings,
        metrics=state.metrics,
        inflight=state.inflight,
        max_model_len=engine.engine.max_model_len,
        vocab_size=lm.vocab_size,
        traces=traces,
        logprobs=LogprobRenderer(lm.tokenizer, traces.token_text),
        structured=StructuredOutputs(lm.tokenizer, lm.vocab_size, lm.eos_token_ids),
    )
    chat = ChatServing(ctx)
    return Services(
        engine=engine, lm=lm, registry=registry, models=models, agents=admin,
        chat=chat, completions=CompletionServing(ctx), responses=ResponsesServing(chat),
    )  # fmt: skip


async def startup(state: ServerState, engine: AsyncEngine | None) -> None:
    try:
        if engine is None:
            log.info("loading model %s", state.settings.model or "(embedded default)")
            engine = await asyncio.to_thread(build_engine, state.settings)
        state.engine = engine
        engine.start()
        services = await asyncio.to_thread(wire, state, engine)
    except Exception as e:
        state.phase, state.error = Phase.FAILED, f"{type(e).__name__}: {e}"
        log.error("startup failed: %s", state.error)
        if state.on_fatal is not None:
            state.on_fatal()
        return
    state.services = services
    if state.phase == Phase.LOADING:
        state.phase = Phase.READY
        log.info("ready: serving %s", ", ".join(services.models.ids()))


async def drain(state: ServerState, timeout: float) -> None:
    """Stop admission, let in-flight requests finish for up to `timeout` s, abort the rest."""
    if state.phase in (Phase.DRAINING, Phase.STOPPED):
        return
    if state.phase != Phase.FAILED:
        state.phase = Phase.DRAINING
    if state.engine is not None:
        state.engine.stop_accepting()
    log.info("draining: %d request(s) in flight, up to %.0f s", state.inflight.count, timeout)
    if not await state.inflight.wait_idle(timeout):
        log.warning("grace period over: aborting %d request(s)", state.inflight.count)
    if state.engine is not None:
        await asyncio.to_thread(state.engine.shutdown, 0.0)  # aborts what is left
        await state.inflight.wait_idle(5.0)  # their streams send the in-band error and end


def lifespan_for(state: ServerState, engine: AsyncEngine | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(startup(state, engine))
        try:
            yield
        finally:
            if not task.done():
                task.cancel()  # a load still running in its thread is abandoned
            await drain(state, state.settings.graceful_shutdown_s)
            state.phase = Phase.STOPPED
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown, 0.0)
            log.info("stopped")

    return lifespan
