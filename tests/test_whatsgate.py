"""WhatsGate against its simulator over real HTTP: values, discovery, errors, and read-only use."""

from __future__ import annotations

import datetime as dt
import logging

import httpx
import pytest

from simulators import Fault, WhatsGateSimulator
from tests.conftest import run_exporter, value, wait_for


def config(sim: WhatsGateSimulator, *, devices: str = "[]", extra: str = "") -> str:
    return f"""
defaults: {{interval: 30s, timeout: 2s}}
whatsgate:
  - account: acme
    base_url: {sim.base_url}
    token: demo-token
    devices: {devices}
    balance: {{interval: 30s}}
    failed_numbers: {{interval: 30s, lookback: 24h}}
{extra}"""


def ready(running) -> None:
    wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")


@pytest.fixture
def sim():
    with WhatsGateSimulator(devices=3, auto=False, rate_limit=None) as sim:
        sim.set_device(
            "15550000001",
            status="connected",
            remaining=900,
            successful_count=120,
            pending=7,
            failed=3,
        )
        sim.set_device("15550000002", status="not connected")
        sim.set_device("15550000003", status="not initialized")
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        for number, hours_ago in (("+491511", 1), ("+491512", 2), ("+491511", 3), ("+491513", 30)):
            sim.add_failure("15550000001", number, now - dt.timedelta(hours=hours_ago))
        yield sim


def test_device_status_balance_and_failed_recipients(sim, caplog):
    caplog.set_level(logging.DEBUG)
    with run_exporter(config(sim)) as running:
        ready(running)
        series = running.scrape()
        text = running.metrics_text()
    assert value(series, "whatsapp_device_connected", device="15550000001") == 1
    assert value(series, "whatsapp_device_connected", device="15550000002") == 0
    assert (
        value(series, "whatsapp_device_status", device="15550000002", status="not_connected") == 1
    )
    assert value(series, "whatsapp_device_status", device="15550000002", status="connected") == 0
    assert (
        value(series, "whatsapp_device_status", device="15550000003", status="not_initialized") == 1
    )
    assert value(series, "whatsapp_device_info", device="15550000001", name="Support 1") == 1
    assert value(series, "whatsapp_balance_remaining_messages", device="15550000001") == 900
    assert (
        value(series, "whatsapp_device_messages", device="15550000001", state="successful") == 120
    )
    assert value(series, "whatsapp_device_messages", device="15550000001", state="pending") == 7
    assert value(series, "whatsapp_device_messages", device="15550000001", state="failed") == 3
    # distinct numbers within the 24h lookback: +491511 (twice), +491512 and whatever the
    # simulator seeded; +491513 is 30h old
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=24)
    recent = [f for f in sim.device("15550000001").failures if f.at >= since]
    assert value(series, "whatsapp_failed_recipients", device="15550000001") == len(
        {f.number for f in recent}
    )
    assert "+491513" not in {f.number for f in recent}
    newest = value(series, "whatsapp_last_failure_timestamp_seconds", device="15550000001")
    assert newest == max(f.at for f in recent).timestamp()
    for labels in ({"provider": "whatsgate", "account": "acme"},):
        assert value(series, "whatsapp_exporter_up", endpoint="devices_status", **labels) == 1
    # customers' numbers go nowhere: not in /metrics, not in any log line
    assert "+49151" not in text
    assert "+49151" not in caplog.text


def test_requests_are_read_only_authenticated_and_well_formed(sim):
    with run_exporter(config(sim)) as running:
        ready(running)
    paths = {r.path for r in sim.requests}
    assert not any(p.startswith("/api/connect") or p.startswith("/api/delete") for p in paths)
    assert {r.method for r in sim.requests} == {"GET"}
    assert all(r.headers.get("access-token") == "demo-token" for r in sim.requests)
    failed = [r for r in sim.requests if r.endpoint == "failed_numbers"]
    assert sorted(r.query["device"] for r in failed) == sim.devices
    for request in failed:
        start = dt.date.fromisoformat(request.query["from"])
        end = dt.date.fromisoformat(request.query["to"])
        assert end > start  # WhatsGate rejects to == from
    # one /devices/status covers every device: status is never asked per device
    assert sum(r.endpoint == "devices_status" for r in sim.requests) == 1
    assert not any(r.endpoint == "status" for r in sim.requests)


def test_configured_devices_only_and_a_missing_one_counts_as_disconnected(sim):
    with run_exporter(config(sim, devices='["15550000001", "15559999999"]')) as running:
        ready(running)
        series = running.scrape()
    assert value(series, "whatsapp_device_connected", device="15550000002") is None
    assert value(series, "whatsapp_device_connected", device="15559999999") == 0
    assert value(series, "whatsapp_device_status", device="15559999999", status="unknown") == 1
    # its balance is asked and answered 404: that target alone is down
    assert value(series, "whatsapp_exporter_up", endpoint="balance", target="15559999999") == 0
    assert value(series, "whatsapp_exporter_up", endpoint="balance", target="15550000001") == 1
    assert (
        value(series, "whatsapp_exporter_poll_errors_total", endpoint="balance", reason="not_found")
        == 1
    )


FAULTS = [
    (Fault.status(401), "auth"),
    (Fault.status(403), "auth"),
    (Fault.status(404), "not_found"),
    (Fault.rate_limited(retry_after=1), "rate_limited"),
    (Fault.status(500), "http_5xx"),
    (Fault.html_502(), "http_5xx"),
    (Fault.status(400, body="<html>bad request</html>"), "http_4xx"),
    (
        Fault.status(422, body={"success": False, "message": "The selected device is invalid."}),
        "provider_error",
    ),
    (Fault.provider_error("Device not found"), "provider_error"),
    (Fault.malformed_json(), "bad_response"),
    (Fault.wrong_shape(), "bad_response"),
    (Fault.timeout(seconds=5), "timeout"),
]


@pytest.mark.parametrize(("fault", "reason"), FAULTS, ids=[r + "-" + f.kind for f, r in FAULTS])
def test_every_error_answer_is_up_0_with_its_reason_and_nothing_else_breaks(sim, fault, reason):
    sim.fail("balance", fault)
    with run_exporter(config(sim), strict=True) as running:
        ready(running)
        series = running.scrape()
    for device in sim.devices:
        assert value(series, "whatsapp_exporter_up", endpoint="balance", target=device) == 0
        assert value(series, "whatsapp_balance_remaining_messages", device=device) is None
    errors = value(series, "whatsapp_exporter_poll_errors_total", endpoint="balance", reason=reason)
    assert errors == 3
    others = [r for r in ("auth", "timeout", "http_5xx", "bad_response") if r != reason]
    for other in others:
        assert not value(
            series, "whatsapp_exporter_poll_errors_total", endpoint="balance", reason=other
        )
    # the other endpoints of the account are untouched
    assert value(series, "whatsapp_exporter_up", endpoint="devices_status", target="") == 1
    for device in sim.devices:
        assert value(series, "whatsapp_exporter_up", endpoint="failed_numbers", target=device) == 1
    assert value(series, "whatsapp_device_connected", device="15550000001") == 1


def test_connection_refused_is_connect():
    with WhatsGateSimulator(devices=1, auto=False) as sim:
        url = sim.base_url
    with run_exporter(
        f"whatsgate:\n  - {{account: gone, base_url: '{url}', token: t}}\n"
    ) as running:
        ready(running)
        series = running.scrape()
    assert value(series, "whatsapp_exporter_up", endpoint="devices_status") == 0
    assert (
        value(
            series,
            "whatsapp_exporter_poll_errors_total",
            endpoint="devices_status",
            reason="connect",
        )
        == 1
    )


@pytest.mark.slow
def test_a_device_that_goes_away_is_forgotten(sim):
    with run_exporter(config(sim).replace("interval: 30s", "interval: 1s")) as running:
        ready(running)
        assert running.wait_for_metric("whatsapp_balance_remaining_messages", device="15550000003")
        sim.remove_device("15550000003")
        wait_for(
            lambda: (
                value(
                    running.scrape(),
                    "whatsapp_exporter_up",
                    endpoint="balance",
                    target="15550000003",
                )
                is None
            ),
            10,
            "the removed device's targets to go",
        )
        series = running.scrape()
    assert value(series, "whatsapp_balance_remaining_messages", device="15550000003") is None
    assert value(series, "whatsapp_device_connected", device="15550000003") is None
    assert value(series, "whatsapp_balance_remaining_messages", device="15550000001") == 900
