"""deskfs: a shared desk for a team of agents, presented as an ordinary FUSE mount."""

__version__ = "0.1.0"
