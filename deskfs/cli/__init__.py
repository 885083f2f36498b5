"""The `deskfs` command: parses arguments, calls the daemon or the store, prints.

One module per command group, each with the commands' code and an `add_commands(command)` that declares
their arguments: `workspace` (init, mount, unmount, status, fsck), `agents` (whoami, run, lock, unlock,
locks), `log`, `members` (config and membership), `versions` (versions, cat, diff, restore, trash,
undelete, gc), and `deskfs.mcp.cli` (mcp). `common` holds what they share.

Owns what a user reads: one line per error (exit 2 for usage, 1 for a refusal), tables for people and
`--json` for programs.
Must never: print a traceback for anything a user did; write the database behind a running daemon.
Agents run `deskfs lock`/`unlock` in loops: the modules only some commands need (the store, SQLite,
sockets, subprocesses, logging, the MCP SDK) are imported inside those commands, which keeps start-up fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from deskfs.cli import agents, log, members, versions, workspace
from deskfs.cli.agents import WAIT_FOREVER
from deskfs.cli.common import Parser, say
from deskfs.errors import EXIT_REFUSED, DeskfsError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="deskfs", description="A shared desk for a team of agents: a FUSE workspace.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    for group in (workspace, agents, log, members, versions):
        group.add_commands(command)
    from deskfs.mcp import cli as mcp_cli  # its commands import the MCP SDK only when they run

    mcp_cli.add_commands(command)
    return parser


def wait_takes_no_path(argv: list[str]) -> list[str]:
    """`deskfs lock --wait PATH`: --wait takes a number of seconds only when one follows it."""
    fixed = list(argv)
    for i, word in enumerate(fixed[:-1]):
        if word == "--wait":
            try:
                float(fixed[i + 1])
            except ValueError:
                fixed[i] = f"--wait={WAIT_FOREVER}"
    return fixed


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(wait_takes_no_path(sys.argv[1:] if argv is None else argv))
        return args.handler(args)
    except DeskfsError as exc:
        say(f"deskfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        say(f"deskfs: {exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return EXIT_REFUSED
