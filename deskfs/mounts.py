"""Finding deskfs mounts: which workspaces are mounted where, and which one a path is inside.

Owns reading `/proc/self/mountinfo` (type `fuse.deskfs`, source = the store's path).
Must never: stat or open anything inside a mount (a hung daemon would hang the caller).
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from deskfs.errors import EXIT_USAGE, DeskfsError

FS_TYPE = "fuse.deskfs"


class Mount(NamedTuple):
    store: str
    mountpoint: str
    options: str
    device: tuple[int, int]  # (major, minor): the mount's st_dev, as /proc/locks names it


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted() -> list[Mount]:
    """Every deskfs mount visible to this process."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            fs_type, source = fields[separator + 1], fields[separator + 2]
            if fs_type == FS_TYPE:
                major, minor = fields[2].split(":")
                found.append(Mount(_unescape(source), _unescape(fields[4]), fields[5], (int(major), int(minor))))
    return found


def mount_at(mountpoint: str, resolved: bool = False) -> Mount | None:
    """The deskfs mount at `mountpoint`; `resolved` if the path is already real (nothing is stat-ed then)."""
    if not resolved:
        mountpoint = os.path.realpath(mountpoint)
    return next((m for m in mounted() if m.mountpoint == mountpoint), None)


def mount_of_store(store: str) -> Mount | None:
    store = os.path.realpath(store)
    return next((m for m in mounted() if m.store == store), None)


def containing(path: str) -> Mount | None:
    """The innermost deskfs mount that `path` lies in."""
    path = os.path.abspath(path)
    best = None
    for m in mounted():
        if path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/"):
            if best is None or len(m.mountpoint) > len(best.mountpoint):
                best = m
    return best


def resolve_workspace(explicit: str | None) -> Mount:
    """The workspace a command acts on: `--mount PATH`, else the mount holding the current folder."""
    if explicit is not None:
        found = containing(explicit)
        if found is None:
            raise DeskfsError(f"{explicit} is not inside a deskfs mount", EXIT_USAGE)
        return found
    found = containing(os.getcwd())
    if found is None:
        raise DeskfsError("not inside a deskfs mount (cd into one or pass --mount PATH)", EXIT_USAGE)
    return found
