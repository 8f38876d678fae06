"""Load test: 64 concurrent clients for a bounded time against a live `mara serve`.

The clients mix streaming requests to the base model (the agent-off baseline, measured in the
same run) and to agents, non-streaming requests, bad requests, and clients that leave
mid-stream, while a 65th task swaps and unloads the agent `swap` 20 times. The queue is kept
small (`--max-waiting`) so the server must shed load: over-limit requests must get 429/503 with
`Retry-After` (clients then wait that long), never a timeout or a 5xx.

A good request counts as failed if it errors, times out, gets any status but 200/429/503,
gets 429/503 without Retry-After, or its stream has no [DONE] or carries an in-band error.
Requests to `swap` that arrive while it is unloaded get 404 model_not_found: counted apart
("absent"), as the API promises. After the run the engine must drain to idle (no slot or queue
place leaked by disconnects), and the server's log must hold no traceback.

Prints a table, the verdict, then one JSON line.

    python bench/load.py                    # tiny random model, 60 s
    python bench/load.py --default-model --duration 60 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ServeProcess, environment, percentile, tiny_agents, tiny_model  # noqa: E402

API_KEY, ADMIN_KEY = "load-api-key", "load-admin-key"
BODY_LIMIT = 64 * 1024
# (kind, weight): what each client picks for its next request
MIX = [("base", 28), ("agent", 22), ("swap", 10), ("plain", 12), ("bad", 14), ("leave", 14)]
SWAPS = ["PUT b", "PUT a", "DELETE", "PUT a"] * 5  # replace, replace, unload, load: 20 ops


@dataclass
class Outcome:
    kind: str
    status: int | None = None
    result: str = "ok"  # ok | shed | absent | failed | left
    reason: str = ""
    latency: float | None = None
    ttft: float | None = None
    retry_after: float = 0.0


@dataclass
class Stats:
    outcomes: list[Outcome] = field(default_factory=list)
    swaps: list[tuple[str, int | str]] = field(default_factory=list)


def chat(model: str, rng: random.Random, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about topic {rng.randrange(1000)}."}],
        "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens),
        "stream": stream,
    }


def bad_request(rng: random.Random, base: str) -> tuple[str, str, dict[str, Any], int]:
    """(method, path, httpx kwargs, the status it must get)."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ok = chat(base, rng, 8, False)
    chat_path, a = "/v1/chat/completions", {"headers": auth}
    cases = [
        ("POST", chat_path, {"json": ok, "headers": {"Authorization": "Bearer x"}}, 401),
        ("POST", chat_path, {"content": b'{"model": ', **a}, 400),
        ("POST", chat_path, {"json": {**ok, "n": "2"}, **a}, 400),
        ("POST", chat_path, {"json": {**ok, "max_tokens": 10**9}, **a}, 400),
        ("POST", chat_path, {"json": {**ok, "model": "gpt-9"}, **a}, 404),
        ("POST", chat_path, {"json": {**ok, "logit_bias": {"1": 5}}, **a}, 400),
        ("POST", "/v1/completions", {"json": {"model": base, "prompt": [-1]}, **a}, 400),
        ("POST", chat_path, {"content": b"x" * (BODY_LIMIT + 1), **a}, 413),
        ("GET", chat_path, a, 405),
    ]
    return rng.choice(cases)


def retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def judge_status(out: Outcome, r: httpx.Response) -> bool:
    """Settle 429/503/404/other statuses; True when the body must still be read (200)."""
    out.status = r.status_code
    if r.status_code == 200:
        return True
    if r.status_code in (429, 503):
        wait = retry_after(r)
        out.result, out.retry_after = ("shed", wait) if wait is not None else ("failed", 0.0)
        out.reason = "" if wait is not None else f"{r.status_code} without Retry-After"
    elif r.status_code == 404 and out.kind == "swap":
        out.result = "absent"  # the agent is unloaded at this moment
    else:
        out.result, out.reason = "failed", f"status {r.status_code}"
    return False


async def streamed(client: httpx.AsyncClient, body: dict, out: Outcome, leave: bool) -> None:
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if not judge_status(out, r):
            await r.aread()
            return
        last = ""
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            last = line
            if out.ttft is None and '"content":"' in line and '"content":""' not in line:
                out.ttft = time.perf_counter() - t0
                if leave:
                    out.result = "left"  # close mid-stream: the server must free the slot
                    return
            if line.startswith('data: {"error"'):
                out.result, out.reason = "failed", "in-band " + line[6:120]
        if leave:
            out.result = "left"  # the stream ended before the first token (e.g. EOS)
        elif last != "data: [DONE]":
            out.result, out.reason = "failed", "stream without [DONE]"
    out.latency = time.perf_counter() - t0


async def plain(client: httpx.AsyncClient, rng: random.Random, model: str, n: int, out: Outcome):
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if rng.random() < 0.5:
        path, body = "/v1/chat/completions", chat(model, rng, n, False)
    else:
        path, body = "/v1/completions", {"model": model, "prompt": "Once upon a time",
                                         "max_tokens": rng.randint(1, n)}  # fmt: skip
    r = await client.post(path, json=body, headers=headers)
    if judge_status(out, r) and not r.json().get("choices"):
        out.result, out.reason = "failed", "no choices"
    out.latency = time.perf_counter() - t0


async def one(client: httpx.AsyncClient, rng: random.Random, kind: str, args: Any) -> Outcome:
    out = Outcome(kind)
    try:
        if kind == "bad":
            method, path, kwargs, want = bad_request(rng, args.base)
            r = await client.request(method, path, **kwargs)
            out.status = r.status_code
            out.result = "ok" if r.status_code == want else "failed"
            out.reason = "" if out.result == "ok" else f"status {r.status_code}, wanted {want}"
        elif kind == "plain":
            await plain(client, rng, rng.choice([args.base, "stable"]), args.max_tokens, out)
        else:
            model = {"base": args.base, "agent": "stable", "swap": "swap", "leave": args.base}
            body = chat(model[kind], rng, args.max_tokens, True)
            await streamed(client, body, out, leave=kind == "leave")
    except (httpx.HTTPError, ValueError) as e:  # timeouts, resets, undecodable bodies
        out.result, out.reason = "failed", f"{type(e).__name__}: {e}"[:160]
    return out


async def client_loop(i: int, url: str, deadline: float, args: Any, stats: Stats) -> None:
    rng = random.Random(args.seed * 1000 + i)
    kinds, weights = zip(*MIX, strict=True)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while time.monotonic() < deadline:
            out = await one(client, rng, rng.choices(kinds, weights)[0], args)
            stats.outcomes.append(out)
            if out.result == "shed":
                await asyncio.sleep(min(out.retry_after, 2.0))  # as a well-behaved client does


async def swapper(url: str, duration: float, stats: Stats) -> None:
    """The 20 agent operations, evenly spread over the run."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for op in SWAPS:
            await asyncio.sleep(duration / (len(SWAPS) + 1))
            try:
                if op == "DELETE":
                    r = await client.delete("/admin/agents/swap", headers=headers)
                else:
                    path = op.split()[1]
                    r = await client.put("/admin/agents/swap", json={"path": path}, headers=headers)
                stats.swaps.append((op, r.status_code))
            except httpx.HTTPError as e:
                stats.swaps.append((op, type(e).__name__))


async def run(url: str, args: Any) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + args.duration
    tasks = [client_loop(i, url, deadline, args, stats) for i in range(args.clients)]
    await asyncio.gather(swapper(url, args.duration, stats), *tasks)
    return stats


def ms(seconds: float) -> float | None:
    """Milliseconds, rounded; None (JSON null) where there was nothing to measure."""
    return None if math.isnan(seconds) else round(seconds * 1e3, 1)


def summarize(stats: Stats) -> tuple[list[dict], dict]:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in stats.outcomes:
        by_kind[o.kind].append(o)
    rows = []
    for kind in [k for k, _ in MIX] + ["total"]:
        outs = stats.outcomes if kind == "total" else by_kind.get(kind, [])
        results = Counter(o.result for o in outs)
        done = [o.latency for o in outs if o.result == "ok" and o.latency is not None]
        ttfts = [o.ttft for o in outs if o.result == "ok" and o.ttft is not None]
        rows.append({
            "kind": kind, "tried": len(outs), "ok": results["ok"], "left": results["left"],
            "absent": results["absent"],
            "429": sum(o.result == "shed" and o.status == 429 for o in outs),
            "503": sum(o.result == "shed" and o.status == 503 for o in outs),
            "failed": results["failed"],
            "5xx": sum(o.status is not None and o.status >= 500 and o.status != 503 for o in outs),
            "p50_ms": ms(percentile(done, 50)), "p95_ms": ms(percentile(done, 95)),
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p95_ms": ms(percentile(ttfts, 95)),
        })  # fmt: skip
    good = [o for o in stats.outcomes if o.kind != "bad"]
    reasons = Counter(o.reason for o in stats.outcomes if o.result == "failed")
    total = rows[-1]
    return rows, {
        "requests_tried": total["tried"],
        "five_xx": sum(o.status is not None and o.status >= 500 for o in stats.outcomes
                       if not (o.status == 503 and o.result == "shed")),
        "failed_good": sum(o.result == "failed" for o in good),
        "failed_bad": sum(o.result == "failed" for o in by_kind["bad"]),
        "shed_429_with_retry_after": total["429"],
        "shed_503_with_retry_after": total["503"],
        "disconnects": total["left"],
        "absent_404": total["absent"],
        "p50_ms": total["p50_ms"], "p95_ms": total["p95_ms"],
        "failure_reasons": dict(reasons.most_common(5)),
    }  # fmt: skip


def print_table(rows: list[dict]) -> None:
    columns = [("kind", "kind", 6), ("tried", "tried", 6), ("ok", "ok", 6), ("left", "left", 5),
               ("absent", "absent", 6), ("429", "429", 5), ("503", "503", 4),
               ("failed", "failed", 6), ("5xx", "5xx", 4), ("p50_ms", "p50 ms", 8),
               ("p95_ms", "p95 ms", 8), ("ttft_p50_ms", "TTFT p50", 9),
               ("ttft_p95_ms", "TTFT p95", 9)]  # fmt: skip
    header = " ".join(f"{title:<{w}}" if key == "kind" else f"{title:>{w}}"
                      for key, title, w in columns)  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = []
        for key, _, w in columns:
            v = r[key]
            text = "-" if v is None else f"{v:.0f}" if isinstance(v, float) else str(v)
            cells.append(f"{text:<{w}}" if key == "kind" else f"{text:>{w}}")
        print(" ".join(cells))


def wait_idle(server: ServeProcess, timeout: float) -> float | None:
    """Seconds until no request runs or waits (None: still busy after `timeout`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (server.metric("mara_num_requests_running") == 0
                and server.metric("mara_num_requests_waiting") == 0):  # fmt: skip
            return round(time.monotonic() - t0, 2)
        time.sleep(0.05)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--default-model", action="store_true", help="serve the embedded SmolLM2 (default: tiny)"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens asked")
    parser.add_argument("--max-concurrent", type=int, default=16)
    parser.add_argument("--max-waiting", type=int, default=24, help="small: forces shedding")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="client timeout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.max_tokens = args.max_tokens or (16 if args.default_model else 48)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        agent_dir = Path(tmp) / "agents"
        if args.default_model:
            model_flags, hidden, args.base = ["--no-default-agents"], 576, None
        else:
            model_dir = tiny_model(Path(tmp) / "tiny-llama")
            model_flags, hidden, args.base = ["--model", str(model_dir)], 64, "tiny-llama"
        tiny_agents(agent_dir, hidden)
        server = ServeProcess([
            *model_flags, "--log-level", "warning", "--agent-dir", str(agent_dir),
            "--agent", f"stable={agent_dir / 'a'}", "--agent", f"swap={agent_dir / 'a'}",
            "--max-concurrent", str(args.max_concurrent), "--max-waiting", str(args.max_waiting),
            "--max-request-body-bytes", str(BODY_LIMIT),
        ], env={"MARA_API_KEY": API_KEY, "MARA_ADMIN_KEY": ADMIN_KEY})  # fmt: skip
        try:
            server.wait_ready()
            auth = {"Authorization": f"Bearer {API_KEY}"}
            models = httpx.get(server.url + "/v1/models", headers=auth).json()["data"]
            args.base = models[0]["id"]
            stats = asyncio.run(run(server.url, args))
            idle_s = wait_idle(server, 10.0)
            tracebacks = server.tracebacks()
        finally:
            exit_code = server.stop()
    rows, totals = summarize(stats)
    swap_failures = [s for s in stats.swaps if s[1] not in (200, 201)]
    model = f"{args.base} ({'embedded default' if args.default_model else 'tiny random'})"
    print(
        f"\nload: {args.clients} clients for {args.duration:.0f} s on {model}, max_concurrent "
        f"{args.max_concurrent}, max_waiting {args.max_waiting}, max_tokens <= "
        f"{args.max_tokens}; p50/p95: end-to-end latency of completed good requests"
    )
    print_table(rows)
    print(
        f"agent swaps/unloads: {len(stats.swaps)} ({len(swap_failures)} failed); engine idle "
        f"{idle_s} s after the run; server tracebacks: {tracebacks}; exit status {exit_code}"
    )
    verdict = (totals["five_xx"] == 0 and totals["failed_good"] == 0 and not swap_failures
               and idle_s is not None and tracebacks == 0 and exit_code == 0)  # fmt: skip
    print("PASS" if verdict else f"FAIL: {totals['failure_reasons']}")
    print(json.dumps({
        "bench": "load", "model": model, "clients": args.clients, "duration_s": args.duration,
        "max_concurrent": args.max_concurrent, "max_waiting": args.max_waiting,
        "max_tokens": args.max_tokens, **totals, "swaps": len(stats.swaps),
        "swap_failures": len(swap_failures), "idle_after_s": idle_s, "tracebacks": tracebacks,
        "exit_code": exit_code, "pass": verdict, "rows": rows, **environment(),
        "wall_s": round(time.monotonic() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
