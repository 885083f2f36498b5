"""Locks, one view of two kinds, and the answer to "may principal P change inode I now?".

Kernel locks (`flock`, `fcntl`, OFD) on the mount are enforced by the kernel among local processes; this
module only observes them in `/proc/locks` (filtered by the mount's device) and attributes each to its
holder's principal, except the daemon's own, which stand for leases (`lease_locks.py`) and are
left out. Leases are deskfs's own: taken through the `user.deskfs.lock` xattr, the CLI or MCP,
kept in SQLite (they survive a restart), ended by release, expiry, `break`, or the end of the
`deskfs run` session that took them.

Must never: block a read; treat a byte-range fcntl lock as whole-file (databases share files through
byte ranges); trust a lease past its expiry.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from deskfs.store.meta import Meta

EXCLUSIVE = "exclusive"
SHARED = "shared"
DEFAULT_TTL = 300
MAX_TTL = 24 * 3600
UNKNOWN = "unknown"  # a holder that could not be established: binds everyone, exempts no one

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    inode      INTEGER NOT NULL,
    principal  TEXT NOT NULL,
    mode       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    since_ns   INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    session    INTEGER,
    PRIMARY KEY (inode, principal)
);
"""


class LockError(Exception):
    """A lock request refused, with the errno the caller gets."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True)
class Holder:
    kind: str  # flock | posix | ofd | lease
    mode: str  # exclusive | shared
    principal: str
    pid: int
    since_ns: int
    expires_ns: int | None
    whole: bool  # covers the whole file (every kind but a byte-range fcntl lock)

    def describe(self) -> str:
        line = f"{self.kind} {self.mode} {self.principal} pid={self.pid} since={iso(self.since_ns)}"
        return line + (f" expires={iso(self.expires_ns)}" if self.expires_ns is not None else "")


def iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns // 1_000_000 % 1000:03d}Z"


@dataclass(frozen=True)
class LeaseRequest:
    mode: str
    ttl: int
    only_if_free: bool

    @staticmethod
    def parse(value: bytes) -> "LeaseRequest":
        """`exclusive|shared [ttl=SECONDS] [new]`; LockError(EINVAL) for anything else."""
        words = value.decode("utf-8", "replace").split()
        if not words or words[0] not in (EXCLUSIVE, SHARED):
            raise LockError(errno.EINVAL, "lock mode must be exclusive or shared")
        ttl, only_if_free = DEFAULT_TTL, False
        for word in words[1:]:
            if word == "new" and not only_if_free:
                only_if_free = True
            elif word.startswith("ttl=") and word[4:].isdigit() and 1 <= int(word[4:]) <= MAX_TTL:
                ttl = int(word[4:])
            else:
                raise LockError(errno.EINVAL, f"bad lock option {word!r} (ttl=1..{MAX_TTL}, new)")
        return LeaseRequest(words[0], ttl, only_if_free)


def conflicts(mode: str, holder: Holder) -> bool:
    return mode == EXCLUSIVE or holder.mode == EXCLUSIVE


def _normalized(lock_text: bytes) -> bytes:
    return b" ".join(lock_text.split())


def fdinfo_holds(pid: int, wanted: bytes) -> bool:
    """Whether process `pid` has an open file whose fdinfo lists the lock `wanted` (normalized)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return False
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                info = f.read()
        except OSError:
            continue
        if b"lock:" in info and any(_normalized(line.split(b":", 2)[-1]) == wanted
                                    for line in info.splitlines() if line.startswith(b"lock:")):
            return True
    return False


def processes_holding(wanted: bytes) -> list[int]:
    """Every process with an open file description that holds the lock `wanted` (normalized text after
    the ordinal, e.g. `FLOCK ADVISORY WRITE 1234 00:2d:5 0 EOF`), lowest pid first.

    flock and OFD locks belong to an open file description, not to a process: every process that has it
    open (by inheritance, or passed over a socket) holds the lock, and /proc/PID/fdinfo lists it there.
    Scans every process, so it runs once per new lock that needs it, never per check.
    """
    return [pid for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) if fdinfo_holds(pid, wanted)]


class KernelLocks:
    """The kernel's locks on one mount, read from /proc/locks through a kept-open descriptor."""

    def __init__(self, device: tuple[int, int], principal_of_pid: Callable[[int], str]) -> None:
        self._token = f" {device[0]:02x}:{device[1]:02x}:".encode()
        self._principal_of_pid = principal_of_pid
        # The daemon's own locks stand for leases (lease_locks.py): the leases are their holders, not it.
        self._own_pid = str(os.getpid()).encode()
        self._fd = os.open("/proc/locks", os.O_RDONLY | os.O_CLOEXEC)
        self._first_seen: dict[tuple, int] = {}
        self._attributed: dict[tuple, tuple[str, int]] = {}  # lock -> (principal, pid), fixed at first sight
        self._last_text = b""
        self._last: dict[int, list[Holder]] = {}

    def _read(self) -> bytes:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def held(self) -> dict[int, list[Holder]]:
        """Every lock held on the mount (not waited for), by inode."""
        text = self._read()
        if self._token not in text:
            self._first_seen.clear()
            self._attributed.clear()
            self._last_text, self._last = b"", {}
            return {}
        if text == self._last_text:
            return self._last
        now = time.time_ns()
        by_inode: dict[int, list[Holder]] = {}
        seen: dict[tuple, int] = {}
        for line in text.splitlines():
            if self._token not in line or b"->" in line:
                continue
            fields = line.split()
            if fields[4] == self._own_pid:
                continue
            kind, mode, pid = fields[1].decode(), fields[3], int(fields[4])
            inode = int(fields[5].rsplit(b":", 1)[1])
            whole = kind == "FLOCK" or (fields[6] == b"0" and fields[7] == b"EOF")
            key = (kind, pid, inode, fields[6], fields[7], mode)
            since = seen[key] = self._first_seen.get(key, now)
            attributed = self._attributed.get(key)
            if attributed is None:
                attributed = self._attributed[key] = self._attribute(kind, pid, line.split(b":", 1)[1])
            principal, holder_pid = attributed
            holder = Holder(
                {"FLOCK": "flock", "POSIX": "posix"}.get(kind, "ofd"),
                EXCLUSIVE if mode == b"WRITE" else SHARED,
                principal, holder_pid, since, None, whole,
            )
            by_inode.setdefault(inode, []).append(holder)
        self._first_seen = seen
        self._attributed = {key: who for key, who in self._attributed.items() if key in seen}
        self._last_text, self._last = text, by_inode
        return by_inode

    def _attribute(self, kind: str, pid: int, lock_text: bytes) -> tuple[str, int]:
        """(principal, pid) of whoever holds a lock, decided once, when the lock is first seen.

        A POSIX lock belongs to the process /proc/locks names, which holds it until it exits. A flock or
        OFD lock belongs to an open file description: /proc/locks names the process that took it (or -1),
        which may have exited while a child keeps the descriptor (`(flock -x 9; ...) 9<file`) and whose pid
        may be reused by anyone. So it is attributed to the processes that hold the description now, as
        /proc/PID/fdinfo shows; if they are of several principals, or none can be found, to UNKNOWN, which
        binds everyone.
        """
        if kind == "POSIX":
            return self._principal_of_pid(pid), pid
        wanted = _normalized(lock_text)
        holders = [pid] if pid > 0 and fdinfo_holds(pid, wanted) else processes_holding(wanted)
        principals = {self._principal_of_pid(p) for p in holders}
        if len(principals) != 1 or UNKNOWN in principals:
            return UNKNOWN, holders[0] if holders else -1
        return principals.pop(), holders[0]

    def close(self) -> None:
        os.close(self._fd)


class Leases:
    """deskfs's own locks, by inode, mirrored in the `leases` table."""

    def __init__(self, meta: Meta) -> None:
        conn = meta.conn
        conn.executescript(SCHEMA)
        self._conn = conn
        self._begin = meta.begin
        self.changed: Callable[[int], None] = lambda inode: None  # told after leases of an inode ended
        self.version = 0  # counts every change of by_inode (for caches of what it holds)
        self.by_inode: dict[int, dict[str, Holder]] = {}
        self._sessions: dict[tuple[int, str], int | None] = {}
        now = time.time_ns()
        for inode, principal, mode, pid, since, expires, session in conn.execute("SELECT * FROM leases"):
            if expires > now and session is None:  # a session cannot outlive the daemon that knew it
                self._remember(inode, Holder("lease", mode, principal, pid, since, expires, True), session)
        self._write(lambda: conn.execute("DELETE FROM leases WHERE expires_ns <= ? OR session IS NOT NULL", (now,)))

    def _write(self, change: Callable[[], object]) -> None:
        self._begin()
        change()

    def _remember(self, inode: int, holder: Holder, session: int | None) -> None:
        self.version += 1
        self.by_inode.setdefault(inode, {})[holder.principal] = holder
        self._sessions[(inode, holder.principal)] = session

    def held(self, inode: int) -> list[Holder]:
        now = time.time_ns()
        return [h for h in self.by_inode.get(inode, {}).values() if h.expires_ns > now]

    def check(self, inode: int, principal: str, request: LeaseRequest, others: list[Holder]) -> None:
        """LockError(EBUSY) if `principal` may not take the lease now; `others` are the kernel locks on it."""
        current = self.held(inode)
        if request.only_if_free and current:
            raise LockError(errno.EBUSY, "already locked")
        for holder in current + others:
            if holder.principal != principal and holder.whole and conflicts(request.mode, holder):
                raise LockError(errno.EBUSY, f"locked by {holder.principal}")

    def take(self, inode: int, principal: str, pid: int, request: LeaseRequest, session: int | None,
             others: list[Holder]) -> Holder:
        """Take or renew `principal`'s lease; `others` are the kernel locks on the inode."""
        mine = self.by_inode.get(inode, {}).get(principal)
        self.check(inode, principal, request, others)
        now = time.time_ns()
        since = mine.since_ns if mine is not None and mine.expires_ns > now else now
        holder = Holder("lease", request.mode, principal, pid, since, now + request.ttl * 1_000_000_000, True)
        self._remember(inode, holder, session)
        self._write(lambda: self._conn.execute(
            "INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
            (inode, principal, holder.mode, pid, holder.since_ns, holder.expires_ns, session)))
        return holder

    def release(self, inode: int, principal: str) -> None:
        current = self.held(inode)
        if not any(h.principal == principal for h in current):
            if current:
                raise LockError(errno.EPERM, f"locked by {current[0].principal}")
            raise LockError(errno.ENODATA, "not locked")
        self._forget(inode, [principal])

    def break_all(self, inode: int) -> None:
        if not self.held(inode):
            raise LockError(errno.ENODATA, "not locked")
        self._forget(inode, list(self.by_inode.get(inode, {})))

    def end_session(self, session: int) -> list[tuple[int, str]]:
        """Release every lease the session took; returns them as (inode, principal)."""
        ended = [key for key, owner in self._sessions.items() if owner == session]
        for inode, principal in ended:
            self._forget(inode, [principal])
        return ended

    def expire(self) -> list[tuple[int, Holder]]:
        now = time.time_ns()
        gone = [(i, h) for i, held in self.by_inode.items() for h in held.values() if h.expires_ns <= now]
        for inode, holder in gone:
            self._forget(inode, [holder.principal])
        return gone

    def drop_inode(self, inode: int) -> list[str]:
        """Forget the leases of a file that is gone; returns their holders."""
        holders = list(self.by_inode.get(inode, {}))
        if holders:
            self._forget(inode, holders)
        return holders

    def _forget(self, inode: int, principals: Iterable[str]) -> None:
        self.version += 1
        held = self.by_inode.get(inode, {})
        for principal in principals:
            held.pop(principal, None)
            self._sessions.pop((inode, principal), None)
            self._write(lambda p=principal: self._conn.execute(
                "DELETE FROM leases WHERE inode=? AND principal=?", (inode, p)))
        if not held:
            self.by_inode.pop(inode, None)
        self.changed(inode)


class KernelLockWatcher:
    """Kernel locks taken and released since the last look, for the journal.

    Sees what /proc/locks shows at each look, so a lock held for less than the interval between two
    looks may pass unseen; enforcement does not depend on this (it reads /proc/locks at each change).
    """

    def __init__(self, kernel: KernelLocks) -> None:
        self._kernel = kernel
        self._seen: dict[tuple[int, Holder], int] = {}  # (inode, holder) -> uid of the holder

    def changes(self) -> tuple[list[tuple[int, Holder, int]], list[tuple[int, Holder, int]]]:
        """([(inode, holder, uid) taken], [(inode, holder, uid) released])."""
        now = {(inode, h) for inode, held in self._kernel.held().items() for h in held}
        taken = [(inode, h, self._uid(h.pid)) for inode, h in now if (inode, h) not in self._seen]
        released = [(inode, h, uid) for (inode, h), uid in self._seen.items() if (inode, h) not in now]
        for inode, h, _ in released:
            del self._seen[(inode, h)]
        for inode, h, uid in taken:
            self._seen[(inode, h)] = uid
        return sorted(taken, key=lambda t: t[1].since_ns), released

    @staticmethod
    def _uid(pid: int) -> int:
        try:
            return os.stat(f"/proc/{pid}").st_uid
        except OSError:
            return -1


class LockTable:
    """Both kinds together: who holds what, and whether a change may go ahead.

    A lock protects a file (an inode) under every name it has, and the paths to it: while another
    principal holds it, the file cannot be changed through any of its names (hard links included), and
    no folder above it can be renamed or moved (which would move the file away from the path it was
    locked at, and let someone create another file there).
    """

    def __init__(self, kernel: KernelLocks, leases: Leases, parents_of: Callable[[int], list[int]], root: int,
                 may_lock: Callable[[str], bool]) -> None:
        self.kernel = kernel
        self.leases = leases
        self._parents_of = parents_of  # every folder that has a name of the inode (one for a folder)
        self._root = root
        self._may_lock = may_lock  # a lock of someone with no right to lock (a viewer) binds no one

    def holders(self, inode: int) -> list[Holder]:
        return self.kernel.held().get(inode, []) + self.leases.held(inode)

    def all_holders(self) -> dict[int, list[Holder]]:
        combined = {inode: list(held) for inode, held in self.kernel.held().items()}
        for inode in list(self.leases.by_inode):
            if held := self.leases.held(inode):
                combined.setdefault(inode, []).extend(held)
        return combined

    def _binding(self, held: list[Holder], principal: str) -> list[Holder]:
        """The whole-file locks in `held` that bind `principal`."""
        return [h for h in held if h.whole and h.principal != principal
                and (h.principal == UNKNOWN or self._may_lock(h.principal))]

    def _ancestors(self, inode: int) -> set[int]:
        """Every folder above `inode` on any of its paths to the root."""
        found: set[int] = set()
        frontier = [inode]
        while frontier:
            current = frontier.pop()
            if current == self._root:
                continue
            for parent in self._parents_of(current):
                if parent not in found:
                    found.add(parent)
                    frontier.append(parent)
        return found

    def blocker(self, targets: Iterable[int], principal: str) -> Holder | None:
        """The lock that forbids `principal` to change `targets` now, if any.

        A target is blocked by another principal's whole-file lock on it; it and everything below a
        folder is blocked by another principal's exclusive lock on that folder.
        """
        kernel = self.kernel.held()
        if not kernel and not self.leases.by_inode:
            return None
        for target in targets:
            for holder in self._binding(self._held_at(kernel, target), principal):
                return holder
            holder = self._exclusive_above(kernel, target, principal)
            if holder is not None:
                return holder
        return None

    def blocker_above(self, inode: int, principal: str) -> Holder | None:
        """Another principal's exclusive lock on a folder above `inode`, which forbids a lease on it."""
        kernel = self.kernel.held()
        if not kernel and not self.leases.by_inode:
            return None
        return self._exclusive_above(kernel, inode, principal)

    def _held_at(self, kernel: dict[int, list[Holder]], inode: int) -> list[Holder]:
        return kernel.get(inode, []) + self.leases.held(inode)

    def _exclusive_above(self, kernel: dict[int, list[Holder]], inode: int, principal: str) -> Holder | None:
        """Another principal's exclusive lock on a folder above `inode` (`kernel`: the kernel's locks now)."""
        for folder in self._ancestors(inode) & (set(kernel) | set(self.leases.by_inode)):
            for holder in self._binding(self._held_at(kernel, folder), principal):
                if holder.mode == EXCLUSIVE:
                    return holder
        return None

    def blocker_below(self, folder: int, principal: str) -> Holder | None:
        """The lock of another principal on something below `folder`, which forbids moving `folder`."""
        kernel = self.kernel.held()
        if not kernel and not self.leases.by_inode:
            return None
        for inode in set(kernel) | set(self.leases.by_inode):
            held = self._binding(self._held_at(kernel, inode), principal)
            if held and inode != folder and folder in self._ancestors(inode):
                return held[0]
        return None
