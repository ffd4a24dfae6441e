"""D7 delivery callbacks survive `kill -9` mid-burst: every callback the exporter answered 2xx
before it died is counted after a restart on the same storage, and none is counted twice, not
even when D7 sends it again.

Only the exporter's external interfaces: it runs as `python -m exporter`, callbacks arrive over
its webhook from several concurrent clients, and the counts are read from /metrics. Each event
is a new message of a new request, so what must be counted is known exactly: each status once,
with the ones it implies (read implies delivered implies sent).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Series, free_port, values, wait_for
from tests.test_d7_durability import exporter  # the same process, killed the same way

pytestmark = pytest.mark.processes  # `python -m exporter`, killed with -9 and started again

ACCOUNT = "cb"
INGEST_TOKEN = "ingest-callbacks"
AUTH = {"Authorization": f"Bearer {INGEST_TOKEN}"}
CLIENTS = 8
BATCH = 10  # the odd clients send 10 events a request, the even ones one
KILL_AFTER = 1500  # events acknowledged before the kill
STATUSES = ("sent", "delivered", "read")
IMPLIED = {
    "sent": ("sent",),
    "delivered": ("delivered", "sent"),
    "read": ("read", "delivered", "sent"),
}


def event(number: int) -> dict:
    """A D7 delivery event, every one a new message of a new request."""
    return {
        "event_type": "DELIVERY_EVENTS",
        "timestamp": int(time.time() * 1000),
        "request_id": f"cb-{number:08d}-0000-4000-8000-000000000000",
        "msg_id": f"cb-{number:08d}-1111-4000-9000-000000000000",
        "conversation_type": ("marketing", "utility", "service")[number % 3],
        "message_type": ("TEMPLATE", "TEXT")[number % 2],
        "recipient": f"+4917{number:09d}",
        "originator": "+15550100100",
        "status": STATUSES[number % len(STATUSES)],
    }


@dataclass
class Outcomes:
    """What the clients know: events answered 2xx, and events sent but never answered."""

    acked: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def burst(url: str, client: int, outcomes: Outcomes, stop: threading.Event) -> None:
    """One client posting callbacks back to back until its exporter dies (or 20 s pass)."""
    size = BATCH if client % 2 else 1
    numbers = iter(range(client * 1_000_000, (client + 1) * 1_000_000, size))
    deadline = time.monotonic() + 20
    with httpx.Client(headers=AUTH, timeout=10) as http:
        while not stop.is_set() and time.monotonic() < deadline:
            first = next(numbers)
            batch = list(range(first, first + size))
            body = event(first) if size == 1 else [event(n) for n in batch]
            try:
                answer = http.post(f"{url}/webhooks/d7/{ACCOUNT}", json=body)
            except httpx.HTTPError:
                with outcomes.lock:
                    outcomes.unknown.update(batch)  # perhaps stored, perhaps not
                return  # the exporter is gone
            with outcomes.lock:
                if 200 <= answer.status_code < 300:
                    outcomes.acked.update(batch)
                else:
                    outcomes.unknown.update(batch)


def counted(series: Series) -> dict[str, float]:
    out: Counter[str] = Counter()
    for labels, v in values(series, "whatsapp_messages_total", account=ACCOUNT):
        out[labels["status"]] += v
    return {status: out[status] for status in STATUSES}


def expected(numbers: set[int]) -> dict[str, float]:
    out = dict.fromkeys(STATUSES, 0.0)
    for number in numbers:
        for status in IMPLIED[STATUSES[number % len(STATUSES)]]:
            out[status] += 1
    return out


def pending(series: Series) -> float | None:
    found = values(series, "whatsapp_tracked_requests", account=ACCOUNT, state="pending")
    return found[0][1] if found else None


def test_kill_9_mid_burst_loses_no_acknowledged_callback_and_counts_none_twice(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    # the poller points at a closed port and the ids it learns are not due within the test:
    # only callbacks write to the ledger
    config.write_text(
        f"""d7:
  - account: {ACCOUNT}
    base_url: http://127.0.0.1:{free_port()}
    token: d7-token
    ingest_token: {INGEST_TOKEN}
    retry_first: 1h
"""
    )
    storage = tmp_path / "storage"
    outcomes = Outcomes()
    stop = threading.Event()

    with exporter(config, storage) as first:
        clients = [
            threading.Thread(target=burst, args=(first.url, i, outcomes, stop), daemon=True)
            for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        wait_for(lambda: outcomes.count() >= KILL_AFTER, 20, f"{KILL_AFTER} acknowledged events")
        still_sending = sum(client.is_alive() for client in clients)
        os.kill(first.popen.pid, signal.SIGKILL)
        assert first.popen.wait(10) == -signal.SIGKILL
        stop.set()
        for client in clients:
            client.join(15)
    assert still_sending == CLIENTS, "the kill did not land mid-burst"
    acked, unknown = set(outcomes.acked), set(outcomes.unknown) - outcomes.acked
    assert len(acked) >= KILL_AFTER
    print(f"kill -9 after {len(acked)} acknowledged events; {len(unknown)} sent without an answer")

    with exporter(config, storage) as second:
        series = second.scrape()
        assert series is not None
        after_restart = counted(series)
        low, high = expected(acked), expected(acked | unknown)
        # every acknowledged callback is there; nothing beyond what was sent at all
        for status in STATUSES:
            assert low[status] <= after_restart[status] <= high[status], (
                status,
                after_restart,
                low,
                high,
            )
        assert len(acked) <= (pending(series) or 0) <= len(acked | unknown)
        print(f"after the restart: {after_restart}, at least {low}")

        # D7 sends again what got no answer, and some of what did: each still counts once
        again = sorted(unknown) + sorted(acked)[:: max(1, len(acked) // 200)]
        with httpx.Client(headers=AUTH, timeout=10) as http:
            for start in range(0, len(again), 50):
                answer = http.post(
                    f"{second.url}/webhooks/d7/{ACCOUNT}",
                    json=[event(n) for n in again[start : start + 50]],
                )
                assert answer.status_code == 200, answer.text
        everything = acked | unknown
        want = expected(everything)
        wait_for(lambda: counted(second.scrape() or {}) == want, 10, "the resent callbacks")
        assert pending(second.scrape() or {}) == len(everything)
