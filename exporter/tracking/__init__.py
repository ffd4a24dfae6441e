"""Delivery tracking: one room for every provider that reports what happened to each message.

A provider turns its own answers and webhooks into `MessageUpdate`s and says what its statuses
mean in a `Vocabulary`; the ledger remembers each message id per account, counts each message
once per status however often a status is repeated, keeps pending messages until a final status
or `expire_after`, and prunes what is done. See docs/architecture.md, "Delivery tracking".
"""

from exporter.tracking.families import Shown, families
from exporter.tracking.ledger import (
    BUCKETS,
    STATES,
    Due,
    Ledger,
    MessageUpdate,
    Pending,
    Schedule,
    Totals,
    Vocabulary,
    open_ledger,
)
from exporter.tracking.stores import LedgerError, Names

__all__ = [
    "BUCKETS",
    "STATES",
    "Due",
    "Ledger",
    "LedgerError",
    "MessageUpdate",
    "Names",
    "Pending",
    "Schedule",
    "Shown",
    "Totals",
    "Vocabulary",
    "families",
    "open_ledger",
]
