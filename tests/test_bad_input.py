"""Bad input gets the exact errno (on the mount) or a one-line error and the right exit status (CLI).

Also a full disk under the store: the writer gets ENOSPC, the store stays consistent, and the mount
works again once space is freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import DESKFS, PY, RENAMEAT2, Workspace, deskfs, outcome, run, workspace_on_a_tiny_disk


# -- errnos on the mount ---------------------------------------------------------------------

LONG = "n" * 256
LONG_UTF8 = "é" * 128  # 128 characters, 256 bytes: the limit counts bytes


def test_name_over_255_bytes_is_enametoolong(ws):
    run("touch f && mkdir d", cwd=ws.mnt)
    for long in (LONG, LONG_UTF8):
        assert outcome(f"os.open({long!r}, os.O_CREAT | os.O_WRONLY)", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.mkdir({long!r})", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.rename('f', {long!r})", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.rename('d', 'd/../' + {long!r})", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.link('f', {long!r})", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.symlink('f', {long!r})", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.mkfifo({long!r})", ws.mnt) == "ENAMETOOLONG"
        assert outcome(f"os.stat({long!r})", ws.mnt) == "ENAMETOOLONG"
    assert sorted(os.listdir(ws.mnt)) == ["d", "f"]
    # 255 bytes is allowed
    assert outcome(f"os.rename('f', {'n' * 255!r}); os.mkdir({'é' * 127 + 'x'!r})", ws.mnt) == "OK"
    assert sorted(os.listdir(ws.mnt)) == sorted(["d", "n" * 255, "é" * 127 + "x"])


def test_rmdir_of_a_non_empty_folder_is_enotempty(ws):
    run("mkdir -p full/sub empty other && touch other/f", cwd=ws.mnt)
    assert outcome("os.rmdir('full')", ws.mnt) == "ENOTEMPTY"
    assert outcome("os.rmdir('other')", ws.mnt) == "ENOTEMPTY"
    assert outcome("os.rename('empty', 'other')", ws.mnt) == "ENOTEMPTY"  # replacing a non-empty folder
    assert sorted(os.listdir(ws.mnt)) == ["empty", "full", "other"]
    assert os.listdir(ws.mnt / "full") == ["sub"] and os.listdir(ws.mnt / "other") == ["f"]
    assert outcome("os.rmdir('full/sub'); os.rmdir('full')", ws.mnt) == "OK"


def test_rename_of_a_folder_into_its_own_subtree_is_einval(ws):
    run("mkdir -p a/b/c && touch a/b/c/f", cwd=ws.mnt)
    assert outcome("os.rename('a', 'a/b/c/a')", ws.mnt) == "EINVAL"
    assert outcome("os.rename('a', 'a/x')", ws.mnt) == "EINVAL"
    assert outcome("os.rename('a/b', 'a/b/c/b')", ws.mnt) == "EINVAL"
    assert outcome(RENAMEAT2 + "renameat2('a', 'a/b/c', 2)", ws.mnt) == "EINVAL"  # RENAME_EXCHANGE
    assert run(["find", "."], cwd=ws.mnt).stdout.split() == [".", "./a", "./a/b", "./a/b/c", "./a/b/c/f"]


def test_xattr_value_over_64_kib_is_e2big(ws):
    run("touch f", cwd=ws.mnt)
    assert outcome("os.setxattr('f', 'user.big', b'v' * (64 * 1024 + 1))", ws.mnt) == "E2BIG"
    assert outcome("os.getxattr('f', 'user.big')", ws.mnt) == "ENODATA"
    assert outcome("os.setxattr('f', 'user.max', b'v' * (64 * 1024))", ws.mnt) == "OK"
    assert outcome("assert os.getxattr('f', 'user.max') == b'v' * 65536", ws.mnt) == "OK"


def test_unknown_xattr_namespace_is_eopnotsupp(ws):
    run("touch f", cwd=ws.mnt)
    assert outcome("os.setxattr('f', 'foo.bar', b'1')", ws.mnt) == "EOPNOTSUPP"
    assert outcome("os.getxattr('f', 'foo.bar')", ws.mnt) == "EOPNOTSUPP"
    assert outcome("os.removexattr('f', 'foo.bar')", ws.mnt) == "EOPNOTSUPP"
    assert outcome("os.setxattr('f', 'userx', b'1')", ws.mnt) == "EOPNOTSUPP"
    assert outcome("print(os.listxattr('f'))", ws.mnt) == "OK"
    assert run([PY, "-c", "import os; print(os.listxattr('f'))"], cwd=ws.mnt).stdout.strip() == "[]"


# -- a full disk under the store ---------------------------------------------------------------


@pytest.fixture
def tiny_ws(tmp_path):
    """A mounted workspace whose store lives on a 64 MiB tmpfs."""
    with workspace_on_a_tiny_disk(tmp_path, ExitWaitingWorkspace) as ws:
        yield ws


class ExitWaitingWorkspace(Workspace):
    """Unmounting also waits for the daemon's exit: until then its log keeps the tmpfs busy."""

    def unmount(self) -> None:
        pid = self.daemon_pid
        super().unmount()
        wait_for_exit(pid)

    def cleanup(self) -> None:
        pid = self.daemon_pid if self.mounted else None
        super().cleanup()
        if pid is not None:
            wait_for_exit(pid)


def wait_for_exit(pid: int) -> None:
    """Block until process `pid` (not our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], 60)
    finally:
        os.close(fd)


FILL = """
import errno, os, sys
fd = os.open('big', getattr(os, sys.argv[1]) | os.O_CREAT, 0o644)
chunk, total = b'z' * (1 << 20), 0
try:
    while total < 256 << 20:
        total += os.write(fd, chunk)
    print('no ENOSPC', total)
except OSError as e:
    print(errno.errorcode[e.errno], total)
os.close(fd)
"""


def fill_disk(ws: Workspace, mode: str = "O_WRONLY") -> int:
    """Write `big` until the writer is refused; asserts it is refused with ENOSPC; returns bytes written."""
    code, written = run([PY, "-c", FILL, mode], cwd=ws.mnt).stdout.split()
    assert code == "ENOSPC"
    assert int(written) > 30 << 20  # most of the 64 MiB was usable
    return int(written)


def write_earlier_files(ws: Workspace) -> dict[str, str]:
    hashes = {}
    for i in range(3):
        body = os.urandom(700_000 + i)
        (ws.mnt / f"early-{i}").write_bytes(body)
        hashes[f"early-{i}"] = hashlib.sha256(body).hexdigest()
    return hashes


def hashes_of(ws: Workspace, names) -> dict[str, str]:
    return {name: hashlib.sha256((ws.mnt / name).read_bytes()).hexdigest() for name in names}


def test_full_disk_gives_the_writer_enospc_and_leaves_the_store_consistent(tiny_ws):
    ws = tiny_ws
    earlier = write_earlier_files(ws)
    written = fill_disk(ws)
    assert (ws.mnt / "big").stat().st_size == written
    # Metadata still changes while the disk is full (the database has its reserve).
    run("mkdir after-full && mv early-2 after-full/early-2 && mv after-full/early-2 .", cwd=ws.mnt)
    assert outcome("os.write(os.open('more', os.O_WRONLY | os.O_CREAT), b'x' * (4 << 20))", ws.mnt) == "ENOSPC"
    ws.unmount()
    result = deskfs("fsck", str(ws.store))
    assert result.stdout.strip().splitlines()[-1] == f"{ws.store}: clean, nothing to repair"
    ws.mount()
    assert hashes_of(ws, earlier) == earlier
    assert (ws.mnt / "big").stat().st_size == written
    assert (ws.mnt / "big").read_bytes() == b"z" * written
    assert sorted(os.listdir(ws.mnt)) == sorted([*earlier, "after-full", "big", "more"])


def test_full_disk_mount_works_again_once_space_is_freed(tiny_ws):
    ws = tiny_ws
    earlier = write_earlier_files(ws)
    fill_disk(ws, "O_RDWR")  # through the page cache this time
    run(["rm", "big"], cwd=ws.mnt)
    body = os.urandom(20 << 20)
    (Path(ws.mnt.parent.parent) / "body").write_bytes(body)  # outside the tiny disk
    run(["cp", str(ws.mnt.parent.parent / "body"), "again"], cwd=ws.mnt)
    assert hashes_of(ws, ["again"]) == {"again": hashlib.sha256(body).hexdigest()}
    assert hashes_of(ws, earlier) == earlier
    written = fill_disk(ws)  # and the whole free space can be used again
    assert written > 10 << 20
    ws.unmount()
    assert deskfs("fsck", str(ws.store)).stdout.strip().endswith("clean, nothing to repair")


# -- CLI errors ------------------------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess, exit_code: int, *fragments: str) -> None:
    assert result.returncode == exit_code, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deskfs: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_mounting_a_store_that_is_already_mounted_is_refused(ws, tmp_path):
    (ws.mnt / "f").write_text("still here")
    other = tmp_path / "other-mnt"
    other.mkdir()
    result = deskfs("mount", str(ws.store), str(other), check=False)
    assert_one_line_error(result, 1, "already in use")
    assert run(["findmnt", "-n", str(other)], cwd="/", check=False).returncode != 0  # nothing mounted there
    assert (ws.mnt / "f").read_text() == "still here"  # the running mount is untouched
    # Its own mountpoint again: refused too.
    assert_one_line_error(deskfs("mount", str(ws.store), str(ws.mnt), check=False), 1, "already")


def test_mountpoint_that_is_not_an_empty_folder_is_refused(make_workspace, tmp_path):
    ws = make_workspace("ws", False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert_one_line_error(deskfs("mount", str(ws.store), str(full), check=False), 1, "not empty")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(deskfs("mount", str(ws.store), str(tmp_path / "file"), check=False), 1, "not a folder")
    assert_one_line_error(deskfs("mount", str(ws.store), str(tmp_path / "missing"), check=False), 1,
                          "does not exist")
    assert os.listdir(full) == ["x"]
    ws.mount()  # the refusals left the store mountable, and clean
    ws.unmount()
    assert deskfs("fsck", str(ws.store)).stdout.strip().endswith("clean, nothing to repair")


def test_store_that_does_not_exist_is_refused(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = deskfs("mount", str(tmp_path / "nowhere"), str(tmp_path / "mnt"), check=False)
    assert_one_line_error(result, 1, "no deskfs store")
    (tmp_path / "plain").mkdir()
    result = deskfs("mount", str(tmp_path / "plain"), str(tmp_path / "mnt"), check=False)
    assert_one_line_error(result, 1, "not a deskfs store")
    assert_one_line_error(deskfs("fsck", str(tmp_path / "nowhere"), check=False), 1, "no deskfs store")
    assert os.listdir(tmp_path / "plain") == []


def test_store_of_a_newer_format_is_refused(make_workspace):
    ws = make_workspace("ws", False)
    db = str(ws.store / "deskfs.db")
    run(["sqlite3", db, "UPDATE settings SET value='2' WHERE key='format_version'"], cwd="/")
    assert_one_line_error(deskfs("mount", str(ws.store), str(ws.mnt), check=False), 1, "newer")
    assert_one_line_error(deskfs("fsck", str(ws.store), check=False), 1, "newer")
    assert os.listdir(ws.mnt) == []
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT key, value FROM settings WHERE key IN ('clean', 'format_version')"
                            " ORDER BY key").fetchall() == [("clean", "1"), ("format_version", "2")]
    finally:
        conn.close()
    run(["sqlite3", db, "UPDATE settings SET value='1' WHERE key='format_version'"], cwd="/")
    assert "fsck repaired" not in ws.mount().stdout


def test_unmount_of_a_folder_that_is_not_a_mount_is_refused(ws, tmp_path):
    (tmp_path / "plain").mkdir()
    assert_one_line_error(deskfs("unmount", str(tmp_path / "plain"), check=False), 1, "not a deskfs mount")
    assert_one_line_error(deskfs("unmount", str(tmp_path / "missing"), check=False), 1, "not a deskfs mount")
    assert_one_line_error(deskfs("unmount", "/", check=False), 1, "not a deskfs mount")
    (ws.mnt / "f").write_text("x")  # the real mount is untouched
    assert (ws.mnt / "f").read_text() == "x"


@pytest.mark.parametrize("args", [
    ["frobnicate"],
    [],
    ["--bogus"],
    ["mount", "--bogus", "a", "b"],
    ["mount", "only-one"],
    ["unmount"],
    ["status", "--json", "extra"],
    ["fsck", "a", "b"],
])
def test_unknown_command_or_flag_exits_2(args, tmp_path):
    result = deskfs(*args, check=False, cwd=tmp_path)
    assert_one_line_error(result, 2)
    assert result.stdout == ""
    assert os.listdir(tmp_path) == []


def test_a_dead_mount_is_named_and_cleared_by_unmount(ws):
    run([PY, "-c", "import os; f = open('kept', 'w'); f.write('still here\\n'); f.flush(); os.fsync(f.fileno())"],
        cwd=ws.mnt)
    os.kill(ws.daemon_pid, signal.SIGKILL)
    ws.wait_daemon_gone()
    assert_one_line_error(deskfs("mount", str(ws.store), str(ws.mnt), check=False), 1,
                          "daemon is gone", "deskfs unmount")
    deskfs("unmount", str(ws.mnt))
    ws.mounted = False
    ws.mount()  # runs fsck first: the store was not closed cleanly
    assert (ws.mnt / "kept").read_text() == "still here\n"


# -- numbers and times the CLI takes ----------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--since", "99999999999d"],
    ["--until", "99999999999d"],
    ["--since", "9" * 400 + "s"],  # a float() of it is infinite
    ["--since", "300y"],
    ["--until", "9999-12-31T23:59"],  # past 2262: no 64-bit count of ns since the epoch holds it
    ["--since", "1000-01-01"],
    ["--until", "0001-01-01"],
    ["--since", "nan"],
    ["--limit", "99999999999999999999999"],
    ["--limit", "9223372036854775808"],
    ["--limit", "1000000001"],
    ["--limit", "-1"],
    ["--limit", "1e3"],
])
def test_log_numbers_and_times_out_of_range_are_one_line_usage_errors(args, ws):
    for where in (["--mount", str(ws.mnt)], ["--store", str(ws.store)]):  # the daemon, or the store read directly
        if where[0] == "--store":
            ws.unmount()
        result = deskfs("log", *where, *args, check=False, cwd="/")
        assert_one_line_error(result, 2, "--" + args[0].lstrip("-"))
        assert result.stdout == ""
    ws.mount()
    # The limits themselves are fine.
    for fine in (["--since", "292w"], ["--until", "2262-01-01"], ["--since", "1678-01-01"], ["--limit", "1000000000"]):
        assert deskfs("log", *fine, cwd=ws.mnt).returncode == 0, fine


def test_log_path_with_a_byte_that_is_not_utf8_matches_that_name(ws):
    secret = os.fsencode(str(ws.mnt)) + b"/\xffpriv"
    os.mkdir(secret)
    with open(secret + b"/f.txt", "w") as f:
        f.write("x")
    (ws.mnt / "other.txt").write_text("y")
    folder = os.open(ws.mnt, os.O_RDONLY)
    try:
        os.fsync(folder)  # the journal's records so far are committed before this returns
    finally:
        os.close(folder)

    def paths(*args: bytes | str, cwd: str | bytes = ws.mnt) -> set[str]:
        result = subprocess.run([DESKFS, "log", "--json", "--limit", "0", *args], cwd=cwd, capture_output=True)
        assert result.returncode == 0 and result.stderr == b"", result
        return {json.loads(line)["path"] for line in result.stdout.splitlines()}

    # The journal keeps the name as text with a backslash escape; the byte in a pattern finds it.
    assert paths("--path", b"/\xffpriv/**") == {"/\\xffpriv/f.txt"}
    assert paths("--path", b"\xff*") == {"/\\xffpriv", "/\\xffpriv/f.txt"}
    assert paths("--path", b"*.txt", cwd=secret) == {"/\\xffpriv/f.txt"}
    assert paths("--path", b"/\xff") == set()  # a byte alone names no path here, and is no error
    ws.unmount()
    assert paths("--store", str(ws.store), "--path", b"/\xffpriv/f.txt", cwd="/") == {"/\\xffpriv/f.txt"}
    ws.mount()


@pytest.mark.parametrize("args", [
    ["--wait", "nan"], ["--wait", "-1"], ["--wait", "-0.5"], ["--wait", "inf"], ["--wait", "1e400"],
    ["--wait=nan"], ["--wait=-1"], ["--wait=infinity"],
    ["--ttl", "0"], ["--ttl", "-5"], ["--ttl", "86401"], ["--ttl", "99999999999999999999"], ["--ttl", "nan"],
    ["--ttl", "1.5"],
])
def test_lock_wait_and_ttl_must_be_finite_and_in_range(args, ws):
    (ws.mnt / "f").write_text("x")
    result = deskfs("lock", "f", *args, check=False, cwd=ws.mnt, timeout=30)
    assert_one_line_error(result, 2, args[0].split("=")[0])
    assert "lock" not in {r["op"] for r in map(json.loads, deskfs("log", "--json", cwd=ws.mnt).stdout.splitlines())}


def test_lock_wait_alone_still_waits_until_the_lease_is_free(ws):
    (ws.mnt / "f").write_text("x")
    holder, waiter = dict(os.environ, DESKFS_AGENT="holder"), dict(os.environ, DESKFS_AGENT="waiter")
    deskfs("lock", "f", cwd=ws.mnt, env=holder)
    busy = deskfs("lock", "f", "--wait", "0", check=False, cwd=ws.mnt, env=waiter, timeout=30)
    assert_one_line_error(busy, 1, "is locked by", "agent:holder", "waited 0 s")
    waiting = subprocess.Popen([DESKFS, "lock", "--wait", "f"], cwd=ws.mnt, env=waiter,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deskfs("unlock", "f", cwd=ws.mnt, env=holder)
        assert waiting.wait(timeout=30) == 0, waiting.stderr.read()
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert run(["getfattr", "-n", "user.deskfs.lock", "--only-values", "f"], cwd=ws.mnt).stdout.startswith(
        "lease exclusive agent:waiter")
