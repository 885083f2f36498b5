"""Bearer tokens of the HTTP MCP server: one per agent and workspace, kept as SHA-256 hashes only.

The file is `$XDG_CONFIG_HOME/deskfs/mcp-tokens.json` (default `~/.config/deskfs/`), mode 0600 in a
0700 folder, of the Unix user who runs the server: the store is the daemon's (often root's) and the MCP
server never opens it, and the server runs as that user anyway, so its config folder is where only the
server and its user can read the hashes. Each entry: id (the hash's first 12 hex digits), principal
(`agent:NAME`), workspace (the store's real path), created. A token is `deskfs_` and 43 URL-safe
characters (256 random bits): the hash needs no salt or slow KDF.

Owns creating (the token is returned once, to be printed once), listing, revoking and verifying
(constant-time compare; the file is re-read when it changes, so a revoked token is refused at the next
request).

Must never: store, log or print a token except the one `create` returns; accept a token of another
workspace; write the file with wider permissions than 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time

PREFIX = "deskfs_"


def tokens_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "deskfs", "mcp-tokens.json")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Tokens:
    def __init__(self, path: str | None = None) -> None:
        self.path = path or tokens_path()
        self._cache: tuple[tuple[int, int], list[dict]] | None = None

    def load(self) -> list[dict]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        key = (st.st_mtime_ns, st.st_ino)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            with open(self.path, encoding="utf-8") as f:
                entries = json.load(f).get("tokens", [])
        except (OSError, ValueError, AttributeError):
            entries = []
        self._cache = (key, entries)
        return entries

    def _save(self, entries: list[dict]) -> None:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        temp = f"{self.path}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"tokens": entries}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        self._cache = None

    def create(self, principal: str, workspace: str) -> tuple[str, dict]:
        token = PREFIX + secrets.token_urlsafe(32)
        hashed = digest(token)
        entry = {"id": hashed[:12], "principal": principal, "workspace": workspace, "sha256": hashed,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save(self.load() + [entry])
        return token, entry

    def revoke(self, what: str, workspace: str | None = None) -> list[dict]:
        """Remove the token with id `what`, or every token of principal `what` (in `workspace` if given)."""
        entries = self.load()
        gone = [e for e in entries if e["id"] == what or (e["principal"] == what and
                                                         (workspace is None or e["workspace"] == workspace))]
        if gone:
            self._save([e for e in entries if e not in gone])
        return gone

    def listed(self, workspace: str | None = None) -> list[dict]:
        return [{k: e[k] for k in ("id", "principal", "workspace", "created")} for e in self.load()
                if workspace is None or e["workspace"] == workspace]

    def verify(self, token: str, workspace: str) -> dict | None:
        """The entry `token` is, for `workspace`, or None."""
        hashed = digest(token)
        found = None
        for entry in self.load():
            if hmac.compare_digest(entry.get("sha256", ""), hashed) and entry.get("workspace") == workspace:
                found = entry
        return found
