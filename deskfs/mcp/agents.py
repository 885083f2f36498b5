"""The MCP front's workers: one process per agent (`worker.py`), each registered with the daemon as itself.

Owns starting a worker the first time an agent calls (with a fresh random 32-hex session token in its
environment), forwarding each tool call to the worker of the agent that made it and handing back its
answer, restarting a worker that died, and stopping them all when the server stops. Because each agent's
calls run in a process of its own session, the journal shows every agent as itself and one agent's lock
makes another's change fail, exactly as for two `deskfs run` processes.

Must never: run a call for one agent in another agent's worker; touch the mount itself (the front is no
agent); put a session token in a command line or a log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from typing import Any

import anyio
import anyio.abc

log = logging.getLogger("deskfs.mcp")

START_TIMEOUT = 30.0


class WorkerFailed(Exception):
    """The worker could not be started or died: the sentence says why."""


class _Worker:
    def __init__(self, agent: str | None, mount: str, store: str) -> None:
        self.agent, self.mount, self.store = agent, mount, store
        self.process: anyio.abc.Process | None = None
        self.pending: dict[int, anyio.Event] = {}
        self.answers: dict[int, dict] = {}
        self.next_id = 1
        self.principal: str | None = None
        self.dead = False

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        token = secrets.token_hex(16)
        env = dict(os.environ)
        if self.agent is not None:
            env.pop("DESKFS_AGENT", None)
            sessions = [t for t in env.get("DESKFS_SESSION", "").split(",") if t]
            env["DESKFS_SESSION"] = ",".join(sessions + [token])
            env["DESKFS_MCP_SESSION"] = token
        command = [sys.executable, "-m", "deskfs.mcp.worker", "--mount", self.mount, "--store", self.store]
        if self.agent is not None:
            command += ["--agent", self.agent]
        self.process = await anyio.open_process(command, env=env, stderr=None, start_new_session=False)
        buffer = bytearray()
        first = await self._line(buffer, START_TIMEOUT)
        if first is None or "ready" not in first:
            reason = (first or {}).get("fatal", "it ended before it was ready")
            await self.stop()
            raise WorkerFailed(f"cannot act as {self._who()}: {reason}")
        self.principal = first.get("principal")
        tg.start_soon(self._read, buffer)

    def _who(self) -> str:
        return f"agent:{self.agent}" if self.agent else "this user"

    async def _line(self, buffer: bytearray, timeout: float | None) -> dict | None:
        assert self.process is not None and self.process.stdout is not None
        with anyio.move_on_after(timeout):
            while b"\n" not in buffer:
                try:
                    chunk = await self.process.stdout.receive(1 << 20)
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return None
                buffer += chunk
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            try:
                return json.loads(line)
            except ValueError:
                return {}
        return None

    async def _read(self, buffer: bytearray) -> None:
        try:
            while True:
                answer = await self._line(buffer, None)
                if answer is None:
                    break
                event = self.pending.get(answer.get("id"))
                if event is not None:
                    self.answers[answer["id"]] = answer
                    event.set()
        finally:
            self.dead = True
            for rid, event in list(self.pending.items()):
                self.answers.setdefault(rid, {"error": f"the worker of {self._who()} ended during the call"})
                event.set()

    async def call(self, op: str, args: dict) -> dict:
        assert self.process is not None and self.process.stdin is not None
        rid = self.next_id
        self.next_id += 1
        event = anyio.Event()
        self.pending[rid] = event
        try:
            await self.process.stdin.send((json.dumps({"id": rid, "op": op, "args": args}) + "\n").encode())
            await event.wait()
            return self.answers.pop(rid)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.dead = True
            return {"error": f"the worker of {self._who()} is gone; try again"}
        finally:
            self.pending.pop(rid, None)

    async def stop(self) -> None:
        if self.process is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                if self.process.stdin is not None:
                    await self.process.stdin.aclose()
            except Exception:
                pass
            with anyio.move_on_after(5):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


class Pool:
    """Workers by agent name (None: the server's own principal, for stdio without --agent)."""

    def __init__(self, mount: str) -> None:
        self.mount = os.path.abspath(mount)
        self.workers: dict[str | None, _Worker] = {}
        self.locks: dict[str | None, anyio.Lock] = {}
        self.tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> "Pool":
        self._tg_cm = anyio.create_task_group()
        self.tg = await self._tg_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for worker in list(self.workers.values()):
            await worker.stop()
        assert self.tg is not None
        self.tg.cancel_scope.cancel()
        await self._tg_cm.__aexit__(None, None, None)

    async def worker(self, agent: str | None) -> _Worker:
        lock = self.locks.setdefault(agent, anyio.Lock())
        async with lock:
            worker = self.workers.get(agent)
            if worker is not None and not worker.dead:
                return worker
            if worker is not None:
                await worker.stop()
            from deskfs import mounts

            found = mounts.containing(self.mount)
            if found is None:
                raise WorkerFailed(f"{self.mount} is not inside a mounted deskfs workspace (mount it with:"
                                   " deskfs mount STORE MOUNTPOINT)")
            worker = _Worker(agent, found.mountpoint, found.store)
            assert self.tg is not None
            await worker.start(self.tg)
            self.workers[agent] = worker
            return worker

    async def call(self, agent: str | None, op: str, args: dict) -> dict:
        """The worker's answer: {"ok": RESULT} or {"error": SENTENCE}."""
        try:
            worker = await self.worker(agent)
        except WorkerFailed as exc:
            return {"error": str(exc)}
        except OSError as exc:
            return {"error": f"cannot start the worker process: {exc.strerror or exc}"}
        return await worker.call(op, args)
