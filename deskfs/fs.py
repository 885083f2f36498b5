"""The FUSE face of deskfs: `Operations` translates kernel requests into calls on the store.

Owns the kernel's view of the tree while mounted: lookup counts, open handles (each bound to the actor
that opened it), what the kernel may cache, and the rule that an inode is freed only when it has no name,
no lookup count and no open handle left. Each handler asks `access` (role) and `locks` (EBUSY) whether
the caller may, does the change on the store, and tells the journal what happened or was refused.

Must never: block (every handler is synchronous code between two awaits, so the loop stays atomic and
no SQL or file call may wait on anything slow; the one exception, a lease or an open waiting for the
daemon's own open of a file, awaits while another pyfuse3 task serves: see lease_locks.py); let an
exception other than FUSEError reach pyfuse3 (it would end the mount); decide policy that belongs to
the modules below.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from dataclasses import dataclass
from types import CoroutineType
from typing import Any, Callable, Sequence

import pyfuse3

from deskfs import virtual_xattrs
from deskfs.access import EDITOR, ROLE_OF_RANK, VIEWER, Access
from deskfs.identity import Identity, LookupFailed, user_principal
from deskfs.journal import DAEMON_PRINCIPAL, Actor, Journal, daemon_actor, path_text
from deskfs.lease_locks import LeaseLocks
from deskfs.locks import Holder, KernelLocks, KernelLockWatcher, Leases, LockError, LockTable
from deskfs.store import Store
from deskfs.store.content import copy_range
from deskfs.store.meta import ROOT_INODE, Inode
from deskfs.store.versions import Deleted
from deskfs.virtual_xattrs import VirtualXattrs
from deskfs.versions_view import NAME as VIEW_NAME
from deskfs.versions_view import VersionsView, is_view, view_ino
from deskfs.versions_view import TOP as VIEW_TOP

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024
# The kernel keeps entries and attributes this long: every request it saves is a round trip.
CACHE_TIMEOUT = 300.0
# Advertised block size: tools size their I/O buffers by it, and fewer, larger writes are cheaper here.
BLOCK_SIZE = 128 * 1024
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
PRIVILEGED_XATTR_NAMESPACES = (b"trusted.", b"security.")
SECURITY_CAPABILITY = b"security.capability"
VERSION_XATTR = b"user.deskfs.version"  # get: the file's version number
RESTORE_XATTR = b"user.deskfs.restore"  # set N on a file: its version N becomes its next version
UNDELETE_XATTR = b"user.deskfs.undelete"  # set "LINE NAME" on a folder: a removed file comes back as NAME
SET_ID_BITS = stat.S_ISUID | stat.S_ISGID


def fuse_handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a synchronous handler body into the coroutine pyfuse3 awaits, mapping errors to errnos."""

    @functools.wraps(fn)
    async def handler(*args: Any) -> Any:
        try:
            result = fn(*args)
            if type(result) is CoroutineType:  # waits for the daemon's own open (lease_locks.py)
                result = await result
            return result
        except pyfuse3.FUSEError:
            raise
        except LockError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except LookupFailed as exc:
            # Who the caller is cannot be told now: refuse rather than guess a different principal.
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EAGAIN) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


# A path for the journal, or a function giving it, for callers that need it only when refusing.
PathOrLater = str | None | Callable[[], str | None]


def resolved(path: PathOrLater) -> str | None:
    return path() if callable(path) else path


def negative_entry(timeout: float) -> pyfuse3.EntryAttributes:
    """"No such name", for the kernel to remember `timeout` seconds (a raised ENOENT is never cached)."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = timeout
    return entry


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise fail(errno.ENAMETOOLONG)


def in_group(pid: int, gid: int, group: int) -> bool:
    """Whether process `pid` (whose request said file-system gid `gid`) is in `group`, as the kernel
    counts it: its fsgid or a supplementary group. A process that is gone is in no group."""
    if gid == group:
        return True
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return False
    wanted = str(group).encode()
    for line in status.splitlines():
        if line.startswith(b"Gid:") and line.split()[-1] == wanted:  # real, effective, saved, fs
            return True
        if line.startswith(b"Groups:") and wanted in line.split()[1:]:
            return True
    return False


def set_id_bits_to_drop(mode: int, uid: int, member: Callable[[], bool]) -> int:
    """The set-ID bits a change of a regular file's content by `uid` clears, as the kernel does for
    ext4 (`should_remove_suid`): a changer without CAP_FSETID (here: anyone but root), the owner too,
    clears set-user-ID, and set-group-ID when group-execute is set or it is not in the file's group
    (`member()`, asked only then)."""
    if uid == 0 or not stat.S_ISREG(mode):
        return 0
    drop = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not member()):
        drop |= stat.S_ISGID
    return drop


@dataclass(slots=True)
class Handle:
    """An open file: what `open`/`create` bound, for the requests that carry no context."""

    inode: Inode
    flags: int
    actor: Actor
    path: str | None  # where it was opened: the journal's path once the file has no name left
    where: Callable[[], str | None]  # where it is now (where it was opened, if it has no name left)
    changed: bool = False  # wrote or truncated: its release is a close_write when it is the last such
    created: bool = False  # made the file: the file's first version stays open until it is closed

    @property
    def principal(self) -> str:
        return self.actor.principal


OPEN_FLAGS = {name: getattr(os, name) for name in (
    "O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_DIRECT", "O_SYNC", "O_DSYNC", "O_NOFOLLOW", "O_TMPFILE")}
ACCESS_MODES = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "read-write"}


def open_details(flags: int) -> dict[str, object]:
    """How a file was opened, as the journal tells it."""
    named = [name for name, bit in OPEN_FLAGS.items() if flags & bit == bit]
    return {"access": ACCESS_MODES.get(flags & os.O_ACCMODE, "?"), "flags": named}


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # every write must reach us through the writer's own handle
    enable_acl = False

    def __init__(self, store: Store, shared: bool = False) -> None:
        """`shared`: other Unix users can reach the mount (`--allow-other`).

        The kernel's caches are one for all users: on a shared mount they keep no attributes, so that
        every stat and every permission check on the way to a file comes to the daemon, where roles are
        checked (a non-member must not learn sizes and times from what a member had looked at). Names in
        the root folder are not cached either, since the root is the one folder anyone may pass through.
        """
        super().__init__()
        self.shared = shared
        self.attr_timeout = 0.0 if shared else CACHE_TIMEOUT
        self.store = store
        self.meta = store.meta
        self.content = store.content
        self.journal: Journal = store.journal
        self.lookups: dict[int, int] = {}
        self.handles: dict[int, Handle] = {}
        self.folder_handles: dict[int, tuple[int, Actor]] = {}  # opendir's handle -> (inode, who opened it)
        self.changers: dict[int, int] = {}  # inode -> open handles that made or changed it (for close_write)
        self.changed_since_sealed: set[int] = set()  # inodes changed since their version was last sealed
        # Files that principals who lost read access still have open (and may have mapped): every change
        # drops their pages from the kernel's cache again, so a mapping cannot show what comes later.
        self.revoked: set[int] = set()
        self.drop_pages: Callable[[int], None] = lambda ino: None  # set by the daemon's invalidation task
        self._next_fh = 1
        self._with_capabilities = self.meta.inodes_with_xattr(SECURITY_CAPABILITY)
        self.identity = Identity(store.meta, self._record_impersonation)
        self.access = Access(store.conn, store.meta.begin, self.journal, self.identity.uid_of_agent,
                             self.identity.may_use_agent, store.owner_uid)
        self.leases = Leases(store.meta)
        self.lease_locks = LeaseLocks(self.leases, store.meta, lambda: self.handles.values())
        self.versions = store.versions
        self.view = VersionsView(self.meta, self.versions)
        self.view_handles: dict[int, tuple[int, int]] = {}  # open versions in the view: fh -> (fd, length)
        self.locks: LockTable | None = None  # needs the mount's device: see observe_kernel_locks
        self.virtual: VirtualXattrs | None = None
        self.lock_watcher: KernelLockWatcher | None = None

    def observe_kernel_locks(self, device: tuple[int, int]) -> None:
        """Start answering for locks, once the mount exists and its device number is known."""
        kernel = KernelLocks(device, self.identity.principal_of_pid)
        self.locks = LockTable(kernel, self.leases, self.meta.parents_of, ROOT_INODE,
                               lambda principal: self.access.role(principal) >= EDITOR)
        self.lock_watcher = KernelLockWatcher(kernel)
        self.lease_locks.kernel = kernel
        self.virtual = VirtualXattrs(self.identity, self.locks, self.meta, self.journal, self.access,
                                     self.lease_locks)

    # -- identity, locks and the journal ------------------------------------------------------

    def _record_impersonation(self, pid: int, uid: int, agent: str, how: str) -> None:
        actor = Actor(user_principal(uid), uid, pid)
        self.journal.record(actor, "impersonate", errno=errno.EPERM, claimed=f"agent:{agent}", via=how)

    def _actor(self, ctx: pyfuse3.RequestContext) -> Actor:
        return Actor(self.identity.principal(ctx.pid, ctx.uid), ctx.uid, ctx.pid)

    def path_of(self, ino: int) -> str | None:
        return path_text(self.meta.path_of(ino))

    def _child_path(self, parent: int, name: bytes) -> str | None:
        return path_text(self.meta.child_path(parent, name))

    def _require(self, actor: Actor, need: int, op: str, ino: int | None, path: PathOrLater) -> None:
        """EACCES, journaled, unless `actor`'s role in the workspace is at least `need`."""
        role = self.access.role(actor.principal)
        if role < need and actor.pid != self.lease_locks.opener_tid:  # the daemon opening for a lease
            self.journal.record(actor, op, ino, resolved(path), errno=errno.EACCES, role=ROLE_OF_RANK[role])
            raise fail(errno.EACCES)

    def attribute_cached_inodes(self) -> list[int]:
        """The inodes whose attributes the kernel may hold (to invalidate when roles change)."""
        return list(self.lookups)

    def _check_change(self, actor: Actor, op: str, path: PathOrLater, *targets: int) -> None:
        """EBUSY, journaled, if another principal's lock forbids `actor` to change `targets` now."""
        if self.locks is None:
            return
        holder = self.locks.blocker(targets, actor.principal)
        self._refuse_if_held(holder, actor, op, path, targets[0])

    def _check_move(self, actor: Actor, path: PathOrLater, folder: int) -> None:
        """EBUSY, journaled, if another principal holds a lock on something below `folder` (moving the
        folder would move the locked file away from the path it was locked at)."""
        if self.locks is not None:
            self._refuse_if_held(self.locks.blocker_below(folder, actor.principal), actor, "rename", path, folder)

    def _refuse_if_held(self, holder: Holder | None, actor: Actor, op: str, path: PathOrLater, ino: int) -> None:
        if holder is not None:
            self.journal.record(actor, op, ino, resolved(path), errno=errno.EBUSY,
                                locked_by=holder.describe())
            raise fail(errno.EBUSY)

    # -- helpers ------------------------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        inode = self.meta.get(ino)
        if inode is None:
            raise fail(errno.ENOENT)
        return inode

    def _child(self, parent: int, name: bytes) -> Inode:
        check_name(name)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise fail(errno.ENOENT)
        return self._inode(ino)

    def _attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode.id
        entry.generation = 0
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = self.attr_timeout
        entry.st_mode = inode.mode
        entry.st_nlink = inode.nlink
        entry.st_uid = inode.uid
        entry.st_gid = inode.gid
        entry.st_rdev = inode.rdev
        entry.st_size = inode.size
        entry.st_blksize = BLOCK_SIZE
        if inode.is_regular:
            # What the body really takes on disk (holes take nothing): an fstat (+1.5 us) or a stat (+4.5 us).
            entry.st_blocks = self.content.blocks(inode.id, inode.size) if inode.size else 0
        else:
            entry.st_blocks = ((inode.size + 4095) // 4096) * 8
        entry.st_atime_ns = inode.atime_ns
        entry.st_mtime_ns = inode.mtime_ns
        entry.st_ctime_ns = inode.ctime_ns
        return entry

    def _entry_timeout(self, parent: int) -> float:
        return 0.0 if self.shared and parent == ROOT_INODE else CACHE_TIMEOUT

    # -- the read-only view of versions (.deskfs) ---------------------------------------------

    @staticmethod
    def _not_in_view(*inodes: int | None) -> None:
        """EROFS for any change that touches the `.deskfs` view."""
        if any(ino is not None and is_view(ino) for ino in inodes):
            raise fail(errno.EROFS)

    @staticmethod
    def _not_reserved(parent: int, name: bytes, code: int) -> None:
        """`code` (EEXIST to make, EPERM to remove or rename) for the name `.deskfs` at the root."""
        if parent == ROOT_INODE and name == VIEW_NAME:
            raise fail(code)

    def _view_attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = self.view.attributes(ino)
        if entry is None:
            raise fail(errno.ENOENT)
        return entry

    def _view_lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            ino: int | None = parent
        elif name == b"..":
            ino = self.view.parent(parent)
        elif parent == ROOT_INODE:
            ino = view_ino(VIEW_TOP)
        else:
            check_name(name)
            ino = self.view.lookup(parent, name)
        if ino is None:
            return negative_entry(0.0)  # the view changes at any moment: the kernel asks again
        if not is_view(ino):
            return self._counted(self._inode(ino), self.meta.parent_of(ino))
        return self._view_attributes(ino)

    def move_aside_reserved_name(self) -> str | None:
        """A real `.deskfs` at the root (from before versions) is renamed to `.deskfs.saved` (or
        `.deskfs.saved-N`), so the view can take the name; returns the new name, journaled."""
        ino = self.meta.lookup(ROOT_INODE, VIEW_NAME)
        if ino is None:
            return None
        for n in range(1, 10_000):
            new = VIEW_NAME + (b".saved" if n == 1 else f".saved-{n}".encode())
            if self.meta.lookup(ROOT_INODE, new) is None:
                break
        self.meta.move_entry(ROOT_INODE, VIEW_NAME, ROOT_INODE, new, ino)
        self.journal.record(daemon_actor(), "rename", ino, "/.deskfs", "/" + new.decode(),
                            reason="the name .deskfs is the versions view now")
        return new.decode()

    def _entry(self, inode: Inode, parent: int) -> pyfuse3.EntryAttributes:
        """Attributes of `inode` as the entry of a name in folder `parent`."""
        entry = self._attributes(inode)
        entry.entry_timeout = self._entry_timeout(parent)
        return entry

    def _counted(self, inode: Inode, parent: int) -> pyfuse3.EntryAttributes:
        """The entry of a name in `parent`, handed to the kernel along with one more lookup reference."""
        self.lookups[inode.id] = self.lookups.get(inode.id, 0) + 1
        return self._entry(inode, parent)

    def _release_if_unreferenced(self, ino: int) -> None:
        """Free an inode with no name left once the kernel and every handle are done with it."""
        if self.lookups.get(ino) or self.content.is_open(ino):
            return
        inode = self.meta.cache.get(ino)
        if inode is None:
            return
        self.versions.forget(ino)
        self.content.forget(ino)
        if inode.nlink > 0:
            self.meta.evict(ino)
            return
        self.meta.delete_inode(ino)
        for holder in self.leases.drop_inode(ino):
            self.journal.record(daemon_actor(), "unlock", ino, None, kind="lease", holder=holder, reason="file deleted")
        self._with_capabilities.discard(ino)
        if inode.is_regular:
            # Only once the commit that forgets the file is in: before it, a crash would leave the file
            # named but with its content gone.
            self.store.after_commit(lambda: self.content.delete(ino))

    def _touch(self, inode: Inode, now: int) -> None:
        inode.touch_content(now)
        self.meta.changed(inode)

    def _make(self, op: str, parent: int, name: bytes, mode: int, rdev: int, actor: Actor, ctx: pyfuse3.RequestContext,
              **details: object) -> tuple[Inode, str | None]:
        """A new inode named `name` in `parent`, journaled as `op` with `details`; and its path."""
        check_name(name)
        self._not_in_view(parent)
        self._not_reserved(parent, name, errno.EEXIST)
        folder = self._inode(parent)
        if self.meta.lookup(parent, name) is not None:
            raise fail(errno.EEXIST)
        path = self._child_path(parent, name)
        self._require(actor, EDITOR, op, parent, path)
        self._check_change(actor, op, path, parent)
        gid = ctx.gid
        if folder.mode & stat.S_ISGID:
            # BSD group semantics in a setgid folder: the group is inherited, and so is the bit by folders.
            gid = folder.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        inode = self.meta.new_inode(mode, ctx.uid, gid, rdev, now)
        self.meta.add_entry(parent, name, inode.id)
        if inode.is_dir:
            folder.nlink += 1
        self._touch(folder, now)
        self.journal.record(actor, op, inode.id, path, mode=f"{stat.S_IMODE(mode):04o}", **details)
        return inode, path

    def _drop_link(self, inode: Inode, now: int, by: Actor | None = None, path: str | None = None,
                   parent: int = ROOT_INODE) -> None:
        """One name of `inode` fewer; when none is left, a regular file's content goes to the trash
        (as its last version), and the inode is freed once nothing refers to it."""
        inode.nlink = 0 if inode.is_dir else inode.nlink - 1
        inode.ctime_ns = now
        self.meta.changed(inode)
        if inode.nlink == 0:
            if inode.is_regular and by is not None:
                self.versions.removed(inode.id, by.principal, path, parent, inode.mode, inode.uid, inode.gid, now)
            self.lease_locks.gone(inode.id)
            self._release_if_unreferenced(inode.id)

    def _drop_set_id(self, inode: Inode, actor: Actor, gid: int, op: str) -> None:
        """Clear the set-ID bits a change of content by `actor` (fsgid `gid`) clears (see set_id_bits_to_drop).

        The kernel does it itself before a cached write, a truncate and a chown (it sends a setattr of
        the mode); not before a write through a `direct_io` handle or an `O_TRUNC` open, which come here.
        """
        drop = set_id_bits_to_drop(inode.mode, actor.uid, lambda: in_group(actor.pid, gid, inode.gid))
        if not drop:
            return
        inode.mode &= ~drop
        inode.ctime_ns = time.time_ns()
        self.meta.changed(inode)
        self.journal.record(actor, "setattr", inode.id, self.path_of(inode.id),
                            mode=f"{stat.S_IMODE(inode.mode):04o}", cleared_by=op)
        try:
            pyfuse3.invalidate_inode(inode.id, attr_only=True)  # the kernel may hold the old mode
        except OSError:
            pass  # it holds nothing of this inode

    def _truncate(self, inode: Inode, size: int, now: int, principal: str, reason: str) -> None:
        if not inode.is_regular:
            raise fail(errno.EISDIR if inode.is_dir else errno.EINVAL)
        if size != inode.size:
            self._version_before(inode, principal, size, now, reason, whole=size == 0)
        self.content.truncate(inode.id, size, inode.size)
        inode.size = size
        self._touch(inode, now)

    def _version_before(self, inode: Inode, principal: str, start: int, now: int, reason: str,
                        whole: bool = False) -> None:
        """Before a change of `inode`'s content from byte `start` on (`whole`: all of it is replaced, as
        by a truncate to 0): start a new version if the current one is sealed, keeping what the old one
        needs (docs/versions.md).

        A file with no name left (removed or replaced while open) has no versions any more; its last
        content was kept as a second name of its body, which it now stops sharing before it changes."""
        if inode.nlink == 0:
            self.content.detach(inode.id)
            return
        if whole:
            if self.versions.keep_whole_body(inode.id, inode.size, principal, now, reason):
                self.store.commit()  # the kept body is named durably before the live one is replaced
                self.content.replace_body(inode.id)
            return
        if self.versions.before_change(inode.id, principal, now, inode.size, start, reason):
            self.store.commit()  # what was copied out is named durably before the body changes

    def _new_handle(self, inode: Inode, flags: int, actor: Actor, path: str | None,
                    truncated: bool = False, created: bool = False) -> pyfuse3.FileInfo:
        self.content.acquire(inode.id)
        fh = self._next_fh
        self._next_fh += 1
        where = lambda: self.path_of(inode.id) or path  # noqa: E731
        handle = self.handles[fh] = Handle(inode, flags, actor, path, where, created=created)
        if created:
            self.changers[inode.id] = self.changers.get(inode.id, 0) + 1
        if truncated:
            self._mark_changed(handle)
        # A write-only handle bypasses the page cache: each write() is then one request instead of two
        # (a cached write first asks for security.capability), and large writes go through unsplit.
        # Other handles' cached pages stay right: every write changes mtime, and the kernel drops pages
        # whose file's mtime changed (auto_inval_data) before it serves them again.
        write_only = flags & os.O_ACCMODE == os.O_WRONLY
        uncached = write_only or inode.id in self.revoked or (
            flags & os.O_ACCMODE == os.O_RDWR and self._locked_by_other(inode.id, actor))
        return pyfuse3.FileInfo(fh=fh, keep_cache=not uncached, direct_io=uncached)

    def _locked_by_other(self, ino: int, actor: Actor) -> bool:
        """Whether another principal's lock forbids `actor` to change `ino` now.

        Then `actor`'s new read-write handle bypasses the page cache (direct I/O), which also refuses it
        a shared mapping (mmap MAP_SHARED: ENODEV). The kernel writes a file's dirty mapped pages back
        through whichever handle mapped it shared and writable last, without saying whose pages they
        are: a mapping made by one principal while another holds the lock would otherwise reach the
        file under the holder's name, past the lock.
        """
        return self.locks is not None and self.locks.blocker((ino,), actor.principal) is not None

    def lost_readers(self) -> list[int]:
        """Files open by principals who may no longer read them (removed, or left): their cached pages
        must be dropped (the kernel would serve them without asking), and stay uncached while they are
        open. Called after every membership change."""
        lost = {h.inode.id for h in self.handles.values() if self.access.role(h.principal) < VIEWER}
        self.revoked = lost
        return sorted(lost)

    # -- lookups and attributes ---------------------------------------------------------------

    @fuse_handler
    def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._require(self._actor(ctx), VIEWER, "lookup", parent, lambda: self._child_path(parent, name))
        if is_view(parent) or (parent == ROOT_INODE and name == VIEW_NAME):
            return self._view_lookup(parent, name)
        if name == b".":
            ino: int | None = parent
        elif name == b"..":
            ino = self.meta.parent_of(parent)
        else:
            check_name(name)
            ino = self.meta.lookup(parent, name)
        if ino is None:
            return negative_entry(self._entry_timeout(parent))
        return self._counted(self._inode(ino), parent)

    @fuse_handler
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            left = self.lookups.get(ino, 0) - count
            if left > 0:
                self.lookups[ino] = left
                continue
            self.lookups.pop(ino, None)
            self._release_if_unreferenced(ino)

    @fuse_handler
    def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        actor = self._actor(ctx)
        if ino != ROOT_INODE:  # anyone may see the mount's root itself; nothing below it
            self._require(actor, VIEWER, "getattr", ino, lambda: self.path_of(ino))
            return self._view_attributes(ino) if is_view(ino) else self._attributes(self._inode(ino))
        attributes = self._attributes(self._inode(ino))
        if self.shared and self.access.role(actor.principal) < VIEWER:
            # To a non-member the root is a folder it may pass but not read: the kernel then refuses it
            # listing and watching the root (inotify needs read permission) from these attributes.
            attributes.st_mode &= ~0o666
        return attributes

    @fuse_handler
    def setattr(
        self,
        ino: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._not_in_view(ino)
        inode = self._inode(ino)
        handle = self.handles.get(fh) if fh is not None else None
        actor = handle.actor if handle is not None else self._actor(ctx)
        path = self.path_of(ino)
        self._require(actor, EDITOR, "setattr", ino, path)
        self._check_change(actor, "setattr", path, ino)
        now = time.time_ns()
        changes: dict[str, object] = {}
        if fields.update_size:
            self._truncate(inode, attr.st_size, now, actor.principal, "truncate")
            changes["size"] = attr.st_size
            if handle is not None:
                self._mark_changed(handle)
            elif ino not in self.changers:  # truncate(path): nobody has it open to change it further
                self.versions.sealed(ino)
            if inode.mode & SET_ID_BITS and not fields.update_mode:
                self._drop_set_id(inode, self._actor(ctx), ctx.gid, "truncate")
        if fields.update_mode:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(attr.st_mode)
            changes["mode"] = f"{stat.S_IMODE(attr.st_mode):04o}"
        if fields.update_uid:
            inode.uid = changes["uid"] = attr.st_uid
        if fields.update_gid:
            inode.gid = changes["gid"] = attr.st_gid
        if fields.update_atime:
            inode.atime_ns = changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            inode.mtime_ns = changes["mtime_ns"] = attr.st_mtime_ns
        inode.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
        self.meta.changed(inode)
        self.journal.record(actor, "setattr", ino, path, **changes)
        return self._attributes(inode)

    @fuse_handler
    def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes:
        self._require(self._actor(ctx), VIEWER, "readlink", ino, lambda: self.path_of(ino))
        if is_view(ino):
            raise fail(errno.EINVAL)
        target = self.meta.symlink_target(ino)
        if target is None:
            raise fail(errno.EINVAL)
        return target

    @fuse_handler
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store.path)
        reserved_blocks = self.content.guard.reserve // st.f_frsize
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = max(0, st.f_bfree - reserved_blocks)
        data.f_bavail = max(0, st.f_bavail - reserved_blocks)
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = NAME_MAX
        return data

    # -- names --------------------------------------------------------------------------------

    @fuse_handler
    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        actor = self._actor(ctx)
        inode, _ = self._make("mknod", parent, name, mode, rdev, actor, ctx, device=rdev)
        return self._counted(inode, parent)

    @fuse_handler
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode, _ = self._make("mkdir", parent, name, stat.S_IFDIR | stat.S_IMODE(mode), 0, self._actor(ctx), ctx)
        return self._counted(inode, parent)

    @fuse_handler
    def symlink(
        self, parent: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        inode, _ = self._make("symlink", parent, name, stat.S_IFLNK | 0o777, 0, self._actor(ctx), ctx,
                           target=target.decode("utf-8", "backslashreplace"))
        self.meta.set_symlink(inode.id, target)
        inode.size = len(target)
        self.meta.changed(inode)
        return self._counted(inode, parent)

    @fuse_handler
    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_name(new_name)
        self._not_in_view(ino, new_parent)
        self._not_reserved(new_parent, new_name, errno.EEXIST)
        inode = self._inode(ino)
        if inode.is_dir:
            raise fail(errno.EPERM)
        folder = self._inode(new_parent)
        if self.meta.lookup(new_parent, new_name) is not None:
            raise fail(errno.EEXIST)
        actor, path, new_path = self._actor(ctx), self.path_of(ino), self._child_path(new_parent, new_name)
        self._require(actor, EDITOR, "link", ino, path)
        self._check_change(actor, "link", path, ino, new_parent)
        now = time.time_ns()
        self.journal.record(actor, "link", ino, path, new_path)
        self.meta.add_entry(new_parent, new_name, ino)
        inode.nlink += 1
        inode.ctime_ns = now
        self.meta.changed(inode)
        self._touch(folder, now)
        return self._counted(inode, new_parent)

    @fuse_handler
    def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._not_in_view(parent)
        self._not_reserved(parent, name, errno.EPERM)
        inode = self._child(parent, name)
        if inode.is_dir:
            raise fail(errno.EISDIR)
        actor, path = self._actor(ctx), self._child_path(parent, name)
        self._require(actor, EDITOR, "unlink", inode.id, path)
        self._check_change(actor, "unlink", path, inode.id, parent)
        now = time.time_ns()
        self.journal.record(actor, "unlink", inode.id, path)
        self.meta.remove_entry(parent, name, inode.id)
        self._touch(self._inode(parent), now)
        self._drop_link(inode, now, actor, path, parent)

    @fuse_handler
    def rmdir(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._not_in_view(parent)
        self._not_reserved(parent, name, errno.EPERM)
        inode = self._child(parent, name)
        if not inode.is_dir:
            raise fail(errno.ENOTDIR)
        if self.meta.has_entries(inode.id):
            raise fail(errno.ENOTEMPTY)
        actor, path = self._actor(ctx), self._child_path(parent, name)
        self._require(actor, EDITOR, "rmdir", inode.id, path)
        self._check_change(actor, "rmdir", path, inode.id, parent)
        now = time.time_ns()
        self.journal.record(actor, "rmdir", inode.id, path)
        folder = self._inode(parent)
        self.meta.remove_entry(parent, name, inode.id)
        folder.nlink -= 1
        self._touch(folder, now)
        self._drop_link(inode, now)

    @fuse_handler
    def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._not_in_view(parent_old, parent_new)
        self._not_reserved(parent_old, name_old, errno.EPERM)
        self._not_reserved(parent_new, name_new, errno.EPERM)
        moved = self._child(parent_old, name_old)
        check_name(name_new)
        target_ino = self.meta.lookup(parent_new, name_new)
        targets = (moved.id, parent_old, parent_new) + ((target_ino,) if target_ino is not None else ())
        actor = self._actor(ctx)
        path, new_path = self._child_path(parent_old, name_old), self._child_path(parent_new, name_new)
        self._require(actor, EDITOR, "rename", moved.id, path)
        self._check_change(actor, "rename", path, *targets)
        for folder in (moved.id, target_ino if flags & pyfuse3.RENAME_EXCHANGE else None):
            if folder is not None and self._inode(folder).is_dir:
                self._check_move(actor, path, folder)
        if flags & pyfuse3.RENAME_NOREPLACE and target_ino is not None:
            raise fail(errno.EEXIST)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target_ino is None:
                raise fail(errno.ENOENT)
            self._exchange(parent_old, name_old, moved, parent_new, name_new, self._inode(target_ino))
            self.journal.record(actor, "rename", moved.id, path, new_path, exchange=True)
            return
        if moved.is_dir and self.meta.is_ancestor(moved.id, parent_new):
            raise fail(errno.EINVAL)
        if target_ino == moved.id:
            return  # POSIX: renaming a name onto another name of the same file does nothing
        now = time.time_ns()
        old_folder, new_folder = self._inode(parent_old), self._inode(parent_new)
        if target_ino is not None:
            replaced = self._inode(target_ino)
            self._check_replaceable(moved, replaced)
            self.meta.remove_entry(parent_new, name_new, target_ino)
            if replaced.is_dir:
                new_folder.nlink -= 1
            if replaced.is_regular and moved.is_regular and replaced.nlink == 1:
                self.versions.replaced(target_ino, moved.id, path, actor.principal, now)
            self._drop_link(replaced, now, actor, new_path, parent_new)
        self.journal.record(actor, "rename", moved.id, path, new_path,
                            **({"replaced_inode": target_ino} if target_ino is not None else {}))
        self.meta.move_entry(parent_old, name_old, parent_new, name_new, moved.id)
        if moved.is_dir and parent_old != parent_new:
            old_folder.nlink -= 1
            new_folder.nlink += 1
        moved.ctime_ns = now
        self.meta.changed(moved)
        self._touch(old_folder, now)
        self._touch(new_folder, now)

    def _mark_changed(self, handle: Handle) -> None:
        if not handle.changed:
            handle.changed = True
            self.changed_since_sealed.add(handle.inode.id)
            if not handle.created:  # a creating handle is counted already
                self.changers[handle.inode.id] = self.changers.get(handle.inode.id, 0) + 1

    def _check_replaceable(self, moved: Inode, replaced: Inode) -> None:
        if moved.is_dir and not replaced.is_dir:
            raise fail(errno.ENOTDIR)
        if replaced.is_dir and not moved.is_dir:
            raise fail(errno.EISDIR)
        if replaced.is_dir and self.meta.has_entries(replaced.id):
            raise fail(errno.ENOTEMPTY)

    def _exchange(
        self, parent_a: int, name_a: bytes, a: Inode, parent_b: int, name_b: bytes, b: Inode
    ) -> None:
        if (a.is_dir and self.meta.is_ancestor(a.id, parent_b)) or (
            b.is_dir and self.meta.is_ancestor(b.id, parent_a)
        ):
            raise fail(errno.EINVAL)
        now = time.time_ns()
        folder_a, folder_b = self._inode(parent_a), self._inode(parent_b)
        self.meta.repoint_entry(parent_a, name_a, b.id)
        self.meta.repoint_entry(parent_b, name_b, a.id)
        if parent_a != parent_b:
            shift = int(a.is_dir) - int(b.is_dir)  # folders moving from a's folder to b's
            folder_a.nlink -= shift
            folder_b.nlink += shift
        for inode in (a, b):
            inode.ctime_ns = now
            self.meta.changed(inode)
        self._touch(folder_a, now)
        self._touch(folder_b, now)

    # -- files --------------------------------------------------------------------------------

    @fuse_handler
    def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if is_view(ino):
            return self._open_version(ino, flags, ctx)
        if ctx.pid == self.lease_locks.opener_tid:  # the daemon's own descriptor, for a lease's kernel locks
            fh = self._next_fh
            self._next_fh += 1
            self.lease_locks.own_handles.add(fh)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        inode = self._inode(ino)
        actor, path = self._actor(ctx), self.path_of(ino)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        truncating = writing and bool(flags & os.O_TRUNC)
        self._require(actor, EDITOR if writing else VIEWER, "open", ino, path)
        if truncating:
            self._check_change(actor, "open", path, ino)
            self._truncate(inode, 0, time.time_ns(), actor.principal, "open_trunc")
            if inode.mode & SET_ID_BITS:
                self._drop_set_id(inode, actor, ctx.gid, "open")
        self.journal.record(actor, "open", ino, path, **open_details(flags))
        info = self._new_handle(inode, flags, actor, path, truncated=truncating)
        return self.lease_locks.opened(ino, flags, info)  # may first lock it for a folder's lease

    def _open_version(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise fail(errno.EROFS)
        self._require(self._actor(ctx), VIEWER, "open", ino, None)
        fd, size = self.view.open(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.view_handles[fh] = (fd, size)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    @fuse_handler
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        actor = self._actor(ctx)
        inode, path = self._make("create", parent, name, stat.S_IFREG | stat.S_IMODE(mode), 0, actor, ctx,
                                 **open_details(flags))
        self.versions.created(inode.id, actor.principal, inode.ctime_ns)
        return self._new_handle(inode, flags, actor, path, created=True), self._counted(inode, parent)

    @fuse_handler
    def read(self, fh: int, offset: int, size: int) -> bytes:
        if fh in self.view_handles:
            fd, length = self.view_handles[fh]
            return os.pread(fd, max(0, min(size, length - offset)), offset) if offset < length else b""
        handle = self.handles[fh]
        where = handle.where
        self._require(handle.actor, VIEWER, "read", handle.inode.id, where)
        data = os.pread(self.content.fd(handle.inode.id), size, offset)
        self.journal.tally(fh, "read", handle.actor, handle.inode.id, where, offset, len(data))
        return data

    @fuse_handler
    def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles[fh]
        inode = handle.inode
        try:
            self._require(handle.actor, EDITOR, "write", inode.id, handle.where)
            self._check_change(handle.actor, "write", handle.where, inode.id)
        except pyfuse3.FUSEError:
            # A refused write-back of mapped pages leaves them in the kernel's cache, clean, for others to
            # read: drop them, so what was refused is not what others see.
            self.drop_pages(inode.id)
            raise
        if inode.mode & SET_ID_BITS:
            self._drop_set_id(inode, handle.actor, -1, "write")
        now = time.time_ns()
        line = self.versions.lines.get(inode.id)
        if line is None or line.sealed or offset < line.protected or line.writer != handle.principal:
            self._version_before(inode, handle.principal, offset, now, "write")
        written = self.content.write(inode.id, self.content.fd(inode.id), offset, data, inode.size)
        if offset + written > inode.size:
            inode.size = offset + written
        self._touch(inode, now)
        self._mark_changed(handle)
        self.journal.tally(fh, "write", handle.actor, inode.id, handle.where, offset, written)
        if inode.id in self.revoked:
            self.drop_pages(inode.id)
        return written

    @fuse_handler
    def flush(self, fh: int) -> None:
        # Nothing to do at close(); ENOSYS tells the kernel to stop sending FLUSH at all.
        raise fail(errno.ENOSYS)

    @fuse_handler
    def release(self, fh: int) -> None:
        if fh in self.view_handles:
            os.close(self.view_handles.pop(fh)[0])
            return
        if fh in self.lease_locks.own_handles:
            self.lease_locks.own_handles.remove(fh)
            return
        handle = self.handles.pop(fh)
        self.journal.end_tallies(fh)
        ino = handle.inode.id
        if handle.changed or handle.created:
            self.changers[ino] -= 1
            if not self.changers[ino]:
                del self.changers[ino]
                number = self.versions.sealed(ino)
                if ino in self.changed_since_sealed:
                    self.changed_since_sealed.discard(ino)
                    self.journal.record(handle.actor, "close_write", ino, handle.where(),
                                        size=handle.inode.size, version=number)
        if ino in self.revoked and not any(h.inode.id == ino and self.access.role(h.principal) < VIEWER
                                           for h in self.handles.values()):
            self.revoked.discard(ino)
        self.content.release(ino)
        self._release_if_unreferenced(ino)
        self.lease_locks.closed(ino)

    @fuse_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self.view_handles:
            return
        fd = self.content.fd(self.handles[fh].inode.id)
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        self.store.sync()

    # -- folders ------------------------------------------------------------------------------

    @fuse_handler
    def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        actor = self._actor(ctx)
        self._require(actor, VIEWER, "opendir", ino, lambda: self.path_of(ino))
        if is_view(ino):
            if not stat.S_ISDIR(self._view_attributes(ino).st_mode):
                raise fail(errno.ENOTDIR)
        elif not self._inode(ino).is_dir:
            raise fail(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self.folder_handles[fh] = (ino, actor)
        return fh

    @fuse_handler
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino, actor = self.folder_handles[fh]
        self._require(actor, VIEWER, "readdir", ino, lambda: self.path_of(ino))  # a role may end while open
        if is_view(ino):
            self._view_readdir(ino, start_id, token)
            return
        # Cookies: 1 after ".", 2 after "..", then 2 + the entry's rowid (stable under concurrent changes).
        # "." and ".." take no lookup reference (the kernel does not count them).
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attributes(self._inode(ino)), 1):
            return
        if start_id < 2:
            parent = self._inode(self.meta.parent_of(ino))
            if not pyfuse3.readdir_reply(token, b"..", self._attributes(parent), 2):
                return
        cookie = max(start_id - 2, 0)
        while True:
            batch = self.meta.entries_after(ino, cookie)
            if not batch:
                return
            for name, child, cookie in batch:
                inode = self._inode(child)
                if not pyfuse3.readdir_reply(token, name, self._entry(inode, ino), cookie + 2):
                    return
                self.lookups[child] = self.lookups.get(child, 0) + 1

    def _view_readdir(self, ino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """A view folder's listing: ".", "..", then its entries (cookie = 3 + their index). View inodes
        take no lookup reference: nothing is freed when the kernel forgets them."""
        parent = self.view.parent(ino)
        listing = [(b".", ino), (b"..", parent)] + self.view.entries(ino)
        for cookie, (name, child) in enumerate(listing[start_id:], start=start_id + 1):
            entry = self._view_attributes(child) if is_view(child) else self._attributes(self._inode(child))
            if not pyfuse3.readdir_reply(token, name, entry, cookie):
                return

    @fuse_handler
    def releasedir(self, fh: int) -> None:
        self.folder_handles.pop(fh, None)

    @fuse_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.store.sync()

    # -- extended attributes ------------------------------------------------------------------

    @staticmethod
    def _check_xattr_name(name: bytes, ctx: pyfuse3.RequestContext, changing: bool) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise fail(errno.EOPNOTSUPP)
        if changing and ctx.uid != 0 and name.startswith(PRIVILEGED_XATTR_NAMESPACES):
            raise fail(errno.EPERM)

    @fuse_handler
    def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # The kernel asks this before every write(): answer from memory.
        if name == SECURITY_CAPABILITY and ino not in self._with_capabilities:
            raise fail(errno.ENODATA)
        actor = self._actor(ctx)
        if name != virtual_xattrs.WHOAMI:
            self._require(actor, VIEWER, "getxattr", ino, lambda: self.path_of(ino))
        if is_view(ino):
            raise fail(errno.ENODATA)
        if name == VERSION_XATTR:
            if not self._inode(ino).is_regular:
                raise fail(errno.ENODATA)
            return str(self.versions.ensure_line(ino, DAEMON_PRINCIPAL, time.time_ns()).current).encode()
        if virtual_xattrs.is_virtual(name) and self.virtual is not None:
            return self.virtual.get(ino, name, actor)
        self._check_xattr_name(name, ctx, changing=False)
        value = self.meta.xattr(ino, name)
        if value is None:
            raise fail(errno.ENODATA)
        return value

    @fuse_handler
    def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._require(self._actor(ctx), VIEWER, "listxattr", ino, lambda: self.path_of(ino))
        if is_view(ino):
            return []
        names = self.meta.xattr_names(ino)
        if ctx.uid != 0:
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    @fuse_handler
    def setxattr(self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._not_in_view(ino)
        self._check_xattr_name(name, ctx, changing=True)
        if len(value) > XATTR_SIZE_MAX:
            raise fail(errno.E2BIG)
        inode = self._inode(ino)
        actor = self._actor(ctx)
        if name == RESTORE_XATTR:
            self._restore(inode, value, actor)
            return
        if name == UNDELETE_XATTR:
            self._undelete(inode, value, actor, ctx)
            return
        if virtual_xattrs.is_virtual(name) and self.virtual is not None:
            return self.virtual.set(ino, name, value, actor, self.path_of(ino))  # a lease may wait for an open
        path = self.path_of(ino)
        self._require(actor, EDITOR, "setxattr", ino, path)
        self._check_change(actor, "setxattr", path, ino)
        self.content.guard.claim(len(name) + len(value))
        self.meta.set_xattr(ino, name, value)
        if name == SECURITY_CAPABILITY:
            self._with_capabilities.add(ino)
        inode.ctime_ns = time.time_ns()
        self.meta.changed(inode)
        self.journal.record(actor, "setxattr", ino, path, name=name.decode("utf-8", "backslashreplace"),
                            size=len(value))

    def _restore(self, inode: Inode, value: bytes, actor: Actor) -> None:
        """Make version N of a file its next version; the current content stays a version. The kernel
        has checked that the caller may write the file (setting a user.* attribute needs that)."""
        if not inode.is_regular:
            raise fail(errno.EINVAL)
        try:
            number = int(value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise fail(errno.EINVAL) from None
        path = self.path_of(inode.id)
        self._require(actor, EDITOR, "restore", inode.id, path)
        self._check_change(actor, "restore", path, inode.id)
        version = self.versions.version(inode.id, number) if number > 0 else None
        if version is None:
            raise fail(errno.ENOENT)
        if version.ended_ns is None:
            return  # it is the current version already
        now = time.time_ns()
        source, size = self.versions.open_version(version)  # before the live body may be replaced
        try:
            self.versions.sealed(inode.id)  # the current content is a version of its own from now on
            self._version_before(inode, actor.principal, 0, now, "restore", whole=True)
            self.content.guard.claim(size)
            target = self.content.acquire(inode.id)
            try:
                os.ftruncate(target, 0)
                copy_range(source, target, size)
            finally:
                self.content.release(inode.id)
        finally:
            os.close(source)
        inode.size = size
        self._touch(inode, now)
        line = self.versions.restored(inode.id, actor.principal, now)
        self.journal.record(actor, "restore", inode.id, path, version=line.current, restored=number, size=size)
        self.drop_pages(inode.id)

    def _undelete(self, folder: Inode, value: bytes, actor: Actor, ctx: pyfuse3.RequestContext) -> None:
        """Bring a removed file (its history line) back as NAME in `folder`. The kernel has checked that
        the caller may write the folder."""
        if not folder.is_dir:
            raise fail(errno.ENOTDIR)
        line_text, _, name = value.partition(b" ")
        if not line_text.isdigit() or not name or b"/" in name or name in (b".", b".."):
            raise fail(errno.EINVAL)
        check_name(name)
        self._not_reserved(folder.id, name, errno.EEXIST)
        if self.meta.lookup(folder.id, name) is not None:
            raise fail(errno.EEXIST)
        path = self._child_path(folder.id, name)
        self._require(actor, EDITOR, "undelete", folder.id, path)
        self._check_change(actor, "undelete", path, folder.id)
        removed = self.versions.removed_line(int(line_text))
        if removed is None or not self._may_read_removed(actor, removed):
            raise fail(errno.ENOENT)  # a file it may not read is as good as none: nothing is revealed
        now = time.time_ns()
        inode = self.meta.new_inode(stat.S_IFREG | stat.S_IMODE(removed.mode), removed.uid, removed.gid, 0, now)
        self.meta.add_entry(folder.id, name, inode.id)
        self._touch(folder, now)
        self.content.guard.claim(removed.size)
        inode.size = self.versions.take_body_back(removed.line, self.content.path(inode.id))
        self.meta.changed(inode)
        self.versions.undeleted(removed.line, inode.id, actor.principal, now)
        self.journal.record(actor, "undelete", inode.id, path, version=removed.number, removed=removed.path)
        pyfuse3.invalidate_entry_async(folder.id, name, ignore_enoent=True)  # the kernel may remember a miss

    def _may_read_removed(self, actor: Actor, removed: Deleted) -> bool:
        """Whether `actor` could read the removed file where it was: its folder now, its mode then."""
        readable = self.access.reader_filter(actor, self.meta.conn)
        if readable is None:
            return True
        folder = removed.path.rsplit("/", 1)[0] or "/"
        return readable.path_readable(folder) and readable.allows(removed.mode, removed.uid, removed.gid, 4)

    @fuse_handler
    def removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._not_in_view(ino)
        self._check_xattr_name(name, ctx, changing=True)
        inode = self._inode(ino)
        actor = self._actor(ctx)
        if virtual_xattrs.is_virtual(name) and self.virtual is not None:
            self.virtual.remove(ino, name, actor, self.path_of(ino))
            return
        path = self.path_of(ino)
        self._require(actor, EDITOR, "removexattr", ino, path)
        self._check_change(actor, "removexattr", path, ino)
        if not self.meta.remove_xattr(ino, name):
            raise fail(errno.ENODATA)
        if name == SECURITY_CAPABILITY:
            self._with_capabilities.discard(ino)
        inode.ctime_ns = time.time_ns()
        self.meta.changed(inode)
        self.journal.record(actor, "removexattr", ino, path, name=name.decode("utf-8", "backslashreplace"))
