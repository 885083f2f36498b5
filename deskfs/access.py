"""Roles: who belongs to the workspace, with which role, and how ownership moves.

Members are principals with a role: `owner` (exactly one), `editor` or `viewer`. By default the owner's
Unix user and that user's agents are editors without an invitation (`deskfs config members.own_agents
off` turns that off); anyone else is no member until invited. An ownership transfer is an offer to a
member that expires after 72 hours and becomes effective only when that member accepts it.

Owns the `members` and `transfer_offer` tables, the in-memory role cache every request consults, the
rules of who may manage members, and which journal records a reader may see.

Must never: take a role from anything but a principal the identity layer resolved (never from what a
caller says about itself); leave the workspace without exactly one owner; answer from a stale cache
after a change (every change clears it).
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from typing import Callable

from deskfs.journal import Actor, Journal, Record
from deskfs.store.meta import ROOT_INODE

NONE, VIEWER, EDITOR, OWNER = 0, 1, 2, 3
ROLE_NAMES = {"none": NONE, "viewer": VIEWER, "editor": EDITOR, "owner": OWNER}
ROLE_OF_RANK = {rank: name for name, rank in ROLE_NAMES.items()}
INVITABLE = ("editor", "viewer")
AFTER_TRANSFER = ("editor", "viewer", "leave")
TRANSFER_TTL_NS = 72 * 3600 * 1_000_000_000
OWN_AGENTS = "members.own_agents"  # editor (default) | viewer | off
PRINCIPAL = re.compile(r"(agent|user):[A-Za-z0-9._-]{1,64}\Z")

SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    principal TEXT PRIMARY KEY,
    role      TEXT NOT NULL,  -- owner | editor | viewer | none (opted out of the default role)
    since_ns  INTEGER NOT NULL,
    added_by  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS transfer_offer (
    id         INTEGER PRIMARY KEY CHECK (id = 1),  -- at most one offer at a time
    principal  TEXT NOT NULL,
    then_role  TEXT NOT NULL,
    offered_by TEXT NOT NULL,
    offered_ns INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL
);
"""


class Refused(Exception):
    """A request the caller may not make, or that makes no sense: one line for the user."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage  # bad input (exit 2) rather than a refusal (exit 1)


def check_principal(text: str) -> str:
    if not PRINCIPAL.match(text):
        raise Refused(f"{text!r} is not a principal (agent:NAME or user:NAME)", usage=True)
    return text


def uid_of_user_principal(principal: str) -> int | None:
    name = principal.split(":", 1)[1]
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return int(name) if name.isdigit() else None


def add_owner(conn: sqlite3.Connection, principal: str, now_ns: int) -> None:
    """Make `principal` the owner of a new store (run by `deskfs init`)."""
    conn.executescript(SCHEMA)
    conn.execute("INSERT INTO members VALUES (?, 'owner', ?, ?)", (principal, now_ns, principal))


@dataclass(frozen=True)
class Offer:
    principal: str
    then_role: str
    offered_by: str
    offered_ns: int
    expires_ns: int


class Access:
    """Roles over the store's connection, cached in memory; changes are journaled by the caller's actor."""

    def __init__(self, conn: sqlite3.Connection, begin: Callable[[], None], journal: Journal,
                 uid_of_agent: Callable[[str], int | None], bind_agent: Callable[[str, int], object],
                 store_owner_uid: int) -> None:
        conn.executescript(SCHEMA)
        self._conn = conn
        self._begin = begin
        self._journal = journal
        self._uid_of_agent = uid_of_agent
        self._bind_agent = bind_agent
        self._roles: dict[str, int] = {}
        if conn.execute("SELECT 1 FROM members WHERE role='owner'").fetchone() is None:
            # A store from before roles: its creator's Unix user owns it.
            from deskfs.identity import user_principal

            begin()
            conn.execute("INSERT OR REPLACE INTO members VALUES (?, 'owner', ?, 'deskfs')",
                         (user_principal(store_owner_uid), time.time_ns()))

    # -- reading ------------------------------------------------------------------------------

    def role(self, principal: str) -> int:
        """The rank of `principal`'s role now (NONE for a non-member); answered from memory."""
        known = self._roles.get(principal)
        if known is None:
            known = self._roles[principal] = self._compute_role(principal)
        return known

    def _compute_role(self, principal: str) -> int:
        row = self._conn.execute("SELECT role FROM members WHERE principal=?", (principal,)).fetchone()
        if row is not None:
            return ROLE_NAMES.get(row[0], NONE)
        default = self.own_agents_role()
        owner_uid = self._uid_of(self.owner())
        if default and owner_uid is not None and self._uid_of(principal) == owner_uid:
            return default
        return NONE

    def _uid_of(self, principal: str) -> int | None:
        kind, _, name = principal.partition(":")
        return self._uid_of_agent(name) if kind == "agent" else uid_of_user_principal(principal)

    def own_agents(self) -> str:
        """The role the owner's Unix user and its agents have without an invitation: editor, viewer or off."""
        return self._setting(OWN_AGENTS) or "editor"

    def own_agents_role(self) -> int:
        return {"editor": EDITOR, "viewer": VIEWER}.get(self.own_agents(), NONE)

    def owner(self) -> str:
        return self._conn.execute("SELECT principal FROM members WHERE role='owner'").fetchone()[0]

    def members(self) -> list[dict]:
        rows = self._conn.execute(
            "SELECT principal, role, since_ns, added_by FROM members WHERE role != 'none'"
            " ORDER BY CASE role WHEN 'owner' THEN 0 WHEN 'editor' THEN 1 ELSE 2 END, principal").fetchall()
        return [{"principal": p, "role": r, "since_ns": s, "added_by": a} for p, r, s, a in rows]

    def offer(self) -> Offer | None:
        row = self._conn.execute(
            "SELECT principal, then_role, offered_by, offered_ns, expires_ns FROM transfer_offer").fetchone()
        return Offer(*row) if row else None

    def _setting(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    # -- managing -----------------------------------------------------------------------------

    def _refuse(self, actor: Actor, op: str, message: str, target: str | None = None, usage: bool = False) -> Refused:
        if not usage:
            self._journal.record(actor, op, errno=errno.EPERM, reason=message,
                                 **({"member": target} if target else {}))
        return Refused(message, usage)

    def _require_owner(self, actor: Actor, op: str, target: str | None = None) -> None:
        if self.role(actor.principal) != OWNER:
            raise self._refuse(actor, op, f"only the owner of this workspace ({self.owner()}) may do that", target)

    def _explicit_role(self, principal: str) -> str | None:
        row = self._conn.execute("SELECT role FROM members WHERE principal=?", (principal,)).fetchone()
        return row[0] if row and row[0] != "none" else None

    def _set_role(self, principal: str, role: str, by: str) -> None:
        self._begin()
        self._conn.execute("INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?)", (principal, role, time.time_ns(), by))

    def _changed(self) -> None:
        self._roles.clear()

    def invite(self, actor: Actor, principal: str, role: str, bound_to: str | None = None) -> None:
        """Make `principal` a member. For an agent, `bound_to` names the Unix user it runs as, when that is
        not the inviter's own: the name is bound to that user now if nobody has used it yet, and an
        invitation of a name another user already took must say so (no one squats an invitation)."""
        check_principal(principal)
        if role not in INVITABLE:
            raise Refused(f"role must be one of {', '.join(INVITABLE)} (ownership moves by: deskfs transfer)", usage=True)
        self._require_owner(actor, "invite", principal)
        current = self._explicit_role(principal)
        if current is not None:
            raise self._refuse(actor, "invite", f"{principal} is already a member ({current});"
                               f" change its role with: deskfs role {principal} ROLE", principal)
        if principal.startswith("user:") and uid_of_user_principal(principal) is None:
            raise self._refuse(actor, "invite", f"there is no Unix user {principal[5:]!r} on this host", principal)
        if principal.startswith("agent:"):
            self._check_agent_owner(actor, principal, bound_to)
        elif bound_to is not None:
            raise Refused("--bound-to is for agents (a user is bound to itself)", usage=True)
        self._set_role(principal, role, actor.principal)
        self._journal.record(actor, "invite", member=principal, role=role)
        self._changed()

    def _check_agent_owner(self, actor: Actor, principal: str, bound_to: str | None) -> None:
        name = principal[len("agent:"):]
        wanted = actor.uid
        if bound_to is not None:
            wanted_or_none = uid_of_user_principal(f"user:{bound_to}")
            if wanted_or_none is None:
                raise self._refuse(actor, "invite", f"there is no Unix user {bound_to!r} on this host", principal)
            wanted = wanted_or_none
        bound = self._uid_of_agent(name)
        if bound is None:
            self._bind_agent(name, wanted)  # from now on only that Unix user can be this agent
            return
        if bound != wanted:
            from deskfs.identity import user_principal

            owner = user_principal(bound)[len("user:"):]
            raise self._refuse(actor, "invite", f"{principal} already belongs to Unix user {owner} (who used it"
                               f" first); if that is who you mean, add: --bound-to {owner}", principal)

    def change_role(self, actor: Actor, principal: str, role: str) -> None:
        check_principal(principal)
        if role not in INVITABLE:
            raise Refused(f"role must be one of {', '.join(INVITABLE)} (ownership moves by: deskfs transfer)", usage=True)
        self._require_owner(actor, "role", principal)
        current = self._explicit_role(principal)
        if current is None and not self.role(principal):
            raise self._refuse(actor, "role", f"{principal} is not a member; invite it with: deskfs invite", principal)
        if current == "owner":
            raise self._refuse(actor, "role", "the owner's role changes only by a transfer of ownership", principal)
        self._set_role(principal, role, actor.principal)
        self._journal.record(actor, "role", member=principal, role=role, was=current or ROLE_OF_RANK[self.role(principal)])
        self._changed()

    def remove(self, actor: Actor, principal: str) -> None:
        check_principal(principal)
        self._require_owner(actor, "remove", principal)
        if principal == self.owner():
            raise self._refuse(actor, "remove", "the owner cannot be removed; transfer ownership first", principal)
        if not self.role(principal):
            raise self._refuse(actor, "remove", f"{principal} is not a member", principal)
        self._drop(principal, actor.principal)
        self._journal.record(actor, "remove", member=principal)
        self._changed()

    def leave(self, actor: Actor) -> None:
        if not self.role(actor.principal):
            raise self._refuse(actor, "leave", f"{actor.principal} is not a member of this workspace")
        if actor.principal == self.owner():
            raise self._refuse(actor, "leave", "the owner cannot leave; transfer ownership first (deskfs transfer)")
        self._drop(actor.principal, actor.principal)
        self._journal.record(actor, "leave")
        self._changed()

    def _drop(self, principal: str, by: str) -> None:
        """No role for `principal`: a `none` row also opts out of the default role of the owner's agents."""
        self._set_role(principal, "none", by)
        offer = self.offer()
        if offer is not None and offer.principal == principal:
            self._conn.execute("DELETE FROM transfer_offer")

    def transfer(self, actor: Actor, principal: str, then: str) -> Offer:
        check_principal(principal)
        if then not in AFTER_TRANSFER:
            raise Refused(f"--then must be one of {', '.join(AFTER_TRANSFER)}", usage=True)
        self._require_owner(actor, "transfer", principal)
        if principal == actor.principal:
            raise self._refuse(actor, "transfer", "you already own this workspace", principal)
        if not self.role(principal):
            raise self._refuse(actor, "transfer", f"{principal} is not a member; invite it first", principal)
        now = time.time_ns()
        offer = Offer(principal, then, actor.principal, now, now + TRANSFER_TTL_NS)
        self._begin()
        self._conn.execute("INSERT OR REPLACE INTO transfer_offer VALUES (1, ?, ?, ?, ?, ?)",
                           (offer.principal, offer.then_role, offer.offered_by, offer.offered_ns, offer.expires_ns))
        self._journal.record(actor, "transfer", member=principal, then=then, expires_ns=offer.expires_ns)
        return offer

    def accept_transfer(self, actor: Actor) -> str:
        """Make the caller the owner if an unexpired offer names it; returns the former owner."""
        offer = self.offer()
        if offer is None or offer.principal != actor.principal:
            raise self._refuse(actor, "accept_transfer", "there is no ownership offer to you")
        if offer.expires_ns <= time.time_ns():
            self._begin()
            self._conn.execute("DELETE FROM transfer_offer")
            raise self._refuse(actor, "accept_transfer", "the ownership offer to you has expired; ask for a new one")
        former = self.owner()
        self._begin()
        self._conn.execute("DELETE FROM transfer_offer")
        self._set_role(actor.principal, "owner", former)
        self._set_role(former, "none" if offer.then_role == "leave" else offer.then_role, actor.principal)
        self._journal.record(actor, "accept_transfer", former_owner=former, former_owner_now=offer.then_role)
        self._changed()
        return former

    def cancel_transfer(self, actor: Actor) -> Offer:
        offer = self.offer()
        if offer is None:
            raise self._refuse(actor, "cancel_transfer", "there is no ownership offer to cancel")
        if actor.principal != offer.principal:
            self._require_owner(actor, "cancel_transfer", offer.principal)
        self._begin()
        self._conn.execute("DELETE FROM transfer_offer")
        self._journal.record(actor, "cancel_transfer", member=offer.principal)
        return offer

    def configure(self, actor: Actor, key: str, value: str) -> None:
        self._require_owner(actor, "config")
        self._begin()
        self._conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))
        self._journal.record(actor, "config", key=key, value=value)
        self._changed()

    # -- what a reader of the journal may see -------------------------------------------------

    def may_audit(self, principal: str) -> bool:
        return self.role(principal) == OWNER

    def reader_filter(self, actor: Actor, conn: sqlite3.Connection) -> "ReadableFilter | None":
        """What `actor` may see of the journal and of listings with paths: None (everything) for the owner."""
        return None if self.may_audit(actor.principal) else ReadableFilter(conn, actor.principal, actor.uid)


# Records about the workspace as a whole, which every member may see (when they were not refused).
WORKSPACE_OPS = frozenset({"invite", "role", "remove", "leave", "transfer", "accept_transfer", "cancel_transfer",
                           "config", "mount", "unmount", "fsck", "prune"})


class ReadableFilter:
    """Which journal records a member who is not the owner may see: its own, those of paths its Unix user
    may read, and the workspace's own events (membership, settings, mounts).

    Runs on a read-only connection in a worker thread. A path that is gone is judged by its deepest
    folder that still exists.
    """

    def __init__(self, conn: sqlite3.Connection, principal: str, uid: int) -> None:
        self._conn = conn
        self._principal = principal
        self._uid = uid
        try:
            user = pwd.getpwuid(uid)
            self._gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
        except KeyError:
            self._gids = set()
        self._cache: dict[str, bool] = {}
        self._inodes: dict[int, bool | None] = {}
        self._reachable: dict[int, bool] = {}

    def __call__(self, record: Record) -> bool:
        if record.principal == self._principal:
            return True
        if record.path is None:
            return record.op in WORKSPACE_OPS and record.errno is None
        if record.inode is not None and self.inode_readable(record.inode) is False:
            return False  # judged by the file itself, wherever it is now, whatever its name's bytes
        return all(self.path_readable(p) for p in (record.path, record.path2) if p is not None)

    def inode_readable(self, ino: int) -> bool | None:
        """Whether the reader's Unix user may read file `ino` through one of its names now; None when
        the file is gone (or has no name left), so that only its recorded path can tell."""
        known = self._inodes.get(ino)
        if known is None and ino not in self._inodes:
            known = self._inodes[ino] = self._inode_readable(ino)
        return known

    def _inode_readable(self, ino: int) -> bool | None:
        row = self._conn.execute("SELECT mode, uid, gid FROM inodes WHERE id=?", (ino,)).fetchone()
        if row is None:
            return None
        if ino == ROOT_INODE:
            return self._allows(*row, 4)
        parents = [r[0] for r in self._conn.execute("SELECT DISTINCT parent FROM dentries WHERE inode=?", (ino,))]
        if not parents:
            return None
        if not (stat.S_ISLNK(row[0]) or self._allows(*row, 4)):
            return False
        return any(self._folder_reachable(parent) for parent in parents)

    def _folder_reachable(self, folder: int) -> bool:
        """Whether the reader may pass through `folder` and every folder above it."""
        chain = []
        while True:
            known = self._reachable.get(folder)
            if known is not None:
                break
            row = self._conn.execute("SELECT mode, uid, gid FROM inodes WHERE id=?", (folder,)).fetchone()
            if row is None or not self._allows(*row, 1):
                known = False
                break
            chain.append(folder)
            if folder == ROOT_INODE:
                known = True
                break
            parent = self._conn.execute("SELECT parent FROM dentries WHERE inode=? LIMIT 1", (folder,)).fetchone()
            if parent is None:
                known = False
                break
            folder = parent[0]
        for passed in chain:
            self._reachable[passed] = known
        return known

    def allows(self, mode: int, uid: int, gid: int, bit: int) -> bool:
        """Whether the reader's Unix user has permission `bit` (4 read, 1 search) on such a file."""
        return self._allows(mode, uid, gid, bit)

    def _allows(self, mode: int, uid: int, gid: int, bit: int) -> bool:
        if self._uid == 0:
            return True
        if uid == self._uid:
            return bool(mode & (bit << 6))
        if gid in self._gids:
            return bool(mode & (bit << 3))
        return bool(mode & bit)

    def path_readable(self, path: str) -> bool:
        """Whether the reader's Unix user may read `path` now (the deepest existing folder, if it is gone)."""
        known = self._cache.get(path)
        if known is None:
            known = self._cache[path] = self._walk(path)
        return known

    def _walk(self, path: str) -> bool:
        ino = ROOT_INODE
        for name in (p for p in path.split("/") if p):
            mode, uid, gid = self._conn.execute("SELECT mode, uid, gid FROM inodes WHERE id=?", (ino,)).fetchone()
            if not self._allows(mode, uid, gid, 1):  # search permission on every folder on the way
                return False
            row = self._conn.execute("SELECT inode FROM dentries WHERE parent=? AND name=?",
                                     (ino, name.encode("utf-8", "surrogateescape"))).fetchone()
            if row is None and "\\" in name:
                # Not valid UTF-8, the journal shows these bytes escaped (`\xff`): which name it was
                # cannot be told from the text, so it stays hidden.
                return False
            if row is None:  # gone: readable if its folder can be listed
                return self._allows(mode, uid, gid, 4)
            ino = row[0]
        mode, uid, gid = self._conn.execute("SELECT mode, uid, gid FROM inodes WHERE id=?", (ino,)).fetchone()
        return stat.S_ISLNK(mode) or self._allows(mode, uid, gid, 4)

