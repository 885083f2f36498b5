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
import math
import os
import re
import sys
import time
from typing import Any, Callable

from deskfs import mounts
from deskfs.errors import EXIT_REFUSED, EXIT_USAGE, DeskfsError
from deskfs.layout import check_is_store, control_socket_path, daemon_pid, db_path, lock_path, log_path

UNMOUNT_WAIT_SECONDS = 120


# What a terminal acts on, or what breaks or reorders a line: C0 and C1 controls, DEL, the Unicode line
# and paragraph separators, the bidirectional marks, embeddings, overrides and isolates; and lone
# surrogates (bytes of a name that is not UTF-8, which print could not even encode).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as Python decodes names (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _shown(text: object) -> str:
    """`text` safe for a human line: each control character as a visible escape (`\\n`, `\\x1b`, `\\u202e`),
    so a name can neither forge a line nor send the terminal a command. `--json` prints names exactly."""
    text = str(text)
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def _say(*parts: object, **kwargs: Any) -> None:
    """print() for every human line: what it shows goes through `_shown`."""
    print(*(_shown(part) for part in parts), **kwargs)


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
    _say(f"created a deskfs store at {os.path.abspath(args.store)}, owned by {owner}")
    _say(f"mount it with: deskfs mount {args.store} MOUNTPOINT")
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
                _say(f"deskfs: fsck repaired: {line}", file=sys.stderr)
            _say(f"deskfs: {store} mounted at {args.mountpoint} (Ctrl-C or deskfs unmount to stop)",
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
        _say(f"fsck repaired: {line}")
    _say(f"deskfs: {store} mounted at {os.path.abspath(args.mountpoint)}")
    _say(f"stop it with: deskfs unmount {args.mountpoint}")
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
    _say(f"deskfs: unmounted {mount.mountpoint}")
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
    summary: dict[str, Any] = {"mountpoint": mount.mountpoint, "store": mount.store}
    try:
        answer = _ask(mount, {"op": "status"})
    except DeskfsError as exc:
        return summary | {"error": str(exc)}
    answer.pop("ok", None)
    return summary | answer


def _print_table(rows: list[tuple[str, ...]]) -> None:
    rows = [tuple(_shown(cell) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        _say("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    chosen = [mounts.resolve_workspace(args.mount)] if args.mount else mounts.mounted()
    summaries = [_workspace_summary(m) for m in chosen]
    if _printed_as_json_or_none(summaries, args.json, "no deskfs workspace is mounted"):
        return 0
    _print_table([("MOUNTPOINT", "STORE", "FILES", "SIZE")] + [
        (s["mountpoint"], s["store"], str(s.get("files", "-")), _human_size(s["bytes"]) if "bytes" in s else "-")
        for s in summaries
    ])
    for s in summaries:
        _print_activity(s)
    return 0


def _print_activity(summary: dict[str, Any]) -> None:
    print()
    _say(f"{summary['mountpoint']}:")
    if "error" in summary:
        _say(f"  {summary['error']}")
        return
    print("  active now:" + ("" if summary["active"] else " nobody has a file open"))
    for a in summary["active"]:
        writing = f", {a['writing']} writing" if a["writing"] else ""
        _say(f"    {a['principal']}  {a['handles']} open{writing}  {', '.join(a['paths'])}")
    print("  locks:" + ("" if summary["locks"] else " none held"))
    for h in summary["locks"]:
        _say(f"    {h['path']}  {h['kind']} {h['mode']}  {h['principal']}  pid {h['pid']}  since {h['since']}")
    print("  recent changes:" + ("" if summary["recent"] else " none"))
    today = time.strftime("%Y-%m-%d")
    for record in summary["recent"]:
        _say(f"    {_record_line(record, today)}")


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
        _say(f"repaired: {line}")
    _say(f"{path}: {'repaired' if repairs else 'clean, nothing to repair'}")
    return 0


# -- agents and locks -------------------------------------------------------------------------

LOCK_XATTR = "user.deskfs.lock"
WAIT_POLL_MAX = 0.02  # seconds between tries of `deskfs lock --wait`
WAIT_FOREVER = "forever"  # what `--wait` without a number becomes (see _wait_takes_no_path)
LEASE_TTL_MAX = 24 * 3600  # seconds: what the daemon accepts (locks.MAX_TTL)
MAX_LOG_LIMIT = 10**9  # records: what the daemon accepts (journal.Query.from_json)


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
        principal = _ask(mount, {"op": "whoami"})["principal"]
    _say(principal)
    return 0


def _connect(mount: mounts.Mount, request: dict) -> Any:
    """A connection to the workspace's daemon with `request` sent; the caller closes it."""
    import socket

    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.connect(control_socket_path(mount.store))
        control.sendall(json.dumps(request).encode() + b"\n")
    except OSError as exc:
        control.close()
        raise DeskfsError(f"cannot reach the deskfs daemon of {mount.mountpoint}: {exc.strerror}") from None
    return control


def _answers(control: Any) -> Any:
    """The daemon's answer lines; a refusal becomes a DeskfsError (exit 2 for bad input, else 1)."""
    for line in control.makefile("rb"):
        try:
            answer = json.loads(line)
        except ValueError:
            raise DeskfsError(f"the deskfs daemon answered something unreadable: {line[:80]!r}") from None
        if "error" in answer:
            raise DeskfsError(answer["error"], EXIT_USAGE if answer.get("usage") else EXIT_REFUSED)
        yield answer


def _ask_on(control: Any, mount: mounts.Mount) -> dict:
    for answer in _answers(control):
        return answer
    raise DeskfsError(f"the deskfs daemon of {mount.mountpoint} closed the connection")


def _ask(mount: mounts.Mount, request: dict) -> dict:
    with _connect(mount, request) as control:
        return _ask_on(control, mount)


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
            control = sessions.enter_context(_connect(mount, request))
            _ask_on(control, mount)
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
            control = sessions.enter_context(_connect(mount, request))
            control.settimeout(SESSION_ANSWER_SECONDS)
            _ask_on(control, mount)
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
        _say(f"{h['path']}  {h['kind']} {h['mode']}  {h['principal']}  pid {h['pid']}  since {h['since']}{expiry}")
    return 0


# -- the journal ------------------------------------------------------------------------------


def _detail_words(op: str, details: dict) -> str:
    if op in ("read", "write") and "calls" in details:
        calls = details.get("calls", 0)
        return f"{calls} {op}{'s' if calls != 1 else ''}, {_human_size(details.get('bytes', 0))}"
    words = []
    for key, value in details.items():
        if value in (None, "", [], False):
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        words.append(key if value is True else f"{key} {value}")
    return ", ".join(words)


def _record_line(record: dict, today: str | None = None) -> str:
    """`12:03:04.123  agent:writer  wrote  /reports/q3.md  (3 writes, 12.4 KiB)` from a record's JSON."""
    from errno import errorcode

    from deskfs.journal import OPS

    local = time.localtime(record["time_ns"] / 1e9)
    stamp = time.strftime("%H:%M:%S", local) + f".{record['time_ns'] // 1_000_000 % 1000:03d}"
    if today is not None and time.strftime("%Y-%m-%d", local) != today:
        stamp = time.strftime("%Y-%m-%d ", local) + stamp
    op = record["op"]
    verb = f"DENIED {op}" if record["denied"] else OPS.get(op, op)
    where = record["path"] or (f"inode {record['inode']}" if record["inode"] else "")
    if record["path2"]:
        where += f" -> {record['path2']}"
    words = _detail_words(op, dict(record["details"] or {}))
    if record["denied"]:
        name = errorcode.get(record["errno"], str(record["errno"]))
        words = name + (f": {words}" if words else "")
    line = "  ".join(part for part in (stamp, record["principal"], verb, where) if part)
    return _shown(line + (f"  ({words})" if words else ""))




def _journal_query(args: argparse.Namespace, mount: mounts.Mount | None) -> dict:
    """The query the filters of `deskfs log` ask for; a one-line usage error for any that cannot be read."""
    from deskfs.access import Refused, check_principal
    from deskfs.journal import DAEMON_PRINCIPAL, OPS, parse_time

    now = time.time_ns()
    query: dict[str, Any] = {"limit": args.limit}
    for name in ("since", "until"):
        text = getattr(args, name)
        if text is not None:
            moment = parse_time(text, now)
            if moment is None:
                raise DeskfsError(f"cannot read --{name} {text!r}: give a duration ago (30s, 10m, 2h,"
                                  " 3d; at most 292 years) or a time from 1678 to 2262 (2026-11-25T12:00,"
                                  " 2026-11-25 12:00:00)", EXIT_USAGE)
            query[f"{name}_ns"] = moment
    principals = [f"agent:{a}" for a in args.agent] + list(args.principal)
    try:
        query["principals"] = [p if p == DAEMON_PRINCIPAL else check_principal(p) for p in principals]
    except Refused as exc:
        raise DeskfsError(str(exc), EXIT_USAGE) from None
    ops = [op.strip() for spec in args.op for op in spec.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise DeskfsError(f"unknown operation {unknown[0]!r} (known: {', '.join(sorted(OPS))})", EXIT_USAGE)
    query["ops"] = ops
    query["denied"] = args.denied
    if not 0 <= args.limit <= MAX_LOG_LIMIT:
        raise DeskfsError(f"--limit must be 0 (everything) or a number of records up to {MAX_LOG_LIMIT}",
                          EXIT_USAGE)
    if args.path is not None:
        from deskfs.journal import journal_text

        # The journal keeps names that are not UTF-8 with backslash escapes (`\xff`): so does the pattern.
        query["path_glob"] = journal_text(_workspace_glob(args.path, mount))
    return query


def _workspace_glob(pattern: str, mount: mounts.Mount | None) -> str:
    """A path pattern as the journal names paths: from the workspace's root.

    A pattern inside the mount (absolute, or relative to a current folder inside it) is taken from
    there; one starting with `/` elsewhere is already from the workspace's root.
    """
    if mount is None:
        return pattern if pattern.startswith("/") else "/" + pattern
    absolute = os.path.join(os.getcwd(), pattern) if not pattern.startswith("/") else pattern
    absolute = os.path.normpath(absolute)
    root = mount.mountpoint.rstrip("/")
    if absolute == root or absolute.startswith(root + "/"):
        return absolute[len(root):] or "/"
    return pattern if pattern.startswith("/") else "/" + pattern


def _log_source(args: argparse.Namespace) -> tuple[mounts.Mount | None, str | None]:
    """(the mount to ask, or None and the unmounted store to read directly)."""
    if args.store is not None:
        store = os.path.abspath(args.store)
        check_is_store(store)
        mounted = mounts.mount_of_store(store)
        return (mounted, None) if mounted is not None else (None, store)
    return mounts.resolve_workspace(args.mount), None


def _read_store_directly(store: str, work: Callable[[Any], Any]) -> Any:
    import sqlite3

    from deskfs.store.meta import connect_read_only

    if not os.access(db_path(store), os.R_OK):
        raise DeskfsError(f"cannot read the journal of {store}: while it is unmounted only its Unix owner can"
                          " (mount it to read through the daemon)")
    conn = connect_read_only(db_path(store))
    try:
        return work(conn)
    except sqlite3.DatabaseError as exc:
        raise DeskfsError(f"cannot read the journal of {store}: {exc}") from None
    finally:
        conn.close()


def cmd_log(args: argparse.Namespace) -> int:
    mount, store = _log_source(args)
    if args.verify:
        return _verify(mount, store)
    query = _journal_query(args, mount)
    if store is not None:
        if args.follow:
            raise DeskfsError(f"{store} is not mounted: nothing new can happen in it (mount it to follow)")
        from deskfs import journal

        def show(conn: Any) -> None:
            for record in journal.query(conn, journal.Query.from_json(query)):
                _print_record(record.as_json(), args.json)
        _read_store_directly(store, show)
        return 0
    with _connect(mount, {"op": "log", "query": query, "follow": args.follow}) as control:
        try:
            for answer in _answers(control):
                if "record" in answer:
                    _print_record(answer["record"], args.json)
        except KeyboardInterrupt:
            return 0  # --follow runs until interrupted: that is its normal end
    return 0


def _print_record(record: dict, as_json: bool) -> None:
    print(json.dumps(record) if as_json else _record_line(record, time.strftime("%Y-%m-%d")), flush=True)


def _verify(mount: mounts.Mount | None, store: str | None) -> int:
    if store is not None:
        from deskfs import journal

        try:
            head = journal.load_head(store)  # before the database is read: it names no record it lacks
        except PermissionError:
            raise DeskfsError(f"cannot read the journal key of {store}: only the store's Unix owner can verify it"
                              " while it is unmounted") from None
        verdict = _read_store_directly(store, lambda conn: journal.verify(conn, head)).as_json()
    else:
        verdict = _ask(mount, {"op": "verify"})
    if verdict["broken_seq"] is not None:
        raise DeskfsError(f"journal verification FAILED after {verdict['checked']} good records: {verdict['reason']}")
    _say(f"journal verified: {verdict['checked']} records, hash chain intact; {_head_words(verdict)}")
    return 0


def _head_words(verdict: dict) -> str:
    """What `--verify` says about the signed head it checked the chain against."""
    head, note = verdict.get("head_seq"), verdict.get("head_note")
    if head is None:
        return f"no signed head ({note or 'the newest records are not vouched for'})"
    newer = verdict.get("last_seq", head) - head
    words = f"signed head: record {head}"
    if newer > 0:
        words += f" ({newer} newer record{'s' if newer != 1 else ''} not yet covered by it)"
    return words + (f"; {note}" if note else "")


# -- settings, members and ownership ----------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    mount = mounts.resolve_workspace(args.mount)
    request = {"op": "config", "key": args.key} | ({"value": args.value} if args.value is not None else {})
    answer = _ask(mount, request)
    _say(f"{answer['key']} = {answer['value'] if answer['value'] is not None else '(default)'}")
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    from deskfs.journal import iso_time

    answer = _ask(mounts.resolve_workspace(args.mount), {"op": "members"})
    if args.json:
        answer.pop("ok", None)
        print(json.dumps(answer, indent=2))
        return 0
    _print_table([("PRINCIPAL", "ROLE", "SINCE", "ADDED BY")] + [
        (m["principal"], m["role"], iso_time(m["since_ns"])[:19], m["added_by"]) for m in answer["members"]])
    if answer["own_agents"] != "off":
        _say(f"(the owner's Unix user and its agents are {answer['own_agents']}s unless listed otherwise)")
    offer = answer["offer"]
    if offer is not None:
        _say(f"ownership offered to {offer['principal']} (then {offer['then_role']}), expires {offer['expires']}")
    return 0


def _member_command(op: str, message: Callable[[argparse.Namespace, dict], str],
                    fields: Callable[[argparse.Namespace], dict]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        answer = _ask(mounts.resolve_workspace(args.mount), {"op": op} | fields(args))
        _say(message(args, answer))
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

    sub = command("log", cmd_log, "the audit journal: who did what, when (newest 100 unless --limit)")
    sub.add_argument("--since", metavar="WHEN", help="10m, 2h, 3d ago, or an ISO time")
    sub.add_argument("--until", metavar="WHEN")
    sub.add_argument("--agent", action="append", default=[], metavar="NAME", help="only agent:NAME (repeatable)")
    sub.add_argument("--principal", action="append", default=[], metavar="P", help="only P, e.g. user:alice")
    sub.add_argument("--path", metavar="GLOB", help="only paths matching GLOB (* within a folder, ** across)")
    sub.add_argument("--op", action="append", default=[], metavar="OP,...", help="only these operations")
    sub.add_argument("--denied", action="store_true", help="only refused requests")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.add_argument("--limit", type=int, default=100, metavar="N", help="the newest N records (0: all)")
    sub.add_argument("--follow", "-f", action="store_true", help="keep printing new records until interrupted")
    sub.add_argument("--verify", action="store_true", help="check the journal's hash chain")
    sub.add_argument("--mount", metavar="PATH", help="the workspace holding PATH")
    sub.add_argument("--store", metavar="STORE", help="a store, mounted or not")

    sub = command("config", cmd_config, "show or (owner) change a workspace setting")
    sub.add_argument("key", help="journal.retention (30d, 12h, forever) or members.own_agents (editor, viewer, off)")
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
    return parser


def _wait_takes_no_path(argv: list[str]) -> list[str]:
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
        args = build_parser().parse_args(_wait_takes_no_path(sys.argv[1:] if argv is None else argv))
        return args.handler(args)
    except DeskfsError as exc:
        _say(f"deskfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        _say(f"deskfs: {exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}", file=sys.stderr)
        return EXIT_REFUSED
