"""The pacer: fewer provider requests in flight while the event loop lags, never fewer than the
floor, and back up once the loop keeps up."""

from __future__ import annotations

import asyncio
import time

import pytest

from exporter.pacer import Pacer


async def _hold(pacer: Pacer, release: asyncio.Event, entered: list[int]) -> None:
    async with pacer:
        entered.append(pacer.in_flight)
        await release.wait()


def test_a_lagging_loop_lowers_the_limit_in_proportion_and_never_below_the_floor():
    pacer = Pacer(target=0.02, floor=2)
    pacer.in_flight = 400
    pacer.limit = 4096
    pacer.observe(0.2)  # one late tick: a spike, no change
    assert pacer.limit == 4096
    pacer.observe(0.2)  # still ten times the target: a tenth of what was in flight
    assert pacer.limit == 40
    pacer.in_flight = 40
    pacer.observe(2.0)  # judged by the smaller of the two: 0.2 again
    assert pacer.limit == 4
    pacer.observe(2.0)
    assert pacer.limit == 2  # at most a tenth per step, and never below the floor
    pacer.observe(2.0)
    assert pacer.limit == 2
    pacer.observe(0.001)
    pacer.observe(0.5)  # a spike after a good tick
    assert pacer.limit == 2


def test_the_limit_rises_only_while_requests_wait_and_the_loop_keeps_up():
    async def scenario() -> None:
        pacer = Pacer(target=0.02, floor=2)
        pacer.limit = 2
        release = asyncio.Event()
        entered: list[int] = []
        tasks = [asyncio.create_task(_hold(pacer, release, entered)) for _ in range(10)]
        await asyncio.sleep(0)
        assert pacer.in_flight == 2 and len(entered) == 2
        assert pacer.held == 8

        pacer.observe(0.015)  # under the target, but not under half of it: no change
        assert pacer.limit == 2
        pacer.observe(0.001)
        assert pacer.limit == 3
        await asyncio.sleep(0)
        assert pacer.in_flight == 3  # the raise lets one more in at once

        release.set()
        await asyncio.gather(*tasks)
        assert pacer.in_flight == 0
        assert max(entered) <= pacer.limit
        limit = pacer.limit
        pacer.observe(0.0)  # nothing waits: no evidence the loop could bear more
        assert pacer.limit == limit

    asyncio.run(scenario())


def test_waiting_requests_go_first_come_first_served_and_a_cancelled_one_passes_its_turn():
    async def scenario() -> None:
        pacer = Pacer(floor=1)
        pacer.limit = 1
        order: list[str] = []
        first = asyncio.Event()

        async def request(name: str, gate: asyncio.Event | None = None) -> None:
            async with pacer:
                order.append(name)
                if gate is not None:
                    await gate.wait()

        a = asyncio.create_task(request("a", first))
        await asyncio.sleep(0)
        b = asyncio.create_task(request("b"))
        c = asyncio.create_task(request("c"))
        await asyncio.sleep(0)
        b.cancel()
        first.set()
        await asyncio.gather(a, c)
        with pytest.raises(asyncio.CancelledError):
            await b
        assert order == ["a", "c"]
        assert pacer.in_flight == 0

    asyncio.run(scenario())


def test_the_watch_sees_a_blocked_loop_and_cuts_the_limit():
    async def scenario() -> Pacer:
        pacer = Pacer(target=0.02, floor=2)
        pacer.in_flight = 100  # as if 100 requests were out
        watch = asyncio.create_task(pacer.watch())
        await asyncio.sleep(0.05)
        for _ in range(2):  # callbacks that hold the loop for 250 ms, no good tick between
            time.sleep(0.25)
            await asyncio.sleep(0.001)  # the watch measures, and its next tick is due
        await asyncio.sleep(0.05)
        watch.cancel()
        return pacer

    pacer = asyncio.run(scenario())
    assert pacer.take_worst() >= 0.2
    assert pacer.limit <= 10


def test_an_idle_watch_rarely_wakes_and_a_request_makes_it_tick_fast_again():
    class Counting(Pacer):
        ticks = 0

        def observe(self, lag: float) -> None:
            self.ticks += 1
            super().observe(lag)

    async def scenario() -> tuple[Counting, int]:
        pacer = Counting(target=0.02, floor=2)
        watch = asyncio.create_task(pacer.watch())
        await asyncio.sleep(0.5)  # nothing out: no measurement before IDLE_TICK
        idle_ticks = pacer.ticks
        async with pacer:
            await asyncio.sleep(0.1)
            time.sleep(0.25)  # the loop held while a request is out
            await asyncio.sleep(0.05)
        watch.cancel()
        return pacer, idle_ticks

    pacer, idle_ticks = asyncio.run(scenario())
    assert idle_ticks == 0
    assert pacer.ticks >= 3
    assert pacer.take_worst() >= 0.2
