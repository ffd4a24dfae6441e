"""The D7 ledger on either backend, and what only a ledger that replicas share must do.

Every replica takes ids in and webhooks (`add`, `report`); the elected leader polls (`due`,
`record`) and shows the counts (`totals`). Two `Ledger` objects on one location are two
replicas: two connections, in threads or in processes of their own.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from exporter.providers.d7.statuses import VOCABULARY, open_d7_ledger
from exporter.tracking import Ledger, LedgerError, MessageUpdate, Schedule, Totals
from tests.conftest import ROOT, wait_for
from tests.postgres import (  # noqa: F401 - fixtures
    PASSWORD,
    USER,
    Server,
    ledger_location_fixture,
    postgres_server_fixture,
    postgres_url_fixture,
)

SCHEDULE = Schedule(first=1, max=10, not_found_grace=5, final_after=100, expire_after=1000)
LATER = 600.0  # a poller's clock this far ahead finds every pending id due (not expired)


def read(msg_id: str, status: str, at: float | None = None) -> MessageUpdate:
    return MessageUpdate(msg_id, status, "marketing", "TEMPLATE", at)


def counted(totals: dict[str, Totals], account: str = "a") -> dict[str, int]:
    """Messages per status, over every label."""
    out: dict[str, int] = {}
    for (status, _, _), count in totals[account].messages.items():
        out[status] = out.get(status, 0) + count
    return out


def reopened(location: str) -> dict[str, Totals]:
    """The totals a fresh process would start with."""
    ledger = open_d7_ledger(location)
    try:
        return ledger.totals()
    finally:
        ledger.close()


# --- the same rules on both --------------------------------------------------------------------


def test_a_lifecycle_counts_the_same_on_either_backend(ledger_location):
    clock = [10_000.0]
    ledger = open_d7_ledger(ledger_location, clock=lambda: clock[0])
    changes = []
    ledger.on_change(lambda: changes.append(1))
    assert ledger.add("a", ["r1", "r2", "r3", "r4", "r1"], SCHEDULE).result() == 4
    assert ledger.add("a", ["r1", "r5"], SCHEDULE).result() == 1
    ledger.report("a", [("r1", read("m1", "sent"), clock[0] - 3)], SCHEDULE).result()
    ledger.report(
        "a", [("r6", read("m6", "read", clock[0] + 7), None)], SCHEDULE
    ).result()  # new id
    assert ledger.pending_count("a") == 6
    clock[0] += 2
    due = {d.request_id: d for d in ledger.due("a", 100).result()}
    assert sorted(due) == ["r1", "r2", "r3", "r4", "r5", "r6"]
    ledger.record(
        "a",
        [
            (due["r1"], [read("m1", "delivered"), read("m2", "read")], None),
            (due["r2"], [read("m1", "un_delivered")], None),
            (due["r3"], None, "not_found"),
            (due["r4"], None, "gone"),
            (due["r5"], None, "retry"),
            (due["r6"], [read("m6", "read"), read("m7", "Scheduled")], None),
        ],
        SCHEDULE,
    ).result()
    totals = ledger.totals()["a"]
    assert counted(ledger.totals()) == {
        "sent": 3,  # m1 (webhook), m2 and m6 (implied by read)
        "delivered": 3,  # m1, and m2 and m6 by read
        "read": 2,
        "un_delivered": 1,
        "scheduled": 1,
    }
    assert totals.states == {"pending": 4, "done": 1, "expired": 1}
    assert {s: sum(b) for s, b in totals.buckets.items()} == {"delivered": 1, "read": 2}
    # r1 was sent at 9,997 (its webhook said): m1 delivered and m2 read 5 s later, at the poll;
    # m6 read 7 s after r6 came in (its webhook said when), and the poll's read is not counted
    assert totals.sums == {"delivered": 5.0, "read": 12.0}
    assert ledger.oldest_pending("a").result() == 10_000.0
    assert changes

    clock[0] += 2000  # past expire_after: what is still pending expires
    ledger.expire_old("a", SCHEDULE).result()
    assert ledger.totals()["a"].states == {"pending": 0, "done": 1, "expired": 5}
    ledger.close()
    assert reopened(ledger_location) == ledger.totals()


def test_a_nul_in_a_hostile_id_is_stored_made_safe(ledger_location):
    ledger = open_d7_ledger(ledger_location)
    event = ("r\x00", read("m\x00", "delivered"), None)
    ledger.report("a", [event, event], SCHEDULE).result()
    assert ledger.add("a", ["r\x00", "r\ufffd"], SCHEDULE).result() == 0
    assert counted(ledger.totals()) == {"delivered": 1, "sent": 1}
    ledger.close()


# --- replicas ------------------------------------------------------------------------------------


def test_replicas_taking_the_same_ids_and_statuses_at_once_count_each_once(ledger_location):
    """Four threads on two ledgers (two replicas): every id is new once, and every status of
    every message counts once, while the leader polls the same messages."""
    replicas = [open_d7_ledger(ledger_location), open_d7_ledger(ledger_location)]
    ids = [f"r{i}" for i in range(150)]
    failures: list[BaseException] = []

    def run(work) -> list[threading.Thread]:
        def guarded(*args):
            try:
                work(*args)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=guarded, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures, failures
        return threads

    new = [0] * 4

    def hand_in(n: int) -> None:
        order = random.Random(n).sample(ids, len(ids))
        for start in range(0, len(order), 10):
            new[n] += replicas[n % 2].add("a", order[start : start + 10], SCHEDULE).result()

    run(hand_in)
    assert sum(new) == len(ids)

    # every message: sent, delivered and read, each told twice, by webhooks to both replicas
    events = [
        (rid, read(f"m-{rid}", s), None) for rid in ids for s in ("sent", "delivered", "read")
    ]
    events *= 2
    random.Random(7).shuffle(events)
    poller = open_d7_ledger(ledger_location, clock=lambda: time.time() + LATER)

    def webhooks_and_polls(n: int) -> None:
        if n == 3:  # the leader: its answers say read for the same messages
            while due := poller.due("a", 25).result():
                poller.record(
                    "a", [(d, [read(f"m-{d.request_id}", "read")], None) for d in due], SCHEDULE
                ).result()
            return
        mine = events[n::3]
        for start in range(0, len(mine), 20):
            replicas[n % 2].report("a", mine[start : start + 20], SCHEDULE).result()

    run(webhooks_and_polls)
    for ledger in (*replicas, poller):
        ledger.close()
    totals = reopened(ledger_location)
    assert counted(totals) == {"sent": 150, "delivered": 150, "read": 150}
    assert sum(totals["a"].buckets["read"]) == 150
    assert sum(totals["a"].buckets.get("delivered", [])) <= 150
    assert totals["a"].states == {"pending": 0, "done": 150, "expired": 0}


def test_the_leaders_totals_show_what_other_replicas_wrote(postgres_url):
    leader, other = open_d7_ledger(postgres_url), open_d7_ledger(postgres_url)
    changed = threading.Event()
    leader.on_change(changed.set)
    other.add("a", ["r1", "r2"], SCHEDULE).result()
    other.report("a", [("r3", read("m", "read"), None)], SCHEDULE).result()
    wait_for(lambda: leader.totals() == other.totals(), 5, "the other replica's counts")
    assert leader.pending_count("a") == 3
    assert counted(leader.totals()) == {"sent": 1, "delivered": 1, "read": 1}
    assert changed.is_set(), "the leader's exposition was not told"
    leader.close()
    other.close()


KILLED_MID_RECORD = """
import sys, time
from exporter.providers.d7.statuses import open_d7_ledger
from exporter.tracking import MessageUpdate, Schedule

ledger = open_d7_ledger(sys.argv[1], clock=lambda: time.time() + {later})
schedule = Schedule(**{schedule})

due = ledger.due("a", 1000).result()

def answers():  # consumed inside the transaction
    for index, item in enumerate(due):
        if index == 50:
            print("inside", flush=True)  # half the answers written, nothing committed
            time.sleep(120)
        yield item, [MessageUpdate("m-" + item.request_id, "read", "marketing", "TEMPLATE")], None

ledger.record("a", answers(), schedule).result()
"""


@pytest.mark.processes
def test_a_leader_killed_mid_transaction_leaves_nothing_half_written(ledger_location):
    ids = [f"r{i}" for i in range(100)]
    ledger = open_d7_ledger(ledger_location)
    ledger.add("a", ids, SCHEDULE).result()
    schedule = {f: getattr(SCHEDULE, f) for f in ("first", "max", "not_found_grace")}
    script = KILLED_MID_RECORD.format(later=LATER, schedule=schedule)
    leader = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), ledger_location],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert leader.stdout.readline() == "inside\n", leader.stderr.read()
    finally:
        leader.send_signal(signal.SIGKILL)
        leader.wait(10)
    assert leader.returncode == -signal.SIGKILL

    at_kill = reopened(ledger_location)
    assert at_kill["a"].states == {"pending": 100, "done": 0, "expired": 0}
    assert at_kill["a"].messages == {} and at_kill["a"].buckets == {}

    # the next leader: the killed one's lock went with its connection
    successor = open_d7_ledger(ledger_location, clock=lambda: time.time() + LATER)
    started = time.monotonic()
    due = successor.due("a", 1000).result()
    successor.record(
        "a", [(d, [read(f"m-{d.request_id}", "read")], None) for d in due], SCHEDULE
    ).result()
    assert time.monotonic() - started < 5
    assert counted(successor.totals()) == {"sent": 100, "delivered": 100, "read": 100}
    assert successor.totals()["a"].states == {"pending": 0, "done": 100, "expired": 0}
    successor.close()
    if ledger_location.startswith("postgresql://"):  # a replica that stayed up sees it too
        wait_for(lambda: ledger.pending_count("a") == 0, 5, "the successor's counts")
    ledger.close()


OPEN_ON_GO = """
import sys
from exporter.providers.d7.statuses import open_d7_ledger
from exporter.tracking import Schedule

print("ready", flush=True)
sys.stdin.readline()
ledger = open_d7_ledger(sys.argv[1])
print(ledger.add("a", [sys.argv[2]], Schedule()).result())
ledger.close()
"""


def test_replicas_starting_at_once_create_the_schema_once(postgres_url):
    """Concurrent CREATE ... IF NOT EXISTS collide in PostgreSQL's catalog without the lock.
    (A fresh SQLite file opened by processes at once is no case: one process writes it.)"""
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(OPEN_ON_GO), postgres_url, f"r{n}"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    for replica in replicas:  # every one has imported everything: they open at once
        assert replica.stdout.readline() == "ready\n", replica.stderr.read()
    for replica in replicas:
        replica.stdin.write("go\n")
        replica.stdin.flush()
    outputs = [replica.communicate(timeout=60) for replica in replicas]
    assert [(r.returncode, out) for r, (out, _) in zip(replicas, outputs, strict=True)] == [
        (0, "1\n")
    ] * 6, [err for _, err in outputs]
    assert reopened(postgres_url)["a"].states["pending"] == 6


# --- opening a shared ledger --------------------------------------------------------------------


def url_without_password(server: Server, url: str) -> str:
    return url.replace(f":{PASSWORD}@", "@")


def one_line_without_secrets(error: pytest.ExceptionInfo[LedgerError], *secrets: str) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    for secret in secrets:
        assert secret not in text
    return text


def test_a_wrong_password_is_one_line_without_the_password(postgres_server, postgres_url):
    wrong = "wrong-Pa55word"
    with pytest.raises(LedgerError) as error:
        open_d7_ledger(postgres_url.replace(PASSWORD, wrong))
    text = one_line_without_secrets(error, wrong, PASSWORD)
    assert text.startswith(f"cannot open the D7 ledger at postgresql://{USER}@127.0.0.1:")
    assert "password authentication failed" in text

    with pytest.raises(LedgerError) as error:
        open_d7_ledger(postgres_url, password=wrong)  # the given password wins over the URL's
    one_line_without_secrets(error, wrong, PASSWORD)


def test_the_password_comes_from_the_caller_or_libpqs_environment(
    postgres_server, postgres_url, monkeypatch, tmp_path
):
    bare = url_without_password(postgres_server, postgres_url)
    assert bare != postgres_url
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(LedgerError, match="password"):
        open_d7_ledger(bare)
    open_d7_ledger(bare, password=PASSWORD).close()
    open_d7_ledger(postgres_url.replace(PASSWORD, "wrong"), password=PASSWORD).close()

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    open_d7_ledger(bare).close()
    monkeypatch.delenv("PGPASSWORD")

    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_server.port}:*:{USER}:{PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    open_d7_ledger(bare).close()


def test_an_unreachable_server_is_one_line_without_the_password():
    with pytest.raises(LedgerError) as error:
        open_d7_ledger(f"postgresql://{USER}:{PASSWORD}@127.0.0.1:1/ledger?connect_timeout=2")
    text = one_line_without_secrets(error, PASSWORD)
    assert text.startswith(f"cannot open the D7 ledger at postgresql://{USER}@127.0.0.1:1/ledger")
    for url in (
        f"postgresql://{USER}:{PASSWORD}@127.0.0.1:port/ledger",
        f"postgresql://127.0.0.1/ledger?password={PASSWORD}&sslmode=bogus",
    ):
        with pytest.raises(LedgerError) as error:
            open_d7_ledger(url)
        one_line_without_secrets(error, PASSWORD)


def test_a_lost_connection_is_replaced_without_an_error(postgres_server, postgres_url):
    ledger = open_d7_ledger(postgres_url)
    ledger.add("a", ["r1"], SCHEDULE).result()
    database = postgres_url.rsplit("/", 1)[1]
    terminated = postgres_server.admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE datname = '{database}' AND application_name = 'whatsapp-exporter-ledger'"
    )
    assert terminated == [(True,)]
    assert ledger.add("a", ["r2"], SCHEDULE).result() == 1
    assert [
        d.request_id for d in open_d7_ledger(postgres_url, clock=lambda: 1e12).due("a", 9).result()
    ] == [
        "r1",
        "r2",
    ]
    ledger.close()


def test_a_sqlite_path_still_opens_as_before(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "l.db", vocabulary=VOCABULARY)
    assert ledger.add("a", ["r"], SCHEDULE).result() == 1
    ledger.close()
    assert open_d7_ledger(str(tmp_path / "sub" / "l.db")).pending_count("a") == 1


def test_a_closed_ledger_refuses_rather_than_reconnects(ledger_location):
    ledger = open_d7_ledger(ledger_location)
    ledger.close()
    with pytest.raises(LedgerError, match="cannot read the D7 ledger"):
        ledger.due("a", 1).result()
    with pytest.raises(LedgerError, match="cannot write the D7 ledger"):
        ledger.add("a", ["r"], SCHEDULE).result()
