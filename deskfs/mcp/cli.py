"""`deskfs mcp [--mount PATH] [--agent NAME] [--http [HOST:]PORT]` and `deskfs mcp token create|list|revoke`.

Owns the command line of the MCP server: finding the workspace, choosing the agent (`--agent`, else
DESKFS_AGENT, else the Unix user), starting the stdio or HTTP server, and managing bearer tokens.
The SDK and everything it pulls in are imported only when a server starts, never at `deskfs` start-up.

Must never: print a token except once, at `token create`; start a non-loopback HTTP server without
tokens; let a traceback reach a user for anything they typed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from deskfs import mounts
from deskfs.errors import EXIT_USAGE, DeskfsError


def _agent(args: argparse.Namespace) -> str | None:
    from deskfs.identity import is_agent_name

    agent = args.agent if args.agent is not None else os.environ.get("DESKFS_AGENT") or None
    if agent is not None and not is_agent_name(agent):
        raise DeskfsError(f"invalid agent name {agent!r} (1-64 characters of A-Z a-z 0-9 . _ -)", EXIT_USAGE)
    return agent


def cmd_mcp(args: argparse.Namespace) -> int:
    agent = _agent(args)
    mount = os.path.abspath(args.mount or os.getcwd())
    if args.mount is None and mounts.containing(mount) is None:
        raise DeskfsError("not inside a deskfs mount (cd into one or pass --mount PATH)", EXIT_USAGE)
    found = mounts.containing(mount)
    mountpoint = found.mountpoint if found is not None else mount
    if args.http is not None:
        return _serve_http(args, mountpoint, found, agent)
    import anyio

    anyio.run(_serve_stdio, mountpoint, agent)
    return 0


async def _serve_stdio(mountpoint: str, agent: str | None) -> None:
    from deskfs.mcp.agents import Pool
    from deskfs.mcp.server import build

    async with Pool(mountpoint) as pool:
        first = await pool.call(agent, "whoami", {})  # who we are, for the instructions (errors: later calls say)
        me = first.get("ok") or {}
        server = build(pool, lambda: agent, mountpoint, principal=me.get("principal", f"agent:{agent}" if agent
                                                                             else "this user"),
                       role=me.get("role", "unknown"))
        await server.run_stdio_async()


def _serve_http(args: argparse.Namespace, mountpoint: str, found: mounts.Mount | None, agent: str | None) -> int:
    import anyio

    from deskfs.mcp.http import is_loopback, parse_address, serve
    from deskfs.mcp.tokens import Tokens

    try:
        host, port = parse_address(args.http)
    except ValueError as exc:
        raise DeskfsError(str(exc), EXIT_USAGE) from None
    if found is None:
        raise DeskfsError(f"{mountpoint} is not inside a mounted deskfs workspace", EXIT_USAGE)
    tokens = Tokens()
    if not is_loopback(host) and not tokens.listed(found.store):
        raise DeskfsError(f"refusing to serve {host} without tokens: anyone who can reach it would act on the"
                          " workspace; create one per agent with: deskfs mcp token create agent:NAME", EXIT_USAGE)
    try:
        anyio.run(serve, mountpoint, found.store, host, port, agent, tokens)
    except KeyboardInterrupt:
        pass
    return 0


def _store_of(args: argparse.Namespace) -> str:
    return mounts.resolve_workspace(args.mount).store


def cmd_token_create(args: argparse.Namespace) -> int:
    from deskfs.identity import is_agent_name
    from deskfs.mcp.tokens import Tokens

    kind, _, name = args.principal.partition(":")
    if kind != "agent" or not is_agent_name(name):
        raise DeskfsError(f"a token is for an agent: agent:NAME (1-64 characters of A-Z a-z 0-9 . _ -), not"
                          f" {args.principal!r}", EXIT_USAGE)
    tokens = Tokens()
    token, entry = tokens.create(args.principal, _store_of(args))
    print(token)
    print(f"token {entry['id']} for {args.principal} (shown once; only its hash is kept in {tokens.path})",
          file=sys.stderr)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    import json

    from deskfs.mcp.tokens import Tokens

    listed = Tokens().listed(None if args.all else _store_of(args))
    if args.json:
        print(json.dumps(listed, indent=2))
    elif not listed:
        print("no MCP tokens")
    else:
        from deskfs.cli.common import print_table

        print_table([("ID", "PRINCIPAL", "CREATED", "WORKSPACE")]
                     + [(e["id"], e["principal"], e["created"], e["workspace"]) for e in listed])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from deskfs.mcp.tokens import Tokens

    workspace = None if ":" not in args.what else _store_of(args)
    gone = Tokens().revoke(args.what, workspace)
    if not gone:
        raise DeskfsError(f"no MCP token {args.what} (see: deskfs mcp token list)")
    print(f"revoked {len(gone)} token{'s' if len(gone) != 1 else ''}: {', '.join(e['id'] for e in gone)}")
    return 0


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = command("mcp", cmd_mcp, "serve the workspace to MCP clients (stdio; --http for several agents)")
    sub.add_argument("--mount", metavar="PATH", help="the workspace (default: the one holding the current folder)")
    sub.add_argument("--agent", metavar="NAME", help="act as agent:NAME (default: DESKFS_AGENT, else your user)")
    sub.add_argument("--http", metavar="[HOST:]PORT", help="serve Streamable HTTP (loopback unless HOST is given)")
    tokens = sub.add_subparsers(dest="mcp_command", parser_class=type(sub))
    create = tokens.add_parser("token", help="bearer tokens for --http: create, list, revoke")
    actions = create.add_subparsers(dest="token_command", required=True, parser_class=type(sub))
    make = actions.add_parser("create", help="create a token for agent:NAME (printed once)")
    make.add_argument("principal", metavar="agent:NAME")
    make.add_argument("--mount", metavar="PATH")
    make.set_defaults(handler=cmd_token_create)
    show = actions.add_parser("list", help="tokens of this workspace (ids and principals, never tokens)")
    show.add_argument("--mount", metavar="PATH")
    show.add_argument("--all", action="store_true", help="of every workspace")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_token_list)
    drop = actions.add_parser("revoke", help="revoke a token by id, or every token of agent:NAME")
    drop.add_argument("what", metavar="ID|agent:NAME")
    drop.add_argument("--mount", metavar="PATH")
    drop.set_defaults(handler=cmd_token_revoke)
