"""What a hostile local user can do to a shared workspace, and must not (issue: security).

Every attacker is a real Unix user (deskfs-stranger: no member; deskfs-member, deskfs-client: members),
or one of root's agents, in a process of its own, against a builder-owned workspace mounted with
--allow-other (the `desk` fixture of test_roles). The autouse check that no daemon logged an internal
error or a traceback applies to every test here.

Covered: the control socket survives any line (deep nesting, wrong types, garbage) and floods of idle
connections, and members keep their identity meanwhile; repeated refusals are coalesced and refusal
records rate-limited; a flock held through an inherited descriptor binds others and is attributed to its
real holder; another principal cannot map a locked file shared and writable; hard links do not escape
folder leases; a folder above a locked file cannot be moved; a removed member's mapping is cut off; a
non-member cannot watch the root with inotify; a viewer sees no record of a private folder with a
non-UTF-8 name; a non-member learns nothing from refusals; identity follows exec, survives orphaning
inside `deskfs run`, and ignores DESKFS_AGENT of set-user-ID programs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import PY, agent_env, command_as, read_line
from test_roles import desk, people  # noqa: F401  (fixtures)
from test_roles import MEMBER, STRANGER, Who, build, builder, journal, member, refused, root, stranger

CLIENT_SOCKET = "run/ctl.sock"


def ask_socket(ws, line: bytes, who: Who = stranger) -> str:
    """Send one raw line to the control socket as `who`; the daemon's first answer line."""
    code = """
        import socket, sys
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sys.argv[1])
        try:
            s.sendall(sys.stdin.buffer.read())
            s.shutdown(socket.SHUT_WR)
            print(s.makefile('rb').readline().decode().strip())
        except (BrokenPipeError, ConnectionResetError):  # closed on us before we were done: no answer
            print("")
    """
    result = subprocess.run(who.command(PY, "-c", textwrap.dedent(code), str(ws.store / CLIENT_SOCKET)),
                            input=line, capture_output=True, env=who.env(), timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


@pytest.fixture
def team(desk):
    """The desk with deskfs-member invited as an editor."""
    builder.ok(desk, "invite", f"user:{MEMBER}", "--role", "editor")
    return desk


def mount_works(ws) -> None:
    """The mount still serves, and a member is still itself."""
    assert member.whoami(ws.mnt) == f"user:{MEMBER}"
    assert builder.py(f"import os; print(sorted(os.listdir({str(ws.mnt)!r})))") is not None


# -- 1. nobody can stop the workspace ------------------------------------------------------------


BAD_LINES = [
    b"[" * 3000 + b"]" * 3000 + b"\n",
    b"{\"op\": \"log\", \"query\": " + b"{\"a\": " * 2000 + b"1" + b"}" * 2000 + b"}\n",
    b"[1, 2, 3]\n",
    b"\"just a string\"\n",
    b"{\"op\": 7}\n",
    b"{\"op\": \"log\", \"query\": \"not an object\"}\n",
    b"{\"op\": \"log\", \"query\": {\"limit\": 1e400}}\n",
    b"{\"op\": \"log\", \"query\": {\"limit\": 99999999999999999999999}}\n",
    b"{\"op\": \"log\", \"query\": {\"since_ns\": \"yesterday\"}}\n",
    b"{\"op\": \"log\", \"query\": {\"principals\": [1, {}]}}\n",
    b"{\"op\": \"log\", \"query\": {\"nonsense\": 1}}\n",
    b"{\"op\": \"log\", \"follow\": \"yes\"}\n",
    b"{\"op\": \"invite\", \"principal\": {\"items\": 1}, \"role\": [\"editor\"]}\n",
    b"{\"op\": \"config\", \"key\": [], \"value\": {}}\n",
    b"{\"op\": \"session\", \"agent\": {\"x\": 1}}\n",
    b"{\"op\": \"session\", \"agent\": \"ok\", \"token\": \"not-hex\"}\n",
    b"\xff\xfe\x00garbage\n",
    b"x" * 70000 + b"\n",
]


@pytest.mark.parametrize("who", [stranger, member], ids=["non-member", "member"])
def test_no_line_on_the_control_socket_stops_the_daemon(team, who):
    desk = team
    for line in BAD_LINES:
        answer = ask_socket(desk, line, who)
        if answer:  # an over-long line may be cut off before its answer is read
            parsed = json.loads(answer)
            assert "error" in parsed and "\n" not in parsed["error"], (line[:60], answer)
            assert "could not answer" not in parsed["error"], (line[:60], answer)
        mount_works(desk)


def test_idle_connections_cannot_exhaust_the_daemon(team):
    """A non-member opening far more idle connections than it may keeps members working, as themselves."""
    code = """
        import select, socket, sys, time
        held = []
        for i in range(int(sys.argv[2])):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sys.argv[1])
            held.append(s)
        # Over the limit the daemon answers at once with one error line and closes; the others it
        # admitted stay silent (until they time out).
        refused, waiting, deadline = 0, set(held), time.monotonic() + 20
        while waiting and time.monotonic() < deadline and refused < len(held) - 128:
            ready, _, _ = select.select(list(waiting), [], [], 0.5)
            for s in ready:
                refused += b"too many connections" in s.recv(4096)
                waiting.discard(s)
        print(refused, flush=True)
        sys.stdin.readline()
    """
    desk = team
    flood = subprocess.Popen(stranger.command(PY, "-c", textwrap.dedent(code), str(desk.store / CLIENT_SOCKET),
                                              "400"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=stranger.env())
    try:
        buffer = bytearray()
        refused_count = int(read_line(flood.stdout, 60, buffer))
        assert refused_count >= 400 - 128, refused_count
        mount_works(desk)
        assert member.ok(desk, "whoami").strip() == f"user:{MEMBER}"
        assert json.loads(member.ok(desk, "members", "--json"))["members"]
    finally:
        flood.kill()
        flood.wait()


def test_refusals_cannot_flood_the_journal(desk):
    """5,000 denied stats of one path, then 5,000 of distinct paths: a bounded number of records."""
    before = len(journal(builder, desk))
    stranger.py(f"""
        import os
        for i in range(5000):
            try:
                os.stat({str(desk.mnt)!r} + '/secret')
            except OSError:
                pass
        for i in range(5000):
            try:
                os.stat({str(desk.mnt)!r} + f'/guess-{{i}}')
            except OSError:
                pass
    """)
    records = journal(builder, desk)[before:]
    mine = [r for r in records if r["principal"] == f"user:{STRANGER}"]
    same = [r for r in mine if r["path"] == "/secret"]
    repeated = sum((r["details"] or {}).get("repeated", 1) for r in same)
    assert repeated == 5000 or len(same) < 200, (len(same), repeated)  # one record per window, with its count
    suppressed = sum(r["details"]["count"] for r in mine if r["op"] == "refusals_suppressed")
    assert suppressed > 0
    assert len(mine) < 2000, len(mine)  # 10,000 refusals: far fewer records, and the rest counted


# -- 2. locks that cannot be slipped past --------------------------------------------------------


def test_flock_held_through_an_inherited_descriptor_binds_and_names_its_holder(desk):
    build(desk, builder, {"f.txt": "x"}, [])
    path = desk.mnt / "f.txt"
    # flock(1)'s own idiom: the lock stays with the subshell's descriptor after flock itself exits.
    holder = subprocess.Popen(["bash", "-c", f'(flock -x 9; echo locked; read line) 9<"{path}"'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=agent_env("holder"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        shown = root.run("getfattr", "--only-values", "-n", "user.deskfs.lock", str(path)).stdout
        assert "flock exclusive agent:holder" in shown, shown
        other = Who(agent="other").attempts({"write": f"os.write(os.open({str(path)!r}, os.O_WRONLY | os.O_APPEND), b'x')"})
        assert other == {"write": "EBUSY"}
    finally:
        holder.stdin.write("done\n")
        holder.stdin.close()
        holder.wait(timeout=30)


def test_another_principal_cannot_map_a_locked_file_shared(desk):
    build(desk, builder, {"m.bin": "\0" * 8192}, [])
    path = str(desk.mnt / "m.bin")
    holder = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import fcntl, mmap, os, sys
        fd = os.open({path!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
        m[0:4] = b"mine"
        print("ready", flush=True)
        sys.stdin.readline()
        m.flush()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=agent_env("holder"))
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = Who(agent="intruder").attempts({
            "map": f"""
                import mmap
                fd = os.open({path!r}, os.O_RDWR)
                m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
                m[100:105] = b"theft"
                m.flush()
            """,
            "write": f"fd = os.open({path!r}, os.O_RDWR); os.pwrite(fd, b'theft', 100)",
        })
        assert result == {"map": "ENODEV", "write": "EBUSY"}, result
    finally:
        holder.stdin.write("done\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert Path(path).read_bytes()[:4] == b"mine"
    assert b"theft" not in Path(path).read_bytes()


def test_a_mapping_made_before_another_principal_locked_cannot_write_past_the_lock(desk):
    """The other order: the intruder maps first, then the holder locks; the intruder's dirty pages are
    written back through its own handle, and refused."""
    build(desk, builder, {"m2.bin": "\0" * 8192}, [])
    path = str(desk.mnt / "m2.bin")
    intruder = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import errno, mmap, os, sys
        fd = os.open({path!r}, os.O_RDWR)
        m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
        print("mapped", flush=True)
        sys.stdin.readline()  # the holder locks meanwhile
        m[100:105] = b"theft"
        try:
            m.flush()
            print("OK", flush=True)
        except OSError as e:
            print(errno.errorcode[e.errno], flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=agent_env("intruder"))
    holder = None
    try:
        assert intruder.stdout.readline().strip() == "mapped"
        holder = subprocess.Popen(["flock", "-x", path, "-c", "echo locked; read line"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=agent_env("holder"))
        assert holder.stdout.readline().strip() == "locked"
        intruder.stdin.write("go\n")
        intruder.stdin.flush()
        assert intruder.stdout.readline().strip() in ("EIO", "EBUSY")  # the write-back was refused
        assert b"theft" not in read_past_the_cache(path)
    finally:
        for proc in (intruder, holder):
            if proc is not None:
                proc.kill()
                proc.wait()


def read_past_the_cache(path: str) -> bytes:
    """The file as the daemon serves it now (O_DIRECT: not what the kernel's page cache holds)."""
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, 1 << 16)  # page-aligned, as O_DIRECT wants
        n = os.preadv(fd, [buffer], 0)
        return bytes(buffer[:n])
    finally:
        os.close(fd)


def test_hard_links_do_not_escape_a_folder_lease(desk):
    build(desk, builder, {"fl/f": "data\n"}, ["fl", "free"])
    os.link(desk.mnt / "fl" / "f", desk.mnt / "free" / "f_link")
    owner = Who(agent="leaser")
    assert owner.run("setfattr", "-n", "user.deskfs.lock", "-v", "exclusive", str(desk.mnt / "fl")).returncode == 0
    other = Who(agent="other").attempts({
        "append via the other name": f"os.write(os.open({str(desk.mnt / 'free' / 'f_link')!r}, os.O_WRONLY | os.O_APPEND), b'x')",
        "truncate via the other name": f"os.truncate({str(desk.mnt / 'free' / 'f_link')!r}, 0)",
        "truncate via the locked path": f"os.truncate({str(desk.mnt / 'fl' / 'f')!r}, 0)",
        "unlink the other name": f"os.unlink({str(desk.mnt / 'free' / 'f_link')!r})",
    })
    assert set(other.values()) == {"EBUSY"}, other
    assert (desk.mnt / "fl" / "f").read_text() == "data\n"


def test_a_folder_above_a_locked_file_cannot_be_moved(desk):
    build(desk, builder, {"proj/sub/report.md": "v1\n"}, ["proj", "proj/sub"])
    holder = Who(agent="holder")
    assert holder.run("setfattr", "-n", "user.deskfs.lock", "-v", "exclusive",
                      str(desk.mnt / "proj" / "sub" / "report.md")).returncode == 0
    other = Who(agent="other")
    assert other.attempts({
        "rename the parent": f"os.rename({str(desk.mnt / 'proj' / 'sub')!r}, {str(desk.mnt / 'proj' / 'moved')!r})",
        "rename the grandparent": f"os.rename({str(desk.mnt / 'proj')!r}, {str(desk.mnt / 'elsewhere')!r})",
    }) == {"rename the parent": "EBUSY", "rename the grandparent": "EBUSY"}
    # The holder itself may move it: the lock moves with the file.
    assert holder.attempts({"move": f"os.rename({str(desk.mnt / 'proj')!r}, {str(desk.mnt / 'p2')!r})"}) == {"move": "OK"}
    assert other.attempts({"write": f"os.write(os.open({str(desk.mnt / 'p2' / 'sub' / 'report.md')!r}, os.O_WRONLY | os.O_APPEND), b'x')"}) \
        == {"write": "EBUSY"}


# -- 3. nothing leaks to people who should see nothing ------------------------------------------


MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
print(m[:8].decode(), flush=True)
for line in sys.stdin:
    print(m[:8].decode(), flush=True)  # a revoked mapping dies here with SIGBUS
"""


def test_a_removed_member_loses_its_mapping(team):
    desk = team
    desk_path = desk.mnt / "shared.txt"
    build(desk, builder, {"shared.txt": "version1"}, [])
    reader = member.popen(PY, "-c", MAPPER, str(desk_path))
    try:
        assert reader.stdout.readline().strip() == "version1"
        builder.ok(desk, "remove", f"user:{MEMBER}")
        builder.py(f"open({str(desk_path)!r}, 'r+').write('version2')")
        reader.stdin.write("again\n")
        reader.stdin.flush()
        seen = reader.stdout.readline().strip()
        assert seen == "", f"a removed member still reads through its mapping: {seen!r}"
        assert reader.wait(timeout=30) == -signal.SIGBUS
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


INOTIFY = r"""
import ctypes, errno, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
if libc.inotify_add_watch(fd, sys.argv[1].encode(), 0xFFF) < 0:
    print(errno.errorcode[ctypes.get_errno()])
else:
    print("OK")
"""


def test_a_non_member_cannot_watch_the_root(team):
    desk = team
    assert stranger.py(INOTIFY, str(desk.mnt)).strip() == "EACCES"
    assert stranger.attempts({"list": f"os.listdir({str(desk.mnt)!r})"}) == {"list": "EACCES"}
    assert member.py(INOTIFY, str(desk.mnt)).strip() == "OK"  # a member may
    # A non-member may still ask who it is (through the daemon's socket: it may not read the root).
    assert stranger.ok(desk, "whoami").strip() == f"user:{STRANGER}"


def test_a_viewer_sees_no_record_of_a_private_folder_with_a_non_utf8_name(desk):
    builder.ok(desk, "invite", f"user:{MEMBER}", "--role", "viewer")
    private = os.path.join(os.fsencode(desk.mnt), b"\xffpriv")
    code = f"""
        import os
        os.mkdir({private!r}, 0o700)
        with open(os.path.join({private!r}, b"layoffs-list-2027.txt"), "w") as f:
            f.write("names")
    """
    builder.py(code)
    shown = member.ok(desk, "log", "--json", "--limit", "0")
    assert "layoffs" not in shown and "priv" not in shown, shown
    assert "layoffs" in builder.ok(desk, "log", "--json", "--limit", "0")  # the owner sees it


@pytest.mark.parametrize("with_offer", [False, True], ids=["no offer", "an offer"])
def test_a_non_member_learns_nothing_from_refusals(desk, with_offer):
    if with_offer:
        builder.ok(desk, "invite", f"user:{MEMBER}", "--role", "editor")
        builder.ok(desk, "transfer", f"user:{MEMBER}")
    answers = {command: refused(stranger.deskfs(desk, command)) for command in
               ("cancel-transfer", "accept-transfer", "members", "leave")}
    for command, text in answers.items():
        assert text == f"deskfs: user:{STRANGER} is not a member of this workspace", (command, text)
        assert "builder" not in text


# -- 5. attribution that does not drift ----------------------------------------------------------


EXEC_WITHOUT = """
import os, sys
open(sys.argv[1], "w").write("before exec")
env = {k: v for k, v in os.environ.items() if k != "DESKFS_AGENT"}
if len(sys.argv) > 3:
    env["DESKFS_AGENT"] = sys.argv[3]
os.execve(sys.argv[2], [sys.argv[2], "-c", "import sys; open(sys.argv[1], 'w').write('after exec')", sys.argv[1] + ".after"], env)
"""


@pytest.mark.parametrize("before,after", [("x", None), (None, "y")], ids=["drops the agent", "takes an agent"])
def test_identity_is_resolved_again_after_exec(desk, before, after):
    target = desk.mnt / "exec.txt"
    args = [PY, "-c", EXEC_WITHOUT, str(target), PY] + ([after] if after else [])
    subprocess.run(args, env=agent_env(before), check=True, timeout=60)
    creators = {r["path"]: r["principal"] for r in journal(builder, desk) if r["op"] == "create"}
    assert creators["/exec.txt"] == (f"agent:{before}" if before else "user:root")
    assert creators["/exec.txt.after"] == (f"agent:{after}" if after else "user:root")


ORPHAN = """
import os, sys
sys.stdin.readline()  # by now its parent has exited: it is an orphan, no longer below the session's root
open(sys.argv[1], "w").write("made by an orphan")
print("done", flush=True)
"""

AGENT = r"""
import subprocess, sys
shell = subprocess.Popen(["bash", "-c", 'nohup "$0" -c "$1" "$2" <&0 &', sys.executable, sys.argv[1], sys.argv[2]],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
shell.wait()  # the shell is gone; its background child lives on, reparented
shell.stdin.write(b"go\n")
shell.stdin.flush()
print(shell.stdout.readline().decode().strip())
"""


def test_an_orphaned_descendant_stays_in_its_deskfs_run_session(desk):
    marker = desk.mnt / "orphan.txt"
    result = subprocess.run([*root.deskfs_command(), "run", "--agent", "runner", "--mount", str(desk.mnt), "--",
                             PY, "-c", AGENT, ORPHAN, str(marker)], env=agent_env(None), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    creators = {r["path"]: r["principal"] for r in journal(builder, desk) if r["op"] == "create"}
    assert creators["/orphan.txt"] == "agent:runner", creators


def test_a_set_user_id_program_ignores_its_invokers_deskfs_agent(desk, tmp_path):
    """A set-user-ID copy of touch owned by deskfs-member, run by deskfs-stranger with
    DESKFS_AGENT naming the member's agent: the file is the member's user's, not its agent's."""
    builder.ok(desk, "invite", f"user:{MEMBER}", "--role", "editor")
    builder.ok(desk, "invite", "agent:members-agent", "--role", "editor", "--bound-to", MEMBER)
    folder = Path("/var/tmp") / f"deskfs-suid-{os.getpid()}"  # /tmp may be nosuid
    folder.mkdir(mode=0o755, exist_ok=True)
    try:
        program = folder / "touch"
        shutil.copy("/usr/bin/touch", program)
        os.chown(program, pwd_uid(MEMBER), -1)
        os.chmod(program, 0o4755)
        result = subprocess.run(command_as(STRANGER, str(program), str(desk.mnt / "suid.txt"),
                                           agent="members-agent"), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        creators = {r["path"]: r["principal"] for r in journal(builder, desk) if r["op"] == "create"}
        assert creators["/suid.txt"] == f"user:{MEMBER}", creators
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid
