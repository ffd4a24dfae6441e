"""Meta's WhatsApp Cloud API: every number's quality, status, health and messaging limit, the
message templates, and today's sent and delivered messages (polled); the messages' statuses,
failures, latency and the webhooks' health (from Meta's webhooks)."""

from __future__ import annotations

from typing import Any

from mixin.config import Config
from mixin.dashboards.builder import (
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
    state_timeline,
    steps,
    targets,
    timeseries,
    value_map,
)
from mixin.dashboards.shared import messages_by_status, newest_webhook, pending_and_expired, time_to

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

    failures = sel("whatsapp_message_failures_total")
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
        counted(
            "Account restricted",
            """Per account: 1 while Meta's account_update webhook announced a restriction that
            has not expired or a ban (DISABLE, SCHEDULE_FOR_DISABLE); business-initiated
            messages fail meanwhile (WhatsAppMetaAccountRestricted).""",
            f"max by (account) ({sel('whatsapp_account_restricted')})",
        ),
        stat(
            "Failed per sent (1h)",
            """Failed messages per sent message over the last hour, from Meta's status webhooks
            (recording rule whatsapp:messages_failed_per_sent:ratio_rate1h). Red from 20%, where
            WhatsAppMetaFailureRatioHigh fires with at least 50 sent: the error codes below say
            why.""",
            targets((sel("whatsapp:messages_failed_per_sent:ratio_rate1h"), "{{account}}")),
            unit="percentunit",
            layout=layout,
            size=(6, 4),
            thresholds=steps("green", (0.05, "orange"), (0.2, "red")),
            decimals=1,
        ),
        stat(
            "Sent (1h)",
            """Messages Meta's webhooks reported sent in the last hour (recording rule
            whatsapp:messages_sent:increase1h): how much the failure ratio rests on. Zero while
            the analytics below count sends: the webhooks do not reach the exporter.""",
            targets((sel("whatsapp:messages_sent:increase1h"), "{{account}}")),
            unit="short",
            layout=layout,
            size=(6, 4),
            thresholds=steps("blue"),
            decimals=0,
        ),
        newest_webhook(
            layout,
            "Newest webhook",
            """How long ago Meta's newest webhook for each account arrived (an account without
            webhooks configured has none). Red from 2 hours: WhatsAppMetaWebhooksSilent fires
            if the account sent messages meanwhile (a lost subscription, app secret or
            callback URL).""",
            (6, 4),
            steps("green", (3600, "orange"), (7200, "red")),
        ),
        row("Delivery (status webhooks)", layout),
        messages_by_status(
            layout,
            """Messages reaching each status per minute, from Meta's status webhooks (a read
            message also counts as delivered and sent; played: a voice message played).
            delivered should follow sent closely; failed rising is the problem to chase, by
            error code below.""",
            colour_by_name("^failed .*", "red"),
        ),
        timeseries(
            "Delivery ratios (1h)",
            """Over the hour before every point: delivered share of the messages that reached
            an outcome (delivered or failed; the SLO's whatsapp:delivery_success:ratio_rate1h),
            read share of the delivered ones (whatsapp:messages_read:ratio_rate1h), and failed
            messages per sent one (whatsapp:messages_failed_per_sent:ratio_rate1h; above 100%
            when Meta fails messages it never sent).""",
            targets(
                (sel("whatsapp:delivery_success:ratio_rate1h"), "{{account}} delivered"),
                (sel("whatsapp:messages_read:ratio_rate1h"), "{{account}} read"),
                (sel("whatsapp:messages_failed_per_sent:ratio_rate1h"), "{{account}} failed"),
            ),
            unit="percentunit",
            layout=layout,
            overrides=[colour_by_name(".* failed$", "red")],
        ),
        row("Latency", layout),
        time_to(
            "delivered",
            "Time to delivered",
            """Median, 90th and 99th percentile of the time from Meta's sent status to its
            delivered status, for the messages delivered in each interval. A rising p50 means
            WhatsApp is slow for everyone; a rising p99 alone means a few recipients are
            offline.""",
            layout,
        ),
        time_to(
            "read",
            "Time to read",
            """Median, 90th and 99th percentile of the time from sent to read, for the messages
            read in each interval (recipients who turned read receipts off are never read).
            Mostly the recipients' habits; a jump of every percentile may mean statuses arrive
            late.""",
            layout,
        ),
        row("Failures and tracked messages", layout),
        timeseries(
            "Failed messages by error code",
            """Failed messages per minute by Meta's error code, for the 10 codes that failed
            most over the time range. 131049: Meta's per-user marketing limit (send fewer
            marketing messages to that user); 131026: undeliverable (no WhatsApp, old app);
            131047: outside the 24-hour window, use a template; 132xxx: the template (missing,
            paused, wrong parameters); 131042: payment; 130429, 131056: rate limits.""",
            targets(
                (
                    f"sum by (account, code) (rate({failures}[{RATE}])) * 60\n"
                    "  and on (account, code)\n"
                    f"topk(10, sum by (account, code) (increase({failures}[$__range] @ end())))",
                    "{{code}} ({{account}})",
                )
            ),
            unit="count:msg/min",
            layout=layout,
            overrides=[HIDE_ALL_ZERO],
        ),
        pending_and_expired(
            "whatsapp_tracked_messages",
            "Pending and expired messages",
            """Messages followed from their sent status (pending) and those given up on
            (expired: no delivered, read or failed within expire_after, default 3 days). A rise
            of expired messages means statuses that never came: the ratios miss them.""",
            layout,
        ),
        row("Webhooks", layout),
        timeseries(
            "Webhook events by field",
            """Changes Meta's webhooks delivered per minute, by field (messages: statuses;
            account_update, phone_number_quality_update, message_template_status_update, ...)
            and event (ACCOUNT_RESTRICTION, PAUSED, FLAGGED, ...). Flat at zero while you send:
            the subscription, callback URL or app secret is wrong.""",
            targets(
                (
                    "sum by (account, field, event) "
                    f"(rate({sel('whatsapp_webhook_events_total')}[{RATE}])) * 60",
                    "{{field}} {{event}} ({{account}})",
                )
            ),
            unit="count:events/min",
            layout=layout,
        ),
        timeseries(
            "Refused webhooks and tracking problems",
            """Webhooks refused per minute by reason (signature: the app_secret does not match
            Meta's app; verify_token: a subscription handshake with another token; malformed,
            too_large), and statuses with an unusable time or entries for a WABA no account has
            (problem); series that stayed at zero are hidden.""",
            targets(
                (
                    "sum by (account, reason) "
                    f"(rate({sel('whatsapp_webhook_refused_total')}[{RATE}])) * 60",
                    "refused {{reason}} ({{account}})",
                ),
                (
                    "sum by (account, problem) "
                    f"(rate({sel('whatsapp_tracking_problems_total')}[{RATE}])) * 60",
                    "{{problem}} ({{account}})",
                ),
            ),
            unit="count:events/min",
            layout=layout,
            overrides=[HIDE_ALL_ZERO],
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
        quality, today's sent and delivered messages; and from Meta's webhooks the messages'
        statuses, failures by error code, time to delivered and read, and the webhooks'
        health.""",
        "meta",
        panels,
    )
