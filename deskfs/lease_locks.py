"""The kernel locks that stand for leases: the daemon's own descriptors on its mount, and their locks.

pyfuse3 has no lock operations, so `flock` and `fcntl` locks on the mount are the kernel's, and the
kernel knows nothing of leases. For every lease the daemon therefore holds a real kernel lock on the
file itself: a kernel lock asked for by anyone else then waits for the lease (or fails with
EWOULDBLOCK/EAGAIN) as it would for any other process's lock, and a lease is refused (EBUSY) while a
kernel lock is in the way. `flock` and `fcntl` locks are independent families on Linux, so it holds one
of each: a `flock` (LOCK_EX or LOCK_SH) and a POSIX `fcntl` lock from 0 to EOF (F_WRLCK or F_RDLCK;
POSIX and OFD locks both conflict with it). On a folder it holds the `flock` only.

The locks are held on descriptors of the daemon process itself, opened on the mount by one thread of
its own, the opener: an open on the mount is a FUSE request that the daemon must answer, so the thread
that serves requests cannot make it (the request handler that needs one waits for the opener while
another pyfuse3 task serves the opener's requests). A descriptor is kept after its lease ends, so that
the next lease of that file takes its locks without an open, in a few system calls.

Beyond the file leases: while a folder is under an exclusive lease, files inside it that another
principal has open are locked too (exclusive), so that its kernel locks on them wait as well. A file
nobody else has open needs no lock: a kernel lock needs an open descriptor first, and every open is a
request the daemon sees.

Owns: those descriptors (at most one per inode), the locks on them, the opener thread, telling which
requests come from it, and letting every descriptor go while the mount is being unmounted.

Must never: open a path outside the mount (openat2 with RESOLVE_BENEATH, NO_SYMLINKS, NO_XDEV from the
mount's root, then the inode is checked); open or close a descriptor on the mount from the thread that
serves FUSE requests (the OPEN or FLUSH it sends would wait for that very thread); hold two descriptors
of one inode (closing either would drop the POSIX lock of both); wait for a lock (every lock is
non-blocking: a conflict makes a lease EBUSY, it never stalls the daemon); keep a descriptor of a file
whose last name is gone; show its locks as anyone's (`locks.KernelLocks` leaves out the daemon's pid).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Coroutine, Iterable, Protocol

import trio

from deskfs import mounts
from deskfs.locks import EXCLUSIVE, SHARED, KernelLocks, Leases, LockError
from deskfs.store.meta import ROOT_INODE, Meta

log = logging.getLogger(__name__)

FMODE_EXEC = 0o40  # how an execve()'s open of a file shows in the FUSE open flags (__FMODE_EXEC)
ANY_EXEC = 0o111
OPEN_TIMEOUT = 10.0  # seconds a lease waits for its descriptors at most (then it is refused, EBUSY)
RESTORE_TIMEOUT = 10.0  # seconds the mount waits for the restored leases' locks before it is ready
MAINTAIN_INTERVAL = 0.25  # seconds between retries of missing locks and closes of idle descriptors
IDLE_SECONDS = 60.0  # an unlocked descriptor is closed after this long unused
MAX_IDLE = 256  # unlocked descriptors kept at most (the least recently used are closed first)
RETRY_UNOPENABLE = 30.0  # seconds before a file that could not be opened is tried again
DETACH_CHECK = 1.0  # seconds between looks at whether the mount was detached behind the daemon's back
OPEN_TRIES = 3  # a file moved while being opened is looked up again this often

# openat2(2): resolve beneath the mount's root, through no symlink, magic link or other mount.
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08
RESOLVE = RESOLVE_NO_XDEV | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH
SYS_OPENAT2 = 437  # the same number on every architecture


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]


def openat2_beneath(dirfd: int, path: bytes, flags: int) -> int:
    how = _OpenHow(flags, 0, RESOLVE)
    fd = _syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path.decode("utf-8", "backslashreplace"))
    return fd


def open_on_mount(mountpoint: str, device: tuple[int, int], path: bytes, ino: int, folder: bool,
                  writable: bool) -> tuple[int, bool]:
    """A descriptor of inode `ino`, found at `path` (relative to the root) on the mount, and whether it
    is open for writing. Runs in the opener thread."""
    root = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(root)
        if (os.major(st.st_dev), os.minor(st.st_dev)) != device or st.st_ino != ROOT_INODE:
            raise OSError(errno.EXDEV, "the mountpoint is not this mount's root any more", mountpoint)
        flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK | os.O_NOFOLLOW
        if folder:
            modes = [os.O_RDONLY | os.O_DIRECTORY]
        else:
            # Open for writing, so that the fcntl lock of an exclusive lease can be a write lock; not an
            # executable file (a file open for writing cannot be executed: ETXTBSY), nor when the daemon
            # may not (a daemon not run as root) or the file is being executed now.
            modes = [os.O_RDWR, os.O_RDONLY] if writable else [os.O_RDONLY]
        for mode in modes:
            try:
                fd = openat2_beneath(root, path or b".", flags | mode)
                break
            except OSError as exc:
                if mode == modes[-1] or exc.errno not in (errno.ETXTBSY, errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
    finally:
        os.close(root)
    st = os.fstat(fd)
    if st.st_ino != ino or (os.major(st.st_dev), os.minor(st.st_dev)) != device:
        os.close(fd)
        raise OSError(errno.ESTALE, "moved while being opened", path.decode("utf-8", "backslashreplace"))
    return fd, mode == os.O_RDWR


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Opener:
    """The daemon's one thread that opens and closes its descriptors on the mount.

    Jobs run one at a time, in order; each one's outcome is handed to a callback on the trio thread.
    If the thread dies, the next job starts it again. Requests it makes show its thread id as their pid.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self.tid = -1  # no request's pid until the thread runs

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._ensure()

    def _ensure(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="deskfs-lease-locks", daemon=True)
        self._thread.start()
        started.wait()

    def _serve(self, started: threading.Event) -> None:
        self.tid = threading.get_native_id()
        started.set()
        while True:
            fn, args, done = self._jobs.get()
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except Exception as exc:
                outcome = (False, exc)
            if done is not None and self._token is not None:
                try:
                    self._token.run_sync_soon(done, outcome)
                except trio.RunFinishedError:
                    if outcome[0] and isinstance(outcome[1], tuple):
                        close_all([outcome[1][0]])  # the daemon stopped meanwhile: nobody will take it

    def submit(self, fn: Callable[..., Any], args: tuple,
               done: Callable[[tuple[bool, Any]], None] | None = None) -> None:
        """Run fn(*args) in the thread; `done((ok, result or exception))` on the trio thread after."""
        self._ensure()
        self._jobs.put((fn, args, done))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the thread, waited for (from a task that is not serving a FUSE request)."""
        finished = trio.Event()
        box: list[tuple[bool, Any]] = []

        def done(outcome: tuple[bool, Any]) -> None:
            box.append(outcome)
            finished.set()

        self.submit(fn, args, done)
        await finished.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


@dataclass(slots=True)
class Descriptor:
    fd: int
    writable: bool  # open for writing: its fcntl lock can be a write lock
    folder: bool  # a folder: flock only (nobody can hold an fcntl write lock on a folder)
    held: str | None = None  # the mode its locks are held in now; None: unlocked
    used: float = 0.0  # time.monotonic() of its last lock or unlock


class OpenHandle(Protocol):
    """What lease_locks needs of fs.py's handles: which file, and whose."""

    @property
    def principal(self) -> str: ...

    @property
    def inode(self) -> Any: ...


class LeaseLocks:
    """The daemon's kernel locks for the leases of one mount."""

    def __init__(self, leases: Leases, meta: Meta, handles: Callable[[], Iterable[OpenHandle]]) -> None:
        self.leases = leases
        self.meta = meta
        self._handles = handles  # the open handles of principals (not the daemon's own)
        self.kernel: KernelLocks | None = None  # set once mounted: names a kernel lock in the way
        self.opener = Opener()
        self.own_handles: set[int] = set()  # the FUSE handles of the opener's opens (fs.py)
        self.fds: dict[int, Descriptor] = {}  # inode -> the daemon's descriptor of it
        self.max_awaiting = 1  # request handlers that may wait for the opener at once (mount.py)
        self._awaiting = 0
        self._pending: dict[int, trio.Event] = {}  # inode -> its open under way
        self._unopenable: dict[int, float] = {}  # inode -> when it last could not be opened
        self._retry: set[int] = set()  # files inside a folder lease whose lock could not be had yet
        self._folders: tuple[int, set[int]] = (-1, set())  # (leases.version, folders under exclusive lease)
        self._mount: tuple[str, tuple[int, int]] | None = None
        self._suspended = 0
        leases.changed = self.lease_changed

    @property
    def opener_tid(self) -> int:
        return self.opener.tid

    @property
    def active(self) -> bool:
        """Whether the daemon takes kernel locks now (mounted, serving, and not being unmounted)."""
        return self._mount is not None and not self._suspended

    # -- what is wanted ------------------------------------------------------------------------

    def wanted(self, ino: int) -> str | None:
        """The mode the daemon's locks on `ino` must be held in now, or None."""
        mode = None
        for holder in self.leases.held(ino):
            if holder.mode == EXCLUSIVE:
                return EXCLUSIVE
            mode = SHARED
        if self._bound_by_folder_lease(ino):
            return EXCLUSIVE
        return mode

    def _exclusive_folders(self) -> set[int]:
        """The folders under an exclusive lease (recomputed only when the leases changed)."""
        if self._folders[0] != self.leases.version:
            self._folders = (self.leases.version, {
                ino for ino, held in self.leases.by_inode.items()
                if any(h.mode == EXCLUSIVE for h in held.values()) and self._is_folder(ino)})
        return self._folders[1]

    def _bound_by_folder_lease(self, ino: int) -> bool:
        """Whether `ino` is below a folder under an exclusive lease of another principal than one who
        has `ino` open."""
        folders = self._exclusive_folders()
        if not folders:
            return False
        above = self._ancestors(ino) & folders
        holders = {h.principal for folder in above for h in self.leases.held(folder) if h.mode == EXCLUSIVE}
        if not holders:
            return False
        return any(opener != holder for opener in self._principals_with_open(ino) for holder in holders)

    def _principals_with_open(self, ino: int) -> set[str]:
        return {h.principal for h in self._handles() if h.inode.id == ino}

    def _is_folder(self, ino: int) -> bool:
        inode = self.meta.get(ino)
        return inode is not None and inode.is_dir

    def _ancestors(self, ino: int) -> set[int]:
        found: set[int] = set()
        frontier = [ino]
        while frontier:
            current = frontier.pop()
            if current == ROOT_INODE:
                continue
            for parent in self.meta.parents_of(current):
                if parent not in found:
                    found.add(parent)
                    frontier.append(parent)
        return found

    def _lease_inodes(self, ino: int, mode: str, principal: str) -> list[int]:
        """The inodes a lease of `principal` on `ino` needs locked: it, and for an exclusive lease on a
        folder, the files below it that another principal has open."""
        inodes = [ino]
        if mode == EXCLUSIVE and self._is_folder(ino):
            below: dict[int, set[str]] = {}
            for handle in self._handles():
                below.setdefault(handle.inode.id, set()).add(handle.principal)
            inodes += [i for i, openers in below.items()
                       if i != ino and any(p != principal for p in openers) and ino in self._ancestors(i)]
        return inodes

    # -- locks, never waiting ------------------------------------------------------------------

    def _set(self, ino: int, d: Descriptor, mode: str | None) -> None:
        """Hold `d`'s locks in `mode` (None: unlocked) now; LockError(EBUSY) if a kernel lock of
        someone else is in the way, with `d`'s locks then as they were."""
        if mode == d.held:
            return
        d.used = time.monotonic()
        if mode is None:
            if not d.folder:
                fcntl.lockf(d.fd, fcntl.LOCK_UN)
            fcntl.flock(d.fd, fcntl.LOCK_UN)
            d.held = None
            return
        try:
            fcntl.flock(d.fd, (fcntl.LOCK_EX if mode == EXCLUSIVE else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            # A conversion that fails has dropped the flock held before (flock(2)): take it back.
            self._restore(ino, d)
            raise LockError(errno.EBUSY, f"locked by {self._kernel_holder(ino)}") from None
        if not d.folder:
            try:
                write = mode == EXCLUSIVE and d.writable  # a read-only descriptor can hold a read lock only
                fcntl.lockf(d.fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                self._restore(ino, d)
                raise LockError(errno.EBUSY, f"locked by {self._kernel_holder(ino)}") from None
        d.held = mode

    def _restore(self, ino: int, d: Descriptor) -> None:
        """The flock as `d.held` says, after a conversion failed (the fcntl lock was kept as it was)."""
        if d.held is None:
            fcntl.flock(d.fd, fcntl.LOCK_UN)
            return
        try:
            fcntl.flock(d.fd, (fcntl.LOCK_EX if d.held == EXCLUSIVE else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            # Someone got in between: the lease has no kernel lock now; maintenance takes it again.
            log.warning("the kernel lock for the lease of inode %d was lost to another lock; retrying", ino)
            if not d.folder:
                fcntl.lockf(d.fd, fcntl.LOCK_UN)
            d.held = None

    def _kernel_holder(self, ino: int) -> str:
        held = self.kernel.held().get(ino, []) if self.kernel is not None else []
        return held[0].principal if held else "a kernel lock"

    def sync(self, ino: int) -> None:
        """Make the daemon's locks on `ino` what the leases want now, as far as that needs no open and
        no wait (a lock that cannot be had now is retried by maintenance)."""
        d = self.fds.get(ino)
        if d is None:
            return
        try:
            self._set(ino, d, self.wanted(ino) if self.active else None)
        except LockError:
            pass

    def needs_opening(self, ino: int, mode: str, principal: str) -> list[int]:
        """The inodes a lease (`ino`, `mode`, `principal`) needs descriptors of that are not open yet."""
        if not self.active:
            return []
        return [i for i in self._lease_inodes(ino, mode, principal) if i not in self.fds and self._may_try(i)]

    def hold(self, ino: int, mode: str, principal: str) -> None:
        """Take now, without waiting, the kernel locks a lease (`ino`, `mode`, `principal`) needs on top
        of those held; LockError(EBUSY) if a kernel lock is in the way (nothing changed then). An inode
        whose descriptor could not be opened goes without (see needs_opening)."""
        if not self.active:
            return
        taken: list[int] = []
        try:
            for i in self._lease_inodes(ino, mode, principal):
                d = self.fds.get(i)
                target = mode if i == ino else EXCLUSIVE
                if d is None or d.held == EXCLUSIVE or d.held == target:
                    continue
                self._set(i, d, target)
                taken.append(i)
        except LockError:
            for i in taken:
                self.sync(i)  # back to what the leases held before want
            raise

    # -- opening -------------------------------------------------------------------------------

    def _may_try(self, ino: int) -> bool:
        failed = self._unopenable.get(ino)
        return failed is None or time.monotonic() - failed > RETRY_UNOPENABLE

    def _start_open(self, ino: int, tries: int = 1, event: trio.Event | None = None) -> trio.Event | None:
        """The open of `ino` under way (started now if need be), or None if there is nothing to open."""
        if ino in self.fds or self._mount is None:
            return None
        if event is None and ino in self._pending:
            return self._pending[ino]
        inode, path = self.meta.get(ino), self.meta.path_of(ino)
        if inode is None or path is None or not (inode.is_regular or inode.is_dir):
            if event is not None:
                event.set()
            return None
        event = self._pending[ino] = event or trio.Event()
        mountpoint, device = self._mount
        writable = inode.is_regular and not inode.mode & ANY_EXEC
        self.opener.submit(open_on_mount, (mountpoint, device, path.lstrip(b"/"), ino, inode.is_dir, writable),
                           partial(self._opened, ino, tries))
        return event

    def _opened(self, ino: int, tries: int, outcome: tuple[bool, Any]) -> None:
        """On the trio thread, when the opener has opened `ino` (or failed to)."""
        ok, value = outcome
        event = self._pending.pop(ino)
        try:
            if not ok:
                if isinstance(value, OSError) and value.errno in (errno.ESTALE, errno.ENOENT) and tries < OPEN_TRIES:
                    self._start_open(ino, tries + 1, event)  # moved meanwhile: look it up again
                    return
                self._unopenable[ino] = time.monotonic()
                log.warning("no kernel lock can stand for the leases of inode %d: %s", ino, value)
                return
            fd, writable = value
            inode = self.meta.get(ino)
            if not self.active or ino in self.fds or inode is None or inode.nlink == 0:
                self.opener.submit(close_all, ([fd],))
                return
            self._unopenable.pop(ino, None)
            self.fds[ino] = Descriptor(fd, writable, inode.is_dir, None, time.monotonic())
            self.sync(ino)
        except Exception:
            log.exception("internal error in lease_locks after opening inode %d", ino)
        finally:
            if ino not in self._pending:
                event.set()

    async def open(self, inodes: list[int]) -> None:
        """Open descriptors of `inodes`, for a request handler that waits meanwhile (another pyfuse3
        task serves the opener's requests); LockError(EBUSY) if too many handlers wait already."""
        if self._awaiting >= self.max_awaiting:
            raise LockError(errno.EBUSY, "too many locks being taken at once")
        self._awaiting += 1
        try:
            with trio.move_on_after(OPEN_TIMEOUT) as timeout:
                for ino in inodes:
                    event = self._start_open(ino)
                    if event is not None:
                        await event.wait()
            if timeout.cancelled_caught:
                raise LockError(errno.EBUSY, "the daemon could not open the file in time")
        finally:
            self._awaiting -= 1

    # -- what the FUSE handlers tell ----------------------------------------------------------

    def opened(self, ino: int, flags: int, info: Any) -> Any:
        """After a principal's open of `ino` (its handle counted): `info`, or a coroutine that gives it
        once the daemon's descriptor is closed (an exec of a file the daemon kept open for writing) or
        locked (a file inside a folder under someone else's exclusive lease)."""
        d = self.fds.get(ino)
        if flags & FMODE_EXEC and d is not None and d.writable and d.held is None:
            return self._then(self._close_idle_now(ino), info)
        if not self.leases.by_inode or not self.active:
            return info
        want = self.wanted(ino)
        if want is None or (d is not None and (d.held == EXCLUSIVE or d.held == want)):
            return info
        if d is not None:
            self._sync_or_retry(ino)
            return info
        if not self._may_try(ino) or self._awaiting >= self.max_awaiting:
            return info
        return self._then(self._open_and_sync(ino), info)

    def _sync_or_retry(self, ino: int) -> None:
        """sync(ino), and if the lock cannot be had now (a kernel lock is in the way), retry it later."""
        self.sync(ino)
        d = self.fds.get(ino)
        if d is not None and d.held != self.wanted(ino):
            self._retry.add(ino)
        else:
            self._retry.discard(ino)

    async def _then(self, first: Coroutine[Any, Any, None], info: Any) -> Any:
        """`info` after `first`: the open it answers is granted whatever becomes of the lock."""
        try:
            await first
        except Exception:
            log.exception("internal error in lease_locks while an open waited")
        return info

    async def _open_and_sync(self, ino: int) -> None:
        try:
            await self.open([ino])
        except LockError:
            return
        self._sync_or_retry(ino)

    async def _close_idle_now(self, ino: int) -> None:
        d = self.fds.get(ino)
        if d is None or d.held is not None or self._awaiting >= self.max_awaiting:
            return
        del self.fds[ino]
        self._awaiting += 1
        try:
            await self.opener.run(close_all, [d.fd])
        finally:
            self._awaiting -= 1

    def closed(self, ino: int) -> None:
        """After a principal's handle of `ino` was released."""
        d = self.fds.get(ino)
        if d is not None and d.held is not None:
            self.sync(ino)

    def gone(self, ino: int) -> None:
        """The last name of `ino` is gone: its descriptor is closed (and so its locks dropped)."""
        d = self.fds.pop(ino, None)
        if d is not None:
            self.opener.submit(close_all, ([d.fd],))

    def lease_changed(self, ino: int) -> None:
        """Leases of `ino` ended (released, expired, broken, their session ended, the file freed)."""
        self.sync(ino)
        if self._is_folder(ino):  # the files locked for its sake
            for other, d in list(self.fds.items()):
                if other != ino and d.held is not None:
                    self.sync(other)

    # -- unmounting ---------------------------------------------------------------------------

    async def suspend(self) -> None:
        """Let go of every descriptor (an open one makes the kernel refuse the unmount as busy), and
        open none until resume(). Leases stay; their locks are taken again at resume()."""
        self._suspended += 1
        while self._pending:
            await next(iter(self._pending.values())).wait()
        fds, self.fds = [d.fd for d in self.fds.values()], {}
        if fds:
            await self.opener.run(close_all, fds)

    def resume(self) -> None:
        self._suspended -= 1  # maintenance takes the leases' locks again

    # -- the background task (mount.py's nursery) ---------------------------------------------

    async def run(self, mountpoint: str, device: tuple[int, int], ready: Callable[[], None]) -> None:
        """Take the kernel locks of the leases restored from the store, then call `ready`; then keep
        retrying locks that could not be had, close idle descriptors, and let go of everything if the
        mount was detached (`umount -l`) while the daemon holds it open."""
        self.opener.start(trio.lowlevel.current_trio_token())
        self._mount = (mountpoint, device)
        with trio.move_on_after(RESTORE_TIMEOUT):
            await self._take_missing()
        ready()
        looked = time.monotonic()
        while True:
            await trio.sleep(MAINTAIN_INTERVAL)
            if not self.active:
                continue
            try:
                await self._take_missing()
                self._close_idle()
                if self.fds and time.monotonic() - looked > DETACH_CHECK:
                    looked = time.monotonic()
                    mount = mounts.mount_at(mountpoint, resolved=True)
                    if mount is None or mount.device != device:
                        self._detached()
            except Exception:
                log.exception("internal error in lease_locks maintenance")

    async def _take_missing(self) -> None:
        """Locks the leases want and the daemon does not hold: opened if need be, taken if they can be."""
        for ino in list(self.leases.by_inode):
            if not self.active:
                return
            d = self.fds.get(ino)
            if d is not None and d.held == EXCLUSIVE or self.wanted(ino) is None:
                continue
            if ino not in self.fds and self._may_try(ino):
                event = self._start_open(ino)
                if event is not None:
                    await event.wait()
            self.sync(ino)
        for ino in list(self._retry):
            self._sync_or_retry(ino)

    def _close_idle(self) -> None:
        now = time.monotonic()
        idle = sorted((d.used, ino) for ino, d in self.fds.items() if d.held is None and ino not in self._pending)
        excess = len(idle) - MAX_IDLE
        closing = [ino for n, (used, ino) in enumerate(idle) if n < excess or now - used > IDLE_SECONDS]
        if closing:
            self.opener.submit(close_all, ([self.fds.pop(ino).fd for ino in closing],))

    def _detached(self) -> None:
        log.info("the mount was detached: closing the daemon's own descriptors on it")
        self._mount = None
        fds, self.fds = [d.fd for d in self.fds.values()], {}
        self.opener.submit(close_all, (fds,))
