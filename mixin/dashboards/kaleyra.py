"""The Kaleyra WhatsApp Business API client: queues, API traffic, durations, errors."""

from __future__ import annotations

from mixin.config import Config
from mixin.dashboards.builder import (
    HIDE_ALL_ZERO,
    RATE,
    Json,
    Layout,
    colour_by_name,
    dashboard,
    row,
    sel,
    stat,
    steps,
    target,
    targets,
    timeseries,
)


def kaleyra(c: Config) -> Json:
    layout = Layout()
    per_number = "{{number}} ({{account}})"

    def average(summary: str, by: str) -> str:
        total = f"sum by ({by}) (rate({sel(summary + '_sum')}[{RATE}]))"
        count = f"sum by ({by}) (rate({sel(summary + '_count')}[{RATE}]))"
        return f"{total}\n  / ({count} > 0)"

    def callbacks(function: str, window: str, *matchers: str) -> str:
        """Callback requests of either client version: newer ones count them in the duration
        summary, older ones in a plain counter."""
        new = sel("whatsapp_client_app_callback_requests_duration_seconds_count", *matchers)
        old = sel("whatsapp_client_app_callback_requests_total", *matchers)
        return f"{function}({new}[{window}]) or {function}({old}[{window}])"

    not_success = 'result!="success"'
    failed_in_range = callbacks("increase", "$__range", not_success)
    all_in_range = callbacks("increase", "$__range")
    failed_rate = callbacks("rate", RATE, not_success)
    rate_limited = sel("whatsapp_client_app_concurrent_rate_limit_triggered_total")
    failed_out = sel("whatsapp_client_app_out_message_status_total", 'status="failed"')
    refused = sel("whatsapp_client_app_endpoint_requests_total", 'status=~"[45].."')
    panels = [
        row("Now", layout),
        stat(
            "Callback queue",
            """Callbacks the WhatsApp Business API client holds for your webhook, per number.
            Orange from 100, red from 1,000: the webhook receiver is slow or down, and inbound
            messages and status updates reach you late.""",
            targets((sel("whatsapp_client_app_callback_queue_size"), per_number)),
            unit="short",
            layout=layout,
            thresholds=steps("green", (100, "orange"), (1000, "red")),
        ),
        stat(
            "Pending messages",
            """Outbound messages the client has accepted but not yet sent, per number. Orange
            from 100, red from 1,000: the client cannot reach WhatsApp fast enough, or it is
            being rate limited.""",
            targets((sel("whatsapp_client_app_pending_messages"), per_number)),
            unit="short",
            layout=layout,
            thresholds=steps("green", (100, "orange"), (1000, "red")),
        ),
        stat(
            "Failed callbacks",
            """Share of the client's callbacks to your webhook that did not succeed, per number,
            over the selected time range. Anything but zero: your webhook answers errors or
            times out; its logs say why.""",
            [
                target(
                    f"sum by (account, number) ({failed_in_range})\n"
                    f"  / (sum by (account, number) ({all_in_range}) > 0)",
                    per_number,
                    instant=True,
                )
            ],
            unit="percentunit",
            layout=layout,
            thresholds=steps("green", (0.01, "orange"), (0.05, "red")),
            decimals=2,
            sparkline=False,
        ),
        stat(
            "Failing polls",
            """Numbers whose newest stats poll failed (red). The stats API answers only
            whitelisted IPs: after a move to a new address, ask Kaleyra to whitelist it. While a
            poll fails the panels below show old values, and after `stale_after` intervals
            none.""",
            targets(
                (
                    f"sum by (account, target) (1 - {sel('whatsapp_exporter_up')})",
                    "{{target}} ({{account}})",
                )
            ),
            unit="short",
            layout=layout,
            thresholds=steps("green", (1, "red")),
            sparkline=False,
        ),
        row("Queues and traffic", layout),
        timeseries(
            "Callback queue",
            """Callbacks waiting to be delivered to your webhook, per number (orange band from
            100, red from 1,000). Bursts that drain are normal; a queue that only grows means
            the receiver is slow or down.""",
            targets((sel("whatsapp_client_app_callback_queue_size"), per_number)),
            unit="short",
            layout=layout,
            thresholds=steps("transparent", (100, "orange"), (1000, "red")),
            threshold_style="area",
        ),
        timeseries(
            "Queue growth",
            """How fast the callback queue and the pending messages grow, per minute over 10
            minutes (recording rules whatsapp:client_app_callback_queue_size:deriv10m and
            whatsapp:client_app_pending_messages:deriv10m). Above zero for 15 minutes with more
            than 100 waiting, the WhatsAppClientCallbackQueueGrowing or
            WhatsAppClientPendingMessagesGrowing alert fires.""",
            targets(
                (
                    f"{sel('whatsapp:client_app_callback_queue_size:deriv10m')} * 60",
                    "{{number}} callback queue ({{account}})",
                ),
                (
                    f"{sel('whatsapp:client_app_pending_messages:deriv10m')} * 60",
                    "{{number}} pending messages ({{account}})",
                ),
            ),
            unit="count:/min",
            layout=layout,
            min_value=None,
        ),
        timeseries(
            "Pending messages and callbacks",
            """What the client still has to do, per number: outbound messages not yet sent and
            callbacks not yet delivered (app), and messages pending in its database (summed over
            nodes). Steady growth: the client falls behind; check the durations below.""",
            targets(
                (
                    sel("whatsapp_client_app_pending_messages"),
                    "{{number}} pending messages ({{account}})",
                ),
                (
                    sel("whatsapp_client_app_pending_callbacks"),
                    "{{number}} pending callbacks ({{account}})",
                ),
                (
                    f"sum by (account, number) ({sel('whatsapp_client_db_pending_messages')})",
                    "{{number}} database pending messages ({{account}})",
                ),
            ),
            unit="short",
            layout=layout,
        ),
        timeseries(
            "API requests",
            """Requests your application makes to the client's API per second, by endpoint and
            HTTP status. 4xx answers are your application's requests being refused (a bad
            payload or an unknown recipient); 5xx the client failing.""",
            targets(
                (
                    "sum by (account, number, method, request, status) "
                    f"(rate({sel('whatsapp_client_app_endpoint_requests_total')}[{RATE}]))",
                    "{{method}} {{request}} {{status}}: {{number}} ({{account}})",
                )
            ),
            unit="reqps",
            layout=layout,
            overrides=[colour_by_name("^\\S+ \\S+ [45]\\d\\d: .*", "red")],
        ),
        row("Durations", layout),
        timeseries(
            "Average callback duration",
            """Mean time the client's callbacks to your webhook took, by callback type. It is
            your webhook's response time: when it rises the callback queue follows.""",
            targets(
                (
                    average(
                        "whatsapp_client_app_callback_requests_duration_seconds",
                        "account, number, type",
                    ),
                    "{{type}}: {{number}} ({{account}})",
                )
            ),
            unit="s",
            layout=layout,
            size=(8, 8),
        ),
        timeseries(
            "Average database request duration",
            """Mean time of the client's database requests, by database and request type. A
            slow database slows everything else: sending, callbacks, the API.""",
            targets(
                (
                    average(
                        "whatsapp_client_app_db_request_duration_seconds",
                        "account, number, db, request",
                    ),
                    "{{db}} {{request}}: {{number}} ({{account}})",
                )
            ),
            unit="s",
            layout=layout,
            size=(8, 8),
        ),
        timeseries(
            "Average send duration",
            """Mean time the client took to send an outbound message to WhatsApp. When it rises
            pending messages pile up; WhatsApp or the client's network is slow.""",
            targets(
                (
                    average(
                        "whatsapp_client_app_out_message_sent_duration_seconds", "account, number"
                    ),
                    per_number,
                )
            ),
            unit="s",
            layout=layout,
            size=(8, 8),
        ),
        row("Errors", layout),
        timeseries(
            "Client errors",
            """Per minute: callbacks that did not succeed (by result code), hits of the
            client's concurrent request limit, outbound messages that failed, and API requests
            answered 4xx or 5xx; series that stayed at zero are hidden. Rate-limit hits: your
            application sends too many requests at once.""",
            targets(
                (
                    f"sum by (account, number, type, result) ({failed_rate}) * 60",
                    "callback {{type}} result {{result}}: {{number}} ({{account}})",
                ),
                (
                    f"sum by (account, number) (rate({rate_limited}[{RATE}])) * 60",
                    "concurrent rate limit: {{number}} ({{account}})",
                ),
                (
                    f"sum by (account, number) (rate({failed_out}[{RATE}])) * 60",
                    "outbound message failed: {{number}} ({{account}})",
                ),
                (
                    f"sum by (account, number, request, status) (rate({refused}[{RATE}])) * 60",
                    "API {{request}} {{status}}: {{number}} ({{account}})",
                ),
            ),
            unit="count:events/min",
            layout=layout,
            size=(24, 8),
            overrides=[HIDE_ALL_ZERO],
        ),
    ]
    return dashboard(
        c,
        "kaleyra",
        "WhatsApp: Kaleyra client",
        """The WhatsApp Business API client behind each Kaleyra number: callback queue, pending
        messages, API traffic, durations of callbacks, database requests and sends, and
        errors.""",
        "kaleyra",
        panels,
    )
