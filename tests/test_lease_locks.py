"""Leases and kernel locks exclude each other both ways, on a real mount (issue 10, part 1).

For every lease the daemon holds a real flock and a POSIX fcntl lock over the whole file
(deskfs/lease_locks.py). So a kernel lock another agent asks for waits for a lease, or fails at once
with the usual errno; a lease is refused (or waits, with --wait) while a kernel lock is in the way; and
the daemon's own locks are shown, journaled and enforced as the lease holder's, never as the daemon's.

Every actor is a process of its own, an agent by DESKFS_AGENT=NAME in its environment, and uses the
tools people use: flock(1), setfattr/getfattr, `deskfs lock`, Python's fcntl. Nothing waits by sleeping:
the tests wait for what they can see (a line from a process, a waiter in /proc/locks, a lock gone).

Linux keeps flock and fcntl locks apart: they never conflict with each other, on ext4 as on any local
file system (test_flock_and_lockf_are_independent_on_linux shows it on the disk under the mount). So a
counter shared by flock(1) agents and a lockf agent cannot stay exact with or without deskfs; the
mixed counter runs as two counters that share one lease agent: three flock(1) agents and the lease
agent on one, a lockf agent and the lease agent on the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import (DESKFS, RequestServer, agent_env, deskfs, one_line, read_line, run, wait_until)

LOCK = "user.deskfs.lock"
EXPIRY_SLACK = 0.5  # a waiting kernel lock is granted within this long after its lease expired


# -- helpers ------------------------------------------------------------------------------------


def daemon_log(ws) -> str:
    path = ws.store / "run" / "daemon.log"
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


def setfattr(path: Path, value: str | None, agent: str | None) -> subprocess.CompletedProcess:
    """setfattr -n user.deskfs.lock -v VALUE (take or renew a lease), or -x (release) when value is None."""
    command = ["setfattr", "-x", LOCK, str(path)] if value is None else ["setfattr", "-n", LOCK, "-v", value, str(path)]
    return run(command, cwd="/", check=False, env=agent_env(agent))


def take(path: Path, agent: str | None, value: str = "exclusive") -> None:
    result = setfattr(path, value, agent)
    assert result.returncode == 0, result.stderr


def lock_lines(path: Path) -> list[str]:
    """The lines of getfattr user.deskfs.lock on `path` ([] when nobody holds a lock)."""
    result = run(["getfattr", "--only-values", "-n", LOCK, str(path)], cwd="/", check=False)
    if result.returncode != 0:
        assert "No such attribute" in result.stderr, result.stderr
        return []
    return result.stdout.strip("\n").split("\n")


def holders(path: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split()[:3]) for line in lock_lines(path)]


def expiry_ns(path: Path) -> int:
    """When the (one) lease on `path` expires, as getfattr reports it (milliseconds)."""
    [line] = lock_lines(path)
    expires = line.split("expires=")[1]
    return int(datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() * 1000) * 1_000_000


def device_token(ws) -> str:
    """The mount's device as /proc/locks names it (`00:2a:`)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(ws.mnt):
                major, minor = fields[2].split(":")
                return f"{int(major):02x}:{int(minor):02x}:"
    raise AssertionError(f"{ws.mnt} is not mounted")


def proc_locks(token: str, waiting: bool = False) -> list[tuple[str, str, int, int]]:
    """(kind, mode, pid, inode) of every lock in /proc/locks on the device `token` (held, or waited for)."""
    found = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if (fields[1] == "->") != waiting:
                continue
            if waiting:
                fields = fields[1:]
            if len(fields) > 5 and fields[5].startswith(token):
                found.append((fields[1], fields[3], int(fields[4]), int(fields[5].rsplit(":", 1)[1])))
    return found




def flock_n(path: Path, agent: str | None, *options: str) -> subprocess.CompletedProcess:
    return run(["flock", "-n", *options, str(path), "true"], cwd="/", check=False, env=agent_env(agent))


# A non-blocking kernel lock of the kind asked for; prints "ok" or the errno's name, and exits (so the
# lock, if it was granted, goes with the process).
PROBE = textwrap.dedent(
    """
    import errno, fcntl, os, struct, sys
    path, kind = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDONLY if kind.endswith("_rd") or kind.startswith("flock") else os.O_RDWR)
    try:
        if kind == "flock_ex":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif kind == "flock_sh":
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        elif kind == "lockf":  # lockf(F_TLOCK) over the whole file: F_SETLK, F_WRLCK, 0..EOF
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif kind == "posix_rd":
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        elif kind == "ofd_wr":
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
        elif kind == "ofd_rd":
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0, 0, 0))
        print("ok")
    except OSError as exc:
        print(errno.errorcode[exc.errno])
    """
)


def probe(path: Path, kind: str, agent: str | None) -> str:
    return run([sys.executable, "-c", PROBE, str(path), kind], cwd="/", env=agent_env(agent)).stdout.strip()


# Takes a blocking kernel lock, prints the time it got it (time.time_ns()), keeps it until told.
WAITER = textwrap.dedent(
    """
    import fcntl, os, struct, sys, time
    path, kind = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    elif kind == "flock_sh":
        fcntl.flock(fd, fcntl.LOCK_SH)
    elif kind == "lockf":  # F_SETLKW over the whole file
        fcntl.lockf(fd, fcntl.LOCK_EX)
    elif kind == "ofd":
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    print(time.time_ns(), flush=True)
    sys.stdin.readline()
    """
)


class Waiter:
    """A process of `agent` waiting for a blocking kernel lock on `path`."""

    def __init__(self, path: Path, kind: str, agent: str | None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WAITER, str(path), kind], cwd="/", env=agent_env(agent),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.buffer = bytearray()

    def acquired(self, timeout: float = 30) -> int:
        """When it got the lock (time.time_ns())."""
        return int(read_line(self.proc.stdout, timeout, self.buffer))

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def waiters():
    made: list[Waiter] = []

    def make(path: Path, kind: str, agent: str | None) -> Waiter:
        waiter = Waiter(path, kind, agent)
        made.append(waiter)
        return waiter

    yield make
    for waiter in made:
        waiter.kill()


def wait_for_waiters(token: str, ino: int, count: int) -> None:
    wait_until(lambda: len([w for w in proc_locks(token, waiting=True) if w[3] == ino]) >= count, 30,
               f"{count} kernel lock(s) waiting on inode {ino}")


# -- 1. the mixed counter -----------------------------------------------------------------------

INCREMENTS = 100

FLOCK_AGENT = textwrap.dedent(
    """
    read go
    i=0
    while [ $i -lt "$N" ]; do
        flock "$A" -c 'v=$(cat "$A") && echo $((v + 1)) > "$A"' || { echo "flock increment failed" >&2; exit 3; }
        i=$((i + 1))
    done
    """
)

LOCKF_AGENT = textwrap.dedent(
    """
    import fcntl, os, sys
    path, n = sys.argv[1], int(sys.argv[2])
    sys.stdin.readline()
    for _ in range(n):
        fd = os.open(path, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)  # F_SETLKW, 0..EOF: waits for the lease as for any lock
        value = int(os.pread(fd, 64, 0) or b"0")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{value + 1}\\n".encode(), 0)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
    """
)

LEASE_AGENT = textwrap.dedent(
    """
    read go
    i=0
    while [ $i -lt "$N" ]; do
        "$DESKFS" lock --wait "$A" >/dev/null || { echo "lock A failed" >&2; exit 3; }
        "$DESKFS" lock --wait "$B" >/dev/null || { echo "lock B failed" >&2; exit 4; }
        a=$(cat "$A") && echo $((a + 1)) > "$A" || exit 5
        b=$(cat "$B") && echo $((b + 1)) > "$B" || exit 6
        "$DESKFS" unlock "$A" || exit 7
        "$DESKFS" unlock "$B" || exit 8
        i=$((i + 1))
    done
    """
)


def test_mixed_counter_flock_lockf_and_lease_agents(ws):
    a, b = ws.mnt / "counter-flock", ws.mnt / "counter-lockf"
    a.write_text("0\n")
    b.write_text("0\n")
    common = {"A": str(a), "B": str(b), "N": str(INCREMENTS), "DESKFS": DESKFS}
    commands = [(["sh", "-c", FLOCK_AGENT], f"f{i}") for i in (1, 2, 3)]
    commands += [([sys.executable, "-c", LOCKF_AGENT, str(b), str(INCREMENTS)], "p1"),
                 (["sh", "-c", LEASE_AGENT], "l1")]
    procs = [subprocess.Popen(command, cwd=ws.mnt, env={**agent_env(agent), **common}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command, agent in commands]
    try:
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc, (_, agent) in zip(procs, commands):
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0 and not err.strip(), f"{agent}: {err}\n{daemon_log(ws)}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert a.read_text() == f"{4 * INCREMENTS}\n"  # 3 flock agents and the lease agent
    assert b.read_text() == f"{2 * INCREMENTS}\n"  # the lockf agent and the lease agent
    assert lock_lines(a) == [] and lock_lines(b) == []
    assert proc_locks(device_token(ws)) == []  # every lease's kernel lock went with it
    denied = deskfs("log", "--json", "--denied", "--limit", "0", cwd=ws.mnt).stdout.splitlines()
    busy = [r for r in map(json.loads, denied) if r["errno"] == 16 and r["op"] != "lock"]
    assert busy == [], busy  # no change was refused; only lease attempts were (and retried)


def test_flock_and_lockf_are_independent_on_linux(tmp_path):
    """Why the mixed counter is two counters: on the disk under the mount, without deskfs, a flock and
    a whole-file lockf of two processes are both granted at once."""
    f = tmp_path / "plain"
    f.write_text("0\n")
    holder = subprocess.Popen(["flock", str(f), "-c", "echo ready; read x"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0)
    try:
        assert read_line(holder.stdout, 30, bytearray()) == "ready"
        assert probe(f, "lockf", None) == "ok"
        assert probe(f, "flock_ex", None) == "EAGAIN"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# -- 2. kernel locks against a lease fail at once, or wait -------------------------------------


def test_nonblocking_kernel_locks_against_a_lease_fail_at_once(ws):
    f = ws.mnt / "leased.txt"
    f.write_text("data\n")
    take(f, "a")
    started = time.monotonic()
    refused = flock_n(f, "b")
    assert refused.returncode == 1 and refused.stdout == "" and refused.stderr == "", refused  # flock -n's usual
    assert flock_n(f, "b", "-s").returncode == 1
    assert time.monotonic() - started < 5
    assert probe(f, "lockf", "b") in ("EAGAIN", "EACCES")  # lockf(F_TLOCK)
    assert probe(f, "posix_rd", "b") in ("EAGAIN", "EACCES")
    assert probe(f, "ofd_wr", "b") == "EAGAIN"
    assert probe(f, "ofd_rd", "b") == "EAGAIN"
    # A lock is a lock: the holder's own kernel locks wait for its lease too.
    assert flock_n(f, "a").returncode == 1
    # One holder, the lease's principal, everywhere the locks are shown.
    assert holders(f) == [("lease", "exclusive", "agent:a")]
    listed = json.loads(deskfs("locks", "--json", cwd=ws.mnt).stdout)
    assert [(e["kind"], e["principal"]) for e in listed] == [("lease", "agent:a")]
    assert setfattr(f, None, "a").returncode == 0
    assert flock_n(f, "b").returncode == 0
    assert probe(f, "lockf", "b") == "ok"
    assert proc_locks(device_token(ws)) == []


def test_lease_expiry_releases_waiting_kernel_locks_within_half_a_second(ws, waiters):
    f = ws.mnt / "short.txt"
    f.write_text("s\n")
    take(f, "a", "exclusive ttl=3")
    expires = expiry_ns(f)
    token, ino = device_token(ws), os.stat(f).st_ino
    flock_waiter = waiters(f, "flock", "b")
    ofd_waiter = waiters(f, "ofd", "c")  # fcntl locks are another family than flock: both wait, both get it
    wait_for_waiters(token, ino, 2)
    assert time.time_ns() < expires, "the waiters were not waiting before the lease expired; machine too slow"
    for waiter in (flock_waiter, ofd_waiter):
        got = waiter.acquired()
        assert expires <= got <= expires + EXPIRY_SLACK * 1e9, (got - expires) / 1e9
    assert sorted(holders(f)) == [("flock", "exclusive", "agent:b"), ("ofd", "exclusive", "agent:c")]
    flock_waiter.release()
    ofd_waiter.release()


def test_lockf_waits_for_lease_release_and_lease_waits_for_lockf(ws, waiters):
    f = ws.mnt / "posix.txt"
    f.write_text("p\n")
    token, ino = device_token(ws), os.stat(f).st_ino
    take(f, "a")
    waiter = waiters(f, "lockf", "b")  # F_SETLKW over the whole file
    wait_for_waiters(token, ino, 1)
    assert setfattr(f, None, "a").returncode == 0
    waiter.acquired()
    assert holders(f) == [("posix", "exclusive", "agent:b")]
    # Now the lease waits for the kernel lock: refused at once, or taken once it is released.
    refused = deskfs("lock", str(f), check=False, env=agent_env("a"))
    assert refused.returncode == 1 and "agent:b" in one_line(refused)
    lease = subprocess.Popen([DESKFS, "lock", "--wait", "30", str(f)], env=agent_env("a"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        waiter.release()
        assert lease.wait(timeout=60) == 0, lease.stderr.read()
    finally:
        if lease.poll() is None:
            lease.kill()
            lease.wait()
    assert holders(f) == [("lease", "exclusive", "agent:a")]
    deskfs("unlock", str(f), env=agent_env("a"))


def test_lease_refused_while_a_kernel_lock_is_held(ws, waiters):
    f = ws.mnt / "held.txt"
    f.write_text("h\n")
    for kind, holder in (("flock", "agent:b"), ("lockf", "agent:b"), ("ofd", "agent:b")):
        waiter = waiters(f, kind, "b")
        waiter.acquired()
        refused = setfattr(f, "exclusive", "a")
        assert refused.returncode != 0 and "Device or resource busy" in refused.stderr, (kind, refused.stderr)
        busy = deskfs("lock", str(f), check=False, env=agent_env("a"))
        assert busy.returncode == 1 and holder in one_line(busy), kind
        waiter.release()
    # Shared with shared: a shared flock admits a shared lease, not an exclusive one.
    shared = waiters(f, "flock_sh", "b")
    shared.acquired()
    assert setfattr(f, "exclusive", "a").returncode != 0
    take(f, "a", "shared")
    assert sorted(holders(f)) == [("flock", "shared", "agent:b"), ("lease", "shared", "agent:a")]
    assert setfattr(f, None, "a").returncode == 0
    shared.release()
    # The holder's own kernel lock is in the way too (a lock is a lock), until it is released.
    own = waiters(f, "flock", "a")
    own.acquired()
    busy = deskfs("lock", str(f), check=False, env=agent_env("a"))
    assert busy.returncode == 1 and "agent:a" in one_line(busy)
    own.release()
    take(f, "a")
    assert holders(f) == [("lease", "exclusive", "agent:a")]


def test_shared_lease_admits_shared_kernel_locks(ws, waiters):
    f = ws.mnt / "shared.txt"
    f.write_text("s\n")
    take(f, "a", "shared")
    take(f, "c", "shared")
    assert flock_n(f, "b", "-s").returncode == 0
    assert flock_n(f, "b", "-x").returncode == 1
    assert probe(f, "posix_rd", "b") == "ok"
    assert probe(f, "ofd_rd", "b") == "ok"
    assert probe(f, "lockf", "b") in ("EAGAIN", "EACCES")
    shared = waiters(f, "flock_sh", "b")
    shared.acquired()
    assert sorted(holders(f)) == [("flock", "shared", "agent:b"), ("lease", "shared", "agent:a"),
                                  ("lease", "shared", "agent:c")]
    shared.release()
    token, ino = device_token(ws), os.stat(f).st_ino
    exclusive = waiters(f, "flock", "b")
    wait_for_waiters(token, ino, 1)
    assert setfattr(f, None, "a").returncode == 0
    assert setfattr(f, None, "c").returncode == 0
    exclusive.acquired()
    exclusive.release()


# -- 3. every end of a lease drops its kernel lock ----------------------------------------------


def test_release_break_session_end_and_delete_drop_the_kernel_lock(ws, waiters):
    token = device_token(ws)
    f = ws.mnt / "ends.txt"
    f.write_text("e\n")
    ino = os.stat(f).st_ino
    for end in ("release", "break", "session"):
        if end == "session":
            session = subprocess.Popen([DESKFS, "run", "--agent", "s1", "--", "sh", "-c",
                                        f"setfattr -n {LOCK} -v exclusive {f} && echo taken && read x || true"],
                                       cwd=ws.mnt, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            assert read_line(session.stdout, 30, bytearray()) == "taken"
        else:
            take(f, "a")
        waiter = waiters(f, "flock", "b")
        wait_for_waiters(token, ino, 1)
        if end == "release":
            assert setfattr(f, None, "a").returncode == 0
        elif end == "break":
            assert setfattr(f, "break", None).returncode == 0  # root: the workspace owner
        else:
            session.stdin.close()
            assert session.wait(timeout=30) == 0
        waiter.acquired()
        waiter.release()
    # Deleting the file drops it too: the holder removes its last name while b waits.
    take(f, "a")
    waiter = waiters(f, "flock", "b")
    wait_for_waiters(token, ino, 1)
    assert run(["rm", str(f)], cwd="/", env=agent_env("a")).returncode == 0
    waiter.acquired()
    waiter.release()
    wait_until(lambda: proc_locks(token) == [], 10, "no kernel lock left on the mount")


# -- 4. restarts ---------------------------------------------------------------------------------


def test_kill_9_leaves_no_kernel_lock_but_the_restored_leases(ws):
    kept, shared, released = ws.mnt / "kept.txt", ws.mnt / "shared.txt", ws.mnt / "released.txt"
    for f in (kept, shared, released):
        f.write_text("x\n")
    take(kept, "a", "exclusive ttl=600")
    take(shared, "c", "shared ttl=600")
    take(released, "a")
    assert setfattr(released, None, "a").returncode == 0  # its descriptor is kept open, unlocked
    fd = os.open(kept, os.O_RDONLY)
    try:
        os.fsync(fd)  # commits the store's open transaction: the files and the leases survive the kill
    finally:
        os.close(fd)
    old_token, old_pid = device_token(ws), ws.daemon_pid
    assert {(k, m, p) for k, m, p, _ in proc_locks(old_token)} == {
        ("FLOCK", "WRITE", old_pid), ("POSIX", "WRITE", old_pid), ("FLOCK", "READ", old_pid),
        ("POSIX", "READ", old_pid)}

    ws.kill_daemon()
    assert proc_locks(old_token) == []
    with open("/proc/locks") as f:
        assert not [line for line in f if line.split()[4:5] == [str(old_pid)]]

    ws.mount()
    token, pid = device_token(ws), ws.daemon_pid
    inode = {f: os.stat(f).st_ino for f in (kept, shared, released)}
    assert sorted(proc_locks(token)) == sorted([
        ("FLOCK", "WRITE", pid, inode[kept]), ("POSIX", "WRITE", pid, inode[kept]),
        ("FLOCK", "READ", pid, inode[shared]), ("POSIX", "READ", pid, inode[shared])])
    assert holders(kept) == [("lease", "exclusive", "agent:a")]
    assert holders(shared) == [("lease", "shared", "agent:c")]
    assert flock_n(kept, "b").returncode == 1
    assert flock_n(shared, "b", "-s").returncode == 0
    assert flock_n(released, "b").returncode == 0


def test_unmount_that_fails_keeps_the_kernel_lock_and_one_that_works_is_not_busy(ws):
    f = ws.mnt / "kept.txt"
    f.write_text("k\n")
    take(f, "a", "exclusive ttl=600")
    user = RequestServer([sys.executable, "-c", "import sys\nfor line in sys.stdin: print('ok', flush=True)"],
                         ws.mnt, agent_env("b"))  # its working folder is in the mount: the unmount is busy
    try:
        busy = deskfs("unmount", str(ws.mnt), check=False)
        assert busy.returncode == 1 and "busy" in one_line(busy)
        wait_until(lambda: flock_n(f, "b").returncode == 1, 10, "the lease's kernel lock to be taken again")
    finally:
        user.close()
    ws.unmount()  # the daemon's own descriptors do not make it busy
    ws.mount()
    assert flock_n(f, "b").returncode == 1
    assert holders(f) == [("lease", "exclusive", "agent:a")]


# -- 5. folders ----------------------------------------------------------------------------------


SERVER = textwrap.dedent(
    r"""
    import errno, fcntl, json, os, sys
    fds = {}
    for line in sys.stdin:
        op, *a = json.loads(line)
        try:
            if op == "open":
                fds[a[0]] = os.open(a[0], os.O_RDONLY)
            elif op == "flock_nb":
                fcntl.flock(fds[a[0]], fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif op == "unflock":
                fcntl.flock(fds[a[0]], fcntl.LOCK_UN)
            elif op == "close":
                os.close(fds.pop(a[0]))
            result = "ok"
        except OSError as exc:
            result = errno.errorcode[exc.errno]
        print(json.dumps(result), flush=True)
    """
)


def test_exclusive_folder_lease_blocks_kernel_locks_on_files_inside(ws):
    token = device_token(ws)
    d = ws.mnt / "D"
    (d / "sub").mkdir(parents=True)
    x, y, z, own = d / "x", d / "sub" / "y", d / "z", d / "own"
    for f in (x, y, z, own):
        f.write_text("f\n")
    b = RequestServer([sys.executable, "-c", SERVER], "/", agent_env("b"))
    try:
        # A kernel lock inside refuses the folder's lease, as one on the folder would.
        assert b("open", str(z)) == "ok" and b("flock_nb", str(z)) == "ok"
        refused = setfattr(d, "exclusive", "a")
        assert refused.returncode != 0 and "Device or resource busy" in refused.stderr, refused.stderr
        assert b("unflock", str(z)) == "ok"

        assert b("open", str(y)) == "ok"  # open before the lease: locked when the lease is taken
        take(d, "a")
        assert holders(d) == [("lease", "exclusive", "agent:a")]
        assert b("flock_nb", str(y)) == "EAGAIN"
        assert b("flock_nb", str(z)) == "EAGAIN"
        assert flock_n(x, "b").returncode == 1  # opened while the lease holds: locked at the open
        assert probe(x, "lockf", "b") in ("EAGAIN", "EACCES")
        assert probe(x, "ofd_rd", "b") == "EAGAIN"
        # The holder's own kernel locks inside its folder are its own business: nobody else has the file open.
        assert flock_n(own, "a").returncode == 0
        # What the daemon holds for the folder's sake: the folder's flock, and the files b has open (only).
        ino = {p: os.stat(p).st_ino for p in (d, x, y, z, own)}
        wait_until(lambda: {i for *_, i in proc_locks(token)} == {ino[d], ino[y], ino[z]}, 10,
                   "the lock of x to go with b's probes")
        assert ("FLOCK", "WRITE", ws.daemon_pid, ino[d]) in proc_locks(token)
        assert holders(x) == [] and holders(y) == []  # the folder's lease shows on the folder only

        assert setfattr(d, None, "a").returncode == 0
        assert b("flock_nb", str(y)) == "ok"
        assert flock_n(x, "b").returncode == 0
        assert b("close", str(y)) == "ok" and b("close", str(z)) == "ok"
        wait_until(lambda: proc_locks(token) == [], 10, "no kernel lock left")
    finally:
        b.close()


# -- 6. what the daemon holds is the holder's ----------------------------------------------------


def test_the_daemons_locks_are_the_lease_holders_in_the_journal_and_for_ebusy(ws):
    f, other = ws.mnt / "f.txt", ws.mnt / "other.txt"
    f.write_text("f\n")
    other.write_text("o\n")
    take(f, "a")
    # The holder writes under its lease: the daemon's kernel lock binds nobody for EBUSY, the lease does.
    assert run(["sh", "-c", f"echo A > {f}"], cwd="/", env=agent_env("a")).returncode == 0
    blocked = run(["sh", "-c", f"echo B > {f}"], cwd="/", check=False, env=agent_env("b"))
    assert blocked.returncode != 0 and "busy" in blocked.stderr, blocked.stderr
    assert setfattr(f, None, "a").returncode == 0
    # A real kernel lock, journaled by the watcher: once it is, the daemon's locks would have been too.
    def journal() -> list[dict]:
        return [json.loads(line) for line in deskfs("log", "--json", "--limit", "0", cwd=ws.mnt).stdout.splitlines()]

    holder = Waiter(other, "flock", "b")
    try:
        holder.acquired()
        wait_until(lambda: any(r["op"] == "lock" and r["principal"] == "agent:b" for r in journal()), 10,
                   "agent:b's flock in the journal")
    finally:
        holder.release()
    locks = [(r["op"], r["principal"], r["details"].get("kind")) for r in journal() if r["op"] in ("lock", "unlock")]
    assert ("lock", "agent:a", "lease") in locks and ("unlock", "agent:a", "lease") in locks
    assert {p for _, p, _ in locks} <= {"agent:a", "agent:b"}, locks  # never the daemon or its user
    daemon = ws.daemon_pid  # the daemon's own opens (its thread's requests) are nobody's and not journaled
    assert not [r for r in journal() if r["op"] == "open" and (r["principal"] == "deskfs" or r["pid"] == daemon
                                                               or os.path.exists(f"/proc/{daemon}/task/{r['pid']}"))]


def test_leased_executable_still_runs_and_only_files_and_folders_can_be_leased(ws):
    script = ws.mnt / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    take(script, "a")
    # An executable is held read-only (a file open for writing cannot be executed): it still runs.
    assert run([str(script)], cwd="/", env=agent_env("a")).stdout == "ran\n"
    assert run([str(script)], cwd="/", env=agent_env("b")).stdout == "ran\n"
    assert flock_n(script, "b").returncode == 1
    assert probe(script, "lockf", "b") in ("EAGAIN", "EACCES")
    assert setfattr(script, None, "a").returncode == 0

    os.mkfifo(ws.mnt / "fifo")
    os.mknod(ws.mnt / "null", 0o666 | 0o020000, os.makedev(1, 3))
    for name, kind in (("fifo", "a FIFO"), ("null", "a character device")):
        path = ws.mnt / name
        result = deskfs("lock", str(path), check=False, env=agent_env("a"))
        assert result.returncode == 2, result.stderr
        line = one_line(result)
        assert kind in line and "cannot be leased" in line, line
        attr = setfattr(path, "exclusive", "a")  # the kernel allows user.* attributes on files and folders only
        assert attr.returncode != 0 and "Operation not permitted" in attr.stderr, attr.stderr
    assert proc_locks(device_token(ws)) == []
