"""Shared fixtures, registered once for the whole suite (session-scoped servers
start once however many modules use them)."""

from __future__ import annotations

from tests.support.registry import basic_registry, registry  # noqa: F401
from tests.support.seaweed import seaweed  # noqa: F401
