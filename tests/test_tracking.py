"""The delivery-tracking room itself, with a vocabulary of its own: what any provider that
reports message statuses gets from it (the D7 rules are in test_ledger_backends.py).

Its promises here: a reader (the event loop) never waits for a transaction; calls queued while the
writer is busy share one transaction and one COMMIT; a poll cycle is a few statements whatever its
size; taking ids in never waits for another replica's poll cycle; and two providers' ledgers share
one PostgreSQL database without touching each other's rows.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from exporter.tracking import (
    Ledger,
    MessageUpdate,
    Names,
    Schedule,
    Vocabulary,
    open_ledger,
)
from exporter.tracking import ledger as ledger_module
from exporter.tracking.stores import LedgerError, SQLiteStore
from tests.conftest import wait_for
from tests.postgres import (  # noqa: F401 - fixtures
    ledger_location_fixture,
    postgres_server_fixture,
    postgres_url_fixture,
)

CHAT = Vocabulary(
    title="the chat",
    statuses=("sent", "delivered", "read", "failed"),
    final=frozenset({"read", "failed"}),
    implies={"read": ("delivered", "sent"), "delivered": ("sent",)},
    conversation_types=frozenset({"marketing", "utility"}),
    message_types=frozenset(),
    names=Names.of("chat"),
)
SCHEDULE = Schedule(first=1, max=10, not_found_grace=5, final_after=100, expire_after=1000)


def update(msg_id: str, status: str) -> MessageUpdate:
    return MessageUpdate(msg_id, status, "marketing", "")


def counted(ledger: Ledger):
    """The totals once the journal has been counted (a burst's calls are journaled first)."""
    wait_for(lambda: ledger.backlog() == 0, 10, "the journal to be counted")
    return ledger.totals()


def hold_inside_a_transaction(ledger: Ledger, account: str = "a") -> tuple[threading.Event, Future]:
    """A poll cycle whose answers are still coming: the writer sits in its transaction, holding
    the account's lock, until the returned event is set."""
    inside, release = threading.Event(), threading.Event()

    def answers():
        inside.set()
        release.wait(30)
        yield from ()

    cycle = ledger.record(account, answers(), SCHEDULE)
    assert inside.wait(10), "the cycle never started"
    return release, cycle


def test_readers_never_wait_for_a_transaction(ledger_location):
    ledger = open_ledger(ledger_location, vocabulary=CHAT)
    ledger.report("a", [("r1", update("m1", "read"), None)], SCHEDULE).result()
    release, cycle = hold_inside_a_transaction(ledger)
    try:
        started = time.perf_counter()
        for _ in range(100):
            totals, pending = ledger.totals(), ledger.pending_count("a")
        took = time.perf_counter() - started
        assert totals["a"].messages[("read", "marketing", "")] == 1 and pending == 1
        assert took < 0.5, f"100 reads took {took:.3f}s while a transaction was open"
        waiting = ledger.report("a", [("r2", update("m2", "sent"), None)], SCHEDULE)
        time.sleep(0.2)
        assert not waiting.done(), "a write was acknowledged before its transaction committed"
    finally:
        release.set()
    cycle.result(10)
    waiting.result(10)
    assert ledger.pending_count("a") == 2
    ledger.close()


class CountingStore(SQLiteStore):
    """Counts what reaches the database: transactions begun, statements sent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.begun = self.statements_sent = 0

    def begin(self, accounts, **options):
        self.begun += 1
        return super().begin(accounts, **options)

    def execute(self, sql, params=()):
        self.statements_sent += 1
        return super().execute(sql, params)

    def executemany(self, sql, rows):
        self.statements_sent += 1  # one statement, however many rows
        return super().executemany(sql, rows)


def test_calls_queued_while_the_writer_is_busy_share_one_commit(tmp_path, monkeypatch):
    """A burst's webhooks are acknowledged from one journal commit, and counted after."""
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)  # not counted until the writer is woken
    store = CountingStore(tmp_path / "l.db", CHAT.names)
    ledger = Ledger(store, vocabulary=CHAT)
    release, cycle = hold_inside_a_transaction(ledger)
    begun = store.begun
    callbacks = [
        ledger.report("a", [(f"r{i}", update(f"m{i}", "delivered"), None)], SCHEDULE)
        for i in range(200)
    ]
    hand_ins = [ledger.add("b", [f"x{i}", f"x{i + 1}"], SCHEDULE) for i in range(0, 100, 2)]
    release.set()
    cycle.result(10)
    assert [f.result(10) for f in hand_ins] == [2] * 50
    assert all(f.result(10) is None for f in callbacks)
    assert store.begun - begun <= 2, f"{store.begun - begun} transactions for 250 queued calls"
    assert ledger.backlog() == 200  # acknowledged: stored, not counted yet
    assert ledger.totals()["a"].messages == {}
    monkeypatch.setattr(ledger_module, "IDLE", 0.02)
    ledger.due("a", 1).result(10)  # wakes the writer, which counts the journal when idle
    totals = counted(ledger)
    assert store.begun - begun <= 3, f"{store.begun - begun} transactions for 250 calls, counted"
    assert totals["a"].messages == {
        ("delivered", "marketing", ""): 200,
        ("sent", "marketing", ""): 200,
    }
    assert totals["a"].states["pending"] == 200 and totals["b"].states["pending"] == 100
    ledger.close()


def test_a_failing_call_fails_alone(tmp_path):
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    release, cycle = hold_inside_a_transaction(ledger)

    class Unreadable:
        def __str__(self):
            raise ValueError("no status")

    good = ledger.report("a", [("r1", update("m1", "sent"), None)], SCHEDULE)
    bad = ledger.report("b", [("r2", MessageUpdate("m2", Unreadable()), None)], SCHEDULE)
    release.set()
    cycle.result(10)
    good.result(10)
    with pytest.raises(ValueError, match="no status"):
        bad.result(10)
    assert ledger.totals()["a"].messages == {("sent", "marketing", ""): 1}
    assert "b" not in ledger.totals()
    ledger.close()


def test_a_poll_cycle_is_a_few_statements_whatever_its_size(tmp_path):
    """Each statement is a round trip to PostgreSQL: a cycle of 270 ids used to be 270 of them
    and more, 27 s with the database 100 ms away."""
    sent = {}
    for size in (10, 300):
        store = CountingStore(tmp_path / f"{size}.db", CHAT.names)
        clock = [1000.0]
        ledger = Ledger(store, vocabulary=CHAT, clock=lambda c=clock: c[0])
        ledger.add("a", [f"r{i}" for i in range(size)], SCHEDULE).result()
        clock[0] += 60
        due = ledger.due("a", size).result()
        assert len(due) == size
        answers = []
        for i, d in enumerate(due):  # a mix: read, delivered, still unknown, gone
            kind = i % 4
            if kind == 0:  # every message final: done
                answers.append((d, [update(f"m{i}", "read"), update(f"n{i}", "read")], None))
            elif kind == 1:  # asked again later
                answers.append((d, [update(f"m{i}", "delivered"), update(f"n{i}", "sent")], None))
            else:
                answers.append((d, None, "not_found" if kind == 2 else "gone"))
        before = store.statements_sent
        ledger.record("a", answers, SCHEDULE).result()
        sent[size] = store.statements_sent - before
        states = ledger.totals()["a"].states
        assert states["done"] == (size + 3) // 4 and states["expired"] == size // 4
        ledger.close()
    assert sent[10] == sent[300] and sent[300] <= 16, sent


def test_a_hand_in_does_not_wait_for_another_replicas_poll_cycle(postgres_url):
    """Even queued behind a webhook that must wait for the leader's lock: the follower's writer
    sets that one aside and serves the rest."""
    leader = open_ledger(postgres_url, vocabulary=CHAT)
    follower = open_ledger(postgres_url, vocabulary=CHAT)
    release, cycle = hold_inside_a_transaction(leader)
    try:
        # a status changes what the cycle may be counting: that one waits for its lock
        status = follower.report("a", [("r1", update("m1", "sent"), None)], SCHEDULE)
        time.sleep(0.3)
        started = time.monotonic()
        assert follower.add("a", ["r1", "r2"], SCHEDULE).result(10) == 2  # (r1: not yet in)
        assert follower.add("b", ["r9"], SCHEDULE).result(10) == 1
        took = time.monotonic() - started
        assert took < 2, f"hand-ins waited {took:.1f}s for the leader's cycle"
        assert not status.done()
    finally:
        release.set()
    cycle.result(10)
    status.result(10)
    follower.close()
    time.sleep(1.5)  # the leader reads the shared counts back every second
    assert leader.pending_count("a") == 2 and leader.pending_count("b") == 1
    assert leader.totals()["a"].messages == {("sent", "marketing", ""): 1}
    leader.close()


def test_a_webhook_set_aside_waits_at_last_rather_than_forever(postgres_url, monkeypatch):
    """After PATIENCE of trying, a set-aside job waits for the lock like any other."""
    monkeypatch.setattr(ledger_module, "PATIENCE", 0.5)
    leader = open_ledger(postgres_url, vocabulary=CHAT)
    follower = open_ledger(postgres_url, vocabulary=CHAT)
    release, cycle = hold_inside_a_transaction(leader)
    status = follower.report("a", [("r1", update("m1", "sent"), None)], SCHEDULE)
    time.sleep(1.0)  # past its patience: it now waits in BEGIN for the lock
    release.set()
    cycle.result(10)
    status.result(10)
    assert follower.pending_count("a") == 1
    follower.close()
    leader.close()


def test_two_providers_share_one_database_without_touching_each_others_rows(ledger_location):
    other = Vocabulary(**{**CHAT.__dict__, "title": "the other", "names": Names.of("other")})
    chat = open_ledger(ledger_location, vocabulary=CHAT)
    second = open_ledger(ledger_location, vocabulary=other)
    chat.report("a", [("r1", update("m1", "read"), None)], SCHEDULE).result()
    second.add("a", ["r1", "r2"], SCHEDULE).result()
    assert second.add("a", ["r1"], SCHEDULE).result() == 0
    chat.close()
    second.close()
    later = {"clock": lambda: time.time() + 60}
    chat = open_ledger(ledger_location, vocabulary=CHAT, **later)
    second = open_ledger(ledger_location, vocabulary=other, **later)
    assert chat.totals()["a"].states["pending"] == 1 and len(chat.totals()["a"].messages) == 3
    assert second.totals()["a"].states["pending"] == 2 and second.totals()["a"].messages == {}
    assert [d.request_id for d in chat.due("a", 10).result()] == ["r1"]
    assert sorted(d.request_id for d in second.due("a", 10).result()) == ["r1", "r2"]
    chat.close()
    second.close()


def test_a_closed_ledger_still_commits_what_was_queued(tmp_path):
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    release, _ = hold_inside_a_transaction(ledger)
    queued = ledger.add("a", ["r1"], SCHEDULE)
    closing = threading.Thread(target=ledger.close)
    closing.start()
    time.sleep(0.1)
    release.set()
    closing.join(10)
    assert queued.result(1) == 1
    reopened = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    assert reopened.pending_count("a") == 1
    reopened.close()


def test_rows_written_at_once_keep_their_ids_and_the_first_send_time(ledger_location):
    """SQLite takes a batch's rows as one JSON array (`Store.many`): ids that look like numbers,
    carry quotes, backslashes or other scripts stay the text they were, and of two send times
    of one request in one batch the first is the one its delivery time starts from."""
    ledger = open_ledger(ledger_location, vocabulary=CHAT)
    odd = ["123", "1e3", 'say "hi"', "back\\slash", "ünïcødé ✓", "null", "[1]"]
    now = time.time()
    batch = [
        (rid, MessageUpdate(f"m-{rid}", "sent", "marketing", "", now - 100), now - 100)
        for rid in odd
    ]
    batch.append(("123", MessageUpdate("m-123", "sent", "marketing", "", now - 50), now - 50))
    ledger.report("a", batch, SCHEDULE).result()
    assert ledger.add("a", odd, SCHEDULE).result() == 0, "an id was stored as something else"
    ledger.report(
        "a", [("123", MessageUpdate("m-123", "delivered", "", "", now), None)], SCHEDULE
    ).result()
    due = ledger.due("a", 100)
    time.sleep(1.1)  # SCHEDULE.first: every id comes due
    ids = sorted(d.request_id for d in ledger.due("a", 100).result())
    assert ids == sorted(odd) and all(type(i) is str for i in ids)
    assert due.result() == []
    totals = ledger.totals()["a"]
    assert totals.messages[("sent", "marketing", "")] == len(odd)
    assert totals.sums["delivered"] == pytest.approx(100, abs=0.01)
    ledger.close()


def test_per_id_statements_find_each_id_by_its_key(tmp_path):
    """A statement a batch runs for its ids finds each one by (account, id), never by walking
    the account's rows: joined to json_each without care, SQLite's planner once chose to walk
    every id of the account for each row of the batch, 2 ms an event at 20,000 ids."""
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    db, sql = ledger._store._db, ledger._sql
    per_id = {
        "insert_request": sql.insert_request,
        "set_sent_at": sql.set_sent_at,
        "upsert_message": sql.upsert_message,
        "messages_of": sql.messages_of,
        "starts": sql.starts,
        "finish": sql.finish,
        "reschedule": sql.reschedule,
    }
    for name, statement in per_id.items():
        count = max(int(n) for n in re.findall(r"\?(\d+)", statement) or ["0"])
        count = max(count, statement.count("?"))
        plan = " | ".join(
            row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", ["x"] * count)
        )
        walks = re.search(r"SCAN chat_(requests|messages)|\(account=\?\)", plan)
        assert walks is None, f"{name} walks rows: {plan}"
    ledger.close()


def test_a_webhook_only_provider_settles_a_message_by_its_final_status(tmp_path):
    hooks = Vocabulary(**{**CHAT.__dict__, "settled_by_webhooks": True})
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=hooks)
    for status in ("sent", "delivered", "read", "read"):  # at least once: read comes twice
        ledger.report("a", [("w1", update("w1", status), None)], SCHEDULE).result()
    ledger.report("a", [("w2", update("w2", "delivered"), None)], SCHEDULE).result()
    ledger.report("a", [("w3", update("w3", "failed"), None)], SCHEDULE).result()
    assert ledger.totals()["a"].states == {"pending": 1, "done": 2, "expired": 0}
    ledger.close()
    polled = open_ledger(str(tmp_path / "p.db"), vocabulary=CHAT)  # D7's way: only a poll settles
    polled.report("a", [("w1", update("w1", "read"), None)], SCHEDULE).result()
    assert polled.totals()["a"].states == {"pending": 1, "done": 0, "expired": 0}
    polled.close()


def test_a_batch_wakes_its_event_loop_once(tmp_path):
    """Calls made on an event loop get asyncio futures, settled in one callback per batch: a
    wake-up for each cost the loop ~15% of a callback burst's CPU."""
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)

    async def burst() -> tuple[list[object], int]:
        loop = asyncio.get_running_loop()
        wakeups = []
        plain = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakeups.append(a), plain(*a, **k))[1]
        release, cycle = hold_inside_a_transaction(ledger)
        calls = [
            ledger.report("a", [(f"r{i}", update(f"m{i}", "sent"), None)], SCHEDULE)
            for i in range(100)
        ]
        assert all(isinstance(call, asyncio.Future) for call in calls)
        release.set()
        results = await asyncio.gather(*calls)
        await cycle
        return results, len(wakeups)

    results, wakeups = asyncio.run(burst())
    assert results == [None] * 100
    assert wakeups <= 2, f"{wakeups} wake-ups for one batch of 100"
    counted(ledger)
    assert ledger.pending_count("a") == 100
    ledger.close()


def test_normalising_remembers_only_a_bounded_number_of_short_values():
    normalised = CHAT.normalised()
    for i in range(5000):  # a hostile sender's endless new values
        labels = normalised.labels(MessageUpdate("m", f"Sent-{i}", f"x{i}" * 40, "Text"))
        assert labels == ("unknown", "other", "")  # (CHAT has no message types: always "")
    assert normalised.labels(MessageUpdate("m", " Delivered ", "MARKETING", "")) == (
        "delivered",
        "marketing",
        "",
    )
    memos = (*normalised._memo, normalised._triples)
    assert all(len(memo) <= normalised.MEMO for memo in memos)
    assert all(len(raw) <= normalised.LONGEST for memo in normalised._memo for raw in memo)
    assert all(len(r) <= normalised.LONGEST for raw in normalised._triples for r in raw)


class DeadlockOnce(SQLiteStore):
    """Fails the first read of messages (inside a poll cycle's transaction) as a server
    breaking a deadlock would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failed = 0

    def execute(self, sql, params=()):
        if sql.startswith("SELECT request_id, msg_id") and not self.failed:
            self.failed += 1
            raise sqlite3.OperationalError("deadlock detected")
        return super().execute(sql, params)

    def again(self, error):
        return "deadlock" in str(error)


def test_a_transaction_undone_to_break_a_deadlock_runs_again_and_counts_once(tmp_path):
    store = DeadlockOnce(tmp_path / "l.db", CHAT.names)
    clock = [1000.0]
    ledger = Ledger(store, vocabulary=CHAT, clock=lambda: clock[0])
    ledger.add("a", ["r1", "r2"], SCHEDULE).result()
    clock[0] += 60
    due = ledger.due("a", 10).result()
    answers = ((d, [update(f"m-{d.request_id}", "read")], None) for d in due)  # read once
    ledger.record("a", answers, SCHEDULE).result(10)
    assert store.failed == 1
    totals = ledger.totals()["a"]
    assert totals.messages[("read", "marketing", "")] == 2
    assert totals.messages[("sent", "marketing", "")] == 2
    assert totals.states == {"pending": 0, "done": 2, "expired": 0}
    ledger.close()


# --- what a provider that is never polled per id (Meta) needs -----------------------------------

WEBHOOKS_ONLY = Vocabulary(
    title="the pushed",
    statuses=("sent", "delivered", "read", "failed"),
    final=frozenset({"read", "failed"}),
    implies={"read": ("delivered", "sent"), "delivered": ("sent",)},
    conversation_types=frozenset({"marketing"}),
    message_types=frozenset(),
    names=Names.of("pushed"),
    settled_by_webhooks=True,
    detailed=frozenset({"failed"}),
    timed_from_hand_in=False,
)


def pushed(ledger: Ledger, *events: tuple[str, str, float, str]) -> None:
    """Webhook events (message id, status, when, detail): the message id is the request id."""
    batch = [
        (
            mid,
            MessageUpdate(mid, status, "marketing", "", at, detail),
            at if status == "sent" else None,
        )
        for mid, status, at, detail in events
    ]
    ledger.report("a", batch, SCHEDULE).result()


def test_details_are_counted_once_per_message_bounded_and_kept(ledger_location, monkeypatch):
    monkeypatch.setattr(ledger_module, "MAX_DETAILS", 3)
    ledger = open_ledger(ledger_location, vocabulary=WEBHOOKS_ONLY)
    try:
        pushed(ledger, ("m1", "failed", 1e9, "131026"), ("m1", "failed", 1e9, "131026"))
        pushed(ledger, ("m2", "failed", 1e9, "131026"), ("m3", "failed", 1e9, ""))
        pushed(ledger, ("m4", "failed", 1e9, "1"), ("m5", "failed", 1e9, "2"))
        pushed(ledger, ("m6", "sent", 1e9, "ignored: not a detailed status"))
        expected = {("failed", "131026"): 2, ("failed", "unknown"): 1, ("failed", "1"): 1}
        expected[("failed", "other")] = 1  # the fourth distinct code
        assert ledger.totals()["a"].details == expected
    finally:
        ledger.close()
    reopened = open_ledger(ledger_location, vocabulary=WEBHOOKS_ONLY)
    try:
        assert reopened.totals()["a"].details == expected
    finally:
        reopened.close()


def test_without_a_sent_time_nothing_is_observed_and_quiet_deliveries_settle(ledger_location):
    now = [10_000.0]
    ledger = open_ledger(ledger_location, vocabulary=WEBHOOKS_ONLY, clock=lambda: now[0])
    try:
        pushed(ledger, ("m1", "delivered", 9_990.0, ""))  # its sent never came
        pushed(ledger, ("m2", "sent", 9_960.0, ""), ("m2", "delivered", 9_990.0, ""))
        pushed(ledger, ("m3", "sent", 9_000.0, ""), ("m3", "read", 9_500.0, ""))
        totals = ledger.totals()["a"]
        assert sum(totals.buckets["delivered"]) == 1 and totals.sums["delivered"] == 30.0
        assert totals.states == {"pending": 2, "done": 1, "expired": 0}
        assert ledger.settle_quiet("a", SCHEDULE).result() == 0  # delivered only just now
        now[0] += SCHEDULE.final_after + 1
        assert ledger.settle_quiet("a", SCHEDULE).result() == 2
        assert ledger.totals()["a"].states == {"pending": 0, "done": 3, "expired": 0}
    finally:
        ledger.close()


def journaled_burst(ledger: Ledger, calls: list[list[tuple[str, MessageUpdate, float | None]]]):
    """Webhook calls queued behind a poll cycle, as a burst's are: journaled, then answered."""
    release, cycle = hold_inside_a_transaction(ledger)
    futures = [ledger.report("a", events, SCHEDULE) for events in calls]
    release.set()
    cycle.result(10)
    return [f.result(10) for f in futures]


def test_a_journaled_burst_survives_a_restart_and_counts_each_status_once(
    ledger_location, monkeypatch
):
    """Acknowledged from the journal, stopped before it was counted: counted after the restart,
    every status once however often it came (and `kill -9`: test_callback_durability.py)."""
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)  # the writer never finds time to count
    ledger = open_ledger(ledger_location, vocabulary=CHAT)
    calls = [
        [(f"r{i % 20}", update(f"m{i % 20}", ("sent", "delivered", "read")[i % 3]), None)]
        for i in range(60)  # 20 messages, each read, delivered and sent, some twice
    ] + [[("r0", update("m0", "read"), None)] * 3]
    assert journaled_burst(ledger, calls) == [None] * len(calls)
    assert ledger.backlog() == 63 and ledger.totals()["a"].messages == {}
    ledger.close()

    monkeypatch.setattr(ledger_module, "IDLE", 0.02)
    reopened = open_ledger(ledger_location, vocabulary=CHAT)
    assert reopened.backlog() == 63, "the journal was not kept"
    totals = counted(reopened)
    assert totals["a"].messages == {
        (status, "marketing", ""): 20 for status in ("sent", "delivered", "read")
    }
    assert totals["a"].states["pending"] == 20 and totals["a"].backlog == 0
    reopened.close()
    again = open_ledger(ledger_location, vocabulary=CHAT)
    assert again.totals()["a"].messages == totals["a"].messages, "counted twice"
    again.close()


def test_a_full_journal_refuses_webhooks_until_it_drains(tmp_path, monkeypatch):
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)
    monkeypatch.setattr(ledger_module, "HARD_BACKLOG", 10)
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    journaled_burst(ledger, [[(f"r{i}", update(f"m{i}", "sent"), None)] for i in range(10)])
    with pytest.raises(LedgerError, match="journal holds 10 statuses not yet counted"):
        ledger.report("a", [("r99", update("m99", "sent"), None)], SCHEDULE).result(1)
    monkeypatch.setattr(ledger_module, "IDLE", 0.02)
    ledger.due("a", 1).result(10)  # wakes the writer
    counted(ledger)
    ledger.report("a", [("r99", update("m99", "sent"), None)], SCHEDULE).result(10)
    assert ledger.totals()["a"].messages == {("sent", "marketing", ""): 11}
    ledger.close()


def test_an_unreadable_journal_row_is_dropped_with_an_error_not_stuck_on(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    journaled_burst(ledger, [[(f"r{i}", update(f"m{i}", "sent"), None)] for i in range(5)])
    ledger.close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        db.execute("UPDATE chat_journal SET body = 'not json' WHERE seq = 2")
    monkeypatch.setattr(ledger_module, "IDLE", 0.02)
    reopened = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    totals = counted(reopened)
    assert totals["a"].messages == {("sent", "marketing", ""): 4}
    assert "journal row 2 cannot be read; it is dropped" in caplog.text
    reopened.close()


def test_past_the_soft_backlog_the_writer_counts_between_batches(tmp_path, monkeypatch):
    """Webhooks that never stop coming still get counted: acknowledging slows instead."""
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)  # never idle
    monkeypatch.setattr(ledger_module, "SOFT_BACKLOG", 10)
    monkeypatch.setattr(ledger_module, "CHUNK", 5)
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    journaled_burst(ledger, [[(f"r{i}", update(f"m{i}", "sent"), None)] for i in range(40)])
    for i in range(40, 200):  # one call at a time: each batch is followed by a chunk counted
        ledger.report("a", [(f"r{i}", update(f"m{i}", "sent"), None)], SCHEDULE).result(10)
    assert ledger.backlog() <= 10
    assert ledger.totals()["a"].messages[("sent", "marketing", "")] >= 190
    ledger.close()


KILLED = """
import os, signal, sys
from exporter.tracking import ledger as ledger_module
from exporter.tracking import open_ledger
from tests.test_tracking import CHAT, journaled_burst, update
ledger_module.IDLE = 60.0  # acknowledged, never counted: then killed
ledger = open_ledger(sys.argv[1], vocabulary=CHAT)
calls = [[(f"r{i}", update(f"m{i}", "delivered"), None)] * 2 for i in range(300)]
assert journaled_burst(ledger, calls) == [None] * 300
print(ledger.backlog(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.processes
def test_a_journal_acknowledged_and_then_killed_is_counted_once_after(tmp_path):
    location = str(tmp_path / "l.db")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, location],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout.split() == ["600"], killed.stdout
    reopened = open_ledger(location, vocabulary=CHAT)
    totals = counted(reopened)
    assert totals["a"].messages == {
        ("delivered", "marketing", ""): 300,
        ("sent", "marketing", ""): 300,
    }
    assert totals["a"].states["pending"] == 300
    reopened.close()


def test_a_journal_row_that_cannot_be_counted_is_found_alone_and_dropped(
    tmp_path, monkeypatch, caplog
):
    """Acknowledged rows are counted whatever one of them holds: the chunk that fails is tried
    row by row, and the row that fails alone is logged and dropped, never tried forever."""
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)
    ledger = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    journaled_burst(ledger, [[(f"r{i}", update(f"m{i}", "sent"), None)] for i in range(5)])
    ledger.close()
    with sqlite3.connect(tmp_path / "l.db") as db:  # a read at a time that is no number
        bad = '[["r2", ["m2", "read", "marketing", "", "soon", ""], null]]'
        db.execute("UPDATE chat_journal SET body = ? WHERE seq = 3", (bad,))
    monkeypatch.setattr(ledger_module, "IDLE", 0.02)
    reopened = open_ledger(str(tmp_path / "l.db"), vocabulary=CHAT)
    totals = counted(reopened)
    assert totals["a"].messages == {("sent", "marketing", ""): 4}
    assert "journal row 3 cannot be counted; it is dropped" in caplog.text
    reopened.report("a", [("r9", update("m9", "sent"), None)], SCHEDULE).result(10)
    assert reopened.totals()["a"].messages == {("sent", "marketing", ""): 5}
    reopened.close()
