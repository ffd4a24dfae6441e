"""A ledger's totals as metric families, the same for every provider that tracks messages:
`whatsapp_messages_total`, `whatsapp_tracked_<what>`, `whatsapp_message_delivery_seconds` and,
where a provider's statuses carry one, a family of details (Meta's failures by error code); see
docs/architecture.md, "Delivery tracking". The shared families' help is the same whichever
provider's samples come first in the exposition: one family has one HELP line."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.metrics import Family, Sample
from exporter.tracking.ledger import BUCKETS, HARD_BACKLOG, STATES, Totals


@dataclass(frozen=True)
class Shown:
    """How one provider's ledger appears on /metrics."""

    provider: str  # the `provider` label
    tracked: str  # whatsapp_tracked_<tracked>: what the ledger keeps, "requests" or "messages"
    tracked_help: str
    # Totals.details of one status as a counter: (status, family name, label, help)
    details: tuple[str, str, str, str] | None = None


MESSAGES_HELP = (
    "Messages that reached a status, each counted once per status however often the provider "
    "repeats it (read implies delivered implies sent)."
)
DELIVERY_HELP = (
    "Seconds from a message's send (for D7, if it does not say, the id's hand-in to the "
    "exporter) to its delivered and read status."
)
PROBLEMS_HELP = (
    "Reports and webhook events the exporter could not wholly use: bad_report (a D7 report was "
    "malformed; the id is asked again later), bad_timestamp (an event's time was no number, "
    "before 2015 or in the future: its status was kept, its time ignored), unknown_waba (a Meta "
    "webhook entry for a WABA no account is configured with: kept for the account of its URL)."
)
BACKLOG_HELP = (
    "Statuses acknowledged and stored in the ledger's journal but not yet counted: during a "
    "burst webhooks are answered once stored and counted when the writer has time. Stays high "
    f"when the exporter cannot count as fast as they come (past {HARD_BACKLOG:,}, webhooks are "
    "refused with 503 until it drains)."
)
LAST_WEBHOOK_HELP = (
    "Unix time of the newest webhook accepted for the account: a callback that stopped "
    "arriving shows here long before the delivered ratio drifts."
)


def families(
    shown: Shown, totals: Mapping[str, Totals], accounts: Iterable[str] = ()
) -> list[Family]:
    """Every account in `accounts` is shown, at 0 until the ledger knows it."""
    messages, tracked, delivery, details, backlog = [], [], [], [], []
    for account in sorted({*totals, *accounts}):
        t = totals.get(account) or Totals()
        base = (("provider", shown.provider), ("account", account))
        for (status, conversation, kind), count in sorted(t.messages.items()):
            labels = (
                *base,
                ("status", status),
                ("conversation_type", conversation),
                ("message_type", kind),
            )
            messages.append(Sample(labels, float(count), "_total"))
        backlog.append(Sample(base, float(t.backlog)))
        for state in STATES:
            tracked.append(Sample((*base, ("state", state)), float(t.states.get(state, 0))))
        for status in sorted(t.buckets):
            counts, running = t.buckets[status], 0
            labels = (*base, ("status", status))
            for bound, count in zip((*BUCKETS, math.inf), counts, strict=True):
                running += count
                le = "+Inf" if bound == math.inf else f"{float(bound)}"
                delivery.append(Sample((*labels, ("le", le)), float(running), "_bucket"))
            delivery.append(Sample(labels, float(running), "_count"))
            delivery.append(Sample(labels, t.sums.get(status, 0.0), "_sum"))
        if shown.details is not None:
            detailed, _, label, _ = shown.details
            for (status, detail), count in sorted(t.details.items()):
                if status == detailed:
                    details.append(Sample((*base, (label, detail)), float(count), "_total"))
    out = [
        Family("whatsapp_messages", "counter", MESSAGES_HELP, tuple(messages)),
        Family(f"whatsapp_tracked_{shown.tracked}", "gauge", shown.tracked_help, tuple(tracked)),
        Family("whatsapp_message_delivery_seconds", "histogram", DELIVERY_HELP, tuple(delivery)),
        Family("whatsapp_tracking_backlog_statuses", "gauge", BACKLOG_HELP, tuple(backlog)),
    ]
    if shown.details is not None:
        _, name, _, help_text = shown.details
        out.append(Family(name, "counter", help_text, tuple(details)))
    return out
