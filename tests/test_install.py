"""deskfs for every local user: the installed command, `deskfs run` from anywhere, and the provisioned box.

scripts/install puts deskfs under /opt/deskfs and the command at /usr/local/bin/deskfs, where every Unix
user can run it (the suite's conftest runs it at the start, so these tests and all others use that
install). scripts/provision-box is what the Vagrantfile runs; here it runs in a temporary folder for a
temporary Unix user standing in for `vagrant`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import DESKFS, REPO, Workspace, command_as, deskfs, one_line, run, unix_users

USER = "deskfs-t1"
BOX_USER = "deskfs-vagrant"  # made for the provisioning test and removed after it
PREFIX = Path("/opt/deskfs")


@pytest.fixture(scope="module")
def t1() -> pwd.struct_passwd:
    return unix_users(USER)[USER]


def install(repo: Path = REPO) -> subprocess.CompletedProcess:
    return run([str(repo / "scripts" / "install")], cwd="/")


def current_release() -> str:
    return os.readlink(PREFIX / "current")


# -- the installed command -----------------------------------------------------------------------


def test_every_user_runs_the_installed_command_which_does_not_point_into_the_clone(t1):
    assert Path(DESKFS).resolve().is_relative_to(PREFIX / "releases")
    helped = run(command_as(USER, "deskfs", "--help"), cwd="/")  # found on the default PATH
    assert helped.stdout.startswith("usage: deskfs")
    where = run(command_as(USER, str(PREFIX / "venv" / "bin" / "python"), "-c",
                           "import deskfs, pyfuse3, trio; print(deskfs.__file__)"), cwd="/").stdout.strip()
    assert where.startswith(str(PREFIX / "releases")) and not where.startswith(str(REPO))
    # Outside any mount, the usual one-line refusal (exit 2): the command itself ran.
    outside = run(command_as(USER, DESKFS, "whoami"), cwd="/", check=False)
    assert outside.returncode == 2 and one_line(outside) == \
        "deskfs: not inside a deskfs mount (cd into one or pass --mount PATH)"


@pytest.fixture
def shared_ws(open_tmp, t1):
    """A workspace mounted with --allow-other in a folder every user may pass through; t1 is an editor."""
    ws = Workspace(open_tmp, "shared")
    try:
        ws.mount("--allow-other")
        ws.invite(f"user:{USER}")
        yield ws
    finally:
        ws.cleanup()


def test_another_user_runs_whoami_on_a_shared_mount(shared_ws):
    assert run(command_as(USER, DESKFS, "whoami", "--mount", str(shared_ws.mnt)), cwd="/").stdout == f"user:{USER}\n"
    inside = run(command_as(USER, "sh", "-c", f'cd "{shared_ws.mnt}" && deskfs whoami'), cwd="/")
    assert inside.stdout == f"user:{USER}\n"


def test_install_from_a_clone_only_root_can_read_is_safe_to_run_twice_and_follows_changes(tmp_path, t1):
    clone = tmp_path / "clone"  # pytest's folders are 0700: like a clone under /root
    clone.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, clone / name)
    for name in ("deskfs", "scripts"):
        shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        install(clone)
        mine = current_release()
        built = os.stat(PREFIX / mine).st_mtime_ns
        assert run(command_as(USER, "ls", str(clone)), cwd="/", check=False).returncode != 0
        assert run(command_as(USER, "deskfs", "--help"), cwd="/").stdout.startswith("usage: deskfs")
        install(clone)  # again: nothing to build (another test session may have switched meanwhile)
        assert current_release() == mine and os.stat(PREFIX / mine).st_mtime_ns == built
        with open(clone / "deskfs" / "__init__.py", "a") as f:
            f.write("# changed in a test\n")
        assert "installed" in install(clone).stdout
        assert current_release() != mine
        assert (PREFIX / "current" / "deskfs" / "__init__.py").read_text().endswith("# changed in a test\n")
        assert run(command_as(USER, "deskfs", "--help"), cwd="/").stdout.startswith("usage: deskfs")
        assert (PREFIX / mine).is_dir()  # kept for daemons started from it
    finally:
        install()  # this clone's source again


# -- deskfs run from anywhere --------------------------------------------------------------------

# Runs a command in a mount namespace of its own in which only the deskfs mounts named in $1 stay mounted:
# the machine may have others (other test sessions'), which must neither count nor be touched.
SEEING_ONLY = r"""
keep=" $1 "; shift
findmnt -rn -t fuse.deskfs -o TARGET | while read -r m; do
    case "$keep" in *" $m "*) ;; *) umount -l "$m" ;; esac
done
exec "$@"
"""
WHOAMI_IN_EACH = 'for m in "$@"; do getfattr -n user.deskfs.whoami --only-values "$m"; echo; done'


def seeing_only(mounts: list[Workspace], *command: str) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", SEEING_ONLY, "sh",
            " ".join(str(ws.mnt) for ws in mounts), *command]


def run_whoami(agent: str, mounts: list[Workspace], user: str | None = None, **kwargs):
    command = [DESKFS, "run", "--agent", agent, "--", "sh", "-c", WHOAMI_IN_EACH, "sh", *(str(w.mnt) for w in mounts)]
    if user is not None:
        command = command_as(user, *command)
    return run(seeing_only(mounts, *command), **{"cwd": "/", **kwargs})


@pytest.fixture
def three_workspaces(open_tmp, t1):
    """a and b: root's, in a folder only root may enter; c: shared (--allow-other), where t1 and its agents
    roamer and mine are editors (so agent:roamer belongs to t1 there)."""
    private = open_tmp / "private"
    private.mkdir(mode=0o700)
    made = []
    try:
        for name, folder, args in (("a", private, ()), ("b", private, ()), ("c", open_tmp, ("--allow-other",))):
            ws = Workspace(folder, name)
            made.append(ws)
            ws.mount(*args)
        made[2].invite(f"user:{USER}")
        for agent in ("roamer", "mine"):
            deskfs("invite", f"agent:{agent}", "--role", "editor", "--bound-to", USER, "--mount", str(made[2].mnt))
        yield made
    finally:
        for ws in made:
            ws.cleanup()


def test_run_outside_any_mount_starts_a_session_in_every_workspace_that_accepts_one(three_workspaces):
    a, b, c = three_workspaces
    # Root, outside any mount: a session in a and b; c refuses (the name is another user's) and is passed over.
    assert run_whoami("roamer", [a, b, c]).stdout.split() == ["agent:roamer", "agent:roamer", "user:root"]
    assert run_whoami("tool", [a, b, c]).stdout.split() == ["agent:tool"] * 3
    # t1 cannot reach a and b (their folder is root's): passed over; c accepts.
    assert run_whoami("mine", [a, b, c], user=USER).stdout.split()[-1] == "agent:mine"
    # Nothing accepted: one line, exit 1 for a refusal, 2 for bad input or no workspace at all.
    refused = run_whoami("roamer", [c], check=False)
    assert refused.returncode == 1 and one_line(refused) == \
        f"deskfs: no mounted workspace accepted the session: {c.mnt}: agent:roamer belongs to another Unix user"
    unreachable = run_whoami("mine", [a, b], user=USER, check=False)
    assert unreachable.returncode == 1
    assert one_line(unreachable).startswith(f"deskfs: no mounted workspace accepted the session: {a.mnt}: cannot reach")
    assert one_line(unreachable).endswith("(and 1 more)")
    bad = run_whoami("bad name", [a, b], check=False)
    assert bad.returncode == 2 and one_line(bad) == \
        "deskfs: invalid agent name 'bad name' (1-64 characters of A-Z a-z 0-9 . _ -)"
    nothing = run_whoami("tool", [], check=False)
    assert nothing.returncode == 2 and one_line(nothing) == \
        "deskfs: no deskfs workspace is mounted (mount one, or pass --mount PATH)"
    # Inside a mount, or with --mount: that workspace only, as before.
    inside = run([DESKFS, "run", "--agent", "here", "--", "sh", "-c", WHOAMI_IN_EACH, "sh", str(a.mnt), str(b.mnt)],
                 cwd=a.mnt)
    assert inside.stdout.split() == ["agent:here", "user:root"]
    chosen = run([DESKFS, "run", "--agent", "there", "--mount", str(b.mnt), "--", "sh", "-c", WHOAMI_IN_EACH, "sh",
                  str(a.mnt), str(b.mnt)], cwd="/")
    assert chosen.stdout.split() == ["user:root", "agent:there"]


# -- the Vagrant box ---------------------------------------------------------------------------------


def remove_user(name: str) -> None:
    run(["userdel", name], cwd="/", check=False)
    run(["groupdel", name], cwd="/", check=False)  # userdel leaves it where USERGROUPS_ENAB is off


@pytest.fixture
def box_user() -> pwd.struct_passwd:
    """A temporary Unix user standing in for the box's `vagrant` (made here, removed at the end)."""
    remove_user(BOX_USER)  # left over by an interrupted run
    run(["useradd", "-M", "-U", "-s", "/bin/sh", BOX_USER], cwd="/")
    try:
        yield pwd.getpwnam(BOX_USER)
    finally:
        remove_user(BOX_USER)


def test_provisioned_box_user_owns_and_uses_the_desk(open_tmp, box_user):
    home = open_tmp / "home"
    home.mkdir()
    os.chown(home, box_user.pw_uid, box_user.pw_gid)
    desk, store = home / "desk", home / "deskfs-store"
    try:
        provisioned = run([str(REPO / "scripts" / "provision-box"), BOX_USER, str(home)], cwd="/")
        assert provisioned.stdout.splitlines()[-1] == \
            f"deskfs: {desk} is {BOX_USER}'s workspace (owner user:{BOX_USER}); {BOX_USER} runs deskfs from any folder"
        session = run(command_as(BOX_USER, "sh", "-c", """
            set -e
            cd "$1"
            ls -la . >/dev/null
            echo hello > notes.txt
            mkdir drafts && echo more > drafts/one.txt
            ls
            cat notes.txt drafts/one.txt
            deskfs lock notes.txt
            deskfs locks
            echo edited >> notes.txt
            deskfs unlock notes.txt
            deskfs whoami
            cat notes.txt
        """, "sh", str(desk)), cwd="/").stdout.splitlines()
        assert session[:4] == ["drafts", "notes.txt", "hello", "more"]
        assert session[4].startswith(f"{desk}/notes.txt  lease exclusive  user:{BOX_USER}  pid ")
        assert session[5:] == [f"user:{BOX_USER}", "hello", "edited"]
        # The workspace is the user's: its store, its daemon, its files; root is not let into the mount.
        assert os.stat(store / "deskfs.db").st_uid == box_user.pw_uid
        daemon = int((store / "run" / "daemon.lock").read_text())
        assert os.stat(f"/proc/{daemon}").st_uid == box_user.pw_uid
        owned = run(command_as(BOX_USER, "sh", "-c", 'stat -c %U "$1"/notes.txt "$1"', "sh", str(desk)), cwd="/")
        assert owned.stdout.split() == [BOX_USER, BOX_USER]
        with pytest.raises(PermissionError):
            os.listdir(desk)
        # Provisioning again (every `vagrant up`) leaves the working mount as it is.
        again = run([str(REPO / "scripts" / "provision-box"), BOX_USER, str(home)], cwd="/")
        assert again.stdout.splitlines()[-1] == f"deskfs: {BOX_USER}'s workspace is already mounted at {desk}"
        assert int((store / "run" / "daemon.lock").read_text()) == daemon
    finally:
        if run([DESKFS, "unmount", str(desk)], cwd="/", check=False).returncode != 0:
            run(["fusermount3", "-uz", str(desk)], cwd="/", check=False)
            try:
                os.kill(int((store / "run" / "daemon.lock").read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass  # no daemon was started, or it is gone
