"""How long work reports progress without knowing how it is shown.

The build calls these hooks; the CLI renders a bar on a terminal, tests and
``--quiet`` pass :class:`NullProgress`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def phase(self, label: str, total: int | None = None) -> None:
        """Start a named phase; ``total`` bytes if known."""

    def advance(self, n: int) -> None:
        """``n`` more bytes of the current phase are done."""

    def close(self) -> None:
        """The work is over (successfully or not)."""


class NullProgress:
    def phase(self, label: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
