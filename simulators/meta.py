"""Meta's WhatsApp Cloud API (`https://graph.facebook.com/v25.0`): a WABA's phone numbers with
their health, its message templates and its messaging analytics, as the Graph API serves them.

Bearer tokens (or a BSP's own header, as 360dialog's `D360-API-KEY`), `fields` selection, cursor
paging with `paging.next`, Graph error bodies with their codes (a rate limit is an HTTP 400), and
`X-Business-Use-Case-Usage` on every answer, rising with the calls of the last hour. In demo mode
quality ratings, the portfolio's messaging limit and template statuses change over time.

Given a `webhook_url`, it also POSTs the webhooks a Meta app subscribed to the WABA receives,
signed with the `app_secret` as Meta signs them: message statuses as Meta delivers them (at least
once, sometimes out of order, several in one POST, retried with back-off when the receiver fails),
and template, limit and account changes that agree with what the next poll answers.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import json
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from simulators.kit import Demo, Example, FaultAnswers, Kit, Matrix, Probe
from simulators.server import (
    CONTROL_PREFIX,
    RecordedRequest,
    Response,
    Route,
    Simulator,
    check_probabilities,
    control_json,
    json_response,
    log,
    route,
)

VERSION = "v25.0"
WABA_ID = "102290129340398"
QUALITIES = ("GREEN", "YELLOW", "RED")
LIMITS = ("TIER_250", "TIER_2K", "TIER_10K", "TIER_100K", "TIER_UNLIMITED")
LIMIT_NUMBERS = {"TIER_250": 250, "TIER_2K": 2000, "TIER_10K": 10000, "TIER_100K": 100000}
TEMPLATE_STATUSES = ("APPROVED", "PAUSED", "DISABLED", "PENDING", "REJECTED", "IN_APPEAL")
CAN_SEND = ("AVAILABLE", "LIMITED", "BLOCKED")
NUMBER_DEFAULT_FIELDS = ("id", "display_phone_number", "verified_name", "quality_rating")
TEMPLATE_DEFAULT_FIELDS = ("id", "name", "language", "status", "category")
DEFAULT_PAGE = 25
MAX_PAGE = 100
TEMPLATE_NAMES = (
    ("order_confirmation", "UTILITY"),
    ("shipping_update", "UTILITY"),
    ("verification_code", "AUTHENTICATION"),
    ("spring_sale", "MARKETING"),
    ("appointment_reminder", "UTILITY"),
)

CATEGORIES = ("marketing", "utility", "authentication", "service")
# Meta's error codes of a failed status: title, error_data.details; only 131026 follows a `sent`
FAILURES = {
    131026: (
        "Message undeliverable",
        "Unable to deliver message. Reasons can include: the recipient phone number is not a "
        "WhatsApp phone number; the recipient has not accepted WhatsApp's new Terms of Service.",
    ),
    131047: (
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer last "
        "replied to this number.",
    ),
    131049: (
        "This message was not delivered to maintain healthy ecosystem engagement.",
        "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
    ),
    130472: (
        "User's number is part of an experiment",
        "Failed to send message because this user's phone number is part of an experiment",
    ),
}
ERROR_HREF = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/"
RESTRICTIONS = ("RESTRICTED_BIZ_INITIATED_MESSAGING", "RESTRICTED_ADD_PHONE_NUMBER_ACTION")
REINSTATEMENTS = ("ACCOUNT_RECONNECTED", "DISABLED_UPDATE")
SIGNATURES = ("valid", "invalid", "missing")
WEBHOOK_TIMEOUT = 2.0
MAX_BATCH = 10
USER_AGENT = "facebookexternalua"


@dataclass
class PhoneNumber:
    id: str
    display: str  # "+1 555-000-0001", as Meta writes it
    verified_name: str
    quality: str = "GREEN"
    status: str = "CONNECTED"
    name_status: str = "APPROVED"
    throughput: str = "STANDARD"
    platform_type: str = "CLOUD_API"
    can_send: str = "AVAILABLE"  # the phone number entity's own
    sent: dict[str, int] = field(default_factory=dict)  # UTC day -> messages
    delivered: dict[str, int] = field(default_factory=dict)

    @property
    def digits(self) -> str:
        return re.sub(r"\D", "", self.display)


@dataclass
class Template:
    id: str
    name: str
    language: str
    category: str
    status: str = "APPROVED"
    quality: str = "GREEN"


@dataclass(order=True)
class _Post:
    """A webhook POST waiting in the courier's queue. A message status has no body until it is
    due, when the statuses due with it for the same number may join it; a built body is kept
    byte for byte across retries, as Meta's are."""

    due: float  # time.monotonic()
    seq: int
    number: tuple[str, str] = field(compare=False)  # display digits, phone_number_id
    status: dict[str, Any] | None = field(compare=False)
    body: bytes | None = field(compare=False, default=None)
    attempts: int = field(compare=False, default=0)
    statuses: int = field(compare=False, default=0)


@dataclass
class WebhookCounts:
    """What the courier did, for tests: POSTs answered 2xx, attempts that failed (non-2xx or no
    connection), retries scheduled, POSTs given up on; `statuses` counts the delivered ones."""

    delivered: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0
    statuses: int = 0


class MetaSimulator(Simulator):
    """`bsp_header="D360-API-KEY"` answers like a BSP that passes the Graph API through (that
    header, not a Bearer token, and no version in the path; 360dialog's own paths differ);
    `call_budget` is the calls an hour before Meta's code 80007 (None: unlimited, the usage
    header then stays low); `limit_form="integer"` sends the messaging limit as a number
    instead of a tier string.

    Webhooks go to `webhook_url` (None: none are sent) signed with `app_secret` (None: unsigned).
    Of the messages sent, `p_failed` fail and `p_read` of the others are read; each status is
    sent twice with `p_duplicate`, a message's statuses swap places with `p_out_of_order`, and a
    due status takes the others due for its number into one POST with `p_batch`. A POST that
    fails is tried again `webhook_retries` times, after `webhook_backoff` seconds, doubling."""

    name = "meta"
    base_path = "/" + VERSION
    server_header = ""

    P_QUALITY = 0.02
    P_LIMIT = 0.01
    P_TEMPLATE = 0.01
    P_ACCOUNT = 0.003

    def __init__(
        self,
        *,
        token: str = "demo-token",
        waba_id: str = WABA_ID,
        numbers: int = 3,
        templates: int = 5,
        bsp_header: str | None = None,
        call_budget: int | None = 200,
        usage_window: float = 3600.0,
        limit: str = "TIER_10K",
        limit_form: str = "tier",
        webhook_url: str | None = None,
        app_secret: str | None = None,
        p_read: float = 0.7,
        p_failed: float = 0.03,
        p_duplicate: float = 0.05,
        p_out_of_order: float = 0.05,
        p_batch: float = 0.2,
        webhook_retries: int = 4,
        webhook_backoff: float = 1.0,
        **base: Any,
    ) -> None:
        check_probabilities(
            p_read=p_read,
            p_failed=p_failed,
            p_duplicate=p_duplicate,
            p_out_of_order=p_out_of_order,
            p_batch=p_batch,
        )
        if isinstance(webhook_retries, bool) or not isinstance(webhook_retries, int):
            raise ValueError("webhook_retries must be an integer")
        if webhook_retries < 0 or webhook_backoff < 0:
            raise ValueError("webhook_retries and webhook_backoff must be >= 0")
        if not waba_id.isdigit():
            raise ValueError("waba_id must be digits")
        if limit not in LIMITS:
            raise ValueError(f"limit must be one of {', '.join(LIMITS)}")
        if limit_form not in ("tier", "integer"):
            raise ValueError("limit_form must be 'tier' or 'integer'")
        if call_budget is not None and (not isinstance(call_budget, int) or call_budget < 1):
            raise ValueError("call_budget must be a positive integer or None")
        self.token = token
        self.waba_id = waba_id
        self.bsp_header = bsp_header
        self.call_budget = call_budget
        self.usage_window = float(usage_window)
        self.limit = limit
        self.limit_form = limit_form
        self.waba_can_send = "AVAILABLE"
        self._restricted_until = 0.0  # an ACCOUNT_RESTRICTION's end, as the webhook said
        self.webhook_url = webhook_url
        self.app_secret = app_secret
        self.p_read, self.p_failed = p_read, p_failed
        self.p_duplicate, self.p_out_of_order, self.p_batch = p_duplicate, p_out_of_order, p_batch
        self.webhook_retries = webhook_retries
        self.webhook_backoff = float(webhook_backoff)
        # the courier's own lock, queue and randomness: it never takes the state's lock
        self._outbox = threading.Condition(threading.Lock())
        self._queue: list[_Post] = []
        self._in_flight = 0
        self._sequence = itertools.count()
        self._counts = WebhookCounts()
        self._last_drop_log = -math.inf
        self._courier: threading.Thread | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._calls: deque[float] = deque()
        self._blocked_until = 0.0  # an injected rate limit (code 80007)
        self.base_path = "" if bsp_header is not None else "/" + VERSION  # read by routes()
        super().__init__(**base)
        self._numbers: dict[str, PhoneNumber] = {}
        for index in range(1, numbers + 1):
            self.add_number(f"+1 555-000-{index:04d}", verified_name=f"Acme Support {index}")
        self._templates: dict[str, Template] = {}
        for index in range(templates):
            name, category = TEMPLATE_NAMES[index % len(TEMPLATE_NAMES)]
            suffix = f"_{index // len(TEMPLATE_NAMES) + 1}" if index >= len(TEMPLATE_NAMES) else ""
            self.add_template(name + suffix, "en_US", category)
        self._courier_random = random.Random(None if self.seed is None else self.seed + 1)

    # --- explicit state changes -----------------------------------------------------------------

    @property
    def numbers(self) -> list[str]:
        """The display numbers' digits, as the exporter labels them."""
        with self._lock:
            return [n.digits for n in self._numbers.values()]

    def number(self, digits: str) -> PhoneNumber:
        with self._lock:
            found = self._by_digits(digits)
            return PhoneNumber(**{**found.__dict__, "sent": dict(found.sent)})

    def add_number(self, display: str, **fields: Any) -> str:
        with self._lock:
            index = len(self._numbers) + 1
            number_id = str(106540352242900 + index)
            number = PhoneNumber(number_id, display, fields.pop("verified_name", f"Acme {index}"))
            self._numbers[number_id] = number
            self.set_number(number.digits, **fields)
            return number_id

    def set_number(self, digits: str, **fields: Any) -> None:
        allowed = {
            "quality",
            "status",
            "name_status",
            "throughput",
            "platform_type",
            "can_send",
            "verified_name",
            "display",
        }
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"unknown number fields {unknown}; allowed: {sorted(allowed)}")
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
        with self._lock:
            number = self._by_digits(digits)
            quality = fields.pop("quality", None)
            for key, value in fields.items():
                setattr(number, key, value)
            if quality is not None:
                self._set_quality(number, quality)

    def remove_number(self, digits: str) -> None:
        with self._lock:
            del self._numbers[self._by_digits(digits).id]

    def set_limit(self, limit: str) -> None:
        """The business portfolio's messaging limit, shared by all its numbers."""
        if limit not in LIMITS:
            raise ValueError(f"limit must be one of {', '.join(LIMITS)}")
        with self._lock:
            self._set_limit(limit)

    def add_template(self, name: str, language: str, category: str, **fields: Any) -> str:
        with self._lock:
            template_id = str(564750795574598 + len(self._templates))
            self._templates[template_id] = Template(template_id, name, language, category)
            self.set_template(name, language, **fields)
            return template_id

    def set_template(
        self, name: str, language: str, *, status: str | None = None, quality: str | None = None
    ) -> None:
        with self._lock:
            found = [
                t for t in self._templates.values() if (t.name, t.language) == (name, language)
            ]
            if not found:
                raise KeyError(f"unknown template {name} ({language})")
            self._change_template(found[0], status, quality)

    def template(self, name: str, language: str = "en_US") -> Template:
        with self._lock:
            for t in self._templates.values():
                if (t.name, t.language) == (name, language):
                    return Template(**t.__dict__)
        raise KeyError(f"unknown template {name} ({language})")

    def record_traffic(
        self, digits: str, sent: int, delivered: int, day: str | None = None
    ) -> None:
        with self._lock:
            number = self._by_digits(digits)
            day = day or _today()
            number.sent[day] = number.sent.get(day, 0) + sent
            number.delivered[day] = number.delivered.get(day, 0) + delivered

    def rate_limit(self, minutes: float) -> None:
        """Every request answers Meta's code 80007 for `minutes` (0 lifts it)."""
        with self._lock:
            self._blocked_until = time.time() + minutes * 60

    # --- changes Meta reports by webhook (called with the state's lock held) --------------------

    def _set_quality(self, number: PhoneNumber, quality: str) -> None:
        """A number whose quality turns low is FLAGGED, and UNFLAGGED when it recovers."""
        before, number.quality = number.quality, quality
        if (before == "RED") != (quality == "RED"):
            self._emit(
                "phone_number_quality_update",
                [
                    {
                        "display_phone_number": number.digits,
                        "event": "FLAGGED" if quality == "RED" else "UNFLAGGED",
                        "current_limit": self.limit,
                        "max_daily_conversations_per_business": self.limit,
                    }
                ],
            )

    def _set_limit(self, limit: str) -> None:
        """The portfolio's limit is every number's: one change per number, in one POST."""
        before, self.limit = self.limit, limit
        if before == limit:
            return
        event = "UPGRADE" if LIMITS.index(limit) > LIMITS.index(before) else "DOWNGRADE"
        self._emit(
            "phone_number_quality_update",
            [
                {
                    "display_phone_number": n.digits,
                    "event": event,
                    "old_limit": before,
                    "current_limit": limit,
                    "max_daily_conversations_per_business": limit,
                }
                for n in self._numbers.values()
            ],
        )

    def _change_template(self, t: Template, status: str | None, quality: str | None) -> None:
        named = {
            "message_template_id": int(t.id),
            "message_template_name": t.name,
            "message_template_language": t.language,
        }
        if quality is not None and quality != t.quality:
            self._emit(
                "message_template_quality_update",
                [{"previous_quality_score": t.quality, "new_quality_score": quality, **named}],
            )
            t.quality = quality
        if status is not None and status != t.status:
            t.status = status
            value = {
                "event": status,
                **named,
                "reason": "INVALID_FORMAT" if status == "REJECTED" else "NONE",
                "message_template_category": t.category,
            }
            if status == "PAUSED":
                value["other_info"] = {
                    "title": "FIRST_PAUSE",
                    "description": "Your template has been paused for 3 hours due to low quality.",
                }
            self._emit("message_template_status_update", [value])

    def restrict(self, minutes: float = 60.0) -> None:
        """An ACCOUNT_RESTRICTION: the WABA can send only LIMITED until it expires."""
        with self._lock:
            self._restricted_until = time.time() + minutes * 60
            self.waba_can_send = "LIMITED"
            until = int(self._restricted_until)
            info = [{"restriction_type": kind, "expiration": until} for kind in RESTRICTIONS]
            self._emit(
                "account_update", [{"event": "ACCOUNT_RESTRICTION", "restriction_info": info}]
            )

    def disable(self) -> None:
        """A DISABLED_UPDATE that bans the WABA: it can send nothing."""
        with self._lock:
            self.waba_can_send = "BLOCKED"
            self._emit("account_update", [_ban("DISABLE")])

    def reinstate(self, event: str = "ACCOUNT_RECONNECTED") -> None:
        """Lifts a restriction or a ban, by ACCOUNT_RECONNECTED or DISABLED_UPDATE's REINSTATE."""
        if event not in REINSTATEMENTS:
            raise ValueError(f"event must be one of {', '.join(REINSTATEMENTS)}")
        with self._lock:
            self._restricted_until = 0.0
            self.waba_can_send = "AVAILABLE"
            value = _ban("REINSTATE") if event == "DISABLED_UPDATE" else {"event": event}
            self._emit("account_update", [value])

    # --- webhooks -------------------------------------------------------------------------------

    def send_messages(self, count: int = 1, *, at_once: bool = True) -> list[str]:
        """Sends `count` messages from the WABA's numbers; returns their wamids. `at_once`: their
        statuses (timed over the last half minute) are due now, in order; else each is due when
        it happens. Either way sent and delivered count in the analytics at once."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
            raise ValueError("count must be an integer between 1 and 10000")
        now, due_now = time.time(), time.monotonic()
        planned: list[tuple[float, tuple[str, str], dict[str, Any]]] = []
        wamids = []
        with self._lock:
            numbers = [n for n in self._numbers.values() if n.status == "CONNECTED"]
            if not numbers:
                raise ValueError("no CONNECTED number to send from")
            rng = self.random
            for _ in range(count):
                number = rng.choice(numbers)
                steps, code = self._fate(rng)
                wamid, message = self._message(rng, now, code)
                wamids.append(wamid)
                names = {name for name, _ in steps}
                self._add(number, int("sent" in names), int("delivered" in names))
                start = now - steps[-1][1] if at_once else now
                events = [
                    [
                        due_now if at_once else due_now + offset,
                        _status(message, name, start + offset),
                    ]
                    for name, offset in steps
                ]
                if len(events) > 1 and rng.random() < self.p_out_of_order:
                    i = rng.randrange(len(events) - 1)
                    events[i], events[i + 1] = events[i + 1], events[i]
                    events[i][0], events[i + 1][0] = events[i + 1][0], events[i][0]
                for due, status in list(events):
                    if rng.random() < self.p_duplicate:
                        events.append([due if at_once else due + rng.uniform(1, 10), status])
                key = (number.digits, number.id)
                planned += [(due, key, status) for due, status in events]
        with self._outbox:
            for due, key, status in planned:
                heapq.heappush(self._queue, _Post(due, next(self._sequence), key, status))
            self._outbox.notify_all()
        return wamids

    def _fate(self, rng: random.Random) -> tuple[list[tuple[str, float]], int | None]:
        """A message's statuses with their seconds after sending, and its error code if it fails."""
        if rng.random() < self.p_failed:
            code = rng.choice(tuple(FAILURES))
            failed = ("failed", rng.uniform(0.5, 3))
            return ([("sent", 0.0), failed] if code == 131026 else [failed]), code
        delivered = rng.uniform(0.5, 4)
        steps = [("sent", 0.0), ("delivered", delivered)]
        if rng.random() < self.p_read:
            steps.append(("read", delivered + rng.uniform(2, 25)))
        return steps, None

    @staticmethod
    def _message(rng: random.Random, now: float, code: int | None) -> tuple[str, dict[str, Any]]:
        recipient = f"{rng.choice(('49', '44', '1', '91', '55'))}{rng.randrange(10**9, 10**10)}"
        tail = f"{rng.getrandbits(80):020X}".encode()
        raw = bytes((0x1C, 0x18, len(recipient))) + recipient.encode() + b"\x15\x02\x00\x11\x18"
        wamid = "wamid." + base64.b64encode(raw + bytes((len(tail),)) + tail + b"\x00").decode()
        return wamid, {
            "id": wamid,
            "recipient_id": recipient,
            "category": rng.choice(CATEGORIES),
            "conversation": f"{rng.getrandbits(120):030x}",
            "expiration": int(now) + 86400,
            "code": code,
        }

    def _emit(self, field_: str, values: list[dict[str, Any]]) -> None:
        """Queues one POST with one change per value, due now."""
        if not self.webhook_url or not values:
            return
        body = self._envelope([{"value": v, "field": field_} for v in values])
        with self._outbox:
            post = _Post(time.monotonic(), next(self._sequence), ("", ""), None, body)
            heapq.heappush(self._queue, post)
            self._outbox.notify_all()

    def _envelope(self, changes: list[dict[str, Any]]) -> bytes:
        entry = {"id": self.waba_id, "time": int(time.time()), "changes": changes}
        return meta_json({"object": "whatsapp_business_account", "entry": [entry]})

    def send_raw(self, body: bytes, signature: str = "valid") -> int:
        """POSTs `body` once, now, signed or not as asked; returns the answer's status (0: none)."""
        if signature not in SIGNATURES:
            raise ValueError(f"signature must be one of {', '.join(SIGNATURES)}")
        if not self.webhook_url:
            raise ValueError("no webhook_url to send to")
        status = self._attempt(body, signature)
        with self._outbox:
            self._count(status, 0)
        return status

    def verify(self, url: str, verify_token: str) -> bool:
        """Meta's subscription check of a callback URL: the challenge must come back as the body."""
        with self._lock:
            challenge = str(self.random.randrange(10**8, 10**10))
        query = urlencode(
            {"hub.mode": "subscribe", "hub.verify_token": verify_token, "hub.challenge": challenge}
        )
        check = urllib.request.Request(
            f"{url}{'&' if '?' in url else '?'}{query}", headers={"User-Agent": USER_AGENT}
        )
        try:
            with self._opener.open(check, timeout=WEBHOOK_TIMEOUT) as answer:
                return answer.status == 200 and answer.read(100).decode() == challenge
        except (urllib.error.URLError, OSError, UnicodeDecodeError):
            return False

    def webhook_counts(self) -> WebhookCounts:
        with self._outbox:
            return WebhookCounts(**self._counts.__dict__)

    def drain(self, timeout: float = 5.0) -> bool:
        """Waits until every due POST was delivered or dropped (retries included)."""
        deadline = time.monotonic() + timeout
        with self._outbox:
            while self._in_flight or any(p.due <= deadline for p in self._queue):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return False
                self._outbox.wait(min(left, 0.05))
            return True

    def start(self) -> MetaSimulator:
        super().start()
        self._courier = threading.Thread(
            target=self._deliver, name="sim-meta-webhooks", daemon=True
        )
        self._courier.start()
        return self

    def on_stop(self) -> None:
        with self._outbox:
            self._outbox.notify_all()
        if self._courier is not None:
            self._courier.join(timeout=0.5)

    def _deliver(self) -> None:
        while True:
            with self._outbox:
                while not self._stopping.is_set():
                    wait = self._queue[0].due - time.monotonic() if self._queue else None
                    if wait is not None and wait <= 0:
                        break
                    self._outbox.wait(wait)
                if self._stopping.is_set():
                    return
                post = self._take_due()
                self._in_flight += 1
            assert post.body is not None
            status = self._attempt(post.body, "valid")
            with self._outbox:
                self._in_flight -= 1
                self._count(status, post.statuses)
                if not 200 <= status < 300:
                    self._retry_or_drop(post, status)
                self._outbox.notify_all()

    def _take_due(self) -> _Post:
        """The first due POST; a status gathers the others due for its number with `p_batch`."""
        post = heapq.heappop(self._queue)
        if post.body is not None:
            return post
        statuses = [post.status]
        if self._courier_random.random() < self.p_batch:
            now, kept = time.monotonic(), []
            while self._queue and self._queue[0].due <= now:
                other = heapq.heappop(self._queue)
                if other.body is None and other.number == post.number and len(statuses) < MAX_BATCH:
                    statuses.append(other.status)
                else:
                    kept.append(other)
            for other in kept:
                heapq.heappush(self._queue, other)
        digits, number_id = post.number
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": digits, "phone_number_id": number_id},
            "statuses": statuses,
        }
        post.body = self._envelope([{"value": value, "field": "messages"}])
        post.statuses = len(statuses)
        return post

    def _attempt(self, body: bytes, signature: str) -> int:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        secret = self.app_secret
        if secret is not None and signature != "missing":
            key = secret.encode() if signature == "valid" else b"not-" + secret.encode()
            headers["X-Hub-Signature"] = "sha1=" + hmac.new(key, body, hashlib.sha1).hexdigest()
            headers["X-Hub-Signature-256"] = "sha256=" + sign(key, body)
        url = self.webhook_url
        if not url:
            return 0
        post = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(post, timeout=WEBHOOK_TIMEOUT) as answer:
                answer.read()
                return answer.status
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code
        except (urllib.error.URLError, OSError):
            return 0

    def _count(self, status: int, statuses: int) -> None:
        if 200 <= status < 300:
            self._counts.delivered += 1
            self._counts.statuses += statuses
        else:
            self._counts.failed += 1

    def _retry_or_drop(self, post: _Post, status: int) -> None:
        post.attempts += 1
        if post.attempts <= self.webhook_retries:
            self._counts.retried += 1
            post.due = time.monotonic() + self.webhook_backoff * 2 ** (post.attempts - 1)
            heapq.heappush(self._queue, post)
            return
        self._counts.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 10:  # one line per 10 s, however many are dropped
            self._last_drop_log = now
            log.warning(
                "meta: webhook POST dropped after %d attempts (last answer: %s); %d dropped so far",
                post.attempts,
                status or "no connection",
                self._counts.dropped,
            )

    def _by_digits(self, digits: str) -> PhoneNumber:
        for number in self._numbers.values():
            if digits in (number.digits, number.id):
                return number
        raise KeyError(f"unknown number {digits}")

    def tick(self) -> None:
        rng = self.random
        with self._lock:
            for number in self._numbers.values():
                if rng.random() < self.P_QUALITY:
                    index = QUALITIES.index(number.quality) if number.quality in QUALITIES else 0
                    step = rng.choice((-1, 1))
                    self._set_quality(
                        number, QUALITIES[min(max(index + step, 0), len(QUALITIES) - 1)]
                    )
                    number.can_send = "LIMITED" if number.quality == "RED" else "AVAILABLE"
                if number.status == "CONNECTED":
                    sent = rng.randint(0, 5)
                    self._add(number, sent, sent - rng.randint(0, min(sent, 1)))
            if rng.random() < self.P_LIMIT:
                index = LIMITS.index(self.limit) + rng.choice((-1, 1))
                self._set_limit(LIMITS[min(max(index, 0), len(LIMITS) - 1)])
            for template in self._templates.values():
                if rng.random() < self.P_TEMPLATE:
                    paused = template.status == "APPROVED"
                    self._change_template(
                        template, "PAUSED" if paused else "APPROVED", "RED" if paused else "GREEN"
                    )
            if self.waba_can_send == "LIMITED" and time.time() >= self._restricted_until:
                self.waba_can_send = "AVAILABLE"  # Meta sends nothing when a restriction ends
            if rng.random() < self.P_ACCOUNT:
                if self.waba_can_send == "AVAILABLE":
                    self.restrict(minutes=rng.uniform(0.5, 3))
                else:
                    self.reinstate(rng.choice(REINSTATEMENTS))

    @staticmethod
    def _add(number: PhoneNumber, sent: int, delivered: int) -> None:
        day = _today()
        number.sent[day] = number.sent.get(day, 0) + sent
        number.delivered[day] = number.delivered.get(day, 0) + delivered

    def state(self) -> dict[str, Any]:
        return {
            "waba_id": self.waba_id,
            "limit": self.limit,
            "waba_can_send": self.waba_can_send,
            "webhook_url": self.webhook_url,
            "call_budget": self.call_budget,
            "calls_in_window": len(self._calls),
            "numbers": [self._number_view(n, None) for n in self._numbers.values()],
            "templates": [self._template_view(t, None) for t in self._templates.values()],
        }

    def credentials(self) -> dict[str, str]:
        if self.bsp_header:
            return {self.bsp_header: self.token}
        return {"Authorization": f"Bearer {self.token}"}

    # --- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        prefix, waba = self.base_path, self.waba_id
        return [
            route("GET", f"{prefix}/{waba}/phone_numbers", "health", self._phone_numbers),
            route(
                "GET", f"{prefix}/{waba}/message_templates", "templates", self._message_templates
            ),
            route("GET", f"{prefix}/{waba}", "analytics", self._waba),
            route("GET", prefix + r"/(?P<node>\d+)", "node", self._node),
            route("POST", prefix + r"/(?P<node>\d+)/messages", "messages", self._messages),
        ]

    def control_routes(self) -> list[Route]:
        number = CONTROL_PREFIX + r"/numbers/(?P<digits>\d+)"
        return [
            route("POST", number, "", self._ctl_set_number),
            route("POST", CONTROL_PREFIX + "/limit", "", self._ctl_limit),
            route("POST", CONTROL_PREFIX + "/templates", "", self._ctl_template),
            route("POST", CONTROL_PREFIX + "/rate_limit", "", self._ctl_rate_limit),
            route("POST", CONTROL_PREFIX + "/account", "", self._ctl_account),
            route("GET", CONTROL_PREFIX + "/webhooks", "", self._ctl_webhooks),
            route("POST", CONTROL_PREFIX + "/webhooks/messages", "", self._ctl_send_messages),
            route("POST", CONTROL_PREFIX + "/webhooks/raw", "", self._ctl_send_raw),
            route("POST", CONTROL_PREFIX + "/webhooks/verify", "", self._ctl_verify),
        ]

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        if self.bsp_header:
            given = request.headers.get(self.bsp_header.lower(), "")
        else:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not given:
            return graph_error(401, 190, "An access token is required to request this resource.")
        if given != self.token:
            return graph_error(
                401, 190, "Invalid OAuth access token - Cannot parse access token", 463
            )
        now = time.time()
        with self._lock:
            while self._calls and self._calls[0] <= now - self.usage_window:
                self._calls.popleft()
            blocked = self._blocked_until - now
            used = 0
            if self.call_budget is not None:
                used = math.ceil(100 * (len(self._calls) + 1) / self.call_budget)
            regain = 0
            if blocked > 0:
                regain = math.ceil(blocked / 60)
            elif used > 100:
                regain = math.ceil((self._calls[0] + self.usage_window - now) / 60)
            else:
                self._calls.append(now)
            headers["X-Business-Use-Case-Usage"] = _usage_header(self.waba_id, used, regain)
        if blocked > 0 or used > 100:
            return graph_error(400, 80007, "(#80007) Rate limit issues", type_="OAuthException")
        return None

    def _phone_numbers(self, request: RecordedRequest) -> Response:
        wanted = _fields(request.query.get("fields"), NUMBER_DEFAULT_FIELDS)
        with self._lock:
            views = [self._number_view(n, wanted) for n in self._numbers.values()]
        return self._page(request, views)

    def _message_templates(self, request: RecordedRequest) -> Response:
        wanted = _fields(request.query.get("fields"), TEMPLATE_DEFAULT_FIELDS)
        statuses = request.query.get("status")
        with self._lock:
            templates = list(self._templates.values())
        if statuses:
            templates = [t for t in templates if t.status in statuses.split(",")]
        views = [self._template_view(t, wanted) for t in templates]
        answer = self._page(request, views)
        if "summary" in request.query:
            body = json_body(answer)
            body["summary"] = {
                "total_count": len(templates),
                "message_template_count": len(self._templates),
                "message_template_limit": 6000,
                "are_translations_complete": True,
            }
            answer = json_response(200, body)
        return answer

    def _waba(self, request: RecordedRequest) -> Response:
        requested = _split_fields(request.query.get("fields", ""))
        body: dict[str, Any] = {"id": self.waba_id}
        for item in requested:
            name, _, modifiers = item.partition(".")
            if name == "analytics":
                try:
                    body["analytics"] = self._analytics(modifiers)
                except ValueError as exc:
                    return graph_error(400, 100, f"(#100) {exc}")
            elif name in WABA_FIELDS:
                body[name] = WABA_FIELDS[name]
        if not requested:
            body |= {
                k: WABA_FIELDS[k] for k in ("name", "timezone_id", "message_template_namespace")
            }
        return json_response(200, body)

    def _analytics(self, modifiers: str) -> dict[str, Any]:
        args = dict(re.findall(r"(\w+)\(([^()]*)\)", modifiers))
        if "start" not in args or "end" not in args:
            raise ValueError("analytics requires start and end")
        start, end = int(args["start"]), int(args["end"])
        if end <= start:
            raise ValueError("end must be after start")
        granularity = args.get("granularity", "DAY")
        if granularity not in ("HALF_HOUR", "DAY", "MONTH"):
            raise ValueError(f"granularity {granularity} is not one of HALF_HOUR, DAY, MONTH")
        wanted = re.findall(r"\d+", args.get("phone_numbers", ""))
        with self._lock:
            numbers = [n for n in self._numbers.values() if not wanted or n.digits in wanted]
            points = []
            day = datetime.fromtimestamp(start, UTC).replace(hour=0, minute=0, second=0)
            while day.timestamp() < end:
                key = day.date().isoformat()
                sent = sum(n.sent.get(key, 0) for n in numbers)
                delivered = sum(n.delivered.get(key, 0) for n in numbers)
                if sent or delivered:
                    points.append(
                        {
                            "start": int(day.timestamp()),
                            "end": int((day + timedelta(days=1)).timestamp()),
                            "sent": sent,
                            "delivered": delivered,
                        }
                    )
                day += timedelta(days=1)
        return {
            "phone_numbers": [n.digits for n in numbers],
            "granularity": granularity,
            "data_points": points,
        }

    def _node(self, request: RecordedRequest, node: str) -> Response:
        with self._lock:
            if node in self._numbers:
                wanted = _fields(request.query.get("fields"), NUMBER_DEFAULT_FIELDS)
                return json_response(200, self._number_view(self._numbers[node], wanted))
            if node in self._templates:
                wanted = _fields(request.query.get("fields"), TEMPLATE_DEFAULT_FIELDS)
                return json_response(200, self._template_view(self._templates[node], wanted))
        return graph_error(
            400,
            100,
            f"Unsupported get request. Object with ID '{node}' does not exist, cannot be loaded "
            "due to missing permissions, or does not support this operation.",
            33,
        )

    def _messages(self, request: RecordedRequest, node: str) -> Response:
        """Exists so that tests can prove the exporter never sends a message."""
        return json_response(
            200, {"messaging_product": "whatsapp", "messages": [{"id": "wamid.x"}]}
        )

    def _page(self, request: RecordedRequest, items: list[dict[str, Any]]) -> Response:
        try:
            size = min(int(request.query.get("limit", DEFAULT_PAGE)), MAX_PAGE)
            first = _decode_cursor(request.query["after"]) if "after" in request.query else 0
        except ValueError:
            return graph_error(400, 100, "(#100) Invalid parameter")
        size = max(size, 1)
        chunk = items[first : first + size]
        body: dict[str, Any] = {"data": chunk}
        if chunk:
            paging: dict[str, Any] = {
                "cursors": {"before": _cursor(first), "after": _cursor(first + len(chunk))}
            }
            if first + size < len(items):
                query = {**request.query, "after": _cursor(first + size)}
                paging["next"] = f"{self.url}{request.path}?{urlencode(query)}"
            if first > 0:
                query = {**request.query, "before": _cursor(first)}
                query.pop("after", None)
                paging["previous"] = f"{self.url}{request.path}?{urlencode(query)}"
            body["paging"] = paging
        return json_response(200, body)

    def _number_view(self, n: PhoneNumber, wanted: tuple[str, ...] | None) -> dict[str, Any]:
        limit: Any = self.limit
        if self.limit_form == "integer":
            limit = LIMIT_NUMBERS.get(self.limit, "UNLIMITED")
        entities = [
            {"entity_type": "PHONE_NUMBER", "id": n.id, "can_send_message": n.can_send},
            {"entity_type": "WABA", "id": self.waba_id, "can_send_message": self.waba_can_send},
            {"entity_type": "BUSINESS", "id": "2729063490586005", "can_send_message": "AVAILABLE"},
            {"entity_type": "APP", "id": "334096983071734", "can_send_message": "AVAILABLE"},
        ]
        for entity in entities:
            if entity["can_send_message"] != "AVAILABLE":
                entity["errors"] = [
                    {
                        "error_code": 141006,
                        "error_description": "The number's quality is low.",
                        "possible_solution": "Improve the quality of the messages you send.",
                    }
                ]
        statuses = [e["can_send_message"] for e in entities]
        overall = max(statuses, key=CAN_SEND.index)
        view = {
            "id": n.id,
            "display_phone_number": n.display,
            "verified_name": n.verified_name,
            "quality_rating": n.quality,
            "status": n.status,
            "name_status": n.name_status,
            "code_verification_status": "VERIFIED",
            "platform_type": n.platform_type,
            "throughput": {"level": n.throughput},
            "whatsapp_business_manager_messaging_limit": limit,
            "health_status": {"can_send_message": overall, "entities": entities},
        }
        return _select(view, wanted)

    @staticmethod
    def _template_view(t: Template, wanted: tuple[str, ...] | None) -> dict[str, Any]:
        view = {
            "id": t.id,
            "name": t.name,
            "language": t.language,
            "status": t.status,
            "category": t.category,
            "quality_score": {"score": t.quality, "date": 1700000000},
            "components": [{"type": "BODY", "text": f"Hello {{{{1}}}}, this is {t.name}."}],
            "parameter_format": "POSITIONAL",
        }
        return _select(view, wanted)

    # --- provider-specific answers to faults ----------------------------------------------------

    def error_response(self, code: int, endpoint: str) -> Response:
        if code == 401:
            return graph_error(401, 190, "Invalid OAuth access token - Cannot parse access token")
        if code == 403:
            return graph_error(403, 200, "(#200) Permissions error")
        if code == 404:
            return graph_error(404, 803, "(#803) Some of the aliases you requested do not exist")
        if code == 429:
            return self.rate_limited_response(60)
        if code == 503:
            return graph_error(503, 2, "An unexpected error has occurred. Please retry.")
        if code >= 500:
            return graph_error(code, 1, "An unknown error occurred")
        return graph_error(code, 100, "(#100) Invalid parameter")

    def rate_limited_response(self, retry_after: float) -> Response:
        answer = graph_error(429, 4, "(#4) Application request limit reached")
        answer.headers["X-Business-Use-Case-Usage"] = _usage_header(
            self.waba_id, 100, max(1, math.ceil(retry_after / 60))
        )
        return answer

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        return graph_error(400, 100, message or "(#100) Invalid parameter")

    def wrong_shape(self, endpoint: str) -> Any:
        return {
            "health": {"data": {"id": 1, "display_phone_number": 15550000001}},
            "templates": {"data": [{"name": ["x"], "status": 1}]},
            "analytics": {"id": self.waba_id, "analytics": [{"sent": "many"}]},
        }.get(endpoint, [])

    def not_found(self, request: RecordedRequest) -> Response:
        parts = request.path.rstrip("/").rsplit("/", 1)
        return graph_error(400, 2500, f"Unknown path components: /{parts[-1]}")

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        return graph_error(
            400, 100, f"Unsupported {request.method.lower()} request.", type_="GraphMethodException"
        )

    # --- control --------------------------------------------------------------------------------

    def _ctl_set_number(self, request: RecordedRequest, digits: str) -> Response:
        fields = control_json(request)
        with self._lock:
            try:
                self._by_digits(digits)
            except KeyError:
                display = fields.pop("display", f"+{digits}")
                self.add_number(display, **fields)
                return json_response(201, self._number_view(self._by_digits(digits), None))
            self.set_number(digits, **fields)
            return json_response(200, self._number_view(self._by_digits(digits), None))

    def _ctl_limit(self, request: RecordedRequest) -> Response:
        self.set_limit(control_json(request).get("limit"))
        return json_response(200, {"limit": self.limit})

    def _ctl_template(self, request: RecordedRequest) -> Response:
        data = control_json(request)
        name, language = data.pop("name", None), data.pop("language", "en_US")
        if not isinstance(name, str):
            raise ValueError("'name' is required")
        self.set_template(name, language, **data)
        return json_response(200, self._template_view(self.template(name, language), None))

    def _ctl_rate_limit(self, request: RecordedRequest) -> Response:
        minutes = control_json(request).get("minutes")
        if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes < 0:
            raise ValueError("'minutes' must be a number >= 0")
        self.rate_limit(minutes)
        return json_response(200, {"minutes": minutes})

    def _ctl_account(self, request: RecordedRequest) -> Response:
        data = control_json(request)
        event = data.get("event")
        if event == "ACCOUNT_RESTRICTION":
            minutes = data.get("minutes", 60)
            if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0:
                raise ValueError("'minutes' must be a number > 0")
            self.restrict(minutes)
        elif event == "DISABLE":
            self.disable()
        elif event in REINSTATEMENTS:
            self.reinstate(event)
        else:
            events = ("ACCOUNT_RESTRICTION", "DISABLE", *REINSTATEMENTS)
            raise ValueError(f"'event' must be one of {', '.join(events)}")
        return json_response(200, {"waba_can_send": self.waba_can_send})

    def _ctl_webhooks(self, _request: RecordedRequest) -> Response:
        with self._outbox:
            pending = len(self._queue) + self._in_flight
        counts = self.webhook_counts().__dict__
        return json_response(200, {"url": self.webhook_url, "pending": pending, **counts})

    def _ctl_send_messages(self, request: RecordedRequest) -> Response:
        data = control_json(request) if request.body.strip() else {}
        unknown = sorted(set(data) - {"count", "at_once"})
        if unknown:
            raise ValueError(f"unknown fields {unknown}; allowed: ['at_once', 'count']")
        at_once = data.get("at_once", True)
        if not isinstance(at_once, bool):
            raise ValueError("'at_once' must be true or false")
        return json_response(
            202, {"wamids": self.send_messages(data.get("count", 1), at_once=at_once)}
        )

    def _ctl_send_raw(self, request: RecordedRequest) -> Response:
        """`body`: a JSON object (sent as Meta writes JSON) or a string (sent as it is)."""
        data = control_json(request)
        body = data.get("body")
        if isinstance(body, dict):
            raw = meta_json(body)
        elif isinstance(body, str):
            raw = body.encode()
        else:
            raise ValueError("'body' must be a JSON object or a string")
        status = self.send_raw(raw, data.get("signature", "valid"))
        return json_response(200, {"status": status})

    def _ctl_verify(self, request: RecordedRequest) -> Response:
        data = control_json(request)
        url, token = data.get("url", self.webhook_url), data.get("verify_token")
        if not isinstance(url, str) or not isinstance(token, str):
            raise ValueError("'verify_token' is required, and 'url' unless webhook_url is set")
        return json_response(200, {"verified": self.verify(url, token)})


WABA_FIELDS = {
    "name": "Acme",
    "timezone_id": "1",
    "message_template_namespace": "05155c78_261e_4b2f_82b3_d7958d4cf75f",
    "account_review_status": "APPROVED",
    "business_verification_status": "verified",
    "country": "US",
    "currency": "USD",
    "ownership_type": "SELF",
}


def graph_error(
    status: int, code: int, message: str, subcode: int | None = None, type_: str = "OAuthException"
) -> Response:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = "AbCdEfGhIjKlMnOpQrStUvW"
    return json_response(status, {"error": error})


def sign(secret: bytes, body: bytes) -> str:
    """The hex of X-Hub-Signature-256: HMAC-SHA256 of the raw body keyed by the app secret."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def meta_json(payload: Any) -> bytes:
    """JSON as Meta writes its webhooks: compact, non-ASCII and `/` escaped. A receiver that
    checks the signature over its own re-encoding instead of the raw bytes fails on these."""
    return json.dumps(payload, separators=(",", ":")).replace("/", "\\/").encode()


def _status(message: dict[str, Any], status: str, at: float) -> dict[str, Any]:
    """One entry of `statuses`, shaped as Meta sends it (a failed one has no pricing)."""
    item: dict[str, Any] = {
        "id": message["id"],
        "status": status,
        "timestamp": str(int(at)),
        "recipient_id": message["recipient_id"],
    }
    if status == "failed":
        code = message["code"]
        title, details = FAILURES[code]
        item["errors"] = [
            {
                "code": code,
                "title": title,
                "message": title,
                "error_data": {"details": details},
                "href": ERROR_HREF,
            }
        ]
        return item
    category = message["category"]
    conversation: dict[str, Any] = {"id": message["conversation"]}
    if status == "sent":
        conversation["expiration_timestamp"] = str(message["expiration"])
    conversation["origin"] = {"type": category}
    item["conversation"] = conversation
    item["pricing"] = {
        "billable": category != "service",
        "pricing_model": "PMP",
        "type": "free_customer_service" if category == "service" else "regular",
        "category": category,
    }
    return item


def _ban(state: str) -> dict[str, Any]:
    day = datetime.now(UTC)
    return {
        "event": "DISABLED_UPDATE",
        "ban_info": {"waba_ban_state": state, "waba_ban_date": f"{day:%B} {day.day}, {day.year}"},
    }


def json_body(answer: Response) -> dict[str, Any]:
    return json.loads(answer.body)


def _usage_header(waba_id: str, used: int, regain: int) -> str:
    entry = {
        "type": "whatsapp_bsp",
        "call_count": min(used, 100),
        "total_cputime": max(1, min(used, 100) // 4),
        "total_time": max(1, min(used, 100) // 3),
        "estimated_time_to_regain_access": regain,
    }
    return json.dumps({waba_id: [entry]}, separators=(",", ":"))


def _split_fields(text: str) -> list[str]:
    """`a,b.start(1).phone_numbers(["x","y"]),c` -> three fields: commas inside () do not split."""
    fields, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            fields.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        current += ch
    if current.strip():
        fields.append(current.strip())
    return [f for f in fields if f]


def _fields(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_split_fields(text)) if text else default


def _select(view: dict[str, Any], wanted: tuple[str, ...] | None) -> dict[str, Any]:
    if wanted is None:
        return view
    return {"id": view["id"], **{k: view[k] for k in wanted if k in view}}


def _cursor(index: int) -> str:
    return base64.urlsafe_b64encode(f"cursor:{index}".encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError(text) from None
    prefix, _, index = raw.partition(":")
    if prefix != "cursor" or not index.isdigit():
        raise ValueError(text)
    return int(index)


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


DEMO_APP_SECRET = "demo-app-secret"
DEMO_VERIFY_TOKEN = "demo-verify-token"


def _demo_accounts(base_url: str) -> str:
    return f"""\
meta:
  - account: demo
    base_url: {base_url}
    token: demo-token
    waba_id: "{WABA_ID}"
    app_secret: {DEMO_APP_SECRET}
    verify_token: {DEMO_VERIFY_TOKEN}
    phone_numbers: []
    rate_limit: 5000/h   # Meta's budget for a WABA with a registered number; 200/h before
    health: {{interval: 10s}}
    templates: {{interval: 15s}}
    analytics: {{interval: 15s}}
"""


def _demo_traffic(sim: MetaSimulator, exporter_url: str, stop: threading.Event) -> None:
    """What Meta does for the demo's app: checks the callback URL as a subscription does, then
    reports the statuses of what the business sends, a few messages a second, as they happen.
    Template, limit and account webhooks come from the simulator's ticker."""
    url = f"{exporter_url}/webhooks/meta/demo"
    if not sim.verify(url, DEMO_VERIFY_TOKEN):
        log.warning("meta demo: %s did not answer Meta's subscription check", url)
    sim.app_secret = DEMO_APP_SECRET
    sim.webhook_url = url
    rng = random.Random(11)
    while True:
        sim.send_messages(rng.randint(1, 4), at_once=False)
        if stop.wait(1.0):
            return


def _matrix_keys(account: str, interval: str, healthy: bool) -> dict[str, Any]:
    keys = {
        "token": "demo-token",
        "waba_id": WABA_ID,
        "health": {"interval": interval},
        "templates": {"interval": interval},
        "analytics": {"interval": interval},
    }
    # analytics asks per number: it needs targets even when the number list fails
    return keys if healthy else {**keys, "phone_numbers": ["+1 555-000-0001"]}


def _valid_number() -> dict[str, Any]:
    return {
        "id": "106540352242922",
        "display_phone_number": "+1 555-000-0001",
        "verified_name": "Acme Support",
        "quality_rating": "GREEN",
        "status": "CONNECTED",
        "name_status": "APPROVED",
        "platform_type": "CLOUD_API",
        "throughput": {"level": "STANDARD"},
        "whatsapp_business_manager_messaging_limit": "TIER_10K",
        "health_status": {
            "can_send_message": "AVAILABLE",
            "entities": [
                {
                    "entity_type": "PHONE_NUMBER",
                    "id": "106540352242922",
                    "can_send_message": "AVAILABLE",
                },
                {"entity_type": "WABA", "id": WABA_ID, "can_send_message": "AVAILABLE"},
            ],
        },
    }


KIT = Kit(
    name="meta",
    simulator=MetaSimulator,
    quick={"call_budget": None},
    probe=Probe(
        endpoint="health",
        method="GET",
        path=f"/{WABA_ID}/phone_numbers",
        headers={"Authorization": "Bearer demo-token"},
        misshapen=lambda body: not isinstance(body["data"], list),
    ),
    demo=Demo(
        options={"numbers": 3, "templates": 6, "call_budget": 5000},
        accounts=_demo_accounts,
        metric="whatsapp_phone_number_quality",
        traffic=_demo_traffic,
    ),
    faults=FaultAnswers(
        auth=(
            401,
            "application/json",
            {
                "error": {
                    "message": "Error validating access token: Session has expired.",
                    "type": "OAuthException",
                    "code": 190,
                    "error_subcode": 463,
                    "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
                }
            },
        ),
        rate_limited={
            "error": {
                "message": "(#80007) Rate limit issues",
                "type": "OAuthException",
                "code": 80007,
                "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
            }
        },
        not_found=lambda method, path: {
            "error": {
                "message": f"Unknown path components: {path}",
                "type": "OAuthException",
                "code": 2500,
                "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
            }
        },
        valid={
            "health": {
                "data": [_valid_number()],
                "paging": {"cursors": {"before": "QVFIUk", "after": "QVFIUk"}},
            },
            "templates": {
                "data": [
                    {
                        "id": "564750795574598",
                        "name": "order_confirmation",
                        "language": "en_US",
                        "status": "APPROVED",
                        "category": "UTILITY",
                        "quality_score": {"score": "GREEN", "date": 1700000000},
                    }
                ],
                "paging": {"cursors": {"before": "QVFIUk", "after": "QVFIUk"}},
                "summary": {"total_count": 1},
            },
            "analytics": {
                "analytics": {
                    "phone_numbers": ["15550000001"],
                    "granularity": "DAY",
                    "data_points": [
                        {"start": 1700006400, "end": 1700092800, "sent": 120, "delivered": 118}
                    ],
                },
                "id": WABA_ID,
            },
        },
        # `data` an object, `analytics` a list: no key the exporter reads as a Graph error
        wrong_shape=lambda junk: {"data": {**junk, "id": "\ud800"}, "analytics": [junk]},
    ),
    matrix=Matrix(
        prefix="meta",
        endpoints=("health", "templates", "analytics"),
        keys=_matrix_keys,
    ),
    example=Example(
        account="acme",
        env={"META_VERIFY_TOKEN": "v"},
        # meta-app first: the test writes each file and replaces its path, and /run/secrets/meta
        # is the start of the other
        files={"/run/secrets/meta-app": "app-secret", "/run/secrets/meta": "EAAG-token"},
    ),
    dashboard="whatsapp-meta-cloud-api",
    alerts=(
        "WhatsAppNumberQualityYellow",
        "WhatsAppNumberQualityRed",
        "WhatsAppNumberCannotSend",
        "WhatsAppMessagingLimitDowngraded",
        "WhatsAppTemplatePausedOrDisabled",
        "WhatsAppMetaTokenRejected",
        "WhatsAppMetaFailureRatioHigh",
        "WhatsAppMetaAccountRestricted",
        "WhatsAppMetaWebhooksSilent",
    ),
)
