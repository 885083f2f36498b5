"""The audit journal on a real deskfs mount: what is recorded, how it is queried, and that it holds.

Every actor is its own process (an agent is a process with DESKFS_AGENT=NAME in its environment, another
Unix user runs through setpriv), and the journal is read through `deskfs log` (or `deskfs log --store`
on an unmounted store), `deskfs status` and, for the hash chain, sqlite3.

Covered: a two-agent session recorded exactly and in order (the end of a lease whose file was deleted
included, by the daemon's principal `deskfs`); coalescing of 100,000 write() calls; the journal agreeing
with the tree after kill -9 of the daemon, and a hand-edited record named by --verify; --follow; the
query filters and bad input; a journal of 1,000,000 records queried through its indexes (every
statement the daemon runs, newest-N and page by page); retention; inotify on the mount; `deskfs status`;
refused requests (EBUSY, lease break by a non-owner, impersonation); reads of the tree (lookup, getattr,
readlink, opendir, readdir, getxattr, listxattr) journaled only when refused; a non-owner reader seeing
only the records of paths it may read.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import select
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conftest import (DESKFS, agent_env, base_env, command_as, deskfs, one_line, run, shared_workspace, unix_users,
                      user_deskfs)
from deskfs import journal

USERS = ("deskfs-u1",)
LOCK = "user.deskfs.lock"
CHANGE_OPS = ("close_write", "create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename",
              "setattr", "setxattr", "removexattr")
READ_ONLY_OPS = ("lookup", "getattr", "readlink", "opendir", "readdir", "getxattr", "listxattr")
HUMAN_LINE = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3}  \S+  .+$")


# -- helpers ------------------------------------------------------------------------------------


def as_agent(name: str | None, code: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run a python snippet in its own process as agent `name` (root's agent)."""
    return run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=agent_env(name), check=check)


def try_write(name: str, path: str, cwd: Path) -> subprocess.CompletedProcess:
    """Agent `name` writes its name into `path`; prints the errno (a number) if the write is refused."""
    return as_agent(name, f"""
        import os
        fd = os.open({path!r}, os.O_WRONLY)
        try:
            os.write(fd, {name.encode()!r})
        except OSError as e:
            print(e.errno)
    """, cwd)


def log(ws, *args: str, cwd: Path | str | None = None) -> list[dict]:
    """Every record `deskfs log --json --limit 0 ARGS` prints (run inside the mount unless `cwd`)."""
    result = deskfs("log", "--json", "--limit", "0", *args, cwd=cwd or ws.mnt, env=base_env())
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_log(ws, predicate, what: str, *args: str, timeout: float = 10.0) -> list[dict]:
    """Poll `deskfs log` until `predicate(records)` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        records = log(ws, *args)
        if predicate(records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; journal:\n"
                                 + "\n".join(json.dumps(r) for r in records[-30:]))
        time.sleep(0.05)


def has(records: list[dict], **fields) -> bool:
    return any(all(r.get(k) == v for k, v in fields.items()) for r in records)


def key(r: dict) -> tuple:
    return (r["principal"], r["op"], r["path"], r["path2"], r["errno"])


class Lines:
    """Lines of a child's pipe, awaited with select and a deadline."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.closed = False
        self.seen: list[str] = []  # every line returned so far

    def next(self, timeout: float) -> str | None:
        """The next line, or None if none came within `timeout` seconds (or the pipe closed)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return None
            ready, _, _ = select.select([self.stream], [], [], left)
            if ready:
                chunk = os.read(self.stream.fileno(), 65536)
                if not chunk:
                    self.closed = True
                    return None
                self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer[:] = rest
        self.seen.append(line.decode())
        return self.seen[-1]

    def until(self, predicate, timeout: float, what: str) -> tuple[str, float]:
        """The first line satisfying `predicate` and the monotonic time it was read."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            line = self.next(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"no line {what} within {timeout} s; got: {seen[-20:]}")
            arrived = time.monotonic()
            seen.append(line)
            if predicate(line):
                return line, arrived


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def users() -> dict[str, pwd.struct_passwd]:
    """Unix user deskfs-u1 (created once, kept between runs)."""
    return unix_users(*USERS)


@pytest.fixture
def shared_ws(make_workspace, tmp_path, users):
    """A workspace mounted with --allow-other, reachable by the test users."""
    ws = shared_workspace(make_workspace, tmp_path)
    os.chmod(ws.mnt, 0o777)
    return ws


@pytest.fixture
def procs():
    """Background processes of a test, killed at its end whatever happened."""
    made: list[subprocess.Popen] = []
    yield made
    for proc in made:
        stop(proc)


# -- 1. a scripted session of two agents --------------------------------------------------------


def test_two_agent_session_is_recorded_in_order(ws):
    mnt = ws.mnt
    as_agent("alice", """
        import os
        os.mkdir("reports")
        fd = os.open("reports/q3.md", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"q3 numbers\\n")
        os.close(fd)
    """, mnt)
    # close() does not wait for the daemon's release: the close_write is awaited before bob acts.
    wait_log(ws, lambda rs: has(rs, op="close_write", path="/reports/q3.md"), "alice's close_write")
    as_agent("bob", """
        import os
        assert open("reports/q3.md").read() == "q3 numbers\\n"
        os.rename("reports/q3.md", "reports/q3-final.md")
    """, mnt)
    lease = run(["setfattr", "-n", LOCK, "-v", "exclusive", str(mnt / "reports/q3-final.md")], cwd="/",
                env=agent_env("alice"))
    assert lease.returncode == 0
    refused = as_agent("bob", """
        import errno, os
        fd = os.open("reports/q3-final.md", os.O_WRONLY)
        try:
            os.write(fd, b"bob was here")
        except OSError as e:
            print(errno.errorcode[e.errno])
        os.close(fd)
    """, mnt)
    assert refused.stdout.strip() == "EBUSY"
    as_agent("alice", "import os; os.unlink('reports/q3-final.md')", mnt)
    # Deleting the file ends alice's lease: the daemon journals that when it frees the inode (on the
    # kernel's forget, which comes after unlink() has returned).
    wait_log(ws, lambda rs: has(rs, principal="deskfs", op="unlock"), "the lease's end", "--op", "unlock")

    changes = log(ws, "--op", "mkdir,create,write,close_write,rename,lock,unlock,unlink")
    assert [key(r) for r in changes] == [
        ("agent:alice", "mkdir", "/reports", None, None),
        ("agent:alice", "create", "/reports/q3.md", None, None),
        ("agent:alice", "write", "/reports/q3.md", None, None),
        ("agent:alice", "close_write", "/reports/q3.md", None, None),
        ("agent:bob", "rename", "/reports/q3.md", "/reports/q3-final.md", None),
        ("agent:alice", "lock", "/reports/q3-final.md", None, None),
        ("agent:bob", "write", "/reports/q3-final.md", None, 16),
        ("agent:alice", "unlink", "/reports/q3-final.md", None, None),
        ("deskfs", "unlock", None, None, None),  # the file has no name any more
    ]
    unlink, ended = changes[-2:]
    assert ended["details"] == {"kind": "lease", "holder": "agent:alice", "reason": "file deleted"}
    assert ended["inode"] == unlink["inode"] and isinstance(unlink["inode"], int)
    assert ended["seq"] == unlink["seq"] + 1, "the lease's end is the record right after the unlink"
    assert (ended["uid"], ended["denied"]) == (0, False)
    assert log(ws, "--principal", "deskfs", "--op", "unlock") == [ended]
    by_op = {r["op"]: r for r in reversed(changes)}  # the first record of each op
    assert by_op["create"]["details"] == {"access": "write", "flags": ["O_CREAT", "O_EXCL"], "mode": "0644"}
    assert by_op["write"]["details"] == {"calls": 1, "bytes": 11, "ranges": [[0, 11]]}
    assert by_op["close_write"]["details"] == {"size": 11, "version": 1}  # the version it sealed
    assert by_op["lock"]["details"] == {"kind": "lease", "mode": "exclusive", "ttl": 300}
    denied = [r for r in changes if r["denied"]]
    assert len(denied) == 1 and denied[0]["errno"] == 16 and "agent:alice" in denied[0]["details"]["locked_by"]
    assert all(isinstance(r["seq"], int) and isinstance(r["time_ns"], int) and r["uid"] == 0 for r in changes)
    assert [r["seq"] for r in changes] == sorted(r["seq"] for r in changes)

    # Opens and reads are recorded too, with how the file was opened.
    everything = log(ws)
    opens = [(r["principal"], r["path"], r["details"]["access"], r["details"]["flags"])
             for r in everything if r["op"] == "open"]
    assert ("agent:bob", "/reports/q3.md", "read", []) in opens
    assert ("agent:bob", "/reports/q3-final.md", "write", []) in opens
    reads = [r for r in everything if r["op"] == "read" and r["principal"] == "agent:bob"]
    assert sum(r["details"]["bytes"] for r in reads) == 11, reads
    assert {r["principal"] for r in everything} >= {"agent:alice", "agent:bob", "deskfs"}

    human = deskfs("log", "--limit", "0", cwd=mnt, env=base_env()).stdout.splitlines()
    assert all(HUMAN_LINE.match(line) for line in human), human
    for expected in (
        "  agent:alice  made folder  /reports  (mode 0755)",
        "  agent:alice  created  /reports/q3.md  (access write, flags O_CREAT,O_EXCL, mode 0644)",
        "  agent:alice  wrote  /reports/q3.md  (1 write, 11 B)",
        "  agent:alice  closed after writing  /reports/q3.md  (size 11, version 1)",
        "  agent:bob  opened  /reports/q3.md  (access read)",
        "  agent:bob  renamed  /reports/q3.md -> /reports/q3-final.md",
        "  agent:alice  locked  /reports/q3-final.md  (kind lease, mode exclusive, ttl 300)",
        "  agent:alice  deleted  /reports/q3-final.md",
        f"  deskfs  unlocked  inode {ended['inode']}  (holder agent:alice, kind lease, reason file deleted)",
    ):
        assert any(expected in line for line in human), f"{expected!r} not in:\n" + "\n".join(human)
    # A refused write says what refused it, not a tally of writes that never happened.
    [refusal] = [line for line in human if " DENIED " in line]
    assert re.fullmatch(r"\S+  agent:bob  DENIED write  /reports/q3-final\.md  "
                        r"\(EBUSY: locked_by lease exclusive agent:alice pid=\d+ since=\S+ expires=\S+\)", refusal), refusal
    assert "0 writes" not in refusal and " B)" not in refusal


# -- 2. coalescing ------------------------------------------------------------------------------


def test_100000_one_byte_writes_become_one_record_per_commit_window(ws):
    writer = as_agent("w", """
        import os, time
        fd = os.open("many.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        start = time.monotonic()
        for _ in range(100_000):
            os.write(fd, b"x")
        print(time.monotonic() - start)
        os.close(fd)
    """, ws.mnt)
    elapsed = float(writer.stdout)
    records = wait_log(ws, lambda rs: has(rs, op="close_write"), "the close_write", "--path", "/many.bin")
    writes = [r for r in records if r["op"] == "write"]
    assert all(r["principal"] == "agent:w" for r in writes)
    assert sum(r["details"]["calls"] for r in writes) == 100_000
    assert sum(r["details"]["bytes"] for r in writes) == 100_000
    # One record per handle per 50 ms commit window: never more records than windows the writing spanned
    # (100,000 FUSE round trips take seconds, so "a handful" means that many windows, not 100,000 rows).
    assert len(writes) <= elapsed / 0.05 + 4, (len(writes), elapsed)
    assert len(writes) <= 100_000 // 50, len(writes)
    # Sequential 1-byte writes: each record holds one range, and the ranges tile [0, 100000).
    ranges = [rng for r in writes for rng in r["details"]["ranges"]]
    assert len(ranges) == len(writes)
    assert ranges[0][0] == 0 and ranges[-1][1] == 100_000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), ranges
    closes = [r for r in records if r["op"] == "close_write"]
    assert [(c["principal"], c["details"]) for c in closes] == [("agent:w", {"size": 100_000, "version": 1})]
    assert closes[0]["seq"] > writes[-1]["seq"]


# -- 3. a crash, the tree, and the hash chain ---------------------------------------------------


CHURN = textwrap.dedent(
    """
    import os, sys
    base = sys.argv[1]
    i = 0
    try:
        while True:
            d = f"{base}/d{i}"
            os.mkdir(d)
            fd = os.open(f"{d}/f", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 100)
            os.close(fd)
            os.rename(f"{d}/f", f"{d}/g")
            os.symlink("g", f"{d}/s")
            os.link(f"{d}/g", f"{d}/h")
            if i % 2:
                os.unlink(f"{d}/g")
            if i % 3 == 0:
                for name in ("s", "h", "g"):
                    if os.path.lexists(f"{d}/{name}"):
                        os.unlink(f"{d}/{name}")
                os.rmdir(d)
            if i % 5 == 4 and os.path.isdir(f"{base}/d{i - 1}"):
                os.rename(f"{base}/d{i - 1}", f"{base}/moved{i - 1}")
            i += 1
            print(i, flush=True)
    except OSError as e:
        print("stopped", e.errno, flush=True)
    """
)


def replay(records: list[dict]) -> set[str]:
    """The set of paths the journal's tree-changing records leave, replayed in order."""
    paths: set[str] = set()

    def under(root: str) -> set[str]:
        return {p for p in paths if p == root or p.startswith(root + "/")}

    for r in sorted(records, key=lambda r: r["seq"]):
        if r["errno"] is not None:
            continue
        op, path, path2 = r["op"], r["path"], r["path2"]
        if op in ("create", "mkdir", "mknod", "symlink"):
            paths.add(path)
        elif op == "link":
            paths.add(path2)
        elif op in ("unlink", "rmdir"):
            paths.discard(path)
        elif op == "rename":
            moving, replaced = under(path), under(path2)
            if (r["details"] or {}).get("exchange"):
                paths -= moving | replaced
                paths |= {path2 + p[len(path):] for p in moving} | {path + p[len(path2):] for p in replaced}
            else:
                paths -= moving | replaced
                paths |= {path2 + p[len(path):] for p in moving}
    return paths


def tree(mnt: Path) -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(mnt):
        for name in dirs + files:
            found.add("/" + os.path.relpath(os.path.join(folder, name), mnt))
    return found


def test_journal_matches_tree_after_kill_9_and_verify_names_an_edited_record(ws, procs):
    (ws.mnt / "churn").mkdir()
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(ws.mnt / "churn")], cwd="/", env=agent_env("churner"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(churn)
    lines = Lines(churn.stdout)
    lines.until(lambda line: line.isdigit() and int(line) >= 150, 60, "reporting 150 rounds")
    ws.kill_daemon()  # mid-run: the churner is between two operations or inside one
    last, _ = lines.until(lambda line: line.startswith("stopped"), 30, "saying it stopped")
    assert churn.wait(timeout=30) == 0, churn.stderr.read()

    mount = ws.mount()
    assert "mounted" in mount.stdout
    records = log(ws)
    assert records[-1]["op"] == "mount"
    assert has(records, op="fsck", principal="deskfs")
    # The daemon's own records: the first mount, the repair after the crash (no unmount: it was killed),
    # and the mount again.
    assert [r["op"] for r in log(ws, "--principal", "deskfs")] == ["mount", "fsck", "mount"]
    # What the last commit window held died with the daemon: most of the 150 rounds are kept, not all.
    assert len([r for r in records if r["op"] == "mkdir"]) > 100
    journaled = replay(records)
    actual = tree(ws.mnt)
    assert journaled - actual == set(), "journaled but not in the tree"
    assert actual - journaled == set(), "in the tree but not journaled"
    verified = deskfs("log", "--verify", cwd=ws.mnt, env=base_env())
    match = re.fullmatch(r"journal verified: (\d+) records, hash chain intact; signed head: record (\d+)\n",
                         verified.stdout)
    assert match, verified.stdout
    assert int(match.group(1)) == int(match.group(2)) == records[-1]["seq"]

    # A record altered behind deskfs's back is named, by the store and by the daemon.
    ws.unmount()
    offline = deskfs("log", "--store", str(ws.store), "--json", "--principal", "deskfs", cwd="/").stdout
    assert [json.loads(line)["op"] for line in offline.splitlines()] == ["mount", "fsck", "mount", "unmount"]
    db = ws.store / "deskfs.db"
    run(["sqlite3", str(db), "UPDATE journal SET principal='agent:mallory' WHERE seq=5;"], cwd="/")
    offline = deskfs("log", "--verify", "--store", str(ws.store), check=False, cwd="/")
    assert offline.returncode == 1, offline.stdout + offline.stderr
    assert "record 5 " in one_line(offline) and "does not match its hash" in offline.stderr
    ws.mount()
    (ws.mnt / "after-tamper.txt").write_text("still works\n")
    assert (ws.mnt / "after-tamper.txt").read_text() == "still works\n"
    wait_log(ws, lambda rs: has(rs, op="close_write", path="/after-tamper.txt"), "the new file's close_write")
    online = deskfs("log", "--verify", check=False, cwd=ws.mnt, env=base_env())
    assert online.returncode == 1, online.stdout + online.stderr
    assert "record 5 " in one_line(online)
    assert log(ws, "--principal", "agent:mallory")[0]["seq"] == 5


# -- 4. --follow --------------------------------------------------------------------------------


FOLLOW_WRITER = textwrap.dedent(
    """
    import os, sys, time
    for name in sys.stdin:
        fd = os.open(name.strip(), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"news\\n")
        print(time.monotonic(), flush=True)  # CLOCK_MONOTONIC: the same clock in every process
        os.close(fd)
    """
)


def test_follow_sees_a_new_write_within_100_ms(ws, procs):
    follower = subprocess.Popen([DESKFS, "log", "--follow", "--json", "--op", "write,close_write"], cwd=ws.mnt,
                                env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(follower)
    writer = subprocess.Popen([sys.executable, "-c", FOLLOW_WRITER], cwd=ws.mnt, env=agent_env("news"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    procs.append(writer)
    out, written = Lines(follower.stdout), Lines(writer.stdout)

    def write(name: str) -> float:
        writer.stdin.write(name.encode() + b"\n")
        writer.stdin.flush()
        line = written.next(10)
        assert line is not None, writer.stderr.read()
        return float(line)

    def record_of(name: str, op: str):
        return lambda line: (r := json.loads(line))["path"] == f"/{name}" and r["op"] == op

    # Warm up: the follower is connected and streaming once the first record reaches it.
    write("warm.txt")
    line, _ = out.until(record_of("warm.txt", "write"), 10, "for warm.txt")
    first = json.loads(line)
    assert first["principal"] == "agent:news" and first["details"]["bytes"] == 5
    out.until(record_of("warm.txt", "close_write"), 10, "closing warm.txt")

    delays = []
    for attempt in range(3):  # a loaded machine may miss once; the behaviour is that it can keep up
        name = f"news{attempt}.txt"
        returned = write(name)
        line, arrived = out.until(record_of(name, "write"), 10, f"for {name}")
        delays.append(arrived - returned)
        assert json.loads(line)["principal"] == "agent:news"
        out.until(record_of(name, "close_write"), 10, f"closing {name}")
        if delays[-1] < 0.1:
            break
    assert min(delays) < 0.1, delays
    # Only the operations asked for were streamed (the creates of the same files were not).
    streamed = [json.loads(line) for line in out.seen]
    assert {r["op"] for r in streamed} == {"write", "close_write"}
    assert has(log(ws, "--agent", "news"), op="create", path="/warm.txt")


# -- 5. queries ---------------------------------------------------------------------------------


def test_log_filters_and_bad_input(ws):
    mnt = ws.mnt
    as_agent("a1", """
        import os
        os.mkdir("reports")
        open("reports/q1.md", "w").write("q1")
        open("reports/data.csv", "w").write("1,2")
    """, mnt)
    as_agent("a2", """
        import os
        os.makedirs("deep/x")
        os.mkdir("notes")
        open("deep/x/y.md", "w").write("y")
        open("notes/n.md", "w").write("n")
    """, mnt)
    (mnt / "top.md").write_text("top")
    assert run(["setfattr", "-n", LOCK, "-v", "exclusive", str(mnt / "notes/n.md")], cwd="/",
               env=agent_env("a2")).returncode == 0
    out = try_write("a1", "notes/n.md", mnt)
    assert out.stdout.strip() == "16"
    files = ("/reports/q1.md", "/reports/data.csv", "/deep/x/y.md", "/notes/n.md", "/top.md")
    full = wait_log(ws, lambda rs: all(has(rs, op="close_write", path=f) for f in files), "every close_write")
    assert full == log(ws), "the journal changed while nothing happened"

    def seqs(records: list[dict]) -> list[int]:
        return [r["seq"] for r in records]

    def expect(records: list[dict], keep) -> None:
        wanted = [r for r in full if keep(r)]
        assert wanted, "a filter test needs records to find"
        assert seqs(records) == seqs(wanted)

    expect(log(ws, "--agent", "a1"), lambda r: r["principal"] == "agent:a1")
    expect(log(ws, "--agent", "a1", "--agent", "a2"), lambda r: r["principal"] in ("agent:a1", "agent:a2"))
    expect(log(ws, "--principal", "user:root"), lambda r: r["principal"] == "user:root")
    # The daemon's own records (the mount, here) under its own name.
    expect(log(ws, "--principal", "deskfs"), lambda r: r["principal"] == "deskfs")
    expect(log(ws, "--principal", "deskfs", "--agent", "a1"), lambda r: r["principal"] in ("deskfs", "agent:a1"))
    expect(log(ws, "--path", "reports/*.md"), lambda r: r["path"] == "/reports/q1.md")
    expect(log(ws, "--path", "*.md", cwd=mnt / "reports"), lambda r: r["path"] == "/reports/q1.md")
    expect(log(ws, "--path", "**/x/*.md"), lambda r: r["path"] == "/deep/x/y.md")
    expect(log(ws, "--path", "/**/n.md"), lambda r: r["path"] == "/notes/n.md")
    expect(log(ws, "--path", "reports"), lambda r: r["path"] == "/reports" or (r["path"] or "").startswith("/reports/"))
    expect(log(ws, "--path", str(mnt / "deep")), lambda r: (r["path"] or "").startswith("/deep"))
    expect(log(ws, "--op", "create,mkdir"), lambda r: r["op"] in ("create", "mkdir"))
    expect(log(ws, "--op", "create", "--op", "lock"), lambda r: r["op"] in ("create", "lock"))
    expect(log(ws, "--agent", "a2", "--op", "create", "--path", "**/*.md"),
           lambda r: r["principal"] == "agent:a2" and r["op"] == "create" and r["path"].endswith(".md"))
    denied = log(ws, "--denied")
    expect(denied, lambda r: r["errno"] is not None)
    assert [key(r) for r in denied] == [("agent:a1", "write", "/notes/n.md", None, 16)]
    assert denied[0]["denied"] is True

    expect(log(ws, "--since", "1h"), lambda r: True)
    assert log(ws, "--until", "1h") == []
    minute_ago = (datetime.now() - timedelta(minutes=1)).isoformat(timespec="seconds")
    expect(log(ws, "--since", minute_ago), lambda r: True)
    assert log(ws, "--until", minute_ago) == []
    middle = full[len(full) // 2]["time_ns"]
    assert all(r["time_ns"] >= middle - 1000 for r in log(ws, "--since", full[len(full) // 2]["time"]))

    newest = deskfs("log", "--json", "--limit", "3", cwd=mnt, env=base_env()).stdout.splitlines()
    assert seqs([json.loads(line) for line in newest]) == seqs(full[-3:])
    default = deskfs("log", "--json", cwd=mnt, env=base_env()).stdout.splitlines()
    assert seqs([json.loads(line) for line in default]) == seqs(full[-100:])

    # Bad input: one line, exit 2, no traceback; a pattern that matches nothing is no error.
    for bad in (["--since", "yesterdayish"], ["--until", "2026-13-45"], ["--op", "bogus"], ["--op", "write,bogus"],
                ["--principal", "root"], ["--principal", "deskfsd"], ["--limit", "-1"], ["--limit", "many"]):
        result = deskfs("log", *bad, check=False, cwd=mnt, env=base_env())
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert result.stdout == ""
        one_line(result)
    # Reading the tree is journaled only when refused: valid names, and nothing here was refused.
    reading = deskfs("log", "--json", "--op", ",".join(READ_ONLY_OPS), "--limit", "0", cwd=mnt, env=base_env())
    assert (reading.returncode, reading.stdout, reading.stderr) == (0, "", "")
    nothing = deskfs("log", "--path", "nowhere/**", cwd=mnt, env=base_env())
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "")
    nothing = deskfs("log", "--json", "--agent", "nobody", cwd=mnt, env=base_env())
    assert (nothing.returncode, nothing.stdout) == (0, "")


def test_double_star_glob_matches_at_every_depth(ws):
    """`**/` stands for any number of folders, none included: `**/*.md` finds /top.md too."""
    os.makedirs(ws.mnt / "a/b")
    for name in ("top.md", "a/mid.md", "a/b/low.md", "a/b/low.txt"):
        (ws.mnt / name).write_text(name)
    wait_log(ws, lambda rs: len([r for r in rs if r["op"] == "close_write"]) == 4, "four close_writes")
    created = lambda *args: sorted(r["path"] for r in log(ws, "--op", "create", *args))
    assert created("--path", "**/*.md") == ["/a/b/low.md", "/a/mid.md", "/top.md"]
    assert created("--path", "/**/*.md") == ["/a/b/low.md", "/a/mid.md", "/top.md"]
    assert created("--path", "a/**/*.md") == ["/a/b/low.md", "/a/mid.md"]
    assert created("--path", "**") == ["/a/b/low.md", "/a/b/low.txt", "/a/mid.md", "/top.md"]


# -- 6. a journal of a million records ----------------------------------------------------------


FILL = textwrap.dedent(
    """
    import sys
    from deskfs.journal import Actor, Journal
    from deskfs.store.meta import connect
    store, total = sys.argv[1], int(sys.argv[2])
    conn = connect(store + "/deskfs.db")
    def begin():
        if not conn.in_transaction:
            conn.execute("BEGIN")
    journal = Journal(conn, begin)
    actors = [Actor(f"agent:p{k}", 0, 1000 + k) for k in range(20)]
    paths = [f"/dir{i % 100}/f{i}.txt" for i in range(10_000)]
    journal.record(Actor("agent:rare", 0, 999), "create", 99, "/rare/only.txt")
    for n in range(total):
        journal.record(actors[n % 20], "write", 100 + n % 10_000, paths[n % 10_000], calls=1, bytes=n % 7)
        if n % 50_000 == 49_999:
            journal.flush()
            conn.execute("COMMIT")
    journal.flush()
    if conn.in_transaction:
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    """
)

# The SQL the daemon runs for a query, as control.Daemon._send_matches runs it: journal.newest for the
# newest N, journal.page until it returns no cursor for every match (--limit 0); and SQLite's plan for
# each statement. `same`: journal.query (what `deskfs log --store` runs) finds the same records.
PLANS = textwrap.dedent(
    """
    import json, sys
    from deskfs import journal
    from deskfs.store.meta import connect_read_only
    conn = connect_read_only(sys.argv[1] + "/deskfs.db")
    for spec in json.loads(sys.argv[2]):
        q = journal.Query(**spec)
        statements = []
        conn.set_trace_callback(statements.append)
        if q.limit:
            found = journal.newest(conn, q)
        else:
            found = []
            while True:
                got, cursor = journal.page(conn, q)
                found += got
                if cursor is None:
                    break
                q.after_seq = cursor
        conn.set_trace_callback(None)
        same = [r.seq for r in journal.query(conn, journal.Query(**spec))] == [r.seq for r in found]
        traced = [{"sql": s, "plan": [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + s)]}
                  for s in statements if s.lstrip().upper().startswith("SELECT")]
        print(json.dumps({"found": len(found), "same": same, "statements": traced}))
    """
)


def test_million_record_journal_is_queried_through_its_indexes(make_workspace):
    total = 1_000_000
    ws = make_workspace("big", mount=False)
    run([sys.executable, "-c", FILL, str(ws.store), str(total)], cwd="/", timeout=120)
    # Seq 1 is the rare record; record n of the loop has seq n + 2.

    def query(*args: str) -> list[dict]:
        out = deskfs("log", "--store", str(ws.store), "--json", *args, cwd="/").stdout
        return [json.loads(line) for line in out.splitlines()]

    in_dir7 = query("--path", "/dir7/**", "--limit", "50")
    wanted = sorted(n for n in range(total - 1, -1, -1) if n % 100 == 7)[-50:]
    assert [r["seq"] for r in in_dir7] == [n + 2 for n in wanted]
    assert all(r["path"] == f"/dir7/f{(r['seq'] - 2) % 10_000}.txt" for r in in_dir7)

    by_p3 = query("--principal", "agent:p3", "--limit", "50")
    wanted = sorted(n for n in range(total - 1, total - 2000, -1) if n % 20 == 3)[-50:]
    assert [r["seq"] for r in by_p3] == [n + 2 for n in wanted]
    assert {r["principal"] for r in by_p3} == {"agent:p3"}
    assert by_p3[0]["details"] == {"calls": 1, "bytes": (by_p3[0]["seq"] - 2) % 7}

    assert [(r["seq"], r["path"]) for r in query("--path", "/rare/only.txt")] == [(1, "/rare/only.txt")]
    assert [r["seq"] for r in query("--agent", "rare")] == [1]
    assert query("--path", "/dir7/f7.txt", "--agent", "p8") == []
    assert len(query("--path", "/dir7/f7.txt", "--limit", "0")) == 100

    # The newest N (--limit N) and every match (--limit 0, page by page) both go through the indexes:
    # every statement run, each page's included. (name: spec, records found, journal statements run.)
    specs = {"/dir7/** newest": ({"path_glob": "/dir7/**", "limit": 50}, 50, 1),
             "/dir7/** all": ({"path_glob": "/dir7/**", "limit": 0}, 10_000, 10_000 // journal.PAGE + 1),
             "rare path": ({"path_glob": "/rare/only.txt", "limit": 100}, 1, 1),
             "rare path all": ({"path_glob": "/rare/only.txt", "limit": 0}, 1, 1),
             "p3 newest": ({"principals": ["agent:p3"], "limit": 50}, 50, 1),
             "p3 all": ({"principals": ["agent:p3"], "limit": 0}, total // 20, total // 20 // journal.PAGE + 1),
             "rare agent": ({"principals": ["agent:rare"], "limit": 100}, 1, 1),
             "rare agent all": ({"principals": ["agent:rare"], "limit": 0}, 1, 1)}
    asked = [spec for spec, _, _ in specs.values()]
    answers = run([sys.executable, "-c", PLANS, str(ws.store), json.dumps(asked)], cwd="/").stdout.splitlines()
    assert len(answers) == len(specs)
    for (name, (spec, count, runs)), answer in zip(specs.items(), map(json.loads, answers)):
        assert (answer["found"], answer["same"]) == (count, True), (name, answer["found"], answer["same"])
        on_journal = [s for s in answer["statements"] if " FROM journal j " in s["sql"]]
        on_paths = [s for s in answer["statements"] if " FROM journal_paths " in s["sql"]]
        assert len(on_journal) + len(on_paths) == len(answer["statements"]), (name, answer["statements"])
        assert len(on_journal) == runs, (name, [s["sql"][-120:] for s in on_journal])
        index = "journal_by_path" if "path_glob" in spec else "journal_by_principal"
        for statement in on_journal:
            plan = statement["plan"]
            assert any(index in step for step in plan), (name, statement)
            assert not any(step.startswith("SCAN") for step in plan), (name, statement)
        # A glob with a literal prefix finds its paths through journal_paths' index, not by a scan of it.
        assert ("path_glob" in spec) == bool(on_paths), (name, on_paths)
        for statement in on_paths:
            assert not any(step.startswith("SCAN") for step in statement["plan"]), (name, statement)

    verified = deskfs("log", "--store", str(ws.store), "--verify", cwd="/")
    # FILL wrote behind any daemon's back, so the head signed at init (the empty journal) is all there is.
    assert verified.stdout == (f"journal verified: {total + 1} records, hash chain intact; signed head: record 0"
                               f" ({total + 1} newer records not yet covered by it)\n")


# -- 7. retention -------------------------------------------------------------------------------


def test_retention_prunes_old_records_and_keeps_the_chain_verifiable(ws):
    for i in range(5):
        (ws.mnt / f"old{i}.txt").write_text("old\n")
    before = wait_log(ws, lambda rs: len([r for r in rs if r["op"] == "close_write"]) == 5, "five close_writes")
    last_old = before[-1]
    # Age is the behaviour under test: the records must be more than a second old.
    time.sleep(max(0.0, last_old["time_ns"] / 1e9 + 1.2 - time.time()))

    answer = deskfs("config", "journal.retention", "1s", cwd=ws.mnt, env=base_env())
    assert answer.stdout == "journal.retention = 1s\n"
    kept = log(ws)
    assert kept and min(r["seq"] for r in kept) > last_old["seq"], kept[:3]
    assert not any(r["path"] and r["path"].startswith("/old") for r in kept)
    prunes = [r for r in kept if r["op"] == "prune"]
    assert len(prunes) == 1, prunes
    # The pruning the owner's `config` asked for is the owner's (control.apply_retention with the caller's
    # actor); the daemon's own minutely pruning, by `deskfs`, is a minute away and not awaited here.
    assert prunes[0]["principal"] == "user:root"
    assert log(ws, "--principal", "deskfs", "--op", "prune") == []
    details = prunes[0]["details"]
    assert details["anchor_seq"] >= last_old["seq"]
    assert details["removed"] == details["anchor_seq"]  # nothing had been pruned before: seqs 1..anchor
    assert min(r["seq"] for r in kept) == details["anchor_seq"] + 1
    assert has(kept, op="config", principal="user:root", details={"key": "journal.retention", "value": "1s"})
    verified = deskfs("log", "--verify", cwd=ws.mnt, env=base_env()).stdout
    assert verified == (f"journal verified: {len(kept)} records, hash chain intact;"
                        f" signed head: record {kept[-1]['seq']}\n")
    assert deskfs("config", "journal.retention", cwd=ws.mnt, env=base_env()).stdout == "journal.retention = 1s\n"

    # New records chain on from the anchor, through a remount and read straight from the store.
    (ws.mnt / "new.txt").write_text("new\n")
    wait_log(ws, lambda rs: has(rs, op="close_write", path="/new.txt"), "new.txt's close_write")
    ws.unmount()
    offline = deskfs("log", "--verify", "--store", str(ws.store), cwd="/").stdout
    assert re.fullmatch(r"journal verified: \d+ records, hash chain intact; signed head: record \d+\n", offline)
    ws.mount()
    assert deskfs("log", "--verify", cwd=ws.mnt, env=base_env()).returncode == 0


# -- 7b. tamper evidence at both ends of the chain ----------------------------------------------


VERIFIED = re.compile(r"journal verified: (\d+) records, hash chain intact; signed head: record (\d+)(.*)\n")


def verify_store(ws) -> subprocess.CompletedProcess:
    """`deskfs log --verify` of the unmounted store, read straight from its files."""
    return deskfs("log", "--verify", "--store", str(ws.store), check=False, cwd="/")


def verified_head(result: subprocess.CompletedProcess) -> tuple[int, int, str]:
    """(records checked, the signed head's seq, the rest of the line) of a verification that passed."""
    assert result.returncode == 0, result.stdout + result.stderr
    match = VERIFIED.fullmatch(result.stdout)
    assert match, result.stdout
    return int(match.group(1)), int(match.group(2)), match.group(3)


def failed_because(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    line = one_line(result)
    assert line.startswith("deskfs: journal verification FAILED"), line
    return line


def sql(ws, statement: str) -> str:
    return run(["sqlite3", str(ws.store / "deskfs.db"), statement], cwd="/").stdout.strip()


def make_records(ws, files: int) -> int:
    """Journal about 3 records per file (create, write, close_write); the newest committed seq."""
    as_agent("filler", f"""
        for i in range({files}):
            open(f"fill-{{i}}.txt", "w").write("x")
    """, ws.mnt)
    records = wait_log(ws, lambda rs: has(rs, op="close_write", path=f"/fill-{files - 1}.txt"), "the last close_write")
    return records[-1]["seq"]


def test_deleting_the_newest_records_is_detected_and_stays_detected(ws):
    make_records(ws, 30)
    ws.unmount()
    checked, head, rest = verified_head(verify_store(ws))
    assert (checked, rest) == (head, "")  # after an orderly unmount the head is the newest record
    assert (ws.store / "journal.head").stat().st_mode & 0o777 == 0o600
    assert (ws.store / "journal.key").stat().st_mode & 0o777 == 0o600

    # The attack of issue 9: the newest 50 records deleted while no daemon has the store.
    sql(ws, f"DELETE FROM journal WHERE seq > {head - 50}")
    line = failed_because(verify_store(ws))
    assert f"the journal ends at record {head - 50}, but its signed head is record {head}" in line
    assert f"records {head - 49} to {head} were removed" in line

    # Mounting again does not launder it: the daemon journals what it found before it signs a new head.
    ws.mount()
    [found] = log(ws, "--op", "head_mismatch")
    assert (found["seq"], found["principal"]) == (head - 49, "deskfs")
    assert (found["details"]["signed_seq"], found["details"]["found_seq"]) == (head, head - 50)
    online = deskfs("log", "--verify", check=False, cwd=ws.mnt, env=base_env())
    assert f"record {head - 49} says the journal did not reach its signed head" in failed_because(online)
    (ws.mnt / "later.txt").write_text("later\n")
    ws.unmount()
    assert f"record {head - 49} says" in failed_because(verify_store(ws))
    # ... and deleting that record too is the same attack again, on the new head.
    sql(ws, f"DELETE FROM journal WHERE seq >= {head - 49}")
    assert "were removed" in failed_because(verify_store(ws))


def test_deleting_the_oldest_records_behind_a_forged_anchor_is_detected(make_workspace):
    ws = make_workspace()
    make_records(ws, 70)
    ws.unmount()
    pristine = ws.store.parent / "pristine-store"
    run(["cp", "-a", str(ws.store), str(pristine)], cwd="/")

    # The attack of issue 9: the oldest 177 records deleted, and an anchor written that they chain from.
    anchor_hash = sql(ws, "SELECT hex(hash) FROM journal WHERE seq = 177")
    sql(ws, "DELETE FROM journal WHERE seq <= 177;"
            " INSERT OR REPLACE INTO settings (key, value) VALUES ('journal.anchor_seq', '177');"
            f" INSERT OR REPLACE INTO settings (key, value) VALUES ('journal.anchor_hash', '{anchor_hash.lower()}');")
    line = failed_because(verify_store(ws))
    assert "no prune record vouches for that anchor: records up to 177 were removed" in line
    ws.mount()
    assert "no prune record vouches" in failed_because(deskfs("log", "--verify", check=False, cwd=ws.mnt,
                                                              env=base_env()))
    ws.unmount()

    # A real pruning leaves its anchor in a prune record, in the chain; moving the anchor on is seen.
    run(["rm", "-rf", str(ws.store)], cwd="/")
    run(["mv", str(pristine), str(ws.store)], cwd="/")
    ws.mount()
    old = log(ws)[-1]
    # Age is the behaviour under test: these records must be more than a second old, the next ones not.
    time.sleep(max(0.0, old["time_ns"] / 1e9 + 1.3 - time.time()))
    as_agent("filler", "for i in range(3): open(f'fresh-{i}.txt', 'w').write('x')", ws.mnt)
    assert deskfs("config", "journal.retention", "1s", cwd=ws.mnt, env=base_env()).returncode == 0
    assert deskfs("config", "journal.retention", "forever", cwd=ws.mnt, env=base_env()).returncode == 0
    [prune] = log(ws, "--op", "prune")
    anchor = prune["details"]["anchor_seq"]
    kept = log(ws)
    assert kept[0]["seq"] == anchor + 1 and anchor >= old["seq"]
    assert len([r for r in kept if r["seq"] < prune["seq"] and r["path"]]) >= 3  # the fresh files' records
    make_records(ws, 3)
    ws.unmount()
    checked, head, rest = verified_head(verify_store(ws))  # pruning, then verify: it holds
    assert (head, rest) == (checked + anchor, "")
    forged = anchor + 2
    forged_hash = sql(ws, f"SELECT lower(hex(hash)) FROM journal WHERE seq = {forged}")
    sql(ws, f"DELETE FROM journal WHERE seq <= {forged};"
            f" UPDATE settings SET value = '{forged}' WHERE key = 'journal.anchor_seq';"
            f" UPDATE settings SET value = '{forged_hash}' WHERE key = 'journal.anchor_hash';")
    line = failed_because(verify_store(ws))
    assert (f"the anchor in settings (record {forged}) is not the one the newest prune record,"
            f" record {prune['seq']}, left (record {anchor})") in line


FSYNC_CHURN = textwrap.dedent(
    """
    import os, sys
    i = 0
    try:
        while True:
            fd = os.open(f"{sys.argv[1]}/synced-{i % 7}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, b"y" * 10)
            if i % 3 == 0:
                os.fsync(fd)  # the durable part of the head moves on here
            os.close(fd)
            i += 1
            print(i, flush=True)
    except OSError as e:
        print("stopped", e.errno, flush=True)
    """
)


def test_kill_9_mid_workload_never_fails_verification(ws, procs):
    for round_, rounds in enumerate((5, 40, 120)):
        folder = ws.mnt / f"round{round_}"
        folder.mkdir()
        workers = [subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd="/", env=agent_env("churner"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for code in (CHURN, FSYNC_CHURN)]
        procs.extend(workers)
        lines = [Lines(w.stdout) for w in workers]
        for got in lines:
            got.until(lambda line: line.isdigit() and int(line) >= rounds, 60, f"reporting {rounds} rounds")
        ws.kill_daemon()  # between any two of the daemon's steps: a commit and its head included
        for worker, got in zip(workers, lines):
            got.until(lambda line: line.startswith("stopped"), 30, "saying it stopped")
            assert worker.wait(timeout=30) == 0, worker.stderr.read()
        # Unmounted after the crash, the head may lag the database by a commit, never lead it.
        checked, head, _ = verified_head(verify_store(ws))
        assert head <= checked
        ws.mount()
        checked, head, rest = verified_head(deskfs("log", "--verify", cwd=ws.mnt, env=base_env(), check=False))
        assert (head, rest) == (checked, "")
        assert log(ws, "--op", "head_mismatch") == []


def test_a_head_that_lags_or_outlived_a_machine_crash_is_no_false_alarm(ws):
    """What a crash can leave, made on purpose: a head older than the database (a kill -9 between a
    commit and its head), and a head newer than the database from an earlier boot (a machine crash lost
    commits SQLite had not synced). Neither is tampering; a newer head of this boot is."""
    make_records(ws, 5)
    ws.unmount()
    older = (ws.store / "journal.head").read_bytes()
    _, older_seq, _ = verified_head(verify_store(ws))
    ws.mount()
    make_records(ws, 10)
    ws.kill_daemon()
    newest = int(sql(ws, "SELECT MAX(seq) FROM journal"))
    (ws.store / "journal.head").write_bytes(older)
    checked, head, rest = verified_head(verify_store(ws))
    assert (checked, head) == (newest, older_seq)
    assert rest == f" ({newest - older_seq} newer records not yet covered by it)"

    key = bytes.fromhex((ws.store / "journal.key").read_text())
    durable = (older_seq, bytes.fromhex(sql(ws, f"SELECT hex(hash) FROM journal WHERE seq = {older_seq}")))

    def head_of_boot(boot: str) -> None:
        head = journal.Head(newest + 20, os.urandom(16), *durable, boot)
        (ws.store / "journal.head").write_bytes(journal.head_block(head, key))

    head_of_boot("an-earlier-boot")
    checked, head, rest = verified_head(verify_store(ws))
    assert (checked, head) == (newest, older_seq)
    assert "the machine restarted since it was written" in rest
    head_of_boot(journal.this_boot())
    assert f"records {newest + 1} to {newest + 20} were removed" in failed_because(verify_store(ws))
    head_of_boot("an-earlier-boot")
    ws.mount()  # fsck after the kill; the remount trusts the database as far as the head requires
    verified_head(deskfs("log", "--verify", cwd=ws.mnt, env=base_env(), check=False))
    assert log(ws, "--op", "head_mismatch") == []


def test_a_removed_or_altered_head_fails_and_a_store_without_a_key_gets_one(ws):
    make_records(ws, 3)
    ws.unmount()
    head_file, key_file = ws.store / "journal.head", ws.store / "journal.key"
    signed = head_file.read_bytes()
    head_file.unlink()
    assert "journal.head is missing" in failed_because(verify_store(ws))
    head_file.write_bytes(signed.replace(b'"seq": ', b'"seq": 1', 1))
    assert "does not match its signature" in failed_because(verify_store(ws))
    head_file.write_bytes(signed)
    verified_head(verify_store(ws))

    # A store of a deskfs before signed heads has neither file: it verifies, says so, and gets a key at
    # its next mount (trusting what its database holds then).
    head_file.unlink()
    key_file.unlink()
    result = verify_store(ws)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"journal verified: \d+ records, hash chain intact; no signed head \(this store has no"
                        r" journal key yet: it gets one at its next mount\)\n", result.stdout), result.stdout
    ws.mount()
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600
    ws.unmount()
    checked, head, rest = verified_head(verify_store(ws))
    assert (checked, rest) == (head, "")
    # A key that is not one: the next opening of the store records it, and verification fails from then.
    key_file.write_text("not a key\n")
    assert "the journal key was altered" in failed_because(verify_store(ws))
    ws.mount()
    assert [r["details"]["reason"] for r in log(ws, "--op", "head_mismatch")] == [
        f"the journal key was altered ({key_file} holds no key)"]
    assert "did not reach its signed head" in failed_because(deskfs("log", "--verify", check=False, cwd=ws.mnt,
                                                                    env=base_env()))


# -- 8. inotify ---------------------------------------------------------------------------------


def test_inotify_sees_changes_made_by_another_process(ws, procs):
    folder = ws.mnt / "watched"
    folder.mkdir()
    watcher = subprocess.Popen(["inotifywait", "-m", "-e", "create,modify,close_write,moved_to,delete",
                                "--format", "%e %f", str(folder)], cwd="/", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    procs.append(watcher)
    Lines(watcher.stderr).until(lambda line: "Watches established" in line, 10, "Watches established")
    as_agent("inotified", """
        import os
        fd = os.open("watched/a.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"hello")
        os.close(fd)
        os.rename("watched/a.txt", "watched/b.txt")
        os.mkdir("watched/sub")
        os.unlink("watched/b.txt")
    """, ws.mnt)
    events = Lines(watcher.stdout)
    for expected in ("CREATE a.txt", "MODIFY a.txt", "CLOSE_WRITE,CLOSE a.txt", "MOVED_TO b.txt",
                     "CREATE,ISDIR sub", "DELETE b.txt"):
        events.until(lambda line: line == expected, 10, f"{expected!r} from inotifywait")
    # And the journal tells who did it. (The close_write comes with the kernel's asynchronous release,
    # under the name the file had then.)
    records = wait_log(ws, lambda rs: has(rs, op="close_write"), "the close_write", "--agent", "inotified")
    assert [r["path"] for r in records if r["op"] == "close_write"] in (["/watched/a.txt"], ["/watched/b.txt"])
    assert [key(r) for r in records if r["op"] in CHANGE_OPS and r["op"] != "close_write"] == [
        ("agent:inotified", "create", "/watched/a.txt", None, None),
        ("agent:inotified", "rename", "/watched/a.txt", "/watched/b.txt", None),
        ("agent:inotified", "mkdir", "/watched/sub", None, None),
        ("agent:inotified", "unlink", "/watched/b.txt", None, None),
    ]


# -- 9. status ----------------------------------------------------------------------------------


HOLD_OPEN = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"in progress")
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


def test_status_shows_open_writers_locks_and_recent_changes(ws, procs):
    as_agent("x", "import os; os.mkdir('docs'); os.rename('docs', 'papers')", ws.mnt)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, "papers/held.txt"], cwd=ws.mnt, env=agent_env("w"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(holder)
    assert Lines(holder.stdout).next(10) == "ready", holder.stderr.read()

    out = deskfs("status", "--json", "--mount", str(ws.mnt), cwd="/", env=base_env()).stdout
    [summary] = json.loads(out)
    assert summary["mountpoint"] == str(ws.mnt) and summary["store"] == str(ws.store)
    assert (summary["files"], summary["bytes"]) == (2, len("in progress"))  # /papers and its file
    active = {a["principal"]: a for a in summary["active"]}
    assert active["agent:w"]["handles"] >= 1 and active["agent:w"]["writing"] >= 1, active
    assert "/papers/held.txt" in active["agent:w"]["paths"]
    locks = [(h["path"], h["kind"], h["mode"], h["principal"], h["pid"]) for h in summary["locks"]]
    assert locks == [("/papers/held.txt", "flock", "exclusive", "agent:w", holder.pid)]
    recent = summary["recent"]
    latest = log(ws, "--op", ",".join(CHANGE_OPS))[-len(recent):]
    assert [r["seq"] for r in recent] == [r["seq"] for r in latest]
    assert [key(r) for r in recent][-3:] == [
        ("agent:x", "mkdir", "/docs", None, None),
        ("agent:x", "rename", "/docs", "/papers", None),
        ("agent:w", "create", "/papers/held.txt", None, None),
    ]
    human = deskfs("status", "--mount", str(ws.mnt), cwd="/", env=base_env()).stdout
    assert "agent:w  1 open, 1 writing  /papers/held.txt" in human
    assert "/papers/held.txt  flock exclusive  agent:w" in human

    holder.stdin.write(b"done\n")
    holder.stdin.flush()
    assert holder.wait(timeout=10) == 0
    # The kernel lock's taking and release are journaled by the watcher of /proc/locks.
    records = wait_log(ws, lambda rs: has(rs, op="close_write", path="/papers/held.txt")
                       and has(rs, op="unlock", path="/papers/held.txt"), "the close_write and unlock",
                       "--agent", "w")
    kinds = [(r["op"], r["details"].get("kind"), r["details"].get("mode")) for r in records if "lock" in r["op"]]
    assert kinds == [("lock", "flock", "exclusive"), ("unlock", "flock", "exclusive")]
    after = json.loads(deskfs("status", "--json", "--mount", str(ws.mnt), cwd="/", env=base_env()).stdout)[0]
    assert after["locks"] == [] and "agent:w" not in {a["principal"] for a in after["active"]}


# -- 9b. names that try to forge lines or command the terminal ----------------------------------


FORGED = "\n21:20:00.000  user:root  deleted  /report.md"  # as a folder's name and the file in it
HOSTILE = ["x" + FORGED.split("/")[0], "\x1b]0;pwned\x07", "bidi-\u202eexe.txt", "sep\u2028\u2029arator",
           "c1-\x9b31m", "del-\x7f"]


def test_names_with_control_characters_are_escaped_in_every_human_line(ws):
    forge_folder = ws.mnt / HOSTILE[0]
    forge_folder.mkdir()
    (forge_folder / "report.md").write_text("forged\n")
    for name in HOSTILE[1:]:
        (ws.mnt / name).write_text("hostile\n")
    for target in (forge_folder / "report.md", ws.mnt / HOSTILE[1]):
        assert deskfs("lock", str(target), cwd=ws.mnt, env=base_env()).returncode == 0
    records = wait_log(ws, lambda rs: all(has(rs, op="close_write", path="/" + n) for n in HOSTILE[1:]),
                       "every close_write")
    # --json stays exact.
    assert has(records, op="close_write", path="/x" + FORGED)
    assert has(records, op="lock", path="/\x1b]0;pwned\x07")

    human = deskfs("log", "--limit", "0", cwd=ws.mnt, env=base_env()).stdout
    lines = human.splitlines()
    assert len(lines) == len(records), human  # one line per record, whatever the names
    assert all(HUMAN_LINE.match(line) for line in lines), human
    assert not any(line.startswith("21:20:00.000") for line in lines)
    assert "/x\\n21:20:00.000  user:root  deleted  /report.md" in human
    assert "/\\x1b]0;pwned\\x07" in human and "bidi-\\u202eexe.txt" in human and "sep\\u2028\\u2029arator" in human
    assert "c1-\\x9b31m" in human and "del-\\x7f" in human

    status = deskfs("status", "--mount", str(ws.mnt), cwd="/", env=base_env()).stdout
    locks = deskfs("locks", cwd=ws.mnt, env=base_env()).stdout
    unlock = deskfs("unlock", str(ws.mnt / HOSTILE[2]), check=False, cwd=ws.mnt, env=base_env())  # no lease there
    assert unlock.returncode == 1
    one_line(unlock)
    for text in (human, status, locks, unlock.stderr):
        assert not any(c in text for c in "\x1b\x07\x7f\x9b\u202e\u2028\u2029"), repr(text)
        assert not any(line.lstrip().startswith("21:20:00.000") for line in text.splitlines()), text
    assert len(locks.splitlines()) == 2, locks
    assert "/x\\n21:20:00.000  user:root  deleted  /report.md  lease exclusive  user:root" in locks
    recent = status.split("recent changes:\n", 1)[1].splitlines()
    assert len(recent) == 10 and all(HUMAN_LINE.match(line.strip()) for line in recent), status
    exact = json.loads(deskfs("locks", "--json", cwd=ws.mnt, env=base_env()).stdout)
    assert sorted(h["path"] for h in exact) == sorted([str(forge_folder / "report.md"), str(ws.mnt / HOSTILE[1])])


# -- 10. refused requests -----------------------------------------------------------------------


def test_refusals_are_journaled_with_their_errno(shared_ws, users):
    ws = shared_ws
    mnt = ws.mnt
    f = mnt / "shared.txt"
    as_agent("alice", "open('shared.txt', 'w').write('v1'); import os; os.chmod('shared.txt', 0o666)", mnt)
    assert run(["setfattr", "-n", LOCK, "-v", "exclusive", str(f)], cwd="/", env=agent_env("alice")).returncode == 0

    # Another agent's write under alice's lease: EBUSY.
    out = try_write("bob", "shared.txt", mnt)
    assert out.stdout.strip() == "16"

    # A member who is not the owner may not break the lease: EPERM.
    deskfs("invite", "user:deskfs-u1", "--role", "editor", cwd=mnt, env=base_env())
    u1 = users["deskfs-u1"]
    broke = run(command_as("deskfs-u1", *user_deskfs("deskfs-u1"), "unlock", "--force", str(f)), cwd="/",
                check=False)
    assert broke.returncode == 1, broke.stdout + broke.stderr
    one_line(broke)

    # Claiming root's agent from another Unix user: an impersonation, and u1 acts as itself.
    claimed = run(command_as("deskfs-u1", "/usr/bin/python3", "-c",
                             f"open({str(mnt / 'u1-made.txt')!r}, 'w').write('u1')", agent="alice"), cwd="/")
    assert claimed.returncode == 0
    assert os.stat(mnt / "u1-made.txt").st_uid == u1.pw_uid

    denied = wait_log(ws, lambda rs: has(rs, op="impersonate"), "the impersonation", "--denied")
    by_op = {}
    for r in denied:
        by_op.setdefault(r["op"], []).append(r)
    assert set(by_op) == {"write", "lock_break", "impersonate"}, [key(r) for r in denied]
    [busy] = by_op["write"]
    assert key(busy) == ("agent:bob", "write", "/shared.txt", None, 16)
    assert busy["details"]["locked_by"].startswith("lease exclusive agent:alice")
    [breaking] = by_op["lock_break"]
    assert key(breaking) == ("user:deskfs-u1", "lock_break", "/shared.txt", None, 1)
    assert breaking["uid"] == u1.pw_uid
    for r in by_op["impersonate"]:
        assert (r["principal"], r["errno"], r["uid"]) == ("user:deskfs-u1", 1, u1.pw_uid)
        assert r["details"] == {"claimed": "agent:alice", "via": "DESKFS_AGENT"}
    assert all(r["denied"] for r in denied)

    # The lease held, and what u1 did is u1's.
    holders = run(["getfattr", "--only-values", "-n", LOCK, str(f)], cwd="/").stdout
    assert holders.startswith("lease exclusive agent:alice")
    made = wait_log(ws, lambda rs: has(rs, op="close_write"), "u1's close_write", "--path", "/u1-made.txt")
    assert {(r["op"], r["principal"], r["uid"]) for r in made if r["op"] in ("create", "close_write")} == {
        ("create", "user:deskfs-u1", u1.pw_uid), ("close_write", "user:deskfs-u1", u1.pw_uid)}
    assert not any(r["principal"] == "agent:alice" for r in made)
    human = deskfs("log", "--denied", "--limit", "0", cwd=mnt, env=base_env()).stdout
    assert "user:deskfs-u1  DENIED impersonate" in human and "(EPERM" in human
    [busy_line] = [line for line in human.splitlines() if "DENIED write" in line]
    assert busy_line.endswith(f"  agent:bob  DENIED write  /shared.txt  (EBUSY: locked_by {busy['details']['locked_by']})")
    assert "writes" not in busy_line, busy_line


# -- 10b. reading the tree is journaled only when refused ----------------------------------------


# Run as deskfs-u1: open a folder, a file and a symlink while a viewer and read through them; then, once
# told (after its removal from the workspace), try each read-only operation once, each reaching the
# daemon as exactly that request: the descriptors were opened before, getdents64 and readlinkat(fd, "")
# need no lookup, a security.* xattr needs no permission check, and the mount's root is anyone's to stat.
READ_ONLY_TRIES = textwrap.dedent(
    """
    import ctypes, errno, json, os, platform, sys
    m = sys.argv[1]
    box = os.open(m + "/box", os.O_RDONLY | os.O_DIRECTORY)
    f = os.open(m + "/box/f.txt", os.O_RDONLY)
    link = os.open(m + "/box/link", os.O_PATH | os.O_NOFOLLOW)
    libc = ctypes.CDLL(None, use_errno=True)

    def getdents(fd):
        os.lseek(fd, 0, os.SEEK_SET)
        buf = ctypes.create_string_buffer(65536)
        n = libc.syscall({"x86_64": 217, "aarch64": 61}[platform.machine()], fd, buf, 65536)
        if n < 0:
            raise OSError(ctypes.get_errno(), "getdents64")
        return n

    tries = {
        "lookup": lambda: os.stat(m + "/never-named"),
        "getattr": lambda: os.fstat(f),
        "readlink": lambda: os.readlink("", dir_fd=link),
        "opendir": lambda: os.close(os.open(m, os.O_RDONLY | os.O_DIRECTORY)),
        "readdir": lambda: getdents(box),
        "getxattr": lambda: os.getxattr(f, "security.deskfs-test"),
        "listxattr": lambda: os.listxattr(f),
    }
    as_viewer = [os.fstat(f).st_size, sorted(os.listdir(m + "/box")), os.readlink("", dir_fd=link),
                 os.getxattr(f, "user.note").decode(), sorted(os.listxattr(f)), getdents(box) > 0]
    print(json.dumps(as_viewer), flush=True)
    sys.stdin.readline()
    outcome = {}
    for op, attempt in tries.items():
        try:
            attempt()
            outcome[op] = "OK"
        except OSError as e:
            outcome[op] = errno.errorcode[e.errno]
    print(json.dumps(outcome), flush=True)
    """
)


def test_reading_the_tree_is_journaled_only_when_refused(shared_ws, users, procs):
    ws = shared_ws
    mnt = ws.mnt
    as_agent("reader", """
        import os
        os.mkdir("box")
        os.chmod("box", 0o777)
        open("box/f.txt", "w").write("text")
        os.chmod("box/f.txt", 0o666)
        os.setxattr("box/f.txt", "user.note", b"hi")
        os.symlink("f.txt", "box/link")
        # A member reads: none of it is journaled.
        os.stat("box/f.txt"); os.lstat("box/link"); os.listdir("box"); os.readlink("box/link")
        os.getxattr("box/f.txt", "user.note"); os.listxattr("box/f.txt")
    """, mnt)
    wait_log(ws, lambda rs: has(rs, op="close_write", path="/box/f.txt"), "f.txt's close_write")
    deskfs("invite", "user:deskfs-u1", "--role", "viewer", cwd=mnt, env=base_env())

    u1 = subprocess.Popen(command_as("deskfs-u1", "/usr/bin/python3", "-c", READ_ONLY_TRIES, str(mnt)),
                          cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(u1)
    out = Lines(u1.stdout)
    line = out.next(20)
    assert line is not None, u1.stderr.read().decode()
    assert json.loads(line) == [4, ["f.txt", "link"], "f.txt", "hi", ["user.note"], True]
    # Everything so far was allowed: the seven operations are valid --op names with nothing to show.
    allowed = log(ws, "--op", ",".join(READ_ONLY_OPS))
    assert allowed == [], [key(r) for r in allowed]

    deskfs("remove", "user:deskfs-u1", cwd=mnt, env=base_env())
    removed = log(ws, "--op", "remove")[-1]
    u1.stdin.write(b"go\n")
    u1.stdin.flush()
    line = out.next(20)
    assert line is not None, u1.stderr.read().decode()
    assert json.loads(line) == {op: "EACCES" for op in READ_ONLY_OPS}
    assert u1.wait(timeout=10) == 0

    # Listing the root is refused by the kernel itself (to a non-member the root has no read bits:
    # docs/security.md), so it never reaches the daemon; the other six are the daemon's refusals.
    expected = {("lookup", "/never-named"), ("getattr", "/box/f.txt"), ("readlink", "/box/link"),
                ("readdir", "/box"), ("getxattr", "/box/f.txt"), ("listxattr", "/box/f.txt")}
    refused = wait_log(ws, lambda rs: {(r["op"], r["path"]) for r in rs} >= expected, "the six refusals",
                       "--op", ",".join(READ_ONLY_OPS))
    assert {(r["op"], r["path"]) for r in refused} == expected, [key(r) for r in refused]
    for r in refused:
        assert (r["principal"], r["uid"], r["errno"], r["denied"]) == \
            ("user:deskfs-u1", users["deskfs-u1"].pw_uid, 13, True), r
        assert r["details"] == {"role": "none"} and r["seq"] > removed["seq"], r
    assert log(ws, "--denied", "--op", ",".join(READ_ONLY_OPS)) == refused
    human = deskfs("log", "--op", "opendir,readlink", "--limit", "0", cwd=mnt, env=base_env()).stdout.splitlines()
    assert [line.split("  ", 1)[1] for line in human] == [  # tried in this order
        "user:deskfs-u1  DENIED readlink  /box/link  (EACCES: role none)"], human


# -- 11. what a non-owner may read --------------------------------------------------------------


def test_viewer_sees_only_records_of_paths_it_may_read(shared_ws, users):
    ws = shared_ws
    mnt = ws.mnt
    as_agent("writer", """
        import os
        os.mkdir("public")
        open("public/a.txt", "w").write("for everyone")
        os.mkdir("secret", 0o700)
        os.chmod("secret", 0o700)
        open("secret/b.txt", "w").write("root only")
        os.rename("secret/b.txt", "secret/c.txt")
    """, mnt)
    deskfs("invite", "user:deskfs-u1", "--role", "viewer", cwd=mnt, env=base_env())
    read = run(command_as("deskfs-u1", "cat", str(mnt / "public/a.txt")), cwd="/")
    assert read.stdout == "for everyone"
    assert run(command_as("deskfs-u1", "ls", str(mnt / "secret")), cwd="/", check=False).returncode != 0

    full = wait_log(ws, lambda rs: len([r for r in rs if r["op"] == "close_write"]) == 2, "both close_writes")
    assert has(full, path="/secret/b.txt", op="create") and has(full, op="rename", path2="/secret/c.txt")
    u1_log = run(command_as("deskfs-u1", *user_deskfs("deskfs-u1"), "log", "--json", "--limit", "0", "--mount",
                            str(mnt)), cwd="/")
    seen = [json.loads(line) for line in u1_log.stdout.splitlines()]
    assert has(seen, principal="agent:writer", op="create", path="/public/a.txt")
    assert has(seen, principal="agent:writer", op="mkdir", path="/public")
    assert has(seen, principal="user:deskfs-u1", op="open", path="/public/a.txt")
    # The workspace's own events (membership, mounts) are every member's; others' pathless records are not.
    workspace_ops = {"invite", "role", "remove", "leave", "transfer", "accept_transfer", "cancel_transfer",
                     "config", "mount", "unmount", "fsck", "prune"}
    assert has(seen, principal="user:root", op="invite") and has(seen, principal="deskfs", op="mount")
    for r in seen:
        assert not any(p and p.startswith("/secret") for p in (r["path"], r["path2"])), r
        assert r["principal"] == "user:deskfs-u1" or r["path"] is not None or r["op"] in workspace_ops, r
    # Exactly the records of readable paths (and its own): nothing readable was held back either.
    readable = [r for r in full if r["principal"] == "user:deskfs-u1"
                or (r["path"] is None and r["op"] in workspace_ops and r["errno"] is None)
                or (r["path"] is not None and not (r["path"] + "/").startswith("/secret/")
                    and not (r["path2"] or "").startswith("/secret"))]
    assert [r["seq"] for r in seen if r["seq"] <= full[-1]["seq"]] == [r["seq"] for r in readable]
    filtered = run(command_as("deskfs-u1", *user_deskfs("deskfs-u1"), "log", "--json", "--limit", "0", "--mount",
                              str(mnt), "--path", "secret/**"), cwd="/")
    assert filtered.stdout == ""
    refused = run(command_as("deskfs-u1", *user_deskfs("deskfs-u1"), "log", "--verify", "--mount", str(mnt)),
                  cwd="/", check=False)
    assert refused.returncode == 1
    one_line(refused)

