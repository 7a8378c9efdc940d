"""containerd's filter syntax, for the snapshots List call (``ctr snapshots ls``,
the CRI plugin and the garbage collector walk snapshots through it).

A filter is selectors joined by ``,`` (all must hold); a request's filters are
alternatives (any may hold; none means all). A selector is a field path, optionally
followed by an operator (``==``, ``!=``, ``~=`` a regular expression) and a value; a
path alone means the field is present and not empty. Paths and values may be quoted
with double quotes. Snapshot fields are containerd's: ``name``, ``parent``, ``kind``
(``active``, ``view``, ``committed``) and ``labels.KEY``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from imagefs.snapshotter.errors import InvalidArgument

_FIELD = re.compile(r"[A-Za-z0-9_/-]+")  # a dotted label key must be quoted
_VALUE = re.compile(r"[^,\s\"]+")
Fields = Callable[[list[str]], str | None]


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None
    value: str

    def matches(self, fields: Fields) -> bool:
        got = fields(list(self.path))
        if self.op is None:
            return bool(got)
        if self.op == "==":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        return got is not None and re.search(self.value, got) is not None


def _quoted(text: str, i: int, what: str) -> tuple[str, int]:
    out, i = [], i + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise InvalidArgument(f"filter {what!r}: unterminated quote")


def parse(text: str) -> list[Selector]:
    """One filter string: its selectors, all of which must hold."""
    selectors: list[Selector] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        path: list[str] = []
        while True:  # field ('.' field)*
            if i < n and text[i] == '"':
                part, i = _quoted(text, i, text)
            else:
                m = _FIELD.match(text, i)
                if not m:
                    raise InvalidArgument(f"filter {text!r}: expected a field name at position {i}")
                part, i = m.group(), m.end()
            path.append(part)
            if i < n and text[i] == ".":
                i += 1
                continue
            break
        while i < n and text[i].isspace():
            i += 1
        op, value = None, ""
        if text.startswith(("==", "!=", "~="), i):
            op, i = text[i:i + 2], i + 2
            while i < n and text[i].isspace():
                i += 1
            if i < n and text[i] == '"':
                value, i = _quoted(text, i, text)
            else:
                m = _VALUE.match(text, i)
                if not m:
                    raise InvalidArgument(f"filter {text!r}: expected a value after {op}")
                value, i = m.group(), m.end()
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as e:
                    raise InvalidArgument(f"filter {text!r}: bad regular expression {value!r}: {e}") from None
        selectors.append(Selector(tuple(path), op, value))
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return selectors
        if text[i] != ",":
            raise InvalidArgument(f"filter {text!r}: unexpected {text[i]!r} at position {i}")
        i += 1


def matcher(filters: list[str]) -> Callable[[Fields], bool]:
    """A predicate over a snapshot's fields: true if any filter holds (or none is given)."""
    parsed = [parse(f) for f in filters if f.strip()]
    if not parsed:
        return lambda fields: True
    return lambda fields: any(all(s.matches(fields) for s in sel) for sel in parsed)
