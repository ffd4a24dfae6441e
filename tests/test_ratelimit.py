"""The request budget, measured where it matters: at the provider's side of the wire."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from exporter.ratelimit import Paused, RequestBudget
from simulators import Fault, WhatsGateSimulator
from tests.conftest import run_exporter, wait_for


def busiest_window(times: list[float], period: float) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while times[start] <= moment - period:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.mark.slow  # a real 60 s window
def test_30_devices_at_60_per_minute_never_exceed_60_in_any_60s_window():
    """At start, 30 devices want 1 + 30 + 30 requests: the 61st must wait for the window."""
    with WhatsGateSimulator(devices=30, auto=False, rate_limit=60) as sim:
        config = f"""
whatsgate:
  - account: big
    base_url: {sim.base_url}
    token: demo-token
    rate_limit: 60/m
    interval: 20s
    balance: {{interval: 20s}}
    failed_numbers: {{interval: 20s}}
"""
        started = time.time()
        with run_exporter(config) as running:
            wait_for(lambda: len(sim.requests) >= 61, 90, "61 requests at the simulator")
            refused = sum(
                v
                for (name, labels), v in running.scrape().items()
                if name == "whatsapp_exporter_poll_errors_total"
                and ("reason", "rate_limited") in labels
            )
        times = [r.time for r in sim.requests]
    assert busiest_window(times, 60.0) == 60
    # the budget throttles without starving: the 61st request goes out as soon as the window allows
    sixty_first = sorted(times)[60]
    assert sixty_first - started < 65
    assert sixty_first - sorted(times)[0] >= 60
    # the simulator enforces WhatsGate's limit too: it never had to refuse one
    assert refused == 0


@pytest.mark.slow
def test_429_retry_after_delays_the_accounts_next_request():
    with WhatsGateSimulator(devices=3, auto=False, rate_limit=None) as sim:
        sim.fail("balance", Fault.rate_limited(retry_after=2), times=1)
        # one request at a time, so "the next request" is one sent after the 429 arrived
        config = f"""
whatsgate:
  - account: acme
    base_url: {sim.base_url}
    token: demo-token
    concurrency: 1
"""
        with run_exporter(config) as running:
            wait_for(
                lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness"
            )
        requests = sorted(sim.requests, key=lambda r: r.time)
    refused = next(i for i, r in enumerate(requests) if r.endpoint == "balance")
    following = requests[refused + 1]
    assert following.time - requests[refused].time >= 2.0
    # and it then carries on: every device's balance and failed numbers were asked
    assert sum(r.endpoint == "balance" for r in requests) == 3
    assert sum(r.endpoint == "failed_numbers" for r in requests) == 3


@pytest.mark.parametrize(("interval", "warned"), [("1s", True), ("60s", False)])
def test_an_oversubscribed_budget_is_named_in_the_log(interval, warned, caplog):
    caplog.set_level(logging.WARNING, logger="exporter.scheduler")
    with WhatsGateSimulator(devices=10, auto=False, rate_limit=None) as sim:
        config = f"""
whatsgate:
  - account: busy
    base_url: {sim.base_url}
    token: demo-token
    rate_limit: 600/m
    interval: {interval}
    balance: {{interval: {interval}}}
    failed_numbers: {{interval: {interval}}}
"""
        with run_exporter(config) as running:
            wait_for(
                lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness"
            )
    found = [r.fields for r in caplog.records if "rate_limit allows" in r.getMessage()]
    if warned:  # 1 + 10 + 10 targets a second: 1260 a minute
        assert found == [
            {
                "provider": "whatsgate",
                "account": "busy",
                "needed": "1260/60s",
                "rate_limit": "600/60s",
            }
        ]
    else:
        assert found == []


def test_budget_counts_a_slot_until_its_answer_arrives():
    """With 2 slots per 0.5s and answers that take 0.2s, the third request starts no earlier
    than 0.5s after the first answer came back, not 0.5s after the first request left."""

    async def scenario() -> list[tuple[float, float]]:
        budget = RequestBudget(2, 0.5)
        spans: list[tuple[float, float]] = []

        async def request() -> None:
            async with budget.slot():
                start = time.monotonic()
                await asyncio.sleep(0.2)
                spans.append((start, time.monotonic()))

        await asyncio.gather(*(request() for _ in range(4)))
        return sorted(spans)

    spans = asyncio.run(scenario())
    assert spans[2][0] >= min(spans[0][1], spans[1][1]) + 0.5 - 0.01
    assert spans[1][0] - spans[0][0] < 0.05  # the first two go at once


def test_block_for_holds_every_request():
    async def scenario() -> float:
        budget = RequestBudget(100, 60)
        budget.block_for(0.3)
        start = time.monotonic()
        async with budget.slot():
            return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.29


def test_a_pause_longer_than_the_patience_fails_at_once_and_a_shorter_one_waits():
    async def scenario() -> tuple[float, float]:
        budget = RequestBudget(100, 60)
        budget.block_for(3600)
        start = time.monotonic()
        with pytest.raises(Paused) as paused:
            async with budget.slot(patience=10):
                pass
        refused = time.monotonic() - start
        assert 3599 < paused.value.seconds <= 3600
        assert budget.usage() == (0, pytest.approx(3600, abs=1))  # nothing was taken
        short = RequestBudget(100, 60)
        short.block_for(0.2)
        start = time.monotonic()
        async with short.slot(patience=10):
            return refused, time.monotonic() - start

    refused, waited = asyncio.run(scenario())
    assert refused < 0.05 and waited >= 0.19


@pytest.mark.slow
def test_an_account_keeps_concurrency_requests_in_flight_never_more():
    """8 devices whose balance answers take 0.5 s, 4 in flight: two waves of 4, not 8 in a row
    (4 s) nor 8 at once."""
    with WhatsGateSimulator(devices=8, auto=False, rate_limit=None) as sim:
        sim.fail("balance", Fault.latency(0.5))
        config = f"""
whatsgate:
  - account: acme
    base_url: {sim.base_url}
    token: demo-token
    concurrency: 4
    interval: 1h
    balance: {{interval: 1h}}
    failed_numbers: {{interval: 1h}}
"""
        with run_exporter(config) as running:
            wait_for(
                lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness"
            )
        arrivals = sorted(r.time for r in sim.requests if r.endpoint == "balance")
    assert len(arrivals) == 8
    first_wave, second_wave = arrivals[:4], arrivals[4:]
    assert first_wave[-1] - first_wave[0] < 0.3  # sent together
    assert second_wave[0] - first_wave[0] >= 0.45  # each waited for one of the first to answer
    assert second_wave[-1] - first_wave[0] < 1.5  # not one after the other (that is 3.5 s)
