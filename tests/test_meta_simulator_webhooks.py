"""The Meta simulator's webhooks, as an app's callback URL receives them: a real loopback receiver
checks every POST's X-Hub-Signature-256 with the app secret, answers Meta's subscription check,
and can fail POSTs on purpose. What the webhooks say must agree with what the polls answer."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import yaml

from simulators.meta import (
    DEMO_APP_SECRET,
    DEMO_VERIFY_TOKEN,
    FAILURES,
    KIT,
    WABA_ID,
    MetaSimulator,
    _demo_traffic,
)
from tests.conftest import LoopbackServer, free_port, wait_for

SECRET = "app-secret"
TOKEN = "verify-me"
PYWA = Path("/work/shared/pywa-updates")
GRAPH = {"Authorization": "Bearer demo-token"}
HTTP = httpx.Client(timeout=5)  # one pooled client: building one per call costs ~50 ms
WAMID = re.compile(r"wamid\.[A-Za-z0-9+/=]{20,}\Z")
# p_* at 0: every message walks sent -> delivered -> read, once each, one status a POST
PLAIN = {"p_read": 1.0, "p_failed": 0.0, "p_duplicate": 0.0, "p_out_of_order": 0.0, "p_batch": 0.0}


class Receiver(LoopbackServer):
    """A Meta app's callback URL: 200 for a POST signed with the secret, 401 otherwise (or 500
    for the next `fail` POSTs); the subscription check echoes the challenge for the right token."""

    def __init__(self, secret: str = SECRET, verify_token: str = TOKEN) -> None:
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.failed: list[bytes] = []
        self.refused = 0
        self.fail = 0
        self.checks: list[dict[str, str]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.paths.append(self.path)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
                given = headers.get("x-hub-signature-256", "")
                if not hmac.compare_digest(given, expected):
                    outer.refused += 1
                    code = 401
                elif outer.fail > 0:
                    outer.fail -= 1
                    outer.failed.append(body)
                    code = 500
                else:
                    outer.accepted.append((headers, body))
                    code = 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                outer.paths.append(urlsplit(self.path).path)
                query = dict(parse_qsl(urlsplit(self.path).query))
                outer.checks.append(query)
                ok = query.get("hub.mode") == "subscribe" and query.get("hub.verify_token") == (
                    verify_token
                )
                body = query.get("hub.challenge", "").encode() if ok else b"Forbidden"
                self.send_response(200 if ok else 403)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)
        self.url = self.base + "/webhooks/meta/demo"

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.accepted]

    def changes(self, field: str) -> list[dict[str, Any]]:
        return [
            change["value"]
            for body in self.bodies()
            for entry in body["entry"]
            for change in entry["changes"]
            if change["field"] == field
        ]

    def statuses(self) -> list[dict[str, Any]]:
        return [s for value in self.changes("messages") for s in value["statuses"]]

    def by_wamid(self) -> dict[str, list[str]]:
        """Each message's statuses in the order they arrived."""
        found: dict[str, list[str]] = {}
        for status in self.statuses():
            found.setdefault(status["id"], []).append(status["status"])
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


@pytest.fixture
def meta(receiver: Receiver) -> Iterator[Callable[..., MetaSimulator]]:
    """Starts still Meta simulators whose webhooks go to the receiver; stops them after the test."""
    with contextlib.ExitStack() as running:

        def _start(**options: Any) -> MetaSimulator:
            options = {"auto": False, "call_budget": None, "webhook_backoff": 0.01, **options}
            options.setdefault("webhook_url", receiver.url)
            options.setdefault("app_secret", SECRET)
            return running.enter_context(MetaSimulator(**options).start())

        yield _start


def poll(sim: MetaSimulator, path: str) -> Any:
    answer = HTTP.get(f"{sim.base_url}/{WABA_ID}/{path}", headers=GRAPH)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def test_each_message_walks_sent_delivered_read_in_posts_signed_and_shaped_as_metas(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta(**PLAIN)
    wamids = sim.send_messages(5)
    assert sim.drain()
    assert receiver.refused == 0
    assert receiver.by_wamid() == {w: ["sent", "delivered", "read"] for w in wamids}
    assert all(WAMID.match(w) for w in wamids) and len(set(wamids)) == 5
    numbers = {n["id"]: n["display_phone_number"] for n in poll(sim, "phone_numbers")}
    for headers, raw in receiver.accepted:
        assert headers["content-type"] == "application/json"
        assert headers["x-hub-signature"].startswith("sha1=")
        assert b"\\/" in raw or b"/" not in raw  # Meta escapes slashes: sign the raw bytes
        body = json.loads(raw)
        assert body["object"] == "whatsapp_business_account"
        (entry,) = body["entry"]
        assert entry["id"] == WABA_ID and isinstance(entry["time"], int)
        (change,) = entry["changes"]
        assert change["field"] == "messages"
        value = change["value"]
        assert value["messaging_product"] == "whatsapp"
        metadata = value["metadata"]
        assert (
            re.sub(r"\D", "", numbers[metadata["phone_number_id"]])
            == (metadata["display_phone_number"])
        )
        (status,) = value["statuses"]
        assert set(status) == {
            "id",
            "status",
            "timestamp",
            "recipient_id",
            "conversation",
            "pricing",
        }
        assert status["timestamp"].isdigit() and status["recipient_id"].isdigit()
        conversation = status["conversation"]
        assert (status["status"] == "sent") == ("expiration_timestamp" in conversation)
        assert conversation["origin"]["type"] == status["pricing"]["category"]
        assert status["pricing"]["category"] in (
            "marketing",
            "utility",
            "authentication",
            "service",
        )
        assert status["pricing"]["billable"] == (status["pricing"]["category"] != "service")
    for wamid in wamids:
        times = [int(s["timestamp"]) for s in receiver.statuses() if s["id"] == wamid]
        assert times == sorted(times) and times[-1] <= time.time()
    counts = sim.webhook_counts()
    assert (counts.delivered, counts.statuses, counts.failed, counts.dropped) == (15, 15, 0, 0)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert sum(sim.number(n).sent.get(today, 0) for n in sim.numbers) == 5  # the polls count them


def test_some_messages_stop_at_delivered_and_failures_carry_metas_error_codes(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta(**{**PLAIN, "p_read": 0.0, "p_failed": 0.4}, seed=5)
    wamids = sim.send_messages(40)
    assert sim.drain()
    sequences = receiver.by_wamid()
    assert set(sequences) == set(wamids)
    failed = {w for w, seq in sequences.items() if seq[-1] == "failed"}
    assert 5 <= len(failed) <= 30
    for seq in sequences.values():
        assert seq in (["sent", "delivered"], ["sent", "failed"], ["failed"]), seq
    codes = set()
    for status in receiver.statuses():
        if status["status"] != "failed":
            continue
        (error,) = status["errors"]
        codes.add(error["code"])
        assert set(error) == {"code", "title", "message", "error_data", "href"}
        assert error["title"] == FAILURES[error["code"]][0]
        assert error["error_data"]["details"] == FAILURES[error["code"]][1]
        assert "pricing" not in status and "conversation" not in status
        assert sequences[status["id"]] == (
            ["sent", "failed"] if error["code"] == 131026 else ["failed"]
        )
    assert len(codes) >= 3 and codes <= set(FAILURES)


def test_statuses_come_at_least_once_sometimes_out_of_order_and_several_in_one_post(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta(p_read=1.0, p_failed=0.0, p_duplicate=0.5, p_out_of_order=0.5, p_batch=1.0, seed=2)
    wamids = sim.send_messages(20)
    assert sim.drain()
    sequences = receiver.by_wamid()
    assert set(sequences) == set(wamids)
    for seq in sequences.values():
        assert set(seq) == {"sent", "delivered", "read"}
    assert any(len(seq) > 3 for seq in sequences.values())  # duplicates
    ranks = {"sent": 0, "delivered": 1, "read": 2}
    assert any(
        [ranks[s] for s in seq] != sorted(ranks[s] for s in seq) for seq in sequences.values()
    )
    batched = [v["statuses"] for v in receiver.changes("messages") if len(v["statuses"]) > 1]
    assert batched
    sender: dict[str, set[str]] = {}  # a POST holds the statuses of its number's messages only
    for value in receiver.changes("messages"):
        for status in value["statuses"]:
            sender.setdefault(status["id"], set()).add(value["metadata"]["phone_number_id"])
    assert all(len(numbers) == 1 for numbers in sender.values())
    counts = sim.webhook_counts()
    assert counts.delivered == len(receiver.accepted) < counts.statuses == len(receiver.statuses())


def test_a_failed_post_is_retried_with_the_same_bytes_then_dropped_with_a_log_line(
    meta: Callable[..., MetaSimulator], receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    sim = meta(**PLAIN, webhook_retries=2)
    receiver.fail = 1
    (wamid,) = sim.send_messages(1)
    began = time.monotonic()
    assert sim.drain()
    assert receiver.by_wamid() == {wamid: ["delivered", "read", "sent"]}  # sent came back last
    assert receiver.failed == [receiver.accepted[-1][1]]
    counts = sim.webhook_counts()
    assert (counts.delivered, counts.failed, counts.retried, counts.dropped) == (3, 1, 1, 0)
    assert time.monotonic() - began < 0.5

    receiver.fail = 3  # one POST, more failures than webhook_retries allows
    with caplog.at_level(logging.WARNING, logger="simulators"):
        sim.set_limit("TIER_2K")
        assert sim.drain()
    counts = sim.webhook_counts()
    assert (counts.delivered, counts.failed, counts.retried, counts.dropped) == (3, 4, 3, 1)
    assert receiver.failed[1] == receiver.failed[2] == receiver.failed[3]
    (line,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "after 3 attempts" in line and "500" in line


def test_a_refused_connection_is_retried_and_stop_ends_the_courier_at_once(
    meta: Callable[..., MetaSimulator],
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/webhooks/meta/demo"
    sim = meta(**PLAIN, webhook_url=dead, webhook_retries=1)
    sim.send_messages(2)
    assert sim.drain()
    counts = sim.webhook_counts()
    assert (counts.delivered, counts.failed, counts.retried, counts.dropped) == (0, 12, 6, 6)
    sim.webhook_backoff = 60.0
    sim.send_messages(1)
    wait_for(lambda: sim.webhook_counts().retried > 6, 2, "a retry to be scheduled")
    began = time.monotonic()
    sim.stop()
    assert time.monotonic() - began < 1.0


def test_raw_bodies_go_out_signed_badly_signed_or_unsigned(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta()
    control = f"{sim.url}/_sim/webhooks"
    example = json.loads((PYWA / "template_status_update.json").read_text())["approved"]
    for signature, status in (("valid", 200), ("invalid", 401), ("missing", 401)):
        answer = HTTP.post(f"{control}/raw", json={"body": example, "signature": signature})
        assert answer.status_code == 200 and answer.json() == {"status": status}
    assert receiver.refused == 2 and receiver.bodies() == [example]
    assert "x-hub-signature-256" in receiver.accepted[0][0]
    text = '{"object":"whatsapp_business_account","entry":[]}'
    assert HTTP.post(f"{control}/raw", json={"body": text}).json() == {"status": 200}
    assert receiver.accepted[-1][1] == text.encode()
    report = HTTP.get(control).json()
    assert report == {
        "url": receiver.url,
        "pending": 0,
        "delivered": 2,
        "failed": 2,
        "retried": 0,
        "dropped": 0,
        "statuses": 0,
    }
    assert HTTP.post(f"{control}/raw", json={"body": 3}).status_code == 400
    assert HTTP.post(f"{control}/raw", json={"body": {}, "signature": "x"}).status_code == 400


def test_control_routes_send_messages_now_and_count_the_posts(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta(**PLAIN)
    control = f"{sim.url}/_sim/webhooks"
    answer = HTTP.post(f"{control}/messages", json={"count": 3})
    assert answer.status_code == 202
    wamids = answer.json()["wamids"]
    assert sim.drain()
    assert receiver.by_wamid() == {w: ["sent", "delivered", "read"] for w in wamids}
    report = HTTP.get(control).json()
    assert (report["delivered"], report["statuses"], report["pending"]) == (9, 9, 0)
    assert HTTP.post(f"{control}/messages", json={"count": 0}).status_code == 400
    assert HTTP.post(f"{control}/messages", json={"counts": 1}).status_code == 400


def test_the_subscription_check_echoes_the_challenge_only_for_the_right_token(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta()
    assert sim.verify(receiver.url, TOKEN)
    assert not sim.verify(receiver.url, "wrong")
    assert not sim.verify(f"http://127.0.0.1:{free_port()}/x", TOKEN)
    first, second = receiver.checks
    assert first["hub.mode"] == "subscribe" and first["hub.verify_token"] == TOKEN
    assert first["hub.challenge"].isdigit() and first["hub.challenge"] != second["hub.challenge"]
    control = f"{sim.url}/_sim/webhooks/verify"
    assert HTTP.post(control, json={"verify_token": TOKEN}).json() == {"verified": True}
    assert HTTP.post(control, json={"url": receiver.url}).status_code == 400


def test_a_paused_template_is_paused_in_the_webhook_and_in_the_next_poll(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta()
    paused = {"name": "spring_sale", "status": "PAUSED", "quality": "RED"}
    assert HTTP.post(f"{sim.url}/_sim/templates", json=paused).status_code == 200
    assert sim.drain()
    (status,) = receiver.changes("message_template_status_update")
    (quality,) = receiver.changes("message_template_quality_update")
    polled = {
        t["name"]: t for t in poll(sim, "message_templates?fields=id,name,status,quality_score")
    }
    template = polled["spring_sale"]
    assert status["event"] == template["status"] == "PAUSED"
    assert status["message_template_id"] == int(template["id"])
    assert status["message_template_language"] == "en_US"
    assert status["message_template_category"] == "MARKETING" and status["reason"] == "NONE"
    assert quality["message_template_id"] == int(template["id"])
    assert quality["previous_quality_score"] == "GREEN"
    assert quality["new_quality_score"] == template["quality_score"]["score"] == "RED"
    sim.set_template("spring_sale", "en_US", status="PAUSED")  # no change: no webhook
    assert sim.drain() and len(receiver.accepted) == 2


def test_a_limit_change_reaches_every_number_and_the_next_poll(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta()
    sim.set_limit("TIER_2K")
    sim.set_number(sim.numbers[0], quality="RED")
    assert sim.drain()
    limits, flagged = (
        receiver.changes("phone_number_quality_update")[:3],
        receiver.changes("phone_number_quality_update")[3:],
    )
    numbers = poll(
        sim,
        "phone_numbers?fields=display_phone_number,whatsapp_business_manager_messaging_limit,quality_rating",
    )
    assert sorted(v["display_phone_number"] for v in limits) == sorted(sim.numbers)
    for value in limits:
        assert value["event"] == "DOWNGRADE" and value["old_limit"] == "TIER_10K"
        assert value["current_limit"] == value["max_daily_conversations_per_business"] == "TIER_2K"
    assert {n["whatsapp_business_manager_messaging_limit"] for n in numbers} == {"TIER_2K"}
    assert flagged == [
        {
            "display_phone_number": sim.numbers[0],
            "event": "FLAGGED",
            "current_limit": "TIER_2K",
            "max_daily_conversations_per_business": "TIER_2K",
        }
    ]
    assert numbers[0]["quality_rating"] == "RED"
    sim.set_limit("TIER_100K")
    assert sim.drain()
    assert {v["event"] for v in receiver.changes("phone_number_quality_update")[4:]} == {"UPGRADE"}


def test_an_account_restriction_and_its_reinstatement_agree_with_the_health_poll(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta()

    def waba_can_send() -> str:
        entities = poll(sim, "phone_numbers?fields=health_status")[0]["health_status"]["entities"]
        return next(e["can_send_message"] for e in entities if e["entity_type"] == "WABA")

    account = f"{sim.url}/_sim/account"
    assert (
        HTTP.post(account, json={"event": "ACCOUNT_RESTRICTION", "minutes": 5}).status_code == 200
    )
    assert sim.drain() and waba_can_send() == "LIMITED"
    assert HTTP.post(account, json={"event": "DISABLED_UPDATE"}).status_code == 200
    assert sim.drain() and waba_can_send() == "AVAILABLE"
    assert HTTP.post(account, json={"event": "DISABLE"}).status_code == 200
    assert sim.drain() and waba_can_send() == "BLOCKED"
    assert HTTP.post(account, json={"event": "ACCOUNT_RECONNECTED"}).status_code == 200
    assert sim.drain() and waba_can_send() == "AVAILABLE"
    assert HTTP.post(account, json={"event": "NOPE"}).status_code == 400
    restriction, reinstated, disabled, reconnected = receiver.changes("account_update")
    assert restriction["event"] == "ACCOUNT_RESTRICTION"
    for info in restriction["restriction_info"]:
        assert info["restriction_type"].startswith("RESTRICTED_")
        assert 0 < info["expiration"] - time.time() <= 300
    assert reinstated["ban_info"]["waba_ban_state"] == "REINSTATE"
    assert disabled["ban_info"]["waba_ban_state"] == "DISABLE"
    assert reconnected == {"event": "ACCOUNT_RECONNECTED"}


def test_the_ticker_sends_what_it_changes(
    meta: Callable[..., MetaSimulator], receiver: Receiver
) -> None:
    sim = meta(seed=4)
    sim.P_TEMPLATE = sim.P_LIMIT = sim.P_ACCOUNT = 1.0
    sim.P_QUALITY = 0.0
    sim.tick()
    assert sim.drain()
    state = sim.state()
    events = {t["name"]: t["status"] for t in state["templates"]}
    assert {
        v["message_template_name"]: v["event"]
        for v in receiver.changes("message_template_status_update")
    } == events
    (limit,) = {v["current_limit"] for v in receiver.changes("phone_number_quality_update")}
    assert limit == state["limit"]
    (account,) = receiver.changes("account_update")
    assert account["event"] == "ACCOUNT_RESTRICTION" and state["waba_can_send"] == "LIMITED"


def test_nothing_is_sent_without_a_webhook_url(receiver: Receiver) -> None:
    with MetaSimulator(auto=False, call_budget=None) as sim:
        sim.set_template("spring_sale", "en_US", status="PAUSED")
        sim.set_limit("TIER_250")
        sim.restrict(1)
        assert sim.drain() and sim.webhook_counts().delivered == 0
        with pytest.raises(ValueError):
            sim.send_raw(b"{}")
    assert receiver.accepted == [] and receiver.refused == 0


def test_the_demo_checks_the_subscription_then_streams_signed_statuses_to_the_exporter() -> None:
    accounts = yaml.safe_load(KIT.demo.accounts("http://127.0.0.1:1"))["meta"]
    (demo,) = accounts
    assert (demo["app_secret"], demo["verify_token"]) == (DEMO_APP_SECRET, DEMO_VERIFY_TOKEN)
    assert KIT.demo.traffic is _demo_traffic
    receiver = Receiver(DEMO_APP_SECRET, DEMO_VERIFY_TOKEN)
    stop = threading.Event()
    with MetaSimulator(**{**KIT.demo.options, "auto": False}) as sim:
        traffic = threading.Thread(target=_demo_traffic, args=(sim, receiver.base, stop))
        traffic.start()
        try:
            wait_for(receiver.statuses, 2, "the demo's first statuses")
        finally:
            stop.set()
            traffic.join(2)
    receiver.close()
    assert not traffic.is_alive()
    (check,) = receiver.checks
    assert check["hub.verify_token"] == DEMO_VERIFY_TOKEN
    assert set(receiver.paths) == {"/webhooks/meta/demo"}
    assert receiver.refused == 0
    assert all(int(s["timestamp"]) <= time.time() for s in receiver.statuses())
