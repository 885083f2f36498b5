"""Roles on a real deskfs mount: owner, editors, viewers, non-members, and how ownership moves.

Every actor is its own process with a real identity: root's agents (DESKFS_AGENT=NAME in the environment
of a root process), and other Unix users (deskfs-client, deskfs-member, deskfs-stranger) run through
setpriv with a clean environment. Files the other users touch are 0666 and folders 0777 (and a file the
client chmods is the client's own), so the kernel's Unix permission check passes and every refusal seen
comes from the role; where it matters a test shows the same operation succeeding once the role allows it.

Covered: the seed protocol (a builder agent builds, invites a viewer, hands ownership over and leaves);
owner-only management (invite, role, remove, transfer, breaking leases, settings) refused to editors with
EPERM journal records; ownership cannot be taken by racing, after expiry, without an offer, or kept by
removing/leaving; agent names cannot be claimed across Unix users; role changes reach open handles; bad
input gives one-line errors with exit 2 or 1; the owner's own agents are editors by default until
`members.own_agents` says otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import select
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DESKFS, PY, Workspace, deskfs

CLIENT, MEMBER, STRANGER = "deskfs-client", "deskfs-member", "deskfs-stranger"
BUILDER = "builder"
WHOAMI = "user.deskfs.whoami"
LOCK = "user.deskfs.lock"


# -- helpers ------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DESKFS_AGENT"}


def _package_root() -> str:
    import deskfs as package

    return str(Path(package.__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Who:
    """An actor: root (user None) or another Unix user, with DESKFS_AGENT=agent in its environment if given."""

    user: str | None = None
    agent: str | None = None

    def command(self, *cmd: str) -> list[str]:
        if self.user is None:
            return list(cmd)
        pw = pwd.getpwnam(self.user)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--reset-env", "env"]
        if self.agent is not None:
            prefix.append(f"DESKFS_AGENT={self.agent}")
        return [*prefix, *cmd]

    def env(self) -> dict[str, str] | None:
        if self.user is not None:
            return None  # setpriv --reset-env, then `env` sets what is needed
        env = base_env()
        if self.agent is not None:
            env["DESKFS_AGENT"] = self.agent
        return env

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*cmd), cwd="/", env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(*cmd), cwd="/", env=self.env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def deskfs_command(self) -> list[str]:
        # The venv's interpreter lives under /root, out of other users' reach: they run the same package
        # under the system python3 (the CLI needs only the standard library).
        if self.user is None:
            return [DESKFS]
        return ["env", f"PYTHONPATH={_package_root()}", PY, "-m", "deskfs"]

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
        result = self.run("getfattr", "--only-values", "-n", WHOAMI, str(path))
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


def denied(records: list[dict], principal: str, code: int) -> list[dict]:
    return [r for r in records if r["principal"] == principal and r["errno"] == code]


def read_line(stream, timeout: float, buffer: bytearray) -> str:
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
        elif op == "fstat":
            result = os.fstat(fds[a[0]]).st_size
        elif op == "close":
            os.close(fds.pop(a[0]))
    except OSError as exc:
        result = errno.errorcode[exc.errno]
    print(json.dumps(result), flush=True)
"""


class FdServer:
    def __init__(self, who: Who) -> None:
        self.proc = subprocess.Popen(who.command(PY, "-c", FD_SERVER), cwd="/", env=who.env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
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


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def people() -> dict[str, pwd.struct_passwd]:
    """Unix users deskfs-client, deskfs-member and deskfs-stranger (created once, kept between runs)."""
    for name in (CLIENT, MEMBER, STRANGER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            result = subprocess.run(["useradd", "-M", "-U", "-s", "/bin/sh", name], capture_output=True, text=True)
            if result.returncode not in (0, 9):  # 9: exists (another run raced us)
                raise AssertionError(f"useradd {name}: {result.stderr}")
    return {name: pwd.getpwnam(name) for name in (CLIENT, MEMBER, STRANGER)}


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
def desk(tmp_path: Path, people):
    """A builder-owned workspace mounted with --allow-other, its root 0777; unmounted at the end."""
    for folder in (tmp_path, tmp_path.parent, tmp_path.parent.parent):
        os.chmod(folder, os.stat(folder).st_mode | 0o711)
    ws = SeededWorkspace(tmp_path)
    try:
        ws.mount("--allow-other")
        assert Who(agent=BUILDER).attempts({"chmod": f"os.chmod({str(ws.mnt)!r}, 0o777)"}) == {"chmod": "OK"}
        yield ws
    finally:
        ws.cleanup()


@pytest.fixture
def fd_servers():
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
    ("rmdir", "/docs/empty"), ("setxattr", "/docs/a.txt"),
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

    # The builder, now an editor, can still write (and its stat fills the kernel's attribute cache).
    assert builder.attempts({
        "write": f"open('{m}/README.md', 'a').write('more\\n')",
        "stat": f"os.stat('{m}/README.md'); os.stat('{m}/docs')",
    }) == {"write": "OK", "stat": "OK"}

    assert "agent:builder left the workspace" in builder.ok(ws, "leave")
    assert roles(client, ws) == {"user:deskfs-client": "owner"}

    # Gone: not even a listing, a stat of what it stat-ed a moment ago, or an open; the root itself stats.
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
    assert {r["op"] for r in builder_denials} >= {"opendir"}, builder_denials
    assert {r["path"] for r in builder_denials} >= {"/", "/docs", "/README.md"}, builder_denials


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
        "write": f"open('{m}/shared/{editor.principal.replace(':', '-')}.txt', 'w').write('mine')",
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
    assert "no ownership offer to you" in refused(stranger.deskfs(ws, "accept-transfer"))  # no member at all
    assert "no ownership offer to you" in refused(builder.deskfs(ws, "accept-transfer"))  # a member, not offered
    assert members(client, ws)["offer"]["principal"] == "user:deskfs-member"  # still there for the right one
    client.ok(ws, "cancel-transfer")

    # The owner cannot hand ownership to itself, be removed, or leave; an editor cannot remove it either.
    assert "already own" in refused(client.deskfs(ws, "transfer", "user:deskfs-client"))
    assert "cannot be removed" in refused(client.deskfs(ws, "remove", "user:deskfs-client"))
    assert "cannot leave" in refused(client.deskfs(ws, "leave"))
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
        ["accept_transfer", "transfer", "remove", "leave"]
    assert [r["op"] for r in denied(records, "agent:builder", errno.EPERM)] == ["accept_transfer", "remove"]


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
        "write": f"open('{m}/docs/plan.md', 'a').write('x')",
    }) == {"stat root": "OK", "list root": "EACCES", "read": "EACCES", "list docs": "EACCES", "write": "EACCES"}

    line = refused(fake.deskfs(ws, "invite", "user:deskfs-stranger", "--role", "editor"))
    assert "only the owner" in line
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
    assert {r["path"] for r in refusals} == {"/", "/secret.txt", "/docs", "/docs/plan.md"}, refusals
    assert {r["op"] for r in refusals} <= {"opendir", "open", "lookup", "getattr"}, refusals
    assert [r["op"] for r in mine if r["errno"] == errno.EPERM] == ["invite"]


KERNEL_CACHE_BUG = (
    "deskfs bug: attributes and entries the kernel cached for one user (entry/attr timeout 300 s,"
    " default_permissions) are served to every other user without asking the daemon, so a principal"
    " with no role can stat (size, mode, owner, times, existence) what members looked at recently"
)


@pytest.mark.xfail(strict=True, reason=KERNEL_CACHE_BUG)
def test_non_member_cannot_stat_what_members_looked_at(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"docs/plan.md": "plan\n"}, ["docs"])
    assert builder.attempts({"stat": f"os.stat('{m}/docs/plan.md')"}) == {"stat": "OK"}  # now in the kernel's cache
    assert stranger.attempts({"stat": f"os.stat('{m}/docs/plan.md')"}) == {"stat": "EACCES"}


@pytest.mark.xfail(strict=True, reason=KERNEL_CACHE_BUG)
def test_former_member_cannot_stat_after_a_member_looked_again(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"docs/plan.md": "plan\n"}, ["docs"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    assert member.attempts({"stat": f"os.stat('{m}/docs/plan.md')"}) == {"stat": "OK"}
    builder.ok(ws, "remove", "user:deskfs-member")
    # The daemon invalidated the cached attributes: the first stat after the removal is refused...
    assert member.attempts({"stat": f"os.stat('{m}/docs/plan.md')"}) == {"stat": "EACCES"}
    # ...but once a member looks again, the attributes are cached for everyone.
    assert builder.attempts({"stat": f"os.stat('{m}/docs/plan.md')"}) == {"stat": "OK"}
    assert member.attempts({"stat": f"os.stat('{m}/docs/plan.md')"}) == {"stat": "EACCES"}


# -- 5. role changes reach open handles ---------------------------------------------------------


def test_role_changes_take_effect_on_open_handles(desk, fd_servers):
    ws, m = desk, desk.mnt
    build(ws, builder, {"shared/log.txt": "start\n"}, ["shared"])
    builder.ok(ws, "invite", "user:deskfs-member", "--role", "editor")
    path = f"{m}/shared/log.txt"

    x = fd_servers(member)
    assert x("open", "w", path, "O_WRONLY") == "OK"
    assert x("open", "r", path, "O_RDONLY") == "OK"
    assert x("opendir", "d", f"{m}/shared") == "OK"
    assert x("listdir", "d") == ["log.txt"]
    assert x("pwrite", "w", "by editor\n", 6) == "OK"
    assert x("pread", "r", 100, 0) == "start\nby editor\n"  # also fills the page cache

    builder.ok(ws, "role", "user:deskfs-member", "viewer")
    assert x("pwrite", "w", "by viewer\n", 16) == "EACCES"
    assert x("ftruncate", "w", 0) == "EACCES"
    assert x("pread", "r", 100, 0) == "start\nby editor\n"  # a viewer still reads

    builder.ok(ws, "remove", "user:deskfs-member")
    assert x("pread", "r", 100, 0) == "EACCES"
    assert x("pread", "r", 4, 2) == "EACCES"
    assert x("pwrite", "w", "by nobody\n", 16) == "EACCES"
    assert x("fstat", "r") == "EACCES"
    assert x("listdir", "d") == "EACCES"
    x.close()

    assert builder.attempts({"content": f"assert open('{path}').read() == 'start\\nby editor\\n'"}) == {"content": "OK"}
    records = [r for r in journal(builder, ws) if r["principal"] == "user:deskfs-member"]
    refusals = [(r["op"], r["details"]["role"]) for r in records if r["errno"] == errno.EACCES]
    assert refusals[:2] == [("write", "viewer"), ("setattr", "viewer")], refusals
    assert refusals[-1] == ("write", "none"), refusals
    assert {op for op, role in refusals[2:-1]} <= {"read", "getattr"} and \
        all(role == "none" for _, role in refusals[2:]), refusals
    assert all(r["path"] == "/shared/log.txt" for r in records if r["errno"] == errno.EACCES)


# -- 6. bad input -------------------------------------------------------------------------------


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
    assert not (tmp_path / "other-store").exists()

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


# -- 7. defaults: the owner's own agents --------------------------------------------------------


def test_owner_unix_user_agents_are_editors_until_configured(desk):
    ws, m = desk, desk.mnt
    build(ws, builder, {"notes.txt": "notes\n"}, [])
    agents = [helper, Who(agent="another"), root]
    for who in agents:
        assert who.whoami(m) == who.principal
        name = who.principal.replace(":", "-")
        assert who.attempts({
            "write": f"open('{m}/{name}.txt', 'w').write('hi')",
            "append": f"open('{m}/notes.txt', 'a').write('{name}\\n')",
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
            "write": f"open('{m}/notes.txt', 'a').write('x')",
        }) == {"read": "OK", "list": "OK", "write": "EACCES"}, who

    builder.ok(ws, "config", "members.own_agents", "off")
    assert members(builder, ws)["own_agents"] == "off"
    for who in agents:
        assert who.attempts({
            "list": f"os.listdir('{m}')",
            "write": f"open('{m}/notes.txt', 'a').write('x')",
            "new": f"open('{m}/new.txt', 'w').write('x')",
            "read": f"open('{m}/notes.txt').read()",
        }) == {"list": "EACCES", "write": "EACCES", "new": "EACCES", "read": "EACCES"}, who

    # The owner itself still works.
    assert builder.attempts({
        "write": f"open('{m}/notes.txt', 'a').write('owner\\n')",
        "list": f"assert 'notes.txt' in os.listdir('{m}')",
        "read": f"assert open('{m}/notes.txt').read().endswith('owner\\n')",
    }) == {"write": "OK", "list": "OK", "read": "OK"}
    builder.ok(ws, "config", "members.own_agents", "editor")
    assert helper.attempts({"write": f"open('{m}/notes.txt', 'a').write('back\\n')"}) == {"write": "OK"}
