"""The process that does an agent's MCP calls: registered with the daemon as that agent, it runs `Desk`.

`python -m deskfs.mcp.worker --mount M --store S [--agent NAME]`, started by the MCP front (`agents.py`)
with the session token in its environment (`DESKFS_SESSION`, as `deskfs run` gives its command, and
`DESKFS_MCP_SESSION`): it registers the session for itself (control op `session`), so every FUSE request
of every one of its threads and every control request it makes are the agent's, by the daemon's own
rules (ancestry, then the token in the environment it was started with). Without `--agent` it is whoever
its environment makes it (DESKFS_AGENT, else its Unix user), as any process.

Protocol on stdin/stdout, one JSON object per line: requests `{"id", "op", "args"}`, answers
`{"id", "ok": RESULT}` or `{"id", "error": SENTENCE}`; the first line it writes is `{"ready": true,
"principal"}` or `{"fatal": SENTENCE}`. Calls run concurrently in threads (a `wait_for_changes` must not
hold up a write). It ends when its stdin closes; its session ends with it.

Must never: act on the mount before its session is registered, or after it is lost without registering
it again (it would be somebody else then); write anything but protocol lines to stdout; log arguments
(they may hold file contents).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from deskfs.mcp.control import ControlError
from deskfs.mcp.desk import OPERATIONS, Desk, Failure

MAX_THREADS = 32
log = logging.getLogger("deskfs.mcp.worker")


class Worker:
    def __init__(self, desk: Desk, agent: str | None, token: str | None, out) -> None:
        self.desk, self.agent, self.token = desk, agent, token
        self.out = out
        self.out_lock = threading.Lock()
        self.session_lock = threading.Lock()

    def send(self, message: dict) -> None:
        line = json.dumps(message, ensure_ascii=False) + "\n"
        with self.out_lock:
            self.out.write(line)
            self.out.flush()

    def register(self) -> str:
        if self.agent is None:
            return self.desk.principal()
        return self.desk.control.open_session(self.agent, self.token or "")

    def ensure_session(self) -> None:
        """The session is alive, or registered again (the daemon restarted), or the call fails."""
        if self.agent is None:
            return
        with self.session_lock:
            if self.desk.control.session_alive():
                return
            self.desk.control.close()
            try:
                self.desk.control.open_session(self.agent, self.token or "")
            except ControlError as exc:
                raise Failure(f"lost this agent's session with the workspace's daemon and could not register it"
                              f" again ({exc}); is the workspace mounted?") from None
            self.desk._principal = None

    def handle(self, request: dict) -> None:
        rid = request.get("id")
        try:
            op, args = request.get("op"), request.get("args") or {}
            if op not in OPERATIONS or not isinstance(args, dict):
                raise Failure(f"unknown tool {op!r}")
            self.ensure_session()
            result = getattr(self.desk, op)(**args)
            self.send({"id": rid, "ok": result})
        except Failure as exc:
            self.send({"id": rid, "error": str(exc)})
        except TypeError as exc:
            self.send({"id": rid, "error": f"bad arguments: {exc}"})
        except Exception as exc:  # the worker must go on: one call failed
            log.exception("internal error in %s", request.get("op"))
            self.send({"id": rid, "error": f"internal error ({type(exc).__name__}); the call did nothing more"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deskfs-mcp-worker")
    parser.add_argument("--mount", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--agent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="deskfs mcp worker: %(levelname)s %(message)s")
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing else may write on the protocol's stream
    desk = Desk(args.mount, args.store, args.agent)
    worker = Worker(desk, args.agent, os.environ.get("DESKFS_MCP_SESSION"), out)
    try:
        principal = worker.register()
    except (ControlError, Failure) as exc:
        worker.send({"fatal": str(exc)})
        return 1
    worker.send({"ready": True, "principal": principal})
    with ThreadPoolExecutor(MAX_THREADS) as pool:
        for line in sys.stdin:
            try:
                request = json.loads(line)
            except ValueError:
                continue
            if isinstance(request, dict):
                pool.submit(worker.handle, request)
    desk.control.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
