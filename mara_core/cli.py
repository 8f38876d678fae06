"""The `mara` command line (engine side): `generate`, `fetch-default`, `train` and `eval`.

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


def model_config(args: argparse.Namespace):
    """The `ModelConfig` of the model flags every command shares (--model, --device, --dtype,
    --cache-dir)."""
    from mara_core.loading import ModelConfig

    return ModelConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir or default_cache_dir(),
    )


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
    add_train_parser(sub)
    add_eval_parser(sub)
    return parser


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all", "0") else int(text)


def add_train_parser(sub) -> None:
    """`mara train`: discrete SAC per MARA_SPEC.md §6; defaults are the paper's values."""
    t = sub.add_parser(
        "train",
        help="train a MARA agent for a base model and a reward (discrete SAC)",
        description="Train an accept/reject agent with discrete soft actor-critic "
        "(MARA_SPEC.md §6). Hyper-parameter defaults are the paper's; see "
        "scripts/train_default_agent.sh for a one-hour CPU recipe.",
    )
    add_model_args(t)
    t.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        metavar="[LABEL:]FILE",
        help="prompt files (JSON array or JSONL with 'instruction'); prefix "
        "harmful: or benign: to label a file; HH 'source' fields label "
        "themselves",
    )
    t.add_argument(
        "--reward",
        required=True,
        metavar="SPEC",
        help="refusal[:k=v,...] | hf:reward=DIR[,cost=DIR,w_r=..,w_c=..] | module:function",
    )
    t.add_argument("--out", required=True, help="run directory (agent, card, checkpoints, logs)")
    t.add_argument("--name", default=None, help="agent name (default: the --out folder name)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    g = t.add_argument_group("episodes")
    g.add_argument("--episodes", type=int, default=21000, help="total episodes (paper: 21000)")
    g.add_argument(
        "--episodes-per-iter",
        type=int,
        default=32,
        help="episodes decoded together per iteration (engine batch)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="episodes per drawn prompt (they share one prefill)",
    )
    g.add_argument("--max-new-tokens", type=int, default=512, help="tokens per episode")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument(
        "--chunk-size",
        type=_optional_int,
        default=None,
        help="score candidates m at a time (cheaper while the agent rejects)",
    )
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts")
    g.add_argument(
        "--benign-fraction",
        type=float,
        default=0.5,
        help="share of benign prompts per batch when prompts are labelled",
    )
    g.add_argument(
        "--harm-filter",
        choices=("keywords", "none"),
        default="keywords",
        help="keep harmful-labelled prompts only if they name a harmful intent",
    )
    s = t.add_argument_group("soft actor-critic")
    s.add_argument("--gamma", type=float, default=0.99)
    s.add_argument("--tau", type=float, default=0.005, help="soft target update rate")
    s.add_argument("--batch-size", type=int, default=1024)
    s.add_argument("--lr-actor", type=float, default=3e-4)
    s.add_argument("--lr-critic", type=float, default=3e-4)
    s.add_argument("--lr-alpha", type=float, default=3e-4)
    s.add_argument("--alpha", type=float, default=0.01, help="initial temperature")
    s.add_argument("--target-entropy-ratio", type=float, default=0.6, help="× ln 2")
    s.add_argument("--grad-clip", type=float, default=0.5)
    s.add_argument("--inner-dim", type=int, default=1024, help="agent width D")
    s.add_argument(
        "--init-accept-prob",
        type=float,
        default=None,
        help="start the actor near this p(accept) (default: plain initialisation)",
    )
    s.add_argument(
        "--guide-text",
        default=None,
        help="guided exploration: steer a share of episodes toward this opening, among the "
        "model's own candidates (e.g. a refusal; the reward judges it)",
    )
    s.add_argument(
        "--guide-fraction",
        type=float,
        default=0.25,
        help="share of each prompt's --repeats episodes that are guided",
    )
    s.add_argument(
        "--reward-baseline",
        choices=("none", "prompt"),
        default="none",
        help="prompt: subtract the mean reward of the prompt's other episodes (--repeats > 1)",
    )
    s.add_argument("--kl-coef", type=float, default=0.1, help="KL(agent ‖ LLM) shaping")
    s.add_argument(
        "--propagate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the discounted terminal reward to every transition",
    )
    s.add_argument(
        "--warmup",
        type=int,
        default=65536,
        help="transitions in the replay buffer before updates start",
    )
    s.add_argument("--buffer-size", type=int, default=1_000_000)
    s.add_argument(
        "--updates-per-episode",
        type=float,
        default=10.0,
        help="SAC gradient steps per collected episode",
    )
    o = t.add_argument_group("run")
    o.add_argument("--checkpoint-every", type=int, default=10, help="iterations")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_parser(sub) -> None:
    """`mara eval`: base vs aligned on held-out prompt files."""
    e = sub.add_parser("eval", help="evaluate an agent: base vs aligned on held-out prompts")
    add_model_args(e)
    e.add_argument(
        "--agent",
        default=None,
        help="agent file/dir (default: the shipped agent of the default model)",
    )
    e.add_argument("--harmful", nargs="+", default=[], metavar="FILE", help="harmful prompts")
    e.add_argument("--benign", nargs="+", default=[], metavar="FILE", help="benign prompts")
    e.add_argument(
        "-n",
        type=_optional_int,
        default=100,
        help="prompts per file, a seeded sample ('all' for every prompt)",
    )
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    e.add_argument("--chunk-size", type=_optional_int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--examples", type=int, default=4, help="side-by-side examples to print")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--out", default="mara-eval", help="report directory")
    e.add_argument(
        "--update-card", action="store_true", help="write the summary into the agent's agent.json"
    )


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            from mara_core.generate_cmd import run_generate

            return run_generate(args)
        if args.command in ("train", "eval"):
            if not getattr(args, "command_line", None):  # recorded in cards and reports
                args.command_line = "mara " + args.command
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            if args.command == "train":
                from mara_core.training.train_cmd import run_train

                return run_train(args)
            from mara_core.training.eval_cmd import run_eval_cmd

            return run_eval_cmd(args)
        if args.command == "fetch-default":
            from mara_core.default_model import ensure_default_model

            print(ensure_default_model(args.cache_dir or default_cache_dir()))
            return 0
    except MaraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise SystemExit(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(build_parser(), argv))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and record the exact command (cards and reports quote it)."""
    import shlex

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["mara", *argv])
    return args


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
