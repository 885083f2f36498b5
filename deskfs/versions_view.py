"""The read-only `.deskfs/versions/` tree: old versions of every file, for plain tools.

`.deskfs` at the mount's root is answered by lookup but never listed by readdir (as ZFS hides `.zfs`), so
`find`, `git status`, `tar` and `rsync` of the workspace never see it. Below it, `versions/` mirrors the
tree: each folder a folder, each regular file a folder of its numbered versions, the current one included
(`.deskfs/versions/reports/q3.md/3`). Attributes follow the file they show, without write bits, so the
kernel's permission check (default_permissions) gives old versions the Unix permissions of the file now;
fs.py checks roles as for any request.

Owns the view's inode numbers (the top bit set; kind and ids below it), their attributes and listings.
Must never: change anything (every change in the view is EROFS, decided by fs.py); show what is not a
version of a file that exists now.
"""

from __future__ import annotations

import os
import stat

import pyfuse3

from deskfs.store.meta import ROOT_INODE, Inode, Meta
from deskfs.store.versions import Version, Versions

NAME = b".deskfs"
VERSIONS = b"versions"
VIEW_BIT = 1 << 63
KIND_SHIFT = 56
TOP, TREE, FOLDER, FILE, VERSION = 1, 2, 3, 4, 5  # .deskfs, .deskfs/versions, a folder, a file, a version
NUMBER_BITS = 24  # versions per file in a VERSION inode number; the file's inode number above them
BLOCK_SIZE = 128 * 1024


def is_view(ino: int) -> bool:
    return ino >= VIEW_BIT


def view_ino(kind: int, ident: int = 0) -> int:
    return VIEW_BIT | (kind << KIND_SHIFT) | ident


def kind_of(ino: int) -> tuple[int, int]:
    return (ino >> KIND_SHIFT) & 0x7F, ino & ((1 << KIND_SHIFT) - 1)


def read_only(mode: int) -> int:
    return mode & ~0o222


def searchable_where_readable(mode: int) -> int:
    """A folder's permission bits for a file's versions: read and search for whoever may read the file."""
    bits = 0
    for shift in (6, 3, 0):
        if mode & (0o4 << shift):
            bits |= 0o5 << shift
    return bits


class VersionsView:
    def __init__(self, meta: Meta, versions: Versions) -> None:
        self.meta = meta
        self.versions = versions

    # -- names --------------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        """The view inode `name` names in view folder `parent`, or None."""
        kind, ident = kind_of(parent)
        if kind == TOP:
            return view_ino(TREE) if name == VERSIONS else None
        if kind in (TREE, FOLDER):
            folder = ROOT_INODE if kind == TREE else ident
            child = self.meta.lookup(folder, name)
            return None if child is None else self._mirror(child)
        if kind == FILE and name.isdigit() and len(name) < 8:
            number = int(name)
            if 0 < number < (1 << NUMBER_BITS) and self.versions.version(ident, number) is not None:
                return view_ino(VERSION, (ident << NUMBER_BITS) | number)
        return None

    def _mirror(self, ino: int) -> int | None:
        inode = self.meta.get(ino)
        if inode is None:
            return None
        if inode.is_dir:
            return view_ino(FOLDER, ino)
        return view_ino(FILE, ino) if inode.is_regular else None

    def parent(self, ino: int) -> int:
        kind, ident = kind_of(ino)
        if kind == TOP:
            return ROOT_INODE
        if kind == TREE:
            return view_ino(TOP)
        if kind == VERSION:
            return view_ino(FILE, ident >> NUMBER_BITS)
        parents = self.meta.parents_of(ident)
        if not parents or parents[0] == ROOT_INODE:
            return view_ino(TREE)
        return view_ino(FOLDER, parents[0])

    def entries(self, ino: int) -> list[tuple[bytes, int]]:
        """(name, view inode) of what view folder `ino` holds, in a stable order."""
        kind, ident = kind_of(ino)
        if kind == TOP:
            return [(VERSIONS, view_ino(TREE))]
        if kind in (TREE, FOLDER):
            folder = ROOT_INODE if kind == TREE else ident
            found, cookie = [], 0
            while batch := self.meta.entries_after(folder, cookie):
                for name, child, cookie in batch:
                    mirrored = self._mirror(child)
                    if mirrored is not None:
                        found.append((name, mirrored))
            return found
        if kind == FILE:
            return [(str(v.number).encode(), view_ino(VERSION, (ident << NUMBER_BITS) | v.number))
                    for v in self.versions.history_of(ident) if v.number < (1 << NUMBER_BITS)]
        return []

    # -- attributes and content ---------------------------------------------------------------

    def real_inode(self, ino: int) -> Inode | None:
        """The file or folder of the workspace a view inode shows (the root for the top two)."""
        kind, ident = kind_of(ino)
        if kind in (TOP, TREE):
            return self.meta.get(ROOT_INODE)
        return self.meta.get(ident >> NUMBER_BITS if kind == VERSION else ident)

    def version_of(self, ino: int) -> Version | None:
        kind, ident = kind_of(ino)
        if kind != VERSION:
            return None
        return self.versions.version(ident >> NUMBER_BITS, ident & ((1 << NUMBER_BITS) - 1))

    def attributes(self, ino: int) -> pyfuse3.EntryAttributes | None:
        real = self.real_inode(ino)
        if real is None:
            return None
        kind, _ = kind_of(ino)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.entry_timeout = 0  # new versions appear at any moment: the kernel asks again each time
        entry.attr_timeout = 0
        entry.st_uid, entry.st_gid = real.uid, real.gid
        entry.st_blksize = BLOCK_SIZE
        entry.st_atime_ns, entry.st_mtime_ns, entry.st_ctime_ns = real.atime_ns, real.mtime_ns, real.ctime_ns
        entry.st_nlink = 2
        if kind in (TOP, TREE, FOLDER):
            entry.st_mode = stat.S_IFDIR | read_only(stat.S_IMODE(real.mode))
        elif kind == FILE:
            entry.st_mode = stat.S_IFDIR | searchable_where_readable(real.mode)
        else:
            version = self.version_of(ino)
            if version is None:
                return None
            entry.st_mode = stat.S_IFREG | (real.mode & 0o444)
            entry.st_nlink = 1
            entry.st_size = real.size if version.ended_ns is None else version.size
            entry.st_blocks = (entry.st_size + 511) // 512
            if version.ended_ns is not None:
                entry.st_mtime_ns = entry.st_ctime_ns = version.ended_ns
        return entry

    def open(self, ino: int) -> tuple[int, int]:
        """(descriptor, length) to read version inode `ino`; OSError(ENOENT) when it is not one (any more)."""
        version = self.version_of(ino)
        if version is None:
            raise FileNotFoundError(ino)
        fd, size = self.versions.open_version(version)
        if version.ended_ns is None:  # the current version: as long as the file is now
            real = self.real_inode(ino)
            size = real.size if real is not None else size
        return fd, size


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
