"""Meta's webhooks against a running exporter, over real HTTP: the handshake, signatures, real
payloads (pywa's, tests/testdata/pywa/), statuses counted once per message, failures by code,
latency, events, and the polled gauges a webhook changes at once."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from exporter.providers.meta import webhooks
from exporter.tracking import ledger as ledger_module
from exporter.tracking import open_ledger
from simulators import MetaSimulator
from tests.conftest import run_exporter, value, values, wait_for
from tests.postgres import (  # noqa: F401 - fixtures: ledger_location runs on either backend
    ledger_location_fixture,
    postgres_server_fixture,
    postgres_url_fixture,
)
from tests.test_tracking import counted as tracking_counted
from tests.test_tracking import journaled_burst

SECRET = "app-secret-of-the-meta-app"
VERIFY = "verify-me"
PYWA = Path(__file__).parent / "testdata" / "pywa"


def payloads(name: str) -> dict:
    return json.loads((PYWA / f"{name}.json").read_text())


def config(sim: MetaSimulator, extra: str = "") -> str:
    return f"""
defaults: {{interval: 30s, timeout: 2s}}
meta:
  - account: acme
    base_url: {sim.base_url}
    token: demo-token
    waba_id: "{sim.waba_id}"
    app_secret: {SECRET}
    verify_token: {VERIFY}
    templates: {{interval: 1h}}
    health: {{interval: 1h}}
{extra}"""


def signature(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(running, body: bytes | dict, *, account="acme", secret=SECRET, headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"X-Hub-Signature-256": signature(raw, secret), "Content-Type": "application/json"}
    return httpx.post(
        f"{running.url}/webhooks/meta/{account}",
        content=raw,
        headers=headers if headers is not None else sent,
        timeout=10,
    )


def ours(body: dict, waba: str, at: float | None = None) -> dict:
    """A pywa example made this account's: its WABA id, and its times moved to `at`."""
    body = copy.deepcopy(body)
    for entry in body["entry"]:
        entry["id"] = waba
        if at is not None:
            entry["time"] = int(at)
            for change in entry["changes"]:
                for status in change["value"].get("statuses", []):
                    status["timestamp"] = str(int(at))
    return body


def status_body(waba: str, *statuses: dict) -> dict:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": waba,
                "changes": [
                    {
                        "field": "messages",
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": "15550000001",
                                "phone_number_id": "106540352242922",
                            },
                            "statuses": list(statuses),
                        },
                    }
                ],
            }
        ],
    }


def status(wamid: str, kind: str, at: float, category: str = "marketing", **more) -> dict:
    return {
        "id": wamid,
        "status": kind,
        "timestamp": str(int(at)),
        "recipient_id": "15551234567",
        "pricing": {"billable": True, "pricing_model": "PMP", "category": category},
        **more,
    }


def expect(read, expected, timeout: float = 5.0) -> None:
    """`read()` comes to give `expected`: the exporter publishes a change a moment after it
    answers (once for a burst of webhooks, not once per webhook)."""
    deadline = time.monotonic() + timeout
    while (got := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == expected


def metric(running, name: str, **labels: str):
    return lambda: value(running.scrape(), name, **labels)


def counted(running, **labels) -> dict[str, float]:
    """Messages per status, summed over the other labels."""
    out: dict[str, float] = {}
    for lab, v in values(running.scrape(), "whatsapp_messages_total", provider="meta", **labels):
        out[lab["status"]] = out.get(lab["status"], 0) + v
    return {status: v for status, v in out.items() if v}


@pytest.fixture
def sim():
    with MetaSimulator(auto=False, call_budget=None) as sim:
        sim.set_template("spring_sale", "en_US", status="APPROVED", quality="GREEN")
        yield sim


@pytest.fixture
def running(sim):
    with run_exporter(config(sim)) as running:
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "ready")
        yield running


# --- the subscription handshake and signatures ---------------------------------------------


def test_the_handshake_echoes_the_challenge_only_for_the_verify_token(running):
    url = f"{running.url}/webhooks/meta/acme"
    good = {"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"}
    answer = httpx.get(url, params=good)
    assert answer.status_code == 200 and answer.text == "1158201444"
    assert httpx.get(url, params={**good, "hub.verify_token": "guess"}).status_code == 403
    assert httpx.get(url, params={**good, "hub.mode": "unsubscribe"}).status_code == 403
    assert httpx.get(url, params={**good, "hub.challenge": "<script>"}).status_code == 400
    assert httpx.get(f"{running.url}/webhooks/meta/nobody", params=good).status_code == 404
    expect(metric(running, "whatsapp_webhook_refused_total", reason="verify_token"), 2)


def test_unsigned_wrongly_signed_malformed_and_huge_deliveries_are_refused_and_counted(
    running, sim
):
    body = json.dumps(status_body(sim.waba_id, status("wamid.A", "sent", time.time()))).encode()
    assert deliver(running, body, headers={"Content-Type": "application/json"}).status_code == 401
    assert deliver(running, body, secret="another app's secret").status_code == 401
    tampered = body.replace(b"sent", b"read")
    sent = {"X-Hub-Signature-256": signature(body)}
    assert deliver(running, tampered, headers=sent).status_code == 401
    assert deliver(running, b"{not json").status_code == 400
    assert deliver(running, {"entry": "no list"}).status_code == 400
    assert deliver(running, b"[" * 5000 + b"]" * 5000).status_code == 400
    assert deliver(running, b" " * (2 << 20)).status_code == 413
    expect(metric(running, "whatsapp_webhook_refused_total", reason="too_large"), 1)
    series = running.scrape()
    refused = {
        lab["reason"]: v
        for lab, v in values(series, "whatsapp_webhook_refused_total", account="acme")
    }
    assert refused == {"signature": 3, "malformed": 3, "too_large": 1, "verify_token": 0}
    expect(lambda: counted(running), {})  # nothing refused was stored


def test_every_reason_and_account_counter_exists_at_zero_from_the_start(running):
    series = running.scrape()
    for reason in webhooks.REFUSED:
        assert value(series, "whatsapp_webhook_refused_total", account="acme", reason=reason) == 0
    assert value(series, "whatsapp_account_restricted", provider="meta", account="acme") == 0
    for state in ("pending", "done", "expired"):
        assert value(series, "whatsapp_tracked_messages", account="acme", state=state) == 0
    assert (
        value(series, "whatsapp_tracking_problems_total", provider="meta", problem="unknown_waba")
        == 0
    )


# --- statuses -----------------------------------------------------------------------------------


def test_pywas_status_examples_count_each_message_once_per_status(running, sim, caplog):
    caplog.set_level(logging.DEBUG)
    examples = payloads("message_status")
    now = time.time()
    for name in ("sent", "delivered", "read", "sent", "read", "played", "with_tracker"):
        answer = deliver(running, ours(examples[name], sim.waba_id, now))
        assert answer.status_code == 200, answer.text
    failed = ours(examples["failed"], sim.waba_id, now)
    failed["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = "wamid.failed-one"
    for _ in range(3):  # Meta repeats: counted once
        assert deliver(running, failed).status_code == 200
    group = ours(examples["group"], sim.waba_id, now)
    assert deliver(running, group).status_code == 200
    # wamid.xyzxyz: sent, delivered, read, played, with repeats; the group message: read, so
    # delivered and sent too; wamid.failed-one: failed
    expect(
        lambda: counted(running), {"sent": 2, "delivered": 2, "read": 2, "played": 1, "failed": 1}
    )
    series = running.scrape()
    assert value(series, "whatsapp_message_failures_total", account="acme", code="130472") == 1
    assert value(series, "whatsapp_tracked_messages", account="acme", state="done") == 3
    text = running.metrics_text()
    logged = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    for secret in ("wamid.", "972987654321", "some data", "7270432eae37498234f4444b35ffc5"):
        assert secret not in text and secret not in logged


def test_out_of_order_and_repeated_statuses_latency_and_categories(running, sim):
    now = time.time()
    sent_at = now - 100
    statuses = [
        status("wamid.1", "delivered", now - 40),  # before its sent arrives
        status("wamid.1", "sent", sent_at),
        status("wamid.1", "read", now - 10),
        status("wamid.1", "read", now - 10),
        status("wamid.2", "read", now, category="utility"),  # delivered never comes
        status("wamid.3", "sent", now, category="authentication"),
    ]
    assert deliver(running, status_body(sim.waba_id, *statuses[:2])).status_code == 200
    assert deliver(running, status_body(sim.waba_id, *statuses[2:])).status_code == 200
    expect(
        lambda: counted(running, conversation_type="marketing"),
        {"sent": 1, "delivered": 1, "read": 1},
    )
    expect(
        lambda: counted(running, conversation_type="utility"),
        {"sent": 1, "delivered": 1, "read": 1},
    )
    expect(lambda: counted(running, conversation_type="authentication"), {"sent": 1})
    series = running.scrape()
    read_count = value(
        series, "whatsapp_message_delivery_seconds_count", account="acme", status="read"
    )
    read_sum = value(series, "whatsapp_message_delivery_seconds_sum", account="acme", status="read")
    # wamid.1: sent 100 s ago, read 10 s ago; wamid.2's sent time is unknown: not observed
    assert read_count == 1 and read_sum == pytest.approx(90, abs=1)
    delivered = "whatsapp_message_delivery_seconds_sum"
    assert value(series, delivered, account="acme", status="delivered") == pytest.approx(60, abs=1)
    assert value(series, "whatsapp_tracked_messages", account="acme", state="pending") == 1
    assert value(series, "whatsapp_tracked_messages", account="acme", state="done") == 2


def test_a_bad_timestamp_keeps_the_status_and_counts_a_problem(running, sim):
    body = status_body(sim.waba_id, {"id": "wamid.t", "status": "sent", "timestamp": "soon"})
    assert deliver(running, body).status_code == 200
    expect(lambda: counted(running), {"sent": 1})
    expect(metric(running, "whatsapp_tracking_problems_total", problem="bad_timestamp"), 1)


def test_an_entry_of_an_unknown_waba_is_kept_and_counted(running):
    body = status_body("999999999", status("wamid.u", "sent", time.time()))
    assert deliver(running, body).status_code == 200
    expect(lambda: counted(running), {"sent": 1})
    expect(metric(running, "whatsapp_tracking_problems_total", problem="unknown_waba"), 1)


def test_statuses_survive_a_restart_and_are_not_counted_again(sim, tmp_path, ledger_location):
    """On SQLite, and on PostgreSQL as replicas share it."""
    now = time.time()
    body = status_body(
        sim.waba_id, status("wamid.r", "sent", now), status("wamid.r", "delivered", now)
    )
    where = (
        {"storage": tmp_path}
        if ledger_location.endswith(".db")
        else {"storage_url": ledger_location, "storage": tmp_path}
    )
    with run_exporter(config(sim), **where) as running:
        assert deliver(running, body).status_code == 200
    with run_exporter(config(sim), **where) as running:
        expect(lambda: counted(running), {"sent": 1, "delivered": 1})
        assert deliver(running, body).status_code == 200  # Meta's retry after the restart
        time.sleep(0.3)  # (a count that wrongly rose would be published by now)
        expect(lambda: counted(running), {"sent": 1, "delivered": 1})


def test_a_journaled_burst_keeps_ids_statuses_times_and_codes_never_a_recipient(
    tmp_path, monkeypatch
):
    """The tracking room journals a burst's statuses as the parse kept them and makes their
    updates only when it counts them: what reaches the disk is that much and no more, and it
    counts as the statuses did (category, implied steps, a failure's code, a non-ASCII id)."""
    monkeypatch.setattr(ledger_module, "IDLE", 60.0)  # the writer never finds time to count
    where = str(tmp_path / "meta.db")
    ledger = open_ledger(where, vocabulary=webhooks.VOCABULARY)
    now = time.time()
    sent = status("wamid.one", "sent", now, biz_opaque_callback_data="order-4711")
    read = status("wamid.one", "read", now + 5)
    failed = status("wamid.\u00e9t\u00e9", "failed", now, errors=[{"code": 131026, "title": "T"}])
    failed["timestamp"] = "soon"
    body = json.dumps(status_body("1", sent, read, failed))
    kept = list(webhooks._DELIVERY.validate_json(body).entry[0].changes[0].value.statuses)
    assert journaled_burst(ledger, [kept] * 4) == [None] * 4  # (4 calls: journaled)
    assert ledger.backlog() == 12
    ledger.close()
    with contextlib.closing(sqlite3.connect(where)) as db:
        rows = [body for (body,) in db.execute("SELECT body FROM meta_journal")]
    assert len(rows) == 4
    for row in rows:
        assert "15551234567" not in row and "order-4711" not in row and "PMP" not in row
        assert "wamid.one" in row and "131026" in row

    monkeypatch.setattr(ledger_module, "IDLE", 0.02)
    reopened = open_ledger(where, vocabulary=webhooks.VOCABULARY)
    try:
        totals = tracking_counted(reopened)["a"]
        assert totals.messages == {
            ("sent", "marketing", ""): 1,  # (a failure implies no step before it)
            ("delivered", "marketing", ""): 1,
            ("read", "marketing", ""): 1,
            ("failed", "marketing", ""): 1,
        }
        assert totals.details == {("failed", "131026"): 1}
    finally:
        reopened.close()


# --- events -------------------------------------------------------------------------------------


def test_events_are_counted_by_field_and_event_and_restrictions_show(running, sim):
    updates = payloads("account_update")
    restriction = ours(updates["account_restriction"], sim.waba_id)
    info = restriction["entry"][0]["changes"][0]["value"]["restriction_info"]
    info[0]["expiration"] = int(time.time()) + 7 * 86400
    assert deliver(running, restriction).status_code == 200
    assert deliver(running, ours(updates["account_violation"], sim.waba_id)).status_code == 200
    expect(metric(running, "whatsapp_webhook_events_total", event="ACCOUNT_VIOLATION"), 1)
    series = running.scrape()
    events = "whatsapp_webhook_events_total"
    assert value(series, events, field="account_update", event="ACCOUNT_RESTRICTION") == 1
    assert value(series, events, field="account_update", event="ACCOUNT_VIOLATION") == 1
    assert value(series, "whatsapp_account_restricted", account="acme") == 1
    expiry = "whatsapp_account_restriction_expiry_timestamp_seconds"
    assert (
        value(series, expiry, restriction_type="RESTRICTED_BIZ_INITIATED_MESSAGING")
        == info[0]["expiration"]
    )
    assert value(series, expiry, restriction_type="RESTRICTED_ADD_PHONE_NUMBER_ACTION") is None
    assert deliver(running, ours(updates["account_reconnected"], sim.waba_id)).status_code == 200
    expect(metric(running, "whatsapp_account_restricted", account="acme"), 0)
    last = value(
        running.scrape(), "whatsapp_exporter_last_webhook_timestamp_seconds", account="acme"
    )
    assert last == pytest.approx(time.time(), abs=30)


def test_every_pywa_example_is_accepted(running, sim):
    for name in (
        "account_update",
        "message_status",
        "template_status_update",
        "template_quality_update",
    ):
        for example, body in payloads(name).items():
            answer = deliver(running, ours(body, sim.waba_id))
            assert answer.status_code == 200, (name, example, answer.text)


def test_a_hostile_event_value_is_bounded(running, sim):
    events = ["x" * 500, "BAD\nLABEL", *(f"EVENT_{n}" for n in range(webhooks.MAX_EVENTS + 5))]
    changes = [{"field": "account_update", "value": {"event": event}} for event in events]
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": sim.waba_id, "changes": changes}],
    }
    assert deliver(running, body).status_code == 200
    # 50 events, then "other" for the two unreadable ones and the five past the bound
    expect(metric(running, "whatsapp_webhook_events_total", event="other"), 2 + 5)
    found = values(running.scrape(), "whatsapp_webhook_events_total", field="account_update")
    assert len(found) == webhooks.MAX_EVENTS + 1
    assert value(running.scrape(), "whatsapp_webhook_events_total", event="EVENT_54") is None


# --- polled gauges a webhook changes at once --------------------------------------------------


def template_status(running, name: str) -> str | None:
    found = values(running.scrape(), "whatsapp_template_status", template=name)
    return found[0][0]["status"] if found else None


def test_a_template_webhook_changes_the_polled_gauges_at_once(running, sim):
    assert template_status(running, "spring_sale") == "APPROVED"
    change = {
        "field": "message_template_status_update",
        "value": {
            "event": "PAUSED",
            "message_template_id": 1,
            "message_template_name": "spring_sale",
            "message_template_language": "en_US",
            "reason": "LOW_QUALITY",
        },
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": sim.waba_id, "time": int(time.time()) + 1, "changes": [change]}],
    }
    assert deliver(running, body).status_code == 200
    wait_for(lambda: template_status(running, "spring_sale") == "PAUSED", 5, "PAUSED at once")
    quality = {
        "field": "message_template_quality_update",
        "value": {
            "previous_quality_score": "GREEN",
            "new_quality_score": "RED",
            "message_template_name": "spring_sale",
            "message_template_language": "en_US",
        },
    }
    body["entry"][0]["changes"] = [quality]
    assert deliver(running, body).status_code == 200
    expect(
        lambda: [
            lab["quality"]
            for lab, _ in values(
                running.scrape(), "whatsapp_template_quality", template="spring_sale"
            )
        ],
        ["RED"],
    )
    # news older than the newest poll changes nothing: Meta retried it for hours
    change["value"]["event"] = "APPROVED"
    body["entry"][0] = {"id": sim.waba_id, "time": int(time.time()) - 7200, "changes": [change]}
    assert deliver(running, body).status_code == 200
    assert template_status(running, "spring_sale") == "PAUSED"


def test_a_quality_update_changes_the_messaging_limit_at_once(running, sim):
    limit = "whatsapp_messaging_limit"
    number = sim.numbers[0]
    before = value(running.scrape(), limit, number=number)
    change = {
        "field": "phone_number_quality_update",
        "value": {
            "display_phone_number": number,
            "event": "DOWNGRADE",
            "current_limit": "TIER_250",
        },
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": sim.waba_id, "time": int(time.time()) + 1, "changes": [change]}],
    }
    assert deliver(running, body).status_code == 200
    assert before != 250
    expect(metric(running, limit, number=number), 250)
    events = "whatsapp_webhook_events_total"
    series = running.scrape()
    assert value(series, events, field="phone_number_quality_update", event="DOWNGRADE") == 1


def test_on_the_ingest_listener_too(sim):
    with run_exporter(config(sim), ingest_address="127.0.0.1:0") as running:
        ingest = f"http://127.0.0.1:{running.exporter.web.port_of('ingest')}"
        body = json.dumps(status_body(sim.waba_id, status("wamid.i", "sent", time.time()))).encode()
        answer = httpx.post(
            f"{ingest}/webhooks/meta/acme",
            content=body,
            headers={"X-Hub-Signature-256": signature(body)},
        )
        assert answer.status_code == 200, answer.text
        expect(lambda: counted(running), {"sent": 1})
        refused = httpx.post(f"{ingest}/webhooks/meta/acme", content=b"x" * (2 << 20))
        assert refused.status_code == 413
        expect(metric(running, "whatsapp_webhook_refused_total", reason="too_large"), 1)
