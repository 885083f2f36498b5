"""Which principal a process is: `agent:NAME` or `user:NAME`.

Owns resolving a pid (or thread id) to a principal, the sessions registered by `deskfs run`, and the
binding of each agent name to the Unix uid that first used it.

Resolution for a request from pid P with uid U:
  1. a `deskfs run --agent NAME` session whose process is P or an ancestor of P, registered by uid U;
  2. else `DESKFS_AGENT=NAME` in P's environment;
  3. else `user:<name of U>`.
A claim of an agent bound to another uid is not honoured (the caller is its own user) and is reported.

Must never: grant an identity because of something another Unix user could fake (environment and sessions
count only for the uid that owns the name); block on anything but reading /proc.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable

from deskfs.store.meta import Meta

log = logging.getLogger(__name__)

AGENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
ENV_PREFIX = b"DESKFS_AGENT="
# A pid can only be reused after its process died and the kernel cycled through every other pid; within
# this window we trust the cache without re-reading the process's start time.
REVALIDATE_SECONDS = 1.0
MAX_ANCESTRY = 128

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, uid INTEGER NOT NULL, bound_ns INTEGER NOT NULL);
"""


def bind_agent(conn: sqlite3.Connection, name: str, uid: int) -> None:
    """Bind agent `name` to Unix user `uid` (in the caller's transaction; the table exists)."""
    conn.execute("INSERT OR REPLACE INTO agents (name, uid, bound_ns) VALUES (?, ?, ?)", (name, uid, time.time_ns()))


def is_agent_name(name: str) -> bool:
    return AGENT_NAME.match(name) is not None


def user_principal(uid: int) -> str:
    try:
        return f"user:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"user:{uid}"


def process_stat(pid: int) -> tuple[int, int] | None:
    """(start time, parent pid) of a process or thread, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    return int(fields[19]), int(fields[1])


def process_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def claimed_agent(pid: int) -> str | None:
    """The DESKFS_AGENT a process has in its environment (as it was at exec), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(ENV_PREFIX):
            return entry[len(ENV_PREFIX):].decode("utf-8", "replace")
    return None


@dataclass(frozen=True)
class Session:
    """A `deskfs run --agent NAME` process tree, identified by its root process."""

    id: int
    pid: int
    start: int
    agent: str
    uid: int


class Identity:
    """Resolves processes to principals, with a cache keyed by pid and process start time."""

    def __init__(self, meta: Meta, on_denied: Callable[[int, int, str, str], None]) -> None:
        meta.conn.executescript(SCHEMA)
        self._meta = meta
        self._bindings: dict[str, int] = dict(meta.conn.execute("SELECT name, uid FROM agents"))
        self._on_denied = on_denied
        self._cache: dict[int, tuple[str, int, int, float]] = {}  # pid -> principal, uid, start, checked
        self.sessions: dict[int, Session] = {}  # by root pid
        self._next_session = 1

    # -- bindings -----------------------------------------------------------------------------

    def uid_of_agent(self, name: str) -> int | None:
        """The Unix uid agent `name` is bound to, if it was ever used."""
        return self._bindings.get(name)

    def may_use_agent(self, name: str, uid: int) -> bool:
        """Whether `uid` may act as agent `name`; binds the name to `uid` on first use."""
        owner = self._bindings.get(name)
        if owner is None:
            self._bindings[name] = uid
            self._meta.begin()
            bind_agent(self._meta.conn, name, uid)
            return True
        return owner == uid

    # -- sessions -----------------------------------------------------------------------------

    def open_session(self, pid: int, uid: int, agent: str) -> Session:
        if not is_agent_name(agent):
            raise ValueError(f"invalid agent name {agent!r} (1-64 characters of A-Z a-z 0-9 . _ -)")
        if not self.may_use_agent(agent, uid):
            self._on_denied(pid, uid, agent, "deskfs run")
            raise PermissionError(f"agent:{agent} belongs to another Unix user")
        found = process_stat(pid)
        if found is None:
            raise ProcessLookupError(pid)
        session = Session(self._next_session, pid, found[0], agent, uid)
        self._next_session += 1
        self.sessions[pid] = session
        self._cache.clear()
        return session

    def close_session(self, session: Session) -> None:
        self.sessions.pop(session.pid, None)
        self._cache.clear()

    def session_of(self, pid: int, uid: int) -> Session | None:
        """The session covering `pid` (itself or an ancestor), registered by the same uid."""
        if not self.sessions:
            return None
        for _ in range(MAX_ANCESTRY):
            found = process_stat(pid)
            if found is None:
                return None
            start, parent = found
            session = self.sessions.get(pid)
            if session is not None and session.start == start:
                return session if session.uid == uid else None
            if parent <= 1:
                return None
            pid = parent
        return None

    # -- resolution ---------------------------------------------------------------------------

    def principal(self, pid: int, uid: int) -> str:
        hit = self._cache.get(pid)
        now = time.monotonic()
        if hit is not None and hit[1] == uid and now - hit[3] < REVALIDATE_SECONDS:
            return hit[0]
        found = process_stat(pid)
        start = found[0] if found else -1
        if hit is not None and hit[1] == uid and hit[2] == start:
            self._cache[pid] = (hit[0], uid, start, now)
            return hit[0]
        principal = self._resolve(pid, uid)
        if found is not None:
            self._cache[pid] = (principal, uid, start, now)
        return principal

    def principal_of_pid(self, pid: int) -> str:
        """The principal of a process seen outside a request (a kernel lock holder)."""
        uid = process_uid(pid)
        return "unknown" if uid is None else self.principal(pid, uid)

    def _resolve(self, pid: int, uid: int) -> str:
        session = self.session_of(pid, uid)
        if session is not None:
            return f"agent:{session.agent}"
        claim = claimed_agent(pid)
        if claim is None:
            return user_principal(uid)
        if not is_agent_name(claim):
            log.warning("pid %d (uid %d): ignoring invalid DESKFS_AGENT %r", pid, uid, claim)
            return user_principal(uid)
        if not self.may_use_agent(claim, uid):
            self._on_denied(pid, uid, claim, "DESKFS_AGENT")
            return user_principal(uid)
        return f"agent:{claim}"

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
