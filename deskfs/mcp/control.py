"""The MCP worker's way to the daemon's control socket (`deskfs/control.py`), as the agent it serves.

Owns the worker's session (the `session` op with a random 32-hex token, held open for the worker's
life, exactly as `deskfs run` holds one) and one-off requests (`versions`, `trash`, `members`, `log`
with or without `follow`...). The daemon knows the caller by its peer credentials, so a request here is
answered for the worker's principal, never for anything it claims.

Must never: open the store's database or any file of the store but its socket; send a token anywhere
but in the session request; keep a connection other than the session's open after a request ends.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from typing import Iterator

from deskfs.layout import control_socket_path


class ControlError(Exception):
    """The daemon refused, or could not be reached; the message is the daemon's sentence."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


class Control:
    def __init__(self, store: str, mountpoint: str) -> None:
        self.path = control_socket_path(store)
        self.mountpoint = mountpoint
        self._session: socket.socket | None = None

    def _connect(self, request: dict, timeout: float | None = 30.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
            sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot reach the deskfs daemon of {self.mountpoint} ({exc.strerror or exc});"
                               " is the workspace still mounted?") from None
        return sock

    @staticmethod
    def _lines(sock: socket.socket) -> Iterator[dict]:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            answer = json.loads(line)
            if "error" in answer:
                raise ControlError(answer["error"], bool(answer.get("usage")))
            yield answer

    def open_session(self, agent: str, token: str) -> str:
        """Register this process (and, by `token` in its environment, its threads) as agent `agent`."""
        sock = self._connect({"op": "session", "agent": agent, "token": token})
        try:
            answer = next(self._lines(sock), None)
        except (ControlError, OSError):
            sock.close()
            raise
        if answer is None:
            sock.close()
            raise ControlError(f"the deskfs daemon of {self.mountpoint} closed the connection")
        sock.settimeout(None)
        self._session = sock
        return answer["principal"]

    def session_alive(self) -> bool:
        if self._session is None:
            return False
        readable, _, _ = select.select([self._session], [], [], 0)
        if not readable:
            return True
        try:
            return self._session.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def ask(self, request: dict) -> dict:
        with self._connect(request) as sock:
            for answer in self._lines(sock):
                return answer
        raise ControlError(f"the deskfs daemon of {self.mountpoint} closed the connection")

    def records(self, query: dict) -> list[dict]:
        with self._connect({"op": "log", "query": query}) as sock:
            return [a["record"] for a in self._lines(sock) if "record" in a]

    def follow(self, query: dict, deadline: float) -> Iterator[dict]:
        """Records matching `query` (with its after_seq), old then new, until `deadline` (monotonic)."""
        with self._connect({"op": "log", "query": query, "follow": True}, timeout=None) as sock:
            buffer = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    return
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    answer = json.loads(line)
                    if "error" in answer:
                        raise ControlError(answer["error"], bool(answer.get("usage")))
                    if "record" in answer:
                        yield answer["record"]


def socket_exists(store: str) -> bool:
    return os.path.exists(control_socket_path(store))
