"""The `deskfs` command: parses arguments, calls the daemon or the store, prints.

Owns what a user reads: one line per error (exit 2 for usage, 1 for a refusal), tables for people and
`--json` for programs.
Must never: print a traceback for anything a user did; write the database behind a running daemon.
"""

from __future__ import annotations

# Agents run `deskfs lock`/`unlock` in loops: the modules only some commands need (the store, SQLite,
# sockets, subprocesses, logging) are imported inside those commands, which halves start-up time.
import argparse
import errno
import json
import os
import sys
import time
from typing import Any, Callable

from deskfs import mounts
from deskfs.errors import EXIT_REFUSED, EXIT_USAGE, DeskfsError
from deskfs.layout import check_is_store, control_socket_path, daemon_pid, db_path, lock_path, log_path

UNMOUNT_WAIT_SECONDS = 120


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for every usage error
        raise DeskfsError(f"{message} (see: {self.prog} --help)", EXIT_USAGE)


def _human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- init, mount, unmount ---------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from deskfs.store import init_store

    init_store(args.store, os.getuid(), os.getgid())
    print(f"created a deskfs store at {os.path.abspath(args.store)}")
    print(f"mount it with: deskfs mount {args.store} MOUNTPOINT")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    store = os.path.abspath(args.store)
    check_is_store(store)
    if args.foreground:
        return _mount_foreground(args, store)
    return _mount_background(args, store)


def _mount_foreground(args: argparse.Namespace, store: str) -> int:
    import logging

    from deskfs.mount import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ready_fd = args.ready_fd

    def ready(repairs: list[str]) -> None:
        if ready_fd is None:
            for line in repairs:
                print(f"deskfs: fsck repaired: {line}", file=sys.stderr)
            print(f"deskfs: {store} mounted at {args.mountpoint} (Ctrl-C or deskfs unmount to stop)",
                  file=sys.stderr)
            return
        with os.fdopen(ready_fd, "w") as channel:
            channel.write("ok\n" + "".join(f"{line}\n" for line in repairs))

    try:
        serve(store, args.mountpoint, args.allow_other, ready, busy_poll_us=args.busy_poll_us)
    except DeskfsError as exc:
        if ready_fd is None:
            raise
        with os.fdopen(ready_fd, "w") as channel:
            channel.write(f"error {exc.exit_code} {exc}\n")
        return exc.exit_code
    return 0


def _mount_background(args: argparse.Namespace, store: str) -> int:
    import subprocess

    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "deskfs", "mount", "--foreground", "--ready-fd", str(write_end)]
    if args.allow_other:
        command.append("--allow-other")
    command += ["--busy-poll-us", str(args.busy_poll_us)]
    command += [store, args.mountpoint]
    os.makedirs(os.path.dirname(log_path(store)), exist_ok=True)
    with open(log_path(store), "ab") as daemon_log:
        subprocess.Popen(command, pass_fds=(write_end,), start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=daemon_log, stderr=daemon_log)
    os.close(write_end)
    with os.fdopen(read_end) as channel:
        answer = channel.read().splitlines()
    if not answer:
        raise DeskfsError(f"the deskfs daemon died while mounting; see {log_path(store)}")
    status, *details = answer
    if status.startswith("error "):
        _, code, message = status.split(" ", 2)
        raise DeskfsError(message, int(code))
    for line in details:
        print(f"fsck repaired: {line}")
    print(f"deskfs: {store} mounted at {os.path.abspath(args.mountpoint)}")
    print(f"stop it with: deskfs unmount {args.mountpoint}")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    import subprocess

    mount = mounts.mount_at(args.mountpoint)
    if mount is None:
        raise DeskfsError(f"{args.mountpoint} is not a deskfs mount")
    daemon = daemon_pid(mount.store)
    result = subprocess.run(["fusermount3", "-u", mount.mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unknown error"
        raise DeskfsError(f"cannot unmount {mount.mountpoint}: {reason} (is a file or folder in it still in use?)")
    _wait_for_daemon(mount.store, daemon)
    print(f"deskfs: unmounted {mount.mountpoint}")
    return 0


def _wait_for_daemon(store: str, pid: int | None) -> None:
    """Block until the daemon has closed the store and exited (then nothing of it holds the store's disk)."""
    import fcntl
    import signal

    def too_slow(signum: int, frame: Any) -> None:
        raise DeskfsError(f"unmounted, but the daemon of {store} has not finished after {UNMOUNT_WAIT_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(UNMOUNT_WAIT_SECONDS)
    try:
        fd = os.open(lock_path(store), os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # released when the daemon has committed and closed the store
        finally:
            os.close(fd)
        if pid is not None:
            _wait_for_exit(pid)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _wait_for_exit(pid: int) -> None:
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [])  # a pidfd becomes readable when its process exits
    finally:
        os.close(pidfd)


# -- status and fsck --------------------------------------------------------------------------


def _printed_as_json_or_none(items: list[dict], as_json: bool, none_message: str) -> bool:
    """Print a listing as JSON, or say there is nothing; False when a table is still to be printed."""
    if as_json:
        print(json.dumps(items, indent=2))
    elif not items:
        print(none_message)
    return as_json or not items


def _workspace_summary(mount: mounts.Mount) -> dict[str, Any]:
    import sqlite3

    from deskfs.store.meta import Meta

    conn = sqlite3.connect(f"file:{db_path(mount.store)}?mode=ro", uri=True)
    try:
        files, size = Meta(conn).totals()
    finally:
        conn.close()
    return {"mountpoint": mount.mountpoint, "store": mount.store, "files": files, "bytes": size}


def cmd_status(args: argparse.Namespace) -> int:
    chosen = [mounts.resolve_workspace(args.mount)] if args.mount else mounts.mounted()
    summaries = [_workspace_summary(m) for m in chosen]
    if _printed_as_json_or_none(summaries, args.json, "no deskfs workspace is mounted"):
        return 0
    rows = [("MOUNTPOINT", "STORE", "FILES", "SIZE")] + [
        (s["mountpoint"], s["store"], str(s["files"]), _human_size(s["bytes"])) for s in summaries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from deskfs.store import Store
    from deskfs.store.fsck import fsck

    path = os.path.abspath(args.store)
    check_is_store(path)
    mounted = mounts.mount_of_store(path)
    if mounted is not None:
        raise DeskfsError(f"{path} is mounted at {mounted.mountpoint}; unmount it before fsck")
    store = Store(path)
    try:
        repairs = fsck(store)
    finally:
        store.close(clean=True)
    for line in repairs:
        print(f"repaired: {line}")
    print(f"{path}: {'repaired' if repairs else 'clean, nothing to repair'}")
    return 0


# -- agents and locks -------------------------------------------------------------------------

LOCK_XATTR = "user.deskfs.lock"
WAIT_POLL_MAX = 0.02  # seconds between tries of `deskfs lock --wait`


def cmd_whoami(args: argparse.Namespace) -> int:
    mount = mounts.resolve_workspace(args.mount)
    print(os.getxattr(mount.mountpoint, "user.deskfs.whoami").decode())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import socket
    import subprocess

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise DeskfsError("no command given (deskfs run --agent NAME -- COMMAND ...)", EXIT_USAGE)
    mount = mounts.resolve_workspace(args.mount)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        try:
            control.connect(control_socket_path(mount.store))
        except OSError as exc:
            raise DeskfsError(f"cannot reach the deskfs daemon of {mount.mountpoint}: {exc.strerror}") from None
        control.sendall(json.dumps({"op": "session", "agent": args.agent}).encode() + b"\n")
        answer = json.loads(control.makefile("rb").readline() or b'{"error": "the daemon closed the connection"}')
        if "error" in answer:
            raise DeskfsError(answer["error"])
        try:
            returncode = subprocess.run(command).returncode
        except FileNotFoundError:
            raise DeskfsError(f"command not found: {command[0]}", 127) from None
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as shells say


def _lock_holders(path: str) -> str:
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
    value = f"{'shared' if args.shared else 'exclusive'} ttl={args.ttl}" + ("" if args.renew else " new")
    deadline = None if args.wait is None else time.monotonic() + args.wait
    pause = 0.002
    while True:
        try:
            os.setxattr(path, LOCK_XATTR, value.encode())
            return 0
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise DeskfsError(f"invalid lock request ({value})", EXIT_USAGE) from None
            if exc.errno != errno.EBUSY:
                raise
        if deadline is None or time.monotonic() >= deadline:
            waited = "" if deadline is None else f" (waited {args.wait:g} s)"
            raise DeskfsError(f"{path} is locked by {_lock_holders(path)}{waited}")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, WAIT_POLL_MAX)


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
            raise DeskfsError(f"{path} is locked by {_lock_holders(path)}, not by you") from None
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
    if _printed_as_json_or_none(held, args.json, "no locks held"):
        return 0
    for h in held:
        expiry = f"  expires {h['expires']}" if h["expires"] else ""
        print(f"{h['path']}  {h['kind']} {h['mode']}  {h['principal']}  pid {h['pid']}  since {h['since']}{expiry}")
    return 0


# -- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deskfs", description="A shared desk for a team of agents: a FUSE workspace.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("init", cmd_init, "create a workspace store")
    sub.add_argument("store")

    sub = command("mount", cmd_mount, "mount a workspace store at an empty folder")
    sub.add_argument("store")
    sub.add_argument("mountpoint")
    sub.add_argument("--foreground", "-f", action="store_true", help="serve in this process until unmounted")
    sub.add_argument("--allow-other", action="store_true", help="let other Unix users use the mount")
    sub.add_argument("--busy-poll-us", type=int, default=0, metavar="US",
                     help="after each request, poll for the next one for US microseconds before sleeping"
                          " (faster bursts of small requests, at the cost of a busy core; default 0: off)")
    sub.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    sub = command("unmount", cmd_unmount, "unmount a workspace and wait for its daemon to finish")
    sub.add_argument("mountpoint")

    sub = command("status", cmd_status, "mounted workspaces: store, file count, size")
    sub.add_argument("--mount", metavar="PATH", help="only the workspace holding PATH")
    sub.add_argument("--json", action="store_true")

    sub = command("fsck", cmd_fsck, "check and repair an unmounted store")
    sub.add_argument("store")

    sub = command("whoami", cmd_whoami, "the principal the mount sees for this process")
    sub.add_argument("--mount", metavar="PATH")

    sub = command("run", cmd_run, "run a command (and everything it starts) as an agent")
    sub.add_argument("--agent", required=True, metavar="NAME")
    sub.add_argument("--mount", metavar="PATH")
    sub.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")

    sub = command("lock", cmd_lock, "take (or renew) a lease on a file or folder")
    sub.add_argument("path")
    sub.add_argument("--shared", action="store_true", help="a shared lease (default: exclusive)")
    sub.add_argument("--ttl", type=int, default=300, metavar="SECONDS", help="expiry (default 300, at most 86400)")
    sub.add_argument("--wait", type=float, nargs="?", const=float("inf"), metavar="SECONDS",
                     help="wait until the lease can be taken (for at most SECONDS)")
    sub.add_argument("--renew", action="store_true", help="renew a lease this principal already holds")

    sub = command("unlock", cmd_unlock, "release your lease (--force: break every lease; owner only)")
    sub.add_argument("path")
    sub.add_argument("--force", action="store_true")

    sub = command("locks", cmd_locks, "every lock held in the workspace (or under PATH)")
    sub.add_argument("path", nargs="?")
    sub.add_argument("--json", action="store_true")
    return parser


def _wait_takes_no_path(argv: list[str]) -> list[str]:
    """`deskfs lock --wait PATH`: --wait takes a number of seconds only when one follows it."""
    fixed = list(argv)
    for i, word in enumerate(fixed[:-1]):
        if word == "--wait":
            try:
                float(fixed[i + 1])
            except ValueError:
                fixed[i] = "--wait=inf"
    return fixed


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(_wait_takes_no_path(sys.argv[1:] if argv is None else argv))
        return args.handler(args)
    except DeskfsError as exc:
        print(f"deskfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"deskfs: {exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return EXIT_REFUSED
