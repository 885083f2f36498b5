"""Where things are in a store, and the one-daemon lock: what the CLI needs without opening the store.

Owns the names of the files in a store (see docs/storage.md) and the daemon lock's protocol.
Must never: import the database or FUSE layers (every `deskfs` command imports this, and starts fast).
"""

from __future__ import annotations

import fcntl
import os

from deskfs.errors import DeskfsError

DB_NAME = "deskfs.db"


def db_path(store_path: str) -> str:
    return os.path.join(store_path, DB_NAME)


def lock_path(store_path: str) -> str:
    return os.path.join(store_path, "run", "daemon.lock")


def log_path(store_path: str) -> str:
    return os.path.join(store_path, "run", "daemon.log")


def control_socket_path(store_path: str) -> str:
    return os.path.join(store_path, "run", "ctl.sock")


def journal_key_path(store_path: str) -> str:
    """The key that signs the journal's head (docs/journal.md): outside the database, its owner's only."""
    return os.path.join(store_path, "journal.key")


def journal_head_path(store_path: str) -> str:
    """The journal's signed head: the newest committed record's seq and hash, signed with the key."""
    return os.path.join(store_path, "journal.head")


def check_is_store(store_path: str) -> None:
    if not os.path.isdir(store_path):
        raise DeskfsError(f"no deskfs store at {store_path} (create one with: deskfs init {store_path})")
    if not os.path.isfile(db_path(store_path)):
        raise DeskfsError(f"{store_path} is not a deskfs store (no {DB_NAME})")


def take_daemon_lock(store_path: str) -> int | None:
    """The exclusive lock one daemon (or fsck) holds on a store; None if someone else holds it."""
    os.makedirs(os.path.dirname(lock_path(store_path)), exist_ok=True)
    fd = os.open(lock_path(store_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_pid(store_path: str) -> int | None:
    """The pid of the process holding the store (as it wrote it), or None if nobody holds it."""
    fd = take_daemon_lock(store_path)
    if fd is not None:
        os.close(fd)
        return None
    try:
        with open(lock_path(store_path)) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None
