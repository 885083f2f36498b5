"""Test harness: real deskfs mounts in temporary folders, driven from separate processes.

Every mount a test makes is unmounted when the test ends, pass or fail.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

DESKFS = str(Path(sys.executable).parent / "deskfs")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.exit("/dev/fuse is missing: the deskfs suite mounts real filesystems and cannot run", returncode=1)
    if os.geteuid() != 0:
        pytest.exit("the deskfs suite runs as root (it mounts, and creates Unix users)", returncode=1)


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
