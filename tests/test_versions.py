"""Version history on a real deskfs mount (issue 11): nothing an agent overwrites or deletes is lost.

Every actor is a process of its own with a real identity: root's agents (agent:alice, agent:bob, a viewer
agent:vera) on a root-owned workspace, and real Unix users (deskfs-member, deskfs-stranger) on the
builder-owned, --allow-other workspace of test_roles' `desk` fixture. Old content is read back the two
ways a user has: `deskfs cat PATH@N` and plain `cat` of `.deskfs/versions/PATH/N`.

Covered:
- each way of overwriting (O_TRUNC, rename-over from a temporary file, unlink + create, in-place pwrite,
  truncate, append), done by two agents in turn: after each, every earlier content reads back byte for
  byte, `deskfs versions --json` names who made each version, its size, hash and what ended it, and a
  restore brings the first content back;
- the version number: 1 at creation, one new version per writing session (however many write() calls,
  however many handles), already N+1 while a writer has written but not closed, visible with getfattr,
  EPERM to set or remove, carried by `close_write` records;
- an editor's save loop (temporary file, fsync, rename over) 200 times: 200 versions, all readable;
- restore and undelete: journaled; refused to a viewer, a non-member and where Unix permissions say no;
  restore onto a file another agent has locked is EBUSY with the holder named; undelete refuses an
  existing name without --as; a removed folder's files come back with it; --as only inside the workspace
  (and neither follows a link out of it); a member cannot bring back a file it could not read where it was;
- kept versions do not change when the replaced or removed file is still written through an open handle;
- diff (unified for text, one line for binaries); rename keeps a file's history, RENAME_EXCHANGE swaps
  it, mv over another file keeps both histories; hard links share one; `versions off` keeps nothing but
  the number still counts (rename-over included); the hand-off to a human (transfer, the builder leaves)
  keeps the whole history;
- `.deskfs`: invisible to find, git status, tar and rsync; every change inside it EROFS; the name refused
  at the root (and free below it); a real `.deskfs` in a store from before versions (made by the code of
  the last commit before versions) is moved to `.deskfs.saved`, and that store's files keep their
  content as version 1 when they are removed or renamed over;
- policy: versions.keep, versions.max_size (in-place edits of a larger file keep no copy; an append keeps
  the old length), `deskfs gc` frees exactly what it says (du of STORE/versions), a 256 MiB file edited
  in place by one page stores nothing more;
- kill -9 of the daemon in a save loop (right after a rename, right after an fsync, and anywhere), and
  right after one unlink, in-place pwrite, truncate or O_TRUNC write: after the remount every listed
  version reads back exactly and the file (or the trash) holds its old or its new content, never neither;
- versions survive unmount, remount and `deskfs fsck`; fsck drops a version whose kept body was deleted by
  hand instead of serving it empty;
- bad input: PATH@N of no version, malformed specs, paths outside the workspace or inside the view,
  folders, bad policy values: one-line errors, exit 1 or 2, nothing changed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import DESKFS, PY, RENAMEAT2, REPO, RequestServer, Workspace, deskfs, read_line, run
from test_roles import (MEMBER, Who, build, builder, desk, expanded, member, people,  # noqa: F401
                        refused, stranger)

alice, bob, vera = Who(agent="alice"), Who(agent="bob"), Who(agent="vera")
VERSION = "user.deskfs.version"


# -- helpers ------------------------------------------------------------------------------------


def blob(label: str, size: int) -> bytes:
    """`size` bytes that depend on `label` (every byte value occurs: binary-safe comparisons)."""
    return hashlib.shake_256(label.encode()).digest(size)


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def act(who: Who, code: str, *args: str, data: bytes = b"") -> str:
    """Run a Python snippet as `who` in a process of its own, `data` on its stdin; its stdout."""
    prelude = "import os, sys\ndata = sys.stdin.buffer.read()\n"
    result = subprocess.run(who.command(PY, "-c", prelude + textwrap.dedent(code), *args), input=data,
                            capture_output=True, env=who.env(), cwd="/", timeout=120)
    assert result.returncode == 0, f"{who}: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode()


def attempt(who: Who, code: str) -> str:
    """'OK', or the errno name of the OSError the snippet raised."""
    return who.attempts({"x": code})["x"]


def cli(who: Who, *args: str) -> subprocess.CompletedProcess:
    """`deskfs ARGS` as `who`, output as bytes (old versions are binary)."""
    return subprocess.run(who.command(DESKFS, *args), capture_output=True, env=who.env(), cwd="/", timeout=120)


def cat_version(who: Who, path: Path, number: int) -> bytes:
    result = cli(who, "cat", f"{path}@{number}")
    assert result.returncode == 0, f"deskfs cat {path}@{number}: {result.stderr.decode()}"
    return result.stdout


def view_path(ws: Workspace, path: Path, number: int | None = None) -> Path:
    folder = ws.mnt / ".deskfs" / "versions" / path.relative_to(ws.mnt)
    return folder if number is None else folder / str(number)


def plain_cat(who: Who, *paths: Path) -> bytes:
    """What `cat PATH...` prints, run as `who`."""
    result = subprocess.run(who.command("cat", *map(str, paths)), capture_output=True, env=who.env(), cwd="/")
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def versions(who: Who, path: Path) -> list[dict]:
    result = cli(who, "versions", str(path), "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def version_of(who: Who, path: Path) -> int:
    result = who.run("getfattr", "--only-values", "-n", VERSION, str(path))
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def read_file(who: Who, path: Path) -> bytes:
    return plain_cat(who, path)


def trash(who: Who, under: Path) -> list[dict]:
    result = cli(who, "trash", str(under), "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def log(ws: Workspace, *ops: str) -> list[dict]:
    result = deskfs("log", "--json", "--limit", "0", "--mount", str(ws.mnt), *(["--op", ",".join(ops)] if ops else []))
    return [json.loads(line) for line in result.stdout.splitlines()]


def last_seq(ws: Workspace) -> int:
    records = log(ws)
    return max(r["seq"] for r in records) if records else 0


def assert_history(ws: Workspace, path: Path, contents: list[bytes], principals: list[str],
                   ended_by: list[str], first: int = 1, via_cli: bool = True, who: Who | None = None) -> None:
    """The file's versions are exactly `contents` (numbered from `first`, the last one current), made by
    `principals`, each but the last ended by the matching `ended_by`; each reads back byte for byte
    through the view (plain cat) and, with `via_cli`, through `deskfs cat` (as `who`: agents bob, alice)."""
    lister, reader = (bob, alice) if who is None else (who, who)
    listed = versions(lister, path)
    assert [v["number"] for v in listed] == list(range(first, first + len(contents))), listed
    assert [v["principal"] for v in listed] == principals, listed
    assert [v["ended_by"] for v in listed] == ended_by + [None], listed
    assert [v["current"] for v in listed] == [False] * (len(contents) - 1) + [True], listed
    assert [v["size"] for v in listed] == [len(c) for c in contents], listed
    assert [v["hash"] for v in listed] == [content_hash(c) for c in contents], listed
    times = [t for v in listed for t in (v["made_ns"], v["ended_ns"]) if t is not None]
    assert times == sorted(times), listed  # each version began when the one before it ended, or later
    folder = view_path(ws, path)
    listing = reader.py("import os, sys; print(' '.join(sorted(os.listdir(sys.argv[1]), key=int)))", str(folder))
    assert listing.split() == [str(first + i) for i in range(len(contents))]
    for i, expected in enumerate(contents):
        number = first + i
        assert plain_cat(reader, folder / str(number)) == expected, f"cat {folder}/{number}"
        if via_cli:
            assert cat_version(reader, path, number) == expected, f"deskfs cat {path}@{number}"
    assert read_file(reader, path) == contents[-1]
    assert version_of(reader, path) == first + len(contents) - 1


def create(who: Who, path: Path, data: bytes, mode: int = 0o644) -> None:
    act(who, f"""
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, {mode:#o})
        os.write(fd, data)
        os.close(fd)
        os.chmod(sys.argv[1], {mode:#o})
    """, str(path), data=data)


# An editor's save: a temporary file, fsync, rename over the target.
SAVE = """
        tmp = sys.argv[1] + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, sys.argv[1])
    """


def save(who: Who, path: Path, data: bytes) -> None:
    act(who, SAVE, str(path), data=data)


def du(path: Path) -> int:
    """Bytes on disk under `path`, as du counts them (st_blocks of every file and folder)."""
    return int(run(["du", "-s", "-B1", str(path)], cwd="/").stdout.split()[0])


def set_policy(ws: Workspace, key: str, value: str) -> None:
    deskfs("config", key, value, "--mount", str(ws.mnt))


HANDLES = r"""
import errno, json, os, sys
fds = {}
for line in sys.stdin:
    op, *a = json.loads(line)
    try:
        result = "OK"
        if op == "open":
            flags = 0
            for name in a[2]:
                flags |= getattr(os, name)
            fds[a[0]] = os.open(a[1], flags, 0o644)
        elif op == "write":
            os.write(fds[a[0]], bytes.fromhex(a[1]))
        elif op == "pwrite":
            os.pwrite(fds[a[0]], bytes.fromhex(a[1]), a[2])
        elif op == "read":
            result = os.pread(fds[a[0]], a[1], a[2]).hex()
        elif op == "close":
            os.close(fds.pop(a[0]))
    except OSError as exc:
        result = errno.errorcode[exc.errno]
    print(json.dumps(result), flush=True)
"""


@pytest.fixture
def handles(make_workspace):
    """Factory: a process of `who` that holds file descriptors open and uses them on request (ended
    before the workspaces are unmounted)."""
    made: list[RequestServer] = []

    def make(who: Who) -> RequestServer:
        server = RequestServer(who.command(PY, "-c", HANDLES), "/", who.env())
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


# -- 1. every way of overwriting keeps every earlier content ----------------------------------------


# Each way: the snippet (PATH in argv[1], the new data on stdin), what the file holds after it, and what
# `versions` says ended the version it replaced; then the sizes of the data for the three changes.
WAYS = {
    "o_trunc": ("""
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
        half = len(data) // 2
        os.write(fd, data[:half])  # two write() calls, one version
        os.write(fd, data[half:])
        os.close(fd)
    """, lambda old, data: data, "open_trunc", [7000, 13000, 0]),
    "rename_over": (SAVE, lambda old, data: data, "rename_over", [5000, 20000, 0]),
    "pwrite": ("""
        fd = os.open(sys.argv[1], os.O_WRONLY)
        os.pwrite(fd, data[:100], 1000)
        os.pwrite(fd, data[100:], 1100)
        os.close(fd)
    """, lambda old, data: old[:1000] + data + old[1000 + len(data):], "write", [3000, 12000, 200]),
    "truncate": ("""
        os.truncate(sys.argv[1], len(data))
    """, lambda old, data: (old + bytes(len(data)))[:len(data)], "truncate", [6000, 9000, 2000]),
    "append": ("""
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
        os.write(fd, data)
        os.close(fd)
    """, lambda old, data: old + data, "write", [3000, 1, 40000]),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_two_agents_overwriting_in_each_way_lose_nothing(ws, way):
    code, result_of, ended_by, sizes = WAYS[way]
    path = ws.mnt / "doc.bin"
    contents = [blob(f"{way}-0", 10000)]
    create(alice, path, contents[0])
    assert_history(ws, path, contents, ["agent:alice"], [])
    writers = [bob, alice, bob]
    for step, (who, size) in enumerate(zip(writers, sizes), start=1):
        data = blob(f"{way}-{step}", size)
        act(who, code, str(path), data=data)
        contents.append(result_of(contents[-1], data))
        assert_history(ws, path, contents, ["agent:alice"] + [w.principal for w in writers[:step]],
                       [ended_by] * step, via_cli=step == len(writers))
    # Every earlier content can be made the file's next version; the one replaced stays a version too.
    done = cli(alice, "restore", f"{path}@1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == f"restored {path} to the content of version 1; it is version 5 now"
    assert_history(ws, path, contents + [contents[0]],
                   ["agent:alice", "agent:bob", "agent:alice", "agent:bob", "agent:alice"],
                   [ended_by] * 3 + ["restore"], via_cli=False)
    restores = log(ws, "restore")
    assert [(r["principal"], r["path"], r["details"]) for r in restores] == [
        ("agent:alice", "/doc.bin", {"version": 5, "restored": 1, "size": len(contents[0])})]


def test_unlink_and_create_keeps_each_removed_content_in_the_trash(ws):
    path = ws.mnt / "doc.bin"
    contents = [blob("unlink-0", 10000), blob("unlink-1", 3000), blob("unlink-2", 25000)]
    create(alice, path, contents[0])
    recreate = """
        os.unlink(sys.argv[1])
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    """
    act(bob, recreate, str(path), data=contents[1])
    assert_history(ws, path, [contents[1]], ["agent:bob"], [])  # a new file: version 1
    act(alice, recreate, str(path), data=contents[2])
    assert_history(ws, path, [contents[2]], ["agent:alice"], [])
    removed = trash(alice, ws.mnt)
    assert [(r["path"], r["deleted_by"], r["size"], r["version"]) for r in removed] == [
        ("/doc.bin", "agent:alice", len(contents[1]), 1), ("/doc.bin", "agent:bob", len(contents[0]), 1)]
    # Each comes back, newest removal first, under another name (the name is taken).
    for name, expected, creator in (("second", contents[1], "agent:bob"), ("first", contents[0], "agent:alice")):
        back = cli(alice, "undelete", str(path), "--as", str(ws.mnt / name))
        assert back.returncode == 0, back.stderr
        assert back.stdout.decode().strip() == f"brought back /doc.bin as {ws.mnt / name}"
        assert read_file(alice, ws.mnt / name) == expected
        assert_history(ws, ws.mnt / name, [expected], [creator], [])
    assert trash(alice, ws.mnt) == []
    assert read_file(alice, path) == contents[2]
    undeletes = log(ws, "undelete")
    assert [(r["principal"], r["path"], r["details"]) for r in undeletes] == [
        ("agent:alice", "/second", {"version": 1, "removed": "/doc.bin"}),
        ("agent:alice", "/first", {"version": 1, "removed": "/doc.bin"})]


# -- 2. the version number ------------------------------------------------------------------------


def test_one_version_per_writing_session_and_the_number_moves_at_the_first_write(ws, handles):
    path = ws.mnt / "notes.txt"
    a, b = handles(alice), handles(bob)
    assert a("open", "w", str(path), ["O_WRONLY", "O_CREAT", "O_EXCL"]) == "OK"
    assert version_of(bob, path) == 1
    for chunk in (b"one ", b"two ", b"three\n"):
        assert a("write", "w", chunk.hex()) == "OK"
        assert version_of(bob, path) == 1  # still the creator's first session
    assert a("close", "w") == "OK"
    assert version_of(bob, path) == 1
    v1 = b"one two three\n"

    # A second session: the number is N until the first change, N+1 from then on, before the close.
    assert a("open", "w", str(path), ["O_RDWR"]) == "OK"
    assert a("read", "w", 100, 0) == v1.hex()
    assert version_of(bob, path) == 1
    assert a("pwrite", "w", b"ONE".hex(), 0) == "OK"
    assert version_of(bob, path) == 2  # written, not closed: a compare against 1 must fail now
    assert cat_version(bob, path, 1) == v1  # version 1 is what it was
    assert read_file(bob, path) == b"ONE two three\n"
    assert a("pwrite", "w", b"TWO".hex(), 4) == "OK"
    assert a("write", "w", b"!".hex()) == "OK"
    assert version_of(bob, path) == 2
    assert a("close", "w") == "OK"
    v2 = b"!NE TWO three\n"  # write() wrote at the handle's offset, 0 (pread and pwrite do not move it)
    assert read_file(bob, path) == v2 and version_of(bob, path) == 2

    # Two writers at once: one version, sealed when the last of them closes.
    assert a("open", "w", str(path), ["O_WRONLY"]) == "OK"
    assert b("open", "w", str(path), ["O_WRONLY"]) == "OK"
    assert a("pwrite", "w", b"a".hex(), 20) == "OK"
    assert b("pwrite", "w", b"b".hex(), 21) == "OK"
    assert version_of(alice, path) == 3
    assert a("close", "w") == "OK"
    assert b("pwrite", "w", b"c".hex(), 22) == "OK"  # bob's session goes on: still version 3
    assert version_of(alice, path) == 3
    assert b("close", "w") == "OK"
    v3 = v2 + bytes(20 - len(v2)) + b"abc"
    # A reader opening and closing changes nothing; the next writer starts version 4.
    assert read_file(alice, path) == v3 and version_of(alice, path) == 3
    act(alice, "open(sys.argv[1], 'ab').write(b'd')", str(path))
    assert version_of(bob, path) == 4
    assert_history(ws, path, [v1, v2, v3, v3 + b"d"], ["agent:alice", "agent:alice", "agent:bob", "agent:alice"],
                   ["write"] * 3)

    # close_write records carry the version they sealed (once per sealing, by the last closer).
    sealed = [(r["principal"], r["details"]["version"]) for r in log(ws, "close_write") if r["path"] == "/notes.txt"]
    assert sealed == [("agent:alice", 1), ("agent:alice", 2), ("agent:bob", 3), ("agent:alice", 4)]

    # The number is read-only, and only regular files have one.
    assert alice.attempts({
        "set": f"os.setxattr({str(path)!r}, {VERSION!r}, b'9')",
        "remove": f"os.removexattr({str(path)!r}, {VERSION!r})",
        "folder": f"os.getxattr({str(ws.mnt)!r}, {VERSION!r})",
    }) == {"set": "EPERM", "remove": "EPERM", "folder": "ENODATA"}
    assert version_of(bob, path) == 4


def test_an_o_trunc_open_moves_the_number_before_anything_is_written(ws, handles):
    path = ws.mnt / "state.json"
    create(alice, path, b'{"n": 1}\n')
    a = handles(bob)
    assert a("open", "w", str(path), ["O_WRONLY", "O_TRUNC"]) == "OK"
    assert version_of(alice, path) == 2  # the content of version 1 is gone from the file already
    assert read_file(alice, path) == b""
    assert cat_version(alice, path, 1) == b'{"n": 1}\n'
    assert a("write", "w", b'{"n": 2}\n'.hex()) == "OK"
    assert a("close", "w") == "OK"
    assert_history(ws, path, [b'{"n": 1}\n', b'{"n": 2}\n'], ["agent:alice", "agent:bob"], ["open_trunc"])


# -- 3. an editor's save loop -----------------------------------------------------------------------


SAVE_LOOP = """
import os, sys
path, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    tmp = path + ".swp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, f"save {i}\\n".encode() * (i % 7 + 1))
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, path)
"""


def saved(i: int) -> bytes:
    return f"save {i}\n".encode() * (i % 7 + 1)


def test_a_save_loop_of_200_saves_keeps_200_versions(ws):
    set_policy(ws, "versions.keep", "1000")  # the default keeps 50 (applied every minute)
    path = ws.mnt / "draft.md"
    subprocess.run(alice.command(PY, "-c", SAVE_LOOP, str(path), "200"), env=alice.env(), check=True, timeout=300)
    assert version_of(bob, path) == 200
    listed = versions(bob, path)
    assert [v["number"] for v in listed] == list(range(1, 201))
    assert {v["principal"] for v in listed} == {"agent:alice"}
    assert [v["ended_by"] for v in listed] == ["rename_over"] * 199 + [None]
    assert [v["hash"] for v in listed] == [content_hash(saved(i)) for i in range(200)]
    folder = view_path(ws, path)
    assert sorted(os.listdir(folder), key=int) == [str(n) for n in range(1, 201)]
    # One cat of all 200 versions, in order, reads exactly what each save wrote.
    assert plain_cat(bob, *(folder / str(n) for n in range(1, 201))) == b"".join(saved(i) for i in range(200))
    for number in (1, 2, 99, 150, 199, 200):
        assert cat_version(bob, path, number) == saved(number - 1)
    assert not (ws.mnt / "draft.md.swp").exists()


# -- 4. restore and undelete ------------------------------------------------------------------------


def test_restore_is_refused_to_a_viewer_and_onto_a_file_another_agent_locked(ws):
    path = ws.mnt / "plan.md"
    create(alice, path, b"plan A\n")
    save(bob, path, b"plan B\n")
    ws.invite("agent:vera", "viewer")
    # A viewer may read old versions, not restore them.
    assert cat_version(vera, path, 1) == b"plan A\n"
    assert plain_cat(vera, view_path(ws, path, 1)) == b"plan A\n"
    line = refused(vera.cli("restore", f"{path}@1"))
    assert line == f"deskfs: you may not change {path} (your role, or the Unix permissions of {path})"
    assert attempt(vera, f"os.setxattr({str(path)!r}, 'user.deskfs.restore', b'1')") == "EACCES"
    # A lock of another agent: EBUSY, and the CLI names the holder.
    assert bob.cli("lock", str(path)).returncode == 0
    line = refused(alice.cli("restore", f"{path}@1"))
    assert line.startswith(f"deskfs: {path} is locked by lease exclusive agent:bob"), line
    assert attempt(alice, f"os.setxattr({str(path)!r}, 'user.deskfs.restore', b'1')") == "EBUSY"
    assert read_file(alice, path) == b"plan B\n" and version_of(alice, path) == 2  # nothing changed
    # The holder itself may restore.
    assert bob.cli("restore", f"{path}@1").returncode == 0
    assert bob.cli("unlock", str(path)).returncode == 0
    assert_history(ws, path, [b"plan A\n", b"plan B\n", b"plan A\n"], ["agent:alice", "agent:bob", "agent:bob"],
                   ["rename_over", "restore"])
    records = [(r["principal"], r["errno"], r["details"].get("version"))
               for r in expanded(log(ws, "restore", "undelete"))]
    assert records == [("agent:vera", errno.EACCES, None), ("agent:vera", errno.EACCES, None),
                       ("agent:alice", errno.EBUSY, None), ("agent:alice", errno.EBUSY, None),
                       ("agent:bob", None, 3)]


def test_undelete_refuses_an_existing_name_without_as_and_a_viewer(ws):
    path = ws.mnt / "report.txt"
    create(alice, path, b"draft 1\n")
    save(alice, path, b"draft 2\n")
    act(bob, "os.unlink(sys.argv[1])", str(path))
    create(bob, path, b"someone else's report\n")
    before = last_seq(ws)
    line = refused(alice.cli("undelete", str(path)))
    assert line == f"deskfs: {path} exists; bring it back under another name with --as NEWPATH"
    ws.invite("agent:vera", "viewer")
    line = refused(vera.cli("undelete", str(path), "--as", str(ws.mnt / "mine.txt")))
    assert line.startswith("deskfs: you may not create files in"), line
    assert read_file(alice, path) == b"someone else's report\n"
    assert not (ws.mnt / "mine.txt").exists()
    assert [r["path"] for r in trash(alice, ws.mnt)] == ["/report.txt"]
    assert [(r["principal"], r["errno"]) for r in log(ws, "undelete") if r["seq"] > before] == [
        ("agent:vera", errno.EACCES)]
    # With --as it comes back, with its whole history: the removed version is current again.
    assert alice.cli("undelete", str(path), "--as", str(ws.mnt / "mine.txt")).returncode == 0
    mine = ws.mnt / "mine.txt"
    assert_history(ws, mine, [b"draft 1\n", b"draft 2\n"], ["agent:alice", "agent:alice"], ["rename_over"])
    assert read_file(alice, path) == b"someone else's report\n"
    assert trash(alice, ws.mnt) == []
    assert [(r["principal"], r["path"], r["details"]) for r in log(ws, "undelete") if r["errno"] is None] == [
        ("agent:alice", "/mine.txt", {"version": 2, "removed": "/report.txt"})]


def test_a_removed_folder_comes_back_with_its_files(ws):
    top = ws.mnt / "project"
    act(alice, "os.makedirs(sys.argv[1] + '/src/deep'); os.makedirs(sys.argv[1] + '/empty')", str(top))
    files = {"README": (blob("readme", 3000), 0o644), "src/main.py": (b"print('hi')\n", 0o755),
             "src/deep/data.bin": (blob("data", 70000), 0o600)}
    for rel, (data, mode) in files.items():
        create(alice, top / rel, data, mode)
    save(bob, top / "README", b"readme v2\n")
    run(["rm", "-r", str(top)], cwd="/", env=bob.env())
    removed = trash(alice, top)
    assert sorted((r["path"], r["deleted_by"]) for r in removed) == [
        ("/project/README", "agent:bob"), ("/project/src/deep/data.bin", "agent:bob"),
        ("/project/src/main.py", "agent:bob")]
    result = alice.cli("undelete", str(top))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(
        f"brought back /project/{rel} as {top / rel}" for rel in files)
    for rel, (data, mode) in files.items():
        expected = b"readme v2\n" if rel == "README" else data
        assert read_file(alice, top / rel) == expected, rel
        assert os.stat(top / rel).st_mode & 0o7777 == mode, rel
    assert_history(ws, top / "README", [files["README"][0], b"readme v2\n"], ["agent:alice", "agent:bob"],
                   ["rename_over"])
    assert trash(alice, ws.mnt) == []
    assert sorted(r["path"] for r in log(ws, "undelete")) == sorted(f"/project/{rel}" for rel in files)


def test_undelete_as_only_names_a_path_in_the_same_workspace(ws, make_workspace, tmp_path):
    other = make_workspace("other")
    path = ws.mnt / "gone.txt"
    create(alice, path, b"keep me\n")
    act(alice, "os.unlink(sys.argv[1])", str(path))
    create(alice, other.mnt / "x", b"x\n")
    act(alice, "os.unlink(sys.argv[1])", str(other.mnt / "x"))
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, ws.mnt / "elsewhere")
    for target in (outside / "gone.txt", ws.mnt / "elsewhere" / "gone.txt", other.mnt / "gone.txt",
                   ws.mnt / ".deskfs" / "versions" / "gone.txt"):
        refused(alice.cli("undelete", str(path), "--as", str(target)), code=2)
    assert os.listxattr(outside) == [] and os.listdir(outside) == []
    assert sorted(os.listdir(other.mnt)) == [] and len(trash(alice, other.mnt)) == 1
    assert [r["path"] for r in trash(alice, ws.mnt)] == ["/gone.txt"]
    # A restore through a link to a file outside the workspace changes nothing there either.
    (outside / "file").write_text("outside\n")
    os.symlink(outside / "file", ws.mnt / "link")
    refused(alice.cli("restore", f"{ws.mnt / 'link'}@1"), code=2)
    assert os.listxattr(outside / "file") == []


def test_restore_and_undelete_need_membership_and_unix_permissions(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/open.txt": "open v1\n", "shared/own.txt": "own v1\n",
                        "shared/private.txt": "private v1\n"}, ["shared"])
    builder.py("import os, sys; os.chmod(sys.argv[1], 0o644); os.chmod(sys.argv[2], 0o600)",
               f"{m}/shared/own.txt", f"{m}/shared/private.txt")
    for name in ("open", "own", "private"):
        act(builder, "open(sys.argv[1], 'w').write(sys.argv[2])", f"{m}/shared/{name}.txt", f"{name} v2\n")
    act(builder, "open(sys.argv[1], 'w').write('bye\\n'); os.chmod(sys.argv[1], 0o666); os.unlink(sys.argv[1])",
        f"{m}/shared/removed.txt")
    builder.ok(ws, "invite", f"user:{MEMBER}", "--role", "editor")
    before = last_seq(ws)

    # A non-member: nothing, and no hint of what exists.
    for args in (("restore", f"{m}/shared/open.txt@1"), ("undelete", f"{m}/shared/removed.txt"),
                 ("versions", f"{m}/shared/open.txt"), ("cat", f"{m}/shared/open.txt@1"),
                 ("trash", f"{m}/shared")):
        refused(stranger.cli(*args))
    assert stranger.attempts({
        "view": f"open('{m}/.deskfs/versions/shared/open.txt/1').read()",
        "list": f"os.listdir('{m}/.deskfs/versions')",
    }) == {"view": "EACCES", "list": "EACCES"}

    # A member: its role allows, the Unix permissions of each file decide.
    assert member.cli("restore", f"{m}/shared/open.txt@1").returncode == 0
    assert read_file(builder, m / "shared/open.txt") == b"open v1\n"
    assert cat_version(member, m / "shared/own.txt", 1) == b"own v1\n"  # 0644: readable, not writable
    line = refused(member.cli("restore", f"{m}/shared/own.txt@1"))
    assert line.startswith("deskfs: you may not change"), line
    assert read_file(builder, m / "shared/own.txt") == b"own v2\n"
    assert refused(member.cli("cat", f"{m}/shared/private.txt@1")).startswith(
        "deskfs: " + f"{m}/shared/private.txt: you may not read its versions")
    assert member.attempts({"view": f"open('{m}/.deskfs/versions/shared/private.txt/1').read()"}) == \
        {"view": "EACCES"}
    refused(member.cli("versions", f"{m}/shared/private.txt"))
    assert member.cli("undelete", f"{m}/shared/removed.txt").returncode == 0
    assert read_file(builder, m / "shared/removed.txt") == b"bye\n"
    done = [(r["principal"], r["op"], r["path"]) for r in log(ws, "restore", "undelete")
            if r["seq"] > before and r["errno"] is None]
    assert done == [(f"user:{MEMBER}", "restore", "/shared/open.txt"),
                    (f"user:{MEMBER}", "undelete", "/shared/removed.txt")]


# -- 5. kept versions stay as they were kept --------------------------------------------------------


def test_a_kept_version_does_not_change_when_its_old_file_is_still_written(ws, handles):
    path = ws.mnt / "log.txt"
    create(alice, path, b"ORIGINAL CONTENT\n")
    writer = handles(alice)
    assert writer("open", "w", str(path), ["O_WRONLY"]) == "OK"
    save(bob, path, b"bob's replacement\n")  # renamed over the file alice still has open
    assert cat_version(bob, path, 1) == b"ORIGINAL CONTENT\n"
    assert writer("pwrite", "w", b"CHANGED".hex(), 0) == "OK"  # into the replaced, nameless file
    assert writer("close", "w") == "OK"
    assert cat_version(bob, path, 1) == b"ORIGINAL CONTENT\n"
    assert_history(ws, path, [b"ORIGINAL CONTENT\n", b"bob's replacement\n"], ["agent:alice", "agent:bob"],
                   ["rename_over"])

    # The same for a removed file: the trash holds what it held when it was removed.
    assert writer("open", "w", str(path), ["O_WRONLY"]) == "OK"
    act(bob, "os.unlink(sys.argv[1])", str(path))
    assert writer("pwrite", "w", b"LATER".hex(), 0) == "OK"
    assert writer("close", "w") == "OK"
    assert bob.cli("undelete", str(path)).returncode == 0
    assert read_file(bob, path) == b"bob's replacement\n"


# -- 6. the .deskfs view ------------------------------------------------------------------------------


def test_the_view_is_invisible_to_tree_walkers_and_read_only(ws, tmp_path):
    m = ws.mnt
    act(alice, """
        m = sys.argv[1]
        os.makedirs(m + '/src/sub')
        for rel in ('a.txt', 'src/b.txt', 'src/sub/c.txt'):
            open(os.path.join(m, rel), 'w').write(rel + ' v1\\n')
        open(m + '/a.txt', 'w').write('a v2\\n')
    """, str(m))
    files = ["a.txt", "src", "src/b.txt", "src/sub", "src/sub/c.txt"]
    assert ".deskfs" not in os.listdir(m)
    found = run(["find", "."], cwd=m).stdout.split()
    assert sorted(found) == sorted(["."] + [f"./{f}" for f in files])
    listed = tarfile.open(fileobj=io.BytesIO(
        subprocess.run(["tar", "c", "-C", str(m), "."], capture_output=True, check=True).stdout)).getnames()
    assert sorted(n.rstrip("/") for n in listed) == sorted(["."] + [f"./{f}" for f in files])
    copy = tmp_path / "rsync-copy"
    run(["rsync", "-a", f"{m}/", f"{copy}/"], cwd="/")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == sorted(files)
    git_env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
    run(["git", "-c", "init.defaultBranch=main", "init", "-q"], cwd=m, env=git_env)
    status = run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=m, env=git_env).stdout
    assert sorted(status.splitlines()) == ["?? a.txt", "?? src/b.txt", "?? src/sub/c.txt"]
    # It is there for whoever names it.
    assert os.listdir(m / ".deskfs") == ["versions"]
    assert sorted(os.listdir(m / ".deskfs" / "versions")) == [".git", "a.txt", "src"]  # a mirror of the tree
    assert act(alice, "os.chdir(sys.argv[1] + '/.deskfs/versions/a.txt'); print(sorted(os.listdir('.')))",
               str(m)).strip() == "['1', '2']"
    assert plain_cat(alice, m / ".deskfs/versions/a.txt/1") == b"a.txt v1\n"

    v = f"{m}/.deskfs/versions"
    assert alice.attempts({
        "create": f"open('{v}/a.txt/3', 'w')",
        "create_top": f"open('{m}/.deskfs/new', 'w')",
        "mkdir": f"os.mkdir('{v}/src/new')",
        "rename_into": f"os.rename('{m}/a.txt', '{v}/moved')",
        "rename_out": f"os.rename('{v}/a.txt/1', '{m}/one')",
        "rename_within": f"os.rename('{v}/a.txt/1', '{v}/a.txt/9')",
        "unlink": f"os.unlink('{v}/a.txt/1')",
        "rmdir": f"os.rmdir('{v}/src/sub')",
        "chmod": f"os.chmod('{v}/a.txt/1', 0o666)",
        "chown": f"os.chown('{v}/a.txt/1', 1, 1)",
        "utime": f"os.utime('{v}/a.txt/1', (1, 1))",
        "truncate": f"os.truncate('{v}/a.txt/1', 0)",
        "open_write": f"os.open('{v}/a.txt/1', os.O_WRONLY)",
        "open_rdwr": f"os.open('{v}/a.txt/1', os.O_RDWR)",
        "open_trunc": f"os.open('{v}/a.txt/1', os.O_RDONLY | os.O_TRUNC)",
        "setxattr": f"os.setxattr('{v}/a.txt/1', 'user.x', b'1')",
        "restore_inside": f"os.setxattr('{v}/a.txt', 'user.deskfs.restore', b'1')",
        "symlink": f"os.symlink('x', '{v}/link')",
        "link_in": f"os.link('{m}/a.txt', '{v}/hard')",
        "link_out": f"os.link('{v}/a.txt/1', '{m}/hard')",
        "mknod": f"os.mknod('{v}/node')",
    }) == {k: "EROFS" for k in ("create", "create_top", "mkdir", "rename_into", "rename_out", "rename_within",
                                 "unlink", "rmdir", "chmod", "chown", "utime", "truncate", "open_write",
                                 "open_rdwr", "open_trunc", "setxattr", "restore_inside", "symlink", "link_in",
                                 "link_out", "mknod")}
    # The name at the root is taken; anywhere else it is an ordinary name.
    act(alice, "os.mkdir(sys.argv[1] + '/empty'); open(sys.argv[1] + '/plain', 'w')", str(m))
    assert alice.attempts({
        "mkdir": f"os.mkdir('{m}/.deskfs')",
        "create": f"os.open('{m}/.deskfs', os.O_WRONLY | os.O_CREAT | os.O_EXCL)",
        "symlink": f"os.symlink('x', '{m}/.deskfs')",
        "link": f"os.link('{m}/plain', '{m}/.deskfs')",
        "mknod": f"os.mknod('{m}/.deskfs')",
        "rename_folder_onto": f"os.rename('{m}/empty', '{m}/.deskfs')",
        "rename_away": f"os.rename('{m}/.deskfs', '{m}/elsewhere')",
        "rmdir": f"os.rmdir('{m}/.deskfs')",
        # The kernel answers these itself: .deskfs is a folder.
        "rename_file_onto": f"os.rename('{m}/plain', '{m}/.deskfs')",
        "unlink": f"os.unlink('{m}/.deskfs')",
        "below": f"os.mkdir('{m}/src/.deskfs')",
    }) == {"mkdir": "EEXIST", "create": "EEXIST", "symlink": "EEXIST", "link": "EEXIST", "mknod": "EEXIST",
           "rename_folder_onto": "EPERM", "rename_away": "EPERM", "rmdir": "EPERM",
           "rename_file_onto": "EISDIR", "unlink": "EISDIR", "below": "OK"}
    assert sorted(os.listdir(m)) == [".git", "a.txt", "empty", "plain", "src"]
    assert sorted(os.listdir(m / ".deskfs" / "versions" / "a.txt")) == ["1", "2"]


# The last commit before versions: its code makes "a store from before this change".
def commit_before_versions() -> str:
    added = subprocess.run(["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "-1", "--",
                            "deskfs/store/versions.py"], capture_output=True, text=True, check=True).stdout.strip()
    return f"{added}^" if added else "HEAD"


def old_deskfs(tmp_path: Path) -> list[str]:
    """The `deskfs` command of the code before versions (in the installed venv, which has its dependencies)."""
    source = tmp_path / "old-deskfs"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit_before_versions(), "deskfs"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(source)], input=archive, check=True)
    assert not (source / "deskfs" / "store" / "versions.py").exists()
    return ["env", f"PYTHONPATH={source}", "/opt/deskfs/venv/bin/python", "-m", "deskfs"]


def test_a_store_from_before_versions_keeps_its_own_deskfs_and_its_files_content(tmp_path):
    old = old_deskfs(tmp_path)
    ws = Workspace.__new__(Workspace)  # a store the code before versions made and filled
    ws.store, ws.mnt, ws.mounted = tmp_path / "old-store", tmp_path / "old-mnt", False
    ws.mnt.mkdir()
    run([*old, "init", str(ws.store)], cwd="/")
    run([*old, "mount", str(ws.store), str(ws.mnt)], cwd="/")
    try:
        (ws.mnt / ".deskfs").mkdir()
        (ws.mnt / ".deskfs" / "notes").write_bytes(b"my own notes\n")
        for name in ("removed", "renamed-over", "truncated", "kept"):
            (ws.mnt / name).write_bytes(f"{name}: made before versions\n".encode())
    finally:
        run([*old, "unmount", str(ws.mnt)], cwd="/")
    try:
        ws.mount()
        m = ws.mnt
        assert sorted(os.listdir(m)) == [".deskfs.saved", "kept", "removed", "renamed-over", "truncated"]
        assert (m / ".deskfs.saved" / "notes").read_bytes() == b"my own notes\n"
        assert os.listdir(m / ".deskfs") == ["versions"]
        moved = [r for r in log(ws, "rename") if r["path"] == "/.deskfs"]
        assert [(r["principal"], r["path2"]) for r in moved] == [("deskfs", "/.deskfs.saved")]
        assert "the root's own .deskfs is now .deskfs.saved" in (ws.store / "run" / "daemon.log").read_text()

        # Its files have no history yet; each one's content is its version 1, kept like any other.
        assert [(v["number"], v["current"], v["size"]) for v in versions(alice, m / "kept")] == [(1, True, 27)]
        assert os.listdir(view_path(ws, m / "kept")) == ["1"]
        assert cat_version(alice, m / "kept", 1) == b"kept: made before versions\n"
        assert plain_cat(alice, view_path(ws, m / "kept", 1)) == b"kept: made before versions\n"
        assert version_of(alice, m / "kept") == 1
        act(bob, "os.unlink(sys.argv[1])", str(m / "removed"))
        save(bob, m / "renamed-over", b"new\n")
        act(bob, "os.truncate(sys.argv[1], 0)", str(m / "truncated"))
        assert [(r["path"], r["deleted_by"]) for r in trash(alice, m)] == [("/removed", "agent:bob")]
        assert bob.cli("undelete", str(m / "removed")).returncode == 0
        assert read_file(alice, m / "removed") == b"removed: made before versions\n"
        assert cat_version(alice, m / "renamed-over", 1) == b"renamed-over: made before versions\n"
        assert cat_version(alice, m / "truncated", 1) == b"truncated: made before versions\n"
        assert version_of(alice, m / "renamed-over") == 2 and version_of(alice, m / "truncated") == 2
        assert read_file(alice, m / "renamed-over") == b"new\n" and read_file(alice, m / "truncated") == b""
    finally:
        ws.cleanup()


# -- 7. policy ------------------------------------------------------------------------------------------


def gc(ws: Workspace) -> str:
    return deskfs("gc", "--mount", str(ws.mnt)).stdout.strip()


def test_keep_is_honoured_and_gc_frees_what_it_says(ws):
    path = ws.mnt / "big.bin"
    contents = [blob(f"keep-{i}", 200_000 + i) for i in range(8)]
    create(alice, path, contents[0])
    for data in contents[1:]:
        save(bob, path, data)
    assert [v["number"] for v in versions(alice, path)] == list(range(1, 9))
    set_policy(ws, "versions.keep", "3")
    kept = ws.store / "versions"
    mark, before = last_seq(ws), du(kept)
    said = gc(ws)
    after = du(kept)
    collected = [r for r in log(ws, "gc") if r["seq"] > mark]  # the daemon's own runs count too
    dropped = sum(r["details"]["dropped"] for r in collected)
    freed = sum(r["details"]["freed"] for r in collected)
    assert dropped == 4 and freed == before - after, (collected, before, after)
    assert freed >= 4 * 200_000
    ours = [r["details"] for r in collected if r["principal"] == "user:root"]
    assert said == f"collected {ours[0]['dropped']} old versions, freed {_human(ours[0]['freed'])}", (said, ours)
    assert_history(ws, path, contents[4:], ["agent:bob"] * 4, ["rename_over"] * 3, first=5)
    assert gc(ws) == "collected 0 old versions, freed 0 B"


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def test_max_size_keeps_no_copy_of_a_larger_file_and_appends_keep_only_the_old_length(ws):
    set_policy(ws, "versions.max_size", "64KiB")
    path = ws.mnt / "large.bin"
    original = blob("large", 256 * 1024)
    create(alice, path, original)
    kept, objects = ws.store / "versions", ws.store / "objects"
    before = du(kept)
    # An in-place change of a file over max_size: no copy, so the version it replaced is not kept.
    act(bob, "fd = os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, data, 65536); os.close(fd)", str(path),
        data=b"P" * 4096)
    edited = original[:65536] + b"P" * 4096 + original[65536 + 4096:]
    assert version_of(alice, path) == 2
    assert_history(ws, path, [edited], ["agent:bob"], [], first=2)
    assert du(kept) == before
    # An append keeps the old length, not a copy.
    act(alice, "open(sys.argv[1], 'ab').write(data)", str(path), data=b"tail\n")
    assert_history(ws, path, [edited, edited + b"tail\n"], ["agent:bob", "agent:alice"], ["write"], first=2)
    assert du(kept) == before
    before_bodies = du(kept) + du(objects)
    # O_TRUNC leaves the old body whole: it is kept (by a second name, not a copy), prefixes with it.
    act(bob, "open(sys.argv[1], 'wb').write(data)", str(path), data=b"short\n")
    assert_history(ws, path, [edited, edited + b"tail\n", b"short\n"], ["agent:bob", "agent:alice", "agent:bob"],
                   ["write", "open_trunc"], first=2)
    assert du(kept) + du(objects) - before_bodies <= 16384  # the old body moved, nothing was copied
    # Below max_size an in-place change keeps a copy.
    small = ws.mnt / "small.bin"
    create(alice, small, blob("small", 30000))
    act(bob, "fd = os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, b'X', 10); os.close(fd)", str(small))
    first = blob("small", 30000)
    assert_history(ws, small, [first, first[:10] + b"X" + first[11:]], ["agent:alice", "agent:bob"], ["write"])


def test_a_256_mib_file_edited_in_place_by_one_page_stores_nothing_more(ws):
    path = ws.mnt / "huge.img"
    run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", "count=256", "status=none"], cwd="/", env=alice.env())
    assert os.stat(path).st_size == 256 << 20
    kept, store = ws.store / "versions", ws.store
    before_kept, before_store = du(kept), du(store)
    page = blob("page", 4096)
    act(bob, "fd = os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, data, 100 << 20); os.close(fd)", str(path),
        data=page)
    assert version_of(alice, path) == 2
    assert du(kept) - before_kept < 1 << 20
    assert du(store) - before_store < 1 << 20
    got = act(alice, "f = open(sys.argv[1], 'rb'); f.seek(100 << 20); sys.stdout.write(f.read(4096).hex())",
              str(path))
    assert bytes.fromhex(got) == page


# -- 8. crashes, restarts, fsck ---------------------------------------------------------------------


CRASH_LOOP = r"""
import os, sys
path, start, pause_at, point = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def content(i):
    return (f"iteration {i}\n" + "x" * (i * 37 % 9000)).encode()
for i in range(start, start + 100000):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, content(i))
    os.fsync(fd)
    os.close(fd)
    if point == "after_fsync" and i == pause_at:
        print("paused", i, flush=True)
        sys.stdin.readline()
    os.rename(tmp, path)
    print("saved", i, flush=True)
    if point == "after_rename" and i == pause_at:
        sys.stdin.readline()
"""


def iteration(i: int) -> bytes:
    return (f"iteration {i}\n" + "x" * (i * 37 % 9000)).encode()


def check_after_crash(ws: Workspace, path: Path, oldest_possible: int, newest_possible: int) -> int:
    """Every listed version reads back exactly what its iteration wrote (version N: iteration N-1), the
    file holds the current one's whole content, saved by an iteration in the range given; returns it."""
    listed = versions(alice, path)
    current = listed[-1]["number"]
    assert [v["number"] for v in listed] == list(range(1, current + 1))
    assert oldest_possible <= current - 1 <= newest_possible, (current, oldest_possible, newest_possible)
    folder = view_path(ws, path)
    got = act(alice, """
        import hashlib, json
        print(json.dumps([hashlib.blake2b(open(p, 'rb').read(), digest_size=16).hexdigest() for p in sys.argv[1:]]))
    """, *(str(folder / str(n)) for n in range(1, current + 1)))
    wrong = [(n, listed[n - 1]["size"], len(iteration(n - 1))) for n, h in enumerate(json.loads(got), start=1)
             if h != content_hash(iteration(n - 1))]
    assert wrong == [], f"versions that do not read back what was saved (number, size, expected size): {wrong}"
    assert [v["hash"] for v in listed] == [content_hash(iteration(i)) for i in range(current)]
    assert read_file(alice, path) == iteration(current - 1)
    assert cat_version(alice, path, current - 1) == iteration(current - 2)
    return current - 1


@pytest.mark.parametrize("point", ["after_rename", "after_fsync", "anywhere"])
def test_kill_9_in_a_save_loop_loses_no_version(ws, point):
    set_policy(ws, "versions.keep", "100000")
    path = ws.mnt / "doc.txt"
    last = -1
    for _ in range(2):
        start, pause_at = last + 1, last + 40
        loop = subprocess.Popen(alice.command(PY, "-c", CRASH_LOOP, str(path), str(start), str(pause_at), point),
                                env=alice.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        buffer = bytearray()
        try:
            while True:
                word, number = read_line(loop.stdout, 60, buffer).split()
                if int(number) >= pause_at:
                    break
            ws.kill_daemon()  # the loop is paused right after that step, or (anywhere) still going
        finally:
            loop.kill()
            rest = loop.communicate()[0]
        printed = [line.split() for line in (bytes(buffer) + rest).decode().splitlines()]
        saved_last = max([int(number)] + [int(n) for w, n in printed if w == "saved"]) if word == "saved" \
            else int(number) - 1
        ws.mount()
        # Each fsync commits what came before it: after a kill right after an fsync the file is the content
        # saved before it; after a rename, the old or the new content; anywhere, one of the last saves.
        oldest, newest = {"after_fsync": (saved_last, saved_last), "after_rename": (saved_last - 1, saved_last),
                          "anywhere": (saved_last - 1, saved_last + 1)}[point]
        last = check_after_crash(ws, path, oldest, newest)
    # A clean unmount, fsck and a mount later, every version is still there.
    ws.unmount()
    assert deskfs("fsck", str(ws.store)).stdout.strip() == f"{ws.store}: clean, nothing to repair"
    ws.mount()
    check_after_crash(ws, path, last, last)


def test_versions_survive_restarts_and_fsck_drops_a_version_whose_body_is_gone(ws):
    path = ws.mnt / "g.bin"
    contents = [blob(f"g-{i}", 50_000 + 1000 * i) for i in range(3)]
    create(alice, path, contents[0])
    act(bob, "open(sys.argv[1], 'wb').write(data)", str(path), data=contents[1])
    act(alice, "open(sys.argv[1], 'wb').write(data)", str(path), data=contents[2])
    appended = ws.mnt / "a.log"
    create(alice, appended, b"line 1\n")
    act(bob, "open(sys.argv[1], 'ab').write(b'line 2\\n')", str(appended))
    principals = ["agent:alice", "agent:bob", "agent:alice"]
    for _ in range(2):
        ws.unmount()
        assert deskfs("fsck", str(ws.store)).stdout.strip() == f"{ws.store}: clean, nothing to repair"
        ws.mount()
        assert_history(ws, path, contents, principals, ["open_trunc"] * 2)
        assert_history(ws, appended, [b"line 1\n", b"line 1\nline 2\n"], ["agent:alice", "agent:bob"], ["write"])
    ws.unmount()
    bodies = [p for p in (ws.store / "versions").rglob("*") if p.is_file()]
    second = [p for p in bodies if p.read_bytes() == contents[1]]
    assert len(second) == 1, bodies
    second[0].unlink()
    out = deskfs("fsck", str(ws.store)).stdout
    assert out.splitlines() == ["repaired: dropped 1 versions whose kept content was missing",
                                f"{ws.store}: repaired"], out
    ws.mount()
    listed = versions(alice, path)
    assert [v["number"] for v in listed] == [1, 3]
    assert cat_version(alice, path, 1) == contents[0]
    assert read_file(alice, path) == contents[2]
    line = refused(alice.cli("cat", f"{path}@2"))
    assert line == f"deskfs: {path} has no version 2 (see: deskfs versions {path})"
    assert attempt(alice, f"open('{view_path(ws, path, 2)}', 'rb').read()") == "ENOENT"
    assert sorted(os.listdir(view_path(ws, path)), key=int) == ["1", "3"]


# -- 9. bad input ------------------------------------------------------------------------------------------


def test_bad_version_specs_and_paths_get_one_line_errors_and_change_nothing(ws, tmp_path):
    path = ws.mnt / "f.txt"
    create(alice, path, b"v1\n")
    save(alice, path, b"v2\n")
    act(alice, "os.mkdir(sys.argv[1])", str(ws.mnt / "folder"))
    outside = tmp_path / "outside.txt"
    outside.write_text("not in a workspace\n")
    before_seq, before_list, before_view = last_seq(ws), versions(alice, path), os.listdir(ws.mnt)
    p = str(path)
    usage = [
        ("cat", f"{p}@0"), ("cat", f"{p}@x"), ("cat", f"{p}@"), ("cat", p), ("cat", "@1"), ("cat", f"{p}@-1"),
        ("cat", f"{p}@1.5"), ("cat", f"{p}@9999999999"), ("cat", f"{outside}@1"),
        ("cat", f"{ws.mnt}/.deskfs/versions/f.txt/1@1"), ("cat", f"{ws.mnt}@1"),
        ("diff", f"{p}@x"), ("diff", f"{p}@1", f"{p}@y"), ("diff", f"{outside}@1"),
        ("restore", f"{p}@0"), ("restore", f"{p}@two"), ("restore", p), ("restore", f"{outside}@1"),
        ("restore", f"{ws.mnt / 'folder'}@1"), ("restore", f"{ws.mnt}/.deskfs/versions/f.txt@1"),
        ("versions", str(outside)), ("trash", str(outside)), ("undelete", str(outside)),
        ("config", "versions.keep", "0"), ("config", "versions.keep", "many"), ("config", "versions.days", "-1"),
        ("config", "versions.max_size", "12XB"), ("config", "versions.budget", "150%"),
        ("config", "versions.budget", "10"), ("config", "versions", "maybe"),
    ]
    for args in usage:
        if args[0] == "config":  # as the owner: only the value is wrong
            refused(Who().cli(*args, "--mount", str(ws.mnt)), code=2)
        else:
            refused(alice.cli(*args), code=2)
    refusals = [
        (("cat", f"{p}@3"), f"deskfs: {p} has no version 3 (see: deskfs versions {p})"),
        (("cat", f"{p}@1@1"), f"deskfs: {p}@1: no such file in the workspace"),
        (("cat", f"{ws.mnt}/nothing@1"), f"deskfs: {ws.mnt}/nothing: no such file in the workspace"),
        (("diff", f"{p}@7"), f"deskfs: {p} has no version 7 (see: deskfs versions {p})"),
        (("restore", f"{p}@3"), f"deskfs: {p} has no version 3 (see: deskfs versions {p})"),
        (("restore", f"{p}@123456789"), f"deskfs: {p} has no version 123456789 (see: deskfs versions {p})"),
        (("restore", f"{ws.mnt}/nothing@1"), f"deskfs: {ws.mnt}/nothing: no such file in the workspace"),
        (("undelete", f"{ws.mnt}/never-removed"), f"deskfs: nothing was removed at {ws.mnt}/never-removed"
                                                  " (see: deskfs trash)"),
        (("versions", f"{ws.mnt}/nothing"), "deskfs: no file /nothing you may read in this workspace"),
        (("gc", "--mount", str(ws.mnt)), "deskfs: only the owner of this workspace may collect old versions"),
    ]
    for args, expected in refusals:
        assert refused(alice.cli(*args)) == expected, args
    assert versions(alice, path) == before_list
    assert read_file(alice, path) == b"v2\n" and version_of(alice, path) == 2
    assert os.listdir(ws.mnt) == before_view
    assert outside.read_text() == "not in a workspace\n" and os.listxattr(outside) == []
    changes = [r for r in log(ws) if r["seq"] > before_seq and r["op"] in ("restore", "undelete", "gc", "config")]
    assert [(r["op"], r["errno"]) for r in changes] == [("gc", errno.EPERM)]
    for key, default in (("versions", "on"), ("versions.keep", "50"), ("versions.days", "30"),
                         ("versions.max_size", "64MiB"), ("versions.budget", "10%")):
        assert deskfs("config", key, "--mount", str(ws.mnt)).stdout.strip() == f"{key} = {default}"



# -- 10. reading differences; names that move ------------------------------------------------------


def test_diff_shows_a_unified_diff_for_text_and_one_line_for_binaries(ws):
    path = ws.mnt / "poem.txt"
    create(alice, path, b"roses are red\nviolets are blue\n")
    save(bob, path, b"roses are red\nviolets are violet\n")
    assert cli(alice, "diff", f"{path}@1", f"{path}@2").stdout.decode() == (
        f"--- {path}@1\n+++ {path}@2\n@@ -1,2 +1,2 @@\n roses are red\n-violets are blue\n+violets are violet\n")
    assert cli(alice, "diff", f"{path}@2").stdout.decode() == ""
    now = cli(alice, "diff", f"{path}@1").stdout.decode()
    assert now.splitlines()[:2] == [f"--- {path}@1", f"+++ {path} (now)"]
    binary = ws.mnt / "image.bin"
    create(alice, binary, b"\x89PNG\xff\x00" * 10)
    save(bob, binary, b"\x89PNG\xfe\x00" * 11)
    out = cli(alice, "diff", f"{binary}@1", f"{binary}@2")
    assert out.returncode == 0
    assert out.stdout.decode() == f"binary files {binary}@1 (60 bytes) and {binary}@2 (66 bytes) differ\n"


def test_rename_keeps_history_exchange_swaps_it_and_mv_over_keeps_both(ws):
    a, b, c = ws.mnt / "a.txt", ws.mnt / "b.txt", ws.mnt / "c.txt"
    create(alice, a, b"a1\n")
    save(alice, a, b"a2\n")
    create(bob, b, b"b1\n")
    # A plain rename: the same file, the same history, under its new name.
    act(bob, "os.rename(sys.argv[1], sys.argv[2])", str(a), str(c))
    assert_history(ws, c, [b"a1\n", b"a2\n"], ["agent:alice", "agent:alice"], ["rename_over"])
    # RENAME_EXCHANGE: each name now shows the other file, each file with its own history.
    act(bob, RENAMEAT2 + "renameat2(sys.argv[1], sys.argv[2], RENAME_EXCHANGE)", str(b), str(c))
    assert_history(ws, b, [b"a1\n", b"a2\n"], ["agent:alice", "agent:alice"], ["rename_over"])
    assert_history(ws, c, [b"b1\n"], ["agent:bob"], [])
    # mv of a file with history over another: the target's line goes on (its old content stays a
    # version), and the moved file's own earlier versions go to the trash under its old name.
    act(alice, "os.rename(sys.argv[1], sys.argv[2])", str(b), str(c))
    assert_history(ws, c, [b"b1\n", b"a2\n"], ["agent:bob", "agent:alice"], ["rename_over"])
    assert [(r["path"], r["deleted_by"], r["version"]) for r in trash(alice, ws.mnt)] == [("/b.txt", "agent:alice", 1)]
    assert alice.cli("undelete", str(b)).returncode == 0
    assert read_file(alice, b) == b"a1\n"


def test_hard_links_share_one_history_and_the_last_name_goes_to_the_trash(ws):
    a, b = ws.mnt / "a.txt", ws.mnt / "b.txt"
    create(alice, a, b"one\n")
    act(alice, "os.link(sys.argv[1], sys.argv[2])", str(a), str(b))
    act(bob, "open(sys.argv[1], 'wb').write(b'two\\n')", str(b))
    assert_history(ws, a, [b"one\n", b"two\n"], ["agent:alice", "agent:bob"], ["open_trunc"])
    assert_history(ws, b, [b"one\n", b"two\n"], ["agent:alice", "agent:bob"], ["open_trunc"])
    act(bob, "os.unlink(sys.argv[1])", str(a))
    assert trash(alice, ws.mnt) == []  # it still has a name
    act(bob, "os.unlink(sys.argv[1])", str(b))
    assert [(r["path"], r["deleted_by"], r["version"]) for r in trash(alice, ws.mnt)] == [("/b.txt", "agent:bob", 2)]


def test_with_versions_off_numbers_still_count_and_nothing_is_kept(ws):
    set_policy(ws, "versions", "off")
    path = ws.mnt / "scratch.txt"
    create(alice, path, b"one\n")
    save(bob, path, b"two\n")
    act(bob, "open(sys.argv[1], 'wb').write(b'three\\n')", str(path))
    act(alice, "open(sys.argv[1], 'ab').write(b'four\\n')", str(path))
    assert version_of(alice, path) == 4
    assert [(v["number"], v["current"]) for v in versions(alice, path)] == [(4, True)]
    act(alice, "os.unlink(sys.argv[1])", str(path))
    assert trash(alice, ws.mnt) == []
    assert du(ws.store / "versions") <= 4096
    set_policy(ws, "versions", "on")
    create(alice, path, b"five\n")
    save(bob, path, b"six\n")
    assert_history(ws, path, [b"five\n", b"six\n"], ["agent:alice", "agent:bob"], ["rename_over"])


# -- 11. kill -9 right after a single change ----------------------------------------------------------


@pytest.mark.parametrize("change", ["unlink", "pwrite", "truncate", "o_trunc"])
def test_kill_9_right_after_a_change_leaves_every_listed_version_whole(ws, handles, change):
    """A file with a sealed version 1 (a prefix of the body: kept without a copy) and version 2, then one
    change, then kill -9 at once (within the daemon's commit window): after the remount every version
    listed reads back exactly, and the file (or, removed, the trash) holds its old or its new content."""
    path = ws.mnt / "f.bin"
    c1, c2 = blob("c1", 20000), blob("c2", 5000)
    act(alice, "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644); os.write(fd, data); os.fsync(fd)",
        str(path), data=c1)
    act(alice, "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); os.write(fd, data); os.fsync(fd)",
        str(path), data=c2)
    old = c1 + c2
    assert_history(ws, path, [c1, old], ["agent:alice", "agent:alice"], ["write"], via_cli=False)
    act(alice, "os.fsync(os.open(sys.argv[1], os.O_RDONLY))", str(path))  # all of it committed
    h = handles(bob)
    if change == "unlink":
        assert h("open", "d", str(ws.mnt), ["O_RDONLY"]) == "OK"
        act(bob, "os.unlink(sys.argv[1])", str(path))
        new = None
    elif change == "pwrite":
        assert h("open", "w", str(path), ["O_WRONLY"]) == "OK"
        assert h("pwrite", "w", b"NEW".hex(), 100) == "OK"
        new = old[:100] + b"NEW" + old[103:]
    elif change == "truncate":
        assert h("open", "w", str(path), ["O_WRONLY"]) == "OK"
        act(bob, "os.truncate(sys.argv[1], 1000)", str(path))
        new = old[:1000]
    else:
        assert h("open", "w", str(path), ["O_WRONLY", "O_TRUNC"]) == "OK"
        assert h("write", "w", b"NEW".hex()) == "OK"
        new = b"NEW"
    ws.kill_daemon()
    h.close()
    ws.mount()
    if change == "unlink" and not path.exists():
        assert [(r["path"], r["size"]) for r in trash(alice, ws.mnt)] == [("/f.bin", len(old))]
        assert alice.cli("undelete", str(path)).returncode == 0
        assert read_file(alice, path) == old
    now = read_file(alice, path)
    assert now in (old, new), f"the file holds neither its old nor its new content ({len(now)} bytes)"
    listed = versions(alice, path)
    expected = {1: c1, 2: old, 3: new}
    for v in listed:
        got = plain_cat(alice, view_path(ws, path, v["number"]))
        assert got == (now if v["current"] else expected[v["number"]]), (v, len(got))
        assert v["hash"] == content_hash(got)
    assert [v["number"] for v in listed][:2] == [1, 2]


# -- 12. the hand-off: versions survive ownership transfer and member changes ------------------------


def test_the_whole_history_survives_the_hand_off_to_a_human(desk):
    ws, m = desk, desk.mnt
    helper = Who(agent="helper")
    build(ws, builder, {"work/report.md": "draft by builder\n", "work/scratch.txt": "scratch\n"}, ["work"])
    act(helper, "open(sys.argv[1], 'w').write('edited by helper\\n')", f"{m}/work/report.md")
    act(builder, "open(sys.argv[1], 'a').write('final touch\\n')", f"{m}/work/report.md")
    act(helper, "os.unlink(sys.argv[1])", f"{m}/work/scratch.txt")
    report = m / "work" / "report.md"
    contents = [b"draft by builder\n", b"edited by helper\n", b"edited by helper\nfinal touch\n"]
    principals = ["agent:builder", "agent:helper", "agent:builder"]
    builder.ok(ws, "invite", f"user:{MEMBER}", "--role", "editor")
    builder.ok(ws, "transfer", f"user:{MEMBER}")
    member.ok(ws, "accept-transfer")
    builder.ok(ws, "leave")
    assert_history(ws, report, contents, principals, ["open_trunc", "write"], who=member)
    for number, expected in enumerate(contents, start=1):
        assert cat_version(member, report, number) == expected
        assert plain_cat(member, view_path(ws, report, number)) == expected
    assert [(r["path"], r["deleted_by"]) for r in trash(member, m / "work")] == [("/work/scratch.txt", "agent:helper")]
    assert member.cli("restore", f"{report}@1").returncode == 0
    assert member.cli("undelete", f"{m}/work/scratch.txt").returncode == 0
    assert read_file(member, report) == contents[0] and read_file(member, m / "work/scratch.txt") == b"scratch\n"
    assert [v["principal"] for v in versions(member, report)] == principals + [f"user:{MEMBER}"]
    assert member.cli("gc", "--mount", str(m)).returncode == 0  # the owner now
    refused(builder.cli("versions", str(report)))  # gone from the workspace, and from its history's reach


def test_a_member_undeletes_only_what_it_could_read_where_it_was(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/proj/a.txt": "a\n", "shared/proj/sub/b.txt": "b\n", "private/secret.txt": "secret\n"},
          ["shared", "shared/proj", "shared/proj/sub", "private"])
    builder.py("import os, sys; os.chmod(sys.argv[1], 0o700); os.chmod(sys.argv[2], 0o644)",
               f"{m}/private", f"{m}/private/secret.txt")
    builder.ok(ws, "invite", f"user:{MEMBER}", "--role", "editor")
    assert member.attempts({"read": f"open('{m}/private/secret.txt').read()"}) == {"read": "EACCES"}
    act(builder, "os.unlink(sys.argv[1])", f"{m}/private/secret.txt")
    run(["rm", "-r", f"{m}/shared/proj"], cwd="/", env=builder.env())
    lines = {r["path"]: r["line"] for r in trash(builder, m)}
    assert sorted(lines) == ["/private/secret.txt", "/shared/proj/a.txt", "/shared/proj/sub/b.txt"]
    # What was removed from a folder it may read comes back for the member, the folder with it...
    assert sorted(r["path"] for r in trash(member, m / "shared")) == ["/shared/proj/a.txt", "/shared/proj/sub/b.txt"]
    assert member.cli("undelete", f"{m}/shared/proj").returncode == 0
    assert read_file(member, m / "shared/proj/sub/b.txt") == b"b\n"
    # ...but not what it could not read there, not even by naming its line into a folder of its own.
    assert [r["path"] for r in trash(member, m)] == []
    line = lines["/private/secret.txt"]
    # (Refused as a line it may not read, or as one that does not exist: either way, nothing comes back.)
    assert member.attempts({"undelete": f"os.setxattr('{m}/shared', 'user.deskfs.undelete', b'{line} loot.txt')"}) \
        ["undelete"] in ("EACCES", "ENOENT")
    assert member.attempts({"read": f"open('{m}/shared/loot.txt').read()"}) == {"read": "ENOENT"}
