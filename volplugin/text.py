"""Text from containers and stores made safe to print on a terminal.

Hook output, option values and names recorded in the state or a backup document can
hold terminal escape sequences and other control characters; `printable` shows them
as Python escapes (`\\x1b`, `\\n`) so that nothing reaches the terminal as a control.
"""

from __future__ import annotations

import unicodedata


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """`text` as a string in which every control, format or separator character is escaped.

    Plain spaces stay; a backslash is doubled so that escapes cannot be faked.
    """
    out = []
    for char in str(text):
        if char == "\\":
            out.append("\\\\")
        elif char == " " or unicodedata.category(char)[0] not in "CZ":
            out.append(char)
        else:
            out.append(_escape(char))
    return "".join(out)
