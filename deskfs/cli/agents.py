"""`deskfs whoami`, `run`, `lock`, `unlock`, `locks`: identities and locks from the CLI.

Owns registering `deskfs run` sessions (with their token in COMMAND's environment), the `--wait` loop
of `deskfs lock`, and printing lock holders. Leases are taken and released through the mount's
`user.deskfs.lock` xattr, so the kernel and the daemon check the caller exactly as for setfattr.
Must never: claim an identity for the caller (the daemon decides it from the kernel's word).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import time
from typing import Any, Callable

from deskfs import mounts
from deskfs.errors import EXIT_REFUSED, EXIT_USAGE, DeskfsError
from deskfs.cli.common import ask, ask_on, connect, printed_as_json_or_none, say


LOCK_XATTR = "user.deskfs.lock"


WAIT_POLL_MAX = 0.02  # seconds between tries of `deskfs lock --wait`


WAIT_FOREVER = "forever"  # what `--wait` without a number becomes (see wait_takes_no_path)


LEASE_TTL_MAX = 24 * 3600  # seconds: what the daemon accepts (locks.MAX_TTL)


def _wait_seconds(text: str) -> float:
    """`--wait SECONDS`: a finite number, 0 or more; `--wait` alone waits as long as it takes."""
    if text == WAIT_FOREVER:
        return math.inf
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"give a number of seconds, 0 or more, not {text!r}"
                                         " (--wait alone waits as long as it takes)")
    return seconds


def _ttl_seconds(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        ttl = 0
    if not 1 <= ttl <= LEASE_TTL_MAX:
        raise argparse.ArgumentTypeError(f"give a whole number of seconds from 1 to {LEASE_TTL_MAX}, not {text!r}")
    return ttl


def cmd_whoami(args: argparse.Namespace) -> int:
    mount = mounts.resolve_workspace(args.mount)
    try:
        principal = os.getxattr(mount.mountpoint, "user.deskfs.whoami").decode()
    except PermissionError:  # a non-member may not read the root: the daemon still says who it is
        principal = ask(mount, {"op": "whoami"})["principal"]
    say(principal)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import subprocess

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise DeskfsError("no command given (deskfs run --agent NAME -- COMMAND ...)", EXIT_USAGE)
    from deskfs.identity import is_agent_name

    if not is_agent_name(args.agent):  # bad input, before asking any daemon
        raise DeskfsError(f"invalid agent name {args.agent!r} (1-64 characters of A-Z a-z 0-9 . _ -)", EXIT_USAGE)
    import secrets
    from contextlib import ExitStack

    # The token goes to every process the command starts, in its environment: a descendant whose parent
    # exited (a server started with nohup) is still known as the agent. Only processes of this Unix user
    # count by it (the daemon checks), and only while the session lasts.
    token = secrets.token_hex(16)
    request = {"op": "session", "agent": args.agent, "token": token}
    with ExitStack() as sessions:  # each session lasts while its connection is open
        if args.mount is not None or mounts.containing(os.getcwd()) is not None:
            mount = mounts.resolve_workspace(args.mount)
            control = sessions.enter_context(connect(mount, request))
            ask_on(control, mount)
        else:
            _sessions_everywhere(request, sessions)
        tokens = [t for t in os.environ.get("DESKFS_SESSION", "").split(",") if t] + [token]
        try:
            returncode = subprocess.run(command, env=os.environ | {"DESKFS_SESSION": ",".join(tokens)}).returncode
        except FileNotFoundError:
            raise DeskfsError(f"command not found: {command[0]}", 127) from None
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as shells say


SESSION_ANSWER_SECONDS = 10.0  # outside any mount, a daemon that has not answered by then is passed over


def _sessions_everywhere(request: dict, sessions: Any) -> None:
    """`deskfs run` outside any mount: a session with every mounted workspace whose daemon accepts one.

    Those that cannot be reached (another user's folders, a daemon that is gone) or refuse are passed
    over; a one-line error only when none accepted, naming the first refusal.
    """
    refusals: list[DeskfsError] = []
    accepted = 0
    for mount in mounts.mounted():
        try:
            control = sessions.enter_context(connect(mount, request))
            control.settimeout(SESSION_ANSWER_SECONDS)
            ask_on(control, mount)
            control.settimeout(None)
            accepted += 1
        except DeskfsError as exc:
            refusals.append(DeskfsError(f"{mount.mountpoint}: {exc}", exc.exit_code))
        except OSError as exc:  # no answer in time
            refusals.append(DeskfsError(f"{mount.mountpoint}: the daemon did not answer ({exc})"))
    if accepted:
        return
    if not refusals:
        raise DeskfsError("no deskfs workspace is mounted (mount one, or pass --mount PATH)", EXIT_USAGE)
    more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
    usage = all(r.exit_code == EXIT_USAGE for r in refusals)
    raise DeskfsError(f"no mounted workspace accepted the session: {refusals[0]}{more}",
                      EXIT_USAGE if usage else EXIT_REFUSED)


def lock_holders(path: str) -> str:
    try:
        lines = os.getxattr(path, LOCK_XATTR).decode().splitlines()
    except OSError:
        return "someone"
    return "; ".join(" ".join(line.split()[:3]) for line in lines)


def _workspace_path(path: str) -> str:
    mounts.resolve_workspace(path)  # a one-line error, exit 2, outside any mount
    return path


def cmd_lock(args: argparse.Namespace) -> int:
    path = _workspace_path(args.path)
    kind = _unleasable_kind(path)
    if kind is not None:  # the kernel refuses user.* attributes on these (EPERM) before the daemon sees them
        raise DeskfsError(f"invalid lock request: {path} is {kind}, which cannot be leased "
                          "(only regular files and folders can)", EXIT_USAGE)
    value = f"{'shared' if args.shared else 'exclusive'} ttl={args.ttl}" + ("" if args.renew else " new")
    deadline = None if args.wait is None else time.monotonic() + args.wait
    pause = 0.002
    while True:
        try:
            os.setxattr(path, LOCK_XATTR, value.encode())
            return 0
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise DeskfsError(f"invalid lock request ({value}; only regular files and folders can be leased)",
                                  EXIT_USAGE) from None
            if exc.errno != errno.EBUSY:
                raise
        if deadline is None or time.monotonic() >= deadline:
            waited = "" if deadline is None else f" (waited {args.wait:g} s)"
            raise DeskfsError(f"{path} is locked by {lock_holders(path)}{waited}")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, WAIT_POLL_MAX)


def _unleasable_kind(path: str) -> str | None:
    """What `path` is if it cannot be leased (a FIFO, a device node, a socket); None otherwise."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # setxattr will say what is wrong
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def cmd_unlock(args: argparse.Namespace) -> int:
    path = _workspace_path(args.path)
    try:
        if args.force:
            os.setxattr(path, LOCK_XATTR, b"break")
        else:
            os.removexattr(path, LOCK_XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            raise DeskfsError(f"{path} has no lease to release") from None
        if exc.errno == errno.EPERM and args.force:
            raise DeskfsError("only the workspace owner may break a lease") from None
        if exc.errno == errno.EPERM:
            raise DeskfsError(f"{path} is locked by {lock_holders(path)}, not by you") from None
        raise
    return 0


def cmd_locks(args: argparse.Namespace) -> int:
    mount = mounts.resolve_workspace(args.path)
    held = json.loads(os.getxattr(mount.mountpoint, "user.deskfs.locks"))
    if args.path:
        inside = "/" + os.path.relpath(os.path.abspath(args.path), mount.mountpoint)
        inside = "/" if inside == "/." else inside
        held = [h for h in held if h["path"] == inside or h["path"].startswith(inside.rstrip("/") + "/")]
    for h in held:
        h["path"] = os.path.join(mount.mountpoint, h["path"].lstrip("/"))
    if printed_as_json_or_none(held, args.json, "no locks held"):
        return 0
    for h in held:
        expiry = f"  expires {h['expires']}" if h["expires"] else ""
        say(f"{h['path']}  {h['kind']} {h['mode']}  {h['principal']}  pid {h['pid']}  since {h['since']}{expiry}")
    return 0


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = command("whoami", cmd_whoami, "the principal the mount sees for this process")
    sub.add_argument("--mount", metavar="PATH")
    sub = command("run", cmd_run, "run a command (and everything it starts) as an agent")
    sub.add_argument("--agent", required=True, metavar="NAME")
    sub.add_argument("--mount", metavar="PATH")
    sub.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    sub = command("lock", cmd_lock, "take (or renew) a lease on a file or folder")
    sub.add_argument("path")
    sub.add_argument("--shared", action="store_true", help="a shared lease (default: exclusive)")
    sub.add_argument("--ttl", type=_ttl_seconds, default=300, metavar="SECONDS",
                     help=f"expiry (default 300, at most {LEASE_TTL_MAX})")
    sub.add_argument("--wait", type=_wait_seconds, nargs="?", const=math.inf, metavar="SECONDS",
                     help="wait until the lease can be taken: for at most SECONDS, or without SECONDS as long as"
                          " it takes")
    sub.add_argument("--renew", action="store_true", help="renew a lease this principal already holds")
    sub = command("unlock", cmd_unlock, "release your lease (--force: break every lease; owner only)")
    sub.add_argument("path")
    sub.add_argument("--force", action="store_true")
    sub = command("locks", cmd_locks, "every lock held in the workspace (or under PATH)")
    sub.add_argument("path", nargs="?")
    sub.add_argument("--json", action="store_true")
