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
SESSION_TOKEN = re.compile(r"[0-9a-f]{32}\Z")
ENV_AGENT = b"DESKFS_AGENT="
ENV_SESSION = b"DESKFS_SESSION="  # `deskfs run` sessions' tokens, comma-separated (one per workspace)
MAX_ANCESTRY = 128
STAT_FDS_MAX = 1024  # kept-open /proc/PID/stat descriptors (one per process seen recently)

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, uid INTEGER NOT NULL, bound_ns INTEGER NOT NULL);
"""


class LookupFailed(Exception):
    """The user database could not be read (e.g. out of descriptors): who the caller is is unknown now."""


def bind_agent(conn: sqlite3.Connection, name: str, uid: int) -> None:
    """Bind agent `name` to Unix user `uid` (in the caller's transaction; the table exists)."""
    conn.execute("INSERT OR REPLACE INTO agents (name, uid, bound_ns) VALUES (?, ?, ?)", (name, uid, time.time_ns()))


def is_agent_name(name: str) -> bool:
    return AGENT_NAME.match(name) is not None


_user_names: dict[int, str] = {}


def user_principal(uid: int) -> str:
    """`user:NAME` for a uid, or `user:UID` for a uid the user database does not know.

    Names are looked up once per uid. A lookup that fails while the uid is listed in /etc/passwd (the
    process ran out of descriptors, NSS failed) raises LookupFailed: a failure must never turn somebody
    into a different principal.
    """
    known = _user_names.get(uid)
    if known is None:
        try:
            known = pwd.getpwuid(uid).pw_name
        except KeyError:
            if _listed_in_passwd_file(uid):
                raise LookupFailed(f"cannot look up Unix user {uid} now") from None
            return f"user:{uid}"
        _user_names[uid] = known
    return f"user:{known}"


def _listed_in_passwd_file(uid: int) -> bool:
    try:
        with open("/etc/passwd", "rb") as f:
            return any(line.split(b":")[2:3] == [str(uid).encode()] for line in f)
    except OSError:
        return True  # cannot tell: assume the lookup failed, not that the user does not exist


def _stat_fields(data: bytes) -> list[bytes]:
    return data.rsplit(b")", 1)[1].split()


def process_stat(pid: int) -> tuple[int, int] | None:
    """(start time, parent pid) of a process or thread, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = _stat_fields(data)
    return int(fields[19]), int(fields[1])


def thread_group(tid: int) -> int:
    """The process (thread group) a thread id belongs to; `tid` itself for a process, or if it is gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return tid


def process_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def process_environment(pid: int) -> dict[bytes, bytes]:
    """DESKFS_AGENT and DESKFS_SESSION of a process (as they were at its exec), where it has them."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:
        return {}
    found = {}
    for entry in environ.split(b"\0"):
        for prefix in (ENV_AGENT, ENV_SESSION):
            if entry.startswith(prefix):
                found[prefix] = entry[len(prefix):]
    return found


def ids_differ(pid: int) -> bool:
    """Whether a process runs with real and effective ids that differ (set-user-ID or set-group-ID): its
    environment was chosen by whoever started it, not by the user it runs as. True if it cannot be told."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith((b"Uid:", b"Gid:")):
            real, effective = line.split()[1:3]
            if real != effective:
                return True
    return False


class StatWatch:
    """Tells cheaply whether a pid is still the same program it was: same process (start time) and no exec
    since (exec lays out a new stack, so the addresses of the arguments and environment change).

    Keeps /proc/PID/stat open per pid: re-reading it costs one pread, about 3 us.
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def signature(self, pid: int) -> tuple[bytes, bytes, bytes] | None:
        fd = self._fds.get(pid)
        if fd is not None:
            try:
                return self._read(fd)
            except (OSError, IndexError):
                self._close(pid)  # the task is gone (ESRCH): the pid may be somebody else's by now
        try:
            fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        if len(self._fds) >= STAT_FDS_MAX:
            self._close(next(iter(self._fds)))
        self._fds[pid] = fd
        try:
            return self._read(fd)
        except (OSError, IndexError):
            self._close(pid)
            return None

    @staticmethod
    def _read(fd: int) -> tuple[bytes, bytes, bytes]:
        fields = _stat_fields(os.pread(fd, 4096, 0))
        return fields[19], fields[45], fields[48]  # start time, arg_start, env_end

    def _close(self, pid: int) -> None:
        os.close(self._fds.pop(pid))

    def forget(self, pid: int) -> None:
        if pid in self._fds:
            self._close(pid)


@dataclass(frozen=True)
class Session:
    """A `deskfs run --agent NAME` process tree, identified by its root process, and by its token in the
    environment of everything started inside it (so that orphaned descendants stay in it)."""

    id: int
    pid: int
    start: int
    agent: str
    uid: int
    token: str | None = None


class Identity:
    """Resolves processes to principals, with a cache keyed by pid and process start time."""

    def __init__(self, meta: Meta, on_denied: Callable[[int, int, str, str], None]) -> None:
        meta.conn.executescript(SCHEMA)
        self._meta = meta
        self._bindings: dict[str, int] = dict(meta.conn.execute("SELECT name, uid FROM agents"))
        self._on_denied = on_denied
        self._cache: dict[int, tuple[str, int, tuple]] = {}  # pid -> principal, uid, StatWatch signature
        self._watch = StatWatch()
        self.sessions: dict[int, Session] = {}  # by root pid
        self._tokens: dict[tuple[int, str], Session] = {}  # by (registering uid, token)
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

    def open_session(self, pid: int, uid: int, agent: str, token: str | None = None) -> Session:
        if not is_agent_name(agent):
            raise ValueError(f"invalid agent name {agent!r} (1-64 characters of A-Z a-z 0-9 . _ -)")
        if token is not None and not SESSION_TOKEN.match(token):
            raise ValueError("a session token is 32 lowercase hexadecimal digits")
        if token is not None and (uid, token) in self._tokens:
            raise ValueError("that session token is already in use")
        if not self.may_use_agent(agent, uid):
            self._on_denied(pid, uid, agent, "deskfs run")
            raise PermissionError(f"agent:{agent} belongs to another Unix user")
        found = process_stat(pid)
        if found is None:
            raise ProcessLookupError(pid)
        session = Session(self._next_session, pid, found[0], agent, uid, token)
        self._next_session += 1
        self.sessions[pid] = session
        if token is not None:
            self._tokens[(uid, token)] = session
        self._cache.clear()
        return session

    def close_session(self, session: Session) -> None:
        self.sessions.pop(session.pid, None)
        self._tokens.pop((session.uid, session.token), None)
        self._cache.clear()

    def session_of(self, pid: int, uid: int, environment: dict[bytes, bytes] | None = None) -> Session | None:
        """The session covering `pid`: itself or an ancestor, or by the token in its environment (read
        here unless given); registered by the same uid."""
        if not self.sessions:
            return None
        return self._session_by_ancestry(pid, uid) or self._session_by_token(
            uid, process_environment(pid) if environment is None else environment)

    def _session_by_ancestry(self, pid: int, uid: int) -> Session | None:
        pid = thread_group(pid)  # a thread's parent in /proc is its process's parent: start at the process
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

    def _session_by_token(self, uid: int, environment: dict[bytes, bytes]) -> Session | None:
        if not self._tokens:
            return None
        tokens = environment.get(ENV_SESSION, b"")
        for token in tokens.decode("ascii", "replace").split(","):
            session = self._tokens.get((uid, token))  # another uid's token names no session of this uid
            if session is not None:
                return session
        return None

    # -- resolution ---------------------------------------------------------------------------

    def principal(self, pid: int, uid: int) -> str:
        """The principal of `pid` acting with (fs)uid `uid`. Re-resolved whenever the process is not the
        program it was when last resolved (it exec-ed, or the pid is another process's now)."""
        signature = self._watch.signature(pid)
        hit = self._cache.get(pid)
        if hit is not None and hit[1] == uid and hit[2] == signature and signature is not None:
            return hit[0]
        principal = self._resolve(pid, uid)
        if signature is not None:
            self._cache[pid] = (principal, uid, signature)
            if len(self._cache) > STAT_FDS_MAX:
                self._cache.pop(next(iter(self._cache)))
        return principal

    def principal_of_pid(self, pid: int) -> str:
        """The principal of a process seen outside a request (a kernel lock holder)."""
        uid = process_uid(pid)
        return "unknown" if uid is None else self.principal(pid, uid)

    def _resolve(self, pid: int, uid: int) -> str:
        environment = process_environment(pid)
        raw_claim = environment.get(ENV_AGENT)
        if (self.sessions or raw_claim is not None) and ids_differ(pid):
            # A set-user-ID program: its environment (and its session's) is its invoker's word.
            return user_principal(uid)
        session = self.session_of(pid, uid, environment)
        if session is not None:
            return f"agent:{session.agent}"
        if raw_claim is None:
            return user_principal(uid)
        claim = raw_claim.decode("utf-8", "replace")
        if not is_agent_name(claim):
            log.warning("pid %d (uid %d): ignoring invalid DESKFS_AGENT %r", pid, uid, claim)
            return user_principal(uid)
        if not self.may_use_agent(claim, uid):
            self._on_denied(pid, uid, claim, "DESKFS_AGENT")
            return user_principal(uid)
        return f"agent:{claim}"

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
        self._watch.forget(pid)
