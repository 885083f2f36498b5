"""The audit journal: every open, read, write, change, lock and refusal, hash-chained, in SQLite.

Owns the `journal` and `journal_paths` tables, the record format, coalescing reads and writes per
file handle, the hash chain and its verification, retention, and queries.

Records are appended to memory and written by `flush`, which `Store.commit` calls inside the same
transaction as the metadata changes they describe: a crash loses both or neither, so the journal and
the tree never disagree. Reads and writes are tallied per handle and become one record per handle per
commit window (call count, bytes, byte ranges), never one row per read() or write().

Each record carries `hash = BLAKE2b-128(previous hash || canonical record)`. Pruning keeps the hash of
the last removed record as the anchor (and journals itself), so what is kept stays verifiable.

Must never: commit on its own (the store's commit window does); decide who may do what (callers
record refusals they made); block the daemon on a long query (the CLI and the control socket query a
separate read-only connection).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

SCHEMA = """
CREATE TABLE IF NOT EXISTS journal_paths (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS journal (
    seq       INTEGER PRIMARY KEY,
    time_ns   INTEGER NOT NULL,
    principal TEXT NOT NULL,
    uid       INTEGER NOT NULL,
    pid       INTEGER NOT NULL,
    op        TEXT NOT NULL,
    inode     INTEGER,
    path_id   INTEGER,
    path2_id  INTEGER,
    errno     INTEGER,
    details   TEXT,
    hash      BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_by_time ON journal (time_ns);
CREATE INDEX IF NOT EXISTS journal_by_principal ON journal (principal, seq);
CREATE INDEX IF NOT EXISTS journal_by_path ON journal (path_id, seq);
CREATE INDEX IF NOT EXISTS journal_by_path2 ON journal (path2_id, seq) WHERE path2_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_denied ON journal (seq) WHERE errno IS NOT NULL;
"""

GENESIS = b"\0" * 16
DAEMON_PRINCIPAL = "deskfs"  # the journal's name for the daemon itself (mount, fsck, expiry, pruning)
ANCHOR_SEQ = "journal.anchor_seq"
ANCHOR_HASH = "journal.anchor_hash"
RETENTION = "journal.retention"
MAX_RANGES = 16  # byte ranges kept per tally; beyond this the closest ones merge
PRUNE_BATCH = 20_000
PATH_CACHE_MAX = 100_000

# Every operation a record can name, with the verb a human line uses.
OPS: dict[str, str] = {
    "open": "opened", "read": "read", "write": "wrote", "close_write": "closed after writing",
    "create": "created", "mkdir": "made folder", "mknod": "made node", "symlink": "made symlink",
    "link": "hard-linked", "unlink": "deleted", "rmdir": "removed folder", "rename": "renamed",
    "setattr": "changed", "setxattr": "set xattr", "removexattr": "removed xattr",
    "lock": "locked", "unlock": "unlocked", "lock_break": "broke locks of", "lease_expired": "lease expired",
    "impersonate": "claimed an agent it does not own", "session_start": "started session",
    "session_end": "ended session", "config": "configured", "mount": "mounted", "unmount": "unmounted",
    "fsck": "repaired after a crash", "prune": "pruned journal",
    "invite": "invited", "role": "changed role of", "remove": "removed member", "leave": "left",
    "transfer": "offered ownership to", "accept_transfer": "accepted ownership",
    "cancel_transfer": "cancelled the ownership offer to",
    # Reading the tree is recorded only when refused (a file manager would otherwise flood the journal).
    "lookup": "looked up", "getattr": "stat-ed", "readlink": "read link", "opendir": "opened folder",
    "readdir": "listed", "getxattr": "read xattr", "listxattr": "listed xattrs",
}
# What changes the tree: the records `deskfs status` shows as recent changes.
CHANGE_OPS = ("close_write", "create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename",
              "setattr", "setxattr", "removexattr")


class Actor(NamedTuple):
    """Who did something: the principal and the process it was seen as."""

    principal: str
    uid: int
    pid: int


def daemon_actor() -> Actor:
    """The daemon itself, for what no user asked for (expiry, pruning, fsck, a lease of a deleted file)."""
    return Actor(DAEMON_PRINCIPAL, os.getuid(), os.getpid())


@dataclass(slots=True)
class Record:
    seq: int
    time_ns: int
    principal: str
    uid: int
    pid: int
    op: str
    inode: int | None
    path: str | None
    path2: str | None
    errno: int | None
    details: str | None  # JSON text

    def canonical(self) -> bytes:
        fields = (self.seq, self.time_ns, self.principal, self.uid, self.pid, self.op, self.inode,
                  self.path, self.path2, self.errno, self.details)
        return "\x1f".join("" if f is None else str(f) for f in fields).encode("utf-8", "surrogatepass")

    def as_json(self) -> dict:
        try:
            details = json.loads(self.details) if self.details else None
        except ValueError:
            details = {"unreadable": self.details}
        return {
            "seq": self.seq, "time": iso_time(self.time_ns), "time_ns": self.time_ns,
            "principal": self.principal, "uid": self.uid, "pid": self.pid, "op": self.op,
            "inode": self.inode, "path": self.path, "path2": self.path2, "errno": self.errno,
            "denied": self.errno is not None, "details": details,
        }


def record_of_row(row: tuple) -> Record | None:
    """A record from its query row, or None when the row is damaged (a field of the wrong type)."""
    def optional_int(value: object) -> int | None:
        return None if value is None else int(value)  # type: ignore[arg-type]
    try:
        return Record(int(row[0]), int(row[1]), str(row[2]), int(row[3]), int(row[4]), str(row[5]),
                      optional_int(row[6]), row[7], row[8], optional_int(row[9]),
                      None if row[10] is None else str(row[10]))
    except (TypeError, ValueError):
        return None


def damaged(seq: int) -> Record:
    """What a query shows for a damaged row: it exists, and `deskfs log --verify` will name it."""
    return Record(int(seq), 0, "?", -1, -1, "damaged", None, None, None, None, None)


def chain(previous: bytes, record: Record) -> bytes:
    return hashlib.blake2b(previous + record.canonical(), digest_size=16).digest()


def iso_time(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns // 1000 % 1_000_000:06d}Z"


def path_text(path: bytes | None) -> str | None:
    return None if path is None else path.decode("utf-8", "backslashreplace")


@dataclass(slots=True)
class Tally:
    """The reads or writes one handle made during one commit window."""

    actor: Actor
    inode: int
    path: Callable[[], str | None]
    calls: int = 0
    size: int = 0
    ranges: list[list[int]] = field(default_factory=list)

    def add(self, offset: int, size: int) -> None:
        self.calls += 1
        self.size += size
        end = offset + size
        last = self.ranges[-1] if self.ranges else None
        if last is not None and last[0] <= offset <= last[1]:
            last[1] = max(last[1], end)  # sequential I/O extends the last range: the common case
            return
        self.ranges.append([offset, end])
        if len(self.ranges) > 1 and offset < self.ranges[-2][0]:
            self.ranges.sort()
        self._merge()

    def _merge(self) -> None:
        merged: list[list[int]] = []
        for start, end in self.ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        while len(merged) > MAX_RANGES:
            gaps = [merged[i + 1][0] - merged[i][1] for i in range(len(merged) - 1)]
            i = gaps.index(min(gaps))
            merged[i:i + 2] = [[merged[i][0], merged[i + 1][1]]]
        self.ranges = merged


class Journal:
    """The daemon's writer of the journal, over the store's connection."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], None]) -> None:
        conn.executescript(SCHEMA)
        self._conn = conn
        self._begin = begin
        self.pending: list[Record] = []
        self.tallies: dict[tuple[int, str], Tally] = {}
        self._path_ids: dict[str, int] = {}
        last = conn.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None:
            anchor = read_anchor(conn)
            last = anchor if anchor is not None else (0, GENESIS)
        self._next_seq = last[0] + 1
        self._last_hash = last[1]
        self.committed_seq = last[0]

    # -- appending ----------------------------------------------------------------------------

    def record(self, actor: Actor, op: str, inode: int | None = None, path: str | None = None,
               path2: str | None = None, errno: int | None = None, **details: object) -> None:
        """Append one record; it reaches the database with the next flush, in the open transaction."""
        text = json.dumps(details, separators=(",", ":"), sort_keys=True) if details else None
        self.pending.append(Record(self._next_seq, time.time_ns(), actor.principal, actor.uid, actor.pid,
                                   op, inode, path, path2, errno, text))
        self._next_seq += 1

    def tally(self, key: int, op: str, actor: Actor, inode: int, path: Callable[[], str | None],
              offset: int, size: int) -> None:
        """Count one read() or write() of handle `key`; recorded as one record at the window's end."""
        tally = self.tallies.get((key, op))
        if tally is None:
            tally = self.tallies[(key, op)] = Tally(actor, inode, path)
        tally.add(offset, size)

    def end_tallies(self, key: int | None = None) -> None:
        """Turn the tallies (of one handle, or all) into records."""
        keys = list(self.tallies) if key is None else [k for k in ((key, "read"), (key, "write")) if k in self.tallies]
        for k in keys:
            t = self.tallies.pop(k)
            self.record(t.actor, k[1], t.inode, t.path(), calls=t.calls, bytes=t.size, ranges=t.ranges)

    @property
    def has_pending(self) -> bool:
        return bool(self.pending) or bool(self.tallies)

    def flush(self) -> None:
        """Write every pending record into the open transaction (the caller commits)."""
        self.end_tallies()
        if not self.pending:
            return
        self._begin()
        rows = []
        previous = self._last_hash
        for r in self.pending:
            previous = chain(previous, r)
            rows.append((r.seq, r.time_ns, r.principal, r.uid, r.pid, r.op, r.inode, self._path_id(r.path),
                         self._path_id(r.path2), r.errno, r.details, previous))
        self._conn.executemany("INSERT INTO journal VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._last_hash = previous
        self.pending.clear()

    def committed(self) -> None:
        """The store committed: everything flushed so far is durable against a crash of the daemon."""
        self.committed_seq = self._next_seq - 1 - len(self.pending)

    def _path_id(self, path: str | None) -> int | None:
        if path is None:
            return None
        known = self._path_ids.get(path)
        if known is not None:
            return known
        row = self._conn.execute("SELECT id FROM journal_paths WHERE path=?", (path,)).fetchone()
        if row is None:
            row = (self._conn.execute("INSERT INTO journal_paths (path) VALUES (?)", (path,)).lastrowid,)
        if len(self._path_ids) >= PATH_CACHE_MAX:
            self._path_ids.clear()
        self._path_ids[path] = row[0]
        return row[0]

    # -- retention ----------------------------------------------------------------------------

    def prune(self, before_ns: int, actor: Actor) -> int:
        """Remove up to one batch of records older than `before_ns`, keeping the chain verifiable.

        The hash of the last removed record becomes the anchor the kept records verify from, and the
        pruning is itself journaled. Returns how many records were removed.
        """
        self.flush()
        last = self._conn.execute(
            "SELECT seq, hash FROM journal WHERE time_ns < ? AND seq <= (SELECT MIN(seq) FROM journal) + ?"
            " ORDER BY seq DESC LIMIT 1", (before_ns, PRUNE_BATCH - 1)).fetchone()
        if last is None:
            return 0
        self._begin()
        # Paths the removed records named: those no kept record names go too (index lookups, no scan).
        self._conn.execute("CREATE TEMP TABLE IF NOT EXISTS pruned_paths (id INTEGER PRIMARY KEY)")
        self._conn.execute(
            "INSERT OR IGNORE INTO pruned_paths SELECT path_id FROM journal WHERE seq <= ? AND path_id IS NOT NULL"
            " UNION SELECT path2_id FROM journal WHERE seq <= ? AND path2_id IS NOT NULL", (last[0], last[0]))
        removed = self._conn.execute("DELETE FROM journal WHERE seq <= ?", (last[0],)).rowcount
        self._conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (ANCHOR_SEQ, str(last[0])))
        self._conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (ANCHOR_HASH, last[1].hex()))
        self._conn.execute(
            "DELETE FROM journal_paths WHERE id IN (SELECT id FROM pruned_paths)"
            " AND NOT EXISTS (SELECT 1 FROM journal WHERE path_id = journal_paths.id)"
            " AND NOT EXISTS (SELECT 1 FROM journal WHERE path2_id = journal_paths.id)")
        self._conn.execute("DELETE FROM pruned_paths")
        self._path_ids.clear()
        self.record(actor, "prune", removed=removed, anchor_seq=last[0], anchor_hash=last[1].hex())
        return removed


def read_anchor(conn: sqlite3.Connection) -> tuple[int, bytes] | None:
    """(seq, hash) of the last pruned record, or None if nothing was ever pruned."""
    rows = dict(conn.execute("SELECT key, value FROM settings WHERE key IN (?, ?)", (ANCHOR_SEQ, ANCHOR_HASH)))
    if ANCHOR_SEQ not in rows:
        return None
    return int(rows[ANCHOR_SEQ]), bytes.fromhex(rows[ANCHOR_HASH])


# -- durations and times ----------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])\Z")


def parse_duration(text: str) -> float | None:
    """Seconds in `30s`, `10m`, `2h`, `30d`, `1w`; None if it is not one."""
    match = _DURATION.match(text.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def parse_time(text: str, now_ns: int) -> int | None:
    """A point in time as ns: a duration ago (`10m`), or an ISO date/time (local unless it says); else None."""
    from datetime import datetime

    ago = parse_duration(text)
    if ago is not None:
        return now_ns - int(ago * 1e9)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(moment.timestamp() * 1e9)


# -- queries ----------------------------------------------------------------------------------


@dataclass
class Query:
    since_ns: int | None = None
    until_ns: int | None = None
    principals: list[str] = field(default_factory=list)
    path_glob: str | None = None
    ops: list[str] = field(default_factory=list)
    denied: bool = False
    after_seq: int = 0
    upto_seq: int | None = None
    limit: int = 100  # the newest `limit` records; 0 for every record

    @staticmethod
    def from_json(data: dict) -> "Query":
        return Query(**{k: v for k, v in data.items() if k in Query.__dataclass_fields__})


def glob_regex(pattern: str) -> re.Pattern:
    """`*` and `?` stay within one path component, `**` crosses folders; a pattern is rooted at `/`."""
    if not pattern.startswith("/"):
        pattern = "/" + pattern
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("/**/", i):
            out.append("/(?:.*/)?")
            i += 4
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                out.append(fnmatch.translate(pattern[i:end + 1])[4:-3])
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"(?:/.*)?\Z" if not pattern.endswith("/**") else "".join(out) + r"\Z")


def _sqlite_glob(pattern: str) -> str:
    """A looser SQLite GLOB (its `*` crosses `/`) that the exact regex then narrows; fast in C."""
    if not pattern.startswith("/"):
        pattern = "/" + pattern
    return pattern.replace("/**/", "/*").replace("**", "*")  # `**/` may also match no folder at all


_SELECT = ("SELECT j.seq, j.time_ns, j.principal, j.uid, j.pid, j.op, j.inode, p1.path, p2.path, j.errno,"
           " j.details FROM journal j LEFT JOIN journal_paths p1 ON p1.id = j.path_id"
           " LEFT JOIN journal_paths p2 ON p2.id = j.path2_id")


def _path_ids(conn: sqlite3.Connection, pattern: str) -> list[int]:
    regex = glob_regex(pattern)
    loose = _sqlite_glob(pattern)
    # A folder pattern matches what is under it too: `reports` finds `/reports/q3.md`.
    rows = conn.execute("SELECT id, path FROM journal_paths WHERE path GLOB ? OR path GLOB ?",
                        (loose, loose.rstrip("/") + "/*"))
    return [pid for pid, path in rows if regex.match(path)]


def _where(conn: sqlite3.Connection, q: Query) -> tuple[str, list] | None:
    clauses, params = ["j.seq > ?"], [q.after_seq]
    if q.upto_seq is not None:
        clauses.append("j.seq <= ?")
        params.append(q.upto_seq)
    if q.since_ns is not None:
        clauses.append("j.time_ns >= ?")
        params.append(q.since_ns)
    if q.until_ns is not None:
        clauses.append("j.time_ns <= ?")
        params.append(q.until_ns)
    if q.principals:
        clauses.append(f"j.principal IN ({','.join('?' * len(q.principals))})")
        params += q.principals
    if q.ops:
        clauses.append(f"j.op IN ({','.join('?' * len(q.ops))})")
        params += q.ops
    if q.denied:
        clauses.append("j.errno IS NOT NULL")
    if q.path_glob is not None:
        ids = _path_ids(conn, q.path_glob)
        if not ids:
            return None
        listed = ",".join(str(i) for i in ids)
        clauses.append(f"(j.path_id IN ({listed}) OR j.path2_id IN ({listed}))")
    return " AND ".join(clauses), params


PAGE = 2000  # records per page when every match is wanted


def newest(conn: sqlite3.Connection, q: Query, visible: Callable[[Record], bool] | None = None) -> list[Record]:
    """The newest `q.limit` records `q` selects that `visible` lets through, oldest first."""
    where = _where(conn, q)
    if where is None:
        return []
    clause, params = where
    found: list[Record] = []
    before = None
    batch = max(q.limit, 1) * 2
    while True:
        page_clause = clause + ("" if before is None else f" AND j.seq < {before}")
        rows = conn.execute(f"{_SELECT} WHERE {page_clause} ORDER BY j.seq DESC LIMIT ?", params + [batch]).fetchall()
        for row in rows:
            record = record_of_row(row) or damaged(row[0])
            if visible is None or visible(record):
                found.append(record)
                if len(found) >= q.limit:
                    return found[::-1]
        if len(rows) < batch:
            return found[::-1]
        before = rows[-1][0]


def page(conn: sqlite3.Connection, q: Query, visible: Callable[[Record], bool] | None = None
         ) -> tuple[list[Record], int | None]:
    """Matches of `q` after `q.after_seq`, oldest first, up to PAGE rows; and the seq to continue after
    (None when there is no more). For every match (`--limit 0`) without holding them all in memory."""
    where = _where(conn, q)
    if where is None:
        return [], None
    clause, params = where
    rows = conn.execute(f"{_SELECT} WHERE {clause} ORDER BY j.seq LIMIT ?", params + [PAGE]).fetchall()
    found = [r for r in (record_of_row(row) or damaged(row[0]) for row in rows) if visible is None or visible(r)]
    return found, rows[-1][0] if len(rows) == PAGE else None


def query(conn: sqlite3.Connection, q: Query, visible: Callable[[Record], bool] | None = None) -> Iterator[Record]:
    """What `deskfs log` shows for `q`: the newest `q.limit` matches, or with limit 0 every match; oldest first."""
    if q.limit:
        yield from newest(conn, q, visible)
        return
    q = Query(**q.__dict__)
    while True:
        found, cursor = page(conn, q, visible)
        yield from found
        if cursor is None:
            return
        q.after_seq = cursor


def records(conn: sqlite3.Connection) -> Iterator[tuple[Record, bytes | None]]:
    """Every record in order with its stored hash (None where the row is unreadable)."""
    for row in conn.execute(f"{_SELECT.replace('j.details FROM', 'j.details, j.hash FROM')} ORDER BY j.seq"):
        record = record_of_row(row)
        if record is None:
            yield damaged(row[0]), None
            continue
        yield record, row[11] if isinstance(row[11], bytes) else None


@dataclass
class Verdict:
    checked: int
    broken_seq: int | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.broken_seq is None


def verify(conn: sqlite3.Connection) -> Verdict:
    """Check the hash chain from the anchor (or the start) to the newest record; name the first break."""
    anchor = read_anchor(conn)
    expected_seq, previous = (anchor[0] + 1, anchor[1]) if anchor else (1, GENESIS)
    checked = 0
    for record, stored in records(conn):
        if record.seq != expected_seq:
            return Verdict(checked, expected_seq, f"record {expected_seq} is missing (the next kept is {record.seq})")
        if stored is None:
            return Verdict(checked, record.seq, f"record {record.seq} is unreadable (a damaged row)")
        previous = chain(previous, record)
        if previous != stored:
            return Verdict(checked, record.seq, f"record {record.seq} does not match its hash (it was altered)")
        checked += 1
        expected_seq += 1
    return Verdict(checked, None, None)
