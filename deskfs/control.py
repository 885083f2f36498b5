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
Answers: {"ok": true, ...} or {"error": MESSAGE, "usage": BOOL}.

Must never: act on a request before reading the caller's credentials; run a long query on the FUSE
thread (reads use a read-only connection in a worker thread); leave a session behind a closed
connection.
"""

from __future__ import annotations

import contextlib
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
from deskfs.journal import Actor, Query
from deskfs.layout import db_path
from deskfs.store.meta import connect_read_only

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
SETTINGS = {
    journal.RETENTION: "a duration such as 30d, 12h or 90m, or forever",
    OWN_AGENTS: "editor, viewer or off",
}


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, as the kernel vouches for them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def check_setting(key: str, value: str) -> str:
    """The value to store for `key`, or Refused (usage) naming what is accepted."""
    if key not in SETTINGS:
        raise Refused(f"unknown setting {key!r} (known: {', '.join(SETTINGS)})", usage=True)
    if key == journal.RETENTION and (value == "forever" or journal.parse_duration(value)):
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

    async def serve(self, path: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(64)
        task_status.started()
        await trio.serve_listeners(self._client, [trio.SocketListener(sock)])

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            pid, uid, _ = peer_credentials(stream.socket)
            line = await _read_line(stream)
            if line is None:
                return
            try:
                request = json.loads(line)
                op = str(request.get("op"))
            except (ValueError, AttributeError):
                await _send(stream, {"error": "malformed request", "usage": True})
                return
            handler = self.HANDLERS.get(op)
            if handler is None:
                await _send(stream, {"error": f"unknown request {op!r}", "usage": True})
                return
            actor = Actor(self.ops.identity.principal(pid, uid), uid, pid)
            try:
                await handler(self, stream, actor, request)
                return
            except Refused as exc:
                self.store.commit()  # the refusal's journal record
                answer = {"error": str(exc), "usage": exc.usage}
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except Exception as exc:
                # One request failed; the daemon, and the mount with it, must go on.
                log.exception("internal error in control request %r", op)
                answer = {"error": f"the daemon could not answer: {exc}", "usage": False}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await _send(stream, answer)

    # -- sessions -----------------------------------------------------------------------------

    async def session(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        agent = str(request.get("agent", ""))
        try:
            session = self.ops.identity.open_session(actor.pid, actor.uid, agent)
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

    # -- the journal --------------------------------------------------------------------------

    def _member(self, actor: Actor) -> None:
        if self.ops.access.role(actor.principal) < VIEWER:
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
        self._member(actor)
        try:
            q = Query.from_json(request.get("query") or {})
        except TypeError as exc:
            raise Refused(f"malformed query: {exc}", usage=True) from None
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
        verdict = await in_worker(self.store.path, journal.verify)
        await _send(stream, {"ok": True, "checked": verdict.checked, "broken_seq": verdict.broken_seq,
                             "reason": verdict.reason})

    async def status(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self._member(actor)
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

    # -- settings and members -----------------------------------------------------------------

    async def config(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self._member(actor)
        key, value = str(request.get("key", "")), request.get("value")
        if value is None:
            if key not in SETTINGS:
                check_setting(key, "")
            current = self.ops.meta.setting(key)
            await _send(stream, {"ok": True, "key": key, "value": current})
            return
        value = check_setting(key, str(value))
        self.ops.access.configure(actor, key, value)
        await self._changed()
        if key == journal.RETENTION:
            await apply_retention(self.store, actor, 0.0)
            self.store.commit()
        await _send(stream, {"ok": True, "key": key, "value": value})

    async def members(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self._member(actor)
        access = self.ops.access
        offer = access.offer()
        await _send(stream, {
            "ok": True, "members": access.members(), "own_agents": access.own_agents(),
            "offer": None if offer is None else offer.__dict__ | {
                "expires": journal.iso_time(offer.expires_ns)},
        })

    async def invite(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        bound_to = request.get("bound_to")
        self.ops.access.invite(actor, str(request.get("principal", "")), str(request.get("role", "")),
                               None if bound_to is None else str(bound_to))
        await self._changed()
        await _send(stream, {"ok": True})

    async def role(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.change_role(actor, str(request.get("principal", "")), str(request.get("role", "")))
        await self._changed()
        await _send(stream, {"ok": True})

    async def remove(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.remove(actor, str(request.get("principal", "")))
        await self._changed()
        await _send(stream, {"ok": True})

    async def leave(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        self.ops.access.leave(actor)
        await self._changed()
        await _send(stream, {"ok": True, "principal": actor.principal})

    async def transfer(self, stream: trio.SocketStream, actor: Actor, request: dict) -> None:
        offer = self.ops.access.transfer(actor, str(request.get("principal", "")), str(request.get("then", "editor")))
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

    HANDLERS: dict[str, Callable[["Daemon", trio.SocketStream, Actor, dict], Awaitable[None]]] = {
        "session": session, "log": log, "verify": verify, "status": status, "config": config,
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
            return None
    return data.split(b"\n", 1)[0]


async def _send(stream: trio.SocketStream, answer: dict) -> None:
    await stream.send_all(json.dumps(answer).encode() + b"\n")


def serve(path: str, operations: Operations, feed: RecordFeed) -> Callable[..., Awaitable[None]]:
    """The control socket's task for the daemon's nursery (`await nursery.start(...)`)."""
    return partial(Daemon(operations, feed).serve, path)
