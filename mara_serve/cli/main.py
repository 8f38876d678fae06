"""The `mara` console script: one module per subcommand, each with `add_parser` and `run`.

`main` builds the parser from the subcommand modules, records the exact command line (training
cards and eval reports quote it) and dispatches to the chosen module's `run`. An engine error
the user caused or can fix (`MaraError`: a missing model, a bad agent file) is printed as one
line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from mara_serve.cli import eval as eval_cmd
from mara_serve.cli import fetch_default, generate, serve, train
from mara_serve.engine.errors import MaraError

COMMANDS = (generate, serve, train, eval_cmd, fetch_default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mara",
        description="MARA Serve: decoding-time alignment of LLMs with accept/reject agents",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, and record the exact command as `args.command_line`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["mara", *argv])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command != "serve":  # the server configures its own logging from its settings
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except MaraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
