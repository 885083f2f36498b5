"""`deskfs init`, `mount`, `unmount`, `status`, `fsck`: making, mounting and checking workspaces.

Owns starting the daemon in the background (and waiting for its word that the mount is ready), the
unmount handshake, and the human form of `deskfs status`.
Must never: write a store's database behind a running daemon (fsck refuses a mounted store).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

from deskfs import mounts
from deskfs.errors import EXIT_USAGE, DeskfsError
from deskfs.layout import check_is_store, daemon_pid, lock_path, log_path
from deskfs.cli.common import ask, ask_on, connect, human_size, print_table, printed_as_json_or_none, say
from deskfs.cli.log import record_line


UNMOUNT_WAIT_SECONDS = 120


def _own_principal() -> str:
    """Who runs this command, by the mount's rules for a process outside any `deskfs run` session."""
    from deskfs.identity import is_agent_name, user_principal

    agent = os.environ.get("DESKFS_AGENT")
    return f"agent:{agent}" if agent and is_agent_name(agent) else user_principal(os.getuid())


def cmd_init(args: argparse.Namespace) -> int:
    from deskfs.access import Refused, check_principal, uid_of_user_principal
    from deskfs.store import init_store

    try:
        owner = check_principal(args.owner) if args.owner else _own_principal()
    except Refused as exc:
        raise DeskfsError(str(exc), EXIT_USAGE) from None
    if owner.startswith("user:") and uid_of_user_principal(owner) is None:
        raise DeskfsError(f"there is no Unix user {owner[5:]!r} on this host to own the workspace", EXIT_USAGE)
    init_store(args.store, os.getuid(), os.getgid(), owner)
    say(f"created a deskfs store at {os.path.abspath(args.store)}, owned by {owner}")
    say(f"mount it with: deskfs mount {args.store} MOUNTPOINT")
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
                say(f"deskfs: fsck repaired: {line}", file=sys.stderr)
            say(f"deskfs: {store} mounted at {args.mountpoint} (Ctrl-C or deskfs unmount to stop)",
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
        say(f"fsck repaired: {line}")
    say(f"deskfs: {store} mounted at {os.path.abspath(args.mountpoint)}")
    say(f"stop it with: deskfs unmount {args.mountpoint}")
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    import subprocess

    mount = mounts.mount_at(args.mountpoint)
    if mount is None:
        raise DeskfsError(f"{args.mountpoint} is not a deskfs mount")
    daemon = daemon_pid(mount.store)
    control = _daemon_lets_go(mount)  # its own descriptors on the mount (leases' kernel locks) make it busy
    try:
        result = subprocess.run(["fusermount3", "-u", mount.mountpoint], capture_output=True, text=True)
    finally:
        if control is not None:
            control.close()  # if the unmount failed, the daemon takes its locks again
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unknown error"
        raise DeskfsError(f"cannot unmount {mount.mountpoint}: {reason} (is a file or folder in it still in use?)")
    _wait_for_daemon(mount.store, daemon)
    say(f"deskfs: unmounted {mount.mountpoint}")
    return 0


def _daemon_lets_go(mount: mounts.Mount) -> Any:
    """A connection on which the daemon has closed its own descriptors on the mount and keeps them
    closed while it is open; None if there is no daemon to ask (it is gone or does not answer)."""
    try:
        control = connect(mount, {"op": "unmounting"})
    except DeskfsError:
        return None
    try:
        control.settimeout(UNMOUNT_WAIT_SECONDS)
        ask_on(control, mount)
    except (DeskfsError, OSError):
        control.close()
        return None
    return control


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


def _workspace_summary(mount: mounts.Mount) -> dict[str, Any]:
    summary: dict[str, Any] = {"mountpoint": mount.mountpoint, "store": mount.store}
    try:
        answer = ask(mount, {"op": "status"})
    except DeskfsError as exc:
        return summary | {"error": str(exc)}
    answer.pop("ok", None)
    return summary | answer


def cmd_status(args: argparse.Namespace) -> int:
    chosen = [mounts.resolve_workspace(args.mount)] if args.mount else mounts.mounted()
    summaries = [_workspace_summary(m) for m in chosen]
    if printed_as_json_or_none(summaries, args.json, "no deskfs workspace is mounted"):
        return 0
    print_table([("MOUNTPOINT", "STORE", "FILES", "SIZE")] + [
        (s["mountpoint"], s["store"], str(s.get("files", "-")), human_size(s["bytes"]) if "bytes" in s else "-")
        for s in summaries
    ])
    for s in summaries:
        _print_activity(s)
    return 0


def _print_activity(summary: dict[str, Any]) -> None:
    print()
    say(f"{summary['mountpoint']}:")
    if "error" in summary:
        say(f"  {summary['error']}")
        return
    print("  active now:" + ("" if summary["active"] else " nobody has a file open"))
    for a in summary["active"]:
        writing = f", {a['writing']} writing" if a["writing"] else ""
        say(f"    {a['principal']}  {a['handles']} open{writing}  {', '.join(a['paths'])}")
    print("  locks:" + ("" if summary["locks"] else " none held"))
    for h in summary["locks"]:
        say(f"    {h['path']}  {h['kind']} {h['mode']}  {h['principal']}  pid {h['pid']}  since {h['since']}")
    print("  recent changes:" + ("" if summary["recent"] else " none"))
    today = time.strftime("%Y-%m-%d")
    for record in summary["recent"]:
        say(f"    {record_line(record, today)}")


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
        say(f"repaired: {line}")
    say(f"{path}: {'repaired' if repairs else 'clean, nothing to repair'}")
    return 0


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = command("init", cmd_init, "create a workspace store")
    sub.add_argument("store")
    sub.add_argument("--owner", metavar="PRINCIPAL",
                     help="the owner (agent:NAME or user:NAME; default: whoever runs this, by DESKFS_AGENT or user)")
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
