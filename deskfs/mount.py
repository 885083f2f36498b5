"""The daemon: one store, one mount, one trio nursery that owns every background task.

Owns the daemon's life: checking the mountpoint, running fsck after an unclean stop, mounting, the
background tasks (commit window, lease expiry, the kernel lock watcher, journal retention, the control
socket, the lease locks' upkeep), stopping on a signal or an external unmount, and the clean-shutdown mark.

Must never: stat the mountpoint once `pyfuse3.init` has mounted it and before `main()` serves (that
deadlocks); leave the store marked clean after anything but an orderly close.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import signal
import time
from typing import Callable

import pyfuse3
import trio

from deskfs import control, mounts
from deskfs.errors import DeskfsError
from deskfs.fs import Operations
from deskfs.journal import Actor, daemon_actor
from deskfs.layout import control_socket_path, daemon_pid
from deskfs.store import Store
from deskfs.store.fsck import fsck

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.05  # seconds; a metadata change is durable against a daemon crash within this
LEASE_EXPIRY_INTERVAL = 0.25  # seconds between sweeps of expired leases
LOCK_WATCH_INTERVAL = 0.05  # seconds between looks at /proc/locks for the journal
RETENTION_INTERVAL = 60.0  # seconds between applications of journal.retention
FUSE_TASKS = 32  # pyfuse3 tasks at most: handlers waiting for the daemon's own opens, plus one serving
VERSIONS_GC_INTERVAL = 60.0  # seconds between applications of the versions policy



def check_mountpoint(mountpoint: str) -> None:
    # Mounts first: a dead FUSE mount fails every stat (ENOTCONN) and would look like a missing folder.
    existing = mounts.mount_at(mountpoint)
    if existing is not None and daemon_pid(existing.store) is None:
        raise DeskfsError(f"{mountpoint} is a deskfs mount whose daemon is gone; clear it with: deskfs unmount {mountpoint}")
    if existing is not None:
        raise DeskfsError(f"{mountpoint} is already a deskfs mount (of {existing.store})")
    if not os.path.exists(mountpoint):
        raise DeskfsError(f"mountpoint {mountpoint} does not exist")
    if not os.path.isdir(mountpoint):
        raise DeskfsError(f"mountpoint {mountpoint} is not a folder")
    if os.listdir(mountpoint):
        raise DeskfsError(f"mountpoint {mountpoint} is not empty")


def raise_descriptor_limit() -> None:
    """As many descriptors as the system lets this process have: clients of the control socket are
    limited far below it (control.MAX_CONNECTIONS), so the mount's own work always finds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fuse_options(store: Store, allow_other: bool) -> set[str]:
    # The store's path is the mount's source (as findmnt shows it); commas separate FUSE options.
    source = store.path.replace("\\", "\\\\").replace(",", "\\,")
    options = {"default_permissions", f"fsname={source}", "subtype=deskfs", "noatime"}
    if allow_other:
        options.add("allow_other")
    return options


def serve(
    store_path: str,
    mountpoint: str,
    allow_other: bool,
    ready: Callable[[list[str]], None],
    commit_interval: float = COMMIT_INTERVAL,
    busy_poll_us: int = 0,
) -> None:
    """Mount `store_path` at `mountpoint` and serve until unmounted or signalled.

    `ready` is called once the mount is in place, with the repairs fsck made before it (if any).
    """
    mountpoint = os.path.realpath(mountpoint)  # resolved now: once mounted, the daemon must not stat it
    raise_descriptor_limit()
    check_mountpoint(mountpoint)
    store = Store(store_path)
    try:
        repairs = [] if store.was_clean else fsck(store)
        for line in repairs:
            log.warning("fsck: %s", line)
        if not store.was_clean:
            store.journal.record(daemon_actor(), "fsck", repairs=repairs)
        operations = Operations(store, shared=allow_other)
        moved = operations.move_aside_reserved_name()
        if moved is not None:
            log.warning("the root's own .deskfs is now %s (the name .deskfs shows versions)", moved)
        try:
            pyfuse3.init(operations, mountpoint, fuse_options(store, allow_other))
        except RuntimeError as exc:
            raise DeskfsError(f"cannot mount at {mountpoint}: {exc} (see the kernel log)") from None
        store.mark_in_use()
        mount = mounts.mount_at(mountpoint, resolved=True)
        if mount is None:
            raise DeskfsError(f"mounted at {mountpoint}, but the mount is not visible in /proc/self/mountinfo")
        operations.observe_kernel_locks(mount.device)
        store.journal.record(daemon_actor(), "mount", mountpoint=mountpoint)
        store.commit()
    except BaseException:
        store.close(clean=store.was_clean)
        raise
    log.info("mounted %s at %s", store.path, mountpoint)
    poller = RequestPoller(fuse_device_fd(), busy_poll_us / 1e6) if busy_poll_us > 0 else None
    if poller is not None:
        poller.install()
    try:
        # Ready once the restored leases hold their kernel locks again (lease_locks.py).
        trio.run(_run, store, operations, commit_interval, mountpoint, mount.device, lambda: ready(repairs))
    finally:
        if poller is not None:
            poller.uninstall()
        pyfuse3.close(unmount=True)
        store.journal.record(daemon_actor(), "unmount", mountpoint=mountpoint)
        store.close(clean=True)
        log.info("unmounted %s", mountpoint)


async def _run(store: Store, operations: Operations, commit_interval: float, mountpoint: str,
               device: tuple[int, int], ready: Callable[[], None]) -> None:
    feed = control.RecordFeed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_commit_window, store, feed, commit_interval)
        nursery.start_soon(_expire_leases, operations)
        nursery.start_soon(_watch_kernel_locks, operations)
        nursery.start_soon(_apply_retention, store)
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(_drop_revoked_pages, operations)
        nursery.start_soon(_collect_versions, store)
        await nursery.start(control.serve(control_socket_path(store.path), operations, feed))
        nursery.start_soon(operations.lease_locks.run, mountpoint, device, ready)
        # Handlers never await, but for a lease (or an open) waiting for the daemon's own open of a
        # file, which another task must serve meanwhile: pyfuse3 keeps a second task waiting for the
        # next request (about 3 µs a request: docs/identity-and-locks.md), and starts more
        # only while handlers wait.
        operations.lease_locks.max_awaiting = FUSE_TASKS - 2
        await pyfuse3.main(min_tasks=1, max_tasks=FUSE_TASKS)
        nursery.cancel_scope.cancel()


async def _commit_window(store: Store, feed: control.RecordFeed, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        committed = store.journal.committed_seq
        try:
            store.commit()
        except Exception:
            # Kept open and retried at the next window: the space guard leaves room, so this is rare.
            log.exception("commit failed; retrying")
        if store.journal.committed_seq != committed:
            feed.notify()


async def _expire_leases(operations: Operations) -> None:
    while True:
        await trio.sleep(LEASE_EXPIRY_INTERVAL)
        for inode, holder in operations.leases.expire():
            operations.journal.record(daemon_actor(), "lease_expired", inode, operations.path_of(inode),
                                      holder=holder.principal, mode=holder.mode)


async def _watch_kernel_locks(operations: Operations) -> None:
    """Journal kernel locks (flock, fcntl, OFD) as they are taken and released."""
    while True:
        await trio.sleep(LOCK_WATCH_INTERVAL)
        if operations.lock_watcher is None:
            continue
        taken, released = operations.lock_watcher.changes()
        for op, events in (("lock", taken), ("unlock", released)):
            for inode, holder, uid in events:
                operations.journal.record(Actor(holder.principal, uid, holder.pid), op, inode,
                                          operations.path_of(inode), kind=holder.kind, mode=holder.mode,
                                          byte_range=not holder.whole)


async def _apply_retention(store: Store) -> None:
    """Prune journal records older than `journal.retention`, a batch per commit window."""
    while True:
        await control.apply_retention(store, daemon_actor(), COMMIT_INTERVAL)
        await trio.sleep(RETENTION_INTERVAL)


async def _drop_revoked_pages(operations: Operations) -> None:
    """Drop the cached pages of files changed while someone who lost read access still has them open.

    Handlers only queue the inode (they must not wait on the kernel); this task asks the kernel from a
    worker thread, once per inode however many writes were queued meanwhile.
    """
    wanted: set[int] = set()
    ready = trio.Event()

    def queue(ino: int) -> None:
        wanted.add(ino)
        ready.set()

    operations.drop_pages = queue
    while True:
        await ready.wait()
        ready = trio.Event()
        inodes = sorted(wanted)
        wanted.clear()
        for ino in inodes:
            await trio.to_thread.run_sync(control.invalidate_pages, ino)


async def _collect_versions(store: Store) -> None:
    """Apply the versions policy in the background, a batch per turn, so requests never stall."""
    while True:
        await trio.sleep(VERSIONS_GC_INTERVAL)
        try:
            await control.collect_versions(store, daemon_actor())
        except OSError:
            log.exception("collecting old versions failed; trying again later")


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("stopping on signal %d", signum)
            pyfuse3.terminate()
            return



class RequestPoller:
    """Waits for the next FUSE request by polling /dev/fuse for a short window before sleeping.

    pyfuse3 waits for every request through `trio.lowlevel.wait_readable`, which parks the task, re-arms
    epoll and runs the scheduler; when the daemon then sleeps, the next request also pays for waking it.
    During a burst the next request is usually microseconds away: polling the descriptor directly finds
    it without either cost. At least every `max_burst` seconds the wait goes through trio anyway, so the
    commit window, lease expiry and the control socket keep their turns. The price is a core kept busy
    for at most `window` after each request.
    """

    def __init__(self, fuse_fd: int, window: float, max_burst: float = 0.002) -> None:
        self.fuse_fd = fuse_fd
        self.window = window
        self.max_burst = max_burst
        self._poll = select.poll()
        self._poll.register(fuse_fd, select.POLLIN)
        self._trio_wait = trio.lowlevel.wait_readable
        self._last_yield = time.monotonic()

    def install(self) -> None:
        trio.lowlevel.wait_readable = self.wait_readable

    def uninstall(self) -> None:
        trio.lowlevel.wait_readable = self._trio_wait

    async def wait_readable(self, fd: int) -> None:
        if fd == self.fuse_fd:
            start = time.monotonic()
            if start - self._last_yield < self.max_burst:
                while not self._poll.poll(0):
                    if time.monotonic() - start > self.window:
                        break
                else:
                    return
        await self._trio_wait(fd)
        self._last_yield = time.monotonic()


def fuse_device_fd() -> int:
    """The descriptor pyfuse3 reads requests from (it does not expose it)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    raise RuntimeError("no /dev/fuse descriptor in this process")
