"""Whole expositions compared byte for byte with tests/golden/*.prom.

Results are fixed objects and the clock is fixed, so these pin the exact names, types, labels, HELP
texts and health series per provider. After an intended change: UPDATE_GOLDEN=1 pytest, then read
the diff of the .prom files before committing it.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.providers import betatel, d7, kaleyra, whatsgate
from exporter.providers.base import PollError
from exporter.snapshot import Snapshot, TargetKey
from exporter.tracking import Totals
from tests.conftest import GOLDEN, require_tool

NOW = 1_700_000_000.0


def _snapshot() -> Snapshot:
    snapshot = Snapshot("test", clock=lambda: NOW)
    return snapshot


def whatsgate_exposition() -> bytes:
    snapshot = _snapshot()
    snapshot.configure(
        3, [("whatsgate", "acme", e) for e in ("devices_status", "balance", "failed_numbers")]
    )
    devices = whatsgate.Devices(
        devices=(
            whatsgate.Device("15550000001", "Support", "inst-1", "connected", True),
            whatsgate.Device("15550000002", "Sales", "inst-2", "not_connected", False),
        ),
        missing=("15550000003",),
    )
    key = TargetKey("whatsgate", "acme", "devices_status", "")
    snapshot.succeeded(key, 60, whatsgate.devices_families("", devices), 0.125)
    key = TargetKey("whatsgate", "acme", "balance", "15550000001")
    balance = whatsgate.Balance(remaining=1000, successful=500, pending=50, failed=10)
    snapshot.succeeded(key, 300, whatsgate.balance_families(key.target, balance), 0.25)
    key = TargetKey("whatsgate", "acme", "balance", "15550000002")
    snapshot.failed(key, 300, PollError("not_found", "HTTP 404: Device not found"), 0.5)
    key = TargetKey("whatsgate", "acme", "failed_numbers", "15550000001")
    failed = whatsgate.FailedRecipients(2, dt.datetime(2023, 11, 14, 21, 0, tzinfo=dt.UTC))
    snapshot.succeeded(key, 300, whatsgate.failed_families(key.target, failed), 0.375)
    key = TargetKey("whatsgate", "acme", "failed_numbers", "15550000002")
    snapshot.succeeded(
        key, 300, whatsgate.failed_families(key.target, whatsgate.FailedRecipients(0, None)), 0.5
    )
    snapshot.publish()
    return snapshot.exposition.plain


def betatel_exposition() -> bytes:
    snapshot = _snapshot()
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


SEED_PAYLOAD = {
    "RESPONSE": {
        "code": "WS201",
        "message": "Requested processed successfully",
        "error": {},
        "data": {
            "stats": {
                "app": {
                    "callback_queue_size": {
                        "data": [{"value": 0}],
                        "help": "Current callback queue size",
                        "type": "gauge",
                    },
                    "callback_requests_duration_ms_count": {
                        "data": [
                            {
                                "labels": {"result": "success", "type": "inbound_message"},
                                "value": 4353,
                            },
                            {"labels": {"result": "99", "type": "status_change"}, "value": 359},
                            {
                                "labels": {"result": "success", "type": "status_change"},
                                "value": 545780,
                            },
                        ],
                        "help": "Callback requests duration count",
                        "type": "counter",
                    },
                    "callback_requests_duration_ms_sum": {
                        "data": [
                            {
                                "labels": {"result": "success", "type": "inbound_message"},
                                "value": 870600,
                            },
                            {"labels": {"result": "99", "type": "status_change"}, "value": 71800},
                            {
                                "labels": {"result": "success", "type": "status_change"},
                                "value": 109156000,
                            },
                        ],
                        "help": "Callback requests duration sum",
                        "type": "counter",
                    },
                    "out_message_status": {
                        "data": [{"labels": {"status": "delivered", "number": "x"}, "value": 42}],
                        "type": "counter",
                    },
                    "weird-metric": {"data": [{"value": 7}], "type": "histogram"},
                },
                "db": {
                    "host1:abc": {
                        "db_pending_messages": {"data": [{"value": 3}], "type": "gauge"},
                    },
                    "host2:def": {},
                },
            }
        },
    }
}


def kaleyra_exposition() -> bytes:
    snapshot = _snapshot()
    snapshot.configure(3, [("kaleyra", "main", "monitor_stats")])
    key = TargetKey("kaleyra", "main", "monitor_stats", "+12025550100")
    stats = kaleyra.monitor_stats(SEED_PAYLOAD)
    snapshot.succeeded(key, 60, kaleyra.translate(key.target, stats), 0.2)
    key = TargetKey("kaleyra", "main", "monitor_stats", "+12025550101")
    snapshot.failed(key, 60, PollError("provider_error", "WS500: somthing went wrong !!!"), 0.2)
    snapshot.publish()
    return snapshot.exposition.plain


def d7_exposition() -> bytes:
    snapshot = _snapshot()
    snapshot.configure(3, [("d7", "prod", "report")])
    snapshot.succeeded(TargetKey("d7", "prod", "report", ""), 5, [], 0.05)
    totals = Totals(
        messages={
            ("sent", "marketing", "template"): 10,
            ("delivered", "marketing", "template"): 8,
            ("read", "marketing", "template"): 5,
            ("un_delivered", "utility", "text"): 1,
        },
        buckets={"delivered": [0, 2, 3, 1] + [0] * 11 + [2], "read": [0] * 8 + [5] + [0] * 7},
        sums={"delivered": 200123.5, "read": 3000.0},
        states={"pending": 7, "done": 3, "expired": 1},
    )
    snapshot.set_extra("d7", d7.ledger_families({"prod": totals}))
    snapshot.publish()
    return snapshot.exposition.plain


CASES = {
    "d7": d7_exposition,
    "whatsgate": whatsgate_exposition,
    "betatel": betatel_exposition,
    "kaleyra": kaleyra_exposition,
}


@pytest.mark.parametrize("provider", sorted(CASES))
def test_exposition_matches_golden_file(provider):
    path = GOLDEN / f"{provider}.prom"
    produced = CASES[provider]()
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(produced)
    assert produced == path.read_bytes()


@pytest.mark.parametrize("provider", sorted(CASES))
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
    snapshot = _snapshot()
    assert snapshot.publish() is False
    before = snapshot.exposition
    snapshot.configure(3, [("betatel", "eu", "stats")])
    assert snapshot.publish() is True
    assert snapshot.exposition is not before
    assert snapshot.publish() is False
