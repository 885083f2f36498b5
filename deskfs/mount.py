"""The daemon: one store, one mount, one trio nursery that owns every background task.

Owns the daemon's life: checking the mountpoint, running fsck after an unclean stop, mounting, the
commit window, stopping on a signal or an external unmount, and the clean-shutdown mark.

Must never: stat the mountpoint once `pyfuse3.init` has mounted it and before `main()` serves (that
deadlocks); leave the store marked clean after anything but an orderly close.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

import pyfuse3
import trio

from deskfs import control, mounts
from deskfs.errors import DeskfsError
from deskfs.fs import Operations
from deskfs.store import Store, control_socket_path
from deskfs.store.fsck import fsck

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.05  # seconds; a metadata change is durable against a daemon crash within this
LEASE_EXPIRY_INTERVAL = 0.25  # seconds between sweeps of expired leases


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.exists(mountpoint):
        raise DeskfsError(f"mountpoint {mountpoint} does not exist")
    existing = mounts.mount_at(mountpoint)
    if existing is not None:
        raise DeskfsError(f"{mountpoint} is already a deskfs mount (of {existing.store})")
    if not os.path.isdir(mountpoint):
        raise DeskfsError(f"mountpoint {mountpoint} is not a folder")
    if os.listdir(mountpoint):
        raise DeskfsError(f"mountpoint {mountpoint} is not empty")


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
    check_mountpoint(mountpoint)
    store = Store(store_path)
    try:
        repairs = [] if store.was_clean else fsck(store)
        for line in repairs:
            log.warning("fsck: %s", line)
        operations = Operations(store)
        try:
            pyfuse3.init(operations, mountpoint, fuse_options(store, allow_other))
        except RuntimeError as exc:
            raise DeskfsError(f"cannot mount at {mountpoint}: {exc} (see the kernel log)") from None
        store.mark_in_use()
        mount = mounts.mount_at(mountpoint, resolved=True)
        if mount is None:
            raise DeskfsError(f"mounted at {mountpoint}, but the mount is not visible in /proc/self/mountinfo")
        operations.observe_kernel_locks(mount.device)
    except BaseException:
        store.close(clean=store.was_clean)
        raise
    log.info("mounted %s at %s", store.path, mountpoint)
    ready(repairs)
    try:
        trio.run(_run, store, operations, commit_interval, busy_poll_us)
    finally:
        pyfuse3.close(unmount=True)
        store.close(clean=True)
        log.info("unmounted %s", mountpoint)


async def _run(store: Store, operations: Operations, commit_interval: float, busy_poll_us: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_commit_window, store, commit_interval)
        nursery.start_soon(_expire_leases, operations)
        nursery.start_soon(_stop_on_signal)
        await nursery.start(control.serve, control_socket_path(store.path), operations)
        if busy_poll_us > 0:
            nursery.start_soon(BusyPoller(busy_poll_us / 1e6).run, operations)
        # Handlers never await, so one task serves requests best (no task switching per request).
        await pyfuse3.main(min_tasks=1, max_tasks=1)
        nursery.cancel_scope.cancel()


async def _commit_window(store: Store, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        try:
            store.commit()
        except Exception:
            # Kept open and retried at the next window: the space guard leaves room, so this is rare.
            log.exception("commit failed; retrying")


async def _expire_leases(operations: Operations) -> None:
    while True:
        await trio.sleep(LEASE_EXPIRY_INTERVAL)
        for inode, holder in operations.leases.expire():
            log.info("lease expired: inode %d, %s", inode, holder.describe())


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("stopping on signal %d", signum)
            pyfuse3.terminate()
            return


class BusyPoller:
    """Keeps the event loop polling /dev/fuse for a short window after each request instead of sleeping.

    A request that arrives while the daemon sleeps pays for waking it on another core, which dominates a
    round trip on small requests; during a burst (untar, git) the next request is usually that close.
    The price is a core kept busy for at most `window` after the last request.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.last_request = 0.0
        self.woken = trio.Event()

    def note_request(self) -> None:
        self.last_request = time.monotonic()
        if not self.woken.is_set():
            self.woken.set()

    async def run(self, operations: Operations) -> None:
        operations.on_request = self.note_request
        while True:
            await self.woken.wait()
            # Each checkpoint lets trio poll its I/O without sleeping (epoll_wait with timeout 0).
            while time.monotonic() - self.last_request < self.window:
                await trio.lowlevel.checkpoint()
            self.woken = trio.Event()
