"""Projection kernels benchmark: the matrix products of one decode step, per row count.

For every projection shape of the model (fused q/k/v, o, fused gate/up, down, the LM head) it
times, on 30 weights of that shape (the LM head: one), the ways the runner can multiply:
`F.linear` in float32 and bfloat16, the runner's own `_linear` as served (split batched
matmuls in float32 on a CPU, a gemv for one bf16 row), and int8 weights (`int8_linear`: the
int8 kernel up to `PACK_KERNEL_MAX_ROWS` rows, a converted matmul above). Rounds alternate the
variants so a noisy machine hurts them alike; each cell is the median of the rounds' medians.

    python bench/matmuls.py                  # SmolLM2-135M's shapes, rows 1,2,4,8,16,64
    python bench/matmuls.py --rows 1,4 --rounds 5
    python bench/matmuls.py --tiny           # seconds: small shapes (CI keeps it running)

Prints a table (ms per 30 matrices) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mara_serve.engine.loading import cpu_has_fast_bf16  # noqa: E402
from mara_serve.engine.quantization import int8_linear, quantize_rows  # noqa: E402
from mara_serve.engine.runner import _linear  # noqa: E402
from mara_serve.engine.weights import head_groups, split_weight  # noqa: E402

# (out, in, how many): SmolLM2-135M-Instruct's projections, 30 layers, and its LM head
SMOLLM2 = {"qkv": (960, 576, 30), "o": (576, 576, 30), "gate_up": (3072, 576, 30),
           "down": (576, 1536, 30), "lm_head": (49152, 576, 1)}  # fmt: skip
TINY = {"qkv": (128, 64, 4), "gate_up": (256, 64, 4), "lm_head": (512, 64, 1)}


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def weights(out_f: int, in_f: int, count: int, threads: int) -> dict:
    """`count` random (out_f, in_f) weights in every layout a variant multiplies by."""
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    w32 = [torch.randn(out_f, in_f, generator=g) * 0.02 for _ in range(count)]
    groups = head_groups(out_f, threads) if count == 1 else None
    return {
        "fp32": w32,
        "fp32 split": [split_weight(w, None, threads, groups)[0] for w in w32],
        "bf16": [w.bfloat16() for w in w32],
        "int8": [(q, s.bfloat16()) for q, s in map(quantize_rows, w32)],
    }


def variants(ws: dict, in_f: int, rows: int) -> dict:
    """name → a callable multiplying `rows` random rows by every weight of `ws`."""
    x32 = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
    x16 = x32.bfloat16()
    return {
        "fp32 F.linear": lambda: [F.linear(x32, w) for w in ws["fp32"]],
        "fp32 served": lambda: [_linear(x32, w, None) for w in ws["fp32 split"]],
        "bf16 F.linear": lambda: [F.linear(x16, w) for w in ws["bf16"]],
        "bf16 served": lambda: [_linear(x16, w, None) for w in ws["bf16"]],
        "int8 (bf16 act)": lambda: [int8_linear(x16, q, s, None) for q, s in ws["int8"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per round")
    ap.add_argument("--tiny", action="store_true", help="small shapes, one round (seconds)")
    args = ap.parse_args()
    shapes = TINY if args.tiny else SMOLLM2
    rounds, repeats = (1, 2) if args.tiny else (args.rounds, args.repeats)
    threads = torch.get_num_threads()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with torch.inference_mode():
        for name, (out_f, in_f, count) in shapes.items():
            ws = weights(out_f, in_f, count, threads)  # built once per shape, for every row count
            for rows in [int(r) for r in args.rows.split(",")]:
                fns = variants(ws, in_f, rows)
                per_round = {k: [] for k in fns}
                for _ in range(rounds):
                    for k, fn in fns.items():
                        per_round[k].append(median_ms(fn, repeats))
                cell = {k: round(statistics.median(v), 3) for k, v in per_round.items()}
                results.setdefault(name, {})[str(rows)] = cell
                print(f"{name:8s} {out_f}x{in_f} x{count} rows {rows:3d}  " + "  ".join(
                    f"{k} {v:7.2f}" for k, v in cell.items()), flush=True)  # fmt: skip
    print(json.dumps({
        "bench": "matmuls", "threads": threads, "torch": torch.__version__,
        "cpu_has_fast_bf16": cpu_has_fast_bf16(), "machine": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(), "ms": results,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
