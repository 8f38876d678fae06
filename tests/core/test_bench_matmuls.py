"""`bench/matmuls.py --tiny` runs end to end (the projection-kernel numbers in
bench/RESULTS.md come from it) and times every variant at every row count it was asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "matmuls.py"


def test_kernels_benchmark_runs_every_variant():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--rows", "1,9"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "matmuls"
    assert set(result["ms"]) == {"qkv", "gate_up", "lm_head"}
    for cells in result["ms"].values():
        assert set(cells) == {"1", "9"}
        for timings in cells.values():
            assert set(timings) == {"fp32 F.linear", "fp32 served", "bf16 F.linear",
                                    "bf16 served", "int8 (bf16 act)"}  # fmt: skip
            assert all(ms > 0 for ms in timings.values())
