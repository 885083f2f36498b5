"""Test harness: real deskfs mounts in temporary folders, driven from separate processes.

Every mount a test makes is unmounted when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
# The command as installed for every local user (scripts/install): tests run what users run, root and
# other Unix users alike. The session starts by installing this clone's source there if it changed.
DESKFS = "/usr/local/bin/deskfs"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.exit("/dev/fuse is missing: the deskfs suite mounts real filesystems and cannot run", returncode=1)
    if os.geteuid() != 0:
        pytest.exit("the deskfs suite runs as root (it mounts, and creates Unix users)", returncode=1)
    installed = subprocess.run([str(REPO / "scripts" / "install")], capture_output=True, text=True)
    if installed.returncode != 0:
        pytest.exit(f"scripts/install failed, so the suite would not test this source:\n{installed.stderr}",
                    returncode=1)


def deskfs(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `deskfs` command."""
    result = subprocess.run([DESKFS, *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"deskfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


class Workspace:
    """One store and its mount."""

    def __init__(self, root: Path, name: str = "ws") -> None:
        self.store = root / f"{name}-store"
        self.mnt = root / f"{name}-mnt"
        self.mnt.mkdir()
        deskfs("init", str(self.store))
        self.mounted = False

    def mount(self, *extra: str) -> subprocess.CompletedProcess:
        result = deskfs("mount", *extra, str(self.store), str(self.mnt))
        self.mounted = True
        return result

    def unmount(self) -> None:
        deskfs("unmount", str(self.mnt))
        self.mounted = False

    def invite(self, principal: str, role: str = "editor") -> None:
        """Make `principal` a member (other Unix users are none until invited by the owner, root here)."""
        deskfs("invite", principal, "--role", role, "--mount", str(self.mnt))

    @property
    def daemon_pid(self) -> int:
        return int((self.store / "run" / "daemon.lock").read_text().strip())

    def kill_daemon(self) -> None:
        """kill -9 the daemon and wait until it is gone (its store lock is released at death)."""
        os.kill(self.daemon_pid, signal.SIGKILL)
        self.wait_daemon_gone()
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        self.mounted = False

    def wait_daemon_gone(self) -> None:
        fd = os.open(self.store / "run" / "daemon.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def cleanup(self) -> None:
        if not self.mounted:
            return
        result = deskfs("unmount", str(self.mnt), check=False)
        if result.returncode != 0:
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
            try:
                os.kill(self.daemon_pid, signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
            self.wait_daemon_gone()
        self.mounted = False


@contextlib.contextmanager
def workspace_on_a_tiny_disk(tmp_path: Path, workspace_class: type = Workspace) -> Iterator["Workspace"]:
    """A mounted workspace whose store lives on a 64 MiB tmpfs; unmounted and the tmpfs removed after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(disk)], cwd="/")
    ws = None
    try:
        ws = workspace_class(disk)
        ws.mount()
        yield ws
    finally:
        if ws is not None:
            ws.cleanup()
        run(["umount", str(disk)], cwd="/")


@pytest.fixture(autouse=True)
def daemon_logs_stay_clean(tmp_path):
    """No request of a test may end in an internal error (EIO) in any daemon it started."""
    yield
    for log in tmp_path.glob("**/run/daemon.log"):
        text = log.read_text(errors="replace")
        assert "internal error" not in text and "Traceback" not in text, f"{log}:\n{text[-3000:]}"


@pytest.fixture
def make_workspace(tmp_path: Path) -> Iterator:
    """Factory for workspaces, all unmounted at the end of the test."""
    made: list[Workspace] = []

    def make(name: str = "ws", mount: bool = True, *mount_args: str) -> Workspace:
        ws = Workspace(tmp_path, name)
        made.append(ws)
        if mount:
            ws.mount(*mount_args)
        return ws

    yield make
    for ws in made:
        ws.cleanup()


@pytest.fixture
def ws(make_workspace) -> Workspace:
    """A mounted workspace."""
    return make_workspace()


def run(cmd: list[str] | str, cwd: Path | str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool as a separate process, failing the test with its output if it fails."""
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, shell=isinstance(cmd, str), **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


PY = "/usr/bin/python3"  # readable by every user (the venv's interpreter lives under /root)


def as_user(user: pwd.struct_passwd | None) -> list[str]:
    """The command prefix that runs a program as `user` (nothing for root)."""
    if user is None:
        return []
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]


def command_as(user: str, *command: str, agent: str | None = None) -> list[str]:
    """`command` as Unix user `user` with a clean environment (plus DESKFS_AGENT=agent if given)."""
    prefix = [*as_user(pwd.getpwnam(user)), "--reset-env", "env"]
    if agent is not None:
        prefix.append(f"DESKFS_AGENT={agent}")
    return [*prefix, *command]


def base_env() -> dict[str, str]:
    """This process's environment without DESKFS_AGENT: a root process that is no agent."""
    return {k: v for k, v in os.environ.items() if k != "DESKFS_AGENT"}


def agent_env(name: str | None) -> dict[str, str]:
    """The environment of root's agent `name` (of root itself, no agent, when None)."""
    env = base_env()
    if name is not None:
        env["DESKFS_AGENT"] = name
    return env


def unix_users(*names: str) -> dict[str, pwd.struct_passwd]:
    """Unix users `names`, each created if missing (no home, own group, /bin/sh) and kept between runs."""
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            result = subprocess.run(["useradd", "-M", "-U", "-s", "/bin/sh", name], capture_output=True, text=True)
            if result.returncode not in (0, 9):  # 9: exists (another run raced us)
                raise AssertionError(f"useradd {name}: {result.stderr}")
    return {name: pwd.getpwnam(name) for name in names}


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A new folder that every local user may pass through (0711), removed at the end.

    Not under pytest's own temporary folders: every pytest session that starts makes those 0700 again.
    Whatever a test mounts in it must be unmounted by the test; daemon logs in it are checked as in tmp_path.
    """
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="deskfs-test-"))
    os.chmod(folder, 0o711)
    try:
        yield folder
        for log in folder.glob("**/run/daemon.log"):
            text = log.read_text(errors="replace")
            assert "internal error" not in text and "Traceback" not in text, f"{log}:\n{text[-3000:]}"
    finally:
        with open("/proc/self/mountinfo") as f:  # a test that failed before its unmount: never walk into it
            left = [line.split()[4] for line in f if line.split()[4].startswith(f"{folder}/")]
        for mountpoint in left:
            subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def shared_workspace(make_workspace, tmp_path: Path, invite: tuple[str, ...] = ()) -> Workspace:
    """A workspace mounted with --allow-other, reachable by other Unix users; those in `invite` made editors."""
    for folder in (tmp_path, tmp_path.parent, tmp_path.parent.parent):  # pytest's temp folders are 0700
        os.chmod(folder, os.stat(folder).st_mode | 0o711)
    ws = make_workspace("ws", True, "--allow-other")
    for name in invite:
        ws.invite(f"user:{name}")
    return ws


def system_deskfs() -> list[str]:
    """The `deskfs` command as every local user runs it: the installed one."""
    return [DESKFS]


def user_deskfs(user: str) -> list[str]:
    """The `deskfs` command as Unix user `user` runs it: the installed one, as for every user."""
    return [DESKFS]


def wait_until(predicate, timeout: float, what: str):
    """Poll `predicate` until it is true (returns its value), or fail after `timeout` seconds: for events
    the tests can only observe from outside (a lock line in /proc/locks, a file the daemon frees)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one line a command printed (stdout and stderr together); never a traceback."""
    text = (result.stdout + result.stderr).strip()
    assert text and "\n" not in text, f"expected one line, got {text!r}"
    assert "Traceback" not in text
    return text


def read_line(stream, timeout: float, buffer: bytearray) -> str:
    """The next line of a child's pipe (`buffer` keeps what came after it); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no answer within {timeout} s (got so far {bytes(buffer)!r})")
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"process ended without answering (got {bytes(buffer)!r})")
            buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


class RequestServer:
    """A child process that does what it is asked, one JSON list per line on its stdin, each answered with
    one JSON line; it (and the handles it opens) lives until closed."""

    def __init__(self, command: list[str], cwd: Path | str, env: dict[str, str] | None) -> None:
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.buffer = bytearray()

    def __call__(self, *op):
        self.proc.stdin.write((json.dumps([str(a) if isinstance(a, Path) else a for a in op]) + "\n").encode())
        return json.loads(read_line(self.proc.stdout, 30, self.buffer))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def py(code: str, cwd: Path, user: pwd.struct_passwd | None = None, check: bool = True,
       **kwargs) -> subprocess.CompletedProcess:
    """Run a python snippet in its own process (as `user` if given)."""
    return run([*as_user(user), PY, "-c", textwrap.dedent(code)], cwd=cwd, check=check, **kwargs)


OUTCOME = """
import errno, os, sys
try:
{}
except OSError as e:
    # EOPNOTSUPP by its usual name (errno.errorcode says ENOTSUP, its alias on Linux)
    print('EOPNOTSUPP' if e.errno == errno.EOPNOTSUPP else errno.errorcode[e.errno])
    sys.exit(0)
print('OK')
"""


def outcome(code: str, cwd: Path, user: pwd.struct_passwd | None = None) -> str:
    """Run a snippet; 'OK' if it completes, else the errno name (e.g. 'EEXIST') of the OSError it raised."""
    wrapped = OUTCOME.format(textwrap.indent(textwrap.dedent(code), "    "))
    return py(wrapped, cwd, user).stdout.strip().splitlines()[-1]


SQLITE_WRITER = """
import sqlite3, sys
path, writer, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = sqlite3.connect(path, isolation_level=None, timeout=60)
conn.execute("PRAGMA busy_timeout=60000")
sys.stdin.readline()  # start together: every writer is released at once
for i in range(rows):
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t (writer, seq, payload) VALUES (?, ?, ?)", (writer, i, f"{writer}-{i}" * 20))
    if i % 10 == 0:
        conn.execute("SELECT COUNT(*) FROM t").fetchone()
    conn.execute("COMMIT")
conn.close()
"""

SQLITE_SUMMARY = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
print(conn.execute("PRAGMA journal_mode").fetchone()[0])
print(conn.execute("PRAGMA integrity_check").fetchone()[0])
print(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])
print(conn.execute("SELECT COUNT(DISTINCT writer || '-' || seq) FROM t").fetchone()[0])
print(conn.execute("SELECT group_concat(n) FROM (SELECT COUNT(*) AS n FROM t GROUP BY writer ORDER BY writer)").fetchone()[0])
"""


def concurrent_sqlite_writers(db: Path, journal_mode: str, rows: int, envs: list[dict | None]) -> list[str]:
    """One database, one writer process per entry of `envs` inserting `rows` rows each, all at once.

    Returns [journal mode, integrity_check, rows, distinct rows, rows per writer joined by commas].
    """
    setup = (f"import sqlite3; c = sqlite3.connect({str(db)!r}, isolation_level=None);"
             f" print(c.execute('PRAGMA journal_mode={journal_mode}').fetchone()[0]);"
             " c.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, writer INT, seq INT, payload TEXT)')")
    assert run([sys.executable, "-c", setup], cwd=db.parent, env=envs[0]).stdout.strip() == journal_mode
    writers = [
        subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(db), str(w), str(rows)], cwd=db.parent,
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w, env in enumerate(envs)
    ]
    for proc in writers:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in writers:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    return run([sys.executable, "-c", SQLITE_SUMMARY, str(db)], cwd=db.parent, env=envs[-1]).stdout.split()


# renameat2(2) for snippets: Python has no binding for it.
RENAMEAT2 = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def renameat2(old, new, flags):
    if libc.renameat2(-100, old.encode(), -100, new.encode(), flags) != 0:  # -100: AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
"""
