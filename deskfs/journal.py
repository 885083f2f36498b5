"""The audit journal: every open, read, write, change, lock and refusal, hash-chained, in SQLite.

Owns the `journal` and `journal_paths` tables, the record format, coalescing reads and writes per
file handle, the hash chain and its verification, retention, and queries.

Records are appended to memory and written by `flush`, which `Store.commit` calls inside the same
transaction as the metadata changes they describe: a crash loses both or neither, so the journal and
the tree never disagree. Reads and writes are tallied per handle and become one record per handle per
commit window (call count, bytes, byte ranges), never one row per read() or write().

Each record carries `hash = BLAKE2b-128(previous hash || canonical record)`. Pruning keeps the hash of
the last removed record as the anchor (and journals itself, naming the anchor), so what is kept stays
verifiable. The chain's head is signed outside the database (`Head`, `STORE/journal.head`), so that
removing records at either end shows too (docs/journal.md, "Tamper evidence").

Must never: commit on its own (the store's commit window does); decide who may do what (callers
record refusals they made); block the daemon on a long query (the CLI and the control socket query a
separate read-only connection).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import math
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

from deskfs.layout import journal_head_path, journal_key_path

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
# Refusals are cheap to provoke (a non-member's stat), so they must not grow the journal without bound:
# the same refusal (principal, op, path, errno) within a commit window is one record with a count, and
# each principal has a budget of refusal records (a token bucket); past it, one summary per window.
REFUSAL_RATE = 50.0  # records per second per principal, after a burst of
REFUSAL_BURST = 200

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
    "head_mismatch": "found the journal short of its signed head",
    "refusals_suppressed": "was refused more often than the journal itemises",
    "control": "asked the daemon",
    "restore": "restored", "undelete": "brought back", "gc": "collected old versions",
    "invite": "invited", "role": "changed role of", "remove": "removed member", "leave": "left",
    "transfer": "offered ownership to", "accept_transfer": "accepted ownership",
    "cancel_transfer": "cancelled the ownership offer to",
    # Reading the tree is recorded only when refused (a file manager would otherwise flood the journal).
    "lookup": "looked up", "getattr": "stat-ed", "readlink": "read link", "opendir": "opened folder",
    "readdir": "listed", "getxattr": "read xattr", "listxattr": "listed xattrs",
}
# What changes the tree: the records `deskfs status` shows as recent changes.
CHANGE_OPS = ("close_write", "create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename",
              "setattr", "setxattr", "removexattr", "restore", "undelete")


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


class RefusalLimiter:
    """Coalesces repeated refusals and rate-limits refusal records per principal (see REFUSAL_RATE)."""

    def __init__(self) -> None:
        self._window: dict[tuple, list] = {}  # (principal, op, path, errno) -> [its record, count]
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, when last filled)
        self._suppressed: dict[str, tuple[Actor, int, set[str]]] = {}  # principal -> (actor, count, ops)

    def admit(self, actor: Actor, op: str, path: str | None, errno: int) -> bool:
        """Whether this refusal gets a record of its own (else it is counted into one)."""
        key = (actor.principal, op, path, errno)
        seen = self._window.get(key)
        if seen is not None:
            seen[1] += 1
            return False
        now = time.monotonic()
        tokens, filled = self._buckets.get(actor.principal, (REFUSAL_BURST, now))
        tokens = min(REFUSAL_BURST, tokens + (now - filled) * REFUSAL_RATE)
        if tokens < 1:
            self._buckets[actor.principal] = (tokens, now)
            _, count, ops = self._suppressed.get(actor.principal, (actor, 0, set()))
            ops.add(op)
            self._suppressed[actor.principal] = (actor, count + 1, ops)
            return False
        self._buckets[actor.principal] = (tokens - 1, now)
        return True

    def remember(self, actor: Actor, op: str, path: str | None, errno: int, record: Record) -> None:
        """The record an admitted refusal got: repeats in this window are counted into it."""
        self._window[(actor.principal, op, path, errno)] = [record, 1]

    def close_window(self, journal: "Journal") -> None:
        """Write each coalesced refusal's count into its record, and one summary per throttled principal."""
        for record, count in self._window.values():
            if count > 1:
                details = json.loads(record.details) if record.details else {}
                details["repeated"] = count
                record.details = json.dumps(details, separators=(",", ":"), sort_keys=True)
        self._window.clear()
        suppressed, self._suppressed = self._suppressed, {}
        for actor, count, ops in suppressed.values():
            journal.record(actor, "refusals_suppressed", count=count, ops=sorted(ops))
        if len(self._buckets) > 10_000:  # forget principals whose buckets are full again
            now = time.monotonic()
            self._buckets = {p: b for p, b in self._buckets.items()
                             if b[0] + (now - b[1]) * REFUSAL_RATE < REFUSAL_BURST}


class Journal:
    """The daemon's writer of the journal, over the store's connection."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], None]) -> None:
        conn.executescript(SCHEMA)
        self._conn = conn
        self._begin = begin
        self.pending: list[Record] = []
        self.refusals = RefusalLimiter()
        self.tallies: dict[tuple[int, str], Tally] = {}
        self._path_ids: dict[str, int] = {}
        last = conn.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None:
            anchor = read_anchor(conn)
            last = anchor if anchor is not None else (0, GENESIS)
        self._next_seq = last[0] + 1
        self._last_hash = last[1]
        self.committed_seq = last[0]
        self.committed_hash = last[1]  # the hash of record committed_seq: the chain's head

    # -- appending ----------------------------------------------------------------------------

    def record(self, actor: Actor, op: str, inode: int | None = None, path: str | None = None,
               path2: str | None = None, errno: int | None = None, **details: object) -> None:
        """Append one record; it reaches the database with the next flush, in the open transaction."""
        if errno is not None and not self.refusals.admit(actor, op, path, errno):
            return
        text = json.dumps(details, separators=(",", ":"), sort_keys=True) if details else None
        record = Record(self._next_seq, time.time_ns(), actor.principal, actor.uid, actor.pid,
                        op, inode, path, path2, errno, text)
        self.pending.append(record)
        self._next_seq += 1
        if errno is not None:
            self.refusals.remember(actor, op, path, errno, record)

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
        self.refusals.close_window(self)
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
        self.committed_hash = self._last_hash  # flush left nothing pending: this is committed_seq's hash

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


# -- the signed head --------------------------------------------------------------------------
#
# The chain alone cannot show that its newest records were removed (a shorter chain verifies), nor that
# its oldest were removed with a matching anchor written. So the chain's head is also kept outside the
# database, in STORE/journal.head, signed (HMAC-SHA256) with a key in STORE/journal.key; both are
# 0600, the store's owner's. The store rewrites the head after every commit that added records
# (`Store.commit`). Records the head names must be in the database with that hash: a database shorter
# than its signed head, or with other records there, was changed by someone who did not hold the key.
#
# The head is written after the SQLite commit, so it lags the database (by one commit at most, after
# a `kill -9` between the two) and never leads it while the machine stays up. A crash of the machine
# can lose commits SQLite had not synced (synchronous=NORMAL), so the head also names the newest record
# known to be on disk (`durable_seq`: after a client's fsync, at the first open, at an orderly close)
# and the boot it was written in: in the same boot the database must reach `seq`, after a restart of
# the machine only `durable_seq`.

HEAD_VERSION = 1
KEY_BYTES = 32
_boot_id: str | None = None


def this_boot() -> str:
    """The kernel's id of the current boot: commits SQLite had not synced survive until it changes."""
    global _boot_id
    if _boot_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""  # unknown: every head is then judged by what it says is on disk
    return _boot_id


@dataclass(frozen=True)
class Head:
    """The chain's head as the store signed it: the newest committed record (`seq`, `hash`) in boot
    `boot`, and the newest record known to be on disk then (`durable_seq`, `durable_hash`)."""

    seq: int
    hash: bytes
    durable_seq: int
    durable_hash: bytes
    boot: str

    def _fields(self) -> dict:
        return {"v": HEAD_VERSION, "seq": self.seq, "hash": self.hash.hex(), "durable_seq": self.durable_seq,
                "durable_hash": self.durable_hash.hex(), "boot": self.boot}

    def encode(self, key: bytes) -> bytes:
        fields = self._fields()
        fields["mac"] = _mac(key, fields)
        return (json.dumps(fields, sort_keys=True) + "\n").encode()

    @staticmethod
    def decode(data: bytes, key: bytes) -> "Head | None":
        """The head in a head file's bytes; None if they are not one signed with `key`."""
        try:
            fields = json.loads(data)
            mac = fields.pop("mac")
            head = Head(fields["seq"], bytes.fromhex(fields["hash"]), fields["durable_seq"],
                        bytes.fromhex(fields["durable_hash"]), fields["boot"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if not (isinstance(mac, str) and isinstance(head.seq, int) and isinstance(head.durable_seq, int)
                and isinstance(head.boot, str) and 0 <= head.durable_seq <= head.seq):
            return None
        if fields != head._fields() or not hmac.compare_digest(mac, _mac(key, head._fields())):
            return None
        return head

    def required(self, boot: str) -> list[tuple[int, bytes]]:
        """(seq, hash) of the records the database must hold: what was on disk, and in the boot the head
        was written in, everything committed."""
        wanted = [(self.durable_seq, self.durable_hash)]
        if boot and boot == self.boot and self.seq != self.durable_seq:
            wanted.append((self.seq, self.hash))
        return wanted

    def trusted_seq(self, boot: str) -> int:
        return max(seq for seq, _ in self.required(boot))


HEAD_BLOCK = 512  # bytes: a head file is one such block (a JSON line padded with spaces), one disk sector


def head_block(head: Head, key: bytes) -> bytes:
    """The head file's content for `head`: always HEAD_BLOCK bytes, so it can be rewritten in place."""
    line = head.encode(key)
    assert len(line) <= HEAD_BLOCK
    return line[:-1] + b" " * (HEAD_BLOCK - len(line)) + b"\n"


def _mac(key: bytes, fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, b"deskfs journal head\0" + text, hashlib.sha256).hexdigest()


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def key_text(key: bytes) -> bytes:
    return key.hex().encode() + b"\n"


class KeyAltered(Exception):
    """The key file exists but holds no key."""


def read_key(store_path: str) -> bytes | None:
    """The store's journal key; None if it has none (made before signed heads). KeyAltered if the file
    holds something else; PermissionError for someone who is not the store's owner."""
    try:
        with open(journal_key_path(store_path), "rb") as f:
            text = f.read(4 * KEY_BYTES)
    except FileNotFoundError:
        return None
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise KeyAltered(f"{journal_key_path(store_path)} holds no key") from None
    if len(key) != KEY_BYTES:
        raise KeyAltered(f"{journal_key_path(store_path)} holds no key")
    return key


@dataclass
class HeadState:
    """What a store says about its signed head, for verification."""

    head: Head | None  # the signed head, if there is one to trust
    problem: str | None = None  # why the head cannot be trusted (missing, altered): verification fails
    note: str | None = None  # why there is no head to check, when that is no tampering


def load_head(store_path: str, key: bytes | None = None) -> HeadState:
    """The signed head of the store at `store_path` (its key read from the store unless given).
    PermissionError for someone who may not read the key (only the store's owner may)."""
    if key is None:
        try:
            key = read_key(store_path)
        except KeyAltered as exc:
            return HeadState(None, problem=f"the journal key was altered ({exc})")
        if key is None:
            return HeadState(None, note="this store has no journal key yet: it gets one at its next mount")
    try:
        with open(journal_head_path(store_path), "rb") as f:
            data = f.read(4096)
    except FileNotFoundError:
        return HeadState(None, problem=f"the signed head {journal_head_path(store_path)} is missing")
    head = Head.decode(data, key)
    if head is None:
        return HeadState(None, problem=f"the signed head {journal_head_path(store_path)} does not match its"
                                       " signature (it was altered, or signed with another key)")
    return HeadState(head)


def write_private_file(path: str, data: bytes, owner: tuple[int, int] | None, durable: bool) -> None:
    """Replace `path` with `data` atomically (a new file renamed over it), mode 0600, chowned to `owner`
    when given; with `durable`, on disk before this returns."""
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        folder = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def head_problem(conn: sqlite3.Connection, head: Head, boot: str) -> tuple[int, str] | None:
    """The first record missing or replaced of those `head` names, and why; None if the database holds them."""
    try:
        anchor = read_anchor(conn)
    except (ValueError, TypeError):
        anchor = None  # verification names an unreadable anchor; here only the head is judged
    newest = conn.execute("SELECT MAX(seq) FROM journal").fetchone()[0]
    last = newest if newest is not None else (anchor[0] if anchor else 0)
    for seq, digest in head.required(boot):
        if seq == 0:
            continue  # the empty journal: nothing to hold
        if seq > last:
            return last + 1, (f"the journal ends at record {last}, but its signed head is record {seq}:"
                              f" records {last + 1} to {seq} were removed")
        if anchor is not None and seq <= anchor[0]:
            if seq == anchor[0] and digest != anchor[1]:
                return seq, f"the anchor, record {seq}, is not the record the signed head names"
            continue  # pruned since; the prune record vouches for the anchor
        row = conn.execute("SELECT hash FROM journal WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return seq, f"record {seq}, which the signed head names, is missing"
        if row[0] != digest:
            return seq, f"record {seq} is not the record the signed head names (the newest records were replaced)"
    return None


# -- durations and times ----------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])\Z")


# Times are ns since the epoch in SQLite's 64-bit integers: from 1677-09-21 to 2262-04-11.
TIME_NS_MIN, TIME_NS_MAX = -(2**63), 2**63 - 1
MAX_DURATION = TIME_NS_MAX // 1_000_000_000  # seconds (about 292 years): any longer is no duration


def parse_duration(text: str) -> float | None:
    """Seconds in `30s`, `10m`, `2h`, `30d`, `1w` (at most MAX_DURATION); None if it is not one."""
    match = _DURATION.match(text.strip())
    if not match:
        return None
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    return seconds if math.isfinite(seconds) and seconds <= MAX_DURATION else None


def parse_time(text: str, now_ns: int) -> int | None:
    """A point in time as ns: a duration ago (`10m`), or an ISO date/time (local unless it says); None if
    it is neither, or falls outside what the journal's times can hold (TIME_NS_MIN..TIME_NS_MAX)."""
    from datetime import datetime

    ago = parse_duration(text)
    if ago is not None:
        moment_ns = now_ns - int(ago * 1e9)
    else:
        try:
            moment_ns = int(datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp() * 1e9)
        except (ValueError, OverflowError, OSError):
            return None
    return moment_ns if TIME_NS_MIN <= moment_ns <= TIME_NS_MAX else None


def journal_text(text: str) -> str:
    """`text` as the journal stores names: a byte that is not UTF-8 (a surrogate escape, as in argv) as
    `\\xNN`, as `path_text` writes it; any other lone surrogate as `\\uNNNN` (SQLite takes no surrogates)."""
    if text.isascii():
        return text
    return _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}" if 0xDC80 <= ord(m.group()) <= 0xDCFF
                          else f"\\u{ord(m.group()):04x}", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


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
    def from_json(data: object) -> "Query":
        """A query from its JSON form (the control socket's); ValueError names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("a query is a JSON object")
        for key, value in data.items():
            check = _QUERY_FIELDS.get(key)
            if check is None:
                raise ValueError(f"unknown query field {key!r}")
            if not check(value):
                raise ValueError(f"query field {key!r} has a value out of range or of the wrong type")
        return Query(**data)


INT64_MAX = 2**63 - 1


def _whole(value: object, low: int = -INT64_MAX, high: int = INT64_MAX) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _strings(value: object) -> bool:
    return isinstance(value, list) and len(value) <= 1000 and all(isinstance(v, str) for v in value)


_QUERY_FIELDS: dict[str, Callable[[object], bool]] = {
    "since_ns": lambda v: v is None or _whole(v),
    "until_ns": lambda v: v is None or _whole(v),
    "principals": _strings,
    "path_glob": lambda v: v is None or (isinstance(v, str) and len(v) <= 4096),
    "ops": _strings,
    "denied": lambda v: isinstance(v, bool),
    "after_seq": lambda v: _whole(v, 0),
    "upto_seq": lambda v: v is None or _whole(v, 0),
    "limit": lambda v: _whole(v, 0, 10**9),
}


def glob_body(pattern: str) -> str:
    """The regular expression for a glob, unanchored: `*` and `?` stay within one path component, `**`
    crosses folders (`**/` as a whole component also matches no folder at all), `[...]` is a character class."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i) and (i == 0 or pattern[i - 1] == "/"):
            out.append("(?:.*/)?")
            i += 3
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
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern:
    """A journal path glob (`glob_body`), rooted at `/`; a pattern also matches what is below what it names
    (unless it ends in `/**`, which says so itself)."""
    if not pattern.startswith("/"):
        pattern = "/" + pattern
    body = glob_body(pattern)
    return re.compile(body + r"\Z" if pattern.endswith("/**") else body + r"(?:/.*)?\Z")


def _sqlite_glob(pattern: str) -> str:
    """A looser SQLite GLOB (its `*` crosses `/`) that the exact regex then narrows; fast in C."""
    if not pattern.startswith("/"):
        pattern = "/" + pattern
    return pattern.replace("/**/", "/*").replace("**", "*")  # `**/` may also match no folder at all


_SELECT = ("SELECT j.seq, j.time_ns, j.principal, j.uid, j.pid, j.op, j.inode, p1.path, p2.path, j.errno,"
           " j.details FROM journal j LEFT JOIN journal_paths p1 ON p1.id = j.path_id"
           " LEFT JOIN journal_paths p2 ON p2.id = j.path2_id")


def _path_ids(conn: sqlite3.Connection, pattern: str) -> list[int]:
    pattern = journal_text(pattern)
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
        params += [journal_text(p) for p in q.principals]
    if q.ops:
        clauses.append(f"j.op IN ({','.join('?' * len(q.ops))})")
        params += [journal_text(op) for op in q.ops]
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
    broken_seq: int | None  # the first broken record; 0 when no one record can be named (the head is gone)
    reason: str | None
    last_seq: int = 0  # the newest record checked (the anchor's when none is kept)
    head_seq: int | None = None  # the signed head the chain was found to reach; None when none was checked
    head_note: str | None = None  # why no signed head was checked, or what limits the one that was

    @property
    def ok(self) -> bool:
        return self.broken_seq is None

    def as_json(self) -> dict:
        return {"checked": self.checked, "broken_seq": self.broken_seq, "reason": self.reason,
                "last_seq": self.last_seq, "head_seq": self.head_seq, "head_note": self.head_note}


def verify(conn: sqlite3.Connection, head: HeadState | None = None) -> Verdict:
    """Check the journal and name the first break: the hash chain from the anchor (or the start) to the
    newest record; that the newest prune record names the anchor; that no opening of the store found
    its journal short of the signed head; and that the chain reaches the signed head `head`.

    Reads one snapshot (a commit meanwhile is not half seen); `head` must be read before the call.
    """
    began = not conn.in_transaction
    if began:
        conn.execute("BEGIN")
    try:
        return _verify(conn, head)
    finally:
        if began:
            conn.execute("ROLLBACK")


def _prune_anchor(record: Record) -> tuple[int, bytes] | None:
    """The anchor a prune record says it left, or None if it says none readable."""
    try:
        details = json.loads(record.details or "{}")
        return int(details["anchor_seq"]), bytes.fromhex(details["anchor_hash"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _verify(conn: sqlite3.Connection, state: HeadState | None) -> Verdict:
    try:
        anchor = read_anchor(conn)
    except (ValueError, TypeError):
        return Verdict(0, 0, "the anchor in settings (journal.anchor_seq, journal.anchor_hash) is unreadable")
    expected_seq, previous = (anchor[0] + 1, anchor[1]) if anchor else (1, GENESIS)
    checked = 0
    vouched: tuple[int, tuple[int, bytes] | None] | None = None  # the newest prune record, and its anchor
    evidence: Record | None = None  # the first record saying the journal was found short of its head
    for record, stored in records(conn):
        if record.seq != expected_seq:
            return Verdict(checked, expected_seq, f"record {expected_seq} is missing (the next kept is {record.seq})")
        if stored is None:
            return Verdict(checked, record.seq, f"record {record.seq} is unreadable (a damaged row)")
        previous = chain(previous, record)
        if previous != stored:
            return Verdict(checked, record.seq, f"record {record.seq} does not match its hash (it was altered)")
        if record.op == "prune" and record.errno is None:
            vouched = (record.seq, _prune_anchor(record))
        elif record.op == "head_mismatch" and evidence is None:
            evidence = record
        checked += 1
        expected_seq += 1
    last = expected_seq - 1
    if anchor is not None and vouched is None:
        return Verdict(checked, anchor[0] + 1, f"the journal starts after record {anchor[0]} (the anchor in"
                       f" settings), but no prune record vouches for that anchor: records up to {anchor[0]}"
                       " were removed", last)
    if anchor is not None and vouched is not None and vouched[1] != anchor:
        said = "no anchor" if vouched[1] is None else f"record {vouched[1][0]}"
        return Verdict(checked, anchor[0] + 1, f"the anchor in settings (record {anchor[0]}) is not the one the"
                       f" newest prune record, record {vouched[0]}, left ({said}): records were removed"
                       " or the anchor was rewritten", last)
    if evidence is not None:
        try:
            said = json.loads(evidence.details or "{}").get("reason", "")
        except (ValueError, AttributeError):
            said = ""
        return Verdict(checked, evidence.seq, f"record {evidence.seq} says the journal did not reach its signed"
                       f" head when the store was opened{': ' + said if said else ''}", last)
    if state is None:
        return Verdict(checked, None, None, last, None, "no signed head was checked")
    if state.problem is not None:
        return Verdict(checked, 0, state.problem, last)
    if state.head is None:
        return Verdict(checked, None, None, last, None, state.note)
    boot = this_boot()
    found = head_problem(conn, state.head, boot)
    if found is not None:
        return Verdict(checked, found[0], found[1], last)
    note = None
    if state.head.trusted_seq(boot) < state.head.seq:
        note = (f"the machine restarted since it was written: record {state.head.seq} was committed then, and"
                f" record {state.head.durable_seq} known to be on disk")
    return Verdict(checked, None, None, last, state.head.trusted_seq(boot), note)

