"""Native CPU decode kernel benchmark: one decode forward of N tokens, eager vs native.

For each token count N (N rows of one token each; past 16, 16 rows of N/16 candidates) it
times, on the same prefilled KV cache (`--prefix` tokens per row), the eager runner's
`forward_tokens` and the native kernel (`runner.native.decode`, mara_serve/engine/native/) in
alternating rounds, so a noisy machine hurts both alike; and the LM head on 1 and 16 states
(eager `_linear` vs native). Each cell is the median over `--rounds`. The 64-token limit of
`runner.NATIVE_MAX_TOKENS` comes from this crossover (bench/RESULTS.md).

    python bench/native.py                          # the default model, float32 and bf16
    python bench/native.py --dtypes bfloat16 --tokens 1,4,16,64 --rounds 7
    python bench/native.py --tiny                   # seconds: a random tiny Llama (CI)

Prints a table (ms per forward, eager ÷ native) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import TINY, random_model  # noqa: E402

from mara_serve.engine.loading import LoadedModel, ModelConfig, load_model  # noqa: E402
from mara_serve.engine.runner import ModelRunner, _linear  # noqa: E402

MAX_ROWS = 16


def grid(n: int) -> tuple[int, list[int], list[int]]:
    """rows, row_of, col_of for n tokens: one per row up to MAX_ROWS rows, then candidates."""
    rows = min(n, MAX_ROWS)
    per_row = -(-n // rows)
    return rows, [i // per_row for i in range(n)], [i % per_row for i in range(n)]


def bench_dtype(lm: LoadedModel, tokens: list[int], prefix: int, rounds: int) -> dict:
    runner = ModelRunner(lm, MAX_ROWS, native_decode=True)
    if runner.native is None:
        raise SystemExit(f"native decoding is off: {runner.native_off_reason}")
    vocab = lm.vocab_size
    ids = [(7 * i + 3) % vocab for i in range(prefix)]
    for slot in range(MAX_ROWS):
        runner.prefill(slot, ids)
    out: dict[str, dict[str, float]] = {}
    for n in tokens:
        rows, row_of, col_of = grid(n)
        toks = [(11 * i + 5) % vocab for i in range(n)]
        lengths = [prefix] * rows
        args = (rows, torch.tensor(lengths), torch.tensor(toks), torch.tensor(row_of),
                torch.tensor(col_of), max(col_of) + 1)  # fmt: skip
        eager, native = [], []
        for _ in range(rounds + 1):  # the first round warms both up and is dropped
            t0 = time.perf_counter()
            runner.forward_tokens(*args)
            t1 = time.perf_counter()
            runner.native.decode(toks, row_of, [prefix] * n, [prefix + c for c in col_of])
            t2 = time.perf_counter()
            eager.append(t1 - t0)
            native.append(t2 - t1)
        out[f"forward {n}"] = {"eager": statistics.median(eager[1:]) * 1e3,
                               "native": statistics.median(native[1:]) * 1e3}  # fmt: skip
    for n in (1, MAX_ROWS):
        h = torch.randn(n, lm.hidden_size).to(lm.dtype)
        eager, native = [], []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            _linear(h, runner.head_w, runner.head_b).float()
            t1 = time.perf_counter()
            runner.native.logits(h)
            t2 = time.perf_counter()
            eager.append(t1 - t0)
            native.append(t2 - t1)
        out[f"lm_head {n}"] = {"eager": statistics.median(eager[1:]) * 1e3,
                               "native": statistics.median(native[1:]) * 1e3}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    p.add_argument("--prefix", type=int, default=200, help="prompt tokens per row")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama, seconds")
    args = p.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    prefix = min(args.prefix, 100) if args.tiny else args.prefix
    results = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        lm = (random_model("tiny", TINY, torch.device("cpu"), dtype) if args.tiny
              else load_model(ModelConfig(dtype=name, device="cpu")))  # fmt: skip
        results[name] = bench_dtype(lm, tokens, prefix, args.rounds)
    print(f"{'dtype':9} {'what':12} {'eager ms':>9} {'native ms':>9} {'eager/native':>12}")
    for name, cells in results.items():
        for what, t in cells.items():
            print(f"{name:9} {what:12} {t['eager']:9.2f} {t['native']:9.2f} "
                  f"{t['eager'] / t['native']:12.2f}")  # fmt: skip
    print(json.dumps({
        "bench": "native", "tiny": args.tiny, "prefix": prefix, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "cpu": platform.machine(), "torch": torch.__version__,
        "ms": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
