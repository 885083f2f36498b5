"""File bodies: one backing file per regular inode under `STORE/objects/BUCKET/INODE`.

Owns the backing files, the descriptors open on them (one per inode, shared by every handle) and
the space guard that keeps room for the metadata database so a full disk never corrupts the store.
Bodies are sparse, as the store's filesystem makes them: growing a file by truncate allocates nothing
and is not charged to the guard; a write is charged for what it may allocate (the bytes past the end,
and in a body that may have holes, all of it).

Must never: know about paths, names, permissions or the database; the backing file's length is the
truth about a file's size after a crash (fsck relies on it).
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable

# Inodes are numbered in creation order, so consecutive files share a bucket folder: creating files
# spread over many folders costs ext4 a journal block per folder (measured 1.2 ms against 40 us).
BUCKET_SHIFT = 12


def copy_range(source: int, target: int, size: int) -> int:
    """Copy the first `size` bytes of descriptor `source` into `target` at the same offsets, in the kernel
    (copy_file_range: no bytes through the daemon); returns how many were copied (less at `source`'s end)."""
    copied = 0
    while copied < size:
        n = os.copy_file_range(source, target, size - copied, copied, copied)
        if n == 0:
            break
        copied += n
    return copied


class SpaceGuard:
    """Refuses growth that would leave less than `reserve` bytes free on the store's filesystem.

    The reserve is what lets SQLite always commit: a writer gets ENOSPC while the database still has
    room, instead of the database failing mid-transaction. statvfs is re-read when the estimate runs
    low or every second, so a write normally costs no system call here.
    """

    def __init__(self, path: str, reserve: int | None = None) -> None:
        self.path = path
        self._explicit_reserve = reserve
        # Frees space elsewhere on the store's disk when a claim would fail; returns the bytes freed.
        self.make_room: Callable[[int], int] = lambda nbytes: 0
        self._refresh()

    def _refresh(self) -> None:
        st = os.statvfs(self.path)
        total = st.f_blocks * st.f_frsize
        self.reserve = (
            self._explicit_reserve
            if self._explicit_reserve is not None
            else min(64 << 20, max(1 << 20, total // 50))
        )
        self.free = st.f_bavail * st.f_frsize
        self.checked_at = time.monotonic()

    def claim(self, nbytes: int) -> None:
        """Account for `nbytes` about to be written; OSError(ENOSPC) if they do not fit, even after
        `make_room` gave up what it could (old versions yield to live data)."""
        if self.free - nbytes < 4 * self.reserve or time.monotonic() - self.checked_at > 1.0:
            self._refresh()
            if self.free - nbytes < self.reserve and self.make_room(nbytes + self.reserve - self.free) > 0:
                self._refresh()
            if self.free - nbytes < self.reserve:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= nbytes

    def released(self) -> None:
        """Space was freed (a file deleted or truncated): believe statvfs again."""
        self.checked_at = 0.0

    def available(self) -> int:
        self._refresh()
        return max(0, self.free - self.reserve)


class Content:
    """The backing files of regular inodes."""

    def __init__(self, objects_dir: str, guard: SpaceGuard) -> None:
        self.objects_dir = objects_dir
        self.guard = guard
        self._fds: dict[int, int] = {}
        self._users: dict[int, int] = {}
        # Open bodies that may have holes (grown by truncate, written past their end, or found so when
        # opened): a write inside them may allocate, so it is charged in full.
        self._holey: set[int] = set()
        # Bodies known to hold every byte of their length (no holes): their st_blocks follows from the
        # size, without a stat of the body on every attribute reply (a stat costs as much as the rest).
        self._dense: set[int] = set()

    @staticmethod
    def create_layout(objects_dir: str) -> None:
        os.makedirs(objects_dir, exist_ok=True)

    def path(self, ino: int) -> str:
        return f"{self.objects_dir}/{ino >> BUCKET_SHIFT:x}/{ino}"  # not os.path.join: 1 us less per stat

    def _open_body(self, ino: int) -> int:
        path = self.path(ino)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    # -- descriptors shared by handles --------------------------------------------------------

    def acquire(self, ino: int) -> int:
        """A read-write descriptor on the inode's body, created empty if it has none yet."""
        fd = self._fds.get(ino)
        if fd is None:
            fd = self._fds[ino] = self._open_body(ino)
            self._users[ino] = 0
            st = os.fstat(fd)
            if st.st_blocks * 512 < st.st_size:
                self._holey.add(ino)
                self._dense.discard(ino)
            else:
                self._dense.add(ino)
        self._users[ino] += 1
        return fd

    def release(self, ino: int) -> None:
        self._users[ino] -= 1
        if self._users[ino] == 0:
            del self._users[ino]
            self._holey.discard(ino)
            os.close(self._fds.pop(ino))

    def is_open(self, ino: int) -> bool:
        return ino in self._fds

    def fd(self, ino: int) -> int:
        """The descriptor every handle of `ino` shares (it changes when the body is replaced)."""
        return self._fds[ino]

    def detach(self, ino: int) -> None:
        """Give the open body of `ino` a private copy if it shares its blocks with another name (a kept
        version), so that changing it changes nothing else. Open handles go on with the copy."""
        fd = self._fds.get(ino)
        if fd is None or os.fstat(fd).st_nlink <= 1:
            return
        path = self.path(ino)
        private = os.open(path + ".private", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        copy_range(fd, private, os.fstat(fd).st_size)
        self._dense.discard(ino)
        os.rename(path + ".private", path)
        self._fds[ino] = private
        os.close(fd)

    def replace_body(self, ino: int) -> None:
        """Give `ino` a new, empty body; the old one stays wherever else it is linked (a kept version).
        Open handles go on with the new body."""
        try:
            os.unlink(self.path(ino))
        except FileNotFoundError:
            pass
        self._holey.discard(ino)
        self._dense.add(ino)  # empty
        fd = self._fds.get(ino)
        if fd is not None:
            self._fds[ino] = self._open_body(ino)
            os.close(fd)

    # -- body operations ----------------------------------------------------------------------

    def blocks(self, ino: int, size: int) -> int:
        """512-byte blocks the body really occupies on the store's disk (st_blocks): 0 without a body.
        For a body known to have no holes, what its `size` takes in 4 KiB blocks; else the body's own."""
        if ino in self._dense:
            return (size + 4095) // 4096 * 8
        fd = self._fds.get(ino)
        try:
            st = os.fstat(fd) if fd is not None else os.stat(self.path(ino))
        except FileNotFoundError:
            return 0
        if fd is None and st.st_blocks * 512 >= st.st_size:
            self._dense.add(ino)
        return st.st_blocks

    def forget(self, ino: int) -> None:
        """The daemon no longer keeps `ino` in memory."""
        self._dense.discard(ino)

    def write(self, ino: int, fd: int, offset: int, data: bytes, old_size: int) -> int:
        """pwrite into the open body `fd` of `ino`, after charging the guard for what it may allocate.

        The bytes past the old end are charged (a gap before them stays a hole); bytes inside the old
        size only when the body may have holes, since overwriting allocated blocks needs no space.
        """
        end = offset + len(data)
        if ino in self._holey:
            charge = len(data)
        else:
            charge = end - max(offset, old_size) if end > old_size else 0
            if offset > old_size:
                self._holey.add(ino)
                self._dense.discard(ino)
        if charge > 0:
            self.guard.claim(charge)
        return os.pwrite(fd, data, offset)

    def truncate(self, ino: int, size: int, old_size: int) -> None:
        """Set the body's length. Growing allocates nothing (the new part is a hole), so costs no space;
        a length the store's filesystem cannot hold gets its answer (EFBIG on ext4)."""
        fd = self._fds.get(ino)
        if size > old_size:
            self._dense.discard(ino)
        if fd is not None:
            os.ftruncate(fd, size)
            if size > old_size:
                self._holey.add(ino)
        elif size == 0:
            # Nothing to keep: no body is the same as an empty one, and costs no inode on disk.
            self.delete(ino)
        else:
            fd = self._open_body(ino)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        if size < old_size:
            self.guard.released()

    def delete(self, ino: int) -> None:
        self._holey.discard(ino)
        self._dense.discard(ino)
        try:
            os.unlink(self.path(ino))
        except FileNotFoundError:
            pass
        self.guard.released()

    def close_all(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._users.clear()
        self._holey.clear()
        self._dense.clear()
