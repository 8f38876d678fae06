"""The `mara` command line (engine side): `generate` and `fetch-default`.

`server.cli` adds `serve` on top of `build_parser()`; this module never imports the server.
Configuration flows CLI flags → frozen config objects → constructors; nothing reads os.environ
except the cache-dir default below.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import uuid
from pathlib import Path

from mara_core.errors import MaraError


def default_cache_dir() -> Path:
    root = os.environ.get("MARA_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    if os.environ.get("MARA_CACHE_DIR"):
        return Path(root)
    return (Path(root) if root else Path.home() / ".cache") / "mara-serve"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="HF model dir, model id in the local HF cache, or .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the default model is converted and cached "
                        "(default: $MARA_CACHE_DIR or ~/.cache/mara-serve)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mara",
        description="MARA Serve: decoding-time alignment of LLMs with accept/reject agents",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one answer (base, aligned, or both)")
    add_model_args(g)
    g.add_argument(
        "--agent",
        default=None,
        help="agent file/dir (default: the shipped agent of the default model)",
    )
    g.add_argument("--no-agent", action="store_true", help="plain decoding, no agent")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--top-k", type=int, default=None, help="candidates per step (MARA: 40)")
    g.add_argument("--top-p", type=float, default=None, help="candidate nucleus (MARA: 0.95)")
    g.add_argument("--compare", action="store_true", help="base and aligned answers side by side")
    g.add_argument("--trace", action="store_true", help="print the per-token accept/reject trace")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument(
        "--reference",
        action="store_true",
        help="decode with the serial reference algorithm (slow; for checking)",
    )
    f = sub.add_parser("fetch-default", help="download and convert the embedded default model")
    f.add_argument("--cache-dir", type=Path, default=None)
    return parser


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            from mara_core.generate_cmd import run_generate

            return run_generate(args)
        if args.command == "fetch-default":
            from mara_core.default_model import ensure_default_model

            print(ensure_default_model(args.cache_dir or default_cache_dir()))
            return 0
    except MaraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise SystemExit(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def columns(left: str, right: str, titles: tuple[str, str]) -> str:
    """Two texts side by side, wrapped to the terminal width."""
    width = max(40, shutil.get_terminal_size((120, 20)).columns)
    col = (width - 3) // 2
    wrap = lambda s: sum((textwrap.wrap(p, col) or [""] for p in s.splitlines() or [""]), [])  # noqa: E731
    a, b = [titles[0], "-" * col] + wrap(left), [titles[1], "-" * col] + wrap(right)
    rows = [
        f"{x:<{col}} | {y}"
        for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)), strict=True)
    ]
    return "\n".join(rows)


def new_id() -> str:
    return uuid.uuid4().hex


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
