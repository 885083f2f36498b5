"""The MCP server (`deskfs mcp`) driven by the SDK's own client, over a real stdio subprocess and over real
Streamable HTTP, against real mounts, as several agents.

Covered: compare-and-swap conflict and recovery; one agent's lock refusing another's write, then the
write done after lock_file with wait; a viewer refused with the role sentence; every confinement escape
(`..`, absolute outside, sibling prefix, symlinks at the end and in the middle, absolute symlinks, a
symlink swapped in for a folder); a binary round trip; a 10 MiB file read in ranges; activity showing
both agents; wait_for_changes woken by the other agent's write; two HTTP agents journaled as themselves;
a revoked token refused; a foreign Origin refused; unknown tools and bad arguments answered with errors
while the server goes on; the seed's hand-off through MCP with the human accepting through the CLI.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import trio
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import DESKFS, agent_env, deskfs, read_line
from test_roles import CLIENT, Who, desk, people  # noqa: F401  (fixtures)


@asynccontextmanager
async def stdio_session(mnt: Path, agent: str | None, env: dict | None = None):
    params = StdioServerParameters(command=DESKFS, args=["mcp", "--mount", str(mnt)] + (
        ["--agent", agent] if agent else []), env=env or agent_env(None))
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


async def call(session: ClientSession, tool: str, **args):
    result = await session.call_tool(tool, args)
    assert not result.is_error, f"{tool}: {result.content[0].text}"
    return result.structured_content


async def refused(session: ClientSession, tool: str, **args) -> str:
    result = await session.call_tool(tool, args)
    assert result.is_error, f"{tool} {args} was not refused: {result.content}"
    return result.content[0].text


def journal(ws, *args: str) -> list[dict]:
    out = deskfs("log", "--json", "--limit", "0", "--mount", str(ws.mnt), *args).stdout
    return [json.loads(line) for line in out.splitlines()]


# -- stdio: two agents ----------------------------------------------------------------------------


async def test_cas_conflict_and_recovery(ws):
    async with stdio_session(ws.mnt, "writer") as writer, stdio_session(ws.mnt, "critic") as critic:
        first = await call(writer, "write_file", path="report.md", content="draft\n")
        assert first["version"] == 1
        read = await call(critic, "read_text_file", path="report.md")
        assert read["content"] == "draft\n" and read["version"] == 1
        await call(writer, "write_file", path="report.md", content="draft 2\n", if_version=1)
        message = await refused(critic, "write_file", path="report.md", content="critic's\n", if_version=1)
        assert "version 1 is stale: the file is at version 2, written by agent:writer" in message
        assert (ws.mnt / "report.md").read_text() == "draft 2\n"  # nothing written
        # Recovery: re-read, merge, retry with the current version.
        again = await call(critic, "read_text_file", path="report.md")
        done = await call(critic, "write_file", path="report.md", content=again["content"] + "critic's\n",
                          if_version=again["version"])
        assert done["version"] == 3
        assert (ws.mnt / "report.md").read_text() == "draft 2\ncritic's\n"
        # edit_file with a stale version writes nothing either; dryRun shows the diff.
        assert "is stale" in await refused(writer, "edit_file", path="report.md", if_version=2,
                                           edits=[{"oldText": "draft 2", "newText": "final"}])
        dry = await call(writer, "edit_file", path="report.md", dryRun=True,
                         edits=[{"oldText": "draft 2", "newText": "final"}])
        assert "-draft 2\n+final\n" in dry["diff"] and not dry["applied"]
        assert (ws.mnt / "report.md").read_text() == "draft 2\ncritic's\n"
        edited = await call(writer, "edit_file", path="report.md", if_version=3,
                            edits=[{"oldText": "draft 2", "newText": "final"}])
        assert edited["applied"] and edited["version"] == 4
        # if_version=0 creates only what does not exist.
        assert "already exists" in await refused(critic, "write_file", path="report.md", content="x", if_version=0)
        assert (await call(critic, "write_file", path="new.md", content="n", if_version=0))["version"] == 1
        # The history line and the mode are kept by the atomic replace.
        os.chmod(ws.mnt / "report.md", 0o640)
        await call(writer, "write_file", path="report.md", content="v5\n")
        assert oct(os.stat(ws.mnt / "report.md").st_mode & 0o777) == "0o640"
        versions = await call(critic, "list_versions", path="report.md")
        assert [v["number"] for v in versions["versions"]] == [1, 2, 3, 4, 5]
        assert (await call(critic, "read_version", path="report.md", version=2))["content"] == "draft 2\n"
        info = await call(critic, "get_file_info", path="report.md")
        assert info["version"] == 5 and info["last_writer"] == "agent:writer"
    writes = [r for r in journal(ws, "--op", "rename") if r["path2"] == "/report.md"]
    assert {r["principal"] for r in writes} == {"agent:writer", "agent:critic"}


async def test_lock_refuses_the_other_agent_until_released(ws):
    (ws.mnt / "plan.md").write_text("plan\n")
    async with stdio_session(ws.mnt, "writer") as writer, stdio_session(ws.mnt, "critic") as critic:
        held = await call(writer, "lock_file", path="plan.md", ttl=60)
        assert held["locks"][0]["principal"] == "agent:writer"
        message = await refused(critic, "write_file", path="plan.md", content="critic")
        assert "plan.md is locked by agent:writer (lease, exclusive, since" in message
        assert "is locked by agent:writer" in await refused(critic, "write_file", path="plan.md", content="c",
                                                             if_version=1)
        assert "is locked by agent:writer" in await refused(critic, "lock_file", path="plan.md")
        status = await call(critic, "lock_status", path="plan.md")
        assert [h["principal"] for h in status["holders"]] == ["agent:writer"]
        # The holder still writes.
        await call(writer, "write_file", path="plan.md", content="plan 2\n")
        async with trio.open_nursery() as nursery:
            got: dict = {}

            async def wait_for_lock() -> None:
                got["lock"] = await call(critic, "lock_file", path="plan.md", wait=30, ttl=60)

            nursery.start_soon(wait_for_lock)
            await call(writer, "unlock_file", path="plan.md")
        assert got["lock"]["locks"][0]["principal"] == "agent:critic"
        await call(critic, "write_file", path="plan.md", content="critic's plan\n")
        await call(critic, "unlock_file", path="plan.md")
        assert "has no lease of yours" in await refused(critic, "unlock_file", path="plan.md")
    assert (ws.mnt / "plan.md").read_text() == "critic's plan\n"


async def test_viewer_is_refused_with_the_role_sentence(ws):
    deskfs("invite", "agent:reader", "--role", "viewer", "--mount", str(ws.mnt))
    (ws.mnt / "notes.md").write_text("notes\n")
    async with stdio_session(ws.mnt, "reader") as reader:
        assert (await call(reader, "whoami"))["role"] == "viewer"
        assert (await call(reader, "read_text_file", path="notes.md"))["content"] == "notes\n"
        for tool, args in (("write_file", {"path": "notes.md", "content": "x"}),
                           ("write_file", {"path": "other.md", "content": "x"}),
                           ("edit_file", {"path": "notes.md", "edits": [{"oldText": "notes", "newText": "x"}]}),
                           ("delete_file", {"path": "notes.md"}), ("create_directory", {"path": "d"}),
                           ("lock_file", {"path": "notes.md"})):
            assert await refused(reader, tool, **args) == \
                f"Error executing tool {tool}: your role is viewer: you may read but not change files"
    assert (ws.mnt / "notes.md").read_text() == "notes\n"


async def test_every_escape_is_refused(ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    sibling = Path(str(ws.mnt) + "-evil")
    sibling.mkdir()
    (sibling / "x.txt").write_text("evil\n")
    (ws.mnt / "inside").mkdir()
    (ws.mnt / "inside" / "ok.txt").write_text("ok\n")
    os.symlink(outside / "secret.txt", ws.mnt / "final-link")
    os.symlink(outside, ws.mnt / "middle-link")
    os.symlink("../../outside/secret.txt", ws.mnt / "inside" / "relative-link")
    os.symlink("ok.txt", ws.mnt / "inside" / "fine-link")
    os.symlink("/", ws.mnt / "root-link")
    async with stdio_session(ws.mnt, "writer") as s:
        for path in ("../outside/secret.txt", "inside/../../outside/secret.txt", "/etc/passwd",
                     str(outside / "secret.txt"), str(sibling / "x.txt"), "final-link", "middle-link/secret.txt",
                     "inside/relative-link", "root-link/etc/passwd"):
            message = await refused(s, "read_text_file", path=path)
            assert "outside the workspace" in message or "leaves the workspace" in message, (path, message)
            assert "secret" not in message.split(":", 1)[1].replace("secret.txt", "")
        for tool, args in (("write_file", {"path": "middle-link/new.txt", "content": "x"}),
                           ("write_file", {"path": "final-link", "content": "x"}),
                           ("create_directory", {"path": "middle-link/d"}),
                           ("move_file", {"source": "inside/ok.txt", "destination": "middle-link/ok.txt"}),
                           ("list_directory", {"path": "middle-link"}),
                           ("search_files", {"path": "root-link", "pattern": "*"}),
                           ("delete_file", {"path": "middle-link/secret.txt"}),
                           ("get_file_info", {"path": "final-link"}),
                           ("write_file", {"path": str(sibling / "x.txt"), "content": "x"})):
            message = await refused(s, tool, **args)
            assert "outside the workspace" in message or "leaves the workspace" in message, (tool, message)
        # A symlink that stays inside is followed; one swapped in for a folder after a listing is refused.
        assert (await call(s, "read_text_file", path="inside/fine-link"))["content"] == "ok\n"
        await call(s, "list_directory", path="inside")
        os.rename(ws.mnt / "inside", ws.mnt / "inside-real")
        os.symlink(outside, ws.mnt / "inside")
        assert "outside the workspace" in await refused(s, "read_text_file", path="inside/secret.txt")
        assert "outside the workspace" in await refused(s, "write_file", path="inside/secret.txt", content="x")
        # Search never descends through a symlink.
        found = await call(s, "search_files", path="", pattern="*.txt")
        assert "/inside-real/ok.txt" in found["matches"] and not any("secret" in m for m in found["matches"])
    assert (outside / "secret.txt").read_text() == "secret\n" and sorted(os.listdir(outside)) == ["secret.txt"]
    assert (sibling / "x.txt").read_text() == "evil\n"
    sibling.joinpath("x.txt").unlink()
    sibling.rmdir()


async def test_binary_round_trip_and_ranged_reads_of_a_large_file(ws):
    blob = bytes(range(256)) * 64 + b"\x00\xff"
    big = os.urandom(10 * 1024 * 1024)
    (ws.mnt / "big.bin").write_bytes(big)
    async with stdio_session(ws.mnt, "writer") as s:
        await call(s, "write_file", path="img/blob.bin", content=base64.b64encode(blob).decode(), encoding="base64")
        assert "not a folder" in await refused(s, "read_text_file", path="img/blob.bin/x")
        await call(s, "write_file", path="img/blob.bin", content=base64.b64encode(blob).decode(), encoding="base64")
        assert (ws.mnt / "img" / "blob.bin").read_bytes() == blob
        got = await call(s, "read_media_file", path="img/blob.bin")
        assert base64.b64decode(got["data"]) == blob
        assert "not UTF-8 text" in await refused(s, "read_text_file", path="img/blob.bin")
        assert "read it in ranges" in await refused(s, "read_media_file", path="big.bin")
        parts, offset = [], 0
        while True:
            part = await call(s, "read_media_file", path="big.bin", offset=offset, length=4 * 1024 * 1024)
            parts.append(base64.b64decode(part["data"]))
            offset += part["bytes"]
            if part["eof"]:
                break
        assert b"".join(parts) == big and len(parts) == 3
        (ws.mnt / "big.txt").write_text("line\n" * (2 * 1024 * 1024))
        text = await call(s, "read_text_file", path="big.txt", offset=5 * 1024 * 1024, length=10)
        assert text["content"] == "line\nline\n" and text["size"] == 10 * 1024 * 1024
        assert (await call(s, "read_text_file", path="big.txt", offset=0, length=20, head=1))["content"] == "line\n"


async def test_activity_and_wait_for_changes_see_the_other_agent(ws):
    async with stdio_session(ws.mnt, "writer") as writer, stdio_session(ws.mnt, "critic") as critic:
        await call(writer, "write_file", path="a.md", content="a")
        await call(critic, "write_file", path="b.md", content="b")
        seen = await call(writer, "activity", ops=["rename"], limit=10)
        assert {r["principal"] for r in seen["records"]} == {"agent:writer", "agent:critic"}
        only = await call(writer, "activity", principal="agent:critic", limit=50)
        assert only["records"] and {r["principal"] for r in only["records"]} == {"agent:critic"}
        cursor = seen["cursor"]
        async with trio.open_nursery() as nursery:
            woke: dict = {}

            async def waiter() -> None:
                woke["changes"] = await call(critic, "wait_for_changes", path="/reports/**", after=cursor,
                                             timeout=30)

            nursery.start_soon(waiter)
            await call(writer, "write_file", path="elsewhere.md", content="not watched")
            await call(writer, "write_file", path="reports/q3.md", content="q3")
        changes = woke["changes"]
        assert not changes["timed_out"] and changes["cursor"] > cursor
        assert {c["principal"] for c in changes["changes"]} == {"agent:writer"}
        assert any(c["path"] == "/reports/q3.md" or c["path2"] == "/reports/q3.md" for c in changes["changes"])
        assert all(c["path"] is None or c["path"].startswith("/reports") for c in changes["changes"])
        quiet = await call(critic, "wait_for_changes", after=changes["cursor"] + 10**6, timeout=0.2)
        assert quiet["timed_out"]


async def test_bad_calls_get_errors_and_the_server_goes_on(ws, tmp_path):
    async with stdio_session(ws.mnt, "writer") as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
        assert {"read_text_file", "write_file", "edit_file", "lock_file", "wait_for_changes", "invite_user",
                "accept_transfer", "leave_workspace", "undelete"} <= set(tools)
        assert tools["read_text_file"].annotations.read_only_hint is True
        assert tools["delete_file"].annotations.destructive_hint is True
        assert tools["get_file_info"].output_schema is not None
        assert all(t.annotations.open_world_hint is False for t in tools.values())
        assert "Unknown tool" in await refused(s, "no_such_tool")
        assert "validation error" in await refused(s, "read_text_file", path=42)
        assert "validation error" in await refused(s, "read_text_file")
        assert "lock_file" in await refused(s, "lock_file", path="x", mode="sideways")
        assert "ttl must be" in await refused(s, "lock_file", path="", ttl=0)
        assert "no such file" in await refused(s, "read_text_file", path="missing.md")
        assert "offset must be" in await refused(s, "read_text_file", path="x", offset=-1)
        await call(s, "create_directory", path="d/e")
        (ws.mnt / "d" / "e" / "f.txt").write_text("f")
        assert "is not empty" in await refused(s, "delete_directory", path="d")
        assert (await call(s, "delete_directory", path="d", recursive=True))["deleted"]
        await call(s, "write_file", path="gone.md", content="bye")
        await call(s, "delete_file", path="gone.md")
        assert any(r["path"] == "/gone.md" for r in (await call(s, "list_trash"))["removed"])
        await call(s, "undelete", path="gone.md")
        assert (ws.mnt / "gone.md").read_text() == "bye"
        assert (await call(s, "whoami"))["principal"] == "agent:writer"
        prompt = await s.get_prompt("safe_edit", {"path": "a.md", "change": "fix typo"})
        assert "lock_file" in prompt.messages[0].content.text
    # A missing mount: the server starts and every call says so.
    async with stdio_session(tmp_path, "writer") as s:
        assert "not inside a mounted deskfs workspace" in await refused(s, "list_directory", path="")
        assert "not inside a mounted deskfs workspace" in await refused(s, "whoami")


# -- HTTP: several agents, tokens ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def http_session(url: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as client:
        async with streamable_http_client(url, http_client=client) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


class HttpServer:
    def __init__(self, mnt: Path, env: dict) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc = subprocess.Popen([DESKFS, "mcp", "--http", f"127.0.0.1:{self.port}", "--mount", str(mnt)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = read_line(self.proc.stderr, 60, bytearray())
        assert "serving" in line, line

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def test_http_agents_act_as_themselves_with_tokens(ws, tmp_path):
    env = agent_env(None) | {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    tokens = {}
    for name in ("alpha", "beta"):
        tokens[name] = subprocess.run([DESKFS, "mcp", "token", "create", f"agent:{name}", "--mount", str(ws.mnt)],
                                      env=env, capture_output=True, text=True, check=True).stdout.strip()
    token_file = tmp_path / "config" / "deskfs" / "mcp-tokens.json"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    assert not any(t in token_file.read_text() for t in tokens.values())
    listed = subprocess.run([DESKFS, "mcp", "token", "list", "--json", "--mount", str(ws.mnt)], env=env,
                            capture_output=True, text=True, check=True).stdout
    assert {e["principal"] for e in json.loads(listed)} == {"agent:alpha", "agent:beta"}
    server = HttpServer(ws.mnt, env)
    try:
        async with http_session(server.url, tokens["alpha"]) as alpha, \
                http_session(server.url, tokens["beta"]) as beta:
            assert (await call(alpha, "whoami"))["principal"] == "agent:alpha"
            assert (await call(beta, "whoami"))["principal"] == "agent:beta"
            await call(alpha, "write_file", path="shared.md", content="alpha\n")
            await call(alpha, "lock_file", path="shared.md", ttl=60)
            assert "is locked by agent:alpha" in await refused(beta, "write_file", path="shared.md", content="b")
            await call(alpha, "unlock_file", path="shared.md")
            await call(beta, "write_file", path="shared.md", content="beta\n", if_version=1)
        # Without a token, with a wrong one, or from a foreign Origin: refused.
        async with httpx2.AsyncClient() as raw:
            body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
            headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
            assert (await raw.post(server.url, json=body, headers=headers)).status_code == 401
            bad = headers | {"Authorization": "Bearer deskfs_not-a-token"}
            assert (await raw.post(server.url, json=body, headers=bad)).status_code == 401
            evil = headers | {"Authorization": f"Bearer {tokens['alpha']}", "Origin": "http://evil.example"}
            assert (await raw.post(server.url, json=body, headers=evil)).status_code == 403
            rebound = headers | {"Authorization": f"Bearer {tokens['alpha']}", "Host": "evil.example"}
            assert (await raw.post(server.url, json=body, headers=rebound)).status_code == 421
        # A revoked token is refused at its next request.
        subprocess.run([DESKFS, "mcp", "token", "revoke", "agent:beta", "--mount", str(ws.mnt)], env=env,
                       capture_output=True, text=True, check=True)
        async with httpx2.AsyncClient() as raw:
            revoked = headers | {"Authorization": f"Bearer {tokens['beta']}"}
            assert (await raw.post(server.url, json=body, headers=revoked)).status_code == 401
        async with http_session(server.url, tokens["alpha"]) as alpha:
            assert (await call(alpha, "read_text_file", path="shared.md"))["content"] == "beta\n"
    finally:
        server.close()
    renames = [r for r in journal(ws, "--op", "rename") if r["path2"] == "/shared.md"]
    assert [r["principal"] for r in renames] == ["agent:alpha", "agent:beta"]
    denied = journal(ws, "--denied")
    assert any(r["principal"] == "agent:beta" and r["errno"] == 16 for r in denied)


def test_http_refuses_a_public_address_without_tokens(ws, tmp_path):
    env = agent_env(None) | {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    result = subprocess.run([DESKFS, "mcp", "--http", "0.0.0.0:1", "--mount", str(ws.mnt)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "without tokens" in result.stderr and "Traceback" not in result.stderr


# -- the seed's hand-off, through MCP ---------------------------------------------------------------


async def test_seed_hand_off_through_mcp(desk, people):  # noqa: F811
    ws = desk
    client = Who(user=CLIENT)
    async with stdio_session(ws.mnt, "builder") as builder:
        assert (await call(builder, "whoami"))["role"] == "owner"
        await call(builder, "write_file", path="README.md", content="# project\n")
        await call(builder, "write_file", path="docs/spec.md", content="spec\n")
        await call(builder, "invite_user", principal=f"user:{CLIENT}", role="viewer")
        assert "no ownership offer to you" in await refused(builder, "accept_transfer")
        offer = await call(builder, "transfer_ownership", principal=f"user:{CLIENT}", then="editor")
        assert offer["principal"] == f"user:{CLIENT}"
        assert client.deskfs(ws, "accept-transfer").returncode == 0  # the human, as a real Unix user
        members = await call(builder, "list_members")
        assert {m["principal"]: m["role"] for m in members["members"]} == \
            {f"user:{CLIENT}": "owner", "agent:builder": "editor"}
        await call(builder, "leave_workspace")
        assert "not a member" in await refused(builder, "write_file", path="README.md", content="x")
    assert "# project" in client.py(f"print(open('{ws.mnt}/README.md').read())")
    log = client.deskfs(ws, "log", "--json", "--limit", "0")  # the new owner sees the whole journal
    assert log.returncode == 0, log.stderr
    records = [json.loads(line) for line in log.stdout.splitlines()]
    assert {"/README.md", "/docs/spec.md"} <= {r["path2"] for r in records
                                                 if r["op"] == "rename" and r["principal"] == "agent:builder"}
    steps = [(r["principal"], r["op"]) for r in records if r["op"] in
             ("invite", "transfer", "accept_transfer", "leave") and not r["denied"]]
    assert steps == [("agent:builder", "invite"), ("agent:builder", "transfer"),
                     (f"user:{CLIENT}", "accept_transfer"), ("agent:builder", "leave")]
