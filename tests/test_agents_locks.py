"""Agents and locks on a real deskfs mount: who a request comes from, leases, kernel locks, enforcement.

Every actor is its own process (an agent is a process with DESKFS_AGENT=NAME in its environment, or a
`deskfs run --agent NAME` session, or another Unix user), and every check goes through the tools people
use: getfattr/setfattr (attr), flock(1) (util-linux), the `deskfs` command, Python's os and fcntl.

Covered: counters under flock and under leases stay exact with 8 processes of 4 agents; the EBUSY matrix
for a file held by another agent (flock, fcntl whole-file, OFD; byte-range locks block nothing); folder
leases; lease expiry, survival across a remount, breaking (owner only); SQLite shared by two agents;
agent names bound to the first uid; bad lease values; `deskfs run` sessions.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from conftest import (DESKFS, RequestServer, agent_env, command_as, concurrent_sqlite_writers, deskfs,
                      one_line, read_line, run, shared_workspace, unix_users, user_deskfs, wait_until)

LOCK = "user.deskfs.lock"
WHOAMI = "user.deskfs.whoami"
USERS = ("deskfs-u1", "deskfs-u2")
LINE_RE = re.compile(
    r"^(?P<kind>flock|posix|ofd|lease) (?P<mode>exclusive|shared) (?P<principal>(?:agent|user):\S+)"
    r" pid=(?P<pid>\d+) since=(?P<since>\S+)(?: expires=(?P<expires>\S+))?$"
)


# -- helpers ------------------------------------------------------------------------------------


def daemon_log(ws) -> str:
    path = ws.store / "run" / "daemon.log"
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


def assert_clean_log(ws) -> None:
    log = daemon_log(ws)
    assert "Traceback" not in log and " ERROR " not in log, log


def iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def getfattr(path: Path | str, name: str, agent: str | None = None, user: str | None = None,
             cwd: Path | str = "/") -> subprocess.CompletedProcess:
    command = ["getfattr", "--only-values", "-n", name, str(path)]
    if user is not None:
        return run(command_as(user, *command, agent=agent), cwd=cwd, check=False)
    return run(command, cwd=cwd, check=False, env=agent_env(agent))


def setfattr(path: Path | str, value: str | None, agent: str | None = None, user: str | None = None,
             name: str = LOCK) -> subprocess.CompletedProcess:
    """setfattr -n NAME -v VALUE, or setfattr -x NAME when value is None."""
    command = ["setfattr", "-x", name, str(path)] if value is None else ["setfattr", "-n", name, "-v", value, str(path)]
    if user is not None:
        return run(command_as(user, *command, agent=agent), cwd="/", check=False)
    return run(command, cwd="/", check=False, env=agent_env(agent))


def whoami(mnt: Path, agent: str | None = None, user: str | None = None) -> str:
    """Who the mount sees: the root's whoami xattr, or for a non-member, which may not read the root
    (docs/security.md), the daemon's answer to `deskfs whoami`."""
    result = getfattr(mnt, WHOAMI, agent=agent, user=user)
    if result.returncode != 0 and "Permission denied" in result.stderr and user is not None:
        result = run(command_as(user, *user_deskfs(user), "whoami", "--mount", str(mnt), agent=agent), cwd="/")
        return result.stdout.strip()
    assert result.returncode == 0, result.stderr
    return result.stdout


def lock_lines(path: Path, agent: str | None = None) -> list[dict[str, str]] | None:
    """The parsed lines of user.deskfs.lock on `path`, or None when nobody holds a lock (ENODATA)."""
    result = getfattr(path, LOCK, agent=agent)
    if result.returncode != 0:
        assert "No such attribute" in result.stderr, result.stderr
        return None
    lines = result.stdout.strip("\n").split("\n")
    parsed = []
    for line in lines:
        match = LINE_RE.match(line)
        assert match, f"bad lock line {line!r} in {result.stdout!r}"
        iso(match["since"])
        if match["expires"]:
            iso(match["expires"])
        parsed.append(match.groupdict())
    return parsed


def holders(path: Path) -> set[tuple[str, str, str]]:
    return {(l["kind"], l["mode"], l["principal"]) for l in lock_lines(path) or []}




# An agent process: performs file operations on request (one JSON list per line on stdin) and answers
# each with one JSON line: "ok", the data read, or the errno's name. The process (and so its identity)
# lives as long as the test needs it; handles it opens stay open between requests.
AGENT_SERVER = textwrap.dedent(
    r"""
    import errno, fcntl, json, os, sys
    fds = {}
    W = os.O_WRONLY

    def once(path, flags, then=None):
        fd = os.open(path, flags, 0o644)
        try:
            return then(fd) if then else None
        finally:
            os.close(fd)

    def do(op, *a):
        if op == "open": fds[a[0]] = os.open(a[1], getattr(os, a[2]) | (os.O_CREAT if len(a) > 3 else 0), 0o644); return
        if op == "close": os.close(fds.pop(a[0])); return
        if op == "pwrite": os.pwrite(fds[a[0]], a[1].encode(), a[2]); return
        if op == "flock": fcntl.flock(fds[a[0]], getattr(fcntl, a[1])); return
        if op == "write": return once(a[0], W, lambda fd: os.write(fd, a[1].encode()) and None)
        if op == "open_w": return once(a[0], W)
        if op == "open_trunc": return once(a[0], W | os.O_TRUNC)
        if op == "create": return once(a[0], W | os.O_CREAT | os.O_EXCL)
        if op == "truncate": return os.truncate(a[0], a[1])
        if op == "unlink": return os.unlink(a[0])
        if op == "rename": return os.rename(a[0], a[1])
        if op == "chmod": return os.chmod(a[0], a[1])
        if op == "utime": return os.utime(a[0], (1_000_000_000, 1_000_000_000))
        if op == "setxattr": return os.setxattr(a[0], a[1], a[2].encode())
        if op == "mkdir": return os.mkdir(a[0])
        if op == "rmdir": return os.rmdir(a[0])
        if op == "read": return open(a[0]).read()
        if op == "listdir": return sorted(os.listdir(a[0]))
        if op == "getxattr": return os.getxattr(a[0], a[1]).decode()
        raise SystemExit(f"unknown op {op}")

    for line in sys.stdin:
        try:
            result = do(*json.loads(line))
            result = "ok" if result is None else result
        except OSError as exc:
            result = errno.errorcode.get(exc.errno, str(exc.errno))
        print(json.dumps(result), flush=True)
    """
)


class Agent(RequestServer):
    def __init__(self, name: str | None, cwd: Path) -> None:
        self.name = name
        super().__init__([sys.executable, "-c", AGENT_SERVER], cwd, agent_env(name))

    def many(self, ops: dict[str, tuple]) -> dict[str, object]:
        return {label: self(*op) for label, op in ops.items()}


HOLD = textwrap.dedent(
    """
    import fcntl, os, struct, sys
    path, kind = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    elif kind == "flock_sh":
        fcntl.flock(fd, fcntl.LOCK_SH)
    elif kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX)  # start 0, length 0: the whole file
    elif kind == "posix_range":
        fcntl.lockf(fd, fcntl.LOCK_EX, 4, 2)  # bytes 2..5 only
    elif kind == "ofd":
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


class Holder:
    """A process that takes a lock, prints `ready`, and releases it (by exiting) when told."""

    def __init__(self, command: list[str], agent: str | None, cwd: Path) -> None:
        self.proc = subprocess.Popen(command, cwd=cwd, env=agent_env(agent), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        line = read_line(self.proc.stdout, 30, bytearray())
        assert line.strip() == "ready", line

    @classmethod
    def python(cls, path: Path, kind: str, agent: str | None, cwd: Path) -> "Holder":
        return cls([sys.executable, "-c", HOLD, str(path), kind], agent, cwd)

    @classmethod
    def flock1(cls, path: Path, agent: str | None, cwd: Path, shared: bool = False, after: str = "") -> "Holder":
        return cls(["flock", *(["-s"] if shared else []), str(path), "-c", f"echo ready; read x; {after}"], agent, cwd)

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read()


@pytest.fixture
def agents(tmp_path):
    """Factory for agent processes, all ended at the end of the test."""
    made: list[Agent] = []

    def make(name: str | None) -> Agent:
        agent = Agent(name, tmp_path)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def holders_cleanup():
    made: list[Holder] = []
    yield made
    for holder in made:
        if holder.proc.poll() is None:
            holder.proc.kill()
            holder.proc.wait()


@pytest.fixture(scope="session")
def users() -> dict[str, pwd.struct_passwd]:
    """Unix users deskfs-u1 and deskfs-u2 (created once, kept between runs)."""
    return unix_users(*USERS)


@pytest.fixture
def shared_ws(make_workspace, tmp_path, users):
    """A workspace mounted with --allow-other, reachable and writable by the test users."""
    ws = shared_workspace(make_workspace, tmp_path, invite=USERS)
    os.chmod(ws.mnt, 0o777)
    return ws


# -- 1. a counter under flock -------------------------------------------------------------------


FLOCK_COUNTER = textwrap.dedent(
    """
    import fcntl, os, sys
    path, n = sys.argv[1], int(sys.argv[2])
    sys.stdin.readline()  # start together
    for _ in range(n):
        f = open(path, "r+")
        fcntl.flock(f, fcntl.LOCK_EX)
        value = int(f.read() or "0")
        f.seek(0)
        f.write(str(value + 1))
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
    """
)


def start_together(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


def test_flock_counter_8_processes_4_agents(ws):
    counter = ws.mnt / "counter"
    counter.write_text("0")
    procs = [
        subprocess.Popen([sys.executable, "-c", FLOCK_COUNTER, str(counter), "200"], cwd=ws.mnt,
                         env=agent_env(f"a{i // 2 + 1}"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    start_together(procs)
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err + daemon_log(ws)
    assert counter.read_text() == "1600"
    assert lock_lines(counter) is None  # every flock went with its process
    assert_clean_log(ws)


# -- 2. a counter under leases ------------------------------------------------------------------

# Each increment is two `deskfs` commands (a Python start each): the longest test of the suite.
LEASE_INCREMENTS = 200

LEASE_COUNTER = textwrap.dedent(
    """
    read go
    i=0
    while [ $i -lt "$N" ]; do
        "$DESKFS" lock --wait "$F" >/dev/null || { echo "lock failed" >&2; exit 3; }
        v=$(cat "$F") || exit 4
        echo $((v + 1)) > "$F" || exit 5
        "$DESKFS" unlock "$F" || { echo "unlock failed" >&2; exit 6; }
        i=$((i + 1))
    done
    """
)


def test_lease_counter_8_processes_4_agents(ws):
    counter = ws.mnt / "counter"
    counter.write_text("0\n")
    procs = []
    for i in range(8):
        env = {**agent_env(f"a{i // 2 + 1}"), "DESKFS": DESKFS, "F": str(counter), "N": str(LEASE_INCREMENTS)}
        procs.append(subprocess.Popen(["sh", "-c", LEASE_COUNTER], cwd=ws.mnt, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start_together(procs)
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err + daemon_log(ws)
    assert counter.read_text() == f"{8 * LEASE_INCREMENTS}\n"
    assert lock_lines(counter) is None
    assert_clean_log(ws)


# -- 3. the EBUSY matrix ------------------------------------------------------------------------


def test_ebusy_matrix_under_flock1(ws, agents, holders_cleanup, tmp_path):
    f = ws.mnt / "held.txt"
    f.write_text("original\n")
    other = ws.mnt / "other.txt"
    other.write_text("other\n")
    b = agents("b")
    assert b("open", "old", f, "O_RDWR") == "ok"  # opened before the lock is taken

    order_log = tmp_path / "order.log"
    holder = Holder.flock1(f, "a", ws.mnt, after=f"echo released >> {order_log}")
    holders_cleanup.append(holder)
    assert holders(f) == {("flock", "exclusive", "agent:a")}
    # flock(1) of another agent cannot take it meanwhile, and a blocking one waits for the release.
    assert run(["flock", "-n", str(f), "true"], cwd=tmp_path, check=False, env=agent_env("b")).returncode == 1
    waiter = subprocess.Popen(["flock", str(f), "-c", f"echo acquired >> {order_log}"], cwd=tmp_path,
                              env=agent_env("c"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    got = b.many({
        "write_old_handle": ("pwrite", "old", "X", 0),
        "open_for_write": ("open_w", f),
        "write_new_handle": ("write", f, "Y"),
        "open_trunc": ("open_trunc", f),
        "truncate": ("truncate", f, 0),
        "unlink": ("unlink", f),
        "rename_it": ("rename", f, ws.mnt / "moved.txt"),
        "rename_onto": ("rename", other, f),
        "chmod": ("chmod", f, 0o600),
        "utime": ("utime", f),
        "setxattr": ("setxattr", f, "user.note", "hi"),
        "read": ("read", f),
        "create_sibling": ("create", ws.mnt / "sibling.txt"),
    })
    assert got == {
        "write_old_handle": "EBUSY",
        "open_for_write": "ok",
        "write_new_handle": "EBUSY",
        "open_trunc": "EBUSY",
        "truncate": "EBUSY",
        "unlink": "EBUSY",
        "rename_it": "EBUSY",
        "rename_onto": "EBUSY",
        "chmod": "EBUSY",
        "utime": "EBUSY",
        "setxattr": "EBUSY",
        "read": "original\n",
        "create_sibling": "ok",
    }, daemon_log(ws)
    assert f.read_text() == "original\n"
    assert other.read_text() == "other\n"

    # The holder's principal is not blocked from its other processes.
    a2 = agents("a")
    assert a2("write", f, "A") == "ok"
    assert a2("chmod", f, 0o640) == "ok"
    assert f.read_text() == "Ariginal\n"

    holder.release()
    assert waiter.wait(timeout=30) == 0
    assert order_log.read_text() == "released\nacquired\n"
    assert lock_lines(f) is None

    after = b.many({
        "write_old_handle": ("pwrite", "old", "B", 1),
        "write_new_handle": ("write", f, "b"),
        "chmod": ("chmod", f, 0o600),
        "utime": ("utime", f),
        "setxattr": ("setxattr", f, "user.note", "hi"),
        "truncate": ("truncate", f, 4),
        "rename_it": ("rename", f, ws.mnt / "moved.txt"),
        "rename_back": ("rename", ws.mnt / "moved.txt", f),
        "close": ("close", "old"),
    })
    assert set(after.values()) == {"ok"}, after
    assert f.read_text() == "bBig"
    assert b("rename", other, f) == "ok"
    assert b("unlink", f) == "ok"
    assert_clean_log(ws)


@pytest.mark.parametrize("kind", ["posix", "ofd", "flock"])
def test_whole_file_kernel_locks_block_other_agents(ws, agents, holders_cleanup, kind):
    f = ws.mnt / "held.bin"
    f.write_bytes(b"0123456789")
    holder = Holder.python(f, kind, "a", ws.mnt)
    holders_cleanup.append(holder)
    lines = lock_lines(f)
    assert lines is not None and len(lines) == 1, lines
    assert (lines[0]["kind"], lines[0]["mode"], lines[0]["principal"]) == (kind, "exclusive", "agent:a")
    if kind != "ofd":
        assert int(lines[0]["pid"]) == holder.proc.pid

    b, a2 = agents("b"), agents("a")
    assert b.many({"write": ("write", f, "x"), "truncate": ("truncate", f, 1), "unlink": ("unlink", f),
                   "read": ("read", f)}) == {
        "write": "EBUSY", "truncate": "EBUSY", "unlink": "EBUSY", "read": "0123456789"}, daemon_log(ws)
    assert a2("write", f, "A") == "ok"
    holder.release()
    assert lock_lines(f) is None
    assert b("write", f, "B") == "ok"
    assert f.read_bytes() == b"B123456789"


def test_byte_range_lock_blocks_nothing(ws, agents, holders_cleanup):
    f = ws.mnt / "ranged.bin"
    f.write_bytes(b"0123456789")
    holder = Holder.python(f, "posix_range", "a", ws.mnt)
    holders_cleanup.append(holder)
    assert holders(f) == {("posix", "exclusive", "agent:a")}
    b = agents("b")
    assert b.many({"write": ("write", f, "xx"), "chmod": ("chmod", f, 0o600), "utime": ("utime", f),
                   "truncate": ("truncate", f, 8)}) == {
        "write": "ok", "chmod": "ok", "utime": "ok", "truncate": "ok"}, daemon_log(ws)
    assert f.read_bytes() == b"xx234567"
    holder.release()


# -- 4. folder leases ---------------------------------------------------------------------------


def test_exclusive_folder_lease_blocks_other_agents_inside(ws, agents):
    d = ws.mnt / "D"
    (d / "sub").mkdir(parents=True)
    for folder in (d, d / "sub"):
        (folder / "x").write_text("x\n")
        (folder / "y").write_text("y\n")
    deskfs("lock", str(d), env=agent_env("a"))
    assert holders(d) == {("lease", "exclusive", "agent:a")}

    b, a = agents("b"), agents("a")

    def changes(agent: Agent, folder: Path) -> dict[str, object]:
        return agent.many({
            "write": ("write", folder / "y", "Y"),
            "create": ("create", folder / "new"),
            "mkdir": ("mkdir", folder / "newdir"),
            "unlink": ("unlink", folder / "x"),
            "rename": ("rename", folder / "y", folder / "y2"),
        })

    busy = {"write": "EBUSY", "create": "EBUSY", "mkdir": "EBUSY", "unlink": "EBUSY", "rename": "EBUSY"}
    assert changes(b, d) == busy, daemon_log(ws)
    assert changes(b, d / "sub") == busy, daemon_log(ws)
    assert b("rename", d / "sub" / "y", ws.mnt / "escaped") == "EBUSY"
    assert b("read", d / "sub" / "y") == "y\n"
    assert b("listdir", d) == ["sub", "x", "y"]

    allowed = {"write": "ok", "create": "ok", "mkdir": "ok", "unlink": "ok", "rename": "ok"}
    assert changes(a, d) == allowed, daemon_log(ws)
    assert changes(a, d / "sub") == allowed, daemon_log(ws)
    assert sorted(os.listdir(d)) == ["new", "newdir", "sub", "y2"]
    assert (d / "y2").read_text() == "Y\n"

    deskfs("unlock", str(d), env=agent_env("a"))
    assert lock_lines(d) is None
    assert b("create", d / "sub" / "by-b") == "ok"
    assert b("mkdir", d / "by-b-dir") == "ok"
    assert_clean_log(ws)


# -- 5. expiry, remount, breaking ---------------------------------------------------------------


def test_lease_expires_after_ttl(ws, agents):
    f = ws.mnt / "short.txt"
    f.write_text("s\n")
    assert setfattr(f, "exclusive ttl=1", agent="a").returncode == 0
    lines = lock_lines(f)
    assert lines and len(lines) == 1 and lines[0]["kind"] == "lease" and lines[0]["principal"] == "agent:a"
    lifetime = (iso(lines[0]["expires"]) - iso(lines[0]["since"])).total_seconds()
    assert 0.5 <= lifetime <= 2, lines
    b = agents("b")
    # (the lease may already be gone if this machine is slow: then the write simply succeeds)
    first = b("write", f, "B")
    assert first in ("EBUSY", "ok")
    wait_until(lambda: lock_lines(f) is None, 10, "the ttl=1 lease to expire")
    assert b("write", f, "B") == "ok"


def test_lease_survives_remount_and_break_is_owner_only(shared_ws, agents, users):
    ws = shared_ws
    f = ws.mnt / "kept.txt"
    f.write_text("kept\n")
    os.chmod(f, 0o666)  # so the users' setxattr reaches the daemon (the kernel checks write permission)
    assert setfattr(f, "exclusive ttl=600", agent="a").returncode == 0
    before = lock_lines(f)

    ws.unmount()
    ws.mount("--allow-other")
    after = lock_lines(f)
    assert after is not None and len(after) == 1, after
    assert (after[0]["kind"], after[0]["mode"], after[0]["principal"]) == ("lease", "exclusive", "agent:a")
    assert after[0]["since"] == before[0]["since"] and after[0]["expires"] == before[0]["expires"]
    b = agents("b")
    assert b("write", f, "B") == "EBUSY"

    # A non-owner Unix user may not break it, through the command or the attribute.
    refused = run(command_as("deskfs-u1", *user_deskfs("deskfs-u1"), "unlock", "--force", str(f)), cwd="/",
                  check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    one_line(refused)
    attr = setfattr(f, "break", user="deskfs-u1")
    assert attr.returncode != 0 and "Operation not permitted" in attr.stderr, attr.stderr
    assert holders(f) == {("lease", "exclusive", "agent:a")}

    # The workspace owner (root ran deskfs init) may.
    deskfs("unlock", "--force", str(f))
    assert lock_lines(f) is None
    assert b("write", f, "B") == "ok"
    assert_clean_log(ws)


# -- 6. SQLite shared by two agents -------------------------------------------------------------


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_shared_by_two_agents(ws, journal_mode):
    db = ws.mnt / "shared.db"
    rows = 150
    summary = concurrent_sqlite_writers(db, journal_mode, rows, [agent_env(f"s{w // 2 + 1}") for w in range(4)])
    assert summary == [journal_mode, "ok", str(4 * rows), str(4 * rows), ",".join([str(rows)] * 4)]
    assert run(["sqlite3", str(db), "PRAGMA integrity_check;"], cwd=ws.mnt).stdout.strip() == "ok"
    assert lock_lines(db) is None
    assert_clean_log(ws)


# -- 7. identity: names, binding to the first uid -----------------------------------------------


def test_identity_and_agent_name_bound_to_first_uid(shared_ws, users):
    ws = shared_ws
    mnt = ws.mnt
    assert whoami(mnt) == "user:root"
    assert deskfs("whoami", "--mount", str(mnt)).stdout == "user:root\n"
    assert deskfs("whoami", cwd=mnt, env=agent_env("w1")).stdout == "agent:w1\n"
    assert whoami(mnt, agent="Ok.name_-1") == "agent:Ok.name_-1"
    assert whoami(mnt, agent="n" * 64) == "agent:" + "n" * 64
    for bad in ["", "n" * 65, "bad name", "a/b", "é", "x:y"]:
        assert whoami(mnt, agent=bad) == "user:root", bad

    # root uses "bound1" first: it is root's from now on.
    assert whoami(mnt, agent="bound1") == "agent:bound1"
    assert whoami(mnt, user="deskfs-u1") == "user:deskfs-u1"
    assert whoami(mnt, agent="bound1", user="deskfs-u1") == "user:deskfs-u1"
    out = run(command_as("deskfs-u1", *user_deskfs("deskfs-u1"), "whoami", "--mount", str(mnt), agent="bound1"),
              cwd="/")
    assert out.stdout == "user:deskfs-u1\n"
    assert whoami(mnt, agent="bound1") == "agent:bound1"

    # What u1 does under the claimed name is done as u1.
    f = mnt / "u1-file"
    f.write_text("u1\n")
    os.chmod(f, 0o666)
    assert setfattr(f, "exclusive", agent="bound1", user="deskfs-u1").returncode == 0
    assert holders(f) == {("lease", "exclusive", "user:deskfs-u1")}
    assert setfattr(f, None, user="deskfs-u1").returncode == 0
    assert lock_lines(f) is None

    # u1 uses "u1only" first: it is u1's; u2 and root claiming it act as themselves.
    assert whoami(mnt, agent="u1only", user="deskfs-u1") == "agent:u1only"
    assert whoami(mnt, agent="u1only", user="deskfs-u2") == "user:deskfs-u2"
    assert whoami(mnt, agent="u1only") == "user:root"
    assert whoami(mnt, agent="u1only", user="deskfs-u1") == "agent:u1only"

    # The binding is kept in the store.
    ws.unmount()
    ws.mount("--allow-other")
    assert whoami(mnt, agent="bound1", user="deskfs-u1") == "user:deskfs-u1"
    assert whoami(mnt, agent="u1only") == "user:root"
    assert_clean_log(ws)


# -- 8. the tools, and bad input ----------------------------------------------------------------


def test_lease_attribute_values_and_errors(ws, agents, tmp_path):
    f = ws.mnt / "f.txt"
    f.write_text("f\n")
    assert lock_lines(f) is None
    missing = getfattr(f, LOCK)
    assert missing.returncode != 0 and "No such attribute" in missing.stderr

    for bad in ["bogus", "", "exclusive ttl=0", "exclusive ttl=-1", "exclusive ttl=abc", "shared ttl=86401",
                "exclusive ttl=", "exclusive sometimes", "exclusive ttl=10 ttl", "EXCLUSIVE"]:
        result = setfattr(f, bad, agent="a")
        assert result.returncode != 0 and "Invalid argument" in result.stderr, (bad, result.stderr)
    assert lock_lines(f) is None

    # Bounds of the TTL, renewal, and "new".
    assert setfattr(f, "exclusive ttl=86400", agent="a").returncode == 0
    [line] = lock_lines(f)
    assert (line["kind"], line["mode"], line["principal"]) == ("lease", "exclusive", "agent:a")
    assert 86399 <= (iso(line["expires"]) - iso(line["since"])).total_seconds() <= 86401
    assert setfattr(f, "exclusive ttl=60", agent="a").returncode == 0  # renewal by the holder
    [line] = lock_lines(f)
    assert 59 <= (iso(line["expires"]) - datetime.now(iso(line["expires"]).tzinfo)).total_seconds() <= 61
    again = setfattr(f, "exclusive ttl=60 new", agent="a")
    assert again.returncode != 0 and "Device or resource busy" in again.stderr, again.stderr
    taken = setfattr(f, "exclusive", agent="b")
    assert taken.returncode != 0 and "Device or resource busy" in taken.stderr, taken.stderr
    assert holders(f) == {("lease", "exclusive", "agent:a")}

    # Someone else's lease cannot be removed; the command says whose it is.
    removed = setfattr(f, None, agent="b")
    assert removed.returncode != 0 and "Operation not permitted" in removed.stderr, removed.stderr
    refused = deskfs("unlock", str(f), check=False, env=agent_env("b"))
    assert refused.returncode == 1
    assert "agent:a" in one_line(refused)
    busy = deskfs("lock", str(f), check=False, env=agent_env("b"))
    assert busy.returncode == 1
    assert "agent:a" in one_line(busy)
    waited = deskfs("lock", "--wait", "1", str(f), check=False, env=agent_env("b"))
    assert waited.returncode != 0
    one_line(waited)
    # (Breaking by a non-owner Unix user: see test_lease_survives_remount_and_break_is_owner_only.)
    assert setfattr(f, None, agent="a").returncode == 0
    gone = setfattr(f, None, agent="a")
    assert gone.returncode != 0 and "No such attribute" in gone.stderr, gone.stderr
    assert lock_lines(f) is None

    # Shared leases coexist; an exclusive one is then refused.
    assert setfattr(f, "shared", agent="a").returncode == 0
    assert setfattr(f, "shared ttl=30", agent="b").returncode == 0
    assert holders(f) == {("lease", "shared", "agent:a"), ("lease", "shared", "agent:b")}
    assert setfattr(f, "exclusive", agent="c").returncode != 0
    c = agents("c")
    assert c.many({"write": ("write", f, "c"), "chmod": ("chmod", f, 0o600), "read": ("read", f)}) == {
        "write": "EBUSY", "chmod": "EBUSY", "read": "f\n"}
    assert setfattr(f, "break").returncode == 0  # root: the owner
    assert lock_lines(f) is None

    # The command: lock (new unless --renew), locks --json, unlock.
    deskfs("lock", "--ttl", "120", str(f), env=agent_env("a"))
    again = deskfs("lock", str(f), check=False, env=agent_env("a"))
    assert again.returncode == 1
    one_line(again)
    deskfs("lock", "--renew", "--ttl", "200", str(f), env=agent_env("a"))
    listed = json.loads(deskfs("locks", str(f), "--json", cwd=ws.mnt).stdout)
    assert isinstance(listed, list) and len(listed) == 1, listed
    [entry] = listed
    assert set(entry) == {"path", "kind", "mode", "principal", "pid", "since", "expires"}
    assert entry["path"] in (str(f), "/f.txt", "f.txt"), entry
    assert (entry["kind"], entry["mode"], entry["principal"]) == ("lease", "exclusive", "agent:a")
    assert isinstance(entry["pid"], int)
    assert 190 <= (iso(entry["expires"]) - datetime.now(iso(entry["expires"]).tzinfo)).total_seconds() <= 201
    everything = json.loads(deskfs("locks", "--json", cwd=ws.mnt).stdout)
    assert [e["principal"] for e in everything] == ["agent:a"]
    deskfs("unlock", str(f), env=agent_env("a"))
    assert lock_lines(f) is None
    assert json.loads(deskfs("locks", str(f), "--json", cwd=ws.mnt).stdout) == []

    # Outside any deskfs mount: a usage error, one line.
    outside = tmp_path / "outside.txt"
    outside.write_text("o\n")
    for command in (["lock", str(outside)], ["unlock", str(outside)]):
        result = deskfs(*command, check=False, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        one_line(result)
    assert_clean_log(ws)


def test_kernel_locks_with_flock1_are_shown(ws, holders_cleanup, tmp_path):
    f = ws.mnt / "k.txt"
    f.write_text("k\n")
    one = Holder.flock1(f, "k1", tmp_path, shared=True)
    holders_cleanup.append(one)
    two = Holder.flock1(f, "k2", tmp_path, shared=True)
    holders_cleanup.append(two)
    assert holders(f) == {("flock", "shared", "agent:k1"), ("flock", "shared", "agent:k2")}
    assert run(["flock", "-n", "-x", str(f), "true"], cwd=tmp_path, check=False).returncode == 1
    assert run(["flock", "-n", "-s", str(f), "true"], cwd=tmp_path, check=False).returncode == 0
    listed = json.loads(deskfs("locks", str(f), "--json", cwd=ws.mnt).stdout)
    assert sorted((e["kind"], e["mode"], e["principal"]) for e in listed) == [
        ("flock", "shared", "agent:k1"), ("flock", "shared", "agent:k2")]
    pids = {e["pid"] for e in listed}
    one.release()
    assert holders(f) == {("flock", "shared", "agent:k2")}
    two.release()
    assert lock_lines(f) is None
    # A user (no agent name) holding one shows as its user.
    three = Holder.flock1(f, None, tmp_path)
    holders_cleanup.append(three)
    assert holders(f) == {("flock", "exclusive", "user:root")}
    three.release()
    assert lock_lines(f) is None
    assert len(pids) == 2


# -- 9. deskfs run sessions ---------------------------------------------------------------------


def test_run_session_identity_and_lease_cleanup(ws):
    mnt = ws.mnt
    script = (f"getfattr --only-values -n {WHOAMI} {mnt}; echo; "
              f"sh -c 'getfattr --only-values -n {WHOAMI} {mnt}; echo'")
    out = deskfs("run", "--agent", "sess1", "--", "sh", "-c", script, cwd=mnt).stdout
    assert out == "agent:sess1\nagent:sess1\n"
    # The session's name wins over DESKFS_AGENT in the environment.
    out = deskfs("run", "--agent", "sess2", "--", "sh", "-c", script, cwd=mnt, env=agent_env("other")).stdout
    assert out == "agent:sess2\nagent:sess2\n"
    # Outside the session: the caller again.
    assert whoami(mnt) == "user:root"

    f = mnt / "s.txt"
    f.write_text("s\n")
    inside = (f"setfattr -n {LOCK} -v exclusive {f} && "
              f"sh -c 'getfattr --only-values -n {LOCK} {f}'")
    out = deskfs("run", "--agent", "sess1", "--", "sh", "-c", inside, cwd=mnt).stdout
    match = LINE_RE.match(out.strip())
    assert match and (match["kind"], match["mode"], match["principal"]) == ("lease", "exclusive", "agent:sess1"), out
    wait_until(lambda: lock_lines(f) is None, 3, "the session's lease to go with the session")
    f.write_text("root can write\n")

    # The command's exit status is the session's.
    assert deskfs("run", "--agent", "sess1", "--", "sh", "-c", "exit 7", check=False, cwd=mnt).returncode == 7
    assert_clean_log(ws)
