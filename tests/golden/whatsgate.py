"""WhatsGate: two devices (one connected), a balance that fails with 404, failed recipients."""

from __future__ import annotations

import datetime as dt

from exporter.providers import whatsgate
from exporter.providers.base import PollError
from exporter.snapshot import TargetKey
from tests.golden import new_snapshot


def exposition() -> bytes:
    snapshot = new_snapshot()
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
