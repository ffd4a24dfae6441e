"""Kaleyra: the seed's stats answer translated for one number, a provider error for another."""

from __future__ import annotations

from exporter.providers import kaleyra
from exporter.providers.base import PollError
from exporter.snapshot import TargetKey
from tests.golden import new_snapshot

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


def exposition() -> bytes:
    snapshot = new_snapshot()
    snapshot.configure(3, [("kaleyra", "main", "monitor_stats")])
    key = TargetKey("kaleyra", "main", "monitor_stats", "+12025550100")
    stats = kaleyra.monitor_stats(SEED_PAYLOAD)
    snapshot.succeeded(key, 60, kaleyra.translate(key.target, stats), 0.2)
    key = TargetKey("kaleyra", "main", "monitor_stats", "+12025550101")
    snapshot.failed(key, 60, PollError("provider_error", "WS500: somthing went wrong !!!"), 0.2)
    snapshot.publish()
    return snapshot.exposition.plain
