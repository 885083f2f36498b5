"""deskfs's MCP server: the workspace as tools for agent clients, acting through the mount as the agent.

Modules: `paths` (confinement), `control` (the daemon's socket, as the agent), `desk` (the operations,
run in a worker process registered as the agent), `worker` (that process), `agents` (the front's pool of
workers, one per agent), `server` (the MCPServer: tools, resources, prompts), `tokens` (bearer tokens),
`http` (Streamable HTTP), `cli` (the `deskfs mcp` commands).

Must never: be imported at `deskfs` CLI start-up (the SDK, anyio and pydantic load only for `deskfs mcp`);
open the store's database.
"""
