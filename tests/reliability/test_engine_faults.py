"""Engine faults that must surface, through a live server (each failed before the fix):

1. a device error on every forward marks the engine dead within one step: /health and /ready
   503, new requests 503 `engine_dead`, running and waiting requests end with an error;
2. after a step fails once (the model still runs), a waiting request is decoded normally
   and only the running ones fail — never "ended with an error and then decoded anyway";
3. a seeded sampled request's output does not depend on whether a neighbour in its batch
   faulted (the per-row retry replays the same random draws);
4. a 500 carries no exception text, only the request id to quote;
5. the per-step prefill budget counts the tokens actually prefilled, so prompts that share a
   cached prefix are admitted together.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import torch
from reliability.support import BASE, OpenStream, slow_engine, stream_text, wait_for

from mara_serve.engine.agent import Agent, AgentCard, AgentNetwork
from mara_serve.engine.loading import render_chat

DEVICE_ERROR = "CUDA error: an illegal memory access was encountered (simulated)"


def chat(model: str, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


class ExplodingAgent(Agent):
    """An agent whose network fails on every call: a fault of the requests that use it."""

    def accept_probs(self, states: torch.Tensor, **_: Any) -> torch.Tensor:
        raise RuntimeError("agent exploded: secret internals")


def test_a_device_error_on_every_step_kills_the_engine_within_one_step(start_server) -> None:
    live = start_server(max_concurrent=1, max_waiting=4)
    engine = live.state.engine.engine
    calls = []

    def device_error(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError(DEVICE_ERROR)

    with slow_engine(live) as gate:
        running = OpenStream(live, chat(BASE, "Tell me a long story.", 400))
        assert running.started.wait(10)
        waiting = OpenStream(live, chat(BASE, "Another story.", 400))
        wait_for(lambda: engine.num_waiting == 1, 5)
        gate.clear()  # hold the engine between two steps, then break the device
        engine.runner.score = device_error  # the decode forward (native or eager)
        engine.runner.forward_tokens = device_error
        engine.runner.prefill_batch = device_error
        gate.set()
        running.join(10)
        waiting.join(10)
    # One step: the batch, the row retried alone, and the self-check — then it is dead.
    assert len(calls) == 3
    for stream in (running, waiting):
        assert stream.lines[-1] == "data: [DONE]"
        (error,) = stream.errors()
        assert error["code"] == "engine_dead" and "restart" in error["message"]
        assert "CUDA" not in error["message"]
    # The waiting request was ended, not decoded later.
    assert engine.num_running == 0 and engine.num_waiting == 0
    for path in ("/health", "/ready"):
        r = httpx.get(live.base_url + path)
        assert r.status_code == 503 and "restart" in r.json()["error"], path
        assert "CUDA" not in r.text
    r = live.post("/v1/chat/completions", chat(BASE, "hello", 4))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert "restart" in r.json()["error"]["message"] and "CUDA" not in r.text
    assert len(calls) == 3  # refused at admission: the dead engine is not stepped again


def test_after_a_failed_step_waiting_requests_are_decoded_normally(start_server) -> None:
    live = start_server(max_concurrent=1, max_waiting=4)
    engine = live.state.engine.engine
    queued_body = chat(BASE, "Another story.", 12, temperature=0)
    alone, _ = stream_text(live, queued_body)
    real_step = engine.step
    with slow_engine(live) as gate:
        running = OpenStream(live, chat(BASE, "Tell me a long story.", 400))
        assert running.started.wait(10)
        queued = OpenStream(live, queued_body)
        wait_for(lambda: engine.num_waiting == 1, 5)
        gate.clear()

        def fail_once() -> Any:
            engine.step = real_step  # the next steps run normally
            raise RuntimeError("simulated step failure: secret internals")

        engine.step = fail_once
        gate.set()
        running.join(10)
        queued.join(10)
    (error,) = running.errors()
    assert error["code"] == "generation_failed" and "secret" not in error["message"]
    assert running.request_id in error["message"]
    assert not queued.errors() and queued.lines[-1] == "data: [DONE]"
    assert queued.text() == alone
    assert httpx.get(live.base_url + "/health").status_code == 200


def test_seeded_sampling_is_identical_whether_or_not_a_neighbour_faulted(start_server) -> None:
    live = start_server(max_concurrent=4)
    card = AgentCard(name="boom", hidden_size=64, inner_dim=64)
    live.state.services.registry.put("boom", ExplodingAgent(AgentNetwork(64, 64), card))
    engine = live.state.engine.engine
    seeded = chat(BASE, "Tell me a story.", 24, temperature=2.0, seed=1234)
    alone, _ = stream_text(live, seeded)
    retried = threading.Event()
    real_decode = engine._decode

    def decode(plan: Any) -> Any:
        out = real_decode(plan)
        if any(o.finish_reason == "error" for o in out):
            retried.set()  # the batch failed and its rows were retried one by one
        return out

    engine._decode = decode
    with slow_engine(live) as gate:
        gate.clear()  # both requests join the batch in the same step
        neighbour = OpenStream(live, chat("boom", "Boom.", 8))
        sampled = OpenStream(live, seeded)
        wait_for(lambda: engine.num_waiting == 2, 5)
        gate.set()
        neighbour.join(10)
        sampled.join(10)
    assert retried.is_set()
    assert neighbour.errors()[0]["code"] == "generation_failed"
    assert "secret" not in neighbour.lines[-2]
    assert not sampled.errors()
    assert sampled.text() == alone


def test_the_prefill_budget_counts_only_tokens_not_in_the_prefix_cache(start_server) -> None:
    live = start_server(max_concurrent=8, max_prefill_tokens=96, prefix_cache_tokens=4096)
    engine = live.state.engine.engine
    system = "You are a careful assistant who answers briefly and politely. " * 12
    prompt_len = len(render_chat(engine.lm.tokenizer, [
        {"role": "system", "content": system}, {"role": "user", "content": "Hi 0"}
    ]))  # fmt: skip
    assert prompt_len > 96  # a whole prompt is over the budget...

    def body(i: int) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Hi {i}"}]
        return {"model": BASE, "messages": messages, "max_tokens": 2, "temperature": 0}

    assert live.post("/v1/chat/completions", body(0)).status_code == 200  # caches the prefix
    admitted: list[int] = []
    real_pop = engine._pop_admissible

    def pop() -> Any:
        taken = real_pop()
        if taken:
            admitted.append(len(taken))
        return taken

    engine._pop_admissible = pop
    with slow_engine(live) as gate:
        gate.clear()
        streams = [OpenStream(live, body(i)) for i in range(1, 5)]
        wait_for(lambda: engine.num_waiting == 4, 5)
        gate.set()
        for s in streams:
            s.join(10)
    # ...but what is left to prefill of each is a few tokens: all four in one step.
    assert admitted[0] == 4, admitted
    assert all(not s.errors() for s in streams)
