"""Roles on a real deskfs mount: owner, editors, viewers, non-members, and how ownership moves.

Every actor is its own process with a real identity: root's agents (DESKFS_AGENT=NAME in the environment
of a root process), and other Unix users (deskfs-client, deskfs-member, deskfs-stranger) run through
setpriv with a clean environment. Files the other users touch are 0666 and folders 0777 (and a file the
client chmods is the client's own), so the kernel's Unix permission check passes and every refusal seen
comes from the role; where it matters a test shows the same operation succeeding once the role allows it.

Covered: the seed protocol (a builder agent builds, invites a viewer, hands ownership over and leaves);
owner-only management (invite, role, remove, transfer, breaking leases, settings) refused to editors with
EPERM journal records; ownership cannot be taken by racing, after expiry, without an offer, or kept by
removing/leaving; agent names cannot be claimed across Unix users, nor an invited agent's name taken by
claiming it after the invitation; on a shared (--allow-other) mount nothing a member looked at can be
stat-ed by a non-member (the kernel keeps no attributes there), and role changes reach open file and folder
handles; bad input gives one-line errors with exit 2 or 1; the owner's own agents are editors by default
until `members.own_agents` says otherwise; `deskfs status` and the locks listing show a member
who is not the owner only the paths it may read.

On a shared mount names directly below the root are not cached either, so a non-member learns nothing
about them from a member's lookups (statx with AT_STATX_DONT_SYNC, cached misses); an agent name claimed
by another Unix user before the owner invites it is not given that user's invitation unless the owner says
`--bound-to` that user.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (DESKFS, PY, RequestServer, Workspace, agent_env, command_as, deskfs, system_deskfs,
                      unix_users)

CLIENT, MEMBER, STRANGER = "deskfs-client", "deskfs-member", "deskfs-stranger"
BUILDER = "builder"
WHOAMI = "user.deskfs.whoami"
LOCK = "user.deskfs.lock"


# -- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Who:
    """An actor: root (user None) or another Unix user, with DESKFS_AGENT=agent in its environment if given."""

    user: str | None = None
    agent: str | None = None

    def command(self, *cmd: str) -> list[str]:
        if self.user is None:
            return list(cmd)
        return command_as(self.user, *cmd, agent=self.agent)

    def env(self) -> dict[str, str] | None:
        if self.user is not None:
            return None  # setpriv --reset-env, then `env` sets what is needed
        return agent_env(self.agent)

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*cmd), cwd="/", env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(*cmd), cwd="/", env=self.env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def deskfs_command(self) -> list[str]:
        # Every user runs the installed command (scripts/install puts it where all may run it).
        if self.user is None:
            return [DESKFS]
        return system_deskfs()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`deskfs ARGS` exactly as given."""
        return self.run(*self.deskfs_command(), *args)

    def deskfs(self, ws: Workspace, *args: str) -> subprocess.CompletedProcess:
        """`deskfs ARGS --mount MOUNTPOINT`."""
        return self.cli(*args, "--mount", str(ws.mnt))

    def ok(self, ws: Workspace, *args: str) -> str:
        result = self.deskfs(ws, *args)
        assert result.returncode == 0, f"{self} deskfs {' '.join(args)}: {result.returncode} {result.stderr}"
        assert "Traceback" not in result.stderr
        return result.stdout

    def py(self, code: str, *args: str) -> str:
        result = self.run(PY, "-c", textwrap.dedent(code), *args)
        assert result.returncode == 0, f"{self}: {result.stderr}"
        return result.stdout

    def attempts(self, steps: dict[str, str]) -> dict[str, str]:
        """Run each step in order in one process: 'OK', or the errno name of the OSError it raised."""
        lines = ["import errno, json, os", "results = {}"]
        for label, code in steps.items():
            lines += ["try:", textwrap.indent(textwrap.dedent(code).strip(), "    "),
                      f"    results[{label!r}] = 'OK'",
                      "except OSError as e:", f"    results[{label!r}] = errno.errorcode[e.errno]"]
        lines.append("print(json.dumps(results))")
        return json.loads(self.py("\n".join(lines)))

    def whoami(self, path: Path) -> str:
        """Who the mount sees: the whoami xattr, or for a non-member, which may not read the root
        (docs/security.md), the daemon's answer to `deskfs whoami`."""
        result = self.run("getfattr", "--only-values", "-n", WHOAMI, str(path))
        if result.returncode != 0 and "Permission denied" in result.stderr and self.user is not None:
            result = self.cli("whoami", "--mount", str(path))
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()
        assert result.returncode == 0, result.stderr
        return result.stdout

    @property
    def principal(self) -> str:
        return f"agent:{self.agent}" if self.user is None and self.agent else f"user:{self.user or 'root'}"


def refused(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The one line of a refusal (exit 1) or a usage error (exit 2); never a traceback."""
    text = result.stderr.strip()
    assert result.returncode == code, f"expected exit {code}, got {result.returncode}: {result.stdout!r} {text!r}"
    assert "Traceback" not in result.stderr + result.stdout
    assert text.startswith("deskfs: ") and "\n" not in text, f"expected one line on stderr, got {text!r}"
    assert result.stdout == "", result.stdout
    return text


def members(who: Who, ws: Workspace) -> dict:
    return json.loads(who.ok(ws, "members", "--json"))


def roles(who: Who, ws: Workspace) -> dict[str, str]:
    return {m["principal"]: m["role"] for m in members(who, ws)["members"]}


def journal(who: Who, ws: Workspace) -> list[dict]:
    records = [json.loads(line) for line in who.ok(ws, "log", "--json", "--limit", "0").splitlines()]
    return sorted(records, key=lambda r: r["seq"])


def expanded(records: list[dict]) -> list[dict]:
    """Records with each coalesced refusal (`repeated: N` in its details) counted N times, in place."""
    return [r for r in records for _ in range((r["details"] or {}).get("repeated", 1))]


def denied(records: list[dict], principal: str, code: int) -> list[dict]:
    return expanded([r for r in records if r["principal"] == principal and r["errno"] == code])


# Reading the tree: journaled only when refused.
READ_ONLY_OPS = {"lookup", "getattr", "readlink", "opendir", "readdir", "getxattr", "listxattr"}


def wait_for_record(who: "Who", ws: Workspace, match, timeout: float = 10) -> dict:
    """The first journal record `match` accepts, waiting for it (the kernel sends some requests late)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in journal(who, ws) if match(r)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such journal record within {timeout} s")
        time.sleep(0.1)


# statx(2) of a path, with flags and mask (Python's os.stat always asks the kernel to be up to date):
# prints the size, or the errno's name.
STATX = r"""
import ctypes, errno, platform, sys
libc = ctypes.CDLL(None, use_errno=True)
number = {"x86_64": 332, "aarch64": 291}[platform.machine()]
buf = ctypes.create_string_buffer(256)
if libc.syscall(number, -100, sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3]), buf) != 0:  # AT_FDCWD
    print(errno.errorcode[ctypes.get_errno()])
else:
    print(int.from_bytes(buf.raw[40:48], "little"))  # stx_size
"""
AT_STATX_DONT_SYNC, STATX_BASIC_STATS = 0x4000, 0x7FF


# A process that keeps file descriptors open and works on them on request (one JSON list per line on
# stdin), answering each with one JSON line: "OK", the data read, or the errno's name.
FD_SERVER = r"""
import errno, json, os, sys
fds = {}
for line in sys.stdin:
    op, *a = json.loads(line)
    try:
        result = "OK"
        if op == "open":
            fds[a[0]] = os.open(a[1], getattr(os, a[2]))
        elif op == "pwrite":
            os.pwrite(fds[a[0]], a[1].encode(), a[2])
        elif op == "pread":
            result = os.pread(fds[a[0]], a[1], a[2]).decode()
        elif op == "ftruncate":
            os.ftruncate(fds[a[0]], a[1])
        elif op == "opendir":
            fds[a[0]] = os.open(a[1], os.O_RDONLY | os.O_DIRECTORY)
        elif op == "listdir":
            result = sorted(os.listdir(fds[a[0]]))
        elif op == "getdents":
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            os.lseek(fds[a[0]], 0, os.SEEK_SET)
            buf = ctypes.create_string_buffer(65536)
            import platform  # getdents64 straight on the open descriptor: no fstat, no opendir
            number = {"x86_64": 217, "aarch64": 61}[platform.machine()]
            n = libc.syscall(number, fds[a[0]], buf, 65536)
            if n < 0:
                raise OSError(ctypes.get_errno(), "getdents64")
            names, off = [], 0
            while off < n:
                reclen = int.from_bytes(buf.raw[off + 16:off + 18], "little")
                names.append(buf.raw[off + 19:off + reclen].split(b"\0", 1)[0].decode())
                off += reclen
            result = sorted(x for x in names if x not in (".", ".."))
        elif op == "fstat":
            result = os.fstat(fds[a[0]]).st_size
        elif op == "close":
            os.close(fds.pop(a[0]))
    except OSError as exc:
        result = errno.errorcode[exc.errno]
    print(json.dumps(result), flush=True)
"""


class FdServer(RequestServer):
    def __init__(self, who: Who) -> None:
        super().__init__(who.command(PY, "-c", FD_SERVER), "/", who.env())


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def people() -> dict[str, pwd.struct_passwd]:
    """Unix users deskfs-client, deskfs-member and deskfs-stranger (created once, kept between runs)."""
    return unix_users(CLIENT, MEMBER, STRANGER)


class SeededWorkspace(Workspace):
    """A store made by `DESKFS_AGENT=builder deskfs init STORE` (as root): agent:builder owns it."""

    def __init__(self, root: Path, name: str = "ws") -> None:
        self.store = root / f"{name}-store"
        self.mnt = root / f"{name}-mnt"
        self.mnt.mkdir()
        out = deskfs("init", str(self.store), env=Who(agent=BUILDER).env()).stdout
        assert "owned by agent:builder" in out, out
        self.mounted = False


@pytest.fixture
def desk(people):
    """A builder-owned workspace mounted with --allow-other, its root 0777; unmounted at the end.

    It lives in a folder of its own under /tmp, not under tmp_path: the other Unix users must traverse
    to the mount and to the store's control socket, and every pytest session that starts as root makes
    /tmp/pytest-of-root 0700 again, which would shut them out mid-test whenever another session runs.
    """
    base = Path(tempfile.mkdtemp(prefix="deskfs-roles-", dir="/tmp"))
    os.chmod(base, 0o711)
    ws = SeededWorkspace(base)
    try:
        ws.mount("--allow-other")
        assert Who(agent=BUILDER).attempts({"chmod": f"os.chmod({str(ws.mnt)!r}, 0o777)"}) == {"chmod": "OK"}
        yield ws
    finally:
        ws.cleanup()
        # What conftest's daemon_logs_stay_clean checks for daemons under tmp_path.
        log = ws.store / "run" / "daemon.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        if not os.path.ismount(ws.mnt):
            shutil.rmtree(base, ignore_errors=True)
        assert "internal error" not in text and "Traceback" not in text, f"{log}:\n{text[-3000:]}"


@pytest.fixture
def fd_servers(desk):
    """Factory for FdServer processes, all ended before the workspace is unmounted."""
    made: list[FdServer] = []

    def make(who: Who) -> FdServer:
        server = FdServer(who)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


builder = Who(agent=BUILDER)
client = Who(CLIENT)
member = Who(MEMBER)
stranger = Who(STRANGER)
helper = Who(agent="helper")  # another agent of root, the owner's Unix user
root = Who()


def build(ws: Workspace, who: Who, files: dict[str, str], folders: list[str]) -> None:
    """Make `folders` (0777) and `files` (0666) as `who`."""
    who.py("""
        import json, os, sys
        m, folders, files = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
        for rel in folders:
            os.mkdir(os.path.join(m, rel))
            os.chmod(os.path.join(m, rel), 0o777)
        for rel, text in files.items():
            with open(os.path.join(m, rel), "w") as f:
                f.write(text)
            os.chmod(os.path.join(m, rel), 0o666)
    """, str(ws.mnt), json.dumps(folders), json.dumps(files))


# -- 1. the seed protocol -----------------------------------------------------------------------


SEED_FILES = {
    "README.md": "# the desk\nbuilt by agent:builder\n",
    "docs/a.txt": "alpha\n" * 2000,
    "docs/mine.txt": "the client's own file\n",
    "docs/deep/b.txt": "beta",
    "data/c.csv": "x,y\n1,2\n3,4\n",
}
SEED_FOLDERS = ["docs", "docs/deep", "docs/empty", "data"]

READ_TREE = """
import json, os, sys
m = sys.argv[1]
files, folders = {}, {}
for here, dirs, names in os.walk(m):
    rel = os.path.relpath(here, m)
    folders[rel] = sorted(os.listdir(here))
    for name in names:
        with open(os.path.join(here, name)) as f:
            files[os.path.normpath(os.path.join(rel, name))] = f.read()
print(json.dumps({"files": files, "folders": folders}))
"""


def client_changes(m: Path) -> dict[str, str]:
    """Every kind of change, each on a target whose Unix permissions let deskfs-client make it."""
    return {
        "write": f"fd = os.open('{m}/docs/a.txt', os.O_WRONLY); os.write(fd, b'x'); os.close(fd)",
        "append": f"fd = os.open('{m}/docs/a.txt', os.O_WRONLY | os.O_APPEND); os.write(fd, b'x'); os.close(fd)",
        "truncate": f"os.truncate('{m}/docs/a.txt', 0)",
        "chmod": f"os.chmod('{m}/docs/mine.txt', 0o600)",
        "rename": f"os.rename('{m}/docs/deep/b.txt', '{m}/docs/deep/b2.txt')",
        "delete": f"os.unlink('{m}/data/c.csv')",
        "mkdir": f"os.mkdir('{m}/docs/new')",
        "create": f"os.close(os.open('{m}/docs/new.txt', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))",
        "rmdir": f"os.rmdir('{m}/docs/empty')",
    }


# What the journal names each refused attempt of client_changes(), in order, then the setfattr.
CLIENT_DENIALS = [
    ("open", "/docs/a.txt"), ("open", "/docs/a.txt"), ("setattr", "/docs/a.txt"), ("setattr", "/docs/mine.txt"),
    ("rename", "/docs/deep/b.txt"), ("unlink", "/data/c.csv"), ("mkdir", "/docs/new"), ("create", "/docs/new.txt"),
    ("rmdir", "/docs/empty"), ("setxattr", "/docs/a.txt"), ("lock", "/docs/a.txt"),
]


def test_seed_protocol_end_to_end(desk, people):
    ws, m = desk, desk.mnt
    assert builder.whoami(m) == "agent:builder"
    assert roles(builder, ws) == {"agent:builder": "owner"}

    # The builder builds; the client's own file lets the client pass the kernel's owner check for chmod.
    build(ws, builder, SEED_FILES, SEED_FOLDERS)
    assert builder.attempts({"chown": f"os.chown('{m}/docs/mine.txt', {people[CLIENT].pw_uid}, "
                                      f"{people[CLIENT].pw_gid})"}) == {"chown": "OK"}

    # Before the invitation the client is no member: it sees nothing below the root.
    assert client.attempts({"list": f"os.listdir('{m}')", "read": f"open('{m}/README.md').read()"}) == \
        {"list": "EACCES", "read": "EACCES"}

    assert "invited user:deskfs-client as viewer" in builder.ok(ws, "invite", "user:deskfs-client", "--role", "viewer")
    assert roles(builder, ws) == {"agent:builder": "owner", "user:deskfs-client": "viewer"}

    # The viewer reads every file and lists every folder.
    assert client.whoami(m) == "user:deskfs-client"
    expected_folders = {".": ["README.md", "data", "docs"], "docs": ["a.txt", "deep", "empty", "mine.txt"],
                        "docs/deep": ["b.txt"], "docs/empty": [], "data": ["c.csv"]}
    tree = json.loads(client.py(READ_TREE, str(m)))
    assert tree == {"files": SEED_FILES, "folders": expected_folders}

    # ...and every change is refused by its role, not by Unix permissions.
    changes = client_changes(m)
    assert client.attempts(changes) == {label: "EACCES" for label in changes}
    result = client.run("setfattr", "-n", "user.note", "-v", "hello", f"{m}/docs/a.txt")
    assert result.returncode != 0 and "Permission denied" in result.stderr, result
    assert "Permission denied" in refused(client.cli("lock", f"{m}/docs/a.txt"))  # a lease
    # Nothing changed.
    assert json.loads(client.py(READ_TREE, str(m))) == {"files": SEED_FILES, "folders": expected_folders}
    assert builder.run("getfattr", "-n", "user.note", f"{m}/docs/a.txt").returncode != 0

    # Ownership moves to the client.
    assert "offered ownership to user:deskfs-client" in builder.ok(ws, "transfer", "user:deskfs-client")
    assert members(builder, ws)["offer"]["principal"] == "user:deskfs-client"
    out = client.ok(ws, "accept-transfer")
    assert "user:deskfs-client now owns this workspace (was agent:builder)" in out
    after = members(client, ws)
    assert {m_["principal"]: m_["role"] for m_ in after["members"]} == \
        {"user:deskfs-client": "owner", "agent:builder": "editor"}
    assert after["offer"] is None

    # The very same changes now succeed for the client: the refusals came from its role.
    assert client.attempts(changes) == {label: "OK" for label in changes}
    assert client.run("setfattr", "-n", "user.note", "-v", "hello", f"{m}/docs/a.txt").returncode == 0
    assert client.cli("lock", f"{m}/docs/a.txt").returncode == 0
    assert client.cli("unlock", f"{m}/docs/a.txt").returncode == 0

    # The builder, now an editor, can still write and stat (the kernel now holds these entries).
    assert builder.attempts({
        "write": f"with open('{m}/README.md', 'a') as f: f.write('more\\n')",
        "stat": f"os.stat('{m}/README.md'); os.stat('{m}/docs')",
    }) == {"write": "OK", "stat": "OK"}

    assert "agent:builder left the workspace" in builder.ok(ws, "leave")
    assert roles(client, ws) == {"user:deskfs-client": "owner"}

    # Gone: not even a listing, a stat of what it stat-ed a moment ago, or an open; the root itself stats.
    # (On this shared mount the kernel keeps no attributes: each of these asks the daemon.)
    assert builder.attempts({
        "list root": f"os.listdir('{m}')",
        "list docs": f"os.listdir('{m}/docs')",
        "stat file": f"os.stat('{m}/README.md')",
        "open file": f"open('{m}/README.md').read()",
        "stat root": f"os.stat('{m}')",
    }) == {"list root": "EACCES", "list docs": "EACCES", "stat file": "EACCES", "open file": "EACCES",
           "stat root": "OK"}
    refused(builder.deskfs(ws, "members"))

    # The journal tells it all, in order.
    records = journal(client, ws)

    def first(op: str, principal: str) -> dict:
        found = [r for r in records if r["op"] == op and r["principal"] == principal and r["errno"] is None]
        assert len(found) == 1, (op, principal, found)
        return found[0]

    invite = first("invite", "agent:builder")
    assert invite["details"] == {"member": "user:deskfs-client", "role": "viewer"}
    transfer = first("transfer", "agent:builder")
    assert transfer["details"]["member"] == "user:deskfs-client"
    accept = first("accept_transfer", "user:deskfs-client")
    assert accept["details"]["former_owner"] == "agent:builder"
    leave = first("leave", "agent:builder")
    client_denials = [r for r in denied(records, "user:deskfs-client", errno.EACCES) if invite["seq"] < r["seq"]]
    assert [(r["op"], r["path"]) for r in client_denials] == CLIENT_DENIALS
    assert all(r["denied"] for r in client_denials)
    assert invite["seq"] < client_denials[0]["seq"] and client_denials[-1]["seq"] < transfer["seq"]
    assert transfer["seq"] < accept["seq"] < leave["seq"]
    builder_denials = [r for r in denied(records, "agent:builder", errno.EACCES) if r["seq"] > leave["seq"]]
    # Listing the root is refused at its opendir; everything else below the root where the kernel first asks
    # for attributes (its permission check), or where it looks the name up: never as far as an open.
    assert ("opendir", "/") in [(r["op"], r["path"]) for r in builder_denials], builder_denials
    assert {r["op"] for r in builder_denials} <= {"opendir", "getattr", "lookup"}, builder_denials
    assert {r["path"] for r in builder_denials} == {"/", "/docs", "/README.md"}, builder_denials
    assert all(r["details"]["role"] == "none" for r in builder_denials), builder_denials
    # Reading the tree is journaled only when refused: the viewer's walk left no such record.
    assert not [r for r in records if r["op"] in READ_ONLY_OPS and r["errno"] is None], \
        [r for r in records if r["op"] in READ_ONLY_OPS and r["errno"] is None][:5]


# -- 2. only the owner manages ------------------------------------------------------------------


@pytest.mark.parametrize("editor", [helper, member], ids=["root's agent", "invited user"])
def test_only_the_owner_manages(desk, editor):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/notes.txt": "notes\n"}, ["shared"])
    builder.ok(ws, "invite", "user:deskfs-client", "--role", "viewer")
    if editor is member:
        builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    # The builder holds a lease the editor will try to break.
    assert builder.cli("lock", f"{m}/shared/notes.txt").returncode == 0
    before = members(builder, ws)

    # An editor indeed: it writes (outside the leased file) and reads.
    assert editor.attempts({
        "write": f"with open('{m}/shared/{editor.principal.replace(':', '-')}.txt', 'w') as f: f.write('mine')",
        "read": f"open('{m}/shared/notes.txt').read()",
    }) == {"write": "OK", "read": "OK"}

    attempts = [
        ("invite", ("invite", "user:deskfs-stranger", "--role", "viewer")),
        ("role", ("role", "user:deskfs-client", "editor")),
        ("remove", ("remove", "user:deskfs-client")),
        ("transfer", ("transfer", editor.principal)),
        ("config", ("config", "members.own_agents", "off")),
        ("config", ("config", "journal.retention", "1d")),
    ]
    for _, args in attempts:
        line = refused(editor.deskfs(ws, *args))
        assert "only the owner" in line, line
    line = refused(editor.cli("unlock", "--force", f"{m}/shared/notes.txt"))
    assert "only the workspace owner may break a lease" in line

    # Nothing happened.
    assert members(builder, ws) == before
    assert builder.run("getfattr", "--only-values", "-n", LOCK, f"{m}/shared/notes.txt").stdout.startswith(
        "lease exclusive agent:builder")
    assert builder.ok(ws, "config", "members.own_agents").strip() == "members.own_agents = (default)"
    assert builder.ok(ws, "config", "journal.retention").strip() == "journal.retention = (default)"

    # Each refusal is journaled as denied, errno 1 (EPERM), under the editor's own name.
    records = denied(journal(builder, ws), editor.principal, errno.EPERM)
    assert [r["op"] for r in records] == [op for op, _ in attempts] + ["lock_break"]
    assert all(r["denied"] for r in records)
    assert records[-1]["path"] == "/shared/notes.txt"

    # The owner may do each of these.
    assert builder.cli("unlock", "--force", f"{m}/shared/notes.txt").returncode == 0
    assert builder.run("getfattr", "-n", LOCK, f"{m}/shared/notes.txt").returncode != 0
    builder.ok(ws, "role", "user:deskfs-client", "editor")
    builder.ok(ws, "config", "journal.retention", "30d")
    assert roles(builder, ws)["user:deskfs-client"] == "editor"


# -- 3. no one becomes owner by racing ----------------------------------------------------------


def test_ownership_cannot_be_taken_by_racing_or_late(desk):
    ws = desk
    builder.ok(ws, "invite", "user:deskfs-client", "--role", "editor")
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    builder.ok(ws, "transfer", "user:deskfs-client", "--then", "editor")

    # Two accepts by the offered member, released at the same moment: exactly one wins.
    racers = [client.popen("sh", "-c", 'read go && exec "$@"', "sh", *client.deskfs_command(),
                           "accept-transfer", "--mount", str(ws.mnt)) for _ in range(2)]
    for proc in racers:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in racers:
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert sorted(r.returncode for r in results) == [0, 1], results
    loser = next(r for r in results if r.returncode == 1)
    assert "no ownership offer to you" in refused(loser)
    assert roles(client, ws) == {"user:deskfs-client": "owner", "agent:builder": "editor",
                                 "user:deskfs-member": "editor"}

    # An offer that expired cannot be accepted. The daemon owns the database: edit it while unmounted.
    client.ok(ws, "transfer", "user:deskfs-member")
    ws.unmount()
    past = time.time_ns() - 1_000_000_000
    edit = subprocess.run(["sqlite3", str(ws.store / "deskfs.db"),
                           f"UPDATE transfer_offer SET expires_ns = {past}; SELECT changes();"],
                          capture_output=True, text=True)
    assert edit.returncode == 0 and edit.stdout.strip() == "1", edit
    ws.mount("--allow-other")
    offer = members(client, ws)["offer"]
    assert offer["principal"] == "user:deskfs-member" and offer["expires_ns"] == past
    assert "expired" in refused(member.deskfs(ws, "accept-transfer"))
    assert members(client, ws)["offer"] is None

    # Only the member an offer names may accept it.
    client.ok(ws, "transfer", "user:deskfs-member")
    assert "is not a member of this workspace" in refused(stranger.deskfs(ws, "accept-transfer"))  # no member at all
    assert "no ownership offer to you" in refused(builder.deskfs(ws, "accept-transfer"))  # a member, not offered
    assert members(client, ws)["offer"]["principal"] == "user:deskfs-member"  # still there for the right one
    client.ok(ws, "cancel-transfer")

    # The owner cannot hand ownership to itself, be removed, or leave; an editor cannot remove it either.
    assert "already own" in refused(client.deskfs(ws, "transfer", "user:deskfs-client"))
    assert "cannot be removed" in refused(client.deskfs(ws, "remove", "user:deskfs-client"))
    assert "cannot leave" in refused(client.deskfs(ws, "leave"))
    assert "transfer" in refused(client.deskfs(ws, "role", "user:deskfs-client", "viewer"))
    refused(builder.deskfs(ws, "remove", "user:deskfs-client"))

    final = members(client, ws)
    assert [m_["principal"] for m_ in final["members"] if m_["role"] == "owner"] == ["user:deskfs-client"]
    assert final["offer"] is None

    records = journal(client, ws)
    accepts = [r for r in records if r["op"] == "accept_transfer"]
    assert [(r["principal"], r["errno"]) for r in accepts] == [
        ("user:deskfs-client", None), ("user:deskfs-client", errno.EPERM),  # the race
        ("user:deskfs-member", errno.EPERM),  # expired
        ("user:deskfs-stranger", errno.EPERM), ("agent:builder", errno.EPERM),
    ]
    assert [r["op"] for r in denied(records, "user:deskfs-client", errno.EPERM)] == \
        ["accept_transfer", "transfer", "remove", "leave", "role"]
    assert [r["op"] for r in denied(records, "agent:builder", errno.EPERM)] == ["accept_transfer", "remove"]

    # A transfer that is accepted in time moves ownership; the former owner becomes what it chose.
    client.ok(ws, "transfer", "user:deskfs-member", "--then", "viewer")
    member.ok(ws, "accept-transfer")
    assert roles(member, ws) == {"user:deskfs-member": "owner", "agent:builder": "editor",
                                 "user:deskfs-client": "viewer"}


# -- 4. identity cannot be faked across Unix users ----------------------------------------------


@pytest.mark.parametrize("claimed", ["builder", "helper"], ids=["bound by init", "bound by first use"])
def test_agent_names_cannot_be_claimed_by_another_unix_user(desk, claimed):
    ws, m = desk, desk.mnt
    build(ws, builder, {"secret.txt": "for members only\n", "docs/plan.md": "plan\n"}, ["docs"])
    real = Who(agent=claimed)
    # The real agent (root's) reads; for "helper" this first use binds the name to root.
    assert real.whoami(m) == f"agent:{claimed}"
    assert real.attempts({"read": f"assert open('{m}/secret.txt').read() == 'for members only\\n'"}) == {"read": "OK"}

    fake = Who(CLIENT, agent=claimed)
    assert fake.whoami(m) == "user:deskfs-client"
    assert fake.attempts({
        "stat root": f"os.stat('{m}')",
        "list root": f"os.listdir('{m}')",
        "read": f"open('{m}/secret.txt').read()",
        "list docs": f"os.listdir('{m}/docs')",
        "write": f"with open('{m}/docs/plan.md', 'a') as f: f.write('x')",
    }) == {"stat root": "OK", "list root": "EACCES", "read": "EACCES", "list docs": "EACCES", "write": "EACCES"}

    line = refused(fake.deskfs(ws, "invite", "user:deskfs-stranger", "--role", "editor"))
    assert line == "deskfs: user:deskfs-client is not a member of this workspace"  # nor who the owner is
    refused(fake.deskfs(ws, "members"))  # not a member either
    # Nor through a `deskfs run` session under the claimed name.
    assert "belongs to another Unix user" in refused(
        fake.cli("run", "--agent", claimed, "--mount", str(m), "--", "cat", f"{m}/secret.txt"))
    assert roles(builder, ws) == {"agent:builder": "owner"}

    records = journal(builder, ws)
    assert not [r for r in records if r["principal"] == f"agent:{claimed}" and r["uid"] != 0]
    impostor = [r for r in records if r["op"] == "impersonate"]
    assert impostor and all(r["principal"] == "user:deskfs-client" and r["errno"] == errno.EPERM
                            and r["details"]["claimed"] == f"agent:{claimed}" for r in impostor)
    mine = [r for r in records if r["principal"] == "user:deskfs-client" and r["op"] != "impersonate"]
    refusals = [r for r in mine if r["errno"] == errno.EACCES]
    # Each attempt is refused at the first name below the root: "/docs" is refused (its attributes, asked
    # for by the permission check of the walk, or its lookup) before "/docs/plan.md" is ever asked for.
    # Listing the root is refused by the kernel itself: to a non-member the root has no read bits.
    assert {r["path"] for r in refusals} == {"/secret.txt", "/docs"}, refusals
    assert {r["op"] for r in refusals} <= {"opendir", "lookup", "getattr"}, refusals
    # The two requests to the daemon, refused alike because a non-member learns nothing from them.
    assert [(r["op"], (r["details"] or {}).get("request")) for r in mine if r["errno"] == errno.EPERM] == \
        [("invite", None), ("control", "members")]


def test_an_invited_agent_name_cannot_be_claimed_by_another_unix_user_afterwards(desk):
    ws, m = desk, desk.mnt
    # Only the invitation can make agent:scout anything: the owner's own agents get no default role.
    builder.ok(ws, "config", "members.own_agents", "off")
    assert "invited agent:scout as editor" in builder.ok(ws, "invite", "agent:scout", "--role", "editor")
    write = {"write": f"with open('{m}/by-scout.txt', 'w') as f: f.write('scout')"}

    # Another Unix user claims the invited name before the owner's agent ever used it: it stays itself.
    fake = Who(CLIENT, agent="scout")
    assert fake.whoami(m) == "user:deskfs-client"
    assert fake.attempts({**write, "list": f"os.listdir('{m}')"}) == {"write": "EACCES", "list": "EACCES"}
    refused(fake.deskfs(ws, "members"))
    assert "belongs to another Unix user" in refused(
        fake.cli("run", "--agent", "scout", "--mount", str(m), "--", "true"))

    # The name is the inviting owner's Unix user's (root's): its agent scout is the invited editor.
    real = Who(agent="scout")
    assert real.whoami(m) == "agent:scout"
    assert real.attempts(write) == {"write": "OK"}
    assert roles(builder, ws) == {"agent:builder": "owner", "agent:scout": "editor"}

    records = journal(builder, ws)
    assert {r["uid"] for r in records if r["principal"] == "agent:scout"} == {0}
    claims = [r for r in records if r["op"] == "impersonate"]
    assert claims and all(r["principal"] == "user:deskfs-client" and r["details"]["claimed"] == "agent:scout"
                          for r in claims), claims


def test_an_agent_invited_by_a_non_root_owner_is_that_users(desk):
    ws, m = desk, desk.mnt
    builder.ok(ws, "invite", "user:deskfs-client", "--role", "editor")
    builder.ok(ws, "transfer", "user:deskfs-client", "--then", "leave")
    client.ok(ws, "accept-transfer")
    client.ok(ws, "config", "members.own_agents", "off")
    client.ok(ws, "invite", "agent:clientbot", "--role", "editor")
    write = {"write": f"with open('{m}/by-clientbot.txt', 'w') as f: f.write('hi')"}

    # Not even root's processes can take the name first: it is deskfs-client's.
    fake = Who(agent="clientbot")
    assert fake.whoami(m) == "user:root"
    assert fake.attempts(write) == {"write": "EACCES"}
    real = Who(CLIENT, agent="clientbot")
    assert real.whoami(m) == "agent:clientbot"
    assert real.attempts(write) == {"write": "OK"}
    assert roles(client, ws) == {"user:deskfs-client": "owner", "agent:clientbot": "editor"}
    records = journal(client, ws)
    assert {r["uid"] for r in records if r["principal"] == "agent:clientbot"} == {pwd.getpwnam(CLIENT).pw_uid}
    assert [(r["principal"], r["details"]["claimed"]) for r in records if r["op"] == "impersonate"][:1] == \
        [("user:root", "agent:clientbot")]


def test_an_agent_name_claimed_before_the_invitation_does_not_take_it(desk):
    ws, m = desk, desk.mnt
    builder.ok(ws, "config", "members.own_agents", "off")
    squatter = Who(CLIENT, agent="scout")
    refused(squatter.deskfs(ws, "members"))  # through the control socket only: any local user can
    write = {"write": f"with open('{m}/by-scout.txt', 'w') as f: f.write('scout')"}
    result = builder.deskfs(ws, "invite", "agent:scout", "--role", "editor")
    assert squatter.attempts(write) == {"write": "EACCES"}
    # The invitation is refused, naming whose the name is and how to mean that user on purpose.
    line = refused(result)
    assert "deskfs-client" in line and "--bound-to deskfs-client" in line, line
    bound = builder.deskfs(ws, "invite", "agent:scout", "--role", "editor", "--bound-to", CLIENT)
    assert bound.returncode == 0, bound.stderr
    assert squatter.attempts(write) == {"write": "OK"}  # now on purpose: the invitation names that user


# -- 5. nothing a member looked at shows to others on a shared mount ----------------------------


def test_non_member_cannot_stat_what_members_looked_at(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"docs/plan.md": "plan\n", "top.md": "top\n"}, ["docs"])
    looks = {"deep": f"os.stat('{m}/docs/plan.md')", "top": f"os.stat('{m}/top.md')",
             "folder": f"os.stat('{m}/docs')"}
    assert builder.attempts(looks) == {"deep": "OK", "top": "OK", "folder": "OK"}  # the kernel knows them now
    assert stranger.attempts(looks) == {"deep": "EACCES", "top": "EACCES", "folder": "EACCES"}
    assert stranger.attempts({"access": f"assert not os.access('{m}/top.md', os.F_OK)"}) == {"access": "OK"}
    # Each refusal reached the daemon; the deep one at "/docs", so "/docs/plan.md" was never asked for.
    refusals = denied(journal(builder, ws), "user:deskfs-stranger", errno.EACCES)
    assert {r["path"] for r in refusals} == {"/docs", "/top.md"}, refusals
    assert {r["op"] for r in refusals} <= {"getattr", "lookup"}, refusals
    assert len(refusals) >= 4, refusals  # deep, top, folder, access


def test_former_member_cannot_stat_after_a_member_looked_again(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"docs/plan.md": "plan\n"}, ["docs"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    stat = {"stat": f"os.stat('{m}/docs/plan.md')"}
    assert member.attempts(stat) == {"stat": "OK"}
    builder.ok(ws, "remove", "user:deskfs-member")
    assert member.attempts(stat) == {"stat": "EACCES"}
    # A member looking again gives the kernel nothing it would serve to another user.
    assert builder.attempts(stat) == {"stat": "OK"}
    assert member.attempts(stat) == {"stat": "EACCES"}
    refusals = denied(journal(builder, ws), "user:deskfs-member", errno.EACCES)
    assert refusals and {(r["path"], r["details"]["role"]) for r in refusals} == {("/docs", "none")}, refusals
    assert {r["op"] for r in refusals} <= {"getattr", "lookup"}, refusals


@pytest.mark.parametrize("flags, mask", [(AT_STATX_DONT_SYNC, STATX_BASIC_STATS), (0, 0)],
                         ids=["AT_STATX_DONT_SYNC", "empty mask"])
def test_non_member_cannot_statx_cached_attributes_below_the_root(desk, flags, mask):
    ws, m = desk, desk.mnt
    build(ws, builder, {"top.md": "sixteen bytes!!\n"}, [])
    assert builder.py(STATX, f"{m}/top.md", "0", str(STATX_BASIC_STATS)).strip() == "16"
    assert stranger.py(STATX, f"{m}/top.md", "0", str(STATX_BASIC_STATS)).strip() == "EACCES"
    assert stranger.py(STATX, f"{m}/top.md", str(flags), str(mask)).strip() == "EACCES"  # today: 16


def test_non_member_learns_nothing_from_a_name_a_member_did_not_find(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"kept.md": "kept\n", "gone.md": "gone\n"}, [])
    assert builder.attempts({
        "missing": f"os.stat('{m}/missing.md')",
        "delete": f"os.unlink('{m}/gone.md')",
    }) == {"missing": "ENOENT", "delete": "OK"}
    assert stranger.attempts({
        "never looked up": f"os.stat('{m}/never.md')",
        "existing": f"os.stat('{m}/kept.md')",
        "missing": f"os.stat('{m}/missing.md')",  # today: ENOENT
        "deleted": f"os.stat('{m}/gone.md')",  # the unlink left no entry behind
    }) == {"never looked up": "EACCES", "existing": "EACCES", "missing": "EACCES", "deleted": "EACCES"}


# -- 6. role changes reach open handles ---------------------------------------------------------


def test_role_changes_take_effect_on_open_handles(desk, fd_servers):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/log.txt": "start\n", "shared/unread.txt": "never read\n"}, ["shared"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    path = f"{m}/shared/log.txt"

    x = fd_servers(member)
    assert x("open", "w", path, "O_WRONLY") == "OK"
    assert x("open", "r", path, "O_RDONLY") == "OK"
    assert x("open", "u", f"{m}/shared/unread.txt", "O_RDONLY") == "OK"  # none of its pages cached
    assert x("pwrite", "w", "by editor\n", 6) == "OK"
    assert x("pread", "r", 100, 0) == "start\nby editor\n"  # also fills the page cache

    builder.ok(ws, "role", "user:deskfs-member", "viewer")
    assert x("pwrite", "w", "by viewer\n", 16) == "EACCES"
    assert x("ftruncate", "w", 0) == "EACCES"
    assert x("pread", "r", 100, 0) == "start\nby editor\n"  # a viewer still reads

    builder.ok(ws, "remove", "user:deskfs-member")
    assert x("pread", "r", 100, 0) == "EACCES"
    assert x("pread", "r", 4, 2) == "EACCES"
    assert x("fstat", "r") == "EACCES"
    assert x("pwrite", "w", "by nobody\n", 16) == "EACCES"
    # Whatever members do meanwhile (the owner stats the file), a read of pages never cached is refused too.
    assert builder.attempts({"stat": f"os.stat('{m}/shared/unread.txt')"}) == {"stat": "OK"}
    assert x("pread", "u", 100, 0) == "EACCES"
    x.close()

    assert builder.attempts({"content": f"assert open('{path}').read() == 'start\\nby editor\\n'"}) == \
        {"content": "OK"}
    records = [r for r in journal(builder, ws) if r["principal"] == "user:deskfs-member"]
    refusals = [(r["op"], r["path"], r["details"]["role"]) for r in expanded(records) if r["errno"] == errno.EACCES]
    log, unread = "/shared/log.txt", "/shared/unread.txt"
    # A cached read first re-fetches the file's attributes (auto_inval_data; the shared mount keeps none),
    # and that getattr is what the daemon refuses after the removal: the read never reaches it. The
    # write-only handle (direct_io) sends its write as it is; fstat asks for the attributes.
    assert refusals == [
        ("write", log, "viewer"), ("setattr", log, "viewer"),
        ("getattr", log, "none"), ("getattr", log, "none"), ("getattr", log, "none"), ("write", log, "none"),
        ("getattr", unread, "none"),
    ], refusals


def test_open_folder_handle_cannot_list_after_removal(desk, fd_servers):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/log.txt": "start\n"}, ["shared"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    x = fd_servers(member)
    assert x("opendir", "d", f"{m}/shared") == "OK"
    assert x("getdents", "d") == ["log.txt"]
    builder.ok(ws, "remove", "user:deskfs-member")
    builder.py("import os, sys; os.mknod(sys.argv[1])", f"{m}/shared/added-after-removal")
    assert x("getdents", "d") == "EACCES"  # not ['added-after-removal', 'log.txt']
    assert x("opendir", "d2", f"{m}/shared") == "EACCES"
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "viewer")  # a role again: the same handle lists
    assert x("getdents", "d") == ["added-after-removal", "log.txt"]
    x.close()
    records = [r for r in journal(builder, ws) if r["principal"] == "user:deskfs-member"]
    refusals = [(r["op"], r["path"], r["details"]["role"]) for r in records if r["errno"] == errno.EACCES]
    # The listing is refused by the role of whoever opened the handle; a new opendir does not get as far
    # (the kernel's permission check first asks for the folder's attributes, or looks it up).
    assert refusals[0] == ("readdir", "/shared", "none"), refusals
    assert len(refusals) >= 2 and set(refusals[1:]) <= {("getattr", "/shared", "none"), ("lookup", "/shared", "none")}, \
        refusals


def test_open_handle_cannot_read_after_removal_once_a_member_looked_again(desk, fd_servers):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/log.txt": "secret plans\n"}, ["shared"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "viewer")
    path = f"{m}/shared/log.txt"
    x = fd_servers(member)
    assert x("open", "r", path, "O_RDONLY") == "OK"
    assert x("pread", "r", 100, 0) == "secret plans\n"  # the pages are now cached
    builder.ok(ws, "remove", "user:deskfs-member")
    assert builder.attempts({"stat": f"os.stat('{path}')"}) == {"stat": "OK"}  # fresh attributes for the kernel
    assert x("pread", "r", 100, 0) == "EACCES"  # not "secret plans\n" from the page cache
    assert x("pread", "r", 5, 7) == "EACCES"
    records = [r for r in journal(builder, ws) if r["principal"] == "user:deskfs-member"]
    # Each read re-fetches the attributes first (auto_inval_data), and that is refused.
    assert [(r["op"], r["path"], r["details"]["role"]) for r in expanded(records) if r["errno"] == errno.EACCES] == \
        [("getattr", "/shared/log.txt", "none")] * 2


def test_a_lease_binds_others_only_while_its_holder_may_lock(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/plan.md": "plan\n", "shared/draft.md": "draft\n"}, ["shared"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    assert member.cli("lock", f"{m}/shared/plan.md").returncode == 0
    assert member.cli("lock", f"{m}/shared/draft.md").returncode == 0
    change = {"append": f"with open('{m}/shared/plan.md', 'a') as f: f.write('x')"}
    assert helper.attempts(change) == {"append": "EBUSY"}
    builder.ok(ws, "role", "user:deskfs-member", "viewer")
    assert helper.attempts(change) == {"append": "OK"}  # a viewer's lease binds no one
    builder.ok(ws, "role", "user:deskfs-member", "editor")
    assert helper.attempts(change) == {"append": "EBUSY"}  # still held, binding again
    builder.ok(ws, "remove", "user:deskfs-member")
    assert helper.attempts(change) == {"append": "OK"}
    # The former member cannot release it any more (it takes a role to lock or unlock); the owner breaks it.
    assert "Permission denied" in refused(member.cli("unlock", f"{m}/shared/plan.md"))
    assert builder.cli("unlock", "--force", f"{m}/shared/plan.md").returncode == 0
    assert builder.run("getfattr", "-n", LOCK, f"{m}/shared/plan.md").returncode != 0
    # A file deleted under a former member's lease takes the lease with it, journaled by the daemon.
    assert helper.attempts({"delete": f"os.unlink('{m}/shared/draft.md')"}) == {"delete": "OK"}
    unlock = wait_for_record(builder, ws, lambda r: r["op"] == "unlock" and r["principal"] == "deskfs")
    assert unlock["errno"] is None and unlock["details"] == {
        "kind": "lease", "holder": "user:deskfs-member", "reason": "file deleted"}, unlock
    assert member.whoami(m) == "user:deskfs-member"  # not back in by the lease's end
    assert member.attempts({"list": f"os.listdir('{m}/shared')"}) == {"list": "EACCES"}


def test_status_and_locks_show_a_member_only_paths_it_may_read(desk, fd_servers):
    ws, m = desk, desk.mnt
    build(ws, builder, {"open/notes.md": "notes\n", "private/secret.md": "secret\n"}, ["open", "private"])
    builder.py("import os, sys; os.chmod(sys.argv[1], 0o700)", f"{m}/private")  # root's, and nobody else's
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "viewer")
    assert builder.cli("lock", f"{m}/open/notes.md").returncode == 0
    assert builder.cli("lock", f"{m}/private/secret.md").returncode == 0
    holder = fd_servers(builder)
    assert holder("open", "s", f"{m}/private/secret.md", "O_RDONLY") == "OK"  # open files of the owner's agent
    assert holder("open", "n", f"{m}/open/notes.md", "O_RDONLY") == "OK"

    def seen_by(who: Who) -> tuple[set[str], set[str]]:
        status = json.loads(who.ok(ws, "status", "--json"))[0]
        opened = {p for a in status["active"] for p in a["paths"]}
        listed = json.loads(who.run("getfattr", "--only-values", "-n", "user.deskfs.locks", str(m)).stdout)
        assert {h["path"] for h in status["locks"]} == {h["path"] for h in listed}
        return opened, {h["path"] for h in listed}

    assert seen_by(builder) == ({"/open/notes.md", "/private/secret.md"}, {"/open/notes.md", "/private/secret.md"})
    assert seen_by(member) == ({"/open/notes.md"}, {"/open/notes.md"})  # not a word of /private


# -- 7. bad input -------------------------------------------------------------------------------


def test_bad_member_commands_get_one_line_errors(desk, tmp_path):
    ws = desk
    builder.ok(ws, "invite", "user:deskfs-client", "--role", "viewer")
    before = members(builder, ws)
    usage = [
        ("invite", "bob", "--role", "viewer"),
        ("invite", "agent:", "--role", "viewer"),
        ("invite", "user:bob smith", "--role", "viewer"),
        ("invite", "user:" + "x" * 65, "--role", "viewer"),
        ("invite", "user:deskfs-member", "--role", "admin"),
        ("invite", "user:deskfs-member", "--role", "owner"),
        ("invite", "user:deskfs-member"),
        ("role", "user:deskfs-client", "admin"),
        ("role", "bob", "editor"),
        ("remove", "agent:"),
        ("transfer", "bob"),
        ("transfer", "user:deskfs-client", "--then", "bogus"),
        ("config", "members.own_agents", "sometimes"),
    ]
    for args in usage:
        refused(builder.deskfs(ws, *args), code=2)
    assert "not a principal" in refused(builder.cli("init", "--owner", "bob", str(tmp_path / "other-store")), code=2)
    assert "no Unix user 'no-such-user-zz9'" in refused(
        builder.cli("init", "--owner", "user:no-such-user-zz9", str(tmp_path / "other-store")), code=2)
    assert not (tmp_path / "other-store").exists()
    # The same command with a Unix user that exists makes the store.
    assert "owned by user:deskfs-client" in builder.cli(
        "init", "--owner", "user:deskfs-client", str(tmp_path / "other-store")).stdout
    assert (tmp_path / "other-store").is_dir()

    line = refused(builder.deskfs(ws, "invite", "user:deskfs-client", "--role", "editor"))
    assert "already a member" in line and "deskfs role" in line, line
    assert "not a member" in refused(builder.deskfs(ws, "remove", "user:deskfs-stranger"))
    assert "not a member" in refused(builder.deskfs(ws, "role", "user:deskfs-stranger", "editor"))
    assert "not a member" in refused(builder.deskfs(ws, "transfer", "user:deskfs-stranger"))
    assert "no Unix user" in refused(builder.deskfs(ws, "invite", "user:no-such-user-zz9", "--role", "viewer"))
    assert "no ownership offer" in refused(builder.deskfs(ws, "cancel-transfer"))

    assert members(builder, ws) == before
    # Refusals are journaled (errno 1); bad input is not.
    ops = [(r["op"], r["details"].get("member")) for r in denied(journal(builder, ws), "agent:builder", errno.EPERM)]
    assert ops == [("invite", "user:deskfs-client"), ("remove", "user:deskfs-stranger"),
                   ("role", "user:deskfs-stranger"), ("transfer", "user:deskfs-stranger"),
                   ("invite", "user:no-such-user-zz9"), ("cancel_transfer", None)]


# -- 8. defaults: the owner's own agents --------------------------------------------------------


def test_owner_unix_user_agents_are_editors_until_configured(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"notes.txt": "notes\n"}, [])
    agents = [helper, Who(agent="another"), root]
    for who in agents:
        assert who.whoami(m) == who.principal
        name = who.principal.replace(":", "-")
        assert who.attempts({
            "write": f"with open('{m}/{name}.txt', 'w') as f: f.write('hi')",
            "append": f"with open('{m}/notes.txt', 'a') as f: f.write('{name}\\n')",
            "list": f"assert '{name}.txt' in os.listdir('{m}')",
        }) == {"write": "OK", "append": "OK", "list": "OK"}, who
    # Another Unix user's agent is no such editor.
    assert Who(CLIENT, agent="clientbot").attempts({"list": f"os.listdir('{m}')"}) == {"list": "EACCES"}
    assert members(builder, ws)["own_agents"] == "editor"
    assert roles(builder, ws) == {"agent:builder": "owner"}  # editors without being listed

    builder.ok(ws, "config", "members.own_agents", "viewer")
    for who in agents:
        assert who.attempts({
            "read": f"open('{m}/notes.txt').read()",
            "list": f"os.listdir('{m}')",
            "write": f"with open('{m}/notes.txt', 'a') as f: f.write('x')",
        }) == {"read": "OK", "list": "OK", "write": "EACCES"}, who

    builder.ok(ws, "config", "members.own_agents", "off")
    assert members(builder, ws)["own_agents"] == "off"
    for who in agents:
        assert who.attempts({
            "list": f"os.listdir('{m}')",
            "write": f"with open('{m}/notes.txt', 'a') as f: f.write('x')",
            "new": f"with open('{m}/new.txt', 'w') as f: f.write('x')",
            "read": f"open('{m}/notes.txt').read()",
        }) == {"list": "EACCES", "write": "EACCES", "new": "EACCES", "read": "EACCES"}, who

    # The owner itself still works.
    assert builder.attempts({
        "write": f"with open('{m}/notes.txt', 'a') as f: f.write('owner\\n')",
        "list": f"assert 'notes.txt' in os.listdir('{m}')",
        "read": f"assert open('{m}/notes.txt').read().endswith('owner\\n')",
    }) == {"write": "OK", "list": "OK", "read": "OK"}
    builder.ok(ws, "config", "members.own_agents", "editor")
    assert helper.attempts({"write": f"with open('{m}/notes.txt', 'a') as f: f.write('back\\n')"}) == {"write": "OK"}
