"""An account's request budget: at most N requests in any window of P seconds, at the provider.

A token bucket of capacity N refilled at N/P lets through up to 2N requests in some window of P
(a full bucket, then a window's refill), which is exactly what a provider counting "60 a minute"
answers with 429. So this is a sliding window instead, and a request occupies its slot from the
moment it is sent until P seconds after its answer arrived: whatever the latency, the provider can
never see N+1 arrivals within P.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class Paused(Exception):
    """The provider asked for a pause longer than the caller is willing to wait."""

    def __init__(self, seconds: float):
        super().__init__(f"paused for another {seconds:.0f}s")
        self.seconds = seconds


class RequestBudget:
    def __init__(
        self, requests: int, period: float, *, clock: Callable[[], float] = time.monotonic
    ):
        self.requests = requests
        self.period = period
        self._clock = clock
        self._finished: deque[float] = deque()  # when recent answers arrived, oldest first
        self._in_flight = 0
        self._blocked_until = 0.0
        self._turn = asyncio.Lock()  # FIFO: the oldest waiter goes first
        self._released = asyncio.Event()

    def block_for(self, seconds: float) -> None:
        """The provider said 429: send nothing more until `seconds` have passed."""
        self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def usage(self) -> tuple[int, float]:
        """Requests counted in the current window (sent or answered), and seconds until a 429's
        pause ends (0: not paused)."""
        now = self._clock()
        used = sum(1 for t in self._finished if t > now - self.period) + self._in_flight
        return used, max(0.0, self._blocked_until - now)

    @asynccontextmanager
    async def slot(self, *, patience: float = math.inf) -> AsyncIterator[None]:
        """A place in the window; Paused at once when a provider's pause outlasts `patience`
        (a request waiting longer would outlive its poll, and the exporter's readiness)."""
        await self._acquire(patience)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, patience: float) -> None:
        async with self._turn:
            while True:
                now = self._clock()
                while self._finished and self._finished[0] <= now - self.period:
                    self._finished.popleft()
                wait: float | None = self._blocked_until - now
                if wait > patience:
                    raise Paused(wait)
                if wait <= 0:
                    if len(self._finished) + self._in_flight < self.requests:
                        self._in_flight += 1
                        return
                    # full: the oldest answer leaves the window first; if all are in flight,
                    # wait for one of them to come back
                    wait = self._finished[0] + self.period - now if self._finished else None
                self._released.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), wait)

    def _release(self) -> None:
        self._in_flight -= 1
        self._finished.append(self._clock())
        self._released.set()
