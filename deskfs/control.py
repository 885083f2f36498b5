"""The daemon's local API on `STORE/run/ctl.sock`: one JSON request per line, JSON lines back.

Any local user may connect; what a caller may do is decided from its peer credentials (SO_PEERCRED:
pid, uid) resolved to a principal by the same rules as the mount, never from anything it says about
itself. Requests (`op`):
  session {agent}            registers the caller's process tree as agent NAME while the connection
                             stays open (`deskfs run`); leases it took end with it
  log {query, follow}        journal records the caller may see, then (with follow) new ones as they
                             are committed; a line {"record": ...} each, {"end": true} at the end
  status                     totals, open handles by principal, locks, recent changes
  verify                     the journal's hash chain (owner only)
  config {key, value?}       read or (owner only) change a setting
  members, invite {principal, role}, role {principal, role}, remove {principal}, leave,
  transfer {principal, then}, accept-transfer, cancel-transfer
  unmounting                 (root or the daemon's user: `deskfs unmount`) the daemon closes its own
                             descriptors on the mount, which would make the unmount busy, until the
                             connection closes (lease_locks.py; the leases' kernel locks are taken again)
Answers: {"ok": true, ...} or {"error": MESSAGE, "usage": BOOL}.

Must never: act on a request before reading the caller's credentials; run a long query on the FUSE
thread (reads use a read-only connection in a worker thread); leave a session behind a closed
connection.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sqlite3
import struct
import time
from functools import partial
from typing import Any, Awaitable, Callable

import pyfuse3
import trio

from deskfs import journal
from deskfs.access import OWN_AGENTS, VIEWER, Refused
from deskfs.fs import Operations
from deskfs.identity import LookupFailed
from deskfs.journal import Actor, Query
from deskfs.layout import db_path
from deskfs.store import versions
from deskfs.store.meta import connect_read_only

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_NESTING = 4  # a request is an object of scalars, lists of scalars, and the log's query object
REQUEST_TIMEOUT_SECONDS = 10.0  # to send the request line after connecting
ACCEPT_RETRY_SECONDS = 0.1
MAX_CONNECTIONS = 1024  # in all: far below the daemon's descriptor limit, so the mount keeps its own
MAX_CONNECTIONS_PER_UID = 128  # one Unix user cannot crowd out the others
# Requests anyone may make: registering a session names only the caller itself. Everything else is for
# members, and a non-member learns nothing about the workspace from the refusal.
OPEN_TO_ALL = frozenset({"session", "whoami", "unmounting"})  # unmounting: checks the uid itself
SETTINGS = {
    journal.RETENTION: "a duration such as 30d, 12h or 90m, or forever",
    OWN_AGENTS: "editor, viewer or off",
    **versions.SETTINGS,
}


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, as the kernel vouches for them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Admission:
    """Counts open connections per peer uid, and refuses those over the limits (root only counts in all)."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_uid: int = MAX_CONNECTIONS_PER_UID) -> None:
        self.total, self.per_uid = total, per_uid
        self.open: dict[int, int] = {}

    def admit(self, uid: int) -> bool:
        mine = self.open.get(uid, 0)
        if sum(self.open.values()) >= self.total or (uid != 0 and mine >= self.per_uid):
            return False
        self.open[uid] = mine + 1
        return True

    def leave(self, uid: int) -> None:
        left = self.open[uid] - 1
        if left:
            self.open[uid] = left
        else:
            del self.open[uid]


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def parse_request(line: bytes) -> dict:
    """The request object in one line, or Refused (usage) for anything that is not one."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise Refused("malformed request (one JSON object per line)", usage=True) from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise Refused("malformed request (a JSON object with an \"op\" string)", usage=True)
    if _depth(request) > MAX_NESTING:
        raise Refused("malformed request (nested too deeply)", usage=True)
    return request


def text_field(request: dict, key: str, default: str | None = None) -> str:
    """A string field of a request; Refused (usage) if it is missing without a default, or not a string."""
    value = request.get(key, default)
    if not isinstance(value, str):
        raise Refused(f"request field {key!r} must be a string", usage=True)
    return value


def optional_text_field(request: dict, key: str) -> str | None:
    return None if request.get(key) is None else text_field(request, key)


def check_setting(key: str, value: str) -> str:
    """The value to store for `key`, or Refused (usage) naming what is accepted."""
    if key not in SETTINGS:
        raise Refused(f"unknown setting {key!r} (known: {', '.join(SETTINGS)})", usage=True)
    if key == journal.RETENTION and (value == "forever" or journal.parse_duration(value)):
        return value
    if key in versions.SETTINGS and versions.check_setting(key, value) is not None:
        return value
    if key == OWN_AGENTS and value in ("editor", "viewer", "off"):
        return value
    raise Refused(f"{key} must be {SETTINGS[key]}, not {value!r}", usage=True)


class RecordFeed:
    """Wakes every `--follow` reader when the daemon commits new journal records."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


async def apply_retention(store: Any, actor: Actor, pause: float) -> None:
    """Prune records older than `journal.retention`, a batch at a time with `pause` between batches."""
    retention = journal.parse_duration(store.meta.setting(journal.RETENTION) or "forever")
    if retention is None:
        return
    cutoff = time.time_ns() - int(retention * 1e9)
    while store.journal.prune(cutoff, actor):
        await trio.sleep(pause)


GC_BATCH = 500  # versions dropped per turn of the mount


async def collect_versions(store: Any, actor: Actor,
                           progress: Callable[[int, int], Awaitable[None]] | None = None) -> tuple[int, int]:
    """Apply the versions policy: plan in a worker thread (read-only), then drop a batch at a time,
    committing and yielding to the mount between batches; journaled as `gc` when anything was dropped.
    Returns (versions dropped, bytes freed)."""
    disk = os.statvfs(store.path)
    keep, cutoff, budget = store.versions.policy_now(disk.f_blocks * disk.f_frsize, time.time_ns())
    store.commit()
    doomed = await in_worker(store.path, lambda conn: versions.Versions.plan(conn, keep, cutoff, budget))
    freed = 0
    for start in range(0, len(doomed), GC_BATCH):
        freed += store.versions.drop(doomed[start:start + GC_BATCH])
        store.commit()
        if progress is not None:
            await progress(min(start + GC_BATCH, len(doomed)), len(doomed))
        await trio.sleep(0)
    if doomed:
        store.journal.record(actor, "gc", dropped=len(doomed), freed=freed)
        store.commit()
    return len(doomed), freed


async def in_worker(store_path: str, work: Callable[[sqlite3.Connection], Any]) -> Any:
    """Run `work` on a fresh read-only connection in a worker thread: the mount keeps serving meanwhile."""
    def run() -> Any:
        conn = connect_read_only(db_path(store_path))
        try:
            return work(conn)
        finally:
            conn.close()
    return await trio.to_thread.run_sync(run)


class Daemon:
    """The control socket's view of a running daemon."""

    def __init__(self, operations: Operations, feed: RecordFeed) -> None:
        self.ops = operations
        self.store = operations.store
        self.feed = feed
        self.admission = Admission()

    async def serve(self, path: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(64)
        task_status.started()
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as clients:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of descriptors (EMFILE, ENFILE) or memory: wait for some to be freed. The
                    # connection limits keep this far from the descriptor limit, so the mount keeps its own.
                    log.warning("control socket: cannot accept a connection: %s", exc)
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                clients.start_soon(self._guarded_client, stream)

    async def _guarded_client(self, stream: trio.SocketStream) -> None:
        """One client, from accept to close. Nothing a client sends or causes may end the daemon: every
        exception stops here, is logged, and closes only this connection."""
        try:
            pid, uid, _ = peer_credentials(stream.socket)
        except OSError:
            await stream.aclose()
            return
        if not self.admission.admit(uid):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await _send(stream, {"error": "too many connections to this workspace's daemon from your Unix"
                                              " user; close some and try again", "usage": False})
            await stream.aclose()
            return
        try:
            await self._client(stream, pid, uid)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            log.exception("internal error in a control connection (uid %d)", uid)
        finally:
            self.admission.leave(uid)
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _client(self, stream: trio.SocketStream, pid: int, uid: int) -> None:
        async with stream:
            line = None
            with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):  # an idle connection holds nothing for long
                line = await _read_line(stream)
            if line is None:
                return
            if len(line) > MAX_REQUEST:
                await _send(stream, {"error": f"request longer than {MAX_REQUEST} bytes", "usage": True})
                return
            try:
                request = parse_request(line)
            except Refused as exc:
                await _send(stream, {"error": str(exc), "usage": True})
                return
            op = request["op"]
            handler = self.HANDLERS.get(op)
            if handler is None:
                await _send(stream, {"error": f"unknown request {op!r}", "usage": True})
                return
            try:
                actor = Actor(self.ops.identity.principal(pid, uid), uid, pid)
                if op not in OPEN_TO_ALL:
                    self._member(actor, op)
                await handler(self, stream, actor, request)
                return
            except Refused as exc:
                self.store.commit()  # the refusal's journal record
                answer = {"error": str(exc), "usage": exc.usage}
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except LookupFailed as exc:
                log.error("control request %r from uid %d: %s", op, uid, exc)
                answer = {"error": f"the daemon cannot tell who you are right now ({exc}); try again",
                          "usage": False}
            except Exception as exc:
                # One request failed; the daemon, and the mount with it, must go on.
                log.exception("internal error in control request %r", op)
                answer = {"error": f"the daemon could not answer ({type(exc).__name__}); see its log",
                          "usage": False}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await _send(stream, answer)

    # -- sessions -----------------------------------------------------------------------------

    async def session(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        agent = text_field(request, "agent", "")
        try:
            session = self.ops.identity.open_session(actor.pid, actor.uid, agent,
                                                     optional_text_field(request, "token"))
        except (ValueError, PermissionError, ProcessLookupError) as exc:
            self.store.commit()
            raise Refused(str(exc)) from None
        me = Actor(f"agent:{agent}", actor.uid, actor.pid)
        self.ops.journal.record(me, "session_start", session=session.id)
        try:
            await _send(stream, {"ok": True, "principal": me.principal, "session": session.id})
            while await stream.receive_some(4096):
                pass  # the session lasts as long as the connection
        except trio.BrokenResourceError:
            pass
        finally:
            self.ops.identity.close_session(session)
            for inode, principal in self.ops.leases.end_session(session.id):
                self.ops.journal.record(me, "unlock", inode, self.ops.path_of(inode), kind="lease",
                                        reason="session ended")
            self.ops.journal.record(me, "session_end", session=session.id)

    async def whoami(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        await _send(stream, {"ok": True, "principal": actor.principal})

    async def unmounting(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        if actor.uid not in (0, os.getuid()):
            raise Refused("only root or the user who mounted this workspace may unmount it")
        await self.ops.lease_locks.suspend()
        try:
            await _send(stream, {"ok": True})
            while await stream.receive_some(4096):
                pass  # the unmount is being tried meanwhile
        except trio.BrokenResourceError:
            pass
        finally:
            self.ops.lease_locks.resume()

    # -- the journal --------------------------------------------------------------------------

    def _member(self, actor: Actor, op: str) -> None:
        """Refused, journaled, unless `actor` is a member: the same sentence for every request."""
        if self.ops.access.role(actor.principal) < VIEWER:
            name = op.replace("-", "_")
            self.ops.journal.record(actor, name if name in journal.OPS else "control", errno=errno.EPERM,
                                    **({} if name in journal.OPS else {"request": op}))
            raise Refused(f"{actor.principal} is not a member of this workspace")

    async def _newest(self, q: Query, actor: Actor) -> list[dict]:
        """The newest q.limit records `q` selects that `actor` may see, as JSON."""
        return await in_worker(self.store.path, lambda conn: [
            r.as_json() for r in journal.newest(conn, q, self.ops.access.reader_filter(actor, conn))])

    async def _send_matches(self, stream: trio.SocketStream, q: Query, actor: Actor) -> None:
        """Send what `q` selects and `actor` may see: the newest q.limit, or page by page every match."""
        if q.limit:
            for record in await self._newest(q, actor):
                await _send(stream, {"record": record})
            return
        while True:
            found, cursor = await in_worker(
                self.store.path, lambda conn: _json_page(conn, q, self.ops.access.reader_filter(actor, conn)))
            for record in found:
                await _send(stream, {"record": record})
            if cursor is None:
                return
            q.after_seq = cursor

    async def log(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        try:
            q = Query.from_json(request.get("query") or {})
        except (TypeError, ValueError) as exc:
            raise Refused(f"malformed query: {exc}", usage=True) from None
        if not isinstance(request.get("follow", False), bool):
            raise Refused("request field 'follow' must be true or false", usage=True)
        self.store.commit()  # what happened until now is in the answer
        q.upto_seq = self.ops.journal.committed_seq
        await self._send_matches(stream, q, actor)
        if not request.get("follow"):
            await _send(stream, {"end": True})
            return
        q.limit = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when_closed, stream, nursery.cancel_scope)
            while True:
                q.after_seq = q.upto_seq
                while self.ops.journal.committed_seq == q.after_seq:
                    await self.feed.wait()
                q.upto_seq = self.ops.journal.committed_seq
                await self._send_matches(stream, q, actor)

    async def verify(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        if not self.ops.access.may_audit(actor.principal):
            raise Refused("only the owner of this workspace may verify the whole journal")
        self.store.commit()
        head = self.store.head_state()  # before the worker's snapshot, which then holds all it names
        verdict = await in_worker(self.store.path, partial(journal.verify, head=head))
        await _send(stream, {"ok": True} | verdict.as_json())

    async def status(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        from deskfs.store.meta import Meta

        self.store.commit()
        files, size = await in_worker(self.store.path, lambda conn: Meta(conn).totals())
        recent = await self._newest(Query(ops=list(journal.CHANGE_OPS), limit=10), actor)
        virtual = self.ops.virtual
        visible = virtual.visible_paths(actor) if virtual is not None else None
        locks = virtual.all_locks(visible) if virtual is not None else []
        await _send(stream, {"ok": True, "files": files, "bytes": size, "active": self._active(visible),
                             "locks": locks, "recent": recent})

    def _active(self, visible: Callable[[str], bool] | None) -> list[dict]:
        """Open handles now, by principal: how many, how many writing, and a few of the paths `visible`
        lets through (all, for the owner)."""
        active: dict[str, dict] = {}
        for handle in self.ops.handles.values():
            entry = active.setdefault(handle.principal, {"principal": handle.principal, "handles": 0,
                                                         "writing": 0, "paths": []})
            entry["handles"] += 1
            entry["writing"] += handle.changed
            path = handle.where()
            if path and path not in entry["paths"] and len(entry["paths"]) < 5 and (visible is None or visible(path)):
                entry["paths"].append(path)
        return sorted(active.values(), key=lambda e: e["principal"])

    # -- versions -----------------------------------------------------------------------------

    def _readable(self, actor: Actor, conn: sqlite3.Connection) -> Callable[[str], bool]:
        readable = self.ops.access.reader_filter(actor, conn)
        return (lambda path: True) if readable is None else readable.path_readable

    async def versions(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        path = text_field(request, "path")
        self.store.commit()  # what happened until now is in the answer
        store_versions = self.store.versions

        def work(conn: sqlite3.Connection) -> list[dict] | None:
            if not self._readable(actor, conn)(path):
                return None
            return versions.describe(conn, store_versions, path)

        found = await in_worker(self.store.path, work)
        if found is None:
            raise Refused(f"no file {path} you may read in this workspace")
        await _send(stream, {"ok": True, "path": path, "versions": found})

    async def trash(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        under = text_field(request, "path", "/")
        self.store.commit()

        def work(conn: sqlite3.Connection) -> list[dict]:
            readable = self.ops.access.reader_filter(actor, conn)
            shown = []
            for entry in versions.Versions.trash(conn, under):
                folder = entry.path.rsplit("/", 1)[0] or "/"
                if readable is None or (readable.path_readable(folder)
                                        and readable.allows(entry.mode, entry.uid, entry.gid, 4)):
                    shown.append(entry.as_json())
            return shown

        await _send(stream, {"ok": True, "removed": await in_worker(self.store.path, work)})

    async def gc(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        """Apply the versions policy now (owner only), a batch at a time, telling the client how far."""
        if not self.ops.access.may_audit(actor.principal):
            self.ops.journal.record(actor, "gc", errno=errno.EPERM)
            raise Refused("only the owner of this workspace may collect old versions")
        dropped, freed = await collect_versions(self.store, actor, progress=lambda done, total: _send(
            stream, {"progress": done, "total": total}))
        await _send(stream, {"ok": True, "dropped": dropped, "freed": freed})

    # -- settings and members -----------------------------------------------------------------

    async def config(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        key, value = text_field(request, "key", ""), optional_text_field(request, "value")
        if value is None:
            if key not in SETTINGS:
                check_setting(key, "")
            current = self.ops.meta.setting(key)
            if current is None and key in versions.DEFAULTS:
                current = versions.DEFAULTS[key]
            await _send(stream, {"ok": True, "key": key, "value": current})
            return
        value = check_setting(key, value)
        self.ops.access.configure(actor, key, value)
        await self._changed()
        if key == journal.RETENTION:
            await apply_retention(self.store, actor, 0.0)
            self.store.commit()
        await _send(stream, {"ok": True, "key": key, "value": value})

    async def members(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        access = self.ops.access
        offer = access.offer()
        await _send(stream, {
            "ok": True, "members": access.members(), "own_agents": access.own_agents(),
            "offer": None if offer is None else offer.__dict__ | {
                "expires": journal.iso_time(offer.expires_ns)},
        })

    async def invite(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.invite(actor, text_field(request, "principal", ""), text_field(request, "role", ""),
                               optional_text_field(request, "bound_to"))
        await self._changed()
        await _send(stream, {"ok": True})

    async def role(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.change_role(actor, text_field(request, "principal", ""), text_field(request, "role", ""))
        await self._changed()
        await _send(stream, {"ok": True})

    async def remove(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.remove(actor, text_field(request, "principal", ""))
        await self._changed()
        await _send(stream, {"ok": True})

    async def leave(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.leave(actor)
        await self._changed()
        await _send(stream, {"ok": True, "principal": actor.principal})

    async def transfer(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        offer = self.ops.access.transfer(actor, text_field(request, "principal", ""), text_field(request, "then", "editor"))
        await self._changed()
        await _send(stream, {"ok": True, "expires": journal.iso_time(offer.expires_ns)})

    async def accept_transfer(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        former = self.ops.access.accept_transfer(actor)
        await self._changed()
        await _send(stream, {"ok": True, "owner": actor.principal, "former_owner": former})

    async def cancel_transfer(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        offer = self.ops.access.cancel_transfer(actor)
        await self._changed()
        await _send(stream, {"ok": True, "principal": offer.principal})

    async def _changed(self) -> None:
        """A membership change is durable before it is answered, and the kernel re-asks for attributes."""
        self.store.sync()
        inodes = self.ops.attribute_cached_inodes()
        await trio.to_thread.run_sync(_invalidate_attributes, inodes)
        for ino in self.ops.lost_readers():
            await trio.to_thread.run_sync(invalidate_pages, ino)

    HANDLERS: dict[str, Callable[["Daemon", trio.SocketStream, Actor, dict], Awaitable[None]]] = {
        "versions": versions, "trash": trash, "gc": gc,
        "session": session, "whoami": whoami, "unmounting": unmounting,
        "log": log, "verify": verify, "status": status, "config": config,
        "members": members, "invite": invite, "role": role, "remove": remove, "leave": leave,
        "transfer": transfer, "accept-transfer": accept_transfer, "cancel-transfer": cancel_transfer,
    }


def _json_page(conn: sqlite3.Connection, q: Query, visible: Callable | None) -> tuple[list[dict], int | None]:
    found, cursor = journal.page(conn, q, visible)
    return [r.as_json() for r in found], cursor


def _invalidate_attributes(inodes: list[int]) -> None:
    """Make the kernel ask again before it trusts cached attributes (where roles are checked)."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino, attr_only=True)
        except OSError:
            pass  # the kernel had already forgotten it


def invalidate_pages(ino: int) -> None:
    """Drop the kernel's cached pages (and mappings of them) of a file: the next access asks the daemon."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except OSError:
        pass  # the kernel had already forgotten it


async def _cancel_when_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        while await stream.receive_some(4096):
            pass
    except trio.BrokenResourceError:
        pass
    scope.cancel()


async def _read_line(stream: trio.SocketStream) -> bytes | None:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
        if len(data) > MAX_REQUEST:
            return data  # longer than any request: refused by the caller
    return data.split(b"\n", 1)[0]


async def _send(stream: trio.SocketStream, answer: dict) -> None:
    await stream.send_all(json.dumps(answer).encode() + b"\n")


def serve(path: str, operations: Operations, feed: RecordFeed) -> Callable[..., Awaitable[None]]:
    """The control socket's task for the daemon's nursery (`await nursery.start(...)`)."""
    return partial(Daemon(operations, feed).serve, path)
