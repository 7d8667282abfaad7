"""One escaping rule for text that came from a file (trace metadata, tensor names, records, results lines,
file names) before it reaches a terminal: `escape`."""

from __future__ import annotations

import unicodedata

__all__ = ["escape"]


def escape(text, limit: int = 400) -> str:
    """``text`` (any object: ``str()`` of it) with every control, format, separator-other-than-space or
    unassigned character written as a Python escape (``\\x1b``, ``\\n``, ``\\u202e``; a backslash stays a
    backslash), cut to ``limit`` characters (``...`` appended). The result is one printable line."""
    s = text if isinstance(text, str) else str(text)
    cut = len(s) > limit
    s = s[:limit]
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if cat[0] in "CZ" and ch != " ":
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out) + ("..." if cut else "")
