"""The daemon's local API on `STORE/run/ctl.sock`: one JSON request per line, one JSON answer per line.

Any local user may connect; what a caller may do is decided from its peer credentials (SO_PEERCRED:
pid, uid), never from anything it says about itself. Requests:
  {"op": "session", "agent": NAME}   registers the caller's process tree as agent NAME for as long as
                                     the connection stays open (`deskfs run`); leases it took end with it.

Must never: act on a request before reading the caller's credentials; leave a session behind a closed
connection.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from functools import partial
from typing import Any

import trio

from deskfs.fs import Operations

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end, as the kernel vouches for them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


async def serve(path: str, operations: Operations, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(partial(_client, operations), [listener])


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


async def _answer(stream: trio.SocketStream, answer: dict) -> None:
    await stream.send_all(json.dumps(answer).encode() + b"\n")


async def _client(operations: Operations, stream: trio.SocketStream) -> None:
    async with stream:
        pid, uid, _ = peer_credentials(stream.socket)
        line = await _read_line(stream)
        if line is None:
            return
        try:
            request = json.loads(line)
            op = request.get("op")
        except (ValueError, AttributeError):
            await _answer(stream, {"error": "malformed request"})
            return
        if op == "session":
            await _session(operations, stream, pid, uid, str(request.get("agent", "")))
        else:
            await _answer(stream, {"error": f"unknown request {op!r}"})


async def _session(operations: Operations, stream: trio.SocketStream, pid: int, uid: int, agent: str) -> None:
    try:
        session = operations.identity.open_session(pid, uid, agent)
    except (ValueError, PermissionError, ProcessLookupError) as exc:
        await _answer(stream, {"error": str(exc)})
        return
    log.info("session %d: pid %d (uid %d) runs as agent:%s", session.id, pid, uid, agent)
    try:
        await _answer(stream, {"ok": True, "principal": f"agent:{agent}", "session": session.id})
        while await stream.receive_some(4096):
            pass  # the session lasts as long as the connection
    except trio.BrokenResourceError:
        pass
    finally:
        operations.identity.close_session(session)
        operations.leases.end_session(session.id)
        log.info("session %d ended", session.id)
