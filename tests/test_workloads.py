"""Real workloads on a real deskfs mount: the tools people use, each run as its own process.

Each test names the behaviour it checks: git keeps a sound repository, SQLite keeps its locking and
journalling promises under concurrent writers, archives and copies come out identical (modes, times,
links), a venv works, make sees mtimes right, fsynced data survives a killed daemon, and two mounts
live side by side.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from conftest import concurrent_sqlite_writers, deskfs, run

# The interpreter the venv test builds from: the real one, not the test venv's wrapper.
BASE_PYTHON = getattr(sys, "_base_executable", None) or sys.executable


def daemon_log(ws) -> str:
    path = ws.store / "run" / "daemon.log"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_clean_log(ws) -> None:
    log = daemon_log(ws)
    assert "Traceback" not in log and " ERROR " not in log, log


def findmnt(mountpoint: Path) -> subprocess.CompletedProcess:
    return run(["findmnt", "-n", "-o", "TARGET", str(mountpoint)], cwd="/", check=False)


# -- 1. git -------------------------------------------------------------------------------------


GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Desk Test",
    "GIT_AUTHOR_EMAIL": "desk@example.invalid",
    "GIT_COMMITTER_NAME": "Desk Test",
    "GIT_COMMITTER_EMAIL": "desk@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
}


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", "-c", "init.defaultBranch=main", *args], cwd=repo, env=GIT_ENV)


def test_git_repository_lifecycle(ws):
    repo = ws.mnt / "repo"
    repo.mkdir()
    git(repo, "init")
    (repo / "README").write_text("deskfs\n")
    (repo / "src").mkdir()
    for i in range(20):
        (repo / "src" / f"mod{i}.py").write_text(f"VALUE = {i}\n" * (i + 1))
    (repo / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (repo / "run.sh").chmod(0o755)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")

    git(repo, "branch", "feature")
    git(repo, "checkout", "-q", "feature")
    (repo / "src" / "mod3.py").write_text("VALUE = 'changed'\n")
    (repo / "src" / "mod4.py").unlink()
    (repo / "NEW").write_text("new on feature\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "feature work")
    assert git(repo, "status", "--porcelain").stdout == ""

    git(repo, "checkout", "-q", "main")
    assert (repo / "src" / "mod4.py").read_text() == "VALUE = 4\n" * 5
    assert not (repo / "NEW").exists()
    assert git(repo, "status", "--porcelain").stdout == ""
    git(repo, "checkout", "-q", "feature")
    assert (repo / "NEW").read_text() == "new on feature\n"
    assert not (repo / "src" / "mod4.py").exists()
    assert git(repo, "status", "--porcelain").stdout == ""
    assert os.stat(repo / "run.sh").st_mode & 0o777 == 0o755

    git(repo, "fsck", "--full", "--strict")
    git(repo, "gc", "--aggressive", "--prune=now")
    git(repo, "fsck", "--full", "--strict")
    assert git(repo, "status", "--porcelain").stdout == ""
    assert git(repo, "rev-list", "--count", "feature").stdout.strip() == "2"
    assert git(repo, "log", "--format=%s", "main").stdout.split("\n")[0] == "first"
    assert_clean_log(ws)


# -- 2. sqlite ----------------------------------------------------------------------------------


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_concurrent_writers(ws, journal_mode):
    db = ws.mnt / "shared.db"
    summary = concurrent_sqlite_writers(db, journal_mode, rows=250, envs=[None] * 4)
    assert summary == [journal_mode, "ok", "1000", "1000", "250,250,250,250"]
    # The sqlite3 shell, a different program, agrees.
    assert run(["sqlite3", str(db), "PRAGMA integrity_check;"], cwd=ws.mnt).stdout.strip() == "ok"
    assert_clean_log(ws)


# -- 3. tar -------------------------------------------------------------------------------------


def test_tar_extract_stdlib_identical(ws, tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    excludes = ["--exclude=./site-packages", "--exclude=__pycache__"]
    archive = tmp_path / "stdlib.tar"
    run(["tar", "-C", str(stdlib), "-cf", str(archive), *excludes, "."], cwd=tmp_path)
    listed = run(["tar", "-tf", str(archive)], cwd=tmp_path).stdout.splitlines()
    assert len(listed) > 1000, "the archive should be a real source tree"

    dest = ws.mnt / "stdlib"
    dest.mkdir()
    run(["tar", "-C", str(dest), "-xf", str(archive)], cwd=tmp_path)
    diff = run(
        ["diff", "-r", "--no-dereference", "-x", "site-packages", "-x", "__pycache__", str(stdlib), str(dest)],
        cwd=tmp_path, check=False,
    )
    assert diff.returncode == 0, diff.stdout[-5000:] + diff.stderr[-2000:]

    # And it survives a remount byte for byte.
    ws.unmount()
    ws.mount()
    diff = run(
        ["diff", "-r", "--no-dereference", "-x", "site-packages", "-x", "__pycache__", str(stdlib), str(dest)],
        cwd=tmp_path, check=False,
    )
    assert diff.returncode == 0, diff.stdout[-5000:] + diff.stderr[-2000:]
    assert_clean_log(ws)


# -- 4. cp -a -----------------------------------------------------------------------------------


def test_cp_a_preserves_modes_times_links(ws, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "shared").mkdir()
    files = {
        "secret": 0o600,
        "tool": 0o755,
        "plain": 0o644,
        "sub/readonly": 0o444,
        "shared/doc": 0o640,
    }
    for i, (name, mode) in enumerate(files.items()):
        (src / name).write_bytes(f"{name}\n".encode() * (i + 1))
        (src / name).chmod(mode)
    os.chmod(src / "shared", 0o2775)
    os.chmod(src / "sub", 0o750)
    os.link(src / "tool", src / "sub" / "tool-hardlink")
    os.symlink("../plain", src / "sub" / "rel-link")
    os.symlink("/etc/hostname", src / "abs-link")
    os.symlink("nowhere/at/all", src / "dangling")

    # Distinct nanosecond mtimes everywhere (files, links, folders), set last so nothing disturbs them.
    # (The hard link is the same inode as "tool": it gets its time through that name.)
    base = 1_600_000_000_123_456_789
    times: dict[str, int] = {}
    for k, path in enumerate(sorted(src.rglob("*"))):
        rel = str(path.relative_to(src))
        if rel != "sub/tool-hardlink":
            times[rel] = base + k * 1_000_000_007 + k * 13
            os.utime(path, ns=(base, times[rel]), follow_symlinks=False)
    times["sub/tool-hardlink"] = times["tool"]
    os.utime(src, ns=(base, base - 1))
    times["."] = base - 1

    expected = {str(p.relative_to(src)): os.lstat(p) for p in src.rglob("*")}
    expected["."] = os.lstat(src)

    dst = ws.mnt / "copy"
    run(["cp", "-a", str(src), str(dst)], cwd=tmp_path)

    for rel, want in expected.items():
        got = os.lstat(dst / rel)
        assert stat.S_IFMT(got.st_mode) == stat.S_IFMT(want.st_mode), rel
        if not stat.S_ISLNK(want.st_mode):
            assert oct(stat.S_IMODE(got.st_mode)) == oct(stat.S_IMODE(want.st_mode)), rel
        assert got.st_mtime_ns == want.st_mtime_ns == times[rel], rel
        assert (got.st_uid, got.st_gid) == (want.st_uid, want.st_gid), rel
        if stat.S_ISREG(want.st_mode):
            assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel

    assert stat.S_IMODE(os.stat(dst / "secret").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(dst / "tool").st_mode) == 0o755
    assert os.stat(dst / "shared").st_mode & stat.S_ISGID
    assert os.readlink(dst / "sub" / "rel-link") == "../plain"
    assert os.readlink(dst / "abs-link") == "/etc/hostname"
    assert os.readlink(dst / "dangling") == "nowhere/at/all"
    assert (dst / "sub" / "rel-link").read_bytes() == (src / "plain").read_bytes()

    a, b = os.stat(dst / "tool"), os.stat(dst / "sub" / "tool-hardlink")
    assert a.st_ino == b.st_ino
    assert a.st_nlink == b.st_nlink == 2
    assert os.stat(dst / "secret").st_nlink == 1

    # The same facts hold after a remount (they are in the store, not only in the kernel's caches).
    ws.unmount()
    ws.mount()
    a, b = os.stat(dst / "tool"), os.stat(dst / "sub" / "tool-hardlink")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    for rel, want in expected.items():
        got = os.lstat(dst / rel)
        assert got.st_mtime_ns == want.st_mtime_ns, rel
        if not stat.S_ISLNK(want.st_mode):
            assert stat.S_IMODE(got.st_mode) == stat.S_IMODE(want.st_mode), rel
    assert os.readlink(dst / "sub" / "rel-link") == "../plain"
    assert_clean_log(ws)


# -- 5. venv ------------------------------------------------------------------------------------


def test_venv_on_the_mount(ws):
    venv = ws.mnt / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    run([BASE_PYTHON, "-m", "venv", "--without-pip", str(venv)], cwd=ws.mnt, env=env)
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               cwd=ws.mnt, env=env).stdout.strip()
    assert Path(site).is_relative_to(venv), site
    (Path(site) / "deskfs_probe.py").write_text("ANSWER = 42\n")
    out = run(
        [str(python), "-c", "import sys, deskfs_probe; print(deskfs_probe.ANSWER, deskfs_probe.__file__, sys.prefix)"],
        cwd="/", env=env,
    ).stdout.split()
    assert out[0] == "42"
    assert out[1] == str(Path(site) / "deskfs_probe.py")
    assert out[2] == str(venv)
    assert_clean_log(ws)


# -- 6. make ------------------------------------------------------------------------------------


MAKEFILE = """\
CC = cc
CFLAGS = -O0 -Wall

prog: main.o util.o
\t$(CC) -o $@ main.o util.o

main.o: main.c util.h
\t$(CC) $(CFLAGS) -c -o $@ main.c

util.o: util.c util.h
\t$(CC) $(CFLAGS) -c -o $@ util.c
"""


def compiled(make_output: str) -> list[str]:
    """The .c files a make run compiled, from the commands it echoed."""
    return sorted(word for line in make_output.splitlines() if " -c " in line
                  for word in line.split() if word.endswith(".c"))


def test_make_builds_and_rebuilds_only_what_changed(ws):
    proj = ws.mnt / "proj"
    proj.mkdir()
    (proj / "Makefile").write_text(MAKEFILE)
    (proj / "util.h").write_text("int twice(int x);\n")
    (proj / "util.c").write_text('#include "util.h"\nint twice(int x) { return 2 * x; }\n')
    (proj / "main.c").write_text(
        '#include <stdio.h>\n#include "util.h"\nint main(void) { printf("%d\\n", twice(21)); return 0; }\n'
    )

    first = run(["make"], cwd=proj)
    assert compiled(first.stdout) == ["main.c", "util.c"], first.stdout
    assert run(["./prog"], cwd=proj).stdout == "42\n"

    second = run(["make"], cwd=proj)
    assert compiled(second.stdout) == [], second.stdout
    assert "cc" not in second.stdout.split(), second.stdout
    assert "is up to date" in second.stdout or "Nothing to be done" in second.stdout, second.stdout
    assert run(["make", "-q"], cwd=proj, check=False).returncode == 0

    run(["touch", "util.c"], cwd=proj)
    third = run(["make"], cwd=proj)
    assert compiled(third.stdout) == ["util.c"], third.stdout
    assert "-o prog" in third.stdout, third.stdout  # relinked
    assert run(["./prog"], cwd=proj).stdout == "42\n"

    fourth = run(["make"], cwd=proj)
    assert compiled(fourth.stdout) == [], fourth.stdout
    assert_clean_log(ws)


# -- 7. crash -----------------------------------------------------------------------------------


CRASH_WRITER = textwrap.dedent(
    """
    import os, sys
    root = sys.argv[1]
    for i in range(2000):
        d = os.path.join(root, f"d{i % 20:02d}")
        os.makedirs(d, exist_ok=True)
        fd = os.open(os.path.join(d, f"f{i:04d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, (f"file {i} " * (1 + i % 37)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(root, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    print("done")
    """
)


def expected_body(i: int) -> bytes:
    return (f"file {i} " * (1 + i % 37)).encode()


def test_fsynced_files_survive_daemon_kill(ws):
    root = ws.mnt / "crash"
    out = run([sys.executable, "-c", CRASH_WRITER, str(root)], cwd=ws.mnt).stdout
    assert out == "done\n"

    ws.kill_daemon()
    assert findmnt(ws.mnt).returncode != 0, "the killed mount should be gone"
    ws.mount()

    verify = textwrap.dedent(
        """
        import os, sys
        root, bad = sys.argv[1], []
        for i in range(2000):
            path = os.path.join(root, f"d{i % 20:02d}", f"f{i:04d}")
            want = (f"file {i} " * (1 + i % 37)).encode()
            try:
                with open(path, "rb") as f:
                    got = f.read()
            except OSError as exc:
                bad.append(f"{path}: {exc}")
                continue
            if got != want or os.stat(path).st_size != len(want):
                bad.append(f"{path}: {len(got)} bytes, wanted {len(want)}")
        print(len(bad)); print("\\n".join(bad[:20]))
        """
    )
    out = run([sys.executable, "-c", verify, str(root)], cwd=ws.mnt).stdout
    assert out.split("\n")[0] == "0", out
    assert sum(len(os.listdir(root / f"d{k:02d}")) for k in range(20)) == 2000
    assert (root / "d07" / "f1987").read_bytes() == expected_body(1987)

    ws.unmount()
    result = deskfs("fsck", str(ws.store))
    assert result.returncode == 0
    # The mount after the crash already repaired what the crash left; a clean unmount leaves nothing to do.
    assert "clean, nothing to repair" in result.stdout, result.stdout
    log = daemon_log(ws)
    assert "Traceback" not in log and " ERROR " not in log, log


# -- 8. two mounts ------------------------------------------------------------------------------


def test_two_stores_mounted_side_by_side(make_workspace):
    a = make_workspace("a")
    b = make_workspace("b")
    run("mkdir only-a && echo alpha > only-a/who && echo AAA > common", cwd=a.mnt)
    run("mkdir only-b && echo beta > only-b/who && echo BBB > common", cwd=b.mnt)

    assert sorted(os.listdir(a.mnt)) == ["common", "only-a"]
    assert sorted(os.listdir(b.mnt)) == ["common", "only-b"]
    assert run(["cat", "common", "only-a/who"], cwd=a.mnt).stdout == "AAA\nalpha\n"
    assert run(["cat", "common", "only-b/who"], cwd=b.mnt).stdout == "BBB\nbeta\n"
    assert os.stat(a.mnt).st_dev != os.stat(b.mnt).st_dev

    sources = run(["findmnt", "-n", "-t", "fuse.deskfs", "-o", "TARGET,SOURCE"], cwd="/").stdout
    assert f"{a.mnt} {a.store}" in " ".join(sources.split()), sources
    assert f"{b.mnt} {b.store}" in " ".join(sources.split()), sources

    a.unmount()
    assert findmnt(a.mnt).returncode != 0
    assert run(["cat", "only-b/who"], cwd=b.mnt).stdout == "beta\n"  # b is untouched by a's unmount
    b.unmount()
    assert findmnt(b.mnt).returncode != 0
    assert os.listdir(a.mnt) == [] and os.listdir(b.mnt) == []

    # Each store kept its own content.
    a.mount()
    b.mount()
    assert (a.mnt / "common").read_text() == "AAA\n" and not (a.mnt / "only-b").exists()
    assert (b.mnt / "common").read_text() == "BBB\n" and not (b.mnt / "only-a").exists()
    a.unmount()
    b.unmount()
    assert findmnt(a.mnt).returncode != 0 and findmnt(b.mnt).returncode != 0
    for w in (a, b):
        assert_clean_log(w)
