"""Betatel's own counts per window."""

from __future__ import annotations

from mixin.config import Config
from mixin.dashboards.builder import (
    Json,
    Layout,
    dashboard,
    row,
    sel,
    stat,
    state_timeline,
    steps,
    targets,
    timeseries,
    value_map,
)


def betatel(c: Config) -> Json:
    layout = Layout()
    per_window = "{{window}} ({{account}})"
    share = f"{sel('whatsapp_stats_transactions')}\n  / ({sel('whatsapp_stats_requests')} > 0)"
    panels = [
        row("Now", layout),
        stat(
            "Requests",
            """Messages requested from Betatel in each configured window (rolling windows like
            last5m, or the running bucket like today), as Betatel counts them now.""",
            targets((sel("whatsapp_stats_requests"), per_window)),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
        ),
        stat(
            "Transactions",
            """Messages Betatel processed in each window. Far fewer than the requests: see the
            success share.""",
            targets((sel("whatsapp_stats_transactions"), per_window)),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
        ),
        stat(
            "Amount",
            """What Betatel billed in each window, in the currency named in each value's label
            (accounts may bill in different currencies, so no currency unit is assumed).""",
            targets((sel("whatsapp_stats_amount"), "{{window}} {{currency}} ({{account}})")),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
            decimals=2,
        ),
        stat(
            "Success share",
            """Transactions as a share of requests in each window (blank for a window without
            requests). Red under 90%, orange under 97%: messages are being refused; check the
            recipients and templates of recent sends, and Betatel's status.""",
            targets((share, per_window)),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (0.9, "orange"), (0.97, "green")),
            decimals=1,
        ),
        row("Over time", layout),
        timeseries(
            "Requests and transactions",
            """Each window's requests and transactions over time. A rolling window (last5m,
            lasth) shows the traffic's shape; a running bucket (today, daily) climbs and resets
            when the bucket starts anew. Transactions falling behind requests: messages are
            refused.""",
            targets(
                (sel("whatsapp_stats_requests"), "{{window}} requests ({{account}})"),
                (sel("whatsapp_stats_transactions"), "{{window}} transactions ({{account}})"),
            ),
            unit="short",
            layout=layout,
        ),
        timeseries(
            "Amount billed",
            """What each window cost over time, per currency (in the legend). A rolling window
            that costs more than usual is a burst of sending, wanted or not.""",
            targets((sel("whatsapp_stats_amount"), "{{window}} {{currency}} ({{account}})")),
            unit="short",
            layout=layout,
            decimals=2,
        ),
        timeseries(
            "Success share",
            """Transactions as a share of requests in each window over time (red band under
            90%). A drop in a short window is happening now; in a long one it happened
            earlier.""",
            targets((share, per_window)),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (0.9, "transparent")),
            threshold_style="area",
            max_value=1,
        ),
        state_timeline(
            "Polls per window",
            """Whether the newest stats poll of each window succeeded (green) or failed (red).
            Failing: the API key or account id was refused (auth), or Betatel is down; the
            overview's errors panel and the exporter's landing page say why. Values of a
            failing window go stale and then disappear.""",
            targets((sel("whatsapp_exporter_up"), "{{target}} ({{account}})")),
            mappings=value_map((0, "failing", "red"), (1, "up", "green")),
            layout=layout,
            size=(12, 8),
        ),
    ]
    return dashboard(
        c,
        "betatel",
        "WhatsApp: Betatel stats",
        """Betatel's own counts per configured time window: requests, processed messages
        (transactions), the amount billed in its currency, and the share that succeeded.""",
        "betatel",
        panels,
    )
