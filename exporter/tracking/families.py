"""A ledger's totals as metric families, the same for every provider that tracks messages:
`whatsapp_messages_total`, `whatsapp_tracked_<what>` and `whatsapp_message_delivery_seconds`
(the design's "Delivery tracking"). A provider says only what its label and help texts are."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.metrics import Family, Sample
from exporter.tracking.ledger import BUCKETS, STATES, Totals


@dataclass(frozen=True)
class Shown:
    """How one provider's ledger appears on /metrics."""

    provider: str  # the `provider` label
    tracked: str  # whatsapp_tracked_<tracked>: what the ledger keeps, "requests" or "messages"
    messages_help: str
    tracked_help: str
    delivery_help: str


def families(
    shown: Shown, totals: Mapping[str, Totals], accounts: Iterable[str] = ()
) -> list[Family]:
    """Every account in `accounts` is shown, at 0 until the ledger knows it."""
    messages, tracked, delivery = [], [], []
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
    return [
        Family("whatsapp_messages", "counter", shown.messages_help, tuple(messages)),
        Family(f"whatsapp_tracked_{shown.tracked}", "gauge", shown.tracked_help, tuple(tracked)),
        Family(
            "whatsapp_message_delivery_seconds", "histogram", shown.delivery_help, tuple(delivery)
        ),
    ]
