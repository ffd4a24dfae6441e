"""D7 delivery callbacks and Meta's signed webhooks survive `kill -9` mid-burst: every status the
exporter answered 2xx before it died is counted after a restart on the same storage, and none is
counted twice, not even when the provider sends it again.

Only the exporter's external interfaces: it runs as `python -m exporter`, callbacks arrive over
its webhook from several concurrent clients, and the counts are read from /metrics. Each event
is a new message of a new request, so what must be counted is known exactly: each status once,
with the ones it implies (read implies delivered implies sent).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import Series, free_port, value, values, wait_for
from tests.test_d7_durability import exporter  # the same process, killed the same way
from tests.test_meta_webhooks import SECRET, signature, status_body
from tests.test_meta_webhooks import status as meta_status

pytestmark = pytest.mark.processes  # `python -m exporter`, killed with -9 and started again

ACCOUNT = "cb"
INGEST_TOKEN = "ingest-callbacks"
AUTH = {"Authorization": f"Bearer {INGEST_TOKEN}"}
WABA_ID = "102290129340398"
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


def post_d7(http: httpx.Client, url: str, numbers: list[int]) -> httpx.Response:
    """One event as D7 sends one, several as a JSON list."""
    body = event(numbers[0]) if len(numbers) == 1 else [event(n) for n in numbers]
    return http.post(f"{url}/webhooks/d7/{ACCOUNT}", json=body, headers=AUTH)


def post_meta(http: httpx.Client, url: str, numbers: list[int]) -> httpx.Response:
    """One signed delivery, its statuses in one change as Meta batches them, each a new wamid."""
    now = time.time()
    statuses = [
        meta_status(
            f"wamid.cb{n:012d}", STATUSES[n % len(STATUSES)], now, recipient_id=f"4917{n:09d}"
        )
        for n in numbers
    ]
    raw = json.dumps(status_body(WABA_ID, *statuses)).encode()
    headers = {"X-Hub-Signature-256": signature(raw), "Content-Type": "application/json"}
    return http.post(f"{url}/webhooks/meta/{ACCOUNT}", content=raw, headers=headers)


def d7_config(closed: int) -> str:
    """The ids the poller learns are not due within the test: only callbacks write."""
    return f"""d7:
  - account: {ACCOUNT}
    base_url: http://127.0.0.1:{closed}
    token: d7-token
    ingest_token: {INGEST_TOKEN}
    retry_first: 1h
"""


def meta_config(closed: int) -> str:
    """Polls an hour apart: only webhooks write."""
    return f"""meta:
  - account: {ACCOUNT}
    base_url: http://127.0.0.1:{closed}
    token: meta-token
    waba_id: "{WABA_ID}"
    app_secret: {SECRET}
    health: {{interval: 1h}}
    templates: {{interval: 1h}}
    analytics: {{interval: 1h}}
"""


@dataclass(frozen=True)
class Provider:
    """What differs between the providers' webhooks here; the kill and the checks are one."""

    config: Callable[[int], str]  # its poller pointed at this closed port
    post: Callable[[httpx.Client, str, list[int]], httpx.Response]
    # the ledger's messages, in the states that together hold every one the webhooks told of
    tracked: tuple[str, tuple[str, ...]]


PROVIDERS = {
    "d7": Provider(d7_config, post_d7, ("whatsapp_tracked_requests", ("pending",))),
    # a read status is final: those messages are done, not pending
    "meta": Provider(meta_config, post_meta, ("whatsapp_tracked_messages", ("pending", "done"))),
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


def burst(
    provider: Provider, url: str, client: int, outcomes: Outcomes, stop: threading.Event
) -> None:
    """One client posting callbacks back to back until its exporter dies (or 20 s pass)."""
    size = BATCH if client % 2 else 1
    numbers = iter(range(client * 1_000_000, (client + 1) * 1_000_000, size))
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=10) as http:
        while not stop.is_set() and time.monotonic() < deadline:
            first = next(numbers)
            batch = list(range(first, first + size))
            try:
                answer = provider.post(http, url, batch)
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


def tracked(provider: Provider, series: Series) -> float | None:
    name, states = provider.tracked
    found = [v for labels, v in values(series, name, account=ACCOUNT) if labels["state"] in states]
    return sum(found) if found else None


@pytest.mark.parametrize("name", PROVIDERS)
def test_kill_9_mid_burst_loses_no_acknowledged_callback_and_counts_none_twice(
    tmp_path: Path, name: str
) -> None:
    provider = PROVIDERS[name]
    config = tmp_path / "config.yaml"
    config.write_text(provider.config(free_port()))  # every poll is refused
    storage = tmp_path / "storage"
    outcomes = Outcomes()
    stop = threading.Event()

    with exporter(config, storage) as first:
        clients = [
            threading.Thread(
                target=burst, args=(provider, first.url, i, outcomes, stop), daemon=True
            )
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
        # what was acknowledged from the journal and not yet counted is counted after the
        # restart (the burst's calls were journaled: ledger.py, "the journal")
        def drained() -> Series | None:
            series = second.scrape() or {}
            backlog = value(series, "whatsapp_tracking_backlog_statuses", provider=name)
            return series if backlog == 0 else None

        series = wait_for(drained, 30, "the journal to be counted after the restart")
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
        assert len(acked) <= (tracked(provider, series) or 0) <= len(acked | unknown)
        print(f"after the restart: {after_restart}, at least {low}")

        # the provider sends again what got no answer, and some of what did: each counts once
        again = sorted(unknown) + sorted(acked)[:: max(1, len(acked) // 200)]
        with httpx.Client(timeout=10) as http:
            for start in range(0, len(again), 50):
                answer = provider.post(http, second.url, again[start : start + 50])
                assert answer.status_code == 200, answer.text
        everything = acked | unknown
        want = expected(everything)
        wait_for(lambda: counted(second.scrape() or {}) == want, 10, "the resent callbacks")
        assert tracked(provider, second.scrape() or {}) == len(everything)
