"""The D7 ledger's promise, as the issue states it: ingest 1,000 ids, `kill -9` the exporter
mid-poll, restart; all 1,000 are still tracked or finished, and the totals are identical to an
uninterrupted run.

Both runs are real processes on real storage files against one simulator whose 1,000 requests
already sit at fixed final states, so both runs see the same answers and the right totals are
known before either starts. The kill lands while report requests are in flight: answers a cycle
already has but has not written yet are lost with the process, and must be asked again, and
counted once.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from exporter.providers.d7.statuses import IMPLIES
from simulators import D7Simulator, Fault
from tests.conftest import Series, free_port, scrape, values, wait_for

pytestmark = pytest.mark.processes  # `python -m exporter`, killed and started again

ACCOUNT = "dur"
INGEST_TOKEN = "ingest-durability"
IDS = 1000
CONVERSATIONS = ("marketing", "utility", "service")
KINDS = ("TEMPLATE", "TEXT")


def final_status(index: int) -> str:
    """A fixed mix: 70% read, 10% each un_delivered, rejected and left at delivered."""
    return {0: "un_delivered", 1: "rejected", 2: "delivered"}.get(index % 10, "read")


@dataclass(frozen=True)
class Sent:
    request_id: str
    status: str
    conversation_type: str
    message_type: str


@pytest.fixture(scope="module")
def sim() -> Iterator[D7Simulator]:
    with D7Simulator(auto=False, index_delay=0, seed=7) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def sent(sim: D7Simulator) -> list[Sent]:
    """1,000 one-message requests, each already at its final status."""
    out = []
    for index in range(IDS):
        conversation = CONVERSATIONS[index % len(CONVERSATIONS)]
        kind = KINDS[index % len(KINDS)]
        request_id = sim.send(1, conversation_type=conversation, message_type=kind)
        sim.advance(request_id, final_status(index))
        out.append(Sent(request_id, final_status(index), conversation, kind))
    return out


def expected_messages(sent: list[Sent]) -> dict[tuple[str, str, str], float]:
    """What whatsapp_messages_total must say: each status and the ones it implies, once."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for s in sent:
        for status in (s.status, *IMPLIES.get(s.status, ())):
            counts[status, s.conversation_type, s.message_type.lower()] += 1
    return {key: float(n) for key, n in counts.items()}


# --- the exporter as a process ----------------------------------------------------------------


def write_config(path: Path, sim: D7Simulator) -> Path:
    """Fast settings: 100 ids per 0.2 s cycle, delivered messages settle after 0.3 s."""
    path.write_text(
        f"""d7:
  - account: {ACCOUNT}
    base_url: {sim.base_url}
    token: {sim.token}
    ingest_token: {INGEST_TOKEN}
    interval: 0.2s
    retry_first: 0.1s
    retry_max: 1s
    final_after: 0.3s
    rate_limit: 30000/m
    concurrency: 8
"""
    )
    return path


@dataclass
class Process:
    popen: subprocess.Popen
    url: str
    log: Path

    def scrape(self) -> Series | None:
        return scrape(self.url)

    def tracked(self) -> dict[str, float]:
        series = self.scrape() or {}
        return {
            labels["state"]: v
            for labels, v in values(series, "whatsapp_tracked_requests", account=ACCOUNT)
        }

    def hand_in(self, request_ids: list[str]) -> None:
        answer = httpx.post(
            f"{self.url}/api/v1/requests",
            json={"account": ACCOUNT, "request_ids": request_ids},
            headers={"Authorization": f"Bearer {INGEST_TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        assert answer.json()["new"] == len(request_ids)


@contextmanager
def exporter(config: Path, storage: Path) -> Iterator[Process]:
    """Runs `python -m exporter`; logs go to a file, so a full pipe can never stall it."""
    port = free_port()
    log = storage.with_suffix(f".{port}.log")
    with log.open("w") as stderr:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--storage.path={storage}",
            ],
            cwd=storage.parent,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    process = Process(popen, f"http://127.0.0.1:{port}", log)
    try:
        wait_for(
            lambda: process.scrape() is not None or popen.poll() is not None,
            15,
            "the exporter to listen",
        )
        assert popen.poll() is None, log.read_text()
        yield process
    finally:
        if popen.poll() is None:
            popen.terminate()
            popen.wait(15)
    assert "Traceback" not in log.read_text(), log.read_text()


def finished(process: Process) -> dict[str, float]:
    """Waits until every id finished; returns the tracked states. (Nothing pending is not
    enough: the states are shown at 0 before the first hand-in is published.)"""
    seen: list[dict[str, float]] = []

    def done() -> bool:
        seen.append(process.tracked())
        states = seen[-1]
        return (
            states.get("pending", 1) == 0
            and states.get("done", 0) + states.get("expired", 0) >= IDS
        )

    wait_for(done, 20, "every id to finish")
    return seen[-1]


def totals(series: Series) -> dict[str, object]:
    """Everything that must match between runs (durations differ; their counts must not)."""
    return {
        "messages": {
            (ls["status"], ls["conversation_type"], ls["message_type"]): v
            for ls, v in values(series, "whatsapp_messages_total", account=ACCOUNT)
        },
        "tracked": {
            ls["state"]: v for ls, v in values(series, "whatsapp_tracked_requests", account=ACCOUNT)
        },
        "delivery_counts": {
            ls["status"]: v
            for ls, v in values(series, "whatsapp_message_delivery_seconds_count", account=ACCOUNT)
        },
    }


@dataclass(frozen=True)
class Stored:
    requests: dict[str, str]  # request id -> state
    messages: dict[tuple[str, str, str], float]  # the message_counts table


def stored(storage: Path) -> Stored:
    """The ledger file's contents, read from a copy: the original stays exactly as the process
    left it (after a kill -9: with its WAL) for the next exporter to recover."""
    copy = storage.parent / "copy" / storage.name
    copy.parent.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{storage}{suffix}").exists():
            shutil.copyfile(f"{storage}{suffix}", f"{copy}{suffix}")
    db = sqlite3.connect(copy)
    try:
        requests = dict(
            db.execute(
                "SELECT request_id, state FROM requests WHERE account = ?", (ACCOUNT,)
            ).fetchall()
        )
        messages = {
            (status, conversation, kind): float(count)
            for status, conversation, kind, count in db.execute(
                "SELECT status, conversation_type, message_type, count FROM message_counts"
                " WHERE account = ?",
                (ACCOUNT,),
            )
        }
        return Stored(requests, messages)
    finally:
        db.close()
        shutil.rmtree(copy.parent)


# --- the test ---------------------------------------------------------------------------------


def test_kill_9_mid_poll_loses_no_id_and_counts_nothing_twice(
    tmp_path: Path, sim: D7Simulator, sent: list[Sent]
) -> None:
    config = write_config(tmp_path / "config.yaml", sim)
    ids = [s.request_id for s in sent]
    want = expected_messages(sent)
    want_counts = {
        status: float(sum(s.status == status for s in sent)) for status in ("delivered", "read")
    }

    # run A: uninterrupted
    with exporter(config, tmp_path / "a.db") as a:
        a.hand_in(ids)
        assert finished(a) == {"pending": 0, "done": IDS, "expired": 0}
        run_a = totals(a.scrape())
    assert run_a["messages"] == want
    assert run_a["delivery_counts"] == want_counts

    # run B: killed while report requests are in flight, then restarted on the same file
    storage = tmp_path / "b.db"
    sim.fail("report", Fault.latency(0.01))  # a cycle takes a while: kills land inside one
    try:
        with exporter(config, storage) as b:
            b.hand_in(ids)
            wait_for(
                lambda: b.tracked().get("done", 0) >= IDS // 5, 20, "a fifth of the ids to finish"
            )
            before = len(sim.requests)
            sim.fail("report", Fault.latency(30))  # answers from now on hang
            wait_for(lambda: len(sim.requests) > before, 10, "a report request to be in flight")
            os.kill(b.popen.pid, signal.SIGKILL)
            assert b.popen.wait(10) == -signal.SIGKILL
    finally:
        sim.clear_faults()

    at_kill = stored(storage)
    assert len(at_kill.requests) == IDS, "kill -9 lost ids that had been acknowledged"
    states = Counter(at_kill.requests.values())
    assert 0 < states["pending"] < IDS, f"not killed mid-poll: {states}"
    asked = {r.path.rsplit("/", 1)[-1] for r in sim.requests[before:]}
    unrecorded = {rid for rid in asked if at_kill.requests.get(rid) == "pending"}
    assert unrecorded, "no id was being asked for when the process died"

    with exporter(config, storage) as b2:
        assert finished(b2) == {"pending": 0, "done": IDS, "expired": 0}
        run_b = totals(b2.scrape())
    after = stored(storage)

    assert run_b == run_a
    assert set(after.requests) == set(ids)
    assert set(after.requests.values()) == {"done"}
    assert after.messages == want
