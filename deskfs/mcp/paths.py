"""Confinement: every path a tool is given, turned into a descriptor that is inside the workspace.

Owns reading a client's path (relative to the workspace's root, or absolute under the mountpoint) and
opening it beneath the mount's root with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
RESOLVE_NO_XDEV): the kernel itself refuses `..` that climbs out, a symlink (at the end or in the middle,
absolute or relative) that resolves outside, and a crossing into another filesystem, at the moment of the
open, so a symlink swapped in after any check cannot redirect it. Every tool then works on those
descriptors (`*at` calls relative to a parent folder's descriptor, `/proc/self/fd/N` for xattrs), never
on a path string again. Where the kernel has no openat2 (before 5.6) it walks the path one component at
a time with O_NOFOLLOW from the root's descriptor and refuses every symlink.

Must never: resolve a path with realpath and then open the string; accept an absolute path that is not
below the mountpoint component by component (`/x/desk-evil` is not inside `/x/desk`); follow a symlink
out of the workspace; open anything with the caller's path before it went through here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
from contextlib import contextmanager
from typing import Iterator

SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine, 437)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
MAX_PATH = 4096


class Outside(Exception):
    """A path the tools refuse: the sentence says why and what to give instead."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, RESOLVE)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(os.fsencode(path)),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2's guarantees without it: one O_NOFOLLOW component at a time; every symlink refused."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "..":  # lexically normalised paths have none; refuse rather than climb
                raise OSError(errno.EXDEV, "path leaves the workspace", path)
            step = (flags | os.O_NOFOLLOW) if last else (os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                nxt = os.open(part, step | os.O_CLOEXEC, mode, dir_fd=current)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(f"/proc/self/fd/{current}/{part}"):
                    raise OSError(errno.EXDEV, "a symlink on the way (this kernel has no openat2)", path) from None
                raise
            os.close(current)
            current = nxt
        if not parts:
            if flags & os.O_PATH:
                return current
            nxt = os.open(".", flags | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            return nxt
        return current
    except BaseException:
        os.close(current)
        raise


class Root:
    """The workspace's root, as the tools see it: the mountpoint, and descriptors beneath it."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.real = os.path.realpath(self.mountpoint)  # how the kernel names it in /proc/self/fd links

    # -- reading a client's path ------------------------------------------------------------------

    def relative(self, path: object) -> str:
        """`path` from the workspace's root, normalised ('' for the root), or Outside saying why."""
        if not isinstance(path, str):
            raise Outside("give a path: relative to the workspace's root (e.g. notes/plan.md) or absolute"
                          f" under {self.mountpoint}")
        if "\0" in path or len(path) > MAX_PATH:
            raise Outside("a path may not contain NUL characters or be longer than 4096 bytes")
        if path.startswith("/"):
            for base in {self.mountpoint, self.real}:
                if path == base or path.startswith(base.rstrip("/") + "/"):
                    path = path[len(base.rstrip("/")):]
                    break
            else:
                raise Outside(f"{path} is outside the workspace: give a path under {self.mountpoint}, or relative"
                              " to it")
        parts: list[str] = []
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise Outside(f"{path} leaves the workspace ('..' above its root)")
                parts.pop()
            else:
                parts.append(part)
        return "/".join(parts)

    def shown(self, rel: str) -> str:
        """A path as the tools report it: from the workspace's root, starting with '/'."""
        return "/" + rel

    def absolute(self, rel: str) -> str:
        return os.path.join(self.mountpoint, rel) if rel else self.mountpoint

    # -- opening beneath the root -----------------------------------------------------------------

    def _root_fd(self) -> int:
        try:
            return os.open(self.mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(errno.ENOTCONN if exc.errno in (errno.ENOENT, errno.ENOTDIR) else exc.errno,
                          os.strerror(exc.errno), self.mountpoint) from None

    def open(self, rel: str, flags: int, mode: int = 0o666) -> int:
        """A descriptor of `rel` opened with `flags` beneath the root (symlinks followed only inside)."""
        global _have_openat2
        root = self._root_fd()
        try:
            if _have_openat2 is not False:
                try:
                    fd = _openat2(root, rel or ".", flags, mode)
                    _have_openat2 = True
                    return fd
                except OSError as exc:
                    if exc.errno != errno.ENOSYS:
                        raise
                    _have_openat2 = False
            return _walk(root, rel, flags, mode)
        finally:
            os.close(root)

    @contextmanager
    def fd(self, rel: str, flags: int = os.O_PATH, mode: int = 0o666) -> Iterator[int]:
        fd = self.open(rel, flags, mode)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(a descriptor of the folder holding `rel`, its last component): for *at calls on the entry itself."""
        if not rel:
            raise Outside("that is the workspace's root itself; name something inside it")
        folder, name = posixpath.split(rel)
        with self.fd(folder, os.O_PATH | os.O_DIRECTORY) as dirfd:
            yield dirfd, name

    def resolved(self, rel: str) -> str:
        """`rel` with symlinks followed (beneath the root): the entry a write through it would change."""
        with self.fd(rel, os.O_PATH) as fd:
            target = os.readlink(f"/proc/self/fd/{fd}")
        for base in (self.real, self.mountpoint):
            if target == base:
                return ""
            if target.startswith(base.rstrip("/") + "/"):
                return target[len(base.rstrip("/")) + 1:]
        raise Outside(f"{self.shown(rel)} resolves outside the workspace")

    def proc(self, fd: int) -> str:
        """The path that names descriptor `fd` for calls that take no descriptor (xattrs of O_PATH fds)."""
        return f"/proc/self/fd/{fd}"
