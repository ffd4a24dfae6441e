"""What D7's statuses mean to the delivery ledger."""

from __future__ import annotations

from typing import Any

from exporter.tracking import Ledger, Names, Shown, Vocabulary, open_ledger

STATUSES = (
    "processed",
    "scheduled",
    "sent",
    "delivered",
    "read",
    "un_delivered",
    "rejected",
    "insufficient_credit",
)
# a message that was read was delivered, and one that was delivered was sent, even when no
# answer showed the step in between: counting them keeps delivered/read ratios right
IMPLIES = {"read": ("delivered", "sent"), "delivered": ("sent",)}

VOCABULARY = Vocabulary(
    title="the D7",
    statuses=STATUSES,
    final=frozenset({"read", "un_delivered", "rejected", "insufficient_credit"}),
    implies=IMPLIES,
    conversation_types=frozenset({"marketing", "utility", "service", "authentication"}),
    message_types=frozenset({"text", "attachment", "location", "contacts", "template"}),
    # the tables and lock keys D7's ledger had before the room was shared: kept, so that an
    # existing database goes on as it was
    names=Names(prefix="", namespace=b"D7LG"),
)

SHOWN = Shown(
    provider="d7",
    tracked="requests",
    tracked_help="D7 request ids in the exporter's ledger by state.",
)


def open_d7_ledger(location: str, **options: Any) -> Ledger:
    """D7's ledger at a SQLite path or a PostgreSQL URL (`open_ledger`'s options)."""
    return open_ledger(location, vocabulary=VOCABULARY, **options)
