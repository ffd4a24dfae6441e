"""Meta's WhatsApp Cloud API: every number's quality, status, health and messaging limit, the
message templates, and today's sent and delivered messages."""

from __future__ import annotations

from typing import Any

from mixin.config import Config
from mixin.dashboards.builder import (
    Json,
    Layout,
    colour_by_name,
    dashboard,
    matcher,
    row,
    sel,
    stat,
    state_timeline,
    steps,
    targets,
    timeseries,
    value_map,
)

NUMBER = "{{number}} ({{account}})"


def coded(metric: str, label: str, codes: tuple[tuple[str, int], ...], *extra: str) -> str:
    """One number per state, so that each number is one row of a state timeline."""
    states = "\n  or ".join(
        f"({sel(metric, *extra, matcher(label, value))} == 1) * {code}" for value, code in codes
    )
    return f"max by (account, number) (\n    {states}\n)"


def meta(c: Config) -> Json:
    layout = Layout()
    quality = (("GREEN", 1), ("YELLOW", 2), ("RED", 3), ("UNKNOWN", 4))
    can_send = (("AVAILABLE", 1), ("LIMITED", 2), ("BLOCKED", 3))

    def counted(
        title: str,
        description: str,
        query: str,
        legend: str = "{{account}}",
        colour: str = "red",
        **more: Any,
    ) -> Json:
        """A count now, green at 0 and `colour` from one."""
        return stat(
            title,
            description,
            targets((query, legend)),
            unit="short",
            layout=layout,
            size=(6, 4),
            thresholds=steps("green", (1, colour)),
            sparkline=False,
            **more,
        )

    panels = [
        row("Now", layout),
        counted(
            "Numbers not GREEN",
            """Per account: numbers whose quality rating at Meta is YELLOW or RED (red from
            one). RED numbers lose messaging limit and may be restricted; see the quality
            timeline below.""",
            "sum by (account) ("
            + sel("whatsapp_phone_number_quality", matcher("quality", "YELLOW|RED", "=~"))
            + ")",
        ),
        counted(
            "Numbers that cannot send freely",
            """Per account: numbers whose overall health status is LIMITED or BLOCKED (red from
            one). BLOCKED sends nothing; the per-entity panel below says which entity (number,
            WABA, business, app) is the cause.""",
            "sum by (account) ("
            + sel(
                "whatsapp_can_send_message",
                matcher("entity", "overall"),
                matcher("status", "LIMITED|BLOCKED", "=~"),
            )
            + ")",
        ),
        counted(
            "Templates paused or disabled",
            """Per account: message templates Meta paused or disabled (orange from one).
            Messages using them fail until they are approved again.""",
            "count by (account) ("
            + sel("whatsapp_template_status", matcher("status", "PAUSED|DISABLED", "=~"))
            + ")",
            colour="orange",
            no_value="0",
        ),
        counted(
            "Failing polls",
            """Per account and endpoint (health, templates, analytics): Meta targets whose newest
            poll failed (red from one); the landing page and
            whatsapp_exporter_poll_errors_total say why (auth: the token; rate_limited: Meta's
            budget).""",
            f"sum by (account, endpoint) (1 - {sel('whatsapp_exporter_up')})",
            legend="{{account}} {{endpoint}}",
        ),
        row("Numbers", layout),
        state_timeline(
            "Quality rating",
            """Each number's quality rating at Meta over time: GREEN (high), YELLOW (medium),
            RED (low), UNKNOWN (not rated yet). Quality falls when recipients block or report
            the number's messages; a RED number can lose messaging limit or be restricted.""",
            targets((coded("whatsapp_phone_number_quality", "quality", quality), NUMBER)),
            mappings=value_map(
                (1, "GREEN", "green"),
                (2, "YELLOW", "yellow"),
                (3, "RED", "red"),
                (4, "UNKNOWN", "text"),
            ),
            layout=layout,
        ),
        state_timeline(
            "Can send messages",
            """Each number's overall health status: AVAILABLE (green), LIMITED (orange: some
            messages refused), BLOCKED (red: nothing sent). The entity at fault is in
            whatsapp_can_send_message{entity!="overall"}.""",
            targets(
                (
                    coded(
                        "whatsapp_can_send_message",
                        "status",
                        can_send,
                        matcher("entity", "overall"),
                    ),
                    NUMBER,
                )
            ),
            mappings=value_map(
                (1, "AVAILABLE", "green"), (2, "LIMITED", "orange"), (3, "BLOCKED", "red")
            ),
            layout=layout,
        ),
        timeseries(
            "Messaging limit",
            """Business-initiated conversations (unique users) each number may open in 24
            hours; the business portfolio's numbers share it. 250, 2K, 10K, 100K, or unlimited
            (shown as +Inf). A step down fires WhatsAppMessagingLimitDowngraded.""",
            targets((sel("whatsapp_messaging_limit"), NUMBER)),
            unit="short",
            layout=layout,
            size=(12, 8),
            custom={"scaleDistribution": {"type": "log", "log": 10}},
        ),
        timeseries(
            "Entities that limit sending",
            """Per number, the entities of its health status (phone_number, waba, business,
            app) that are LIMITED or BLOCKED; empty when all are AVAILABLE. The entity's errors
            in WhatsApp Manager say what to fix.""",
            targets(
                (
                    sel(
                        "whatsapp_can_send_message",
                        matcher("entity", "overall", "!="),
                        matcher("status", "LIMITED|BLOCKED", "=~"),
                    )
                    + " == 1",
                    "{{number}} {{entity}} {{status}} ({{account}})",
                )
            ),
            unit="short",
            layout=layout,
            size=(12, 8),
        ),
        row("Templates", layout),
        timeseries(
            "Templates by status",
            """How many message templates each account has per status (APPROVED, PAUSED,
            DISABLED, PENDING, REJECTED, ...). A paused template is resumed by Meta after
            hours; a third pause disables it.""",
            targets(
                (
                    f"count by (account, status) ({sel('whatsapp_template_status')})",
                    "{{status}} ({{account}})",
                )
            ),
            unit="short",
            layout=layout,
            size=(12, 8),
            overrides=[
                colour_by_name("APPROVED .*", "green"),
                colour_by_name("PAUSED .*", "orange"),
                colour_by_name("DISABLED .*", "red"),
            ],
        ),
        timeseries(
            "Templates not approved or of low quality",
            """The templates that are not APPROVED, or whose quality score is YELLOW or RED,
            each by name and language; empty when every template is approved and GREEN.""",
            targets(
                (
                    sel("whatsapp_template_status", matcher("status", "APPROVED", "!=")),
                    "{{template}} {{language}} {{status}} ({{account}})",
                ),
                (
                    sel("whatsapp_template_quality", matcher("quality", "YELLOW|RED", "=~")),
                    "{{template}} {{language}} quality {{quality}} ({{account}})",
                ),
            ),
            unit="short",
            layout=layout,
            size=(12, 8),
        ),
        row("Messages today", layout),
        timeseries(
            "Sent and delivered today",
            """Each number's messages sent and delivered today (UTC) so far, from the WABA's
            analytics; they reset at midnight UTC. Delivered far below sent: recipients do not
            get the messages (quality, blocked numbers, a paused template).""",
            targets((sel("whatsapp_analytics_messages"), "{{number}} {{state}} ({{account}})")),
            unit="short",
            layout=layout,
            size=(24, 8),
            overrides=[
                colour_by_name(".* sent .*", "blue"),
                colour_by_name(".* delivered .*", "green"),
            ],
        ),
    ]
    return dashboard(
        c,
        "meta",
        "WhatsApp: Meta Cloud API",
        """Meta's WhatsApp Cloud API: each number's quality rating, whether it can send and
        which entity limits it, its messaging limit, the message templates' status and
        quality, and today's sent and delivered messages.""",
        "meta",
        panels,
    )
