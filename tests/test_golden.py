"""Whole expositions compared byte for byte with tests/golden/*.prom, one per provider kit: each
built by tests/golden/<provider>.py.

Results are fixed objects and the clock is fixed, so these pin the exact names, types, labels, HELP
texts and health series per provider. After an intended change: UPDATE_GOLDEN=1 pytest, then read
the diff of the .prom files before committing it.
"""

from __future__ import annotations

import importlib
import os
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.providers import betatel
from exporter.providers.base import PollError
from exporter.snapshot import Snapshot, TargetKey
from simulators import KITS
from tests.conftest import GOLDEN, require_tool
from tests.golden import NOW, new_snapshot


def exposition(provider: str) -> bytes:
    return importlib.import_module(f"tests.golden.{provider}").exposition()


@pytest.mark.parametrize("provider", sorted(KITS))
def test_exposition_matches_golden_file(provider):
    path = GOLDEN / f"{provider}.prom"
    produced = exposition(provider)
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(produced)
    assert produced == path.read_bytes()


@pytest.mark.parametrize("provider", sorted(KITS))
@pytest.mark.processes
def test_golden_files_pass_promtool(provider):
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=(GOLDEN / f"{provider}.prom").read_bytes(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""


def test_stale_target_values_leave_but_up_stays():
    clock = [NOW]
    snapshot = Snapshot("test", clock=lambda: clock[0])
    snapshot.configure(2, [("betatel", "eu", "stats")])
    key = TargetKey("betatel", "eu", "stats", "today")
    snapshot.succeeded(key, 60, betatel.stats_families("today", betatel.WindowStats(1, 1, ())), 0.1)
    clock[0] += 90
    snapshot.failed(key, 60, PollError("timeout", "no answer within 10s"), 10)
    snapshot.expire()
    snapshot.publish()
    assert b'whatsapp_stats_requests{account="eu"' in snapshot.exposition.plain
    clock[0] += 31  # 121s since the last success: more than 2 intervals
    snapshot.expire()
    snapshot.publish()
    text = snapshot.exposition.plain
    assert b"whatsapp_stats_requests" not in text
    assert (
        b'whatsapp_exporter_up{account="eu",endpoint="stats",provider="betatel",target="today"} 0.0'
        in text
    )
    assert b"whatsapp_exporter_last_success_timestamp_seconds" in text
    snapshot.succeeded(key, 60, betatel.stats_families("today", betatel.WindowStats(2, 2, ())), 0.1)
    snapshot.expire()
    snapshot.publish()
    assert b"whatsapp_stats_requests" in snapshot.exposition.plain


def test_expiry_sees_a_shorter_deadline_that_came_after_it_looked():
    """expire() skips its walk until the earliest deadline it knows: a target polled more often
    that came later, and a lower stale_after from a reload, must still be seen in time."""
    clock = [NOW]
    snapshot = Snapshot("test", clock=lambda: clock[0])
    snapshot.configure(3, [("betatel", "eu", "stats")])
    slow = TargetKey("betatel", "eu", "stats", "today")
    fast = TargetKey("betatel", "eu", "stats", "yesterday")
    stats = betatel.WindowStats(1, 1, ())
    snapshot.succeeded(slow, 60, betatel.stats_families("today", stats), 0.1)
    clock[0] += 1
    snapshot.expire()  # the slow one's values stay until NOW + 180
    clock[0] += 1
    snapshot.succeeded(fast, 5, betatel.stats_families("yesterday", stats), 0.1)

    def windows() -> set[str]:
        snapshot.publish()
        return {
            s.labels["window"]
            for f in text_string_to_metric_families(snapshot.exposition.plain.decode())
            if f.name == "whatsapp_stats_requests"
            for s in f.samples
        }

    clock[0] += 14  # 14 s since the fast one's success: under 3 x 5 s
    snapshot.expire()
    assert windows() == {"today", "yesterday"}
    clock[0] += 2
    snapshot.expire()
    assert windows() == {"today"}
    clock[0] = NOW + 61
    snapshot.configure(1, [("betatel", "eu", "stats")])  # a reload: stale after one interval
    snapshot.expire()
    assert windows() == set()


def test_publish_renders_only_after_a_change():
    snapshot = new_snapshot()
    assert snapshot.publish() is False
    before = snapshot.exposition
    snapshot.configure(3, [("betatel", "eu", "stats")])
    assert snapshot.publish() is True
    assert snapshot.exposition is not before
    assert snapshot.publish() is False
