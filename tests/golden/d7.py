"""D7: one report cycle and the ledger's totals."""

from __future__ import annotations

from exporter.providers import d7
from exporter.snapshot import TargetKey
from exporter.tracking import Totals
from tests.golden import new_snapshot


def exposition() -> bytes:
    snapshot = new_snapshot()
    snapshot.configure(3, [("d7", "prod", "report")])
    snapshot.succeeded(TargetKey("d7", "prod", "report", ""), 5, [], 0.05)
    totals = Totals(
        messages={
            ("sent", "marketing", "template"): 10,
            ("delivered", "marketing", "template"): 8,
            ("read", "marketing", "template"): 5,
            ("un_delivered", "utility", "text"): 1,
        },
        buckets={"delivered": [0, 2, 3, 1] + [0] * 11 + [2], "read": [0] * 8 + [5] + [0] * 7},
        sums={"delivered": 200123.5, "read": 3000.0},
        states={"pending": 7, "done": 3, "expired": 1},
    )
    snapshot.set_extra("d7", d7.ledger_families({"prod": totals}))
    snapshot.publish()
    return snapshot.exposition.plain
