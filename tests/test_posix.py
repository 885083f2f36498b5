"""POSIX behaviour of the mount, one behaviour per test, driven from separate processes.

Tools (ln, mkfifo, mknod, truncate, setfattr, ...) and short `python3 -c` snippets act on the mount;
snippets report an errno by name so a test can assert the exact error. Tests that need other Unix users
mount with --allow-other and run commands as deskfs-t1 / deskfs-t2 (created once per session).
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import (DESKFS, PY, RENAMEAT2, Workspace, as_user, command_as, outcome, py, run,
                      shared_workspace, unix_users, wait_until, workspace_on_a_tiny_disk)

TEST_USERS = ("deskfs-t1", "deskfs-t2")


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def users() -> list[pwd.struct_passwd]:
    """Two unprivileged Unix users, created if missing (idempotent, also across sessions)."""
    return list(unix_users(*TEST_USERS).values())


def sh(cmd: str, cwd: Path, user: pwd.struct_passwd | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run([*as_user(user), "sh", "-c", cmd], cwd=cwd, check=check)


def stat_of(path: Path, fmt: str) -> str:
    """`stat -c FMT` in a separate process."""
    return run(["stat", "-c", fmt, str(path)], cwd="/").stdout.strip()


def unmount(mnt: Path) -> None:
    """Unmount a mount made outside the Workspace helper, by force if need be (a test's cleanup)."""
    if run([DESKFS, "unmount", str(mnt)], cwd="/", check=False).returncode != 0:
        run(["fusermount3", "-uz", str(mnt)], cwd="/", check=False)


def wait_until_freed(store: Path, ino: int, timeout: float = 10.0) -> None:
    """Wait for the body of a freed file to go. It is deleted right after the commit that forgets the file
    (within the 50 ms commit window: before it, a crash would leave a name without its content), and the
    kernel sends the release and forget that free it after the last close, asynchronously."""
    wait_until(lambda: ino not in objects_of(store), timeout, f"the body of inode {ino} to go")


def objects_of(store: Path) -> set[int]:
    """Inode numbers that have a backing file in the store."""
    return {int(p.name) for p in (store / "objects").glob("*/*")}


@pytest.fixture
def shared(make_workspace, tmp_path, users):
    """A workspace mounted with --allow-other, reachable by other users, with a world-writable folder `pub`."""
    ws = shared_workspace(make_workspace, tmp_path, invite=TEST_USERS)
    run("mkdir pub && chmod 0777 pub", cwd=ws.mnt)
    return ws


# -- names, links and special files ----------------------------------------------------------


def test_hard_links_keep_nlink_right_across_link_and_unlink(ws):
    run("printf body > a && mkdir d", cwd=ws.mnt)
    assert stat_of(ws.mnt / "a", "%h") == "1"
    run(["ln", "a", "b"], cwd=ws.mnt)
    run(["ln", "a", "d/c"], cwd=ws.mnt)
    ino = stat_of(ws.mnt / "a", "%i")
    for name in ("a", "b", "d/c"):
        assert stat_of(ws.mnt / name, "%i %h") == f"{ino} 3"
    run(["rm", "a"], cwd=ws.mnt)
    assert stat_of(ws.mnt / "b", "%i %h") == f"{ino} 2"
    assert stat_of(ws.mnt / "d/c", "%h") == "2"
    run("printf more >> d/c", cwd=ws.mnt)
    assert run(["cat", "b"], cwd=ws.mnt).stdout == "bodymore"
    run(["rm", "b"], cwd=ws.mnt)
    assert stat_of(ws.mnt / "d/c", "%h %s") == "1 8"
    assert int(ino) in objects_of(ws.store)
    run(["rm", "d/c"], cwd=ws.mnt)
    wait_until_freed(ws.store, int(ino))
    assert stat_of(ws.mnt / "d", "%h") == "2"


def test_fifo_carries_data_from_a_writer_to_a_reader_process(ws, tmp_path):
    run(["mkfifo", "-m", "0600", "pipe"], cwd=ws.mnt)
    assert stat_of(ws.mnt / "pipe", "%F %a") == "fifo 600"
    with open(tmp_path / "received", "wb") as received:
        reader = subprocess.Popen(["cat", "pipe"], cwd=ws.mnt, stdout=received)
        try:
            run("seq 1 100000 > pipe", cwd=ws.mnt)  # the open blocks until the reader has the FIFO open
            assert reader.wait(timeout=30) == 0
        finally:
            reader.kill()
    assert (tmp_path / "received").read_text() == run("seq 1 100000", cwd="/").stdout
    assert stat_of(ws.mnt / "pipe", "%s") == "0"


def test_device_node_keeps_rdev_but_does_not_open_on_the_nodev_mount(ws):
    run(["mknod", "-m", "0666", "null", "c", "1", "3"], cwd=ws.mnt)
    assert stat_of(ws.mnt / "null", "%F %t %T %a") == "character special file 1 3 666"
    options = run(["findmnt", "-n", "-o", "OPTIONS", str(ws.mnt)], cwd="/").stdout.strip().split(",")
    assert "nodev" in options and "nosuid" in options
    assert outcome("os.open('null', os.O_WRONLY)", ws.mnt) == "EACCES"
    ws.unmount()
    ws.mount()
    assert stat_of(ws.mnt / "null", "%F %t %T") == "character special file 1 3"


# -- rename ------------------------------------------------------------------------------------


def test_rename_noreplace_refuses_an_existing_target(ws):
    run("printf A > a && printf B > b", cwd=ws.mnt)
    assert outcome(RENAMEAT2 + "renameat2('a', 'b', RENAME_NOREPLACE)", ws.mnt) == "EEXIST"
    assert (run(["cat", "a"], cwd=ws.mnt).stdout, run(["cat", "b"], cwd=ws.mnt).stdout) == ("A", "B")
    assert outcome(RENAMEAT2 + "renameat2('a', 'c', RENAME_NOREPLACE)", ws.mnt) == "OK"
    assert sorted(os.listdir(ws.mnt)) == ["b", "c"]
    assert run(["cat", "c"], cwd=ws.mnt).stdout == "A"


def test_rename_exchange_swaps_files_and_a_file_with_a_folder(ws):
    run("printf A > a && printf B > b && mkdir -p d/inner && printf X > d/inner/x && printf F > f", cwd=ws.mnt)
    ino_a, ino_b = stat_of(ws.mnt / "a", "%i"), stat_of(ws.mnt / "b", "%i")
    assert outcome(RENAMEAT2 + "renameat2('a', 'b', RENAME_EXCHANGE)", ws.mnt) == "OK"
    assert run("cat a b", cwd=ws.mnt).stdout == "BA"
    assert (stat_of(ws.mnt / "a", "%i"), stat_of(ws.mnt / "b", "%i")) == (ino_b, ino_a)
    # A file in the root and a folder one level down trade places: link counts of both folders follow.
    assert stat_of(ws.mnt, "%h") == "3" and stat_of(ws.mnt / "d", "%h") == "3"
    assert outcome(RENAMEAT2 + "renameat2('f', 'd/inner', RENAME_EXCHANGE)", ws.mnt) == "OK"
    assert stat_of(ws.mnt / "f", "%F") == "directory"
    assert run(["cat", "f/x"], cwd=ws.mnt).stdout == "X"
    assert stat_of(ws.mnt / "d/inner", "%F") == "regular file"
    assert run(["cat", "d/inner"], cwd=ws.mnt).stdout == "F"
    assert stat_of(ws.mnt, "%h") == "4" and stat_of(ws.mnt / "d", "%h") == "2"
    assert outcome(RENAMEAT2 + "renameat2('a', 'missing', RENAME_EXCHANGE)", ws.mnt) == "ENOENT"
    ws.unmount()
    ws.mount()
    assert run("cat a b f/x d/inner", cwd=ws.mnt).stdout == "BAXF"
    assert stat_of(ws.mnt, "%h") == "4" and stat_of(ws.mnt / "d", "%h") == "2"


def test_rename_replaces_an_existing_file_and_frees_its_body(ws):
    run("printf new > a && printf old-content > b", cwd=ws.mnt)
    ino_a, ino_b = int(stat_of(ws.mnt / "a", "%i")), int(stat_of(ws.mnt / "b", "%i"))
    assert ino_b in objects_of(ws.store)
    # A reader that has the replaced file open keeps reading the old content (the atomic-save pattern).
    reader = subprocess.Popen([PY, "-c", textwrap.dedent("""
        import os, sys
        fd = os.open('b', os.O_RDONLY)
        print('open', flush=True); sys.stdin.readline()
        print(os.pread(fd, 100, 0).decode(), os.fstat(fd).st_nlink, flush=True)
    """)], cwd=ws.mnt, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "open\n"
        run(["mv", "a", "b"], cwd=ws.mnt)
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline() == "old-content 0\n"
        assert reader.wait(timeout=30) == 0
    finally:
        reader.kill()
    assert sorted(os.listdir(ws.mnt)) == ["b"]
    assert run(["cat", "b"], cwd=ws.mnt).stdout == "new"
    assert int(stat_of(ws.mnt / "b", "%i")) == ino_a
    wait_until_freed(ws.store, ino_b)


# -- attributes ------------------------------------------------------------------------------


def test_chmod_and_chown_by_root(ws):
    run("printf x > f && mkdir d", cwd=ws.mnt)
    run("chown 1234:5678 f && chmod 4751 f && chown 42:43 d && chmod 1700 d", cwd=ws.mnt)
    assert stat_of(ws.mnt / "f", "%a %u %g") == "4751 1234 5678"
    assert stat_of(ws.mnt / "d", "%a %u %g") == "1700 42 43"
    run("touch g && chmod 6755 g && chown 7:8 g", cwd=ws.mnt)
    assert stat_of(ws.mnt / "g", "%a %u %g") == "755 7 8"  # chown of a file drops set-user/group-ID
    ws.unmount()
    ws.mount()
    assert stat_of(ws.mnt / "f", "%a %u %g") == "4751 1234 5678"
    assert stat_of(ws.mnt / "d", "%a %u %g") == "1700 42 43"
    assert stat_of(ws.mnt / "g", "%a %u %g") == "755 7 8"


def test_utimensat_keeps_nanosecond_times(ws):
    atime, mtime = 1_234_567_890_123_456_789, 1_600_000_000_987_654_321
    run("printf x > f && mkdir d", cwd=ws.mnt)
    py(f"import os; os.utime('f', ns=({atime}, {mtime})); os.utime('d', ns=({mtime}, {atime}))", ws.mnt)
    run(["touch", "-m", "-d", "2001-02-03 04:05:06.123456789 UTC", "g"], cwd=ws.mnt)
    expected_g = 981173106_123456789

    def times() -> list[int]:
        out = py("import os, json; print(json.dumps([(s.st_atime_ns, s.st_mtime_ns) for s in"
                 " map(os.stat, ('f', 'd', 'g'))]))", ws.mnt).stdout
        return json.loads(out)

    seen = times()
    assert seen[0] == [atime, mtime] and seen[1] == [mtime, atime] and seen[2][1] == expected_g
    run(["touch", "-a", "-d", "2020-01-01 00:00:00.5 UTC", "f"], cwd=ws.mnt)  # mtime: UTIME_OMIT
    seen = times()
    assert seen[0] == [1577836800_500000000, mtime]
    ws.unmount()
    ws.mount()
    assert times() == seen


def test_setgid_folder_passes_its_group_and_the_bit_to_new_entries(ws, users):
    group = users[0].pw_gid
    run(f"mkdir d && chgrp {group} d && chmod 2775 d", cwd=ws.mnt)
    run("touch d/f && mkdir d/sub && mkfifo d/p && mkdir plain && touch plain/f", cwd=ws.mnt)
    assert stat_of(ws.mnt / "d", "%a %g") == f"2775 {group}"
    assert stat_of(ws.mnt / "d/f", "%g") == str(group)
    assert stat_of(ws.mnt / "d/p", "%g") == str(group)
    mode, gid = stat_of(ws.mnt / "d/sub", "%a %g").split()
    assert int(mode, 8) & stat.S_ISGID and int(gid) == group
    run("touch d/sub/deeper", cwd=ws.mnt)
    assert stat_of(ws.mnt / "d/sub/deeper", "%g") == str(group)
    assert stat_of(ws.mnt / "plain/f", "%g") == "0"  # no setgid: the creator's group


def test_sticky_folder_keeps_others_from_deleting_a_file_they_do_not_own(shared, users):
    t1, t2 = users
    run("mkdir tmp && chmod 1777 tmp", cwd=shared.mnt)
    sh("echo mine > tmp/f1", cwd=shared.mnt, user=t1)
    assert stat_of(shared.mnt / "tmp/f1", "%U") == t1.pw_name
    assert outcome("os.unlink('tmp/f1')", shared.mnt, user=t2) in ("EPERM", "EACCES")
    assert outcome("os.rename('tmp/f1', 'tmp/stolen')", shared.mnt, user=t2) in ("EPERM", "EACCES")
    assert sorted(os.listdir(shared.mnt / "tmp")) == ["f1"]
    sh("touch tmp/f2 && rm tmp/f2", cwd=shared.mnt, user=t2)  # t2 may delete its own files
    assert outcome("os.unlink('tmp/f1')", shared.mnt, user=t1) == "OK"
    assert os.listdir(shared.mnt / "tmp") == []


def test_other_user_gets_eacces_on_a_0600_file(shared, users):
    t1, t2 = users
    sh("echo secret > pub/s && chmod 0600 pub/s", cwd=shared.mnt, user=t1)
    assert outcome("open('pub/s').read()", shared.mnt, user=t2) == "EACCES"
    assert outcome("open('pub/s', 'a').write('x')", shared.mnt, user=t2) == "EACCES"
    assert py("print(open('pub/s').read(), end='')", shared.mnt, user=t1).stdout == "secret\n"
    run("mkdir pub/closed && chmod 0700 pub/closed && touch pub/closed/f", cwd=shared.mnt)
    assert outcome("os.stat('pub/closed/f')", shared.mnt, user=t2) == "EACCES"


# -- set-ID bits cleared by a change of content ----------------------------------------------

# How a change of content reaches the file system: a write-only handle (the kernel sends it straight to
# deskfs, direct_io), a read-write one (through the page cache), an O_TRUNC open, truncate by path, ftruncate.
CHANGES = {
    "append": "fd = os.open(f, os.O_WRONLY | os.O_APPEND); os.write(fd, b'more'); os.close(fd)",
    "rdwr": "fd = os.open(f, os.O_RDWR); os.pwrite(fd, b'Y', 0); os.close(fd)",
    "otrunc": "os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))",
    "truncate": "os.truncate(f, 100)",
    "ftruncate": "fd = os.open(f, os.O_RDWR); os.ftruncate(fd, 1); os.close(fd)",
}
CHANGE_ALL = """
import os, sys
for f in sys.argv[1:]:
    exec(CHANGES[f.split('.')[-1]])
""".replace("CHANGES", repr(CHANGES))


def set_id_files(folder: Path, t1: pwd.struct_passwd) -> dict[str, int]:
    """One file per (case, change) in `folder`, made by root; {name: the mode an ext4 user expects after}."""
    cases = {  # case: (mode, owner uid, group gid, mode after t1 changed its content)
        "suid": (0o4777, 0, 0, 0o0777),
        "suid-sgid-gx": (0o6777, 0, 0, 0o0777),
        "sgid-gx": (0o2777, 0, 0, 0o0777),
        "sgid-not-member": (0o2767, 0, 0, 0o0767),  # t1 is not in group root: the kernel clears it too
        "sgid-member": (0o2767, 0, t1.pw_gid, 0o2767),  # no group-execute, and t1 is in the group: kept
        "own-suid": (0o4755, t1.pw_uid, t1.pw_gid, 0o0755),  # the owner's own change clears it as well
    }
    expected = {}
    for case, (mode, uid, gid, after) in cases.items():
        for change in CHANGES:
            name = f"{case}.{change}"
            (folder / name).write_bytes(b"content\n")
            os.chown(folder / name, uid, gid)
            os.chmod(folder / name, mode)
            expected[name] = after
    return expected


def modes(folder: Path, names) -> dict[str, int]:
    return {name: stat.S_IMODE(os.stat(folder / name).st_mode) for name in names}


def test_a_change_of_content_by_another_user_clears_set_id_bits_as_on_ext4(shared, users, tmp_path):
    t1 = users[0]
    plain = tmp_path / "plain"  # the same, in a folder of the store's own disk (ext4 here)
    plain.mkdir(mode=0o777)
    os.chmod(plain, 0o777)
    expected = set_id_files(shared.mnt / "pub", t1)
    set_id_files(plain, t1)
    for folder in (shared.mnt / "pub", plain):
        run([*as_user(t1), PY, "-c", CHANGE_ALL, *expected], cwd=folder)
    assert modes(plain, expected) == expected  # what ext4 does on this kernel
    assert modes(shared.mnt / "pub", expected) == expected
    # Root (CAP_FSETID) keeps the bits, on every path.
    for change in CHANGES:
        (shared.mnt / "pub" / f"root.{change}").write_bytes(b"content\n")
        os.chmod(shared.mnt / "pub" / f"root.{change}", 0o6777)
    run([PY, "-c", CHANGE_ALL, *(f"root.{change}" for change in CHANGES)], cwd=shared.mnt / "pub")
    assert set(modes(shared.mnt / "pub", (f"root.{c}" for c in CHANGES)).values()) == {0o6777}
    # The journal says who cleared them when deskfs did it itself (the kernel's own setattr says so too).
    records = [json.loads(line) for line in run(
        [DESKFS, "log", "--json", "--limit", "0", "--op", "setattr", "--principal",
         f"user:{t1.pw_name}"], cwd=shared.mnt).stdout.splitlines()]
    cleared = {r["path"]: r["details"] for r in records if (r["details"] or {}).get("cleared_by")}
    assert cleared["/pub/suid.append"] == {"mode": "0777", "cleared_by": "write"}
    assert cleared["/pub/suid.otrunc"] == {"mode": "0777", "cleared_by": "open"}
    shared.unmount()
    shared.mount("--allow-other")
    assert modes(shared.mnt / "pub", expected) == expected


def test_a_users_own_write_clears_its_set_id_bits_on_a_private_mount(users, open_tmp):
    """On a mount of the user's own (no --allow-other) the kernel caches attributes: it must not keep
    showing the bits deskfs cleared."""
    t1 = users[0]
    home = open_tmp / "own"
    home.mkdir()
    os.chown(home, t1.pw_uid, t1.pw_gid)
    run(command_as(t1.pw_name, DESKFS, "init", "store"), cwd=home)
    (home / "mnt").mkdir()
    os.chown(home / "mnt", t1.pw_uid, t1.pw_gid)
    run(command_as(t1.pw_name, DESKFS, "mount", "store", "mnt"), cwd=home)
    try:
        out = py("""
            import os, stat
            os.chdir('mnt')  # as the user: root cannot enter a mount without allow_other
            def mode(f): return oct(stat.S_IMODE(os.stat(f).st_mode))
            for f, m in (('a', 0o4755), ('b', 0o6750), ('c', 0o4700)):
                with open(f, 'w') as w: w.write('x')
                os.chmod(f, m)
            print(mode('a'), mode('b'), mode('c'))  # now in the kernel's attribute cache
            fd = os.open('a', os.O_WRONLY | os.O_APPEND); os.write(fd, b'y'); os.close(fd)
            os.close(os.open('b', os.O_WRONLY | os.O_TRUNC))
            fd = os.open('c', os.O_RDWR); os.write(fd, b'z'); os.close(fd)
            print(mode('a'), mode('b'), mode('c'))
        """, home, user=t1).stdout.split()
        assert out == ["0o4755", "0o6750", "0o4700", "0o755", "0o750", "0o700"]
    finally:
        unmount(home / "mnt")


# -- file bodies -----------------------------------------------------------------------------


def test_truncate_grows_with_zeros_and_shrinks(ws):
    run("printf hello > f && truncate -s 10000 f", cwd=ws.mnt)
    assert (ws.mnt / "f").read_bytes() == b"hello" + bytes(9995)
    run("truncate -s 3 f", cwd=ws.mnt)
    assert (ws.mnt / "f").read_bytes() == b"hel"
    run("truncate -s 10 f", cwd=ws.mnt)  # the shrink really dropped the old bytes
    assert (ws.mnt / "f").read_bytes() == b"hel" + bytes(7)
    ino = int(stat_of(ws.mnt / "f", "%i"))
    body = next((ws.store / "objects").glob(f"*/{ino}"))
    assert body.stat().st_size == 10


def test_ftruncate_grows_and_shrinks_an_open_file(ws):
    out = py("""
        import os
        fd = os.open('f', os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b'abcdefgh')
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
        os.ftruncate(fd, 6000)
        assert os.pread(fd, 6000, 0) == b'ab' + bytes(5998)
        os.ftruncate(fd, 4)
        os.pwrite(fd, b'Z', 10)
        print(os.pread(fd, 100, 0))
    """, ws.mnt).stdout.strip()
    assert out == repr(b"ab\0\0" + bytes(6) + b"Z")
    assert (ws.mnt / "f").read_bytes() == b"ab" + bytes(8) + b"Z"


def test_o_append_from_two_processes_loses_no_write(ws):
    (ws.mnt / "log").write_bytes(b"#" * 63 + b"\n")
    writer = """
        import os, sys
        tag = sys.argv[1]
        fd = os.open('log', os.O_WRONLY | os.O_APPEND)
        sys.stdin.readline()  # both start together
        for i in range(1500):
            assert os.write(fd, f'{tag} {i:06d}'.ljust(63).encode() + b'\\n') == 64
    """
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(writer), tag], cwd=ws.mnt, stdin=subprocess.PIPE)
             for tag in ("A", "B")]
    for proc in procs:
        proc.stdin.write(b"go\n")
        proc.stdin.close()
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    data = (ws.mnt / "log").read_bytes()
    assert len(data) == 64 * 3001
    records = [data[i:i + 64] for i in range(64, len(data), 64)]
    for tag in (b"A", b"B"):
        mine = [r for r in records if r.startswith(tag + b" ")]
        assert mine == [f"{tag.decode()} {i:06d}".ljust(63).encode() + b"\n" for i in range(1500)]


def test_o_trunc_empties_the_file_on_open(ws):
    (ws.mnt / "f").write_bytes(b"x" * 50_000)
    py("import os; fd = os.open('f', os.O_WRONLY | os.O_TRUNC); os.write(fd, b'ab'); os.close(fd)", ws.mnt)
    assert stat_of(ws.mnt / "f", "%s") == "2"
    assert (ws.mnt / "f").read_bytes() == b"ab"
    run(": > f", cwd=ws.mnt)
    assert stat_of(ws.mnt / "f", "%s") == "0"
    assert (ws.mnt / "f").read_bytes() == b""


def test_o_excl_refuses_an_existing_name(ws):
    run("touch there", cwd=ws.mnt)
    flags = "os.O_CREAT | os.O_EXCL | os.O_WRONLY"
    assert outcome(f"os.open('there', {flags})", ws.mnt) == "EEXIST"
    assert outcome(f"os.open('new', {flags})", ws.mnt) == "OK"
    assert outcome(f"os.open('new', {flags})", ws.mnt) == "EEXIST"
    # Racing creators: exactly one of them gets each name.
    racer = f"""
        import os
        won = 0
        for i in range(200):
            try:
                os.close(os.open(f'race-{{i}}', {flags}))
                won += 1
            except FileExistsError:
                pass
        print(won)
    """
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(racer)], cwd=ws.mnt, stdout=subprocess.PIPE)
             for _ in range(2)]
    assert sum(int(proc.communicate(timeout=60)[0]) for proc in procs) == 200


# -- extended attributes ---------------------------------------------------------------------


def test_user_xattrs_set_get_list_remove(ws):
    run("touch f && mkdir d", cwd=ws.mnt)
    run("setfattr -n user.color -v blue f && setfattr -n user.empty f && setfattr -n user.tag -v 0x00ff10 d",
        cwd=ws.mnt)
    assert run("getfattr --only-values -n user.color f", cwd=ws.mnt).stdout == "blue"
    assert py("import os; print(os.getxattr('d', 'user.tag').hex(), os.getxattr('f', 'user.empty'))",
              ws.mnt).stdout.split() == ["00ff10", "b''"]
    assert py("import os; print(sorted(os.listxattr('f')))", ws.mnt).stdout.strip() == "['user.color', 'user.empty']"
    run("setfattr -n user.color -v red f", cwd=ws.mnt)  # replace
    assert run("getfattr --only-values -n user.color f", cwd=ws.mnt).stdout == "red"
    run("setfattr -x user.color f", cwd=ws.mnt)
    assert outcome("os.getxattr('f', 'user.color')", ws.mnt) == "ENODATA"
    assert outcome("os.removexattr('f', 'user.color')", ws.mnt) == "ENODATA"
    assert outcome("os.setxattr('f', 'user.empty', b'v', os.XATTR_CREATE)", ws.mnt) == "EEXIST"
    assert outcome("os.setxattr('f', 'user.none', b'v', os.XATTR_REPLACE)", ws.mnt) == "ENODATA"
    ws.unmount()
    ws.mount()
    assert py("import os; print(os.listxattr('f'), os.listxattr('d'))", ws.mnt).stdout.strip() == \
        "['user.empty'] ['user.tag']"


def test_trusted_and_security_xattrs_work_for_root(ws):
    run("touch f", cwd=ws.mnt)
    run("setfattr -n trusted.owner -v alice f && setfattr -n security.label -v top f", cwd=ws.mnt)
    assert run("getfattr --only-values -n trusted.owner f", cwd=ws.mnt).stdout == "alice"
    assert run("getfattr --only-values -n security.label f", cwd=ws.mnt).stdout == "top"
    listed = run("getfattr --absolute-names -d -m - f", cwd=ws.mnt).stdout
    assert 'trusted.owner="alice"' in listed and 'security.label="top"' in listed
    run("setfattr -x trusted.owner f && setfattr -x security.label f", cwd=ws.mnt)
    assert py("import os; print(os.listxattr('f'))", ws.mnt).stdout.strip() == "[]"


def test_trusted_xattr_set_by_non_root_is_refused(shared, users):
    t1 = users[0]
    sh("touch pub/mine", cwd=shared.mnt, user=t1)
    assert outcome("os.setxattr('pub/mine', 'trusted.x', b'1')", shared.mnt, user=t1) == "EPERM"
    assert outcome("os.setxattr('pub/mine', 'user.x', b'1')", shared.mnt, user=t1) == "OK"
    run("setfattr -n trusted.by-root -v 1 pub/mine", cwd=shared.mnt)
    assert outcome("os.removexattr('pub/mine', 'trusted.by-root')", shared.mnt, user=t1) == "EPERM"
    # Unprivileged users neither see nor read trusted.* names.
    assert py("import os; print(os.listxattr('pub/mine'))", shared.mnt, user=t1).stdout.strip() == "['user.x']"
    assert outcome("os.getxattr('pub/mine', 'trusted.by-root')", shared.mnt, user=t1) == "ENODATA"
    assert run("getfattr --only-values -n trusted.by-root pub/mine", cwd=shared.mnt).stdout == "1"


# -- statfs and sizes ------------------------------------------------------------------------


def test_statfs_reports_the_store_disks_free_space_and_namemax_255(ws):
    code = ("import os, sys, json; s = os.statvfs(sys.argv[1]);"
            " print(json.dumps([s.f_frsize, s.f_blocks, s.f_bavail, s.f_namemax]))")
    mnt = json.loads(run([PY, "-c", code, str(ws.mnt)], cwd="/").stdout)
    disk = json.loads(run([PY, "-c", code, str(ws.store)], cwd="/").stdout)
    assert mnt[3] == 255
    assert mnt[0] * mnt[1] == disk[0] * disk[1]  # same total size
    free_mnt, free_disk, total = mnt[0] * mnt[2], disk[0] * disk[2], disk[0] * disk[1]
    # The mount shows the disk's free space less the reserve kept for the database (at most 64 MiB);
    # the slack covers other writers on the same disk between the two calls.
    assert 0 <= free_disk - free_mnt <= (64 << 20) + total // 100


SPARSE_FILES = """
import os
for size in (0, 1, 4096, 4097, 1 << 20):
    with open(f'w{size}', 'wb') as f:
        f.write(b'x' * size)
fd = os.open('sparse', os.O_WRONLY | os.O_CREAT, 0o644)  # a write far past the end leaves a hole
os.pwrite(fd, b'head', 0)
os.pwrite(fd, b'tail', 1 << 30)
os.close(fd)
fd = os.open('grown', os.O_RDWR | os.O_CREAT, 0o644)  # grown by ftruncate and truncate only
os.ftruncate(fd, 1 << 30)
os.close(fd)
os.truncate('grown', 5 << 30)
"""
SPARSE_NAMES = ("w0", "w1", "w4096", "w4097", "w1048576", "sparse", "grown")


def body_of(ws, name: str) -> Path:
    return next((ws.store / "objects").glob(f"*/{os.stat(ws.mnt / name).st_ino}"))


def test_st_blocks_tell_what_is_allocated_and_holes_read_back_as_zeros(ws, tmp_path):
    plain = tmp_path / "plain"  # the same files in a folder of the store's own disk
    plain.mkdir()
    for folder in (ws.mnt, plain):
        run([PY, "-c", SPARSE_FILES], cwd=folder)

    def blocks(folder: Path) -> dict[str, int]:
        out = run(["stat", "-c", "%n %b %s", *SPARSE_NAMES], cwd=folder).stdout.split()
        return {name: (int(b), int(s)) for name, b, s in zip(out[::3], out[1::3], out[2::3])}

    seen = blocks(ws.mnt)
    assert seen == blocks(plain)
    assert seen["sparse"][1] == (1 << 30) + 4 and 0 < seen["sparse"][0] <= 64  # two blocks, not a GiB
    assert seen["grown"] == (0, 5 << 30)
    assert seen["w0"] == (0, 0) and seen["w1048576"][0] >= 2048
    for name in SPARSE_NAMES[1:]:  # exactly what the backing file takes on disk
        assert seen[name][0] == body_of(ws, name).stat().st_blocks
    reads = """
        import os
        fd = os.open('sparse', os.O_RDONLY)
        assert os.pread(fd, 4, 0) == b'head' and os.pread(fd, 8, (1 << 30) - 4) == bytes(4) + b'tail'
        assert os.pread(fd, 1 << 20, 1 << 29) == bytes(1 << 20)
        fd = os.open('grown', os.O_RDONLY)
        assert os.pread(fd, 1 << 16, (5 << 30) - (1 << 16)) == bytes(1 << 16) and os.pread(fd, 1, 5 << 30) == b''
        print('zeros')
    """
    assert py(reads, ws.mnt).stdout == "zeros\n"
    ws.unmount()
    ws.mount()  # cold: no body open, the blocks are asked of the backing files
    assert blocks(ws.mnt) == seen
    assert py(reads, ws.mnt).stdout == "zeros\n"


def test_growing_a_file_beyond_the_free_space_works_and_too_large_gets_the_disks_answer(ws, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    disk = os.statvfs(ws.store)
    beyond_free = disk.f_bavail * disk.f_frsize + (20 << 30)  # e.g. `truncate -s 100G` with 80 GiB free
    run(["truncate", "-s", str(beyond_free), "big"], cwd=ws.mnt)
    assert stat_of(ws.mnt / "big", "%s %b") == f"{beyond_free} 0"
    assert outcome(f"fd = os.open('big', os.O_RDWR); os.ftruncate(fd, {beyond_free * 2}); os.close(fd)",
                   ws.mnt) == "OK"
    assert stat_of(ws.mnt / "big", "%s %b") == f"{beyond_free * 2} 0"
    # Past what the store's file system can hold (ext4: 16 TiB): its own answer (EFBIG), never ENOSPC;
    # the same for a write that far out.
    for change in (f"os.truncate('f', {17 << 40})", f"os.truncate('f', {(1 << 63) - 1})",
                   f"fd = os.open('f', os.O_WRONLY); os.pwrite(fd, b'x', {17 << 40})"):
        answers = []
        for folder in (plain, ws.mnt):
            (folder / "f").write_bytes(b"kept")
            answers.append(outcome(change, folder))
            assert (folder / "f").read_bytes() == b"kept"
        assert answers[0] == answers[1] != "ENOSPC", change
    assert answers[0] == "EFBIG"  # the disk under the store here is ext4
    assert stat_of(ws.mnt / "f", "%s") == "4"


@pytest.fixture
def tiny_ws(tmp_path):
    """A mounted workspace whose store lives on a 64 MiB tmpfs."""
    with workspace_on_a_tiny_disk(tmp_path, Workspace) as ws:
        yield ws


FILL_HOLES = """
import errno, os
fd = os.open('sparse', os.O_WRONLY)  # no O_TRUNC: into the holes of a 1 GiB sparse file
chunk, total = b'z' * (1 << 20), 0
try:
    while total < 256 << 20:
        total += os.pwrite(fd, chunk, total)
    print('no-ENOSPC', total)
except OSError as e:
    print(errno.errorcode[e.errno], total)
"""


def test_on_a_full_disk_truncate_still_grows_files_and_writes_into_holes_are_refused(tiny_ws):
    ws = tiny_ws
    run("truncate -s 1G sparse", cwd=ws.mnt)  # a 1 GiB file on a 64 MiB disk: it allocates nothing
    assert stat_of(ws.mnt / "sparse", "%s %b") == f"{1 << 30} 0"
    code, written = run([PY, "-c", FILL_HOLES], cwd=ws.mnt).stdout.split()
    assert code == "ENOSPC" and int(written) > 30 << 20  # filling holes allocates: it counts
    # The disk is full for data, yet growing by truncate needs no space, and metadata still commits.
    run("truncate -s 2G other && mkdir after-full", cwd=ws.mnt)
    assert outcome("fd = os.open('sparse', os.O_RDWR); os.ftruncate(fd, 3 << 30)", ws.mnt) == "OK"
    assert outcome("fd = os.open('sparse', os.O_WRONLY); os.pwrite(fd, b'x' * (4 << 20), 2 << 30)",
                   ws.mnt) == "ENOSPC"
    ws.unmount()
    assert run([DESKFS, "fsck", str(ws.store)], cwd="/").stdout.strip().endswith("clean, nothing to repair")
    ws.mount()
    assert stat_of(ws.mnt / "sparse", "%s") == str(3 << 30) and stat_of(ws.mnt / "other", "%s %b") == f"{2 << 30} 0"
    assert py(f"""
        fd = open('sparse', 'rb')
        fd.seek({int(written)} - 1); print(fd.read(2))
    """, ws.mnt).stdout.strip() == repr(b"z\0")


def test_inode_numbers_stay_stable_across_rename_and_remount(ws):
    run("mkdir d && printf x > d/f && mkfifo d/p", cwd=ws.mnt)
    before = {name: stat_of(ws.mnt / name, "%i") for name in ("d", "d/f", "d/p")}
    run("mv d/f d/g && mv d e", cwd=ws.mnt)
    after_rename = {"d": stat_of(ws.mnt / "e", "%i"), "d/f": stat_of(ws.mnt / "e/g", "%i"),
                    "d/p": stat_of(ws.mnt / "e/p", "%i")}
    assert after_rename == before
    ws.unmount()
    ws.mount()
    after_remount = {"d": stat_of(ws.mnt / "e", "%i"), "d/f": stat_of(ws.mnt / "e/g", "%i"),
                     "d/p": stat_of(ws.mnt / "e/p", "%i")}
    assert after_remount == before


def test_unlinked_open_file_stays_usable_until_its_last_close(ws):
    (ws.mnt / "f").write_bytes(b"start")
    ino = int(stat_of(ws.mnt / "f", "%i"))
    holder = subprocess.Popen([PY, "-c", textwrap.dedent("""
        import os, sys
        one, two = os.open('f', os.O_RDWR), os.open('f', os.O_RDWR)
        print('open', flush=True); sys.stdin.readline()     # the test unlinks f now
        os.pwrite(one, b'+more', 5)
        os.close(one)
        print(os.fstat(two).st_nlink, os.pread(two, 100, 0).decode(), flush=True)
        os.pwrite(two, b'!', 10)
        print(os.pread(two, 100, 0).decode(), flush=True); sys.stdin.readline()  # the test looks at the store
        os.close(two)
    """)], cwd=ws.mnt, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        run(["rm", "f"], cwd=ws.mnt)
        assert os.listdir(ws.mnt) == []
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "0 start+more\n"
        assert holder.stdout.readline() == "start+more!\n"
        assert ino in objects_of(ws.store)  # one descriptor is still open: the body is kept
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    wait_until_freed(ws.store, ino)


def test_fsync_fdatasync_and_sync_succeed_and_commit_the_size(ws):
    py("""
        import os
        fd = os.open('f', os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b'x' * 12345)
        os.fsync(fd)
        os.write(fd, b'y')
        os.fdatasync(fd)
        os.close(fd)
        dfd = os.open('.', os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        os.sync()
    """, ws.mnt)
    ino = int(stat_of(ws.mnt / "f", "%i"))
    conn = sqlite3.connect(f"file:{ws.store / 'deskfs.db'}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT size FROM inodes WHERE id=?", (ino,)).fetchone() == (12346,)
    finally:
        conn.close()


# -- folders -----------------------------------------------------------------------------------


def test_readdir_lists_each_of_1000_entries_exactly_once(ws):
    names = [f"entry-{i:04d}-" + "n" * (i % 97) for i in range(1000)]
    py(f"""
        import os
        os.mkdir('big')
        for name in {names!r}:
            os.close(os.open('big/' + name, os.O_CREAT | os.O_WRONLY, 0o644))
    """, ws.mnt)
    listed = run(["ls", "-1", "-U", "big"], cwd=ws.mnt).stdout.splitlines()
    assert len(listed) == 1000 and sorted(listed) == sorted(names)
    ws.unmount()
    ws.mount()  # cold: nothing of the folder is cached by the kernel
    listed = py("import os; print('\\n'.join(os.listdir('big')))", ws.mnt).stdout.splitlines()
    assert len(listed) == 1000 and sorted(listed) == sorted(names)


def test_ls_a_shows_dot_and_dotdot(ws):
    run("mkdir empty full && touch full/a full/b", cwd=ws.mnt)
    assert run(["ls", "-a", "empty"], cwd=ws.mnt).stdout.split() == [".", ".."]
    assert run(["ls", "-a", "full"], cwd=ws.mnt).stdout.split() == [".", "..", "a", "b"]
    assert run(["ls", "-a"], cwd=ws.mnt).stdout.split() == [".", "..", "empty", "full"]
    listing = run(["ls", "-a", "-i", "-1", "full"], cwd=ws.mnt).stdout.splitlines()
    inodes = {name: ino for ino, name in map(str.split, listing)}
    assert inodes["."] == stat_of(ws.mnt / "full", "%i")
    assert inodes[".."] == stat_of(ws.mnt, "%i")
