"""File bodies: one backing file per regular inode under `STORE/objects/BUCKET/INODE`.

Owns the backing files, the descriptors open on them (one per inode, shared by every handle) and
the space guard that keeps room for the metadata database so a full disk never corrupts the store.

Must never: know about paths, names, permissions or the database; the backing file's length is the
truth about a file's size after a crash (fsck relies on it).
"""

from __future__ import annotations

import errno
import os
import time

# Inodes are numbered in creation order, so consecutive files share a bucket folder: creating files
# spread over many folders costs ext4 a journal block per folder (measured 1.2 ms against 40 us).
BUCKET_SHIFT = 12


class SpaceGuard:
    """Refuses growth that would leave less than `reserve` bytes free on the store's filesystem.

    The reserve is what lets SQLite always commit: a writer gets ENOSPC while the database still has
    room, instead of the database failing mid-transaction. statvfs is re-read when the estimate runs
    low or every second, so a write normally costs no system call here.
    """

    def __init__(self, path: str, reserve: int | None = None) -> None:
        self.path = path
        self._explicit_reserve = reserve
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
        """Account for `nbytes` about to be written; OSError(ENOSPC) if they do not fit."""
        if self.free - nbytes < 4 * self.reserve or time.monotonic() - self.checked_at > 1.0:
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

    @staticmethod
    def create_layout(objects_dir: str) -> None:
        os.makedirs(objects_dir, exist_ok=True)

    def path(self, ino: int) -> str:
        return os.path.join(self.objects_dir, f"{ino >> BUCKET_SHIFT:x}", str(ino))

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
        self._users[ino] += 1
        return fd

    def release(self, ino: int) -> None:
        self._users[ino] -= 1
        if self._users[ino] == 0:
            del self._users[ino]
            os.close(self._fds.pop(ino))

    def is_open(self, ino: int) -> bool:
        return ino in self._fds

    # -- body operations ----------------------------------------------------------------------

    def write(self, fd: int, offset: int, data: bytes, old_size: int) -> int:
        growth = offset + len(data) - old_size
        if growth > 0:
            self.guard.claim(growth)
        return os.pwrite(fd, data, offset)

    def truncate(self, ino: int, size: int, old_size: int) -> None:
        if size > old_size:
            self.guard.claim(size - old_size)
        fd = self._fds.get(ino)
        if fd is not None:
            os.ftruncate(fd, size)
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
