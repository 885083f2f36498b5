"""Streamable HTTP for several agents at once: bearer tokens decide who each request is.

Owns the HTTP side of `deskfs mcp --http [HOST:]PORT`: binding (loopback unless told otherwise; a
non-loopback address only when the workspace has tokens), the SDK's bearer-token middleware with our
`tokens.Tokens` as verifier (the principal of the verified token is the agent each call runs as, in that
agent's own worker), and the Host/Origin checks the MCP specification requires against DNS rebinding
(a browser page of another origin gets 403; a Host that is not this server's gets 421).

Without tokens for the workspace (loopback only) every call is the server's own `--agent`, as over stdio.

Must never: take an agent's identity from anything but a verified token (no header, no argument); log a
token; serve a non-loopback address without tokens.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Any

import anyio

from deskfs.mcp.agents import Pool
from deskfs.mcp.tokens import Tokens

log = logging.getLogger("deskfs.mcp")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"give --http [HOST:]PORT with a port from 1 to 65535, not {text!r}")
    return host, int(port)


class Verifier:
    """The SDK's TokenVerifier over the tokens file: a token of this workspace, or nothing."""

    def __init__(self, tokens: Tokens, workspace: str) -> None:
        self.tokens, self.workspace = tokens, workspace

    async def verify_token(self, token: str) -> Any:
        from mcp.server.auth.provider import AccessToken

        entry = self.tokens.verify(token, self.workspace)
        if entry is None:
            return None
        return AccessToken(token=token, client_id=entry["principal"], scopes=["deskfs"])


async def serve(mount: str, store: str, host: str, port: int, agent: str | None, tokens: Tokens) -> None:
    import uvicorn
    from mcp.server.auth.middleware.auth_context import get_access_token
    from mcp.server.auth.settings import AuthSettings
    from mcp.server.transport_security import TransportSecuritySettings

    from deskfs.mcp.server import build

    use_tokens = bool(tokens.listed(store))
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}"

    def who() -> str | None:
        if not use_tokens:
            return agent
        access = get_access_token()
        if access is None:  # the middleware lets no request through without one; never fall back
            raise PermissionError("no verified token")
        return access.client_id.partition(":")[2]

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{shown_host}:{port}", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"],
        allowed_origins=[url, f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"],
    )
    async with Pool(mount) as pool:
        options: dict[str, Any] = {}
        if use_tokens:
            options = {"auth": AuthSettings(issuer_url=url, resource_server_url=None),  # type: ignore[arg-type]
                       "token_verifier": Verifier(tokens, store)}
        server = build(pool, who, mount, principal="(the agent of your token)" if use_tokens else
                       (f"agent:{agent}" if agent else "this server's user"), role="(see whoami)", **options)
        app = server.streamable_http_app(transport_security=security, host=host)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                access_log=False)
        web = uvicorn.Server(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(web.serve)
            while not web.started:
                if web.should_exit:
                    break
                await anyio.sleep(0.02)
            if web.started:
                print(f"deskfs mcp: serving {url}/mcp for {mount}"
                      f" ({'bearer tokens required' if use_tokens else 'no tokens: as ' + (agent or 'this user')})",
                      file=sys.stderr, flush=True)
