"""`bench/gpu.py` runs end to end (so the GPU benchmark cannot rot between the rare sessions that
have a GPU): on the CPU with the tiny model in CI, on CUDA with the tiny model when one exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def run_bench(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--rows", "1,4", "--steps", "2", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result: dict) -> None:
    rows = result["results"]
    assert {(r["rows"], r["mode"]) for r in rows} == {
        (n, m)
        for n in (1, 4)
        for m in ("plain", "plain eager", "mara default", "mara all-at-once", "mara chunk=8")
    }
    assert all(r["ms_per_step"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert all(r["floor_ratio"] == pytest.approx(r["ms_per_step"] / r["floor_ms"], rel=0.05)
               for r in rows)  # fmt: skip
    # the MARA rows judged candidates: the agent rejected some (calibrated to ~50 %)
    assert max(r["candidates_per_token"] for r in rows if r["mode"] != "plain") > 1
    fp32 = next(p for p in result["parity"] if p["dtype"] == "float32")
    assert fp32["identical"] == fp32["sequences"] == 4
    assert result["copy_bandwidth_gb_s"] > 0


def test_gpu_bench_runs_on_the_cpu_with_the_tiny_model() -> None:
    result = run_bench("--device", "cpu")
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    check(result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bench_runs_on_cuda_with_the_tiny_model() -> None:
    result = run_bench("--device", "cuda")
    assert result["device"] == "cuda" and result["dtype"] == "bfloat16"
    check(result)
