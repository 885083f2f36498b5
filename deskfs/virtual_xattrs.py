"""The `user.deskfs.*` xattrs: identity and locks through plain getfattr/setfattr.

- `user.deskfs.whoami` (get, any inode): the caller's principal.
- `user.deskfs.lock` (get: every holder, one per line; set `exclusive|shared [ttl=S] [new]` takes or
  renews a lease, set `break` removes every lease (workspace owner only); remove releases the caller's).
- `user.deskfs.locks` (get, on the root): every lock in the workspace, as JSON.

Owns the text formats of these values, who may do what with them, and journaling lease changes and
refusals (`lock`, `unlock`, `lock_break`). A lease is granted only once the kernel locks that stand for
it are held (`lease_locks.py`): `set` then returns a coroutine when the daemon must first open the file.
Must never: store anything in the real xattr table; let another principal release a lease.
"""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Iterator

from deskfs.access import EDITOR, OWNER, Access
from deskfs.identity import Identity
from deskfs.journal import Actor, Journal
from deskfs.locks import EXCLUSIVE, Holder, LeaseRequest, LockError, LockTable, iso
from deskfs.store.meta import ROOT_INODE, Meta

if TYPE_CHECKING:
    from deskfs.lease_locks import LeaseLocks

PREFIX = b"user.deskfs."
WHOAMI = b"user.deskfs.whoami"
LOCK = b"user.deskfs.lock"
LOCKS = b"user.deskfs.locks"
BREAK = b"break"


def is_virtual(name: bytes) -> bool:
    return name.startswith(PREFIX)


def holder_json(path: str, holder: Holder) -> dict:
    return {
        "path": path, "kind": holder.kind, "mode": holder.mode, "principal": holder.principal,
        "pid": holder.pid, "since": iso(holder.since_ns),
        "expires": iso(holder.expires_ns) if holder.expires_ns is not None else None,
    }


class VirtualXattrs:
    def __init__(self, identity: Identity, locks: LockTable, meta: Meta, journal: Journal, access: Access,
                 lease_locks: LeaseLocks | None = None) -> None:
        self.lease_locks = lease_locks
        self.identity = identity
        self.locks = locks
        self.meta = meta
        self.journal = journal
        self.access = access

    def get(self, ino: int, name: bytes, actor: Actor) -> bytes:
        if name == WHOAMI:
            return actor.principal.encode()
        if name == LOCK:
            holders = self.locks.holders(ino)
            if not holders:
                raise LockError(errno.ENODATA, "not locked")
            return "\n".join(h.describe() for h in holders).encode()
        if name == LOCKS and ino == ROOT_INODE:
            return json.dumps(self.all_locks(self.visible_paths(actor))).encode()
        raise LockError(errno.ENODATA, "no such attribute")

    def visible_paths(self, actor: Actor) -> Callable[[str], bool] | None:
        """Which paths `actor` may see in a listing: all for the owner, else those its Unix user may read."""
        readable = self.access.reader_filter(actor, self.meta.conn)
        return None if readable is None else readable.path_readable

    def all_locks(self, visible: Callable[[str], bool] | None = None) -> list[dict]:
        """Every lock held, with its path (only paths `visible` lets through, if given)."""
        listed = []
        for inode, holders in sorted(self.locks.all_holders().items()):
            path = self.meta.path_of(inode)
            if path is None or (visible is not None and not visible(path.decode("utf-8", "backslashreplace"))):
                continue
            listed += [holder_json(path.decode("utf-8", "surrogateescape"), h) for h in holders]
        return listed

    def set(self, ino: int, name: bytes, value: bytes, actor: Actor,
            path: str | None) -> Coroutine[Any, Any, None] | None:
        if name != LOCK:
            raise LockError(errno.EPERM, "read-only attribute")
        if value.strip() == BREAK:
            with self._journaled(actor, "lock_break", ino, path):
                if self.access.role(actor.principal) < OWNER:
                    raise LockError(errno.EPERM, "only the workspace owner may break a lease")
                self.locks.leases.break_all(ino)
            return
        request = LeaseRequest.parse(value)
        session = self.identity.session_of(actor.pid, actor.uid)
        take = partial(self._take, ino, actor, request, session.id if session else None)
        details = {"kind": "lease", "mode": request.mode, "ttl": request.ttl}
        missing = self.lease_locks.needs_opening(ino, request.mode, actor.principal) if self.lease_locks else []
        with self._journaled(actor, "lock", ino, path, done=not missing, **details):
            take(check_only=bool(missing))  # refused at once if it would be refused anyway
        return self._take_when_open(missing, take, actor, ino, path, details) if missing else None

    async def _take_when_open(self, missing: list[int], take: Callable[[], None], actor: Actor, ino: int,
                              path: str | None, details: dict) -> None:
        """The lease, once the daemon has opened what its kernel locks need (FUSE is served meanwhile)."""
        with self._journaled(actor, "lock", ino, path, **details):
            await self.lease_locks.open(missing)
            take()

    def _take(self, ino: int, actor: Actor, request: LeaseRequest, session: int | None,
              check_only: bool = False) -> None:
        self._require_editor(actor)
        inode = self.meta.get(ino)
        if inode is None or not (inode.is_regular or inode.is_dir):
            raise LockError(errno.EINVAL, "only regular files and folders can be leased")
        others = self.locks.kernel.held().get(ino, [])
        self.locks.leases.check(ino, actor.principal, request, others)
        above = self.locks.blocker_above(ino, actor.principal)
        below = self.locks.blocker_below(ino, actor.principal) if request.mode == EXCLUSIVE and inode.is_dir else None
        if above is not None or below is not None:
            raise LockError(errno.EBUSY, f"locked by {(above or below).principal}")
        if check_only or self.lease_locks is None:
            if not check_only:
                self.locks.leases.take(ino, actor.principal, actor.pid, request, session, others)
            return
        self.lease_locks.hold(ino, request.mode, actor.principal)  # EBUSY if a kernel lock is in the way
        try:
            self.locks.leases.take(ino, actor.principal, actor.pid, request, session, others)
        finally:
            self.lease_locks.sync(ino)  # as the leases now want (undone if refused; a renewal may downgrade)

    def remove(self, ino: int, name: bytes, actor: Actor, path: str | None) -> None:
        if name != LOCK:
            raise LockError(errno.EPERM, "read-only attribute")
        with self._journaled(actor, "unlock", ino, path, kind="lease"):
            self._require_editor(actor)
            self.locks.leases.release(ino, actor.principal)

    def _require_editor(self, actor: Actor) -> None:
        if self.access.role(actor.principal) < EDITOR:
            raise LockError(errno.EACCES, "only editors and the owner may lock")

    @contextmanager
    def _journaled(self, actor: Actor, op: str, ino: int, path: str | None, done: bool = True,
                   **details: object) -> Iterator[None]:
        """Journal `op` when the body succeeds (if `done`: not a step before the end), and as denied when
        the body refuses it (EBUSY, EPERM)."""
        try:
            yield
        except LockError as exc:
            if exc.errno in (errno.EBUSY, errno.EPERM, errno.EACCES):
                self.journal.record(actor, op, ino, path, errno=exc.errno, reason=str(exc), **details)
            raise
        if done:
            self.journal.record(actor, op, ino, path, **details)
