"""Serving benchmark: N concurrent streaming clients against a live `mara serve`.

Starts `mara serve` (a subprocess, as deployed) on the embedded default model, then for the base
model (agent off: the baseline, measured in the same run) and for an agent, runs 1, 4 and 16
concurrent streaming clients (openai.AsyncOpenAI) and reports requests/s, generated tokens/s,
TTFT and inter-token latency p50/p95. Every request generates exactly `--max-tokens` tokens
(`ignore_eos`), so levels and modes compare like for like. Each mode is warmed up first.

The agent is the shipped default agent when there is one; otherwise a RANDOM untrained agent of
the right size (said in the output): it measures speed only, not alignment.

Prints a table, the issue's scaling targets, then one JSON line (device, versions, commit).

    python bench/serve.py            # 128 tokens, 2 requests per client
    python bench/serve.py --quick    # 32 tokens, 1 request per client (< 3 min on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import free_port, metric, percentile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain how rainbows form.",
    "Write a short story about a lighthouse keeper.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
    "Give me three tips for learning a new language.",
    "How does a bicycle stay upright?",
    "Summarise the plot of a detective novel you invent.",
    "Why is the sky blue?",
]


@dataclass
class RequestStats:
    ttft: float
    itls: list[float]
    e2e: float
    tokens: int


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    extra: dict = field(default_factory=dict)


async def one_request(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int
) -> RequestStats:
    t0 = time.perf_counter()
    first = last = None
    itls: list[float] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = now
            else:
                itls.append(now - last)
            last = now
    end = time.perf_counter()
    return RequestStats(ttft=(first or end) - t0, itls=itls, e2e=end - t0, tokens=tokens)


async def run_level(
    base_url: str,
    mode: str,
    model: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    keepalive: bool = True,
) -> LevelResult:
    """`requests` streaming requests from `concurrency` clients. keepalive=False opens a new
    connection per request (llama.cpp's server closes the connection after a stream)."""
    limits = httpx.Limits(max_keepalive_connections=None if keepalive else 0)
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600,
        http_client=httpx.AsyncClient(limits=limits, timeout=600),
    )  # fmt: skip
    todo = list(range(requests))
    results: list[RequestStats] = []

    async def worker() -> None:
        while todo:
            i = todo.pop()
            results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    itls = [x for r in results for x in r.itls]
    ttfts = [r.ttft for r in results]
    return LevelResult(
        mode=mode,
        concurrency=concurrency,
        requests=requests,
        wall_s=round(wall, 3),
        requests_per_s=round(requests / wall, 3),
        tokens_per_s=round(sum(r.tokens for r in results) / wall, 2),
        ttft_p50_ms=round(percentile(ttfts, 50) * 1e3, 1),
        ttft_p95_ms=round(percentile(ttfts, 95) * 1e3, 1),
        itl_p50_ms=round(percentile(itls, 50) * 1e3, 1),
        itl_p95_ms=round(percentile(itls, 95) * 1e3, 1),
    )


def pick_agent(tmp: Path) -> tuple[str, Path, list[str], str]:
    """(agent model id, its directory, extra serve flags, description)."""
    from mara_serve.engine.default_model import default_agents

    shipped = default_agents()
    if shipped:
        name, path = next(iter(shipped.items()))
        return name, path, [], f"shipped default agent {name!r}"
    from mara_serve.engine.agent import AgentCard, AgentNetwork, save_agent

    save_agent(
        AgentNetwork(576), AgentCard(name="random-agent", hidden_size=576), tmp / "random-agent"
    )
    return (
        "random-agent",
        tmp / "random-agent",
        ["--agent", f"random-agent={tmp / 'random-agent'}"],
        "RANDOM untrained agent (no default agent is shipped yet; speed only)",
    )


def start_server(
    port: int, extra: list[str], max_concurrent: int, cores: set[int] | None = None
) -> subprocess.Popen:
    """`mara serve` as a subprocess; `cores`: pinned to those CPUs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARA_")}
    cmd = [
        sys.executable,
        "-m",
        "mara_serve",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-concurrent",
        str(max_concurrent),
        *extra,
    ]
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, preexec_fn=pin)
    return wait_ready(proc, f"http://127.0.0.1:{port}/ready", "mara serve", 600)


def wait_ready(proc: subprocess.Popen, url: str, name: str, timeout: float) -> subprocess.Popen:
    """Poll `url` until it answers 200; exits the benchmark if the server dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name} did not become ready")


def environment(base_url: str) -> dict:
    import torch
    import transformers

    import mara_serve

    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    model = httpx.get(base_url + "/v1/models").json()["data"][0]
    return {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        # the server's own (its engine thread's), not this process's
        "torch_threads": int(metric(base_url, "mara_torch_threads")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "openai": openai.__version__,
        "mara_serve": mara_serve.__version__,
        "commit": commit,
        "model": model["id"],
        "max_model_len": model.get("max_model_len"),
    }


def print_table(results: list[LevelResult], agent_desc: str) -> None:
    print(f"\nagent: {agent_desc}")
    header = (
        f"{'mode':<6} {'conc':>4} {'reqs':>4} {'req/s':>7} {'tok/s':>7} "
        f"{'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}   (ms)"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.mode:<6} {r.concurrency:>4} {r.requests:>4} {r.requests_per_s:>7.2f} "
            f"{r.tokens_per_s:>7.1f} {r.ttft_p50_ms:>9.0f} {r.ttft_p95_ms:>9.0f} "
            f"{r.itl_p50_ms:>8.1f} {r.itl_p95_ms:>8.1f}"
        )


def scaling(results: list[LevelResult]) -> dict:
    out = {}
    for mode in sorted({r.mode for r in results}):
        by_c = {r.concurrency: r for r in results if r.mode == mode}
        if 1 in by_c and 16 in by_c:
            out[mode] = {
                "tokens_per_s_16_over_1": round(by_c[16].tokens_per_s / by_c[1].tokens_per_s, 2),
                "ttft_p50_16_over_1": round(by_c[16].ttft_p50_ms / by_c[1].ttft_p50_ms, 2),
            }
    return out


async def bench(
    base_url: str,
    modes: dict[str, str],
    levels: list[int],
    per_client: int,
    max_tokens: int,
    keepalive: bool = True,
) -> list[LevelResult]:
    """Per mode (label → model id): a warm-up, then each concurrency level."""
    results = []
    for mode, model in modes.items():
        await run_level(base_url, mode, model, 2, 2, 8, keepalive)  # warm-up (not reported)
        for c in levels:
            r = await run_level(base_url, mode, model, c, c * per_client, max_tokens, keepalive)
            print(f"  {mode} x{c}: {r.tokens_per_s:.1f} tok/s, TTFT p50 {r.ttft_p50_ms:.0f} ms",
                  file=sys.stderr, flush=True)  # fmt: skip
            results.append(r)
    return results


def engine_alone(
    agent_path: Path, concurrency: int, max_tokens: int, serve_args: list[str]
) -> Callable[[int], dict[str, float]]:
    """The same work without the server: `LLMEngine` in this process, configured exactly as
    `mara serve` configures it (same settings → same EngineConfig). Returns a function that
    runs `requests` chat prompts with at most `concurrency` running, prefill included, per
    mode (base, agent) and returns tokens/s per mode."""
    from mara_serve.cli.main import parse_args
    from mara_serve.cli.serve import settings_from
    from mara_serve.engine.agent import load_agent
    from mara_serve.engine.loading import render_chat
    from mara_serve.engine.request import Request
    from mara_serve.engine.sampling import SamplingParams
    from mara_serve.server.lifecycle import build_llm_engine

    settings = settings_from(
        parse_args(["serve", "--max-concurrent", str(concurrency), *serve_args])
    )
    # Loaded and configured exactly as the server does; one engine for both modes,
    # as in the server (its prefix cache stays warm from one mode to the next).
    engine = build_llm_engine(settings)
    lm = engine.lm
    agent = load_agent(agent_path, expected_hidden_size=lm.hidden_size)
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def run(requests: int) -> dict[str, float]:
        out = {}
        for mode, a in (("base", None), ("agent", agent)):
            warm = [Request(f"w{i}", render_chat(lm.tokenizer, [{"role": "user", "content": "Hi"}]),
                            SamplingParams(max_new_tokens=8), a) for i in range(2)]  # fmt: skip
            engine.generate(warm)
            reqs = [
                Request(f"{mode}{i}", render_chat(lm.tokenizer, [
                    {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]), params, a)
                for i in range(requests)
            ]  # fmt: skip
            t0 = time.perf_counter()
            results = engine.generate(reqs)
            wall = time.perf_counter() - t0
            out[mode] = round(sum(len(ids) for ids, _, _ in results.values()) / wall, 2)
            print(f"  engine alone {mode} x{concurrency}: {out[mode]:.1f} tok/s", file=sys.stderr)
        return out

    return run


def thread_cpu_s(pid: int, tid: int) -> float | None:
    """CPU seconds (user + system) one thread of a process has used; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def pinned(fn: Callable[[int], dict[str, float]], run_on: set[int], back_to: set[int]):
    """`fn` run on the `run_on` cores (this thread), then back on `back_to`."""

    def run(n: int) -> dict[str, float]:
        os.sched_setaffinity(0, run_on)
        try:
            return fn(n)
        finally:
            os.sched_setaffinity(0, back_to)

    return run


def server_over_engine(
    base_url: str, modes: dict[str, str], alone: Callable[[int], dict[str, float]],
    concurrency: int, per_client: int, max_tokens: int, rounds: int, server_pid: int,
) -> dict[str, dict]:  # fmt: skip
    """Server ÷ engine alone on the same work, in `rounds` alternating pairs (engine alone,
    then the server; the other one idle), so that the machine's drift between runs falls on
    both sides. Returns per mode the rounds' ratios, their median, and the share of one core
    that the streaming clients (this process) and the server's API thread (its main thread:
    the event loop) used while the server ran — on a small machine both compete with the
    server's torch threads, which the engine alone never meets."""
    ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    client: dict[str, list[float]] = {mode: [] for mode in modes}
    api: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(rounds):
        engine_tps = alone(concurrency * per_client)
        for mode, model in modes.items():
            cpu0, api0 = time.process_time(), thread_cpu_s(server_pid, server_pid)
            r = asyncio.run(run_level(base_url, mode, model, concurrency,
                                      concurrency * per_client, max_tokens))  # fmt: skip
            client[mode].append(round((time.process_time() - cpu0) / r.wall_s, 3))
            api1 = thread_cpu_s(server_pid, server_pid)
            api[mode].append(round((api1 - api0) / r.wall_s, 3) if api1 is not None else 0.0)
            ratio = r.tokens_per_s / engine_tps[mode]
            ratios[mode].append(round(ratio, 3))
            print(f"  round {i + 1}: {mode} server x{concurrency} {r.tokens_per_s:.1f} tok/s"
                  f" / engine alone {engine_tps[mode]:.1f} = {ratio:.3f}; share of a core:"
                  f" clients {client[mode][-1]:.0%}, server API thread {api[mode][-1]:.0%}",
                  file=sys.stderr)  # fmt: skip
    return {
        mode: {"rounds": v, "median": statistics.median(v),
               "client_core_share": statistics.median(client[mode]),
               "api_thread_core_share": statistics.median(api[mode])}
        for mode, v in ratios.items()
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 tokens, 1 request per client")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--requests-per-client", type=int, default=None)
    parser.add_argument("--levels", default="1,4,16", help="comma-separated concurrencies")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `mara serve` argument, repeatable (--serve-arg=--dtype=...)",
    )
    parser.add_argument(
        "--engine-baseline",
        action="store_true",
        help="also run the same work on the engine alone (in process), alternating with the "
        "server, and report server / engine at the highest concurrency",
    )
    parser.add_argument(
        "--separate-client",
        action="store_true",
        help="Linux, 2+ cores: the server and the engine alone each run pinned to the first "
        "core with one torch thread (--torch-threads 1), the streaming clients on the other "
        "cores — the clients "
        "then do not compete with the engine, as when they run on another machine",
    )
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="engine-alone / server pairs for --engine-baseline (their median is reported)",
    )  # fmt: skip
    args = parser.parse_args()
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    per_client = args.requests_per_client or (1 if args.quick else 2)
    levels = [int(x) for x in args.levels.split(",")]
    serve_args = list(args.serve_arg)
    engine_cores = client_cores = None
    if args.separate_client:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cpus) < 2:
            parser.error("--separate-client needs Linux and at least 2 cores")
        engine_cores, client_cores = {cpus[0]}, set(cpus[1:])
        serve_args += ["--torch-threads", "1"]  # the server's and the engine alone's setting
        os.sched_setaffinity(0, engine_cores)  # the engine alone's model loads there too
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        agent, agent_dir, flags, agent_desc = pick_agent(Path(tmp))
        c = max(levels)
        alone = (engine_alone(agent_dir, c, max_tokens, serve_args)
                 if args.engine_baseline else None)  # fmt: skip
        if args.separate_client:
            os.sched_setaffinity(0, client_cores)
            if alone is not None:
                alone = pinned(alone, engine_cores, client_cores)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        proc = start_server(port, flags + serve_args, max(levels), engine_cores)
        try:
            env = environment(base_url)
            modes = {"base": env["model"], "agent": agent}
            results = asyncio.run(bench(base_url, modes, levels, per_client, max_tokens))
            over = ({} if alone is None else
                    server_over_engine(base_url, modes, alone, c, per_client, max_tokens,
                                       args.rounds, proc.pid))  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(60)
    print_table(results, agent_desc)
    targets = scaling(results)
    for mode, r in over.items():
        targets.setdefault(mode, {})["server_over_engine"] = r
        print(f"{mode}: server x{c} / engine alone, median of {len(r['rounds'])} alternating "
              f"rounds = {r['median']} {r['rounds']} (target >= 0.9); share of a core: the "
              f"streaming clients {r['client_core_share']:.0%}, the server's API thread "
              f"{r['api_thread_core_share']:.0%}")  # fmt: skip
    for mode, t in targets.items():
        if "tokens_per_s_16_over_1" not in t:
            continue
        print(
            f"{mode}: tokens/s at 16 = {t['tokens_per_s_16_over_1']}x one stream (target >= 5x);"
            f" TTFT p50 at 16 = {t['ttft_p50_16_over_1']}x alone (target <= 3x)"
        )
    print(
        json.dumps(
            {
                "bench": "serve",
                "quick": args.quick,
                "separate_client": args.separate_client,
                "max_tokens": max_tokens,
                "requests_per_client": per_client,
                "agent": agent_desc,
                **env,
                "wall_s": round(time.monotonic() - started, 1),
                "scaling": targets,
                "results": [asdict(r) for r in results],
            }
        )
    )


if __name__ == "__main__":
    main()
