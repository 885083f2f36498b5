"""`deskfs config`, `members`, `invite`, `role`, `remove`, `leave`, `transfer`, `accept-transfer`,
`cancel-transfer`: settings and membership, all asked of the daemon (which checks the caller's role).

Must never: decide who may do what (the daemon does, by the caller's peer credentials).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

from deskfs import mounts
from deskfs.cli.common import ask, print_table, say


def cmd_config(args: argparse.Namespace) -> int:
    mount = mounts.resolve_workspace(args.mount)
    request = {"op": "config", "key": args.key} | ({"value": args.value} if args.value is not None else {})
    answer = ask(mount, request)
    say(f"{answer['key']} = {answer['value'] if answer['value'] is not None else '(default)'}")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from deskfs.journal import iso_time

    answer = ask(mounts.resolve_workspace(args.mount), {"op": "members"})
    if args.json:
        answer.pop("ok", None)
        print(json.dumps(answer, indent=2))
        return 0
    print_table([("PRINCIPAL", "ROLE", "SINCE", "ADDED BY")] + [
        (m["principal"], m["role"], iso_time(m["since_ns"])[:19], m["added_by"]) for m in answer["members"]])
    if answer["own_agents"] != "off":
        say(f"(the owner's Unix user and its agents are {answer['own_agents']}s unless listed otherwise)")
    offer = answer["offer"]
    if offer is not None:
        say(f"ownership offered to {offer['principal']} (then {offer['then_role']}), expires {offer['expires']}")
    return 0


def _member_command(op: str, message: Callable[[argparse.Namespace, dict], str],
                    fields: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        answer = ask(mounts.resolve_workspace(args.mount), {"op": op} | fields(args))
        say(message(args, answer))
        return 0
    return command


cmd_invite = _member_command("invite", lambda a, r: f"invited {a.principal} as {a.role}",
                             lambda a: {"principal": a.principal, "role": a.role}
                             | ({"bound_to": a.bound_to} if a.bound_to else {}))


cmd_role = _member_command("role", lambda a, r: f"{a.principal} is now {a.role}",
                           lambda a: {"principal": a.principal, "role": a.role})


cmd_remove = _member_command("remove", lambda a, r: f"removed {a.principal}", lambda a: {"principal": a.principal})


cmd_leave = _member_command("leave", lambda a, r: f"{r['principal']} left the workspace", lambda a: {})


cmd_transfer = _member_command(
    "transfer", lambda a, r: f"offered ownership to {a.principal} until {r['expires']};"
                             f" they accept with: deskfs accept-transfer",
    lambda a: {"principal": a.principal, "then": a.then})


cmd_accept_transfer = _member_command(
    "accept-transfer", lambda a, r: f"{r['owner']} now owns this workspace (was {r['former_owner']})", lambda a: {})


cmd_cancel_transfer = _member_command(
    "cancel-transfer", lambda a, r: f"cancelled the ownership offer to {r['principal']}", lambda a: {})


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = command("config", cmd_config, "show or (owner) change a workspace setting")
    sub.add_argument("key", help="journal.retention (30d, 12h, forever), members.own_agents (editor, viewer, off),"
                                 " versions (on, off), versions.keep (50), versions.days (30), versions.max_size"
                                 " (64MiB), versions.budget (10%%)")
    sub.add_argument("value", nargs="?")
    sub.add_argument("--mount", metavar="PATH")
    sub = command("members", cmd_members, "the workspace's members and their roles")
    sub.add_argument("--json", action="store_true")
    sub.add_argument("--mount", metavar="PATH")
    for name, handler, help, takes_principal, takes_role in (
        ("invite", cmd_invite, "(owner) make PRINCIPAL a member", True, True),
        ("role", cmd_role, "(owner) change a member's role", True, True),
        ("remove", cmd_remove, "(owner) remove a member", True, False),
        ("leave", cmd_leave, "stop being a member yourself", False, False),
        ("transfer", cmd_transfer, "(owner) offer ownership to a member for 72 hours", True, False),
        ("accept-transfer", cmd_accept_transfer, "accept the ownership offered to you", False, False),
        ("cancel-transfer", cmd_cancel_transfer, "withdraw (owner) or decline the ownership offer", False, False),
    ):
        sub = command(name, handler, help)
        if takes_principal:
            sub.add_argument("principal", help="agent:NAME or user:NAME")
        if takes_role and name == "invite":
            sub.add_argument("--role", required=True, help="editor or viewer")
            sub.add_argument("--bound-to", metavar="USER",
                             help="for an agent: the Unix user it runs as, when not yours")
        elif takes_role:
            sub.add_argument("role", help="editor or viewer")
        if name == "transfer":
            sub.add_argument("--then", default="editor", help="what you become: editor (default), viewer or leave")
        sub.add_argument("--mount", metavar="PATH")
