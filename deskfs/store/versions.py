"""Version history: every regular file's version number, and the earlier content of each, kept.

A file's history is a *line* (table `history`): it carries the current version's number, whether that
version is sealed, and who made it. A line belongs to the file (the inode) that carries it now; rename-over
hands the target's line to the file that replaces it (what "save" means for editors that write a temporary
file and rename it over), and removing a file's last name puts its line in the trash.

Each earlier version is a row of `versions`, and its content is the first `size` bytes of a body:
- a *kept* body (`STORE/versions/BUCKET/ID`, table `kept_bodies`), immutable once kept; or
- the *live* body of a file (`live_inode`), while the version is a prefix of what the file holds now:
  appending after a sealed version keeps the old length, not a copy.

Content is kept without copying wherever the old body is left whole: `O_TRUNC`, truncate to 0, rename-over
and unlink keep the old body file itself (hard-linked into `STORE/versions/`, then the file gets a new
one). Only a change inside a prefix that a version still needs copies that prefix first
(copy-on-first-write), and only for files up to `versions.max_size`; larger ones keep versions only where
no copy is needed.

Crash safety: a kept body is linked under its final name before the transaction that names it commits,
and that transaction commits before the live body is replaced; a crash in between leaves either an
unreferenced kept file (fsck removes it) or a file still holding its old content. A row whose body is
missing is reported and dropped by fsck, never served as empty.

Owns the `history`, `versions` and `kept_bodies` tables, `STORE/versions/`, the policy settings
(`versions`, `versions.keep`, `versions.days`, `versions.max_size`, `versions.budget`) and garbage
collection.
Must never: write a live body's content (content.py does; this module only links, copies out and names);
serve a version whose body is gone; decide who may read or restore (fs.py and access.py do).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from dataclasses import dataclass
from typing import Callable

from deskfs.store.content import copy_range

SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    line         INTEGER PRIMARY KEY AUTOINCREMENT,
    inode        INTEGER,            -- the file that carries this line now; NULL once it is in the trash
    current      INTEGER NOT NULL,   -- the number of the current version
    sealed       INTEGER NOT NULL,   -- 1: the next change starts version current + 1
    writer       TEXT NOT NULL,      -- who made the current version
    made_ns      INTEGER NOT NULL,   -- when the current version began
    deleted_ns   INTEGER,            -- in the trash: when, by whom, from where, in which folder
    deleted_by   TEXT,
    deleted_path TEXT,
    deleted_parent INTEGER,
    deleted_mode INTEGER, deleted_uid INTEGER, deleted_gid INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS history_by_inode ON history (inode) WHERE inode IS NOT NULL;
CREATE INDEX IF NOT EXISTS history_trash ON history (deleted_ns) WHERE inode IS NULL;
CREATE TABLE IF NOT EXISTS versions (
    line       INTEGER NOT NULL,
    number     INTEGER NOT NULL,
    made_ns    INTEGER NOT NULL,
    ended_ns   INTEGER NOT NULL,
    principal  TEXT NOT NULL,
    size       INTEGER NOT NULL,
    ended_by   TEXT NOT NULL,     -- write | truncate | open_trunc | rename_over | unlink | restore
    body       INTEGER,           -- a kept body, or NULL with live_inode set
    live_inode INTEGER,
    PRIMARY KEY (line, number)
);
CREATE INDEX IF NOT EXISTS versions_live ON versions (live_inode) WHERE live_inode IS NOT NULL;
CREATE INDEX IF NOT EXISTS versions_body ON versions (body) WHERE body IS NOT NULL;
CREATE INDEX IF NOT EXISTS versions_age ON versions (ended_ns);
CREATE TABLE IF NOT EXISTS kept_bodies (id INTEGER PRIMARY KEY AUTOINCREMENT, size INTEGER NOT NULL);
"""

ENABLED = "versions"
KEEP = "versions.keep"
DAYS = "versions.days"
MAX_SIZE = "versions.max_size"
BUDGET = "versions.budget"
DEFAULTS = {ENABLED: "on", KEEP: "50", DAYS: "30", MAX_SIZE: "64MiB", BUDGET: "10%"}
BUCKET_SHIFT = 12
COPY_CHUNK = 1 << 20

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30,
               "GIB": 1 << 30, "T": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes in `64MiB`, `1G`, `4096`; None if it is not a size."""
    text = text.strip().upper()
    number = text.rstrip("BKMGTI")
    unit = text[len(number):]
    if not number.isdigit() or unit not in _SIZE_UNITS or len(number) > 15:
        return None
    return int(number) * _SIZE_UNITS[unit]


def check_setting(key: str, value: str) -> str | None:
    """The value to store for a versions setting, or None if `value` is not one it takes."""
    if key == ENABLED:
        return value if value in ("on", "off") else None
    if key in (KEEP, DAYS):
        return value if value.isdigit() and 1 <= int(value) <= 1_000_000 else None
    if key == MAX_SIZE:
        return value if parse_size(value) is not None else None
    if key == BUDGET:
        number = value[:-1]
        return value if value.endswith("%") and number.isdigit() and 1 <= int(number) <= 100 else None
    return None


SETTINGS = {
    ENABLED: "on or off",
    KEEP: "versions kept per file (1 and more)",
    DAYS: "days a replaced version is kept (1 and more)",
    MAX_SIZE: "a size such as 64MiB: larger files keep versions only where no copy is needed",
    BUDGET: "a percentage of the store's disk, such as 10%",
}


@dataclass(slots=True)
class Line:
    """A file's history, as the daemon keeps it in memory while the file is in use."""

    id: int
    current: int
    sealed: bool
    writer: str
    made_ns: int
    protected: int  # bytes of the live body that kept versions still need (a change below copies them)


@dataclass(frozen=True)
class Version:
    line: int
    number: int
    made_ns: int
    ended_ns: int | None  # None: the current version
    principal: str
    size: int
    ended_by: str | None
    body: int | None
    live_inode: int | None

    def as_json(self) -> dict:
        return {"number": self.number, "made_ns": self.made_ns, "ended_ns": self.ended_ns,
                "principal": self.principal, "size": self.size, "ended_by": self.ended_by,
                "current": self.ended_ns is None}


HASH_MAX = 1 << 30  # versions larger than this are listed without a content hash (reading them is slow)


def _hash(fd: int, size: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    left, offset = size, 0
    while left > 0:
        chunk = os.pread(fd, min(left, COPY_CHUNK), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def inode_at(conn: sqlite3.Connection, path: str) -> int | None:
    """The inode at workspace path `path` (`/a/b`), or None."""
    ino = 1
    for name in (p for p in path.split("/") if p):
        row = conn.execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                           (ino, name.encode("utf-8", "surrogateescape"))).fetchone()
        if row is None:
            return None
        ino = row[0]
    return ino


def describe(conn: sqlite3.Connection, store: "Versions", path: str) -> list[dict] | None:
    """Every version of the file at `path`, oldest first, with content hashes (None: no such file)."""
    ino = inode_at(conn, path)
    if ino is None:
        return None
    row = conn.execute("SELECT line, current, made_ns, writer FROM history WHERE inode=?", (ino,)).fetchone()
    size_row = conn.execute("SELECT size, mode FROM inodes WHERE id=?", (ino,)).fetchone()
    if size_row is None or (size_row[1] & 0o170000) != 0o100000:
        return None
    if row is None:  # a file from before versions: its content is version 1
        return [{"number": 1, "made_ns": None, "ended_ns": None, "principal": None, "size": size_row[0],
                 "ended_by": None, "current": True, "hash": None}]
    listed = []
    for version in Versions.listing(conn, row[0], row[1], row[2], row[3], ino):
        entry = version.as_json()
        try:
            fd, size = store.open_version(version)
        except OSError:
            continue  # its body is gone (fsck will drop it): never listed as empty
        try:
            if version.ended_ns is None:
                size = size_row[0]
            entry["size"] = size
            entry["hash"] = _hash(fd, size) if size <= HASH_MAX else None
        finally:
            os.close(fd)
        listed.append(entry)
    return listed


# A removed file's history line and its last kept version, as a Deleted (history h, versions v).
_DELETED_COLUMNS = ("h.line, h.current, h.deleted_path, h.deleted_parent, h.deleted_ns, h.deleted_by,"
                    " COALESCE(v.size, 0), h.deleted_mode, h.deleted_uid, h.deleted_gid")


@dataclass(frozen=True)
class Deleted:
    line: int
    number: int
    path: str
    parent: int
    deleted_ns: int
    deleted_by: str
    size: int
    mode: int
    uid: int
    gid: int

    def as_json(self) -> dict:
        return {"line": self.line, "version": self.number, "path": self.path, "deleted_ns": self.deleted_ns,
                "deleted_by": self.deleted_by, "size": self.size}


class Versions:
    """The store's version history over the daemon's connection (or fsck's)."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], None], kept_dir: str,
                 live_path: Callable[[int], str], setting: Callable[[str], str | None]) -> None:
        conn.executescript(SCHEMA)
        self._conn = conn
        self._begin = begin
        self.kept_dir = kept_dir
        self._live_path = live_path
        self._setting = setting
        self.lines: dict[int, Line] = {}  # by inode, for files in use
        self._handed_over: set[int] = set()  # files renamed over: their line went on with the file that moved
        os.makedirs(kept_dir, exist_ok=True)

    # -- settings -----------------------------------------------------------------------------

    def policy(self, key: str) -> str:
        return self._setting(key) or DEFAULTS[key]

    @property
    def enabled(self) -> bool:
        return self.policy(ENABLED) == "on"

    def max_size(self) -> int:
        return parse_size(self.policy(MAX_SIZE)) or 0

    # -- lines --------------------------------------------------------------------------------

    def line(self, ino: int) -> Line | None:
        """The history line of regular file `ino` (None for a file made before versions existed)."""
        known = self.lines.get(ino)
        if known is not None:
            return known
        row = self._conn.execute("SELECT line, current, sealed, writer, made_ns FROM history WHERE inode=?",
                                 (ino,)).fetchone()
        if row is None:
            return None
        protected = self._conn.execute("SELECT COALESCE(MAX(size), 0) FROM versions WHERE live_inode=?",
                                       (ino,)).fetchone()[0]
        known = self.lines[ino] = Line(row[0], row[1], bool(row[2]), row[3], row[4], protected)
        return known

    def ensure_line(self, ino: int, principal: str, now: int) -> Line:
        """The file's line, made (at version 1, sealed) for a file from before versions existed."""
        return self.line(ino) or self._new_line(ino, principal, now, sealed=True)

    def created(self, ino: int, principal: str, now: int) -> Line:
        """A new regular file: version 1, open until its creator closes it."""
        return self._new_line(ino, principal, now, sealed=False)

    def _new_line(self, ino: int, principal: str, now: int, sealed: bool) -> Line:
        self._begin()
        cursor = self._conn.execute(
            "INSERT INTO history (inode, current, sealed, writer, made_ns) VALUES (?, 1, ?, ?, ?)",
            (ino, int(sealed), principal, now))
        line = self.lines[ino] = Line(cursor.lastrowid, 1, sealed, principal, now, 0)
        return line

    def _save_line(self, ino: int, line: Line) -> None:
        self._begin()
        self._conn.execute("UPDATE history SET current=?, sealed=?, writer=?, made_ns=? WHERE line=?",
                           (line.current, int(line.sealed), line.writer, line.made_ns, line.id))

    def forget(self, ino: int) -> None:
        """The daemon no longer needs the line of `ino` in memory (it stays in the database)."""
        self.lines.pop(ino, None)

    def current(self, ino: int) -> int | None:
        line = self.line(ino)
        return None if line is None else line.current

    # -- changes ------------------------------------------------------------------------------

    def before_change(self, ino: int, principal: str, now: int, size: int, start: int, reason: str) -> bool:
        """Called before a change of the file's content that touches bytes from `start` on (a write at
        `start`, or a truncate to `start`); `size` is the file's length now.

        If the current version is sealed, it becomes a kept version (as a prefix of the live body: no
        copy) and a new, unsealed version begins. If the change touches bytes that a kept version still
        needs, those bytes are copied out first (or, beyond versions.max_size, those versions are given
        up). Returns True when content was copied out: the caller commits before it changes the body,
        so that a crash cannot leave a committed version pointing at bytes that were changed since.
        """
        line = self.ensure_line(ino, principal, now)
        if line.sealed and self.enabled:
            self._keep_prefix(ino, line, size, now, reason)
        elif line.sealed:
            line.current += 1
            line.sealed, line.writer, line.made_ns = False, principal, now
            self._save_line(ino, line)
        if line.writer != principal:
            line.writer = principal
            self._save_line(ino, line)
        if start < line.protected:
            self._materialize(ino, line)
            return True
        return False

    def _keep_prefix(self, ino: int, line: Line, size: int, now: int, reason: str) -> None:
        self._begin()
        self._conn.execute(
            "INSERT INTO versions (line, number, made_ns, ended_ns, principal, size, ended_by, body, live_inode)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (line.id, line.current, line.made_ns, now, line.writer, size, reason, ino))
        line.protected = max(line.protected, size)
        line.current += 1
        line.sealed, line.made_ns = False, now
        self._save_line(ino, line)

    def _materialize(self, ino: int, line: Line) -> None:
        """Copy out the prefix of the live body that kept versions need, before it is changed."""
        if line.protected > self.max_size():
            self._begin()
            self._conn.execute("DELETE FROM versions WHERE live_inode=?", (ino,))  # too large to copy
        else:
            body = self._new_body(line.protected)
            self._copy(self._live_path(ino), self.body_path(body), line.protected)
            self._begin()
            self._conn.execute("UPDATE versions SET body=?, live_inode=NULL WHERE live_inode=?", (body, ino))
        line.protected = 0

    def keep_whole_body(self, ino: int, size: int, principal: str, now: int, reason: str) -> bool:
        """The file's whole body is about to be replaced (O_TRUNC, truncate to 0, restore): keep it as it
        is, by a second name. Returns True when the caller must then give the file a new body (and
        commit first), False when nothing needed keeping."""
        line = self.ensure_line(ino, principal, now)
        if not self.enabled:
            if line.sealed:
                line.current += 1
            line.sealed, line.writer, line.made_ns = False, principal, now
            self._save_line(ino, line)
            self._begin()
            self._conn.execute("DELETE FROM versions WHERE live_inode=?", (ino,))
            line.protected = 0
            return False
        if line.sealed:
            self._keep_prefix(ino, line, size, now, reason)
        if line.protected == 0:
            if line.writer != principal:
                line.writer = principal
                self._save_line(ino, line)
            return False
        body = self._link_live(ino, line.protected)
        self._begin()
        self._conn.execute("UPDATE versions SET body=?, live_inode=NULL WHERE live_inode=?", (body, ino))
        line.protected = 0
        line.writer = principal
        self._save_line(ino, line)
        return True

    def sealed(self, ino: int) -> int | None:
        """The last handle that changed the file closed: its version is sealed. Returns its number."""
        line = self.line(ino)
        if line is None:
            return None
        if not line.sealed:
            line.sealed = True
            self._save_line(ino, line)
        return line.current

    def replaced(self, target: int, moved: int, moved_path: str | None, principal: str, now: int) -> None:
        """`moved` was renamed over `target`: `moved` carries `target`'s line on, its content the next
        version; `target`'s content is kept as the version it was (its body, by a second name).

        The moved file's own line ends here: a temporary file's is dropped; one with kept versions of its
        own (`mv a b` of a file with history) goes to the trash under its old path, so nothing is lost."""
        moved_line = self.line(moved)
        self._handed_over.add(target)  # the removal of its name that follows keeps nothing more
        # A file from before versions has its content as version 1, kept like any other.
        target_line = self.ensure_line(target, principal, now)
        if self.enabled:
            self._keep_as_version(target, target_line, now, "rename_over")
        else:  # nothing is kept, but the number goes on: a compare against an old number never succeeds again
            self._begin()
            self._conn.execute("DELETE FROM versions WHERE live_inode=?", (target,))  # their body goes now
        if moved_line is not None:
            if self.enabled and self._conn.execute("SELECT 1 FROM versions WHERE line=? LIMIT 1",
                                                   (moved_line.id,)).fetchone():
                self._to_trash(moved, moved_line, principal, moved_path, None, None, now, keep_current=False)
            else:
                self._drop_line(moved, moved_line.id)
        number = target_line.current + 1
        sealed = moved_line.sealed if moved_line is not None else True
        self._conn.execute("UPDATE history SET inode=?, current=?, sealed=?, writer=?, made_ns=? WHERE line=?",
                           (moved, number, int(sealed), principal, now, target_line.id))
        self.lines.pop(target, None)
        self.lines[moved] = Line(target_line.id, number, sealed, principal, now, 0)

    def _keep_as_version(self, ino: int, line: Line, now: int, reason: str) -> None:
        """Keep the file's whole current content as version `line.current` (ended by `reason`), and every
        prefix version its live body held, by linking the body: no copy."""
        size = self._live_size(ino)
        body = self._link_live(ino, size)
        self._begin()
        self._conn.execute("UPDATE versions SET body=?, live_inode=NULL WHERE live_inode=?", (body, ino))
        self._conn.execute(
            "INSERT OR REPLACE INTO versions (line, number, made_ns, ended_ns, principal, size, ended_by, body,"
            " live_inode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (line.id, line.current, line.made_ns, now, line.writer, size, reason, body))
        line.protected = 0

    def _drop_line(self, ino: int | None, line_id: int) -> None:
        bodies = [b for (b,) in self._conn.execute("SELECT DISTINCT body FROM versions WHERE line=? AND body"
                                                   " IS NOT NULL", (line_id,))]
        self._begin()
        self._conn.execute("DELETE FROM versions WHERE line=?", (line_id,))
        self._conn.execute("DELETE FROM history WHERE line=?", (line_id,))
        for body in bodies:
            self._drop_body(body)
        if ino is not None:
            self.lines.pop(ino, None)

    def removed(self, ino: int, principal: str, path: str | None, parent: int, mode: int, uid: int, gid: int,
                now: int) -> None:
        """The file's last name is gone: its line goes to the trash, its content is its last version."""
        if ino in self._handed_over:  # renamed over: its content is a version of the line it handed on
            self._handed_over.discard(ino)
            return
        line = self.line(ino)
        if line is None and not self.enabled:
            return
        if line is None:  # a file from before versions: its content is version 1, kept like any other
            line = self.ensure_line(ino, principal, now)
        if not self.enabled:
            self._drop_line(ino, line.id)
            return
        self._to_trash(ino, line, principal, path, parent, (mode, uid, gid), now, keep_current=True)

    def _to_trash(self, ino: int, line: Line, principal: str, path: str | None, parent: int | None,
                  attributes: tuple[int, int, int] | None, now: int, keep_current: bool) -> None:
        if keep_current:
            self._keep_as_version(ino, line, now, "unlink")
        else:
            line.current -= 1  # the last kept version is the one an undelete brings back
        mode, uid, gid = attributes if attributes is not None else (0o100644, 0, 0)
        self._begin()
        self._conn.execute(
            "UPDATE history SET inode=NULL, sealed=1, current=?, deleted_ns=?, deleted_by=?, deleted_path=?,"
            " deleted_parent=?, deleted_mode=?, deleted_uid=?, deleted_gid=? WHERE line=?",
            (line.current, now, principal, path, parent, mode, uid, gid, line.id))
        self.lines.pop(ino, None)

    # -- restoring ----------------------------------------------------------------------------

    def version(self, ino: int, number: int) -> Version | None:
        """Version `number` of the file `ino` now carries (the current one included)."""
        line = self.line(ino)
        if line is None:  # a regular file from before versions: what it holds now is its version 1
            return self._before_versions(ino) if number == 1 else None
        if number == line.current:
            return Version(line.id, number, line.made_ns, None, line.writer, -1, None, None, ino)
        return self._kept(line.id, number)

    @staticmethod
    def _before_versions(ino: int) -> Version:
        """The one version of a regular file from before versions (no line yet): its current content."""
        return Version(0, 1, 0, None, "", -1, None, None, ino)

    def _kept(self, line: int, number: int) -> Version | None:
        row = self._conn.execute(
            "SELECT line, number, made_ns, ended_ns, principal, size, ended_by, body, live_inode FROM versions"
            " WHERE line=? AND number=?", (line, number)).fetchone()
        return None if row is None else Version(*row)

    def history_of(self, ino: int) -> list[Version]:
        line = self.line(ino)
        if line is None:
            return [self._before_versions(ino)]
        return self.listing(self._conn, line.id, line.current, line.made_ns, line.writer, ino)

    @staticmethod
    def listing(conn: sqlite3.Connection, line: int, current: int | None, made_ns: int, writer: str,
                ino: int | None) -> list[Version]:
        """The kept versions of a line, oldest first, then (for a live file) the current one."""
        found = [Version(*row) for row in conn.execute(
            "SELECT line, number, made_ns, ended_ns, principal, size, ended_by, body, live_inode FROM versions"
            " WHERE line=? ORDER BY number", (line,))]
        if current is not None and ino is not None:
            found.append(Version(line, current, made_ns, None, writer, -1, None, None, ino))
        return found

    def open_version(self, version: Version) -> tuple[int, int]:
        """(a read-only descriptor on the version's body, its length); OSError if the body is gone."""
        path = self.body_path(version.body) if version.body is not None else self._live_path(version.live_inode)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if version.body is None and version.ended_ns is None:  # an empty file that never had a body
                return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), 0
            raise
        size = version.size if version.size >= 0 else os.fstat(fd).st_size
        return fd, size

    def restored(self, ino: int, principal: str, now: int) -> Line:
        """After the file's content was replaced by an old version's: the new version is sealed."""
        line = self.ensure_line(ino, principal, now)
        line.sealed, line.writer = True, principal
        self._save_line(ino, line)
        return line

    # -- the trash ----------------------------------------------------------------------------

    @staticmethod
    def trash(conn: sqlite3.Connection, under: str = "/") -> list[Deleted]:
        """Files removed (and not brought back), newest first, whose path was `under` or below it."""
        prefix = under.rstrip("/") + "/"
        rows = conn.execute(
            f"SELECT {_DELETED_COLUMNS} FROM history h LEFT JOIN versions v ON v.line = h.line AND v.number = h.current"
            " WHERE h.inode IS NULL AND h.deleted_path IS NOT NULL ORDER BY h.deleted_ns DESC").fetchall()
        return [Deleted(*row) for row in rows if under in ("/", "") or row[2] == under or row[2].startswith(prefix)]

    def removed_line(self, line_id: int) -> Deleted | None:
        """Line `line_id`, if it is in the trash with its last version kept."""
        row = self._conn.execute(
            f"SELECT {_DELETED_COLUMNS} FROM history h JOIN versions v ON v.line = h.line AND v.number = h.current"
            " WHERE h.line=? AND h.inode IS NULL AND v.body IS NOT NULL",
            (line_id,)).fetchone()
        return None if row is None else Deleted(*row)

    def undeleted(self, line_id: int, ino: int, principal: str, now: int) -> None:
        """Line `line_id` lives on in the new file `ino`, whose body is its last version's (moved back)."""
        self._begin()
        current = self._conn.execute("SELECT current FROM history WHERE line=?", (line_id,)).fetchone()[0]
        version = self._kept(line_id, current)
        self._conn.execute("DELETE FROM versions WHERE line=? AND number=?", (line_id, current))
        if version is not None and version.body is not None:
            self._drop_body(version.body)  # its content was copied back into the new file
        self._conn.execute(
            "UPDATE history SET inode=?, sealed=1, deleted_ns=NULL, deleted_by=NULL, deleted_path=NULL,"
            " deleted_parent=NULL WHERE line=?", (ino, line_id))
        self.lines.pop(ino, None)

    def take_body_back(self, line_id: int, live_path: str) -> int:
        """Put the last version's body of a trashed line at `live_path` (a move when it is only the
        trash's, a copy when older versions share it); returns its size."""
        current = self._conn.execute("SELECT current FROM history WHERE line=?", (line_id,)).fetchone()[0]
        version = self._kept(line_id, current)
        if version is None or version.body is None:
            raise FileNotFoundError("the removed file's content is gone")
        os.makedirs(os.path.dirname(live_path), exist_ok=True)
        self._copy(self.body_path(version.body), live_path, version.size)
        return version.size

    # -- bodies -------------------------------------------------------------------------------

    def body_path(self, body: int) -> str:
        return f"{self.kept_dir}/{body >> BUCKET_SHIFT:x}/{body}"

    def _new_body(self, size: int) -> int:
        self._begin()
        return self._conn.execute("INSERT INTO kept_bodies (size) VALUES (?)", (size,)).lastrowid

    def _link_live(self, ino: int, size: int) -> int:
        """A kept body that is the live body of `ino` itself, by a second name (no copy)."""
        body = self._new_body(size)
        path = self.body_path(body)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.link(self._live_path(ino), path)
        except FileNotFoundError:  # never written: an empty body
            open(path, "wb").close()
        return body

    def _copy(self, source: str, target: str, size: int) -> None:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(source, "rb") as src, open(target, "wb") as dst:
            copy_range(src.fileno(), dst.fileno(), size)

    def _drop_body(self, body: int) -> int:
        """Delete a kept body if no version refers to it any more; returns the bytes it held."""
        if self._conn.execute("SELECT 1 FROM versions WHERE body=? LIMIT 1", (body,)).fetchone():
            return 0  # still shared by another version
        self._conn.execute("DELETE FROM kept_bodies WHERE id=?", (body,))
        try:
            freed = os.stat(self.body_path(body)).st_blocks * 512
            os.unlink(self.body_path(body))
        except FileNotFoundError:
            freed = 0
        return freed

    def _live_size(self, ino: int) -> int:
        try:
            return os.stat(self._live_path(ino)).st_size
        except FileNotFoundError:
            return 0

    # -- policy -------------------------------------------------------------------------------

    def policy_now(self, disk_bytes: int, now: int) -> tuple[int, int, int]:
        """(versions.keep, the oldest end time kept, the budget in bytes) as the policy says now."""
        keep = int(self.policy(KEEP))
        cutoff = now - int(self.policy(DAYS)) * 86400 * 1_000_000_000
        return keep, cutoff, disk_bytes * int(self.policy(BUDGET)[:-1]) // 100

    @staticmethod
    def plan(conn: sqlite3.Connection, keep: int, cutoff: int, budget: int) -> list[tuple[int, int]]:
        """The (line, number) of every kept version the policy lets go: beyond `keep` per file, ended
        before `cutoff`, then the oldest until kept bodies fit `budget`. Read-only: the daemon runs it on
        a connection of its own in a worker thread, and drops the versions with `drop` afterwards."""
        doomed = [tuple(r) for r in conn.execute(
            "SELECT line, number FROM (SELECT line, number, ended_ns,"
            " ROW_NUMBER() OVER (PARTITION BY line ORDER BY number DESC) AS newer FROM versions)"
            " WHERE newer > ? OR ended_ns < ?", (keep, cutoff))]
        used = conn.execute("SELECT COALESCE(SUM(size), 0) FROM kept_bodies").fetchone()[0]
        if used > budget:
            dropping = set(doomed)
            for line, number, size in conn.execute(
                    "SELECT v.line, v.number, COALESCE(k.size, 0) FROM versions v LEFT JOIN kept_bodies k"
                    " ON k.id = v.body ORDER BY v.ended_ns"):
                if used <= budget:
                    break
                if (line, number) not in dropping:
                    doomed.append((line, number))
                    dropping.add((line, number))
                    used -= size
        return doomed

    def drop(self, doomed: list[tuple[int, int]]) -> int:
        """Drop these kept versions (a batch; the caller commits); returns the bytes freed."""
        freed = 0
        self._begin()
        for line, number in doomed:
            row = self._conn.execute("SELECT body FROM versions WHERE line=? AND number=?", (line, number)).fetchone()
            if row is None:
                continue
            self._conn.execute("DELETE FROM versions WHERE line=? AND number=?", (line, number))
            if row[0] is not None:
                freed += self._drop_body(row[0])
        self._conn.execute("DELETE FROM history WHERE inode IS NULL AND line NOT IN (SELECT line FROM versions)")
        for ino, line in list(self.lines.items()):  # a dropped prefix version protects nothing
            line.protected = self._conn.execute(
                "SELECT COALESCE(MAX(size), 0) FROM versions WHERE live_inode=?", (ino,)).fetchone()[0]
        return freed

    def free_space(self, wanted: int, batch: int = 64) -> tuple[int, int]:
        """The disk is full: drop the oldest kept versions until `wanted` bytes are freed or none is
        left (live data comes first). Returns (versions dropped, bytes freed)."""
        dropped = freed = 0
        while freed < wanted:
            oldest = [tuple(r) for r in self._conn.execute(
                "SELECT line, number FROM versions WHERE body IS NOT NULL ORDER BY ended_ns LIMIT ?", (batch,))]
            if not oldest:
                break
            freed += self.drop(oldest)
            dropped += len(oldest)
        return dropped, freed

    def check(self) -> list[str]:
        """fsck: drop versions whose body is gone, and kept bodies nothing refers to."""
        repairs = []
        gone = [(line, number) for line, number, body in self._conn.execute(
            "SELECT line, number, body FROM versions WHERE body IS NOT NULL")
            if not os.path.exists(self.body_path(body))]
        for line, number in gone:
            self._conn.execute("DELETE FROM versions WHERE line=? AND number=?", (line, number))
        if gone:
            repairs.append(f"dropped {len(gone)} versions whose kept content was missing")
        live_gone = self._conn.execute(
            "DELETE FROM versions WHERE live_inode IS NOT NULL AND live_inode NOT IN (SELECT id FROM inodes)").rowcount
        if live_gone:
            repairs.append(f"dropped {live_gone} versions of files that were gone")
        short = [(line, number) for line, number, ino, size in self._conn.execute(
            "SELECT line, number, live_inode, size FROM versions WHERE live_inode IS NOT NULL").fetchall()
            if self._live_size(ino) < size]
        for line, number in short:  # a prefix the file no longer holds whole: never served short
            self._conn.execute("DELETE FROM versions WHERE line=? AND number=?", (line, number))
        if short:
            repairs.append(f"dropped {len(short)} versions whose content their file no longer holds")
        self._conn.execute("DELETE FROM history WHERE inode IS NOT NULL AND inode NOT IN (SELECT id FROM inodes)")
        self._conn.execute("DELETE FROM kept_bodies WHERE id NOT IN (SELECT body FROM versions WHERE body IS NOT NULL)")
        known = {body for (body,) in self._conn.execute("SELECT id FROM kept_bodies")}
        stray = 0
        for bucket in os.listdir(self.kept_dir):
            folder = os.path.join(self.kept_dir, bucket)
            for name in os.listdir(folder):
                if not name.isdigit() or int(name) not in known:
                    os.unlink(os.path.join(folder, name))
                    stray += 1
        if stray:
            repairs.append(f"removed {stray} kept contents no version referred to")
        return repairs
