"""The MCPServer: deskfs's tools, resources, prompt and instructions, forwarded to the calling agent's worker.

Owns the MCP surface: tool names and parameters (the reference filesystem server's where it has them),
honest annotations, output schemas of the record-returning tools, the `deskfs://` resources, the
`safe_edit` prompt and the `instructions` sent at initialize. Each call is handed to `agents.Pool` for the
agent that made it: the one agent of a stdio server, or the agent of the verified bearer token over HTTP
(`http.py` puts it in the request's auth context). A worker's refusal becomes a tool error with its
sentence; bad arguments are the SDK's validation errors; nothing a client sends ends the server.

Must never: do file or control-socket I/O itself (the front is no agent); pick an agent from anything but
the server's own `--agent` or a verified token; log arguments or tokens.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Callable, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import AudioContent, CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from deskfs.mcp.agents import Pool

Who = Callable[[], "str | None"]

READ = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
IDEMPOTENT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                             open_world_hint=False)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                              open_world_hint=False)
OVERWRITE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                            open_world_hint=False)

Path = Annotated[str, Field(description="a path relative to the workspace's root (or absolute under its mountpoint)")]
Version = Annotated[int | None, Field(description="write only if the file is at this version (from read_text_file"
                                      " or get_file_info); 0: only if it does not exist yet")]
Patterns = Annotated[list[str] | None, Field(description="glob patterns to leave out (e.g. node_modules, *.log)")]


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class LockHolder(Record):
    path: str | None = None
    kind: str
    mode: str
    principal: str
    pid: int | str | None = None
    since: str | None = None
    expires: str | None = None


class FileInfo(Record):
    path: str
    type: str
    size: int
    created: str | None
    modified: str | None
    accessed: str | None
    isDirectory: bool
    isFile: bool
    isSymlink: bool
    permissions: str
    version: int | None
    locks: list[LockHolder]
    last_writer: str | None
    last_written: str | None


class Entry(Record):
    name: str
    type: str


class Listing(Record):
    path: str
    entries: list[Entry]


class Matches(Record):
    path: str
    pattern: str
    matches: list[str]
    truncated: bool


class LockStatus(Record):
    path: str
    holders: list[LockHolder]
    locks_under: list[LockHolder]


class LockResult(Record):
    path: str
    mode: str
    ttl: int
    locks: list[LockHolder]


class JournalRecord(Record):
    seq: int
    time: str
    principal: str
    op: str
    path: str | None
    path2: str | None = None
    denied: bool
    errno: int | None = None
    details: Any = None


class Activity(Record):
    records: list[JournalRecord]
    cursor: int | None


class Changes(Record):
    changes: list[JournalRecord]
    cursor: int | None
    timed_out: bool


class VersionEntry(Record):
    number: int
    current: bool
    principal: str | None
    made: str | None
    ended: str | None
    size: int | None
    hash: str | None
    ended_by: str | None


class Versions(Record):
    path: str
    versions: list[VersionEntry]


class Trash(Record):
    path: str
    removed: list[Record]


class Member(Record):
    principal: str
    role: str
    since: str | None = None
    added_by: str | None = None


class Members(Record):
    members: list[Member]
    own_agents: str | None
    offer: Any = None
    you: str


class Written(Record):
    path: str
    bytes: int
    version: int | None


class Edited(Record):
    path: str
    diff: str
    version: int | None
    applied: bool


class Edit(BaseModel):
    oldText: str = Field(description="text to find (exactly; or the same lines with other indentation)")
    newText: str = Field(description="text to put in its place")


class Whoami(Record):
    principal: str
    role: str
    mountpoint: str


INSTRUCTIONS = """deskfs workspace at {mount}: a folder shared by AI agents and people; every change is journaled
under its author. You are {principal}, with the role {role}{role_note}.
- Paths are relative to the workspace's root. Nothing outside it can be reached.
- Before changing a file others may edit, either lock it (lock_file, then unlock_file when done) or pass
  if_version (the version read_text_file/get_file_info gave you) to write_file/edit_file: a stale version is
  refused with who changed it, so you can re-read and merge instead of overwriting their work.
- See what others did with activity (journal) and wait_for_changes (returns as soon as something changes);
  lock_status shows who holds locks. Nothing is lost: list_versions, restore_version, list_trash, undelete.
- The prompt safe_edit walks through lock, read, edit, release."""


def build(pool: Pool, who: Who, mountpoint: str, principal: str = "?", role: str = "?", **options: Any) -> MCPServer:
    """The server, calling `pool` for the agent `who()` names at each call."""
    note = ": you may read but not change files" if role == "viewer" else ""
    server = MCPServer(
        "deskfs", title="deskfs workspace", version="0.1.0",
        instructions=INSTRUCTIONS.format(mount=mountpoint, principal=principal, role=role, role_note=note),
        log_level="WARNING", **options,
    )

    async def call(op: str, **args: Any) -> dict:
        answer = await pool.call(who(), op, {k: v for k, v in args.items() if v is not None})
        if "error" in answer:
            raise ToolError(answer["error"])
        return answer["ok"]

    tool = server.tool

    @tool(annotations=READ, description="Who you are on this workspace, your role, and its mountpoint.")
    async def whoami() -> Whoami:
        return Whoami(**await call("whoami"))

    @tool(annotations=READ, description="The folder this server gives access to: the workspace's mountpoint.")
    async def list_allowed_directories() -> str:
        got = await call("list_allowed_directories")
        return "Allowed directories:\n" + "\n".join(got["directories"])

    @tool(annotations=READ, description="Read a text file (UTF-8). head/tail: only the first/last N lines;"
                                        " offset/length: a byte range, for large files. Ends with a line"
                                        " giving the file's version (for if_version).")
    async def read_text_file(path: Path, head: int | None = None, tail: int | None = None,
                             offset: Annotated[int | None, Field(description="first byte to read")] = None,
                             length: Annotated[int | None, Field(description="bytes to read (at most 4 MiB)")] = None,
                             ) -> CallToolResult:
        got = await call("read_text_file", path=path, head=head, tail=tail, offset=offset, length=length)
        content = got.pop("content")
        meta = (f"[{got['path']}: version {got['version']}, {got['size']} bytes; read {got['bytes']} bytes"
                f" from offset {got['offset']}{'' if got['eof'] else ', more follows'}]")
        return CallToolResult(content=[TextContent(type="text", text=content), TextContent(type="text", text=meta)],
                              structured_content=got | {"content": content})

    @tool(annotations=READ, description="Read an image, audio or any binary file, base64-encoded with its MIME"
                                        " type; offset/length read a byte range.")
    async def read_media_file(path: Path, offset: int | None = None, length: int | None = None) -> CallToolResult:
        got = await call("read_media_file", path=path, offset=offset, length=length)
        data, mime = got.pop("data"), got["mimeType"]
        if mime.startswith("image/"):
            block: Any = ImageContent(type="image", data=data, mime_type=mime)
        elif mime.startswith("audio/"):
            block = AudioContent(type="audio", data=data, mime_type=mime)
        else:
            block = TextContent(type="text", text=data)
        return CallToolResult(content=[block], structured_content=got | {"data": data})

    @tool(annotations=READ, description="Read several text files at once; a file that cannot be read gives its"
                                        " error without failing the others.")
    async def read_multiple_files(paths: list[str]) -> dict[str, Any]:
        return await call("read_multiple_files", paths=paths)

    @tool(annotations=OVERWRITE, description="Create or replace a file, atomically (readers see the old or the"
                                             " new content; the old one stays in the file's versions)."
                                             " if_version makes it a compare-and-swap. encoding base64 for"
                                             " binary content.")
    async def write_file(path: Path, content: str, if_version: Version = None,
                         encoding: Literal["utf-8", "base64"] = "utf-8") -> Written:
        return Written(**await call("write_file", path=path, content=content, if_version=if_version,
                                    encoding=encoding))

    @tool(annotations=DESTRUCTIVE, description="Replace text in a file, each edit's oldText by its newText;"
                                               " returns a unified diff. dryRun shows the diff without"
                                               " writing. Safe against concurrent changes: the file is locked"
                                               " while it is read, edited and written.")
    async def edit_file(path: Path, edits: list[Edit], dryRun: bool = False, if_version: Version = None) -> Edited:
        return Edited(**await call("edit_file", path=path, edits=[e.model_dump() for e in edits], dryRun=dryRun,
                                   if_version=if_version))

    @tool(annotations=IDEMPOTENT, description="Create a folder (and the folders above it); fine if it exists.")
    async def create_directory(path: Path) -> dict[str, Any]:
        return await call("create_directory", path=path)

    @tool(annotations=READ, description="List a folder: each entry's name and type.")
    async def list_directory(path: Path) -> CallToolResult:
        got = await call("list_directory", path=path)
        text = "\n".join(f"[{'DIR' if e['type'] == 'directory' else 'FILE'}] {e['name']}" for e in got["entries"])
        return CallToolResult(content=[TextContent(type="text", text=text or "(empty)")], structured_content=got)

    @tool(annotations=READ, description="List a folder with sizes and modification times; sortBy name or size.")
    async def list_directory_with_sizes(path: Path, sortBy: Literal["name", "size"] = "name") -> dict[str, Any]:
        return await call("list_directory_with_sizes", path=path, sortBy=sortBy)

    @tool(annotations=READ, description="The tree under a folder as nested JSON (name, type, children).")
    async def directory_tree(path: Path, excludePatterns: Patterns = None) -> dict[str, Any]:
        return await call("directory_tree", path=path, excludePatterns=excludePatterns)

    @tool(annotations=WRITE, description="Move or rename a file or folder; never replaces an existing one.")
    async def move_file(source: Path, destination: Path) -> dict[str, Any]:
        return await call("move_file", source=source, destination=destination)

    @tool(annotations=READ, description="Find files under a folder by glob pattern: without '/' it matches"
                                        " names at any depth (*.md), with '/' paths from the folder"
                                        " (reports/**/*.csv).")
    async def search_files(path: Path, pattern: str, excludePatterns: Patterns = None) -> Matches:
        return Matches(**await call("search_files", path=path, pattern=pattern, excludePatterns=excludePatterns))

    @tool(annotations=READ, description="A file's or folder's metadata: size, times, permissions, and deskfs's"
                                        " version, lock holders and last writer.")
    async def get_file_info(path: Path) -> FileInfo:
        return FileInfo(**await call("get_file_info", path=path))

    @tool(annotations=DESTRUCTIVE, description="Delete a file (it stays in the trash: undelete brings it back).")
    async def delete_file(path: Path) -> dict[str, Any]:
        return await call("delete_file", path=path)

    @tool(annotations=DESTRUCTIVE, description="Delete a folder: an empty one, or with recursive=true everything"
                                               " in it.")
    async def delete_directory(path: Path, recursive: bool = False) -> dict[str, Any]:
        return await call("delete_directory", path=path, recursive=recursive)

    @tool(annotations=IDEMPOTENT, description="Lock a file or folder (a deskfs lease) so that other agents'"
                                              " changes to it fail until you unlock it or ttl seconds pass;"
                                              " wait: seconds to wait for another's lock (at most 60).")
    async def lock_file(path: Path, mode: Literal["shared", "exclusive"] = "exclusive", ttl: int = 300,
                        wait: float = 0) -> LockResult:
        return LockResult(**await call("lock_file", path=path, mode=mode, ttl=ttl, wait=wait))

    @tool(annotations=IDEMPOTENT, description="Release your lock on a file or folder.")
    async def unlock_file(path: Path) -> dict[str, Any]:
        return await call("unlock_file", path=path)

    @tool(annotations=READ, description="Who holds locks on a path, and every lock under it (a folder; the"
                                        " root: all).")
    async def lock_status(path: Path = "") -> LockStatus:
        return LockStatus(**await call("lock_status", path=path))

    @tool(annotations=READ, description="The audit journal: who did what, when. since (10m, 2h, ISO time),"
                                        " principal (agent:NAME), path (glob), ops, limit (newest N).")
    async def activity(since: str | None = None, principal: str | None = None, path: str | None = None,
                       ops: list[str] | None = None, limit: int = 100) -> Activity:
        return Activity(**await call("activity", since=since, principal=principal, path=path, ops=ops, limit=limit))

    @tool(annotations=READ, description="Wait until something changes (optionally under a path glob) after a"
                                        " cursor (from activity or a previous call), for at most timeout"
                                        " seconds (60); returns the changes and the next cursor.")
    async def wait_for_changes(path: str | None = None, after: int | None = None, timeout: float = 30) -> Changes:
        return Changes(**await call("wait_for_changes", path=path, after=after, timeout=timeout))

    @tool(annotations=READ, description="A file's versions: number, who made it, when, size, hash.")
    async def list_versions(path: Path) -> Versions:
        return Versions(**await call("list_versions", path=path))

    @tool(annotations=READ, description="The content of version N of a file (base64 for binary).")
    async def read_version(path: Path, version: int, encoding: Literal["utf-8", "base64"] = "utf-8") -> dict[str, Any]:
        return await call("read_version", path=path, version=version, encoding=encoding)

    @tool(annotations=WRITE, description="Make version N's content the file's next version (nothing is lost).")
    async def restore_version(path: Path, version: int) -> dict[str, Any]:
        return await call("restore_version", path=path, version=version)

    @tool(annotations=READ, description="Files removed (under a folder): who removed them and when.")
    async def list_trash(path: Path = "") -> Trash:
        return Trash(**await call("list_trash", path=path))

    @tool(annotations=WRITE, description="Bring a removed file back (as_path: under another name).")
    async def undelete(path: Path, as_path: str | None = None) -> dict[str, Any]:
        return await call("undelete", path=path, as_path=as_path)

    @tool(annotations=READ, description="The workspace's members and roles, and any ownership offer.")
    async def list_members() -> Members:
        return Members(**await call("list_members"))

    @tool(annotations=WRITE, description="(owner) Make a principal (user:NAME or agent:NAME) a member.")
    async def invite_user(principal: str, role: Literal["editor", "viewer"]) -> dict[str, Any]:
        return await call("invite_user", principal=principal, role=role)

    @tool(annotations=IDEMPOTENT, description="(owner) Change a member's role.")
    async def set_role(principal: str, role: Literal["editor", "viewer"]) -> dict[str, Any]:
        return await call("set_role", principal=principal, role=role)

    @tool(annotations=DESTRUCTIVE, description="(owner) Remove a member.")
    async def remove_member(principal: str) -> dict[str, Any]:
        return await call("remove_member", principal=principal)

    @tool(annotations=WRITE, description="(owner) Offer ownership to a member for 72 hours; then: what you"
                                         " become once they accept (editor, viewer, leave).")
    async def transfer_ownership(principal: str, then: Literal["editor", "viewer", "leave"] = "editor"
                                 ) -> dict[str, Any]:
        return await call("transfer_ownership", principal=principal, then=then)

    @tool(annotations=WRITE, description="Accept the ownership offered to you.")
    async def accept_transfer() -> dict[str, Any]:
        return await call("accept_transfer")

    @tool(annotations=WRITE, description="Withdraw (owner) or decline the ownership offer.")
    async def cancel_transfer() -> dict[str, Any]:
        return await call("cancel_transfer")

    @tool(annotations=DESTRUCTIVE, description="Stop being a member of this workspace yourself.")
    async def leave_workspace() -> dict[str, Any]:
        return await call("leave_workspace")

    @server.resource("deskfs://{+path}", name="file", description="A file of the workspace",
                     mime_type="application/octet-stream")
    async def file_resource(path: str) -> str | bytes:
        got = await call("resource", path=path)
        return got["text"] if "text" in got else base64.b64decode(got["data"])

    @server.prompt(description="Change a shared file safely: lock, read, edit, release.")
    def safe_edit(path: str, change: str) -> str:
        return (f"You are changing {path} in a workspace other agents share. Steps:\n"
                f"1. lock_file(path={path!r}, mode='exclusive', ttl=120, wait=30). If it is locked, the error"
                " names the holder: wait or work on something else.\n"
                f"2. read_text_file(path={path!r}) and note its version.\n"
                f"3. edit_file(path={path!r}, edits=[...], if_version=<that version>) to make this change:"
                f" {change}\n"
                f"4. unlock_file(path={path!r}).\n"
                "If a write is refused as stale, re-read the file, merge, and retry with the new version.")

    return server
