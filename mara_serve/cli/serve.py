"""`mara serve`: the OpenAI-compatible server, configured by flags and MARA_* variables.

One flag per `Settings` field (`--max-concurrent` ↔ `MARA_MAX_CONCURRENT`; the repeatable
`--agent NAME=PATH` ↔ `MARA_AGENTS`). Flags given on the command line win over the environment;
absent flags leave it alone (their argparse default is SUPPRESS). Exit status: 0 after a clean
stop, 1 if startup failed, 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import sys
import typing

from pydantic import SecretStr, ValidationError

from mara_serve.server.settings import Settings

_FLAG_NAMES = {"agents": "agent"}  # field → flag, where the singular reads better


def _default_text(name: str) -> str:
    field = Settings.model_fields[name]
    if field.annotation is not None and SecretStr in typing.get_args(field.annotation):
        return "unset"
    value = field.get_default(call_default_factory=True)
    if value in (None, [], {}):
        return "unset"
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; defaults are SUPPRESSed so the environment still applies."""
    for name, field in Settings.model_fields.items():
        flag = "--" + _FLAG_NAMES.get(name, name).replace("_", "-")
        env = f"MARA_{name.upper()}"
        help_text = f"{field.description} [env {env}; default {_default_text(name)}]"
        kwargs: dict[str, typing.Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        choices = (
            typing.get_args(field.annotation)
            if typing.get_origin(field.annotation) is typing.Literal
            else None
        )
        if name == "agents":
            kwargs.update(action="append", metavar="NAME=PATH")
        elif field.annotation is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif choices:
            kwargs.update(choices=choices)
        parser.add_argument(flag, **kwargs)


def add_parser(sub) -> None:  # sub: the `mara` parser's subparsers
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve a model (default: the embedded SmolLM2-135M-Instruct) and its MARA "
        "agents over an OpenAI-compatible HTTP API. Every flag is also an environment "
        "variable MARA_<FLAG>.",
    )
    add_settings_flags(p)
    p.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValidationError as e:
        lines = [
            f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        ]
        print("error: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    from mara_serve.server.process import serve  # FastAPI/uvicorn only for this command

    return serve(settings)
