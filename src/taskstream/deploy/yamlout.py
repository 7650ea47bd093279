"""A small YAML writer for the documents ``taskstream deploy`` renders (no YAML library at run time).

Renderers build plain data (dicts, lists, strings, numbers, booleans, ``None``) and this writes it in block
style: readable, diff-friendly, and parsed back to the same data by any YAML 1.1 or 1.2 parser (the tests
check that round trip). Strings stay plain only when no parser could read them as anything else; the rest
are double-quoted with JSON escapes (valid YAML); multi-line strings become literal blocks (``|``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dump", "dump_all"]

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./@+-]*$")
# Words YAML 1.1 reads as booleans or null, whatever their case.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _is_block_text(value: Any) -> bool:
    return (
        isinstance(value, str)
        and "\n" in value
        and not value.startswith((" ", "\n"))
        and all(not line.endswith((" ", "\t")) for line in value.split("\n"))
        and "\r" not in value
    )


def _block_text(value: str, indent: int) -> list[str]:
    body = value[:-1] if value.endswith("\n") else value
    chomp = "" if value.endswith("\n") and not value.endswith("\n\n") else "-" if not value.endswith("\n") else "+"
    pad = " " * indent
    return [f"|{chomp}", *[(pad + line) if line else "" for line in body.split("\n")]]


def _emit(value: Any, indent: int, out: list[str], prefix: str) -> None:
    """Append ``value`` to ``out``; ``prefix`` is what stands before it on its first line (key or dash)."""
    pad = " " * indent
    if isinstance(value, Mapping):
        if not value:
            out.append(f"{prefix}{{}}")
            return
        if prefix.strip() and not prefix.endswith("- "):
            out.append(prefix.rstrip())
            first_pad = pad
        else:
            first_pad = prefix  # a mapping inside a list item starts on the dash's line
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError("YAML keys must be strings here")
            lead = first_pad if i == 0 else pad
            _emit(item, indent + 2, out, f"{lead}{_scalar(key)}: ")
        return
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            out.append(f"{prefix}[]")
            return
        inline = not prefix.strip() or prefix.endswith("- ")
        if not inline:
            out.append(prefix.rstrip())
        for i, item in enumerate(value):
            lead = prefix if i == 0 and inline else pad
            _emit(item, indent + 2, out, f"{lead}- ")
        return
    if _is_block_text(value):
        header, *lines = _block_text(value, indent)
        out.append(f"{prefix}{header}")
        out.extend(lines)
        return
    out.append(f"{prefix}{_scalar(value)}")


def dump(data: Mapping[str, Any]) -> str:
    """One YAML document (no ``---``) for a mapping.

    Example:
        >>> print(dump({"name": "window", "replicas": 3, "args": ["--stage", "window"]}), end="")
        name: window
        replicas: 3
        args:
          - "--stage"
          - window
    """
    out: list[str] = []
    _emit(data, 0, out, "")
    return "\n".join(out) + "\n"


def dump_all(documents: Sequence[Mapping[str, Any]]) -> str:
    """Several YAML documents separated by ``---`` lines."""
    return "".join(f"---\n{dump(doc)}" for doc in documents)
