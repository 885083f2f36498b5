"""`deskfs log`: the audit journal for people (one escaped line per record) and programs (`--json`).

Owns turning the command's filters into the daemon's query (validated: a one-line error, exit 2, for
anything that cannot be read), the human record line, `--follow`, and `--verify`'s verdict.
Must never: read a mounted store's database directly (the daemon filters what the caller may see).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

from deskfs import mounts
from deskfs.errors import EXIT_USAGE, DeskfsError
from deskfs.layout import check_is_store, db_path
from deskfs.cli.common import answers, ask, connect, human_size, say, shown


MAX_LOG_LIMIT = 10**9  # records: what the daemon accepts (journal.Query.from_json)


def _detail_words(op: str, details: dict) -> str:
    if op in ("read", "write") and "calls" in details:
        calls = details.get("calls", 0)
        return f"{calls} {op}{'s' if calls != 1 else ''}, {human_size(details.get('bytes', 0))}"
    words = []
    for key, value in details.items():
        if value in (None, "", [], False):
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        words.append(key if value is True else f"{key} {value}")
    return ", ".join(words)


def record_line(record: dict, today: str | None = None) -> str:
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
    return shown(line + (f"  ({words})" if words else ""))


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
    with connect(mount, {"op": "log", "query": query, "follow": args.follow}) as control:
        try:
            for answer in answers(control):
                if "record" in answer:
                    _print_record(answer["record"], args.json)
        except KeyboardInterrupt:
            return 0  # --follow runs until interrupted: that is its normal end
    return 0


def _print_record(record: dict, as_json: bool) -> None:
    print(json.dumps(record) if as_json else record_line(record, time.strftime("%Y-%m-%d")), flush=True)


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
        verdict = ask(mount, {"op": "verify"})
    if verdict["broken_seq"] is not None:
        raise DeskfsError(f"journal verification FAILED after {verdict['checked']} good records: {verdict['reason']}")
    say(f"journal verified: {verdict['checked']} records, hash chain intact; {_head_words(verdict)}")
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


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
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
