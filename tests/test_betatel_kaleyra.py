"""Betatel and Kaleyra against their simulators over real HTTP."""

from __future__ import annotations

import datetime as dt
import logging
from zoneinfo import ZoneInfo

import httpx
import pytest

from simulators import Fault
from simulators.betatel import BetatelSimulator
from simulators.kaleyra import KaleyraSimulator
from tests.conftest import run_exporter, value, values, wait_for


def ready(running) -> None:
    wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")


def betatel_config(sim: BetatelSimulator, windows: str) -> str:
    return f"""
betatel:
  - account: eu
    base_url: {sim.base_url}
    api_key: demo-key
    account_id: demo-account
    windows: {windows}
    timezone: Europe/Berlin
"""


def test_betatel_windows_values_and_request_bodies():
    with BetatelSimulator(auto=False, history_hours=0) as sim:
        now = dt.datetime.now(dt.UTC)
        sim.record_messages(10, at=now - dt.timedelta(minutes=2), transactions=9)
        sim.record_messages(5, at=now - dt.timedelta(minutes=30), transactions=5)
        sim.record_messages(7, at=now - dt.timedelta(hours=3), transactions=0)
        with run_exporter(betatel_config(sim, "[last5m, lasth, last24h, daily]")) as running:
            ready(running)
            series = running.scrape()
        bodies = {r.json()["type"]: r for r in sim.requests}
    assert value(series, "whatsapp_stats_requests", window="last5m") == 10
    assert value(series, "whatsapp_stats_transactions", window="last5m") == 9
    assert value(series, "whatsapp_stats_amount", window="last5m", currency="EUR") == pytest.approx(
        0.18
    )
    assert value(series, "whatsapp_stats_requests", window="lasth") == 15
    assert value(series, "whatsapp_stats_requests", window="last24h") == 22
    assert value(series, "whatsapp_exporter_up", endpoint="stats", target="daily") == 1
    # rolling windows send only their type; bucketed ones the running bucket, Berlin's day
    assert bodies["last5m"].json() == {"type": "last5m", "timezone": "Europe/Berlin"}
    daily = bodies["daily"].json()
    berlin_midnight = dt.datetime.now(ZoneInfo("Europe/Berlin")).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    start = dt.datetime.fromisoformat(daily["start_time"].replace("Z", "+00:00"))
    end = dt.datetime.fromisoformat(daily["end_time"].replace("Z", "+00:00"))
    assert start == berlin_midnight
    assert end == berlin_midnight + dt.timedelta(days=1) - dt.timedelta(milliseconds=1)
    assert all(r.method == "POST" and r.headers["x-api-key"] == "demo-key" for r in bodies.values())


def test_betatel_empty_answer_is_zero_not_an_error():
    with BetatelSimulator(auto=False, empty=True) as sim:
        with run_exporter(betatel_config(sim, "[today]")) as running:
            ready(running)
            series = running.scrape()
    assert value(series, "whatsapp_exporter_up", target="today") == 1
    assert value(series, "whatsapp_stats_requests", window="today") == 0
    assert value(series, "whatsapp_stats_amount", window="today", currency="EUR") == 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.status(401), "auth"),
        (Fault.status(400), "provider_error"),
        (Fault.status(500), "http_5xx"),
        (Fault.wrong_shape(), "bad_response"),
    ],
)
def test_betatel_errors(fault, reason):
    with BetatelSimulator(auto=False) as sim:
        sim.fail("stats", fault)
        with run_exporter(betatel_config(sim, "[today, lasth]")) as running:
            ready(running)
            series = running.scrape()
    assert [v for _, v in values(series, "whatsapp_exporter_up")] == [0, 0]
    assert value(series, "whatsapp_exporter_poll_errors_total", reason=reason) == 2


def kaleyra_config(sim: KaleyraSimulator, numbers: str, extra: str = "") -> str:
    return f"""
kaleyra:
  - account: main
    base_url: {sim.base_url}
    numbers: {numbers}
{extra}"""


def test_kaleyra_translates_the_live_answer_per_number():
    numbers = ["+12025550100", "+12025550101"]
    with KaleyraSimulator(numbers=numbers, auto=False, required_headers={"api-key": "k1"}) as sim:
        sim.set_gauge("+12025550100", "callback_queue_size", 500)
        config = kaleyra_config(
            sim, '["+12025550100", "+12025550101"]', "    headers: {api-key: k1}\n"
        )
        with run_exporter(config) as running:
            ready(running)
            series = running.scrape()
        requests = list(sim.requests)
    assert value(series, "whatsapp_client_app_callback_queue_size", number="+12025550100") == 500
    assert (
        value(series, "whatsapp_client_app_callback_queue_size", number="+12025550101") is not None
    )
    summary = values(
        series,
        "whatsapp_client_app_callback_requests_duration_seconds_count",
        number="+12025550100",
    )
    assert summary and all("result" in labels and "type" in labels for labels, _ in summary)
    assert value(series, "whatsapp_client_db_pending_messages", number="+12025550100") is not None
    assert {r.headers["accept"] for r in requests} == {"application/json"}
    assert {r.headers["api-key"] for r in requests} == {"k1"}
    assert sorted(r.path for r in requests) == [
        "/v1/wamonitor/stats/+12025550100",
        "/v1/wamonitor/stats/+12025550101",
    ]


@pytest.mark.parametrize(("wrapper", "multinode"), [(False, False), (True, True)])
def test_kaleyra_wrapper_and_per_node_nesting(wrapper, multinode):
    with KaleyraSimulator(auto=False, wrapper=wrapper, multinode=multinode) as sim:
        with run_exporter(kaleyra_config(sim, '["+12025550100"]')) as running:
            ready(running)
            series = running.scrape()
    pending = values(series, "whatsapp_client_db_pending_messages")
    assert pending
    assert all(("node" in labels) == multinode for labels, _ in pending)
    assert value(series, "whatsapp_client_app_pending_messages") is not None
    assert all(
        "node" not in labels for labels, _ in values(series, "whatsapp_client_app_pending_messages")
    )


def test_kaleyra_ws500_for_an_unknown_number_names_its_code(caplog):
    caplog.set_level(logging.WARNING, logger="exporter")
    with KaleyraSimulator(numbers=["+12025550100"], auto=False) as sim:
        with run_exporter(kaleyra_config(sim, '["+12025550100", "+12025550199"]')) as running:
            ready(running)
            series = running.scrape()
    assert value(series, "whatsapp_exporter_up", target="+12025550199") == 0
    assert value(series, "whatsapp_exporter_up", target="+12025550100") == 1
    failure = [
        r for r in caplog.records if getattr(r, "fields", {}).get("target") == "+12025550199"
    ]
    assert failure and "WS500" in failure[0].fields["error"]


def test_kaleyra_ws406_is_a_provider_error():
    with KaleyraSimulator(numbers=["+12025550100"], auto=False) as sim:
        config = kaleyra_config(sim, '["+12025550100"]', "    headers: {Accept: text/html}\n")
        with run_exporter(config) as running:
            ready(running)
            series = running.scrape()
    assert value(series, "whatsapp_exporter_poll_errors_total", reason="provider_error") == 1
