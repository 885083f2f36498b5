"""What each MCP tool does, in a process the daemon knows as the calling agent (`worker.py`).

Owns the operations behind the tools: files and folders through the mount (every path through
`paths.Root`, every call on descriptors beneath the mount's root), leases through `user.deskfs.lock`,
versions through `.deskfs/versions` and `user.deskfs.restore`/`undelete` (as `deskfs/cli/versions.py`
does), and journal, versions, trash and members through the daemon's control socket. A refusal becomes
a `Failure` whose sentence says what happened and what the agent can do (who holds the lock, which role
it has, which version the file is at and who wrote it).

Compare-and-swap (`if_version` of write_file/edit_file): an exclusive lease is taken on the file for the
duration (or the agent's own lease is used), then the version is read, then the new content is written
to a temporary file in the same folder with the target's mode and renamed over it (readers see the old or
the new content; rename-over keeps the target's history line), then the lease is released. No other
principal can change the file between the check and the rename: the lease makes every change of theirs
EBUSY.

Must never: open the store's database; touch a path that did not go through `paths.Root`; follow a
symlink out of the workspace; print or return a token; let an exception other than `Failure` reach the
caller for anything a client can send (the worker turns any other into an error sentence).
"""

from __future__ import annotations

import base64
import ctypes
import difflib
import errno
import json
import mimetypes
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from typing import Any, Iterator

from deskfs.journal import glob_body
from deskfs.mcp.control import Control, ControlError
from deskfs.mcp.paths import Outside, Root

LOCK = "user.deskfs.lock"
LOCKS = "user.deskfs.locks"
VERSION = "user.deskfs.version"
WHOAMI = "user.deskfs.whoami"
RESTORE = "user.deskfs.restore"
UNDELETE = "user.deskfs.undelete"
VERSIONS_VIEW = ".deskfs/versions"
CAS_TTL = 30  # seconds: the lease a compare-and-swap write holds at most
MAX_READ = 4 * 1024 * 1024  # bytes one read may return (more: read in ranges)
MAX_ENTRIES = 10_000  # entries a listing, tree or search returns at most
WAIT_MAX = 60.0
LOCK_POLL_MAX = 0.05
RENAME_NOREPLACE = 1

_libc = ctypes.CDLL(None, use_errno=True)


class Failure(Exception):
    """A tool error: one sentence a model can act on."""


def _renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
    if _libc.renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def _iso(ns: int | float | None) -> str | None:
    if ns is None:
        return None
    seconds = ns / 1e9
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(ns // 1_000_000 % 1000):03d}Z"


def _glob_regex(pattern: str) -> re.Pattern:
    """The whole of a name or relative path matched by glob `pattern` (the journal's glob syntax)."""
    return re.compile(glob_body(pattern) + r"\Z", re.S)


class Matcher:
    """A glob: with a '/' it matches the path from the search folder, without one any entry's name."""

    def __init__(self, pattern: str) -> None:
        pattern = pattern.strip()
        self.by_name = "/" not in pattern.strip("/")
        self.regex = _glob_regex(pattern.strip("/"))

    def __call__(self, rel: str, name: str) -> bool:
        return bool(self.regex.match(name if self.by_name else rel))


class Desk:
    """The workspace as the tools see it, acting as this process's principal."""

    def __init__(self, mountpoint: str, store: str, agent: str | None = None) -> None:
        self.root = Root(mountpoint)
        self.store = store
        self.control = Control(store, mountpoint)
        self.agent = agent
        self._principal: str | None = None

    # -- identity -------------------------------------------------------------------------------

    def principal(self) -> str:
        if self._principal is None:
            try:
                self._principal = self.control.ask({"op": "whoami"})["principal"]
            except ControlError as exc:
                raise Failure(str(exc)) from None
        return self._principal

    def role(self) -> str:
        """This principal's role now: owner, editor, viewer, or none."""
        try:
            answer = self.control.ask({"op": "members"})
        except ControlError:
            return "none"
        me = self.principal()
        for member in answer["members"]:
            if member["principal"] == me:
                return member["role"]
        return answer.get("own_agents", "editor") if answer.get("own_agents") != "off" else "none"

    # -- errors ---------------------------------------------------------------------------------

    def holders_text(self, rel: str) -> str:
        """`agent:writer (flock, exclusive, since 12:03:04)` for each holder of a lock on `rel` or above."""
        lines: list[str] = []
        candidates = [rel]
        while candidates[-1]:
            candidates.append(os.path.dirname(candidates[-1]))
        for candidate in candidates:
            try:
                with self.root.fd(candidate) as fd:
                    text = os.getxattr(self.root.proc(fd), LOCK).decode()
            except OSError:
                continue
            for line in text.splitlines():
                holder = self._holder(line)
                if holder["principal"] == self.principal():
                    continue
                if candidate != rel and holder["mode"] != "exclusive":
                    continue
                where = "" if candidate == rel else f" on the folder {self.root.shown(candidate)}"
                since = (holder.get("since") or "")[11:19]
                lines.append(f"{holder['principal']} ({holder['kind']}, {holder['mode']}, since {since}{where})")
            if lines:
                break
        return "; ".join(lines) or "another agent"

    @staticmethod
    def _holder(line: str) -> dict:
        words = line.split()
        holder: dict[str, Any] = {"kind": words[0] if words else "?", "mode": words[1] if len(words) > 1 else "?",
                                  "principal": words[2] if len(words) > 2 else "unknown"}
        for word in words[3:]:
            key, _, value = word.partition("=")
            holder[key] = int(value) if key == "pid" and value.lstrip("-").isdigit() else value
        holder.setdefault("expires", None)
        return holder

    def failure(self, exc: BaseException, rel: str, change: bool = True) -> Failure:
        """The sentence for an OSError on `rel` (or an Outside, a ControlError)."""
        if isinstance(exc, Failure):
            return exc
        if isinstance(exc, (Outside, ControlError)):
            return Failure(str(exc))
        if not isinstance(exc, OSError):
            return Failure(f"{type(exc).__name__}: {exc}")
        shown = self.root.shown(rel)
        code = exc.errno
        if code == errno.EBUSY:
            return Failure(f"{shown} is locked by {self.holders_text(rel)}: wait for it (lock_file with wait) or"
                           " work on something else; see lock_status")
        if code in (errno.EACCES, errno.EPERM) and change:
            role = self.role()
            if role == "viewer":
                return Failure("your role is viewer: you may read but not change files")
            if role == "none":
                return Failure(f"{self.principal()} is not a member of this workspace")
            return Failure(f"you may not change {shown}: its Unix permissions do not let you"
                           f" (your role is {role})")
        if code in (errno.EACCES, errno.EPERM):
            role = self.role()
            if role == "none":
                return Failure(f"{self.principal()} is not a member of this workspace")
            return Failure(f"you may not read {shown}: its Unix permissions do not let you")
        if code == errno.EXDEV:
            return Failure(f"{shown} leads outside the workspace (through '..' or a symlink); give a path inside it")
        if code == errno.ELOOP:
            return Failure(f"{shown} is a symlink loop, or a symlink where a file was expected")
        if code == errno.ENOENT:
            return Failure(f"{shown}: no such file or folder (see list_directory)")
        if code == errno.ENOTDIR:
            return Failure(f"{shown}: a part of this path is not a folder")
        if code == errno.EISDIR:
            return Failure(f"{shown} is a folder, not a file")
        if code == errno.EEXIST:
            return Failure(f"{shown} already exists")
        if code == errno.ENOTEMPTY:
            return Failure(f"the folder {shown} is not empty: delete_directory with recursive=true removes it"
                           " and everything in it")
        if code == errno.EROFS:
            return Failure(f"{shown} is read-only (the versions view cannot be changed)")
        if code in (errno.ENOTCONN, errno.ENODEV):
            return Failure(f"the workspace at {self.root.mountpoint} is not mounted (or its daemon stopped);"
                           " mount it again with deskfs mount")
        if code == errno.ENOSPC:
            return Failure("the disk under the workspace is full")
        if code == errno.ENAMETOOLONG:
            return Failure(f"{shown}: a name in this path is too long")
        return Failure(f"{shown}: {exc.strerror or exc}")

    @contextmanager
    def guarded(self, rel: str, change: bool = True) -> Iterator[None]:
        try:
            yield
        except Failure:
            raise
        except (OSError, Outside, ControlError) as exc:
            raise self.failure(exc, rel, change) from None

    def rel(self, path: Any) -> str:
        try:
            return self.root.relative(path)
        except Outside as exc:
            raise Failure(str(exc)) from None

    # -- small helpers -----------------------------------------------------------------------------

    def _version(self, fd: int) -> int | None:
        try:
            return int(os.getxattr(self.root.proc(fd), VERSION))
        except (OSError, ValueError):
            return None

    def _stat(self, rel: str, follow: bool = True) -> os.stat_result:
        if follow or not rel:
            with self.root.fd(rel) as fd:
                return os.fstat(fd)
        with self.root.parent(rel) as (dirfd, name):
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def _read(self, rel: str, offset: int = 0, length: int | None = None) -> tuple[bytes, int, int | None]:
        """(bytes, file size, version) of `rel`."""
        with self.root.fd(rel, os.O_RDONLY) as fd:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "is a folder", rel)
            if length is None and st.st_size - offset > MAX_READ:
                raise Failure(f"{self.root.shown(rel)} is {st.st_size} bytes: read it in ranges with offset and"
                              f" length (at most {MAX_READ} bytes each)")
            want = MAX_READ if length is None else length
            chunks, pos = [], offset
            while want > 0:
                chunk = os.pread(fd, min(want, 1 << 20), pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
                want -= len(chunk)
            return b"".join(chunks), st.st_size, self._version(fd)

    @staticmethod
    def _range(offset: Any, length: Any) -> tuple[int, int | None]:
        if offset is not None and (not isinstance(offset, int) or offset < 0):
            raise Failure("offset must be a whole number of bytes, 0 or more")
        if length is not None and (not isinstance(length, int) or not 0 <= length <= MAX_READ):
            raise Failure(f"length must be a whole number of bytes from 0 to {MAX_READ}")
        return offset or 0, length

    # -- reading --------------------------------------------------------------------------------

    def whoami(self) -> dict:
        return {"principal": self.principal(), "role": self.role(), "mountpoint": self.root.mountpoint}

    def list_allowed_directories(self) -> dict:
        return {"directories": [self.root.mountpoint]}

    def read_text_file(self, path: str, head: int | None = None, tail: int | None = None,
                       offset: int | None = None, length: int | None = None) -> dict:
        rel = self.rel(path)
        if head is not None and tail is not None:
            raise Failure("give head or tail, not both")
        for name, value in (("head", head), ("tail", tail)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise Failure(f"{name} must be a whole number of lines, 0 or more")
        start, length = self._range(offset, length)
        ranged = offset is not None or length is not None
        with self.guarded(rel, change=False):
            data, size, version = self._read(rel, start, length)
        try:
            text = data.decode("utf-8", errors="replace" if ranged else "strict")
        except UnicodeDecodeError:
            raise Failure(f"{self.root.shown(rel)} is not UTF-8 text: read it with read_media_file (base64),"
                          " with offset and length for a part") from None
        if head is not None:
            text = "".join(text.splitlines(keepends=True)[:head])
        elif tail is not None:
            text = "".join(text.splitlines(keepends=True)[-tail:]) if tail else ""
        return {"path": self.root.shown(rel), "content": text, "version": version, "size": size,
                "offset": start, "bytes": len(data), "eof": start + len(data) >= size}

    def read_media_file(self, path: str, offset: int | None = None, length: int | None = None) -> dict:
        rel = self.rel(path)
        start, length = self._range(offset, length)
        with self.guarded(rel, change=False):
            data, size, version = self._read(rel, start, length)
        mime = mimetypes.guess_type(rel)[0] or "application/octet-stream"
        return {"path": self.root.shown(rel), "mimeType": mime, "data": base64.b64encode(data).decode(),
                "size": size, "offset": start, "bytes": len(data), "version": version,
                "eof": start + len(data) >= size}

    def read_multiple_files(self, paths: list[str]) -> dict:
        if not isinstance(paths, list) or not paths:
            raise Failure("paths must be a non-empty list of paths")
        results = []
        for path in paths[:100]:
            try:
                got = self.read_text_file(path)
                results.append({"path": got["path"], "content": got["content"], "version": got["version"]})
            except Failure as exc:
                results.append({"path": str(path), "error": str(exc)})
        return {"files": results}

    def _entries(self, rel: str) -> list[os.DirEntry]:
        with self.root.fd(rel, os.O_RDONLY | os.O_DIRECTORY) as fd:
            with os.scandir(fd) as it:
                return sorted(it, key=lambda e: e.name)

    @staticmethod
    def _kind(entry: os.DirEntry) -> str:
        if entry.is_symlink():
            return "symlink"
        if entry.is_dir(follow_symlinks=False):
            return "directory"
        if entry.is_file(follow_symlinks=False):
            return "file"
        return "other"

    def list_directory(self, path: str) -> dict:
        rel = self.rel(path)
        with self.guarded(rel, change=False):
            entries = self._entries(rel)
        return {"path": self.root.shown(rel),
                "entries": [{"name": e.name, "type": self._kind(e)} for e in entries[:MAX_ENTRIES]],
                "truncated": len(entries) > MAX_ENTRIES}

    def list_directory_with_sizes(self, path: str, sortBy: str = "name") -> dict:
        rel = self.rel(path)
        if sortBy not in ("name", "size"):
            raise Failure("sortBy must be name or size")
        with self.guarded(rel, change=False):
            listed = []
            for e in self._entries(rel)[:MAX_ENTRIES]:
                try:
                    st = e.stat(follow_symlinks=False)
                    size, mtime = st.st_size, _iso(st.st_mtime_ns)
                except OSError:
                    size, mtime = 0, None
                listed.append({"name": e.name, "type": self._kind(e), "size": size, "modified": mtime})
        if sortBy == "size":
            listed.sort(key=lambda e: -e["size"])
        files = [e for e in listed if e["type"] != "directory"]
        return {"path": self.root.shown(rel), "entries": listed, "files": len(files),
                "directories": len(listed) - len(files), "total_size": sum(e["size"] for e in files)}

    def _walk(self, rel: str, exclude: list[Matcher], visit: Any, depth: int = 0) -> Iterator[tuple[str, str, str]]:
        """(path from `rel`, name, kind) of everything under `rel`, never following a symlink."""
        stack = [("", rel)]
        seen = 0
        while stack:
            sub, folder = stack.pop()
            try:
                entries = self._entries(folder)
            except OSError:
                continue
            for e in entries:
                inner = f"{sub}/{e.name}" if sub else e.name
                if any(m(inner, e.name) for m in exclude):
                    continue
                kind = self._kind(e)
                seen += 1
                if seen > 200_000:
                    return
                yield inner, e.name, kind
                if kind == "directory":
                    stack.append((inner, f"{folder}/{e.name}" if folder else e.name))

    def _patterns(self, patterns: Any) -> list[Matcher]:
        if patterns is None:
            return []
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise Failure("excludePatterns must be a list of glob patterns")
        return [Matcher(p) for p in patterns if p.strip()]

    def directory_tree(self, path: str, excludePatterns: list[str] | None = None) -> dict:
        rel = self.rel(path)
        exclude = self._patterns(excludePatterns)
        with self.guarded(rel, change=False):
            self._entries(rel)
            tree: dict = {"name": os.path.basename(rel) or "/", "type": "directory", "children": []}
            nodes = {"": tree}
            count = 0
            for inner, name, kind in sorted(self._walk(rel, exclude, None)):
                parent = nodes.get(os.path.dirname(inner))
                if parent is None:
                    continue
                node: dict = {"name": name, "type": kind}
                if kind == "directory":
                    node["children"] = []
                    nodes[inner] = node
                parent["children"].append(node)
                count += 1
                if count >= MAX_ENTRIES:
                    tree["truncated"] = True
                    break
        return {"path": self.root.shown(rel), "tree": tree}

    def search_files(self, path: str, pattern: str, excludePatterns: list[str] | None = None) -> dict:
        rel = self.rel(path)
        if not isinstance(pattern, str) or not pattern.strip():
            raise Failure("pattern must be a glob such as *.md or reports/**/*.csv")
        match = Matcher(pattern)
        exclude = self._patterns(excludePatterns)
        with self.guarded(rel, change=False):
            self._entries(rel)
            found = []
            for inner, name, kind in self._walk(rel, exclude, None):
                if match(inner, name):
                    found.append(self.root.shown(f"{rel}/{inner}" if rel else inner))
                    if len(found) >= MAX_ENTRIES:
                        break
        found.sort()
        return {"path": self.root.shown(rel), "pattern": pattern, "matches": found,
                "truncated": len(found) >= MAX_ENTRIES}

    def _locks_of(self, rel: str) -> list[dict]:
        try:
            with self.root.fd(rel) as fd:
                text = os.getxattr(self.root.proc(fd), LOCK).decode()
        except OSError:
            return []
        return [self._holder(line) | {"path": self.root.shown(rel)} for line in text.splitlines() if line.strip()]

    def _versions(self, rel: str) -> list[dict]:
        return self.control.ask({"op": "versions", "path": self.root.shown(rel)})["versions"]

    def get_file_info(self, path: str) -> dict:
        rel = self.rel(path)
        with self.guarded(rel, change=False):
            lst = self._stat(rel, follow=False)
            st = self._stat(rel) if stat.S_ISLNK(lst.st_mode) else lst
            with self.root.fd(rel) as fd:
                version = self._version(fd) if stat.S_ISREG(st.st_mode) else None
        info = {
            "path": self.root.shown(rel), "type": "directory" if stat.S_ISDIR(st.st_mode) else
            "file" if stat.S_ISREG(st.st_mode) else "other", "size": st.st_size,
            "created": _iso(st.st_ctime_ns), "modified": _iso(st.st_mtime_ns), "accessed": _iso(st.st_atime_ns),
            "isDirectory": stat.S_ISDIR(st.st_mode), "isFile": stat.S_ISREG(st.st_mode),
            "isSymlink": stat.S_ISLNK(lst.st_mode), "permissions": oct(stat.S_IMODE(st.st_mode))[2:],
            "version": version, "locks": self._locks_of(rel), "last_writer": None, "last_written": None,
        }
        if version is not None:
            try:
                current = [v for v in self._versions(rel) if v.get("current")]
                if current:
                    info["last_writer"] = current[-1].get("principal")
                    info["last_written"] = _iso(current[-1].get("made_ns"))
            except ControlError:
                pass
        return info

    # -- writing --------------------------------------------------------------------------------

    def _target(self, rel: str) -> str:
        """The entry a write to `rel` changes: `rel`, or where its symlink leads (inside the workspace)."""
        try:
            return self.root.resolved(rel)
        except FileNotFoundError:
            try:
                st = self._stat(rel, follow=False)
            except FileNotFoundError:
                return rel
            if stat.S_ISLNK(st.st_mode):
                raise Failure(f"{self.root.shown(rel)} is a symlink to nothing; write to a real path") from None
            raise

    def _stale(self, rel: str, wanted: int, current: int | None) -> Failure:
        if current is None:
            return Failure(f"version {wanted} is stale: {self.root.shown(rel)} does not exist (if_version=0"
                           " creates it only if it is absent)")
        who, when = "someone", "an unknown time"
        try:
            for v in self._versions(rel):
                if v.get("number") == current:
                    who, when = v.get("principal") or who, _iso(v.get("made_ns")) or when
        except ControlError:
            pass
        return Failure(f"version {wanted} is stale: the file is at version {current}, written by {who} at {when};"
                       " read it again, merge your change, and retry with if_version="
                       f"{current}")

    @contextmanager
    def _lease(self, rel: str, ttl: int = CAS_TTL) -> Iterator[tuple[int | None, list[dict]]]:
        """An exclusive lease on `rel` for the block (the agent's own, if it holds one): yields an O_PATH
        descriptor of the file it covers (None if the file does not exist)."""
        try:
            fd = self.root.open(rel, os.O_PATH)
        except FileNotFoundError:
            yield None, []
            return
        taken, mine = False, []
        try:
            try:
                os.setxattr(self.root.proc(fd), LOCK, f"exclusive ttl={ttl} new".encode())
                taken = True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                mine = [h for h in self._locks_of(rel) if h["principal"] == self.principal()]
                others = [h for h in self._locks_of(rel) if h["principal"] != self.principal()]
                if others or not mine:
                    raise
            yield fd, ([] if taken else [h for h in mine if h["kind"] == "lease"])
        finally:
            if taken:
                try:
                    os.removexattr(self.root.proc(fd), LOCK)
                except OSError:
                    pass  # the file was replaced: its lease went with its last name
            os.close(fd)

    def _own_leases(self, rel: str) -> list[dict]:
        return [h for h in self._locks_of(rel) if h["principal"] == self.principal() and h["kind"] == "lease"]

    def _replace(self, rel: str, data: bytes, noreplace: bool, carry: list[dict] | None = None) -> None:
        """Write `data` to a new file in `rel`'s folder and rename it over `rel` (keeping its mode). The
        agent's own leases on `rel` (`carry`) are taken on the new file before the rename, so that the
        file stays locked by it throughout."""
        from datetime import datetime

        with self.root.parent(rel) as (dirfd, name):
            try:
                mode = stat.S_IMODE(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
            except FileNotFoundError:
                mode = None
            temp = f".{name[:180]}.mcp-{secrets.token_hex(4)}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600 if mode is not None else 0o666, dir_fd=dirfd)
            try:
                try:
                    if mode is not None:
                        os.fchmod(fd, mode)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view[:1 << 20]):]
                    for lease in carry or ():
                        ttl = CAS_TTL
                        if lease.get("expires"):
                            ends = datetime.fromisoformat(lease["expires"].replace("Z", "+00:00")).timestamp()
                            ttl = max(1, min(86400, round(ends - time.time())))
                        os.setxattr(fd, LOCK, f"{lease['mode']} ttl={ttl}".encode())
                finally:
                    os.close(fd)
                if noreplace:
                    _renameat2(dirfd, temp, dirfd, name, RENAME_NOREPLACE)
                else:
                    os.rename(temp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException:
                try:
                    os.unlink(temp, dir_fd=dirfd)
                except OSError:
                    pass
                raise

    def _content(self, content: Any, encoding: str) -> bytes:
        if not isinstance(content, str):
            raise Failure("content must be a string (base64 when encoding is base64)")
        if encoding == "utf-8":
            return content.encode("utf-8", "surrogatepass")
        if encoding == "base64":
            try:
                return base64.b64decode(content, validate=True)
            except ValueError:
                raise Failure("content is not valid base64") from None
        raise Failure("encoding must be utf-8 or base64")

    def _check_version(self, if_version: Any) -> int | None:
        if if_version is not None and (not isinstance(if_version, int) or isinstance(if_version, bool)
                                       or if_version < 0):
            raise Failure("if_version must be a version number (0: the file must not exist yet)")
        return if_version

    def write_file(self, path: str, content: str, if_version: int | None = None, encoding: str = "utf-8") -> dict:
        rel = self.rel(path)
        data = self._content(content, encoding)
        wanted = self._check_version(if_version)
        with self.guarded(rel):
            rel = self._target(rel)
            folder = os.path.dirname(rel)
            if folder:
                try:
                    with self.root.fd(folder, os.O_PATH | os.O_DIRECTORY):
                        pass
                except FileNotFoundError:
                    self.create_directory(folder)  # as the reference server's callers expect: folders on the way
            if wanted is None:
                self._replace(rel, data, noreplace=False, carry=self._own_leases(rel))
            else:
                with self._lease(rel) as (fd, carry):
                    current = None if fd is None else self._version(fd)
                    if wanted == 0 and fd is not None:
                        raise Failure(f"{self.root.shown(rel)} already exists (at version {current});"
                                      f" pass if_version={current} to replace it")
                    if wanted != 0 and current != wanted:
                        raise self._stale(rel, wanted, current)
                    self._replace(rel, data, noreplace=wanted == 0, carry=carry)
            with self.root.fd(rel) as fd:
                version = self._version(fd)
        return {"path": self.root.shown(rel), "bytes": len(data), "version": version}

    @staticmethod
    def _apply(text: str, edits: Any) -> str:
        if not isinstance(edits, list) or not edits:
            raise Failure("edits must be a non-empty list of {oldText, newText}")
        for i, edit in enumerate(edits, 1):
            if not isinstance(edit, dict) or not isinstance(edit.get("oldText"), str) \
                    or not isinstance(edit.get("newText"), str):
                raise Failure(f"edit {i} must have oldText and newText strings")
            old, new = edit["oldText"], edit["newText"]
            if not old:
                raise Failure(f"edit {i}: oldText is empty")
            if old in text:
                text = text.replace(old, new, 1)
                continue
            # As the reference server does: the same lines, ignoring indentation, keep the file's indent.
            old_lines, lines = old.splitlines(), text.splitlines(keepends=True)
            for start in range(len(lines) - len(old_lines) + 1):
                window = lines[start:start + len(old_lines)]
                if [w.strip() for w in window] == [o.strip() for o in old_lines]:
                    indent = re.match(r"\s*", window[0]).group()
                    replaced = [indent + n.lstrip() if j == 0 else n for j, n in enumerate(new.splitlines())]
                    ending = "\n" if window[-1].endswith("\n") else ""
                    lines[start:start + len(old_lines)] = ["\n".join(replaced) + ending]
                    text = "".join(lines)
                    break
            else:
                raise Failure(f"edit {i}: oldText was not found in the file (read it again: it may have changed)")
        return text

    def edit_file(self, path: str, edits: list, dryRun: bool = False, if_version: int | None = None) -> dict:
        rel = self.rel(path)
        wanted = self._check_version(if_version)
        with self.guarded(rel, change=not dryRun):
            rel = self._target(rel)
            if dryRun:
                data, _, current = self._read(rel)
                if wanted is not None and wanted != current:
                    raise self._stale(rel, wanted, current)
                new = self._apply(self._decode(rel, data), edits)
                return {"path": self.root.shown(rel), "diff": self._diff(rel, self._decode(rel, data), new),
                        "version": current, "applied": False}
            with self._lease(rel) as (fd, carry):
                if fd is None:
                    raise OSError(errno.ENOENT, "no such file", rel)
                data, _, current = self._read(rel)
                if wanted is not None and wanted != current:
                    raise self._stale(rel, wanted, current)
                old = self._decode(rel, data)
                new = self._apply(old, edits)
                self._replace(rel, new.encode("utf-8", "surrogatepass"), noreplace=False, carry=carry)
            with self.root.fd(rel) as fd:
                version = self._version(fd)
        return {"path": self.root.shown(rel), "diff": self._diff(rel, old, new), "version": version, "applied": True}

    def _decode(self, rel: str, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise Failure(f"{self.root.shown(rel)} is not UTF-8 text: edit_file edits text files only") from None

    def _diff(self, rel: str, old: str, new: str) -> str:
        shown = self.root.shown(rel)
        return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                            fromfile=shown, tofile=shown))

    def create_directory(self, path: str) -> dict:
        rel = self.rel(path)
        parts = rel.split("/") if rel else []
        made = []
        with self.guarded(rel):
            for i in range(1, len(parts) + 1):
                sub = "/".join(parts[:i])
                with self.root.parent(sub) as (dirfd, name):
                    try:
                        os.mkdir(name, 0o777, dir_fd=dirfd)
                        made.append(self.root.shown(sub))
                    except FileExistsError:
                        try:  # a folder, or a symlink to one inside the workspace (else EXDEV: outside)
                            with self.root.fd(sub, os.O_PATH | os.O_DIRECTORY):
                                pass
                        except NotADirectoryError:
                            raise Failure(f"{self.root.shown(sub)} exists and is not a folder") from None
        return {"path": self.root.shown(rel), "created": made}

    def move_file(self, source: str, destination: str) -> dict:
        src, dst = self.rel(source), self.rel(destination)
        with self.guarded(src):
            with self.root.parent(src) as (sdir, sname), self.root.parent(dst) as (ddir, dname):
                try:
                    _renameat2(sdir, sname, ddir, dname, RENAME_NOREPLACE)
                except FileExistsError:
                    raise Failure(f"{self.root.shown(dst)} already exists: move_file never replaces a file;"
                                  " delete it first or choose another name") from None
                except OSError as exc:
                    if exc.errno == errno.EBUSY and not self._locks_of(src):
                        raise self.failure(exc, dst) from None
                    raise
        return {"source": self.root.shown(src), "destination": self.root.shown(dst)}

    def delete_file(self, path: str) -> dict:
        rel = self.rel(path)
        with self.guarded(rel):
            with self.root.parent(rel) as (dirfd, name):
                if stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise Failure(f"{self.root.shown(rel)} is a folder: use delete_directory")
                os.unlink(name, dir_fd=dirfd)
        return {"path": self.root.shown(rel), "deleted": True,
                "note": "kept in the trash: list_trash and undelete bring it back"}

    def delete_directory(self, path: str, recursive: bool = False) -> dict:
        rel = self.rel(path)
        if not rel:
            raise Failure("the workspace's root cannot be deleted")
        removed = 0
        with self.guarded(rel):
            with self.root.parent(rel) as (dirfd, name):
                if not stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise Failure(f"{self.root.shown(rel)} is not a folder: use delete_file")
                if recursive:
                    removed = self._remove_tree(dirfd, name)
                os.rmdir(name, dir_fd=dirfd)
        return {"path": self.root.shown(rel), "deleted": True, "removed_inside": removed}

    def _remove_tree(self, dirfd: int, name: str) -> int:
        removed = 0
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    removed += self._remove_tree(fd, e.name)
                    os.rmdir(e.name, dir_fd=fd)
                else:
                    os.unlink(e.name, dir_fd=fd)
                removed += 1
        finally:
            os.close(fd)
        return removed

    # -- locks ----------------------------------------------------------------------------------

    def lock_file(self, path: str, mode: str = "exclusive", ttl: int = 300, wait: float = 0) -> dict:
        rel = self.rel(path)
        if mode not in ("shared", "exclusive"):
            raise Failure("mode must be shared or exclusive")
        if not isinstance(ttl, int) or not 1 <= ttl <= 86400:
            raise Failure("ttl must be a whole number of seconds from 1 to 86400")
        if not isinstance(wait, (int, float)) or not 0 <= wait <= WAIT_MAX:
            raise Failure(f"wait must be a number of seconds from 0 to {WAIT_MAX:g}")
        deadline = time.monotonic() + wait
        pause = 0.002
        with self.guarded(rel):
            with self.root.fd(rel) as fd:
                while True:
                    try:
                        os.setxattr(self.root.proc(fd), LOCK, f"{mode} ttl={ttl}".encode())
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                            if exc.errno == errno.EBUSY:
                                raise Failure(f"{self.root.shown(rel)} is locked by {self.holders_text(rel)}"
                                              + (f" (waited {wait:g} s)" if wait else "")
                                              + ": retry with wait, or work on something else") from None
                            raise
                    time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                    pause = min(pause * 2, LOCK_POLL_MAX)
        return {"path": self.root.shown(rel), "mode": mode, "ttl": ttl, "locks": self._locks_of(rel)}

    def unlock_file(self, path: str) -> dict:
        rel = self.rel(path)
        with self.guarded(rel):
            with self.root.fd(rel) as fd:
                try:
                    os.removexattr(self.root.proc(fd), LOCK)
                except OSError as exc:
                    if exc.errno == errno.ENODATA:
                        raise Failure(f"{self.root.shown(rel)} has no lease of yours to release") from None
                    if exc.errno == errno.EPERM:
                        raise Failure(f"{self.root.shown(rel)} is locked by {self.holders_text(rel)}, not by you")\
                            from None
                    raise
        return {"path": self.root.shown(rel), "released": True}

    def lock_status(self, path: str = "") -> dict:
        rel = self.rel(path or self.root.mountpoint)
        with self.guarded(rel, change=False):
            holders = self._locks_of(rel)
            with self.root.fd("") as fd:
                every = json.loads(os.getxattr(self.root.proc(fd), LOCKS))
        shown = self.root.shown(rel)
        under = [h for h in every if rel and (h["path"] == shown or h["path"].startswith(shown + "/"))
                 or not rel]
        return {"path": shown, "holders": holders, "locks_under": under}

    # -- the journal ------------------------------------------------------------------------------

    def _query(self, since: str | None, principal: str | list | None, path: str | None, ops: list | None,
               limit: int, after: int | None = None) -> dict:
        from deskfs.journal import OPS, journal_text, parse_time

        query: dict[str, Any] = {"limit": limit}
        if since:
            moment = parse_time(str(since), time.time_ns())
            if moment is None:
                raise Failure("since must be a duration ago (30s, 10m, 2h, 3d) or an ISO time")
            query["since_ns"] = moment
        if principal:
            principals = [principal] if isinstance(principal, str) else principal
            if not all(isinstance(p, str) for p in principals):
                raise Failure("principal must be a principal (agent:NAME, user:NAME) or a list of them")
            query["principals"] = [p if ":" in p else f"agent:{p}" for p in principals]
        if path:
            if not isinstance(path, str):
                raise Failure("path must be a glob such as /reports/** ")
            query["path_glob"] = journal_text(path if path.startswith("/") else "/" + path)
        if ops:
            if not isinstance(ops, list) or any(op not in OPS for op in ops):
                raise Failure(f"ops must be a list of: {', '.join(sorted(OPS))}")
            query["ops"] = ops
        if after is not None:
            query["after_seq"] = after
        return query

    def activity(self, since: str | None = None, principal: str | list | None = None, path: str | None = None,
                 ops: list | None = None, limit: int = 100) -> dict:
        if not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise Failure("limit must be from 1 to 10000 records")
        with self.guarded(""):
            records = self.control.records(self._query(since, principal, path, ops, limit))
        return {"records": [self._record(r) for r in records],
                "cursor": max((r["seq"] for r in records), default=None)}

    @staticmethod
    def _record(r: dict) -> dict:
        return {k: r.get(k) for k in ("seq", "time", "principal", "op", "path", "path2", "denied", "errno",
                                      "details")}

    def wait_for_changes(self, path: str | None = None, after: int | None = None, timeout: float = 30) -> dict:
        from deskfs.journal import CHANGE_OPS

        if not isinstance(timeout, (int, float)) or not 0 <= timeout <= WAIT_MAX:
            raise Failure(f"timeout must be from 0 to {WAIT_MAX:g} seconds")
        if after is not None and (not isinstance(after, int) or after < 0):
            raise Failure("after must be a cursor (a journal seq) returned by activity or wait_for_changes")
        with self.guarded(""):
            if after is None:
                newest = self.control.records({"limit": 1})
                after = newest[0]["seq"] if newest else 0
            query = self._query(None, None, path, list(CHANGE_OPS), 0, after)
            found: list[dict] = []
            deadline = time.monotonic() + timeout
            for record in self.control.follow(query, deadline):
                found.append(self._record(record))
                if len(found) >= 1000:
                    break
                deadline = min(deadline, time.monotonic() + 0.05)  # gather what arrives together
        return {"changes": found, "cursor": max((r["seq"] for r in found), default=after),
                "timed_out": not found}

    # -- versions -------------------------------------------------------------------------------

    def list_versions(self, path: str) -> dict:
        rel = self.rel(path)
        with self.guarded(rel, change=False):
            listed = self._versions(self._target(rel))
        return {"path": self.root.shown(rel), "versions": [
            {"number": v["number"], "current": v["current"], "principal": v.get("principal"),
             "made": _iso(v.get("made_ns")), "ended": _iso(v.get("ended_ns")), "size": v.get("size"),
             "hash": v.get("hash"), "ended_by": v.get("ended_by")} for v in listed]}

    def read_version(self, path: str, version: int, encoding: str = "utf-8") -> dict:
        rel = self.rel(path)
        if not isinstance(version, int) or version < 1:
            raise Failure("version must be a version number from 1 on (see list_versions)")
        if encoding not in ("utf-8", "base64"):
            raise Failure("encoding must be utf-8 or base64")
        with self.guarded(rel, change=False):
            target = self._target(rel)
            if not target:
                raise Failure("the workspace's root is a folder: it has no versions")
            try:
                data, _, _ = self._read(f"{VERSIONS_VIEW}/{target}/{version}")
            except FileNotFoundError:
                self._stat(target)
                raise Failure(f"{self.root.shown(rel)} has no version {version} (see list_versions)") from None
        if encoding == "base64":
            return {"path": self.root.shown(rel), "version": version, "data": base64.b64encode(data).decode()}
        return {"path": self.root.shown(rel), "version": version, "content": self._decode(rel, data)}

    def restore_version(self, path: str, version: int) -> dict:
        rel = self.rel(path)
        if not isinstance(version, int) or version < 1:
            raise Failure("version must be a version number from 1 on (see list_versions)")
        with self.guarded(rel):
            target = self._target(rel)
            with self.root.fd(target) as fd:
                try:
                    os.setxattr(self.root.proc(fd), RESTORE, str(version).encode())
                except FileNotFoundError:
                    raise Failure(f"{self.root.shown(rel)} has no version {version} (see list_versions)") from None
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        raise Failure(f"{self.root.shown(rel)} is not a regular file") from None
                    raise
                now = self._version(fd)
        return {"path": self.root.shown(rel), "restored": version, "version": now}

    def list_trash(self, path: str = "") -> dict:
        rel = self.rel(path or self.root.mountpoint)
        with self.guarded(rel, change=False):
            removed = self.control.ask({"op": "trash", "path": self.root.shown(rel)})["removed"]
        return {"path": self.root.shown(rel), "removed": [
            {"path": r["path"], "deleted": _iso(r.get("deleted_ns")), "deleted_by": r.get("deleted_by"),
             "size": r.get("size"), "line": r.get("line")} for r in removed]}

    def undelete(self, path: str, as_path: str | None = None) -> dict:
        rel = self.rel(path)
        target = self.rel(as_path) if as_path else rel
        with self.guarded(target):
            removed = self.control.ask({"op": "trash", "path": self.root.shown(rel)})["removed"]
            exact = [r for r in removed if r["path"] == self.root.shown(rel)]
            if not exact:
                raise Failure(f"nothing was removed at {self.root.shown(rel)} (see list_trash)")
            entry = exact[0]
            folder, name = os.path.split(target)
            if folder:
                self.create_directory(folder)
            with self.root.fd(folder) as fd:
                try:
                    os.setxattr(self.root.proc(fd), UNDELETE, f"{entry['line']} ".encode() + os.fsencode(name))
                except FileExistsError:
                    raise Failure(f"{self.root.shown(target)} exists; bring it back under another name with"
                                  " as_path") from None
                except FileNotFoundError:
                    raise Failure(f"{entry['path']} cannot be brought back: its content is gone") from None
        return {"path": self.root.shown(target), "from": entry["path"]}

    # -- members --------------------------------------------------------------------------------

    def _member_op(self, request: dict) -> dict:
        try:
            answer = self.control.ask(request)
        except ControlError as exc:
            raise Failure(str(exc)) from None
        answer.pop("ok", None)
        return answer

    def list_members(self) -> dict:
        answer = self._member_op({"op": "members"})
        return {"members": [m | {"since": _iso(m.get("since_ns"))} for m in answer["members"]],
                "own_agents": answer.get("own_agents"), "offer": answer.get("offer"), "you": self.principal()}

    def invite_user(self, principal: str, role: str) -> dict:
        self._member_op({"op": "invite", "principal": str(principal), "role": str(role)})
        return {"principal": principal, "role": role}

    def set_role(self, principal: str, role: str) -> dict:
        self._member_op({"op": "role", "principal": str(principal), "role": str(role)})
        return {"principal": principal, "role": role}

    def remove_member(self, principal: str) -> dict:
        self._member_op({"op": "remove", "principal": str(principal)})
        return {"principal": principal, "removed": True}

    def transfer_ownership(self, principal: str, then: str = "editor") -> dict:
        answer = self._member_op({"op": "transfer", "principal": str(principal), "then": str(then)})
        return {"principal": principal, "then": then, "expires": answer.get("expires"),
                "next": f"{principal} accepts with accept_transfer (or: deskfs accept-transfer)"}

    def accept_transfer(self) -> dict:
        return self._member_op({"op": "accept-transfer"})

    def cancel_transfer(self) -> dict:
        return self._member_op({"op": "cancel-transfer"})

    def leave_workspace(self) -> dict:
        return self._member_op({"op": "leave"})

    # -- resources --------------------------------------------------------------------------------

    def resource(self, path: str) -> dict:
        """A file's content for a deskfs:// resource: text when it is UTF-8, else base64."""
        got = self.read_media_file(path)
        data = base64.b64decode(got["data"])
        mime = got["mimeType"]
        try:
            text = data.decode("utf-8")
            if mime == "application/octet-stream":
                mime = "text/plain"
            return {"text": text, "mimeType": mime}
        except UnicodeDecodeError:
            return {"data": got["data"], "mimeType": mime}


OPERATIONS = frozenset(name for name in dir(Desk) if not name.startswith("_") and name not in (
    "principal", "role", "holders_text", "failure", "guarded", "rel"))
