"""The overview: every provider and account at a glance."""

from __future__ import annotations

from mixin.config import Config
from mixin.dashboards.builder import (
    Json,
    Layout,
    dashboard,
    fixed_colour,
    link_to,
    override,
    panel,
    row,
    sel,
    stat,
    steps,
    target,
    targets,
    value_map,
)
from mixin.dashboards.shared import (
    balance_runs_out,
    devices_disconnected,
    poll_errors,
    worst_failure_ratio,
)


def overview(c: Config) -> Json:
    layout = Layout()
    by_target = "provider, account, endpoint, target"
    today = 'window="today"'
    today_transactions = sel("whatsapp_stats_transactions", today)
    today_requests = sel("whatsapp_stats_requests", today)
    panels = [
        row("Health and delivery", layout),
        stat(
            "Failing targets",
            """Per provider and account: polled targets (an endpoint for a device, number or
            window) whose newest poll failed; red from one. Their values are old and, after
            `stale_after` intervals, gone: every other panel of that account is then blind. The
            table below says which target and since when, the errors panel why.""",
            targets(
                (
                    f"sum by (provider, account) (1 - {sel('whatsapp_exporter_up')})",
                    "{{provider}} {{account}}",
                )
            ),
            unit="short",
            layout=layout,
            size=(4, 5),
            thresholds=steps("green", (1, "red")),
            sparkline=False,
        ),
        stat(
            "Delivery error budget left (30d)",
            """Per provider and account, the share of the 30-day delivery error budget not yet
            spent (recording rule whatsapp:delivery_error_budget:ratio_remaining30d): 100% is
            untouched, 0% spent, below 0 overspent. Orange under 50%, red under 10%: open the
            SLO dashboard for the burn rates and which provider fails.""",
            targets(
                (
                    sel("whatsapp:delivery_error_budget:ratio_remaining30d"),
                    "{{provider}} {{account}}",
                )
            ),
            unit="percentunit",
            layout=layout,
            size=(5, 5),
            thresholds=steps("red", (0.1, "orange"), (0.5, "green")),
            decimals=1,
            sparkline=False,
            links=link_to("slo", "Delivery SLO"),
        ),
        stat(
            "D7 delivered ratio (1h)",
            """Per account, the share of D7 messages that reached an outcome in the last hour
            and were delivered (recording rule whatsapp:messages_delivered:ratio_rate1h), and how
            many outcomes that is (whatsapp:messages_outcome:increase1h): a ratio over a handful
            of messages means little. Red under 90% (the WhatsAppD7DeliveredRatioLow alert):
            open the D7 dashboard to see whether messages are un_delivered, rejected or refused
            for insufficient credit.""",
            targets(
                (sel("whatsapp:messages_delivered:ratio_rate1h"), "{{account}} delivered"),
                (sel("whatsapp:messages_outcome:increase1h"), "{{account}} outcomes"),
            ),
            unit="percentunit",
            layout=layout,
            size=(5, 5),
            thresholds=steps("red", (0.9, "orange"), (0.97, "green")),
            decimals=1,
            overrides=[
                override(
                    "byFrameRefID",
                    "B",
                    {"id": "unit", "value": "short"},
                    {"id": "decimals", "value": 0},
                    fixed_colour("blue"),
                )
            ],
            links=link_to("d7", "D7 delivery"),
        ),
        stat(
            "Betatel success share today",
            """Per account, processed messages (transactions) as a share of requests in
            Betatel's `today` window (only if that window is configured). Red under 90%, orange
            under 97%: open the Betatel dashboard for the other windows and the billed
            amount.""",
            targets(
                (
                    f"sum by (account) ({today_transactions})"
                    f" / sum by (account) ({today_requests} > 0)",
                    "{{account}}",
                )
            ),
            unit="percentunit",
            layout=layout,
            size=(5, 5),
            thresholds=steps("red", (0.9, "orange"), (0.97, "green")),
            decimals=1,
            links=link_to("betatel", "Betatel stats"),
        ),
        stat(
            "Kaleyra callback queue",
            """Per number, callbacks the WhatsApp Business API client has not yet delivered to
            your webhook. Orange from 100, red from 1,000; a queue that keeps growing means the
            webhook receiver is slow or down (the WhatsAppClientCallbackQueueGrowing alert).""",
            targets(
                (sel("whatsapp_client_app_callback_queue_size"), "{{account}} {{number}}"),
            ),
            unit="short",
            layout=layout,
            size=(5, 5),
            thresholds=steps("green", (100, "orange"), (1000, "red")),
            links=link_to("kaleyra", "Kaleyra client"),
        ),
        stat(
            "Meta numbers at risk",
            """Per account, Meta Cloud API numbers whose quality is not GREEN or that cannot
            send freely (health status LIMITED or BLOCKED). Red from one: the Meta dashboard
            says which number, which entity and which template.""",
            targets(
                (
                    "count by (account) ("
                    + sel("whatsapp_phone_number_quality", 'quality=~"YELLOW|RED"')
                    + " == 1 or on (account, number) "
                    + sel(
                        "whatsapp_can_send_message",
                        'entity="overall"',
                        'status=~"LIMITED|BLOCKED"',
                    )
                    + " == 1)",
                    "{{account}}",
                ),
            ),
            unit="short",
            layout=layout,
            size=(4, 5),
            thresholds=steps("green", (1, "red")),
            links=link_to("meta", "Meta Cloud API"),
        ),
        row("WhatsGate devices", layout),
        devices_disconnected(
            layout,
            (5, 5),
            "WhatsGate devices disconnected",
            links=link_to("whatsgate", "WhatsGate devices"),
        ),
        stat(
            "WhatsGate lowest balance",
            """Per account, the smallest message balance of any of its WhatsGate devices.
            Sending stops at zero: red under 100 (the WhatsAppBalanceLow alert), orange under
            1,000. Top up in WhatsGate; the next panel says how soon it runs out.""",
            targets(
                (
                    f"min by (account) ({sel('whatsapp_balance_remaining_messages')})",
                    "{{account}}",
                )
            ),
            unit="short",
            layout=layout,
            size=(5, 5),
            thresholds=steps("red", (100, "orange"), (1000, "green")),
            links=link_to("whatsgate", "WhatsGate devices"),
        ),
        balance_runs_out(
            layout,
            (5, 5),
            "WhatsGate balance runs out in",
            links=link_to("whatsgate", "WhatsGate devices"),
        ),
        worst_failure_ratio(
            layout,
            (5, 5),
            "WhatsGate worst failure ratio today",
            links=link_to("whatsgate", "WhatsGate devices"),
        ),
        row("Polling", layout),
        panel(
            "table",
            "Polled targets",
            """Every provider endpoint and target the exporter polls, failing ones first. Up: the
            newest poll succeeded. Since last success: how old the values are (blank if no poll
            has succeeded since the exporter started); a target without success for `stale_after`
            of its intervals drops its values from /metrics. Last poll: how long the newest poll
            took, including waiting for the account's request budget. When targets are down, the
            errors panel says why.""",
            [
                target(
                    f"max by ({by_target}) ({sel('whatsapp_exporter_up')})", "", "A", table=True
                ),
                target(
                    f"max by ({by_target}) "
                    f"(time() - {sel('whatsapp_exporter_last_success_timestamp_seconds')})",
                    "",
                    "B",
                    table=True,
                ),
                target(
                    f"max by ({by_target}) ({sel('whatsapp_exporter_poll_duration_seconds')})",
                    "",
                    "C",
                    table=True,
                ),
            ],
            unit="short",
            size=(14, 9),
            layout=layout,
            defaults={"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            overrides=[
                override(
                    "byName",
                    "Up",
                    {"id": "unit", "value": "none"},
                    {"id": "mappings", "value": value_map((0, "DOWN", "red"), (1, "up", "green"))},
                    {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                    {"id": "custom.width", "value": 80},
                ),
                override(
                    "byName",
                    "Since last success",
                    {"id": "unit", "value": "s"},
                    {"id": "thresholds", "value": steps("green", (900, "orange"), (1800, "red"))},
                    {"id": "custom.cellOptions", "value": {"type": "color-text"}},
                ),
                override("byName", "Last poll", {"id": "unit", "value": "s"}),
            ],
            options={
                "showHeader": True,
                "cellHeight": "sm",
                "footer": {"show": False, "reducer": ["sum"], "fields": ""},
                "sortBy": [{"displayName": "Up", "desc": False}],
            },
            transformations=[
                {"id": "merge", "options": {}},
                {
                    "id": "organize",
                    "options": {
                        "excludeByName": {"Time": True},
                        "indexByName": {},
                        "renameByName": {
                            "provider": "Provider",
                            "account": "Account",
                            "endpoint": "Endpoint",
                            "target": "Target",
                            "Value #A": "Up",
                            "Value #B": "Since last success",
                            "Value #C": "Last poll",
                        },
                    },
                },
            ],
        ),
        poll_errors(
            layout,
            "provider, account, reason",
            "{{provider}} {{account}}: {{reason}}",
            size=(10, 9),
        ),
    ]
    return dashboard(
        c,
        "overview",
        "WhatsApp: overview",
        """Every WhatsApp provider and account at a glance: is the exporter able to poll them,
        are WhatsGate devices connected and funded, do messages fail, does D7 deliver, does the
        Kaleyra client keep up. Panels link to each provider's own dashboard.""",
        None,
        panels,
    )
