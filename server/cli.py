"""The `mara` console script: mara_core's commands plus `mara serve`.

`serve` has one flag per `Settings` field (`--max-concurrent` ↔ `MARA_MAX_CONCURRENT`; the
repeatable `--agent NAME=PATH` ↔ `MARA_AGENTS`); flags given on the command line win over the
environment, absent flags leave it alone. Other commands go to `mara_core.cli.run`.

Shutdown: the first SIGTERM/SIGINT drains (new requests and /ready get 503 while the socket
stays open, running streams finish for up to `--graceful-shutdown-s`), then uvicorn stops; a
second signal stops at once. Exit status: 0 after a clean stop, 1 if startup failed (the model or
a startup agent did not load), 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from types import FrameType

import uvicorn
from pydantic import SecretStr, ValidationError

from server.settings import Settings

log = logging.getLogger("server")

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


def _core_parser() -> argparse.ArgumentParser:
    try:
        from mara_core.cli import build_parser
    except ImportError:  # mara_core's CLI not present: `mara serve` alone
        parser = argparse.ArgumentParser(prog="mara", description="MARA Serve")
        parser.add_subparsers(dest="command", required=True)
        return parser
    return build_parser()


def build_parser() -> argparse.ArgumentParser:
    parser = _core_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Serve a model (default: the embedded SmolLM2-135M-Instruct) and its MARA "
        "agents over an OpenAI-compatible HTTP API. Every flag is also an environment "
        "variable MARA_<FLAG>.",
    )
    add_settings_flags(serve)
    return parser


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain between the first shutdown signal and closing the socket."""

    def __init__(self, config: uvicorn.Config, state: typing.Any):
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets: typing.Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        from server.state import Phase

        if self._draining or self._loop is None or self.state.phase != Phase.READY:
            super().handle_exit(sig, frame)  # second signal, or nothing to drain: stop now
            return
        self._draining = True
        log.info("received signal %d: draining (a second signal stops at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        from server.lifecycle import drain

        try:
            await drain(self.state, self.state.settings.graceful_shutdown_s)
        finally:
            self.should_exit = True


def serve(settings: Settings) -> int:
    from server.app import create_app
    from server.state import Phase

    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if unknown := Settings.unknown_env_vars():
        log.warning("ignoring unknown settings in the environment: %s", ", ".join(unknown))
    app = create_app(settings)
    state = app.state.mara
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, state)

    def stop_after_failure() -> None:
        server.should_exit = True

    state.on_fatal = stop_after_failure
    server.run()
    return 1 if state.phase == Phase.FAILED else 0


def _settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def main(argv: list[str] | None = None) -> int:
    from mara_core.cli import parse_args

    args = parse_args(build_parser(), argv)
    if args.command != "serve":
        from mara_core.cli import run

        return run(args)
    try:
        settings = _settings_from(args)
    except ValidationError as e:
        lines = [
            f"  {'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors()
        ]
        print("error: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
