"""Checking and repairing a store after a crash.

Owns the invariants between the tables and the backing files: every entry names a live inode in a
live folder, link counts match entries, nothing is left without a name, the backing file's length is
a regular file's size, and no backing file exists without its inode.

Must never: run while a daemon has the store mounted (the caller holds the store's lock); delete data
that still has a name (an inode with links but no entry goes to /lost+found, not away).
"""

from __future__ import annotations

import os
import stat
import time

from deskfs.errors import DeskfsError
from deskfs.store import Store
from deskfs.store.meta import ROOT_INODE, S_IFMT_MASK

LOST_AND_FOUND = b"lost+found"
_IS_DIR = f"(mode & {S_IFMT_MASK}) = {stat.S_IFDIR}"
_IS_REG = f"(mode & {S_IFMT_MASK}) = {stat.S_IFREG}"


def fsck(store: Store) -> list[str]:
    """Check `store` and repair what is wrong; returns one line per repair (empty when all was well)."""
    conn = store.conn
    verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
    if verdict != "ok":
        raise DeskfsError(f"the database of {store.path} is damaged beyond repair by fsck: {verdict}")
    store.meta.commit()
    store.meta.begin()
    repairs: list[str] = []
    repairs += _drop_dangling_entries(store)
    repairs += _free_unnamed_inodes(store)
    repairs += _adopt_orphans(store)
    repairs += _fix_link_counts(store)
    repairs += _fix_sizes(store)
    repairs += _drop_stray_objects(store)
    repairs += store.versions.check()
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for table in ("symlinks", "xattrs", "leases"):  # leases: made by the daemon's first open
        if table not in tables:
            continue
        gone = conn.execute(f"DELETE FROM {table} WHERE inode NOT IN (SELECT id FROM inodes)").rowcount
        if gone:
            repairs.append(f"removed {gone} {table} rows of deleted inodes")
    store.meta.cache.clear()
    store.meta.names.clear()
    store.meta.commit()
    return repairs


def _drop_dangling_entries(store: Store) -> list[str]:
    gone = store.conn.execute(
        "DELETE FROM dentries WHERE inode NOT IN (SELECT id FROM inodes)"
        f" OR parent NOT IN (SELECT id FROM inodes WHERE {_IS_DIR})"
    ).rowcount
    return [f"removed {gone} directory entries pointing at nothing"] if gone else []


def _free_unnamed_inodes(store: Store) -> list[str]:
    """Inodes unlinked while open when the daemon died: nobody can reach them any more."""
    rows = store.conn.execute(
        f"SELECT id, mode FROM inodes WHERE id != {ROOT_INODE} AND nlink = 0"
        " AND id NOT IN (SELECT inode FROM dentries)"
    ).fetchall()
    for ino, mode in rows:
        store.conn.execute("DELETE FROM inodes WHERE id=?", (ino,))
        if stat.S_ISREG(mode):
            store.content.delete(ino)
    return [f"freed {len(rows)} deleted files that were still open at the crash"] if rows else []


def _adopt_orphans(store: Store) -> list[str]:
    rows = store.conn.execute(
        f"SELECT id FROM inodes WHERE id != {ROOT_INODE} AND id NOT IN (SELECT inode FROM dentries)"
    ).fetchall()
    if not rows:
        return []
    folder = _lost_and_found(store)
    for (ino,) in rows:
        store.conn.execute(
            "INSERT INTO dentries (parent, name, inode) VALUES (?, ?, ?)", (folder, f"#{ino}".encode(), ino)
        )
    return [f"moved {len(rows)} files without a name to /lost+found"]


def _lost_and_found(store: Store) -> int:
    existing = store.meta.lookup(ROOT_INODE, LOST_AND_FOUND)
    if existing is not None:
        return existing
    inode = store.meta.new_inode(stat.S_IFDIR | 0o700, 0, 0, 0, time.time_ns())
    store.meta.add_entry(ROOT_INODE, LOST_AND_FOUND, inode.id)
    return inode.id


def _fix_link_counts(store: Store) -> list[str]:
    conn = store.conn
    wrong = conn.execute(
        f"""SELECT i.id, i.nlink,
                  CASE WHEN {_IS_DIR.replace('mode', 'i.mode')}
                       THEN 2 + (SELECT COUNT(*) FROM dentries d JOIN inodes c ON c.id = d.inode
                                 WHERE d.parent = i.id AND {_IS_DIR.replace('mode', 'c.mode')})
                       ELSE (SELECT COUNT(*) FROM dentries d WHERE d.inode = i.id) END AS actual
           FROM inodes i WHERE i.nlink != actual"""
    ).fetchall()
    conn.executemany("UPDATE inodes SET nlink=? WHERE id=?", [(actual, ino) for ino, _, actual in wrong])
    return [f"corrected the link count of {len(wrong)} inodes"] if wrong else []


def _fix_sizes(store: Store) -> list[str]:
    """After a crash the backing file holds what was written; its length is the size."""
    fixes = []
    for ino, size in store.conn.execute(f"SELECT id, size FROM inodes WHERE {_IS_REG}").fetchall():
        try:
            actual = os.stat(store.content.path(ino)).st_size
        except FileNotFoundError:
            actual = 0
        if actual != size:
            fixes.append((actual, ino))
    store.conn.executemany("UPDATE inodes SET size=? WHERE id=?", fixes)
    return [f"corrected the size of {len(fixes)} files to what their bodies hold"] if fixes else []


def _drop_stray_objects(store: Store) -> list[str]:
    """Bodies created for files whose creation never committed."""
    regular = {r[0] for r in store.conn.execute(f"SELECT id FROM inodes WHERE {_IS_REG}")}
    stray = 0
    for bucket in os.scandir(store.content.objects_dir):
        if not bucket.is_dir():
            continue
        for entry in os.scandir(bucket.path):
            if not entry.name.isdigit() or int(entry.name) not in regular:
                os.unlink(entry.path)
                stray += 1
    return [f"removed {stray} file bodies that belonged to no file"] if stray else []
