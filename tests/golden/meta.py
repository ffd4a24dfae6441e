"""Meta's Cloud API: two numbers (one FLAGGED at YELLOW, limited, with a limit Meta answered in an
unknown form), templates (one PAUSED, some dropped over the cap), today's messages of one number
and a rate-limited analytics poll of the other; and what its webhooks told (TOTALS, HEARD)."""

from __future__ import annotations

import math

from exporter.providers import meta
from exporter.providers.base import PollError
from exporter.providers.meta import webhooks
from exporter.snapshot import TargetKey
from exporter.tracking import Totals
from tests.golden import NOW, new_snapshot

# what the status webhooks told: a campaign's funnel, failures by code, latency, and the
# account's events (a restriction in force, one refused delivery, a bad status time)
TOTALS = Totals(
    messages={
        ("sent", "marketing", ""): 1000,
        ("delivered", "marketing", ""): 960,
        ("read", "marketing", ""): 700,
        ("failed", "", ""): 25,
        ("sent", "utility", ""): 40,
        ("delivered", "utility", ""): 40,
    },
    buckets={"delivered": [300, 400, 200, 50] + [0] * 11 + [10], "read": [0] * 6 + [700] + [0] * 9},
    sums={"delivered": 3210.5, "read": 52000.0},
    states={"pending": 15, "done": 1040, "expired": 10},
    details={("failed", "131026"): 20, ("failed", "131049"): 4, ("failed", "unknown"): 1},
)
HEARD = webhooks.Heard(
    events={
        ("messages", ""): 2500,
        ("account_update", "ACCOUNT_RESTRICTION"): 1,
        ("message_template_status_update", "PAUSED"): 1,
    },
    refused={"signature": 1, "verify_token": 0, "malformed": 0, "too_large": 0},
    problems={"bad_timestamp": 1, "unknown_waba": 0},
    last=NOW - 5,
    restrictions={"RESTRICTED_BIZ_INITIATED_MESSAGING": NOW + 86400},
)


def exposition() -> bytes:
    snapshot = new_snapshot()
    snapshot.configure(3, [("meta", "acme", e) for e in ("health", "templates", "analytics")])
    numbers = meta.Numbers(
        (
            meta.PhoneNumber(
                number="15550000001",
                id="106540352242922",
                verified_name="Acme Support",
                platform_type="CLOUD_API",
                throughput="STANDARD",
                quality="YELLOW",
                status="FLAGGED",
                name_status="APPROVED",
                limit=math.inf,
                can_send="LIMITED",
                entities=(("phone_number", "LIMITED"), ("waba", "AVAILABLE")),
            ),
            meta.PhoneNumber(
                number="15550000002",
                id="106540352242923",
                verified_name="Acme Sales",
                platform_type="CLOUD_API",
                throughput="HIGH",
                quality="GREEN",
                status="CONNECTED",
                name_status=None,
                limit=None,
                can_send="AVAILABLE",
            ),
        ),
        problems=(
            ("unknown_messaging_limit", 1),
            ("number_without_digits", 0),
            ("number_not_listed", 0),
        ),
    )
    key = TargetKey("meta", "acme", "health", "")
    snapshot.succeeded(key, 300, meta.health_families("", numbers), 0.25)
    templates = meta.Templates(
        (
            meta.Template("order_confirmation", "en_US", "UTILITY", "APPROVED", "GREEN"),
            meta.Template("spring_sale", "pt_BR", "MARKETING", "PAUSED", "RED"),
        ),
        dropped=12,
    )
    key = TargetKey("meta", "acme", "templates", "")
    snapshot.succeeded(key, 900, meta.templates_families("", templates), 0.5)
    key = TargetKey("meta", "acme", "analytics", "15550000001")
    messages = meta.DayMessages(sent=120, delivered=118)
    snapshot.succeeded(key, 900, meta.analytics_families(key.target, messages), 0.125)
    key = TargetKey("meta", "acme", "analytics", "15550000002")
    snapshot.failed(key, 900, PollError("rate_limited", "HTTP 400: code 80007: rate limit"), 0.1)
    snapshot.set_extra(
        "meta", webhooks.webhook_families({"acme": TOTALS}, {"acme": HEARD}, [], NOW)
    )
    snapshot.publish()
    return snapshot.exposition.plain
