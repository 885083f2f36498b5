"""Metadata of the workspace tree: inodes, directory entries, symlink targets and xattrs, in SQLite.

Owns the daemon's one `sqlite3` connection to `STORE/deskfs.db` and the in-memory cache of inodes the
kernel refers to. Attribute changes on the hot path (size, times) are made on the cached `Inode` and
written back at the next commit, so a write() costs no SQL; structural changes (entries, new inodes)
are written at once into the open transaction. A commit always writes dirty inodes first, so every
committed state is consistent.

Must never: interpret permissions, identity or locks; touch file bodies (that is `content.py`); commit
on its own (the daemon's commit window decides, see `Store.commit`).
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass

ROOT_INODE = 1
S_IFMT_MASK = 0o170000  # the file-type bits of st_mode (stat.S_IFMT is a function)
FORMAT_VERSION = 1

SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inodes (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: an inode number is never reused
    mode     INTEGER NOT NULL,
    uid      INTEGER NOT NULL,
    gid      INTEGER NOT NULL,
    nlink    INTEGER NOT NULL,
    size     INTEGER NOT NULL DEFAULT 0,
    rdev     INTEGER NOT NULL DEFAULT 0,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL
);
CREATE TABLE dentries (
    parent INTEGER NOT NULL,
    name   BLOB NOT NULL,
    inode  INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
);
CREATE INDEX dentries_by_inode ON dentries (inode);
CREATE INDEX dentries_by_parent ON dentries (parent);  -- (parent, rowid): readdir order
CREATE TABLE symlinks (inode INTEGER PRIMARY KEY, target BLOB NOT NULL);
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name  BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
"""

_INODE_COLUMNS = "id, mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns"


@dataclass(slots=True, eq=False)
class Inode:
    """One file, folder, link or node. Identity-hashed so it can sit in the dirty set."""

    id: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    def touch_content(self, now_ns: int) -> None:
        self.mtime_ns = self.ctime_ns = now_ns


def connect(db_path: str) -> sqlite3.Connection:
    """The connection settings every opener of the database uses."""
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit survives a crash of this process; Store.sync adds the fsync a client's fsync needs.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-65536")
    return conn


def connect_read_only(db_path: str) -> sqlite3.Connection:
    """A connection that can only read (queries by the CLI, or in the daemon's worker threads)."""
    from urllib.request import pathname2url

    return sqlite3.connect(f"file:{pathname2url(db_path)}?mode=ro", uri=True, check_same_thread=False)


def create_schema(conn: sqlite3.Connection, root_uid: int, root_gid: int, now_ns: int) -> None:
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    conn.execute(
        f"INSERT INTO inodes ({_INODE_COLUMNS}) VALUES (?, ?, ?, ?, 2, 0, 0, ?, ?, ?)",
        (ROOT_INODE, stat.S_IFDIR | 0o755, root_uid, root_gid, now_ns, now_ns, now_ns),
    )
    conn.executemany(
        "INSERT INTO settings (key, value) VALUES (?, ?)",
        [("format_version", str(FORMAT_VERSION)), ("clean", "1"), ("created_ns", str(now_ns))],
    )
    conn.execute("COMMIT")


class Meta:
    """The tree's metadata over one connection, with a write-back cache of inodes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.cache: dict[int, Inode] = {}
        self.dirty: set[Inode] = set()
        # One (parent, name) of each inode the kernel refers to: paths for the journal without SQL.
        self.names: dict[int, tuple[int, bytes]] = {}

    # -- transactions -------------------------------------------------------------------------

    def begin(self) -> None:
        """Open the write transaction if none is open; every change calls this first."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")

    @property
    def has_pending(self) -> bool:
        return bool(self.dirty) or self.conn.in_transaction

    def _write_inodes(self, inodes: list[Inode]) -> None:
        self.begin()
        self.conn.executemany(
            "UPDATE inodes SET mode=?, uid=?, gid=?, nlink=?, size=?, rdev=?, atime_ns=?, mtime_ns=?,"
            " ctime_ns=? WHERE id=?",
            [(i.mode, i.uid, i.gid, i.nlink, i.size, i.rdev, i.atime_ns, i.mtime_ns, i.ctime_ns, i.id) for i in inodes],
        )
        self.dirty.difference_update(inodes)

    def write_back(self) -> None:
        """Write every dirty inode into the open transaction."""
        if self.dirty:
            self._write_inodes(list(self.dirty))

    def commit(self) -> None:
        self.write_back()
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    # -- settings -----------------------------------------------------------------------------

    def setting(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        self.begin()
        self.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    # -- inodes -------------------------------------------------------------------------------

    def get(self, ino: int) -> Inode | None:
        inode = self.cache.get(ino)
        if inode is None:
            row = self.conn.execute(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id=?", (ino,)).fetchone()
            if row is None:
                return None
            inode = self.cache[ino] = Inode(*row)
        return inode

    def changed(self, inode: Inode) -> None:
        """Note that a cached inode's attributes changed; written back at the next commit."""
        self.dirty.add(inode)

    def new_inode(self, mode: int, uid: int, gid: int, rdev: int, now_ns: int) -> Inode:
        self.begin()
        nlink = 2 if stat.S_ISDIR(mode) else 1
        cursor = self.conn.execute(
            "INSERT INTO inodes (mode, uid, gid, nlink, size, rdev, atime_ns, mtime_ns, ctime_ns)"
            " VALUES (?, ?, ?, ?, 0, ?, ?, ?, ?)",
            (mode, uid, gid, nlink, rdev, now_ns, now_ns, now_ns),
        )
        inode = Inode(cursor.lastrowid, mode, uid, gid, nlink, 0, rdev, now_ns, now_ns, now_ns)
        self.cache[inode.id] = inode
        return inode

    def delete_inode(self, ino: int) -> None:
        self.begin()
        inode = self.cache.pop(ino, None)
        if inode is not None:
            self.dirty.discard(inode)
        self.names.pop(ino, None)
        self.conn.execute("DELETE FROM inodes WHERE id=?", (ino,))
        self.conn.execute("DELETE FROM symlinks WHERE inode=?", (ino,))
        self.conn.execute("DELETE FROM xattrs WHERE inode=?", (ino,))

    def evict(self, ino: int) -> None:
        """Drop an inode the kernel no longer refers to from the cache (written back first if dirty)."""
        inode = self.cache.pop(ino, None)
        self.names.pop(ino, None)
        if inode is not None and inode in self.dirty:
            self._write_inodes([inode])

    # -- directory entries --------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self.conn.execute("SELECT inode FROM dentries WHERE parent=? AND name=?", (parent, name)).fetchone()
        if row is None:
            return None
        self.names[row[0]] = (parent, name)
        return row[0]

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.begin()
        self.conn.execute("INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino))
        self.names[ino] = (parent, name)

    def remove_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.begin()
        self.conn.execute("DELETE FROM dentries WHERE parent=? AND name=?", (parent, name))
        if self.names.get(ino) == (parent, name):
            del self.names[ino]  # another name (a hard link) is found through SQL when next needed

    def repoint_entry(self, parent: int, name: bytes, ino: int) -> None:
        self.begin()
        self.conn.execute("UPDATE dentries SET inode=? WHERE parent=? AND name=?", (ino, parent, name))
        self.names[ino] = (parent, name)

    def move_entry(self, parent: int, name: bytes, new_parent: int, new_name: bytes, ino: int) -> None:
        self.begin()
        self.conn.execute(
            "UPDATE dentries SET parent=?, name=? WHERE parent=? AND name=?", (new_parent, new_name, parent, name)
        )
        self.names[ino] = (new_parent, new_name)

    def has_entries(self, ino: int) -> bool:
        return self.conn.execute("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (ino,)).fetchone() is not None

    def entries_after(self, parent: int, cookie: int, limit: int = 256) -> list[tuple[bytes, int, int]]:
        """Up to `limit` (name, inode, cookie) of a folder's entries in a stable order, after `cookie`."""
        return self.conn.execute(
            "SELECT name, inode, rowid FROM dentries WHERE parent=? AND rowid>? ORDER BY rowid LIMIT ?",
            (parent, cookie, limit),
        ).fetchall()

    def parent_of(self, dir_ino: int) -> int:
        """The parent of a folder (folders have exactly one entry); the root is its own parent."""
        if dir_ino == ROOT_INODE:
            return ROOT_INODE
        found = self.name_of(dir_ino)
        return found[0] if found else ROOT_INODE

    def parents_of(self, ino: int) -> list[int]:
        """Every folder holding a name of `ino` (a folder has one; a hard-linked file several)."""
        inode = self.cache.get(ino)
        if inode is not None and inode.is_dir:
            return [self.parent_of(ino)]
        return [r[0] for r in self.conn.execute("SELECT DISTINCT parent FROM dentries WHERE inode=?", (ino,))]

    def is_ancestor(self, ancestor: int, ino: int) -> bool:
        """Whether folder `ancestor` is `ino` or lies on the path from `ino` to the root."""
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INODE:
                return False
            ino = self.parent_of(ino)

    def name_of(self, ino: int) -> tuple[int, bytes] | None:
        """One (parent, name) of an inode, or None when it has no entry left."""
        known = self.names.get(ino)
        if known is None:
            row = self.conn.execute("SELECT parent, name FROM dentries WHERE inode=? LIMIT 1", (ino,)).fetchone()
            if row is None:
                return None
            known = (row[0], row[1])
        return known

    def path_of(self, ino: int) -> bytes | None:
        """One path of an inode from the workspace root (`/a/b`), or None when it has no entry left."""
        parts: list[bytes] = []
        for _ in range(4096):  # deeper than PATH_MAX allows; a loop here would be a damaged store
            if ino == ROOT_INODE:
                return b"/" + b"/".join(reversed(parts))
            found = self.name_of(ino)
            if found is None:
                return None
            ino, name = found
            parts.append(name)
        return None

    def child_path(self, parent: int, name: bytes) -> bytes | None:
        folder = self.path_of(parent)
        return None if folder is None else folder.rstrip(b"/") + b"/" + name

    # -- symlinks and xattrs ------------------------------------------------------------------

    def set_symlink(self, ino: int, target: bytes) -> None:
        self.begin()
        self.conn.execute("INSERT OR REPLACE INTO symlinks (inode, target) VALUES (?, ?)", (ino, target))

    def symlink_target(self, ino: int) -> bytes | None:
        row = self.conn.execute("SELECT target FROM symlinks WHERE inode=?", (ino,)).fetchone()
        return row[0] if row else None

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self.conn.execute("SELECT value FROM xattrs WHERE inode=? AND name=?", (ino, name)).fetchone()
        return row[0] if row else None

    def xattr_names(self, ino: int) -> list[bytes]:
        return [r[0] for r in self.conn.execute("SELECT name FROM xattrs WHERE inode=? ORDER BY name", (ino,))]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.begin()
        self.conn.execute("INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)", (ino, name, value))

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        self.begin()
        return self.conn.execute("DELETE FROM xattrs WHERE inode=? AND name=?", (ino, name)).rowcount > 0

    def inodes_with_xattr(self, name: bytes) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT inode FROM xattrs WHERE name=?", (name,))}

    # -- totals -------------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """(number of files and folders, bytes in regular files), the root excluded."""
        count, size = self.conn.execute(
            "SELECT COUNT(*) - 1, COALESCE(SUM(CASE WHEN mode & ? = ? THEN size END), 0) FROM inodes",
            (S_IFMT_MASK, stat.S_IFREG),
        ).fetchone()
        return count, size
