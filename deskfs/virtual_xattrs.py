"""The `user.deskfs.*` xattrs: identity and locks through plain getfattr/setfattr.

- `user.deskfs.whoami` (get, any inode): the caller's principal.
- `user.deskfs.lock` (get: every holder, one per line; set `exclusive|shared [ttl=S] [new]` takes or
  renews a lease, set `break` removes every lease (workspace owner only); remove releases the caller's).
- `user.deskfs.locks` (get, on the root): every lock in the workspace, as JSON.

Owns the text formats of these values, who may do what with them, and journaling lease changes and
refusals (`lock`, `unlock`, `lock_break`).
Must never: store anything in the real xattr table; let another principal release a lease.
"""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from typing import Callable, Iterator

from deskfs.access import EDITOR, OWNER, Access
from deskfs.identity import Identity
from deskfs.journal import Actor, Journal
from deskfs.locks import Holder, LeaseRequest, LockError, LockTable, iso
from deskfs.store.meta import ROOT_INODE, Meta

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
    def __init__(self, identity: Identity, locks: LockTable, meta: Meta, journal: Journal, access: Access) -> None:
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

    def set(self, ino: int, name: bytes, value: bytes, actor: Actor, path: str | None) -> None:
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
        with self._journaled(actor, "lock", ino, path, kind="lease", mode=request.mode, ttl=request.ttl):
            self._require_editor(actor)
            self.locks.leases.take(ino, actor.principal, actor.pid, request, session.id if session else None,
                                   self.locks.kernel.held().get(ino, []))

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
    def _journaled(self, actor: Actor, op: str, ino: int, path: str | None, **details: object) -> Iterator[None]:
        """Journal `op` when the body succeeds, and as denied when the body refuses it (EBUSY, EPERM)."""
        try:
            yield
        except LockError as exc:
            if exc.errno in (errno.EBUSY, errno.EPERM, errno.EACCES):
                self.journal.record(actor, op, ino, path, errno=exc.errno, reason=str(exc), **details)
            raise
        self.journal.record(actor, op, ino, path, **details)
