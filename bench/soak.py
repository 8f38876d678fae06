"""Soak test: 1,000 requests (streaming, non-streaming, aborted) against one server; memory and
engine state must not grow.

The server runs in this process (uvicorn on 127.0.0.1 in a thread, built by `create_app` and
loading its model as `mara serve` does), so the engine's own state can be read before and
after: running and waiting requests, KV-cache capacity, open output streams, pending aborts,
in-flight HTTP requests. RSS is this process's (server + a small asyncio client). The first
`--warmup` requests are not measured: allocators and caches settle there. After the last
request the engine must be idle, with the same state as after the warm-up, and
RSS growth = (RSS at the end - RSS after warm-up) / RSS after warm-up must stay under 5 %.

Mix, cycling per request: 4/10 streaming, 4/10 non-streaming (chat and /v1/completions), 1/10
streams the client drops after the first token, 1/10 non-streaming requests the client drops
after 0.2 s; half of them to the base model (agent off), half to an agent.

    python bench/soak.py                  # tiny random model (fast; the server is the subject)
    python bench/soak.py --default-model  # the embedded SmolLM2 (slower on CPU)

Prints a table of RSS samples and engine state, the verdict, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import environment, free_port, rss_bytes, tiny_agents, tiny_model  # noqa: E402

from mara_serve.server.app import create_app  # noqa: E402
from mara_serve.server.settings import Settings  # noqa: E402

MIB = 1024 * 1024


class InProcessServer:
    """uvicorn in a thread; `state` is the app's ServerState (engine, registry, in-flight)."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.mara

    def start(self, timeout: float = 600) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise SystemExit(f"server did not become ready ({self.state.error})")
            time.sleep(0.2)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    def engine_state(self) -> dict[str, int]:
        """The engine's size, as far as a leak could show (stats() plus the async side)."""
        engine = self.state.engine
        stats = engine.stats()
        return {
            "running": stats["running"],
            "waiting": stats["waiting"],
            "kv_cache_capacity": stats["kv_cache_capacity"],
            "open_streams": len(engine._streams),  # per-request output queues
            "pending_aborts": len(engine.engine._aborts),
            "in_flight": self.state.inflight.count,
            "agents": len(self.state.services.registry.list()),
        }


def kind_of(i: int) -> str:
    return ("stream", "stream", "stream", "stream", "plain", "plain", "plain", "plain",
            "drop_stream", "drop_plain")[i % 10]  # fmt: skip


async def one(client: httpx.AsyncClient, i: int, models: list[str], max_tokens: int) -> str:
    """Request i; returns its outcome: ok, dropped, or a failure description."""
    kind, model = kind_of(i), models[i % 2]
    messages = [{"role": "user", "content": f"Say something about the number {i}."}]
    chat = {"model": model, "messages": messages, "max_tokens": max_tokens}
    try:
        if kind in ("stream", "drop_stream"):
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**chat, "stream": True}) as r:  # fmt: skip
                if r.status_code != 200:
                    return f"status {r.status_code}"
                last = ""
                async for line in r.aiter_lines():
                    if (
                        kind == "drop_stream"
                        and '"content":"' in line
                        and '"content":""' not in line
                    ):
                        return "dropped"  # leaving the `async with` closes the connection
                    last = line or last
                return "ok" if last == "data: [DONE]" or kind == "drop_stream" else "no [DONE]"
        if kind == "drop_plain":
            try:
                await asyncio.wait_for(client.post("/v1/chat/completions", json=chat), 0.2)
            except TimeoutError:
                return "dropped"
            return "ok"
        if i % 20 < 10:
            r = await client.post("/v1/chat/completions", json=chat)
        else:
            r = await client.post("/v1/completions", json={"model": model, "prompt": "Once",
                                                           "max_tokens": max_tokens})  # fmt: skip
        return "ok" if r.status_code == 200 and r.json()["choices"] else f"status {r.status_code}"
    except httpx.HTTPError as e:
        return f"{type(e).__name__}"


async def run_batch(url: str, start: int, count: int, args: Any, models: list[str]) -> Counter:
    outcomes: Counter = Counter()
    todo = iter(range(start, start + count))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker() -> None:
            for i in todo:
                outcomes[await one(client, i, models, args.max_tokens)] += 1

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return outcomes


def settle(server: InProcessServer, timeout: float = 10) -> float:
    """Wait until the engine is idle, then collect garbage; returns RSS in MiB."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.engine_state()
        if s["running"] == s["waiting"] == s["open_streams"] == s["in_flight"] == 0:
            break
        time.sleep(0.05)
    gc.collect()
    return rss_bytes() / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests first")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument(
        "--default-model", action="store_true", help="serve the embedded SmolLM2 (default: tiny)"
    )
    parser.add_argument("--samples", type=int, default=10, help="RSS samples during the run")
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (8 if args.default_model else 24)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        agent_dir = Path(tmp) / "agents"
        if args.default_model:
            tiny_agents(agent_dir, hidden=576, names=("agent",))
            settings = Settings(default_agents=False, agents={"agent": agent_dir / "agent"})
        else:
            model = tiny_model(Path(tmp) / "tiny-llama")
            tiny_agents(agent_dir, names=("agent",))
            settings = Settings(model=str(model), agents={"agent": agent_dir / "agent"})
        server = InProcessServer(settings.model_copy(update={"max_concurrent": 16}))
        server.start()
        try:
            models = [server.state.services.models.base_id, "agent"]
            outcomes = asyncio.run(run_batch(server.url, 0, args.warmup, args, models))
            warm_rss, warm_state = settle(server), server.engine_state()
            samples = [(args.warmup, warm_rss)]
            step = max(1, args.requests // args.samples)
            done = 0
            while done < args.requests:
                n = min(step, args.requests - done)
                outcomes += asyncio.run(run_batch(server.url, args.warmup + done, n, args, models))
                done += n
                samples.append((args.warmup + done, settle(server)))
                print(f"  {args.warmup + done} requests, RSS {samples[-1][1]:.1f} MiB",
                      file=sys.stderr, flush=True)  # fmt: skip
            end_state = server.engine_state()
            end_rss = samples[-1][1]
        finally:
            server.stop()
    report(args, outcomes, samples, warm_rss, end_rss, warm_state, end_state, models, started)


def report(args, outcomes, samples, warm_rss, end_rss, warm_state, end_state, models, started):
    growth = (end_rss - warm_rss) / warm_rss * 100
    failures = {k: v for k, v in outcomes.items() if k not in ("ok", "dropped")}
    idle = all(end_state[k] == 0 for k in ("running", "waiting", "open_streams", "in_flight"))
    same = end_state == warm_state
    model = f"{models[0]} ({'embedded default' if args.default_model else 'tiny random'})"
    print(
        f"\nsoak: {args.warmup} warm-up + {args.requests} measured requests on {model}, "
        f"concurrency {args.concurrency}, max_tokens {args.max_tokens}"
    )
    print(f"{'after requests':>15} {'RSS MiB':>9} {'vs warm-up':>11}")
    for n, rss in samples:
        print(f"{n:>15} {rss:>9.1f} {(rss - warm_rss) / warm_rss * 100:>+10.2f}%")
    print(f"\n{'engine state':<18} {'after warm-up':>14} {'at the end':>11}")
    for key in warm_state:
        print(f"{key:<18} {warm_state[key]:>14} {end_state[key]:>11}")
    print(f"\noutcomes: {dict(outcomes)}")
    verdict = growth < 5.0 and not failures and idle and same
    print(
        f"RSS growth after warm-up: {growth:+.2f}% (limit 5%); engine idle and unchanged: "
        f"{idle and same}; failed requests: {sum(failures.values())}"
    )
    print("PASS" if verdict else "FAIL")
    print(json.dumps({
        "bench": "soak", "model": model, "requests": args.requests, "warmup": args.warmup,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "requests_tried": args.warmup + args.requests, "outcomes": dict(outcomes),
        "failed": sum(failures.values()), "rss_warm_mib": round(warm_rss, 1),
        "rss_end_mib": round(end_rss, 1), "rss_growth_pct": round(growth, 2),
        "rss_samples_mib": [[n, round(r, 1)] for n, r in samples],
        "engine_after_warmup": warm_state, "engine_at_end": end_state, "pass": verdict,
        **environment(), "wall_s": round(time.monotonic() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
