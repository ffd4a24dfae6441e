"""When a provider says a status happened: believed only within bounds, for every provider.

A time that is no number ("soon", {}) is a bad time, not a bad event: the status is kept and its
time dropped. One before 2015 or more than a day ahead (`1e400` is +Inf) would poison the
delivery histogram for good.
"""

from __future__ import annotations

import time
from typing import Any

EARLIEST = 1_420_070_400.0  # 2015-01-01: no WhatsApp Business message is older
AHEAD = 86400.0  # a day ahead, for clocks that differ


def event_time(
    raw: Any, *, per_second: float = 1.0, latest: float | None = None, ahead: float = AHEAD
) -> float | None:
    """Unix seconds from a number or a numeric string in `per_second` units (D7: 1000, ms),
    or None. `latest`: the newest believable time, when the caller asked the clock already
    (once per delivery, not once per status); else now + `ahead`."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        seconds = float(raw) / per_second
    except (ValueError, OverflowError):
        return None
    if latest is None:
        latest = time.time() + ahead
    return seconds if EARLIEST <= seconds <= latest else None  # (NaN: never)


def age(seconds: float) -> str:
    """For the status page: 45s, 12m, 3.5h."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
