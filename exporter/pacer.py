"""Provider requests held back while the event loop lags, so a scrape never queues behind polls.

When polling needs more CPU than there is (1,000 numbers every 10 s on a slow machine), asyncio
runs its ready callbacks first come, first served: a scrape waits behind hundreds of poll steps
and the interpreter lock, for up to seconds. Polling gets no faster for having more requests in
flight then (it is CPU-bound), so the pacer lowers how many may be in flight, across all
accounts, until the loop answers again within `target`; and raises it again, by an eighth a
tick, while requests wait and the loop keeps up. With CPU to spare (the normal case) it never
binds: the accounts' own `concurrency` and request budgets decide alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType

TICK = 0.02  # s between two lag measurements while requests are out
IDLE_TICK = 1.0  # s between two while none are
TARGET = 0.02  # s of lag the pacer keeps the loop under
FLOOR = 2  # requests: polling always goes on
START = 64  # requests in flight before the first measurement under load
CEILING = 4096


class Pacer:
    """Owned by the event loop, like everything it gates."""

    def __init__(self, *, target: float = TARGET, floor: int = FLOOR, ceiling: int = CEILING):
        self.target = target
        self.floor = floor
        self.ceiling = ceiling
        self.limit = min(START, ceiling)
        self.in_flight = 0
        self.lag = 0.0  # seconds, the newest measurement
        self.worst_lag = 0.0  # since it was last read (the exporter's own metrics)
        self.held = 0  # requests that had to wait, ever
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._busy = asyncio.Event()  # set by every request: the watch ticks fast again

    async def __aenter__(self) -> None:
        self._busy.set()
        if self.in_flight >= self.limit or self._waiters:
            self.held += 1
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # its turn came as it was cancelled: pass it on
                elif waiter in self._waiters:  # not yet passed over by _wake
                    self._waiters.remove(waiter)
                raise
        self.in_flight += 1

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def observe(self, lag: float) -> None:
        """One measurement. Down when this and the one before are over the target, in
        proportion to how far (one step gets there: a loop that lags has no time for many); a
        single late tick is a spike the requests did not cause (publishing, a collection), and
        cutting on it cost the 10,000-device round 7%. Up by an eighth while the loop keeps up
        and requests wait for it (from 2 to 400 in about a second). Never up while nothing
        waits: the next burst starts from a limit the loop was seen to bear."""
        sustained = min(lag, self.lag)  # one late tick is a spike (a publication), not load
        self.lag = lag
        self.worst_lag = max(self.worst_lag, lag)
        if sustained > self.target:
            base = min(self.limit, max(self.in_flight, self.floor))
            self.limit = max(self.floor, int(base * max(0.1, self.target / sustained)))
        elif lag < self.target / 2 and self._waiters:
            self.limit = min(self.ceiling, self.limit + max(1, self.limit // 8))
            self._wake()

    def take_worst(self) -> float:
        worst, self.worst_lag = self.worst_lag, self.lag
        return worst

    async def watch(self) -> None:
        """Measure the loop's lag for as long as the exporter runs: every TICK while requests
        are out or waiting, every IDLE_TICK otherwise (50 wake-ups a second cost an idle
        exporter a third of its CPU at 100k series), and at once when a request comes."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self.in_flight or self._waiters:
                await asyncio.sleep(TICK)
                expected = TICK
            else:
                self._busy.clear()
                try:
                    async with asyncio.timeout(IDLE_TICK):
                        await self._busy.wait()
                    continue  # a request came: from now on every TICK
                except TimeoutError:
                    expected = IDLE_TICK
            self.observe(max(0.0, loop.time() - started - expected))
