"""What the `mara` subcommands share: the model flags and a few output helpers."""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import uuid
from pathlib import Path

from mara_serve.engine.default_model import default_agents, default_cache_dir
from mara_serve.engine.loading import ModelConfig
from mara_serve.engine.quantization import QUANTIZATIONS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --cache-dir (generate, train, eval)."""
    p.add_argument(
        "--model",
        default=None,
        help="HF model dir, HF model id (local cache, else downloaded from the Hub / "
        "HF_ENDPOINT), or .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--revision", default=None,
                   help="a Hub model's branch, tag or commit (default: main)")  # fmt: skip
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on a CPU with native bf16, "
        "else float32; bfloat16/float16 on GPU)",
    )
    p.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="int8: weight-only int8 projections and LM head (CPU; pair with --dtype bfloat16)",
    )
    add_cache_dir_arg(p)


def add_cache_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the default model is fetched, converted and loaded from "
        "(default: $MARA_CACHE_DIR, else $XDG_CACHE_HOME/mara-serve, else ~/.cache/mara-serve)",
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The `ModelConfig` of the shared model flags."""
    return ModelConfig(
        model=args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        cache_dir=args.cache_dir or default_cache_dir(),
    )


def add_agent_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent",
        default=None,
        help="agent file/dir (default: the shipped agent of the default model)",
    )


def agent_path(args: argparse.Namespace) -> str | Path | None:
    """--agent, else the shipped agent when the model is the embedded default, else None."""
    if args.agent is not None:
        return args.agent
    if args.model is None:
        return next(iter(default_agents().values()), None)
    return None


def optional_int(text: str) -> int | None:
    """An int flag where 'none', 'all' or 0 mean "no limit"."""
    return None if text.lower() in ("none", "all", "0") else int(text)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def columns(left: str, right: str, titles: tuple[str, str]) -> str:
    """Two texts side by side, wrapped to the terminal width."""
    width = max(40, shutil.get_terminal_size((120, 20)).columns)
    col = (width - 3) // 2

    def wrap(s: str) -> list[str]:
        return sum((textwrap.wrap(p, col) or [""] for p in s.splitlines() or [""]), [])

    a, b = [titles[0], "-" * col] + wrap(left), [titles[1], "-" * col] + wrap(right)
    pad = max(len(a), len(b))
    a, b = a + [""] * (pad - len(a)), b + [""] * (pad - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b, strict=True))


def new_id() -> str:
    return uuid.uuid4().hex


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
