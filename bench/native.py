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
    python bench/native.py --baseline-ref 5dd237a   # also that commit's kernel, alternating

`--baseline-ref REF` compiles decode_cpu.c as it was at git REF (same flags) and times it in the
same rounds as the current one: a kernel change measured side by side on one noisy machine.

Prints a table (ms per forward, eager ÷ native) and one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import TINY, random_model  # noqa: E402

from mara_serve.engine import native as native_kernel  # noqa: E402
from mara_serve.engine.loading import LoadedModel, ModelConfig, load_model  # noqa: E402
from mara_serve.engine.runner import ModelRunner, _linear  # noqa: E402

MAX_ROWS = 16


def grid(n: int) -> tuple[int, list[int], list[int]]:
    """rows, row_of, col_of for n tokens: one per row up to MAX_ROWS rows, then candidates."""
    rows = min(n, MAX_ROWS)
    per_row = -(-n // rows)
    return rows, [i // per_row for i in range(n)], [i % per_row for i in range(n)]


def baseline_library(ref: str, directory: Path):
    """decode_cpu.c as it was at git `ref`, compiled with the current flags and loaded."""
    rel = native_kernel.SOURCE.relative_to(Path(__file__).resolve().parents[1])
    text = subprocess.run(["git", "show", f"{ref}:{rel}"], check=True, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1]).stdout  # fmt: skip
    source = directory / "decode_cpu_baseline.c"
    source.write_text(text)
    target = directory / "decode_cpu_baseline.so"
    native_kernel.compile_library(target, source=source)
    return native_kernel.load_library(target)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_dtype(lm: LoadedModel, tokens: list[int], prefix: int, rounds: int,
                baseline=None) -> dict:  # fmt: skip
    """Median ms per call: eager, native and (with `baseline`, another build of the kernel
    over the same struct) base, each cell's variants alternating round by round."""
    runner = ModelRunner(lm, MAX_ROWS, native_decode=True)
    if runner.native is None:
        raise SystemExit(f"native decoding is off: {runner.native_off_reason}")
    nd = runner.native
    current = nd.lib

    def run_native(fn, lib):
        nd.lib = lib
        try:
            return timed(fn)
        finally:
            nd.lib = current

    def cell(eager_fn, native_fn) -> dict[str, float]:
        times: dict[str, list[float]] = {"eager": [], "native": [], "base": []}
        for _ in range(rounds + 1):  # the first round warms everything up and is dropped
            times["eager"].append(timed(eager_fn))
            times["native"].append(run_native(native_fn, current))
            if baseline is not None:
                times["base"].append(run_native(native_fn, baseline))
        return {k: statistics.median(v[1:]) * 1e3 for k, v in times.items() if v}

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
        decode_args = (toks, row_of, [prefix] * n, [prefix + c for c in col_of])
        out[f"forward {n}"] = cell(functools.partial(runner.forward_tokens, *args),
                                   functools.partial(nd.decode, *decode_args))  # fmt: skip
    for n in (1, MAX_ROWS):
        h = torch.randn(n, lm.hidden_size).to(lm.dtype)

        def eager_head(h=h):  # float32 logits, as nd.logits returns
            return _linear(h, runner.head_w, runner.head_b).float()

        out[f"lm_head {n}"] = cell(eager_head, functools.partial(nd.logits, h))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    p.add_argument("--prefix", type=int, default=200, help="prompt tokens per row")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama, seconds")
    p.add_argument("--baseline-ref", metavar="REF",
                   help="also time decode_cpu.c as it was at this git ref (base ms)")  # fmt: skip
    args = p.parse_args()
    workdir = tempfile.TemporaryDirectory()
    baseline = None
    if args.baseline_ref:
        baseline = baseline_library(args.baseline_ref, Path(workdir.name))
    tokens = [int(t) for t in args.tokens.split(",")]
    prefix = min(args.prefix, 100) if args.tiny else args.prefix
    results = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        lm = (random_model("tiny", TINY, torch.device("cpu"), dtype) if args.tiny
              else load_model(ModelConfig(dtype=name, device="cpu")))  # fmt: skip
        results[name] = bench_dtype(lm, tokens, prefix, args.rounds, baseline)
    base_head = f" {'base ms':>9} {'base/native':>11}" if baseline is not None else ""
    print(f"{'dtype':9} {'what':12} {'eager ms':>9} {'native ms':>9} {'eager/native':>12}"
          + base_head)  # fmt: skip
    for name, cells in results.items():
        for what, t in cells.items():
            base = f" {t['base']:9.2f} {t['base'] / t['native']:11.2f}" if "base" in t else ""
            print(f"{name:9} {what:12} {t['eager']:9.2f} {t['native']:9.2f} "
                  f"{t['eager'] / t['native']:12.2f}" + base)  # fmt: skip
    print(json.dumps({
        "bench": "native", "tiny": args.tiny, "prefix": prefix, "rounds": args.rounds,
        "baseline_ref": args.baseline_ref,
        "threads": torch.get_num_threads(), "cpu": platform.machine(), "torch": torch.__version__,
        "ms": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
