"""What every `deskfs` command shares: safe human output, sizes and tables, the argument parser's one-line
errors, and talking to a workspace's daemon over its control socket.

Owns escaping what a name could use to forge a line or command a terminal (every human line goes through
`say`/`shown`; `--json` stays exact), and the request/answer protocol of the control socket as a client.
Must never: import anything slow (every command imports this); print a traceback for anything a user did.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from deskfs import mounts
from deskfs.errors import EXIT_REFUSED, EXIT_USAGE, DeskfsError
from deskfs.layout import control_socket_path


# What a terminal acts on, or what breaks or reorders a line: C0 and C1 controls, DEL, the Unicode line
# and paragraph separators, the bidirectional marks, embeddings, overrides and isolates; and lone
# surrogates (bytes of a name that is not UTF-8, which print could not even encode).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, as Python decodes names (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shown(text: object) -> str:
    """`text` safe for a human line: each control character as a visible escape (`\\n`, `\\x1b`, `\\u202e`),
    so a name can neither forge a line nor send the terminal a command. `--json` prints names exactly."""
    text = str(text)
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def say(*parts: object, **kwargs: Any) -> None:
    """print() for every human line: what it shows goes through `shown`."""
    print(*(shown(part) for part in parts), **kwargs)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for every usage error
        raise DeskfsError(f"{message} (see: {self.prog} --help)", EXIT_USAGE)


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def printed_as_json_or_none(items: list[dict], as_json: bool, none_message: str) -> bool:
    """Print a listing as JSON, or say there is nothing; False when a table is still to be printed."""
    if as_json:
        print(json.dumps(items, indent=2))
    elif not items:
        print(none_message)
    return as_json or not items


def print_table(rows: list[tuple[str, ...]]) -> None:
    rows = [tuple(shown(cell) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        say("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def connect(mount: mounts.Mount, request: dict) -> Any:
    """A connection to the workspace's daemon with `request` sent; the caller closes it."""
    import socket

    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.connect(control_socket_path(mount.store))
        control.sendall(json.dumps(request).encode() + b"\n")
    except OSError as exc:
        control.close()
        raise DeskfsError(f"cannot reach the deskfs daemon of {mount.mountpoint}: {exc.strerror}") from None
    return control


def answers(control: Any) -> Any:
    """The daemon's answer lines; a refusal becomes a DeskfsError (exit 2 for bad input, else 1)."""
    for line in control.makefile("rb"):
        try:
            answer = json.loads(line)
        except ValueError:
            raise DeskfsError(f"the deskfs daemon answered something unreadable: {line[:80]!r}") from None
        if "error" in answer:
            raise DeskfsError(answer["error"], EXIT_USAGE if answer.get("usage") else EXIT_REFUSED)
        yield answer


def ask_on(control: Any, mount: mounts.Mount) -> dict:
    for answer in answers(control):
        return answer
    raise DeskfsError(f"the deskfs daemon of {mount.mountpoint} closed the connection")


def ask(mount: mounts.Mount, request: dict) -> dict:
    with connect(mount, request) as control:
        return ask_on(control, mount)
