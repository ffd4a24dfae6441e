"""D7 delivery: statuses, ratios, latency, pending and expired requests."""

from __future__ import annotations

from mixin.config import Config
from mixin.dashboards.builder import (
    D7_FAILED,
    HIDE_ALL_ZERO,
    RATE,
    Json,
    Layout,
    colour_by_name,
    dashboard,
    matcher,
    row,
    sel,
    stat,
    steps,
    targets,
    timeseries,
)
from mixin.dashboards.shared import (
    messages_by_status,
    pending_and_expired,
    poll_errors,
    time_to,
)


def d7(c: Config) -> Json:
    layout = Layout()
    failed_messages = sel("whatsapp_messages_total", matcher("status", D7_FAILED, "=~"))

    panels = [
        row("Last hour", layout),
        stat(
            "Delivered ratio (1h)",
            """Share of the messages that reached an outcome in the last hour that were
            delivered (recording rule whatsapp:messages_delivered:ratio_rate1h). Red under 90%:
            see which statuses and message types fail in the panels below.""",
            targets((sel("whatsapp:messages_delivered:ratio_rate1h"), "{{account}}")),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (0.9, "orange"), (0.97, "green")),
            decimals=1,
        ),
        stat(
            "Read ratio (1h)",
            """Share of the messages delivered in the last hour that were also read (recording
            rule whatsapp:messages_read:ratio_rate1h). It depends on your recipients more than
            on D7; a sudden drop may mean read receipts stopped arriving.""",
            targets((sel("whatsapp:messages_read:ratio_rate1h"), "{{account}}")),
            unit="percentunit",
            layout=layout,
            thresholds=steps("blue"),
            decimals=1,
        ),
        stat(
            "Outcomes (1h)",
            """Messages that reached an outcome (delivered, un_delivered, rejected or
            insufficient_credit) in the last hour (recording rule
            whatsapp:messages_outcome:increase1h): how much the ratios rest on. Zero while you
            send: request ids are not handed to the exporter, or D7's callback does not reach
            it.""",
            targets((sel("whatsapp:messages_outcome:increase1h"), "{{account}}")),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
            decimals=0,
        ),
        stat(
            "Pending requests",
            """Request ids handed in that have not reached a final status yet. It should rise
            and fall with your traffic; steady growth means D7 answers slowly or not at all, or
            the account's rate_limit is too small for the traffic.""",
            targets((sel("whatsapp_tracked_requests", 'state="pending"'), "{{account}}")),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
        ),
        row("Statuses and ratios", layout),
        messages_by_status(
            layout,
            """Messages reaching each status per minute (a read message also counts as
            delivered and sent). delivered should follow sent closely; un_delivered, rejected or
            insufficient_credit rising is the problem to chase (insufficient_credit: top up the
            D7 account).""",
            colour_by_name("^(un_delivered|rejected) .*", "red"),
            colour_by_name("^insufficient_credit .*", "orange"),
        ),
        timeseries(
            "Delivered and read ratio (1h)",
            """Delivered share of the outcomes and read share of the delivered messages, each
            over the hour before every point (recording rules whatsapp:messages_delivered:
            ratio_rate1h and whatsapp:messages_read:ratio_rate1h). The red band is under 90%
            delivered, where the WhatsAppD7DeliveredRatioLow alert fires.""",
            targets(
                (sel("whatsapp:messages_delivered:ratio_rate1h"), "{{account}} delivered"),
                (sel("whatsapp:messages_read:ratio_rate1h"), "{{account}} read"),
            ),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (0.9, "transparent")),
            threshold_style="area",
            max_value=1,
        ),
        row("Latency", layout),
        time_to(
            "delivered",
            "Time to delivered",
            """Median, 90th and 99th percentile of the time from send to delivered for the
            messages delivered in each interval. A rising p50 means D7 or WhatsApp are slow for
            everyone; a rising p99 alone means a few recipients are offline.""",
            layout,
        ),
        time_to(
            "read",
            "Time to read",
            """Median, 90th and 99th percentile of the time from send to read for the messages
            read in each interval. Mostly the recipients' habits; a sudden jump for every
            percentile may mean read receipts arrive late.""",
            layout,
        ),
        row("Failures and request ids", layout),
        timeseries(
            "Failed messages by type",
            """Messages per minute that ended un_delivered, rejected or insufficient_credit, by
            conversation and message type; series that stayed at zero are hidden. One type
            failing alone points at that template or content (e.g. a marketing template WhatsApp
            no longer accepts); all types failing points at D7 or the account.""",
            targets(
                (
                    "sum by (account, status, conversation_type, message_type) "
                    f"(rate({failed_messages}[{RATE}])) * 60",
                    "{{status}}: {{conversation_type}} {{message_type}} ({{account}})",
                )
            ),
            unit="count:msg/min",
            layout=layout,
            overrides=[HIDE_ALL_ZERO],
        ),
        pending_and_expired(
            "whatsapp_tracked_requests",
            "Pending and expired requests",
            """Request ids still followed (pending) and those given up on (expired: no final
            status within expire_after, default 72h, or unknown to D7 after not_found_grace).
            Expired ids are kept for keep_finished (7d); a rise means ids the exporter could not
            follow, so the ratios miss them.""",
            layout,
        ),
        timeseries(
            "Pending growth",
            """How fast the pending ids grow, per hour over 30 minutes (recording rule
            whatsapp:tracked_requests_pending:deriv30m). Above zero for long while more than 100
            are pending, the WhatsAppD7PendingGrowing alert fires: D7 answers slowly, or the
            account's rate_limit is too small for the traffic.""",
            targets((f"{sel('whatsapp:tracked_requests_pending:deriv30m')} * 3600", "{{account}}")),
            unit="count:ids/h",
            layout=layout,
            min_value=None,
        ),
        poll_errors(layout, "account, reason", "{{account}}: {{reason}}"),
    ]
    return dashboard(
        c,
        "d7",
        "WhatsApp: D7 delivery",
        """D7 Networks messages followed to their final status: rates per status, delivered
        and read ratios, time to delivered and to read, failures by message type, and the
        request ids still pending or expired.""",
        "d7",
        panels,
    )
