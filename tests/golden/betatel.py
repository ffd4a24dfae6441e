"""Betatel: three windows, one of them with two currencies, and one that fails with 401."""

from __future__ import annotations

from exporter.providers import betatel
from exporter.providers.base import PollError
from exporter.snapshot import TargetKey
from tests.golden import new_snapshot


def exposition() -> bytes:
    snapshot = new_snapshot()
    snapshot.configure(3, [("betatel", "eu", "stats")])
    results = {
        "last5m": betatel.WindowStats(12, 11, (("EUR", 0.24),)),
        "today": betatel.WindowStats(1248, 1201, (("EUR", 24.02), ("USD", 1.5))),
        "daily": betatel.WindowStats(0, 0, (("EUR", 0.0),)),
    }
    for window, result in results.items():
        key = TargetKey("betatel", "eu", "stats", window)
        snapshot.succeeded(key, 60, betatel.stats_families(window, result), 0.1)
    key = TargetKey("betatel", "eu", "stats", "lasth")
    snapshot.failed(key, 60, PollError("auth", "HTTP 401: Invalid API Key"), 0.1)
    snapshot.publish()
    return snapshot.exposition.plain
