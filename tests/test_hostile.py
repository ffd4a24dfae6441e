"""Hostile provider answers and requests, one by one: each costs at most its own sample, id or
request, never the exporter (the fault matrix covers transport faults across all providers)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.providers import d7
from exporter.providers.base import Api, Client, PollError, nested_deeper_than, scrub
from exporter.providers.kaleyra import monitor_stats, translate
from exporter.ratelimit import RequestBudget
from exporter.tracking import LedgerError
from simulators import D7Simulator, Fault, KaleyraSimulator, WhatsGateSimulator
from tests.conftest import run_exporter, value, wait_for
from tests.test_d7 import AUTH, config, hand_in, tracked


@pytest.fixture
def sim():
    with D7Simulator(auto=False, index_delay=0) as sim:
        yield sim


def report_of(request_id: str, msg_id: str, status: str = "delivered") -> dict:
    return {
        "request_id": request_id,
        "status": status,
        "messages": [{"msg_id": msg_id, "status": status, "conversation_type": "utility"}],
    }


def test_a_lone_surrogate_in_a_d7_report_is_stored_made_safe_and_tracking_moves_on(sim):
    poisoned, healthy = sim.send(), sim.send()
    with run_exporter(config(sim, concurrency="1")) as running:
        # both accounts' idle canaries go first (then not for a minute)
        wait_for(lambda: len(sim.requests) >= 2, 10, "the canaries")
        # the next report answer, whichever id it is for, carries an invalid msg_id
        sim.fail("report", Fault.status(200, report_of(poisoned, "\ud800bad", "read")), times=1)
        assert hand_in(running, [poisoned, healthy]).status_code == 202
        sim.advance(healthy, "read")
        wait_for(lambda: tracked(running, "done") == 2, 15, "both ids to finish")
        series = running.scrape()
        asked = [r.path.rsplit("/", 1)[1] for r in sim.requests if r.endpoint == "report"]
    assert set(asked[2:]) == {poisoned, healthy}, asked  # the poisoned answer went to an id
    assert value(series, "whatsapp_exporter_up", account="prod") == 1
    assert (
        value(series, "whatsapp_exporter_poll_errors_total", account="prod", reason="storage") == 0
    )


def test_a_malformed_report_is_that_ids_failure_not_the_cycles(sim):
    ids = [sim.send() for _ in range(3)]
    with run_exporter(config(sim)) as running:
        # both accounts' idle canaries go first (then not for a minute): the fault is for an id
        wait_for(lambda: len(sim.requests) >= 2, 10, "the canaries")
        sim.fail("report", Fault.wrong_shape(), times=1)
        assert hand_in(running, ids).status_code == 202
        for request_id in ids:
            sim.advance(request_id, "read")
        wait_for(lambda: tracked(running, "done") == 3, 15, "every id, the poisoned one later")
        series = running.scrape()
    problems = value(
        series, "whatsapp_tracking_problems_total", account="prod", problem="bad_report"
    )
    assert problems == 1
    # two of three answers were good: the cycle was up, no error counted for it
    assert (
        value(series, "whatsapp_exporter_poll_errors_total", account="prod", reason="bad_response")
        == 0
    )


def test_a_wrong_report_path_is_not_found_and_down_not_silently_expiring(sim):
    with run_exporter(config(sim, report_path="/whatsapp/v9/report/{request_id}")) as running:
        assert hand_in(running, [sim.send()]).status_code == 202
        wait_for(
            lambda: value(running.scrape(), "whatsapp_exporter_up", account="prod") == 0,
            10,
            "a missing route to show as down",
        )
        series = running.scrape()
    assert (
        value(series, "whatsapp_exporter_poll_errors_total", account="prod", reason="not_found")
        >= 1
    )
    assert value(series, "whatsapp_tracked_requests", account="prod", state="expired") == 0


def test_a_canary_answered_with_a_report_is_bad_response(sim):
    sim.fail("report", Fault.status(200, report_of(str(uuid.uuid4()), "m1")))
    with run_exporter(config(sim)) as running:
        wait_for(
            lambda: value(running.scrape(), "whatsapp_exporter_up", account="prod") == 0,
            10,
            "the canary to fail",
        )
        errors = value(
            running.scrape(),
            "whatsapp_exporter_poll_errors_total",
            account="prod",
            reason="bad_response",
        )
    assert errors >= 1


def test_webhook_timestamps_out_of_range_or_no_number_are_ignored_and_counted(sim):
    """The status is what matters: a bad time loses only the time, never the event."""
    request_id = sim.send()
    with run_exporter(config(sim)) as running:
        problems = {"account": "prod", "problem": "bad_timestamp"}
        assert value(running.scrape(), "whatsapp_tracking_problems_total", **problems) == 0
        # JSON has no infinity, but 1e400 is a valid number that parses to one
        body = (
            f'[{{"request_id": "{request_id}", "msg_id": "m1", "status": "sent",'
            f' "timestamp": 1e400}}, {{"request_id": "{request_id}", "msg_id": "m1",'
            f' "status": "delivered", "timestamp": -5}}, {{"request_id": "{request_id}",'
            f' "msg_id": "m1", "status": "read", "timestamp": "soon"}},'
            f' {{"request_id": "{request_id}", "msg_id": "m2", "status": "sent",'
            f' "timestamp": {{"ms": 5}}}}]'
        )
        answer = httpx.post(
            f"{running.url}/webhooks/d7/prod",
            content=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["accepted"] == 4
        # published on the next coalesced tick, not necessarily before the 200
        wait_for(
            lambda: value(running.scrape(), "whatsapp_tracking_problems_total", **problems) == 4,
            10,
            "the bad timestamps to be counted",
        )
        series = running.scrape()
    total = value(
        series, "whatsapp_message_delivery_seconds_sum", account="prod", status="delivered"
    )
    assert total is not None and math.isfinite(total)
    statuses = {
        status: value(series, "whatsapp_messages_total", account="prod", status=status)
        for status in ("sent", "delivered", "read")
    }
    assert statuses == {"sent": 2, "delivered": 1, "read": 1}


def test_tracking_counters_exist_at_zero_before_anything_happens(sim):
    """A dashboard of a healthy install shows 0 problems, not an empty panel."""
    with run_exporter(config(sim)) as running:
        series = running.scrape()
    for problem in ("bad_report", "bad_timestamp"):
        assert (
            value(series, "whatsapp_tracking_problems_total", account="prod", problem=problem) == 0
        )
    for result in ("new", "known", "refused"):
        assert value(series, "whatsapp_tracking_ids_total", account="prod", result=result) == 0
    assert value(series, "whatsapp_tracking_webhook_events_total", account="prod") == 0
    for state in ("pending", "done", "expired"):
        assert value(series, "whatsapp_tracked_requests", account="prod", state=state) == 0


@pytest.mark.parametrize("path", ["/api/v1/requests", "/webhooks/d7/prod"])
def test_deeply_nested_bodies_get_a_400_not_a_dropped_connection(sim, path):
    with run_exporter(config(sim)) as running:
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70):
            answer = httpx.post(f"{running.url}{path}", content=body, headers=AUTH, timeout=10)
            assert answer.status_code == 400, answer.text
            assert "nested deeper" in answer.json()["error"]
        assert httpx.get(f"{running.url}/-/healthy").status_code == 200


def test_an_echoed_secret_never_reaches_the_log_or_the_landing_page(caplog):
    token = "wg-s3cret-token-4242"
    with WhatsGateSimulator(devices=1, auto=False, rate_limit=None) as wg:
        wg.fail("*", Fault.status(401, {"message": f"invalid Access-Token: {token}, go away"}))
        config_text = f"""
whatsgate:
  - account: acme
    base_url: {wg.base_url}
    token: {token}
    devices: ["15550000001"]
"""
        with caplog.at_level(logging.DEBUG), run_exporter(config_text) as running:
            wait_for(
                lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness"
            )
            page = httpx.get(f"{running.url}/").text
            metrics = running.metrics_text()
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "invalid Access-Token" in page  # the error is shown ...
    assert "auth" in logged
    for where, text in (("page", page), ("log", logged), ("metrics", metrics)):
        assert token not in text, where  # ... without the credential


def test_scrub_removes_configured_secrets_and_token_shaped_strings():
    assert scrub("key abcd1234 leaked", ["abcd1234"]) == "key <secret> leaked"
    assert "eyJ" not in scrub("got eyJhbGciOi.eyJzdWIiOjF9.sig back", [])
    assert "zz9" not in scrub("Authorization: Bearer zz9", [])
    assert len(scrub("x" * 10_000, [])) == 300


def test_hostile_label_values_from_a_provider_cost_nothing_but_themselves():
    number = "+12025550100"
    stats = {
        "stats": {
            "app": {
                "evil": {
                    "type": "gauge",
                    "data": [{"labels": {"name": "\ud800" + "x" * 5000}, "value": 1}],
                },
                "fine": {"type": "gauge", "data": [{"value": 2}]},
            }
        }
    }
    with KaleyraSimulator(numbers=[number], auto=False) as ky:
        ky.fail("*", Fault.status(200, stats))
        cfg = f"kaleyra:\n  - {{account: main, base_url: {ky.base_url}, numbers: ['{number}']}}\n"
        with run_exporter(cfg) as running:
            fine = running.wait_for_metric("whatsapp_client_app_fine", number=number)
            text = running.metrics_text()
    assert fine == 2
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (evil,) = families["whatsapp_client_app_evil"].samples
    assert evil.labels["name"].startswith("\ufffd") and len(evil.labels["name"]) == 256


def test_kaleyra_reads_metas_own_top_level_stats_answer():
    body = {
        "meta": {"version": "v2.41.3"},
        "stats": {"db": {"pending": {"type": "gauge", "data": [{"value": 3}]}}},
    }
    (family,) = translate("+12025550100", monitor_stats(body))
    assert family.name == "whatsapp_client_db_pending"
    assert family.samples[0].value == 3


def test_negative_counters_are_dropped_and_counted():
    number = "+12025550100"
    stats = {
        "stats": {
            "app": {
                "sent_total": {
                    "type": "counter",
                    "data": [
                        {"labels": {"k": "a"}, "value": -5},
                        {"labels": {"k": "b"}, "value": 7},
                    ],
                },
            }
        }
    }
    with KaleyraSimulator(numbers=[number], auto=False) as ky:
        ky.fail("*", Fault.status(200, stats))
        cfg = f"kaleyra:\n  - {{account: main, base_url: {ky.base_url}, numbers: ['{number}']}}\n"
        with run_exporter(cfg) as running:
            kept = running.wait_for_metric("whatsapp_client_app_sent_total", k="b")
            series = running.scrape()
    assert kept == 7
    assert value(series, "whatsapp_client_app_sent_total", k="a") is None
    assert value(series, "whatsapp_exporter_samples_dropped_total") >= 1


def test_poll_error_body_is_kept_for_the_provider_to_read():
    error = PollError("not_found", "HTTP 404: x", {"detail": {"code": "WHATSAPP_LOG_NOT_EXISTS"}})
    from exporter.providers.d7 import not_indexed  # noqa: PLC0415

    assert not_indexed(error)
    assert not not_indexed(PollError("not_found", "HTTP 404", {"detail": "Not Found"}))


def test_a_ledger_that_cannot_be_used_is_storage_not_d7s_fault():
    class BrokenLedger:
        def due(self, *_):
            raise LedgerError("cannot write the D7 ledger: disk I/O error")

    account = d7.Account(account="prod", token="t", ingest_token="i")
    follower = d7.Follower(account, BrokenLedger(), canary_every=60)
    api = Api(Client("http://127.0.0.1:9"), RequestBudget(10, 1.0), d7.provider_error)
    with pytest.raises(PollError) as caught:
        asyncio.run(follower.cycle(api, ""))
    assert caught.value.reason == "storage"
    assert "disk I/O error" in caught.value.detail


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def test_the_nesting_check_agrees_with_the_parsed_document():
    """Random documents whose strings hold brackets, quotes and backslashes: the byte-level
    check says what the parsed document's depth says, at every limit."""
    rng = random.Random(5)
    tricky = ["[", "]}", "{", '"', "\\", '\\"[', "x", ""]

    def document(levels: int):
        if levels == 0 or rng.random() < 0.3:
            return rng.choice([1, None, *tricky])
        if rng.random() < 0.5:
            return [document(levels - 1) for _ in range(rng.choice([0, 1, 1, 2]))]
        return {
            f"k{i}{rng.choice(tricky)}": document(levels - 1) for i in range(rng.choice([1, 2]))
        }

    checked = 0
    for _ in range(1500):
        doc = document(rng.randint(1, 80))
        content = json.dumps(doc).encode()
        for limit in (1, 3, 10, 64):
            assert nested_deeper_than(content, limit) == (_depth(doc) > limit), (limit, content)
            checked += 1
    assert checked == 6000
    assert nested_deeper_than(b"[" * 65 + b"]" * 65, 64)
    assert not nested_deeper_than(b"[" * 64 + b"]" * 64, 64)
    assert not nested_deeper_than(b'["' + b"[" * 100 + b'"]', 64)
