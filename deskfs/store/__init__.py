"""The workspace store on disk: `STORE/deskfs.db`, `STORE/objects/`, `STORE/run/`.

Owns creating a store, opening it for exactly one daemon (an exclusive lock on `STORE/run/daemon.lock`
held for the daemon's life), the commit window, durability on fsync, and the clean-shutdown mark that
tells the next mount whether to run fsck first; and the journal's signed head (`STORE/journal.head`,
signed with `STORE/journal.key`; see docs/journal.md), rewritten after each commit that added records.

Must never: be opened for writing by anything but the daemon or fsck; leave a half-written state
that fsck cannot explain.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from deskfs import journal
from deskfs.errors import DeskfsError
from deskfs.journal import Journal, daemon_actor
from deskfs.layout import (check_is_store, db_path, journal_head_path, journal_key_path, lock_path, log_path,
                           take_daemon_lock)
from deskfs.store import meta
from deskfs.store.content import Content, SpaceGuard
from deskfs.store.meta import Meta
from deskfs.store.versions import Versions

log = logging.getLogger(__name__)


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
    # The empty journal's signed head, and the key it is signed with (the head first: a key without a
    # head is a removed head, a head without its key the store of an older deskfs).
    key = journal.new_key()
    empty = journal.Head(0, journal.GENESIS, 0, journal.GENESIS, journal.this_boot())
    journal.write_private_file(journal_head_path(store_path), journal.head_block(empty, key), None, durable=True)
    journal.write_private_file(journal_key_path(store_path), journal.key_text(key), None, durable=True)
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
    versions = os.path.join(store_path, "versions")
    if os.path.isdir(versions):
        os.chmod(versions, 0o700)
    for private in (db_path(store_path), lock_path(store_path), log_path(store_path),
                    journal_key_path(store_path), journal_head_path(store_path)):
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
            self._open_signed_head()
        except Exception:
            os.close(self._lock_fd)
            raise
        self.content = Content(os.path.join(self.path, "objects"), SpaceGuard(self.path, space_reserve))
        self.versions = Versions(self.conn, self.meta.begin, os.path.join(self.path, "versions"),
                                 self.content.path, self.meta.setting)
        self.content.guard.make_room = self._drop_versions_for_space
        self._after_commit: list[Callable[[], object]] = []
        self.was_clean = self.meta.setting("clean") == "1"
        set_access_modes(self.path)

    def _drop_versions_for_space(self, wanted: int) -> int:
        """A write would not fit: old versions yield to live data (oldest first), journaled as `gc`."""
        from deskfs.journal import daemon_actor

        dropped, freed = self.versions.free_space(wanted)
        if dropped:
            self.journal.record(daemon_actor(), "gc", dropped=dropped, freed=freed, reason="disk full")
        return freed

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

    # -- the journal's signed head ------------------------------------------------------------

    def _open_signed_head(self) -> None:
        """Take the key that signs the journal's head, and check that the database still reaches the head
        signed last. If it does not (records removed or replaced while no daemon had the store), the
        finding becomes a `head_mismatch` record before anything is signed again, so the next head
        covers the evidence instead of erasing it. A store made before signed heads (no key) gets a key
        now, saved with the first head (first use: what the database holds then is trusted)."""
        db = os.stat(db_path(self.path))
        self._owner = (db.st_uid, db.st_gid) if os.geteuid() == 0 else None  # a root daemon's files stay the owner's
        self.head: journal.Head | None = None  # the last head this process signed
        self._head_fd: int | None = None  # the head file, once this process has written it
        self._head_failing = False
        self._sync_files()  # what the database holds now is on disk: the next head may say so
        self._durable = (self.journal.committed_seq, self.journal.committed_hash)
        problem, signed_seq = None, None
        try:
            key = journal.read_key(self.path)
        except journal.KeyAltered as exc:
            key, problem = None, f"the journal key was altered ({exc})"
        if key is not None:
            state = journal.load_head(self.path, key)
            if state.problem is not None:
                problem = state.problem
            else:
                assert state.head is not None
                signed_seq = state.head.trusted_seq(journal.this_boot())
                found = journal.head_problem(self.conn, state.head, journal.this_boot())
                problem = None if found is None else found[1]
        self._key = key if key is not None else journal.new_key()
        self._key_saved = key is not None
        if problem is not None:
            log.warning("journal of %s: %s", self.path, problem)
            self.journal.record(daemon_actor(), "head_mismatch", signed_seq=signed_seq,
                                found_seq=self.journal.committed_seq, reason=problem)

    def _sync_files(self) -> bool:
        """fsync the database and its WAL: every commit so far is on disk. False if there is no WAL."""
        synced = True
        for path in (db_path(self.path), db_path(self.path) + "-wal"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                synced = False
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return synced

    def _sign_head(self, durable: bool = False) -> None:
        """Write the signed head for what is committed now (with `durable`, fsynced). A failure is logged
        once and retried at the next commit: the head on disk then lags, which verification accepts.

        The first head of a process, and a durable one (at close), replace the file (a new file renamed
        over it, fsynced); the others are one pwrite of a fixed-size block into it (with the HMAC, under
        20 µs: a commit's only extra cost). A pwrite ends whole or not at all for a `kill -9`, and lies
        within one disk sector."""
        last = self.head
        if (not durable and last is not None and last.seq == self.journal.committed_seq
                and last.durable_seq == self._durable[0]):
            return  # nothing committed since: the commit window's usual case
        head = journal.Head(self.journal.committed_seq, self.journal.committed_hash, *self._durable,
                            journal.this_boot())
        if head == self.head and not durable:
            return
        block = journal.head_block(head, self._key)
        try:
            if self._head_fd is None or durable:  # the path gets this head, whatever was put there meanwhile
                journal.write_private_file(journal_head_path(self.path), block, self._owner, durable=True)
                if self._head_fd is not None:
                    os.close(self._head_fd)
                self._head_fd = os.open(journal_head_path(self.path), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            else:
                os.pwrite(self._head_fd, block, 0)
            if not self._key_saved:
                journal.write_private_file(journal_key_path(self.path), journal.key_text(self._key), self._owner,
                                           durable=True)
                self._key_saved = True
        except OSError as exc:
            if not self._head_failing:
                log.warning("cannot write the journal's signed head of %s: %s", self.path, exc)
            self._head_failing = True
            return
        self._head_failing = False
        self.head = head

    def head_state(self) -> journal.HeadState:
        """The head this daemon signed last, for verifying the journal while mounted."""
        if self.head is None:
            return journal.HeadState(None, note="no head was signed yet")
        return journal.HeadState(self.head)

    def mark_in_use(self) -> None:
        """From now until `close`, a crash leaves the store marked for fsck."""
        self.meta.set_setting("clean", "0")
        self.meta.commit()

    def commit(self) -> None:
        """End the commit window: dirty inodes, pending changes and their journal records, one transaction."""
        self._commit()
        self._sign_head()

    def _commit(self) -> None:
        if self.journal.has_pending:
            self.journal.flush()
        if self.meta.has_pending:
            self.meta.commit()
            self.journal.committed()
        while self._after_commit:  # what may only happen once the commit that allows it is in
            self._after_commit.pop(0)()

    def after_commit(self, action: Callable[[], object]) -> None:
        """Run `action` right after the next commit (deleting a body the committed state no longer names:
        before it, a crash would leave a name whose content is gone)."""
        self._after_commit.append(action)

    def sync(self) -> None:
        """Commit and make the commit durable (a client's fsync waits for this)."""
        self._commit()
        wal = db_path(self.path) + "-wal"
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._sign_head()
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._durable = (self.journal.committed_seq, self.journal.committed_hash)
        self._sign_head()

    def close(self, clean: bool = True) -> None:
        self.content.close_all()
        if clean:
            self.commit()
            self.meta.set_setting("clean", "1")
            self.meta.commit()
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # syncs the database file
            self._durable = (self.journal.committed_seq, self.journal.committed_hash)
            self._sign_head(durable=True)
        if self._head_fd is not None:
            os.close(self._head_fd)
        self.conn.close()
        os.close(self._lock_fd)
