"""`bench/native.py --tiny` runs end to end (the native-vs-eager forward numbers in
bench/RESULTS.md come from it) and times both paths for every token count asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "native.py"


def test_native_benchmark_times_eager_and_native():
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--tokens", "1,3,20", "--rounds", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "native" and set(result["ms"]) == {"float32", "bfloat16"}
    for cells in result["ms"].values():
        assert set(cells) == {"forward 1", "forward 3", "forward 20", "lm_head 1", "lm_head 16"}
        assert all(t["eager"] > 0 and t["native"] > 0 for t in cells.values())


def test_native_benchmark_times_a_baseline_kernel_from_git():
    """--baseline-ref compiles decode_cpu.c as committed at a ref and times it alongside."""
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--dtypes", "bfloat16", "--tokens", "2",
           "--rounds", "1", "--baseline-ref", "HEAD"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["baseline_ref"] == "HEAD"
    cells = result["ms"]["bfloat16"]
    assert set(cells) == {"forward 2", "lm_head 1", "lm_head 16"}
    assert all(t["base"] > 0 and t["native"] > 0 for t in cells.values())
    assert "base/native" in out.stdout
