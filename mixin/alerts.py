"""The alerts. Each has a `severity` (critical pages, warning tickets), a summary, a description
and a runbook in docs/runbooks.md; promtool unit tests in prometheus/tests/alerts_test.yml pin
every threshold and duration.

Alerts about a provider's device, number or account keep only those labels (not `instance`), so
the alert outlives a change of the replica that polls it; alerts about an exporter process keep
`instance`, which Alertmanager's inhibition of WhatsAppExporterDown matches on.
"""

from __future__ import annotations

from mixin.config import Config
from mixin.rulefile import Group, Rule
from mixin.rules import BY_DEVICE, BY_NUMBER, promql

# (long window, short window, burn rate, for, severity): the SRE workbook's page and ticket
BURNS = {
    "WhatsAppDeliveryErrorBudgetFastBurn": ("1h", "5m", 14.4, "2m", "critical"),
    "WhatsAppDeliveryErrorBudgetSlowBurn": ("6h", "30m", 6.0, "15m", "warning"),
}
SECONDS = {"1h": 3600, "6h": 21600}


def alert(
    c: Config,
    name: str,
    expr: str,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    keep_firing_for: str | None = None,
) -> Rule:
    return Rule(
        alert=name,
        expr=promql(expr),
        for_=for_,
        keep_firing_for=keep_firing_for,
        labels={"severity": severity},
        annotations={
            "summary": summary,
            "description": " ".join(description.split()),
            "runbook_url": c.runbook(name),
        },
    )


def burn(c: Config, name: str) -> Rule:
    long, short, factor, for_, severity = BURNS[name]
    budget = f"on (provider) group_left () ({factor:g} * (1 - whatsapp:delivery_success:objective))"
    spent = {"1h": "2%", "6h": "5%"}[long]
    gone = {"1h": "about 2 days", "6h": "5 days"}[long]
    return alert(
        c,
        name,
        f"""
        whatsapp:delivery_error:ratio_rate{long} > {budget}
          and on (provider, account)
        whatsapp:delivery_error:ratio_rate{short} > {budget}
          and on (provider, account)
        whatsapp:delivery_outcomes:rate{long} * {SECONDS[long]} >= {c.slo_min_outcomes}
        """,
        for_,
        severity,
        f"{{{{ $labels.provider }}}} account {{{{ $labels.account }}}} burns its delivery error "
        f"budget {factor:g}x too fast",
        f"""{{{{ $value | humanizePercentage }}}} of the {{{{ $labels.provider }}}} messages of
        account {{{{ $labels.account }}}} that reached an outcome in the last {long} failed, and
        they still fail over the last {short}: {factor:g} times the error budget the delivery
        objective allows. At this rate {spent} of the 30-day budget goes in {long}, all of it in
        {gone}.""",
        # the short window of a sparse provider (WhatsGate counts move once per poll) may be
        # empty for an evaluation: that alone does not resolve a page
        keep_firing_for="5m" if severity == "critical" else None,
    )


def rules(c: Config) -> list[Rule]:
    up = c.m("up")
    target = "provider, account, endpoint, target"
    last_success = c.m("whatsapp_exporter_last_success_timestamp_seconds")
    last_success = f"max by ({target}) ({last_success})"
    failed = c.m("whatsapp_device_messages", 'state="failed"')
    failed = f"max by ({BY_DEVICE}) ({failed})"
    pending = c.m("whatsapp_tracked_requests", 'state="pending"')
    pending = f"max by (provider, account) ({pending})"
    return [
        alert(
            c,
            "WhatsAppExporterDown",
            f"{up} == 0",
            "5m",
            "critical",
            "WhatsApp exporter {{ $labels.instance }} is down",
            """Prometheus has not scraped the WhatsApp exporter at {{ $labels.instance }} for 5
            minutes: no provider, device or number is being watched.""",
        ),
        alert(
            c,
            "WhatsAppExporterAbsent",
            f"absent({up})",
            "10m",
            "critical",
            "No WhatsApp exporter is known to Prometheus",
            f"""For 10 minutes Prometheus has had no target matching up{{{c.selector}}}: the
            exporter's scrape job or its service discovery lost every target, so nothing is
            watched and no other WhatsApp alert can fire.""",
        ),
        alert(
            c,
            "WhatsAppTargetDown",
            f"max by ({target}) ({c.m('whatsapp_exporter_up')}) == 0",
            "15m",
            "warning",
            "{{ $labels.provider }} {{ $labels.endpoint }} polls fail for {{ $labels.account }} "
            "{{ $labels.target }}",
            """Every poll of {{ $labels.provider }} {{ $labels.endpoint }} for account
            {{ $labels.account }} (target "{{ $labels.target }}") failed for 15 minutes; its
            values go stale and leave /metrics. whatsapp_exporter_poll_errors_total says why
            (reason).""",
        ),
        alert(
            c,
            "WhatsAppTargetStale",
            f"""
            (time() - {last_success} > {c.stale_after})
              unless on ({target}) max by ({target}) ({c.m("whatsapp_exporter_up")}) == 0
            """,
            "5m",
            "warning",
            "{{ $labels.provider }} {{ $labels.endpoint }} for {{ $labels.account }} "
            "{{ $labels.target }} has not been polled for 30m",
            """The newest successful poll of {{ $labels.provider }} {{ $labels.endpoint }} for
            {{ $labels.account }} (target "{{ $labels.target }}") is
            {{ $value | humanizeDuration }} old although it is not failing: the poll is stuck or
            starved of its request budget.""",
        ),
        alert(
            c,
            "WhatsAppDeviceDisconnected",
            f"max by ({BY_DEVICE}) ({c.m('whatsapp_device_connected')}) == 0",
            "5m",
            "critical",
            "WhatsGate device {{ $labels.device }} of {{ $labels.account }} is disconnected",
            """Device {{ $labels.device }} (account {{ $labels.account }}) has not been
            connected for 5 minutes: messages sent through it are not delivered.""",
            # a phone that drops, reconnects for a minute and drops again pages once, not
            # once per drop; the price: the resolved notice comes 10 minutes late
            keep_firing_for="10m",
        ),
        alert(
            c,
            "WhatsAppBalanceRunningOut",
            f"whatsapp:balance_remaining_messages:seconds_left < {c.balance_runs_out_within}",
            "30m",
            "warning",
            "Balance of device {{ $labels.device }} ({{ $labels.account }}) runs out within a day",
            """At the rate of the last 6 hours the message balance of WhatsGate device
            {{ $labels.device }} (account {{ $labels.account }}) reaches zero in
            {{ $value | humanizeDuration }}.""",
        ),
        alert(
            c,
            "WhatsAppBalanceLow",
            f"min by ({BY_DEVICE}) ({c.m('whatsapp_balance_remaining_messages')}) "
            f"< {c.balance_low}",
            "10m",
            "critical",
            "Device {{ $labels.device }} ({{ $labels.account }}) has {{ $value }} messages left",
            f"""The message balance of WhatsGate device {{{{ $labels.device }}}} (account
            {{{{ $labels.account }}}}) is below {c.balance_low}; sending stops at zero.""",
        ),
        alert(
            c,
            "WhatsAppFailureRatioHigh",
            f"""
            whatsapp:device_messages:failure_ratio > {c.failure_ratio_high}
              and on ({BY_DEVICE})
            {failed} >= {c.failed_messages_min}
            """,
            "15m",
            "warning",
            "{{ $value | humanizePercentage }} of device {{ $labels.device }}'s messages fail "
            "({{ $labels.account }})",
            """{{ $value | humanizePercentage }} of today's messages of WhatsGate device
            {{ $labels.device }} (account {{ $labels.account }}) failed;
            whatsapp_failed_recipients shows how many distinct recipients were affected.""",
        ),
        alert(
            c,
            "WhatsAppD7DeliveredRatioLow",
            f"""
            whatsapp:messages_delivered:ratio_rate1h < {c.d7_delivered_ratio_low}
              and on (provider, account)
            whatsapp:messages_outcome:increase1h >= {c.d7_outcomes_min}
            """,
            "15m",
            "warning",
            "Only {{ $value | humanizePercentage }} of D7 messages of {{ $labels.account }} are "
            "delivered",
            """Over the last hour {{ $value | humanizePercentage }} of the D7 messages of account
            {{ $labels.account }} that reached an outcome were delivered; the rest were
            un_delivered, rejected or refused for insufficient credit.""",
        ),
        alert(
            c,
            "WhatsAppD7PendingGrowing",
            f"""
            {pending} > {c.backlog}
              and on (provider, account)
            whatsapp:tracked_requests_pending:deriv30m > 0
            """,
            "30m",
            "warning",
            "{{ $value }} D7 requests of {{ $labels.account }} pile up unresolved",
            """The D7 request ids of account {{ $labels.account }} that are still pending have
            been growing for 30 minutes: D7 answers slowly or not at all, or the account's
            rate_limit is too small for the traffic.""",
        ),
        alert(
            c,
            "WhatsAppClientCallbackQueueGrowing",
            f"""
            max by ({BY_NUMBER}) ({c.m("whatsapp_client_app_callback_queue_size")}) > {c.backlog}
              and on ({BY_NUMBER})
            whatsapp:client_app_callback_queue_size:deriv10m > 0
            """,
            "15m",
            "warning",
            "Callback queue of {{ $labels.number }} ({{ $labels.account }}) keeps growing",
            """The WhatsApp Business API client behind {{ $labels.number }} (account
            {{ $labels.account }}) holds {{ $value }} callbacks and the queue has grown for 15
            minutes: its webhook receiver is slow or down.""",
        ),
        alert(
            c,
            "WhatsAppClientPendingMessagesGrowing",
            f"""
            max by ({BY_NUMBER}) ({c.m("whatsapp_client_app_pending_messages")}) > {c.backlog}
              and on ({BY_NUMBER})
            whatsapp:client_app_pending_messages:deriv10m > 0
            """,
            "15m",
            "warning",
            "Pending messages of {{ $labels.number }} ({{ $labels.account }}) keep growing",
            """The WhatsApp Business API client behind {{ $labels.number }} (account
            {{ $labels.account }}) holds {{ $value }} pending messages, growing for 15 minutes:
            it cannot send as fast as it is asked to.""",
        ),
        *meta_alerts(c),
        alert(
            c,
            "WhatsAppConfigReloadFailed",
            f"{c.m('whatsapp_exporter_config_last_reload_successful')} == 0",
            "5m",
            "warning",
            "WhatsApp exporter {{ $labels.instance }} rejected its new config",
            """The last config reload of {{ $labels.instance }} failed and the old config is
            still running; the exporter's log lists every error with its path.""",
        ),
        *(burn(c, name) for name in BURNS),
    ]


def meta_alerts(c: Config) -> list[Rule]:
    """Meta's Cloud API numbers and templates: what stops or will soon stop delivery there."""

    def current(metric: str, label: str, values: str, by: str = BY_NUMBER) -> str:
        """The state set's series at 1 among `values` (a regex of Meta's values)."""
        matcher = f'{label}=~"{values}"'
        return f"max by ({by}, {label}) ({c.m(metric, matcher)}) == 1"

    limit = c.m("whatsapp_messaging_limit")
    restricted = c.m("whatsapp_account_restricted", 'provider="meta"')
    last_webhook = c.m("whatsapp_exporter_last_webhook_timestamp_seconds", 'provider="meta"')
    backlog = c.m("whatsapp_tracking_backlog_statuses")
    sent_today = c.m("whatsapp_analytics_messages", 'provider="meta"', 'state="sent"')
    auth_errors = c.m("whatsapp_exporter_poll_errors_total", 'provider="meta"', 'reason="auth"')
    by_template = "provider, account, template, language"
    return [
        alert(
            c,
            "WhatsAppNumberQualityYellow",
            current("whatsapp_phone_number_quality", "quality", "YELLOW"),
            "30m",
            "warning",
            "Quality of {{ $labels.number }} ({{ $labels.account }}) is YELLOW",
            """Meta rates the quality of number {{ $labels.number }} (account
            {{ $labels.account }}) YELLOW: recipients block or report its messages. If it turns
            RED, Meta may lower the portfolio's messaging limit or restrict the number.""",
        ),
        alert(
            c,
            "WhatsAppNumberQualityRed",
            current("whatsapp_phone_number_quality", "quality", "RED"),
            "5m",
            "critical",
            "Quality of {{ $labels.number }} ({{ $labels.account }}) is RED",
            """Meta rates the quality of number {{ $labels.number }} (account
            {{ $labels.account }}) RED: its messaging limit may be lowered and the number
            flagged or restricted within days unless fewer recipients block or report it.""",
        ),
        alert(
            c,
            "WhatsAppNumberCannotSend",
            current(
                "whatsapp_can_send_message",
                "status",
                "LIMITED|BLOCKED",
                f"{BY_NUMBER}, entity",
            ),
            "5m",
            "critical",
            "{{ $labels.number }} ({{ $labels.account }}) is {{ $labels.status }} "
            "({{ $labels.entity }})",
            """Meta's health status of number {{ $labels.number }} (account
            {{ $labels.account }}) says its messages are {{ $labels.status }} because of the
            {{ $labels.entity }}: BLOCKED sends nothing, LIMITED only some. The health status'
            errors in WhatsApp Manager say why.""",
        ),
        alert(
            c,
            "WhatsAppMessagingLimitDowngraded",
            f"max by ({BY_NUMBER}) ({limit})"
            f" < max_over_time(max by ({BY_NUMBER}) ({limit})[1d:5m])",
            "0m",
            "warning",
            "Messaging limit of {{ $labels.number }} ({{ $labels.account }}) went down to "
            "{{ $value }}",
            """The messaging limit of number {{ $labels.number }} (account
            {{ $labels.account }}), shared by its business portfolio, is {{ $value }} unique
            users a day, lower than in the last day: campaigns sized for the old limit will
            be cut off.""",
            # the lower value is the new normal once a day has passed: until then, keep it
            keep_firing_for="1h",
        ),
        alert(
            c,
            "WhatsAppTemplatePausedOrDisabled",
            current("whatsapp_template_status", "status", "PAUSED|DISABLED", by_template),
            "5m",
            "warning",
            "Template {{ $labels.template }} ({{ $labels.language }}, {{ $labels.account }}) is "
            "{{ $labels.status }}",
            """Meta {{ $labels.status }} message template {{ $labels.template }}
            ({{ $labels.language }}) of account {{ $labels.account }}: messages that use it
            fail until it is approved again (a pause lasts 3 or 6 hours, a third one disables
            it).""",
        ),
        alert(
            c,
            "WhatsAppMetaTokenRejected",
            f"max by (provider, account) (increase(max by (provider, account, endpoint) "
            f"({auth_errors})[15m:1m])) > 0",
            "0m",
            "critical",
            "Meta rejects the token of account {{ $labels.account }}",
            """Meta answered the exporter's polls for account {{ $labels.account }} with an
            auth error (code 190: expired or invalid token, 10 or 200-299: a permission is
            missing). The same token sends the business' messages: they fail too.""",
            keep_firing_for="15m",
        ),
        alert(
            c,
            "WhatsAppMetaFailureRatioHigh",
            f"""
            whatsapp:messages_failed_per_sent:ratio_rate1h > {c.meta_failure_ratio_high}
              and on (provider, account)
            whatsapp:messages_sent:increase1h >= {c.meta_sent_min}
            """,
            "15m",
            "warning",
            "{{ $value | humanizePercentage }} of Meta messages of {{ $labels.account }} fail",
            """Over the last hour Meta's status webhooks reported {{ $value | humanizePercentage }}
            as many failed messages as sent ones for account {{ $labels.account }};
            whatsapp_message_failures_total says which error codes.""",
        ),
        alert(
            c,
            "WhatsAppMetaAccountRestricted",
            f"max by (provider, account) ({restricted}) == 1",
            "5m",
            "critical",
            "Meta restricted or disabled the account {{ $labels.account }}",
            """Meta's account_update webhook for account {{ $labels.account }} announced a
            restriction that has not expired, or a ban (DISABLE or SCHEDULE_FOR_DISABLE):
            business-initiated messages fail until it ends or Meta reinstates the account.""",
        ),
        alert(
            c,
            "WhatsAppMetaWebhooksSilent",
            # no series for an account without webhooks; an idle account sends nothing today
            f"""
            time() - max by (provider, account) ({last_webhook}) > {c.meta_webhooks_silent_after}
              and on (provider, account)
            sum by (provider, account) (
              increase(max by (provider, account, number) ({sent_today})[1h:5m])
            ) > 0
            """,
            "15m",
            "warning",
            "No Meta webhook for {{ $labels.account }} for {{ $value | humanizeDuration }}",
            """The newest webhook from Meta for account {{ $labels.account }} is
            {{ $value | humanizeDuration }} old although its numbers sent messages in the last
            hour (the polled analytics): message statuses, quality and template updates no
            longer reach the exporter.""",
        ),
        alert(
            c,
            "WhatsAppTrackingBacklogStuck",
            # a burst's journal empties within seconds to minutes; one never empty for the
            # whole window means webhooks come faster than they are counted
            # (every sample of the last 5m above 0, for 20m: a fresh series cannot fire early)
            f"min_over_time(min by (provider, account) ({backlog})[5m:1m]) > 0",
            c.tracking_backlog_for,
            "warning",
            "{{ $labels.provider }} statuses of {{ $labels.account }} are counted slower than they"
            " arrive",
            f"""The exporter's journal of acknowledged, not yet counted {{{{ $labels.provider }}}}
            statuses for account {{{{ $labels.account }}}} has not been empty for
            {c.tracking_backlog_for} ({{{{ $value }}}} waiting at the least): its delivery counts
            lag behind, and once the journal is full webhooks are refused with 503.""",
        ),
    ]


def groups(c: Config) -> list[Group]:
    return [Group("whatsapp.alerts", rules(c))]


def header(c: Config) -> str:
    """The file's opening comment: what fires when, at a glance."""
    lines = [
        "Alerts for the WhatsApp Delivery Exporter. Load together with rules.yml (recording "
        "rules).",
        "Every alert has a runbook in docs/runbooks.md (its runbook_url annotation).",
        "",
        "GENERATED by `python -m mixin` from mixin/alerts.py; thresholds, the selector",
        f"({c.selector}) and the delivery objective ({c.objective:g}) are in mixin/config.py.",
        "",
    ]
    for rule in rules(c):
        keep = f", keeps firing {rule.keep_firing_for}" if rule.keep_firing_for else ""
        lines.append(f"  {rule.alert:<38} for {rule.for_:<4} {rule.labels['severity']}{keep}")
    return "\n".join(lines)
