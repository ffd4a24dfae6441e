"""D7 delivery tracking: ingest, lifecycle against the simulator, expiry, webhook/poll races."""

from __future__ import annotations

import sqlite3
import time
import uuid

import httpx
import pytest

from exporter.providers.d7.statuses import VOCABULARY, open_d7_ledger
from exporter.tracking import BUCKETS, Due, Ledger, MessageUpdate, Schedule
from simulators import D7Simulator, Fault
from tests.conftest import run_exporter, value, values, wait_for
from tests.postgres import (  # noqa: F401 - fixtures: ledger_location runs on either backend
    ledger_location_fixture,
    postgres_server_fixture,
    postgres_url_fixture,
)

TOKEN = "ingest-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def config(sim: D7Simulator, **overrides: str) -> str:
    settings = {
        "interval": "0.2s",
        "retry_first": "0.2s",
        "retry_max": "1s",
        "not_found_grace": "30s",
        "rate_limit": "6000/m",
        **overrides,
    }
    lines = "\n".join(f"    {k}: {v}" for k, v in settings.items())
    return f"""
d7:
  - account: prod
    base_url: {sim.base_url}
    token: demo-token
    ingest_token: {TOKEN}
{lines}
  - account: other
    base_url: {sim.base_url}
    token: demo-token
    ingest_token: other-secret
"""


@pytest.fixture
def sim():
    with D7Simulator(auto=False, index_delay=0) as sim:
        yield sim


def hand_in(running, ids, account="prod", headers=AUTH) -> httpx.Response:
    return httpx.post(
        f"{running.url}/api/v1/requests",
        json={"account": account, "request_ids": ids},
        headers=headers,
        timeout=10,
    )


def tracked(running, state: str) -> float | None:
    return value(running.scrape(), "whatsapp_tracked_requests", account="prod", state=state)


# --- ingest ---------------------------------------------------------------------------------


def test_ingest_is_authenticated_validated_and_idempotent(sim):
    with run_exporter(config(sim)) as running:
        ids = [str(uuid.uuid4()) for _ in range(3)]
        first = hand_in(running, ids)
        assert first.status_code == 202
        assert first.json() == {"account": "prod", "received": 3, "new": 3, "pending": 3}
        again = hand_in(running, [ids[0], ids[0], str(uuid.uuid4())])
        assert again.json()["new"] == 1  # the same id twice is tracked once
        wait_for(lambda: tracked(running, "pending") == 4, 5, "4 pending (next publication)")

        refusals = {
            "no token": hand_in(running, ids, headers={}),
            "bad token": hand_in(running, ids, headers={"Authorization": "Bearer nope"}),
            "not bearer": hand_in(running, ids, headers={"Authorization": f"Basic {TOKEN}"}),
            "other account's token": hand_in(
                running, ids, account="prod", headers={"Authorization": "Bearer other-secret"}
            ),
            "unknown account": hand_in(running, ids, account="nope"),
            "too many": hand_in(running, [f"id-{i}" for i in range(1001)]),
            "empty": hand_in(running, []),
            "bad id": hand_in(running, ["ok-1", "has space"]),
            "not a string": hand_in(running, ["ok-2", 5]),
        }
        statuses = {name: r.status_code for name, r in refusals.items()}
        assert statuses == {
            "no token": 401,
            "bad token": 401,
            "not bearer": 401,
            "other account's token": 403,
            "unknown account": 404,
            "too many": 422,
            "empty": 422,
            "bad id": 422,
            "not a string": 422,
        }
        assert "request_ids.1" in refusals["bad id"].json()["error"]
        assert all("error" in r.json() for r in refusals.values())

        raw = {
            "not json": httpx.post(
                f"{running.url}/api/v1/requests", content=b"{nope", headers=AUTH
            ),
            "wrong shape": httpx.post(f"{running.url}/api/v1/requests", json=["a"], headers=AUTH),
            "extra key": httpx.post(
                f"{running.url}/api/v1/requests",
                headers=AUTH,
                json={"account": "prod", "request_ids": ["a"], "x": 1},
            ),
            "too large": httpx.post(
                f"{running.url}/api/v1/requests", headers=AUTH, content=b" " * (2 << 20)
            ),
        }
        assert {k: r.status_code for k, r in raw.items()} == {
            "not json": 400,
            "wrong shape": 422,
            "extra key": 422,
            "too large": 413,
        }
        # nothing partial was stored by any refused call ("ok-1", "ok-2" came with bad ids)
        wait_for(lambda: tracked(running, "pending") == 4, 5, "4 pending (next publication)")


def test_webhook_events_flat_nested_and_batched_start_tracking(sim):
    with run_exporter(config(sim, retry_first="1h")) as running:
        url = f"{running.url}/webhooks/d7/prod"
        flat = {
            "event_type": "DELIVERY_EVENTS",
            "timestamp": int(time.time() * 1000),
            "request_id": "req-flat",
            "msg_id": "m1",
            "status": "delivered",
            "conversation_type": "marketing",
            "message_type": "TEMPLATE",
            "cust_ref": "c",
            "message_tag1": "t",
        }
        nested = {
            **flat,
            "request_id": "req-nested",
            "status": "read",
            "reference": {"cust_ref": "c", "message_tag1": "t"},
        }
        del nested["cust_ref"], nested["message_tag1"]
        assert httpx.post(url, json=flat, headers=AUTH).status_code == 200
        assert httpx.post(url, json=[nested], headers=AUTH).json() == {
            "account": "prod",
            "accepted": 1,
        }
        assert httpx.post(url, json=flat, headers={}).status_code == 401
        assert (
            httpx.post(f"{running.url}/webhooks/d7/nope", json=flat, headers=AUTH).status_code
            == 404
        )
        bad = httpx.post(url, json=[flat, {"status": "read"}], headers=AUTH)
        assert bad.status_code == 422 and "event[1]: request_id" in bad.json()["error"]
        refused = {
            "not json": httpx.post(url, content=b'[{"status": ', headers=AUTH),
            "empty list": httpx.post(url, json=[], headers=AUTH),
            "too many": httpx.post(url, json=[flat] * 1001, headers=AUTH),
            "no object": httpx.post(url, json="delivered", headers=AUTH),
            "bad field": httpx.post(url, json={**flat, "status": 5}, headers=AUTH),
        }
        assert {
            k: (r.status_code, r.json()["error"].split(":")[0]) for k, r in refused.items()
        } == {
            "not json": (400, "the body is not JSON"),
            "empty list": (422, "send 1 to 1000 events at a time, not 0"),
            "too many": (422, "send 1 to 1000 events at a time, not 1001"),
            "no object": (422, "event[0]"),
            "bad field": (422, "event[0]"),
        }
        # an answer means stored; /metrics shows it at the next coalesced publication
        wait_for(lambda: tracked(running, "pending") == 2, 10, "both requests to be shown")
        series = running.scrape()
    labels = {"account": "prod", "conversation_type": "marketing", "message_type": "template"}
    assert value(series, "whatsapp_messages_total", status="delivered", **labels) == 2
    assert value(series, "whatsapp_messages_total", status="sent", **labels) == 2
    assert value(series, "whatsapp_messages_total", status="read", **labels) == 1
    # both are tracked; only a poll, which sees every message of a request, finishes one
    assert value(series, "whatsapp_tracked_requests", account="prod", state="pending") == 2
    assert value(series, "whatsapp_tracked_requests", account="prod", state="done") == 0


# --- following ids against the simulator ----------------------------------------------------


@pytest.mark.slow
def test_lifecycle_counts_each_status_once_and_observes_latency(sim):
    ids = [
        sim.send(recipients=1, conversation_type="utility", message_type="TEXT") for _ in range(4)
    ]
    with run_exporter(config(sim)) as running:
        assert hand_in(running, ids).status_code == 202
        for request_id in ids:
            sim.advance(request_id, "sent")
        # each of these ids asked for while sent (the idle canary at start is a report too)
        wait_for(
            lambda: {r.path.rsplit("/", 1)[-1] for r in sim.requests} >= set(ids),
            10,
            "the ids to be polled",
        )
        sim.advance(ids[0], "delivered")
        sim.advance(ids[1], "read")
        sim.advance(ids[2], "un_delivered")
        sim.advance(ids[3], "rejected")
        wait_for(lambda: tracked(running, "done") == 3, 15, "three final requests")
        sim.advance(ids[0], "read")
        wait_for(lambda: tracked(running, "done") == 4, 15, "the fourth")
        # polled again and again after the end: nothing counts twice
        before = running.scrape()
        time.sleep(1.0)
        after = running.scrape()
    labels = {"account": "prod", "conversation_type": "utility", "message_type": "text"}
    counts = {
        s: value(after, "whatsapp_messages_total", status=s, **labels)
        for s in ("sent", "delivered", "read", "un_delivered", "rejected")
    }
    assert counts == {"sent": 4, "delivered": 2, "read": 2, "un_delivered": 1, "rejected": 1}
    assert {k: v for k, v in before.items() if "messages_total" in k[0]} == {
        k: v for k, v in after.items() if "messages_total" in k[0]
    }
    delivered = value(after, "whatsapp_message_delivery_seconds_count", status="delivered")
    read = value(after, "whatsapp_message_delivery_seconds_count", status="read")
    assert (delivered, read) == (1, 2)  # ids[1] went to read without a delivered answer
    assert value(after, "whatsapp_message_delivery_seconds_bucket", status="read", le="+Inf") == 2
    assert all(r.headers["authorization"] == "Bearer demo-token" for r in sim.requests)
    assert {r.path.rsplit("/", 1)[0] for r in sim.requests} == {"/whatsapp/v2/report"}


@pytest.mark.slow
def test_not_found_is_retried_for_the_grace_then_expired(sim):
    unknown = str(uuid.uuid4())
    with run_exporter(config(sim, not_found_grace="1s")) as running:
        assert hand_in(running, [unknown]).status_code == 202
        wait_for(lambda: tracked(running, "expired") == 1, 10, "the unknown id to expire")
        asked = [r for r in sim.requests if r.path.endswith(f"/{unknown}")]  # (not the canary)
        series = running.scrape()
    assert len(asked) >= 2  # retried within the grace before giving up
    assert value(series, "whatsapp_exporter_up", provider="d7", account="prod") == 1


def test_auth_failure_is_the_accounts_up_0(sim):
    request_id = sim.send()
    with run_exporter(config(sim).replace("token: demo-token", "token: wrong", 1)) as running:
        hand_in(running, [request_id])
        wait_for(
            lambda: value(running.scrape(), "whatsapp_exporter_up", account="prod") == 0,
            10,
            "up to drop",
        )
        series = running.scrape()
    assert value(series, "whatsapp_exporter_poll_errors_total", account="prod", reason="auth") >= 1
    assert value(series, "whatsapp_tracked_requests", account="prod", state="pending") == 1


def test_an_idle_account_still_proves_its_token(sim):
    with run_exporter(config(sim)) as running:
        wait_for(
            lambda: value(running.scrape(), "whatsapp_exporter_up", account="prod") == 1,
            10,
            "the canary of an account with nothing pending",
        )
    canary = next(r for r in sim.requests if r.endpoint == "report")
    assert canary.path == "/whatsapp/v2/report/00000000-0000-4000-8000-000000000000"


@pytest.mark.slow
def test_webhook_and_poll_racing_for_one_message_count_it_once(sim):
    request_id = sim.send(conversation_type="service", message_type="TEXT")
    sim.advance(request_id, "read")
    (message,) = sim.messages(request_id)
    sim.fail("report", Fault.latency(0.3))
    with run_exporter(config(sim, retry_first="0.01s")) as running:
        hand_in(running, [request_id])
        event = {
            "request_id": request_id,
            "msg_id": message.msg_id,
            "status": "read",
            "conversation_type": "service",
            "message_type": "TEXT",
            "timestamp": int(time.time() * 1000),
        }
        # the webhook lands while the poll of the same message is in flight
        wait_for(lambda: any(r.endpoint == "report" for r in sim.requests), 10, "the poll")
        httpx.post(f"{running.url}/webhooks/d7/prod", json=event, headers=AUTH)
        httpx.post(f"{running.url}/webhooks/d7/prod", json=event, headers=AUTH)  # D7 retries
        wait_for(lambda: tracked(running, "done") == 1, 10, "the request to finish")
        time.sleep(0.5)
        series = running.scrape()
    labels = {"account": "prod", "conversation_type": "service", "message_type": "text"}
    for status in ("sent", "delivered", "read"):
        assert value(series, "whatsapp_messages_total", status=status, **labels) == 1
    assert value(series, "whatsapp_message_delivery_seconds_count", status="read") == 1


# --- the ledger itself ----------------------------------------------------------------------


def test_expire_after_and_keep_finished(ledger_location):
    clock = [1000.0]
    ledger = open_d7_ledger(ledger_location, clock=lambda: clock[0])
    schedule = Schedule(first=1, max=10, expire_after=100, keep_finished=30)
    ledger.add("a", ["old", "young"], schedule).result()
    clock[0] += 60
    ledger.add("a", ["newer"], schedule).result()
    clock[0] += 50  # "old" and "young" are 110s old, "newer" 50s
    ledger.expire_old("a", schedule).result()
    assert ledger.totals()["a"].states == {"pending": 1, "done": 0, "expired": 2}
    clock[0] += 31  # past keep_finished: the expired rows are forgotten; "newer" is 81s old
    ledger.expire_old("a", schedule).result()
    assert ledger.totals()["a"].states == {"pending": 1, "done": 0, "expired": 0}
    ledger.close()


def test_totals_survive_a_restart_and_a_rollback_leaves_no_trace(ledger_location):
    ledger = open_d7_ledger(ledger_location)
    schedule = Schedule()
    ledger.add("a", ["r1"], schedule).result()
    ledger.report(
        "a", [("r1", MessageUpdate("m1", "delivered", "marketing", "TEXT"), None)], schedule
    ).result()
    before = ledger.totals()

    class Crash:  # a status that cannot be read: a crash mid-transaction, after m1 was counted
        def __str__(self):
            raise ZeroDivisionError

    due = Due("a", "r1", time.time(), 0, None)
    updates = [MessageUpdate("m1", "read"), MessageUpdate("m2", Crash())]
    with pytest.raises(ZeroDivisionError):
        ledger.record("a", [(due, updates, None)], schedule).result()
    assert ledger.totals()["a"].messages == before["a"].messages
    assert ledger.add("a", ["r2"], schedule).result() == 1, "the writer goes on after a crash"
    ledger.close()
    reopened = open_d7_ledger(ledger_location)
    assert reopened.totals()["a"].messages == before["a"].messages
    assert reopened.totals()["a"].buckets["delivered"] == before["a"].buckets["delivered"]
    assert len(before["a"].buckets["delivered"]) == len(BUCKETS) + 1
    reopened.close()
    if ledger_location.startswith("postgresql://"):
        return
    with sqlite3.connect(ledger_location) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_labels_are_bounded(ledger_location):
    ledger = open_d7_ledger(ledger_location)
    ledger.report(
        "a", [("r", MessageUpdate("m", "weird", "+4915112345678", "SPAM"), None)], Schedule()
    ).result()
    assert list(ledger.totals()["a"].messages) == [("unknown", "other", "other")]
    ledger.close()


def test_unwritable_storage_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match="cannot open the D7 ledger at"):
        Ledger(blocker / "sub" / "l.db", vocabulary=VOCABULARY)


def test_histogram_buckets_in_the_exposition(sim):
    with run_exporter(config(sim, retry_first="1h")) as running:
        event = {"request_id": "r", "msg_id": "m", "status": "read", "timestamp": 0}
        httpx.post(f"{running.url}/webhooks/d7/prod", json=event, headers=AUTH)
        buckets = wait_for(  # shown on the next coalesced publication
            lambda: values(
                running.scrape(), "whatsapp_message_delivery_seconds_bucket", status="read"
            ),
            5,
            "the histogram",
        )
    bounds = [labels["le"] for labels, _ in buckets]
    assert len(bounds) == len(BUCKETS) + 1 and "+Inf" in bounds and "86400.0" in bounds


def test_webhook_secret_in_the_path_for_callbacks_that_send_no_header(sim, caplog):
    """(retry_first: the id is not polled meanwhile: D7 would call it gone, and it would expire.)"""
    secret = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    with run_exporter(config(sim, webhook_secret=secret, retry_first="1h")) as running:
        event = {"request_id": "r-1", "msg_id": "m", "status": "delivered"}
        good = httpx.post(f"{running.url}/webhooks/d7/prod/{secret}", json=event, timeout=10)
        wrong = httpx.post(f"{running.url}/webhooks/d7/prod/{'x' * 32}", json=event, timeout=10)
        other = httpx.post(f"{running.url}/webhooks/d7/other/{secret}", json=event, timeout=10)
        unknown = httpx.post(f"{running.url}/webhooks/d7/nope/{secret}", json=event, timeout=10)
        running.wait_for_metric("whatsapp_exporter_last_webhook_timestamp_seconds", account="prod")
        series = running.scrape()
        page = httpx.get(f"{running.url}/").text
    assert good.status_code == 200, good.text
    # a wrong secret, another account's path, an unknown account: all alike, nothing stored
    assert {wrong.status_code, other.status_code, unknown.status_code} == {401}
    assert value(series, "whatsapp_tracking_webhook_events_total", account="prod") == 1
    assert value(series, "whatsapp_tracked_requests", account="prod", state="pending") == 1
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert secret not in logged and secret not in page


def test_ingest_counts_ids_new_known_and_refused(sim):
    with run_exporter(config(sim, retry_first="1h")) as running:
        ids = [str(uuid.uuid4()) for _ in range(3)]
        assert hand_in(running, ids).status_code == 202
        assert hand_in(running, [ids[0], str(uuid.uuid4())]).status_code == 202
        refused = httpx.post(
            f"{running.url}/api/v1/requests",
            json={"account": "prod", "request_ids": ["ok", "not valid!"]},
            headers=AUTH,
            timeout=10,
        )
        assert refused.status_code == 422
        refusals = {"account": "prod", "result": "refused"}
        wait_for(
            lambda: value(running.scrape(), "whatsapp_tracking_ids_total", **refusals) == 2,
            10,
            "the refused ids to be counted",
        )
        series = running.scrape()
    counted = {
        result: value(series, "whatsapp_tracking_ids_total", account="prod", result=result)
        for result in ("new", "known", "refused")
    }
    assert counted == {"new": 4, "known": 1, "refused": 2}


def test_a_reload_changes_who_may_hand_in_at_once(sim, tmp_path):
    """The ingest path keeps the accounts map of the running config: a reload that adds an
    account and changes a token takes effect with the reload's answer."""
    path = tmp_path / "config.yaml"
    path.write_text(config(sim))
    with run_exporter(path) as running:
        assert hand_in(running, ["a-1"], account="new").status_code == 404
        path.write_text(
            config(sim).replace("other-secret", "other-rotated")
            + f"""  - account: new
    base_url: {sim.base_url}
    token: demo-token
    ingest_token: new-secret
"""
        )
        assert httpx.post(f"{running.url}/-/reload", timeout=10).status_code == 200
        new = {"Authorization": "Bearer new-secret"}
        assert hand_in(running, ["a-1"], account="new", headers=new).status_code == 202
        old = {"Authorization": "Bearer other-secret"}
        assert hand_in(running, ["a-2"], account="other", headers=old).status_code == 401
        rotated = {"Authorization": "Bearer other-rotated"}
        assert hand_in(running, ["a-2"], account="other", headers=rotated).status_code == 202
