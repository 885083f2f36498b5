"""`deskfs versions`, `cat`, `diff`, `restore`, `trash`, `undelete`, `gc`: version history from the CLI.

Listings come from the daemon (which knows the caller by its peer credentials and shows only what it may
read); old content is read through the mount's `.deskfs/versions/` tree and restores and undeletes are
asked through the mount (`user.deskfs.restore`, `user.deskfs.undelete`), so the kernel checks the caller's
Unix permissions and the daemon its role and the locks, exactly as for any change.

Must never: read the store's files directly; change anything but through the mount.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import time
from typing import Any, Callable

from deskfs import mounts
from deskfs.cli.agents import lock_holders
from deskfs.cli.common import answers, ask, connect, human_size, print_table, say
from deskfs.errors import EXIT_USAGE, DeskfsError

VERSIONS_VIEW = ".deskfs/versions"
RESTORE_XATTR = "user.deskfs.restore"
UNDELETE_XATTR = "user.deskfs.undelete"
SPEC = re.compile(r"(.*)@(\d{1,9})\Z", re.S)


def workspace_path(path: str) -> tuple[mounts.Mount, str]:
    """(the mount `path` is in, `path` from the workspace's root as `/a/b`); exit 2 outside any mount.

    Symbolic links are resolved first: a link in the workspace to a file elsewhere is elsewhere (a
    restore or undelete through it must not set attributes on files outside the workspace)."""
    absolute = os.path.realpath(path)
    mount = mounts.containing(absolute)
    if mount is None:
        raise DeskfsError(f"{path} is not inside a deskfs mount", EXIT_USAGE)
    rel = absolute[len(mount.mountpoint.rstrip("/")):] or "/"
    if rel == "/.deskfs" or rel.startswith("/.deskfs/"):
        raise DeskfsError(f"{path} is inside the versions view; name the file itself", EXIT_USAGE)
    return mount, rel


def in_mount(mount: mounts.Mount, rel: str) -> str:
    """The path of workspace path `rel` (`/a/b`) through the mount."""
    return os.path.join(mount.mountpoint, rel.lstrip("/"))


def parse_spec(spec: str) -> tuple[str, int]:
    """`PATH@N` as (PATH, N); a one-line usage error for anything else."""
    match = SPEC.match(spec)
    if match is None or not match.group(1) or int(match.group(2)) < 1:
        raise DeskfsError(f"{spec!r} is not PATH@N (a version number from 1 on; see: deskfs versions PATH)",
                          EXIT_USAGE)
    return match.group(1), int(match.group(2))


def read_version(path: str, number: int) -> bytes:
    mount, rel = workspace_path(path)
    if rel == "/":
        raise DeskfsError("the workspace's root is a folder: it has no versions", EXIT_USAGE)
    view = os.path.join(mount.mountpoint, VERSIONS_VIEW, rel.lstrip("/"), str(number))
    try:
        with open(view, "rb") as f:
            return f.read()
    except FileNotFoundError:
        if not os.path.exists(os.path.join(mount.mountpoint, rel.lstrip("/"))):
            raise DeskfsError(f"{path}: no such file in the workspace") from None
        raise DeskfsError(f"{path} has no version {number} (see: deskfs versions {path})") from None
    except PermissionError:
        raise DeskfsError(f"{path}: you may not read its versions (your role, or its permissions)") from None
    except NotADirectoryError:
        raise DeskfsError(f"{path}: a folder on the way is not a folder") from None


def _when(ns: int | None) -> str:
    if ns is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


# -- commands -----------------------------------------------------------------------------------


def cmd_versions(args: argparse.Namespace) -> int:
    mount, rel = workspace_path(args.path)
    listed = ask(mount, {"op": "versions", "path": rel})["versions"]
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    print_table([("VERSION", "TIME", "BY", "SIZE", "HASH", "ENDED BY")] + [
        (str(v["number"]) + (" (current)" if v["current"] else ""), _when(v["ended_ns"] or v["made_ns"]),
         v["principal"] or "-", human_size(v["size"]), (v["hash"] or "-")[:16], v["ended_by"] or "-")
        for v in listed])
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    path, number = parse_spec(args.spec)
    data = read_version(path, number)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    import difflib

    path, number = parse_spec(args.spec)
    old = read_version(path, number)
    if args.other is not None:
        other_path, other_number = parse_spec(args.other)
        new, new_name = read_version(other_path, other_number), args.other
    else:
        try:
            with open(path, "rb") as f:
                new = f.read()
        except OSError as exc:
            raise DeskfsError(f"{path}: {exc.strerror}") from None
        new_name = f"{path} (now)"
    try:
        old_text, new_text = old.decode(), new.decode()
    except UnicodeDecodeError:
        same = "identical" if old == new else "differ"
        say(f"binary files {args.spec} ({len(old)} bytes) and {new_name} ({len(new)} bytes) {same}")
        return 0
    sys.stdout.writelines(difflib.unified_diff(old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                               fromfile=args.spec, tofile=new_name))
    return 0


def _refusal(path: str, exc: OSError, what: str, actual: str | None = None) -> DeskfsError:
    """The one line for a refused change of `path` (as the user named it; `actual`: where it is)."""
    if exc.errno == errno.EBUSY:
        return DeskfsError(f"{path} is locked by {lock_holders(actual or path)}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DeskfsError(f"you may not {what} (your role, or the Unix permissions of {path})")
    if exc.errno == errno.EROFS:
        return DeskfsError(f"{path} is read-only")
    return DeskfsError(f"{path}: {exc.strerror}")


def cmd_restore(args: argparse.Namespace) -> int:
    path, number = parse_spec(args.spec)
    target = in_mount(*workspace_path(path))
    try:
        os.setxattr(target, RESTORE_XATTR, str(number).encode())
    except FileNotFoundError:
        if not os.path.lexists(target):
            raise DeskfsError(f"{path}: no such file in the workspace") from None
        raise DeskfsError(f"{path} has no version {number} (see: deskfs versions {path})") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise DeskfsError(f"{path} is not a regular file", EXIT_USAGE) from None
        raise _refusal(path, exc, f"change {path}", target) from None
    version = os.getxattr(target, "user.deskfs.version").decode()
    say(f"restored {path} to the content of version {number}; it is version {version} now")
    return 0


def _removed_entries(mount: mounts.Mount, under: str) -> list[dict]:
    return ask(mount, {"op": "trash", "path": under})["removed"]


def cmd_trash(args: argparse.Namespace) -> int:
    mount, rel = workspace_path(args.path or os.getcwd())
    removed = _removed_entries(mount, rel)
    if args.json:
        print(json.dumps(removed, indent=2))
        return 0
    if not removed:
        say("nothing removed" + (f" under {args.path}" if args.path else ""))
        return 0
    print_table([("PATH", "REMOVED", "BY", "SIZE")] + [
        (r["path"], _when(r["deleted_ns"]), r["deleted_by"], human_size(r["size"])) for r in removed])
    return 0


def cmd_undelete(args: argparse.Namespace) -> int:
    mount, rel = workspace_path(args.path)
    removed = _removed_entries(mount, rel)
    if not removed:
        raise DeskfsError(f"nothing was removed at {args.path} (see: deskfs trash)")
    target_rel = rel
    if args.as_path:  # only into the same workspace: the line number means nothing anywhere else
        as_mount, target_rel = workspace_path(args.as_path)
        if as_mount.mountpoint != mount.mountpoint or target_rel == "/":
            raise DeskfsError(f"--as {args.as_path}: name a new path in the workspace of {args.path}", EXIT_USAGE)
    target_root = in_mount(mount, target_rel)
    exact = [r for r in removed if r["path"] == rel]
    if exact:  # a file: its newest removal
        chosen = {rel: exact[0]}
    else:  # a folder: each file removed under it, the newest removal of each path
        chosen = {}
        for entry in removed:
            chosen.setdefault(entry["path"], entry)
    for removed_path, entry in sorted(chosen.items()):
        target = target_root if removed_path == rel else os.path.join(target_root, removed_path[len(rel):].lstrip("/"))
        _undelete_one(entry, target, args)
    return 0


def _undelete_one(entry: dict, target: str, args: argparse.Namespace) -> None:
    if os.path.lexists(target):
        raise DeskfsError(f"{target} exists; bring it back under another name with --as NEWPATH")
    folder, name = os.path.split(target)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DeskfsError(f"{folder} is not a folder")
    os.makedirs(folder, exist_ok=True)  # through the mount, as the caller: a removed folder comes back
    try:
        os.setxattr(folder, UNDELETE_XATTR, f"{entry['line']} ".encode() + os.fsencode(name))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise DeskfsError(f"{target} exists; bring it back under another name with --as NEWPATH") from None
        if exc.errno == errno.ENOENT:
            raise DeskfsError(f"{entry['path']} cannot be brought back: its content is gone") from None
        raise _refusal(folder, exc, f"create files in {folder}") from None
    say(f"brought back {entry['path']} as {target}")


def cmd_gc(args: argparse.Namespace) -> int:
    mount = mounts.resolve_workspace(args.mount)
    bar: Any = None
    with connect(mount, {"op": "gc"}) as control:
        for answer in answers(control):
            if "progress" in answer and sys.stderr.isatty():
                if bar is None:
                    from tqdm import tqdm

                    bar = tqdm(total=answer["total"], unit="version", file=sys.stderr, leave=False)
                bar.update(answer["progress"] - bar.n)
            elif "ok" in answer:
                if bar is not None:
                    bar.close()
                say(f"collected {answer['dropped']} old versions, freed {human_size(answer['freed'])}")
                return 0
    raise DeskfsError(f"the deskfs daemon of {mount.mountpoint} closed the connection")


def add_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    sub = command("versions", cmd_versions, "a file's versions: number, time, who, size, content hash")
    sub.add_argument("path")
    sub.add_argument("--json", action="store_true")

    sub = command("cat", cmd_cat, "print version N of a file (PATH@N)")
    sub.add_argument("spec", metavar="PATH@N")

    sub = command("diff", cmd_diff, "what changed from PATH@N to PATH@M (or to the file now)")
    sub.add_argument("spec", metavar="PATH@N")
    sub.add_argument("other", nargs="?", metavar="PATH@M")

    sub = command("restore", cmd_restore, "make version N of a file its next version (PATH@N)")
    sub.add_argument("spec", metavar="PATH@N")

    sub = command("trash", cmd_trash, "files removed (under PATH, or the current folder)")
    sub.add_argument("path", nargs="?")
    sub.add_argument("--json", action="store_true")

    sub = command("undelete", cmd_undelete, "bring a removed file (or every file of a removed folder) back")
    sub.add_argument("path")
    sub.add_argument("--as", dest="as_path", metavar="NEWPATH", help="bring it back under another name")

    sub = command("gc", cmd_gc, "(owner) drop old versions the versions policy no longer keeps, now")
    sub.add_argument("--mount", metavar="PATH")
