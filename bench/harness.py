"""What the reliability benchmarks (load.py, soak.py, fuzz.py) share.

- `tiny_model(dir)`: a 2-layer random Llama (hidden 64) with the real SmolLM2 tokenizer, the
  recipe of the HTTP tests' fixture: `mara serve --model DIR` loads it in about a second and a
  request costs milliseconds, so a run measures the server (admission, streaming, disconnects,
  swaps, memory), not the model. Its text is gibberish; that says nothing about alignment.
- `tiny_agents(dir)`: random agents of the matching size.
- `ServeProcess`: `mara serve` as a subprocess on 127.0.0.1 (as deployed), its output kept.
- `percentile`, `rss_bytes`, `environment` (device, versions, commit for the JSON line).
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mara_serve.engine.agent import AgentCard, AgentNetwork, save_agent  # noqa: E402
from mara_serve.engine.default_model import default_cache_dir, ensure_default_model  # noqa: E402

HIDDEN = 64


def tiny_model(out: Path, context: int = 512, seed: int = 0) -> Path:
    """Save the tiny model into `out` (a directory `mara serve --model` loads)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = ensure_default_model(default_cache_dir())  # for its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=context,
        tie_word_embeddings=True, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_agents(out: Path, hidden: int = HIDDEN, names: tuple[str, ...] = ("a", "b")) -> list[str]:
    """Random agents of hidden size `hidden`, one directory each under `out`; their names."""
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        card = AgentCard(name=name, hidden_size=hidden, inner_dim=64, description="random")
        save_agent(AgentNetwork(hidden, 64), card, out / name)
    return list(names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    """An unlabelled sample from a server's /metrics (0 if absent)."""
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


class ServeProcess:
    """`mara serve ARGS` on a free 127.0.0.1 port; `stop()` sends SIGTERM and returns its
    exit status. Its output goes to a file (`log()`), so a chatty server never blocks."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        base = {k: v for k, v in os.environ.items() if not k.startswith("MARA_")}
        cmd = [sys.executable, "-m", "mara_serve", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env={**base, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"mara serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit("mara serve did not become ready")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        return metric(self.url, name)

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def tracebacks(self) -> int:
        """Tracebacks and unhandled-error lines in its output (a healthy run has none)."""
        return len(re.findall(r"Traceback \(most recent call last\)|unhandled error", self.log()))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc (Linux)."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    kib = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert kib is not None, "no VmRSS in /proc/<pid>/status"
    return int(kib.group(1)) * 1024


def environment() -> dict[str, Any]:
    import transformers

    import mara_serve

    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "httpx": httpx.__version__,
        "mara_serve": mara_serve.__version__,
        "commit": commit or "unknown",
    }
