"""The workspace store on disk: `STORE/deskfs.db`, `STORE/objects/`, `STORE/run/`.

Owns creating a store, opening it for exactly one daemon (an exclusive lock on `STORE/run/daemon.lock`
held for the daemon's life), the commit window, durability on fsync, and the clean-shutdown mark that
tells the next mount whether to run fsck first.

Must never: be opened for writing by anything but the daemon or fsck; leave a half-written state
that fsck cannot explain.
"""

from __future__ import annotations

import os
import time

from deskfs.errors import DeskfsError
from deskfs.journal import Journal
from deskfs.layout import check_is_store, db_path, lock_path, log_path, take_daemon_lock
from deskfs.store import meta
from deskfs.store.content import Content, SpaceGuard
from deskfs.store.meta import Meta


def init_store(store_path: str, uid: int, gid: int, owner: str) -> None:
    """Create an empty store owned by principal `owner`; refuses a folder that holds one or anything else."""
    from deskfs import access, identity  # here: their own imports reach this package

    store_path = os.path.abspath(store_path)
    if os.path.exists(db_path(store_path)):
        raise DeskfsError(f"{store_path} is already a deskfs store")
    if os.path.exists(store_path) and (not os.path.isdir(store_path) or os.listdir(store_path)):
        raise DeskfsError(f"{store_path} exists and is not an empty folder")
    os.makedirs(os.path.join(store_path, "run"), exist_ok=True)
    Content.create_layout(os.path.join(store_path, "objects"))
    tmp = db_path(store_path) + ".new"
    conn = meta.connect(tmp)
    try:
        meta.create_schema(conn, uid, gid, time.time_ns())
        conn.execute("INSERT INTO settings (key, value) VALUES ('owner_uid', ?)", (str(uid),))
        access.add_owner(conn, owner, time.time_ns())
        conn.executescript(identity.SCHEMA)
        if owner.startswith("agent:"):  # the agent is this Unix user's: nobody else may claim it first
            identity.bind_agent(conn, owner[len("agent:"):], uid)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    for leftover in (tmp + "-wal", tmp + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    os.chmod(tmp, 0o600)
    # The database appears whole or not at all: a crash during init leaves no half store.
    os.rename(tmp, db_path(store_path))
    set_access_modes(store_path)


def set_access_modes(store_path: str) -> None:
    """Any local user may reach the control socket (it decides by peer credentials); nothing else is theirs.

    The store and run/ can be traversed but not listed; the database, bodies, lock and log are the owner's.
    """
    os.chmod(store_path, 0o711)
    os.chmod(os.path.join(store_path, "run"), 0o711)
    os.chmod(os.path.join(store_path, "objects"), 0o700)
    for private in (db_path(store_path), lock_path(store_path), log_path(store_path)):
        if os.path.exists(private):
            os.chmod(private, 0o600)


class Store:
    """An opened store, owned by one process."""

    def __init__(self, store_path: str, space_reserve: int | None = None) -> None:
        self.path = os.path.abspath(store_path)
        check_is_store(self.path)
        self._lock_fd = take_daemon_lock(self.path)
        if self._lock_fd is None:
            raise DeskfsError(f"store {self.path} is already in use by a running deskfs (unmount it first)")
        try:
            self.conn = meta.connect(db_path(self.path))
            self.meta = Meta(self.conn)
            self._check_format()
            self.journal = Journal(self.conn, self.meta.begin)
        except Exception:
            os.close(self._lock_fd)
            raise
        self.content = Content(os.path.join(self.path, "objects"), SpaceGuard(self.path, space_reserve))
        self.was_clean = self.meta.setting("clean") == "1"
        set_access_modes(self.path)

    @property
    def owner_uid(self) -> int:
        """The workspace owner: the Unix user who ran `deskfs init`."""
        recorded = self.meta.setting("owner_uid")
        if recorded is not None:
            return int(recorded)
        root = self.meta.get(meta.ROOT_INODE)
        return root.uid if root is not None else 0

    def _check_format(self) -> None:
        version = int(self.meta.setting("format_version", "0") or 0)
        if version > meta.FORMAT_VERSION:
            raise DeskfsError(
                f"store {self.path} has format {version}, newer than this deskfs understands"
                f" ({meta.FORMAT_VERSION}); upgrade deskfs"
            )
        if version < 1:
            raise DeskfsError(f"{self.path} is not a deskfs store (no format version)")

    def mark_in_use(self) -> None:
        """From now until `close`, a crash leaves the store marked for fsck."""
        self.meta.set_setting("clean", "0")
        self.meta.commit()

    def commit(self) -> None:
        """End the commit window: dirty inodes, pending changes and their journal records, one transaction."""
        if self.journal.has_pending:
            self.journal.flush()
        if self.meta.has_pending:
            self.meta.commit()
            self.journal.committed()

    def sync(self) -> None:
        """Commit and make the commit durable (a client's fsync waits for this)."""
        self.commit()
        wal = db_path(self.path) + "-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self, clean: bool = True) -> None:
        self.content.close_all()
        if clean:
            self.commit()
            self.meta.set_setting("clean", "1")
            self.meta.commit()
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()
        os.close(self._lock_fd)
