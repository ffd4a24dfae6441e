"""Golden expositions: tests/golden/<provider>.py builds one from fixed results at a fixed clock,
and tests/golden/<provider>.prom holds the bytes it must produce (tests/test_golden.py)."""

from __future__ import annotations

from exporter.snapshot import Snapshot

NOW = 1_700_000_000.0


def new_snapshot() -> Snapshot:
    return Snapshot("test", clock=lambda: NOW)
