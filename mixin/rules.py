"""Recording rules, shared by the dashboards and the alerts: one expression, one meaning.

Every rule keeps only the labels of what it is about (provider, account, device, number), never
`instance` or `pod`: two exporters where only one exposes a series (the leader, issue 11), or a
leadership change from one to the other, leave no gap and no spike. Gauges are aggregated with
max or min (the same value twice is still that value), counters' rates with sum (only one replica
counts each message).
"""

from __future__ import annotations

import textwrap

from mixin.config import SLO_PROVIDERS, Config
from mixin.rulefile import Group, Rule

D7_FINAL = "delivered|un_delivered|rejected|insufficient_credit"
D7_FAILED = "un_delivered|rejected|insufficient_credit"
# Meta's statuses from its webhooks: read implies delivered, so delivered or failed is an outcome
META_FINAL = "delivered|failed"
# the multiwindow, multi-burn-rate alerts' windows (SRE workbook, chapter 5)
SLO_WINDOWS = ("5m", "30m", "1h", "6h")
BY_DEVICE = "provider, account, device"
BY_NUMBER = "provider, account, number"


def promql(text: str) -> str:
    return textwrap.dedent(text).strip()


def record(name: str, expr: str, comment: str = "", **labels: str) -> Rule:
    return Rule(record=name, expr=promql(expr), comment=comment, labels=labels)


def shared(c: Config) -> list[Rule]:
    balance = f"min by ({BY_DEVICE}) ({c.m('whatsapp_balance_remaining_messages')})"
    # D7's own statuses, pinned: Meta's webhooks count whatsapp_messages_total too
    d7_delivered = c.m("whatsapp_messages_total", 'provider="d7"', 'status="delivered"')
    final = c.m("whatsapp_messages_total", 'provider="d7"', f'status=~"{D7_FINAL}"')
    delivered = c.m("whatsapp_messages_total", 'status="delivered"')
    read = c.m("whatsapp_messages_total", 'status="read"')
    meta_sent = c.m("whatsapp_messages_total", 'provider="meta"', 'status="sent"')
    meta_failed = c.m("whatsapp_messages_total", 'provider="meta"', 'status="failed"')
    sent_1h = f"sum by (provider, account) (increase({meta_sent}[1h]))"
    pending = c.m("whatsapp_tracked_requests", 'state="pending"')
    failed = c.m("whatsapp_device_messages", 'state="failed"')
    successful = c.m("whatsapp_device_messages", 'state="successful"')
    return [
        record(
            "whatsapp:balance_remaining_messages:seconds_left",
            f"""
            {balance}
              / (-deriv({balance}[6h:]) > 0)
            """,
            "Seconds until a WhatsGate device's balance reaches zero at the rate of the last 6 "
            "hours; only for balances that are falling. The slope is taken over the series "
            "aggregated by device (a subquery), so a new leader's fresh series does not start "
            "from two samples.",
        ),
        record(
            "whatsapp:device_messages:failure_ratio",
            f"""
            max by ({BY_DEVICE}) ({failed})
              / (max by ({BY_DEVICE}) ({failed}) + max by ({BY_DEVICE}) ({successful}))
              > -1
            """,
            "Share of a WhatsGate device's messages today that failed.",
        ),
        record(
            "whatsapp:messages_delivered:ratio_rate1h",
            f"""
            sum by (provider, account) (increase({d7_delivered}[1h]))
              / sum by (provider, account) (increase({final}[1h]))
              > -1
            """,
            "D7: delivered share of the messages that reached an outcome, and (D7 and Meta) read "
            "share of the delivered ones, over the last hour.",
        ),
        record(
            "whatsapp:messages_read:ratio_rate1h",
            f"""
            sum by (provider, account) (increase({read}[1h]))
              / sum by (provider, account) (increase({delivered}[1h]))
              > -1
            """,
        ),
        record(
            "whatsapp:messages_outcome:increase1h",
            f"""
            sum by (provider, account) (
              increase({final}[1h])
            )
            """,
            "D7: messages that reached an outcome in the last hour (how much the ratio rests on).",
        ),
        record(
            "whatsapp:tracked_requests_pending:deriv30m",
            f"""
            deriv(max by (provider, account) ({pending})[30m:])
            """,
            "D7: how fast the pending ids grow, per second over 30 minutes.",
        ),
        record(
            "whatsapp:messages_sent:increase1h",
            sent_1h,
            "Meta: messages sent in the last hour (what the failure ratio rests on), and failed "
            "messages per sent one over that hour (0, not absent, when none failed; above 1 "
            "when Meta fails messages it never sent).",
        ),
        record(
            "whatsapp:messages_failed_per_sent:ratio_rate1h",
            f"""
            (
              sum by (provider, account) (increase({meta_failed}[1h]))
              or {sent_1h} * 0
            )
              / ({sent_1h} > 0)
            """,
        ),
        record(
            "whatsapp:client_app_callback_queue_size:deriv10m",
            f"""
            deriv(max by ({BY_NUMBER}) ({c.m("whatsapp_client_app_callback_queue_size")})[10m:])
            """,
            "Kaleyra: how fast the WhatsApp Business API client's callback queue and pending "
            "messages grow, per second over 10 minutes.",
        ),
        record(
            "whatsapp:client_app_pending_messages:deriv10m",
            f"""
            deriv(max by ({BY_NUMBER}) ({c.m("whatsapp_client_app_pending_messages")})[10m:])
            """,
        ),
    ]


# the providers that count each message once per status in whatsapp_messages_total:
# (the statuses that are an outcome, those that are a failure)
STATUS_SLIS = {"d7": (D7_FINAL, D7_FAILED), "meta": (META_FINAL, "failed")}


def _outcomes_and_failures(c: Config, w: str) -> list[Rule]:
    """Each provider's SLI in one shape: outcomes and failures per second, by provider and
    account, one `or` branch per provider (their `provider` labels never overlap). A failures
    series exists wherever outcomes do (0 when nothing failed), so the ratios and the 30-day
    sums never miss an account that is doing well."""
    outcomes, failures = [], []
    for provider, (final, failed) in STATUS_SLIS.items():
        counted = f"sum by (provider, account) (rate({{}}[{w}]))"
        of = f'provider="{provider}"'
        outcome = counted.format(c.m("whatsapp_messages_total", of, f'status=~"{final}"'))
        failure = counted.format(c.m("whatsapp_messages_total", of, f'status=~"{failed}"'))
        outcomes.append(outcome)
        failures.append(f"(\n  {failure}\n  or {outcome} * 0\n)")
    wg = c.m("whatsapp_device_messages", 'state=~"successful|failed"')
    wg_failed = c.m("whatsapp_device_messages", 'state="failed"')
    window = f'window="{c.betatel_window}"'
    requests = f"avg_over_time({c.m('whatsapp_stats_requests', window)}[{w}])"
    transactions = f"avg_over_time({c.m('whatsapp_stats_transactions', window)}[{w}])"
    seconds = c.betatel_window_seconds
    outcomes += [
        f"sum by (provider, account) (rate({wg}[{w}]))",
        f"max by (provider, account) ({requests}) / {seconds}",
    ]
    failures += [
        f"sum by (provider, account) (rate({wg_failed}[{w}]))",
        f"max by (provider, account) (clamp_min({requests} - {transactions}, 0)) / {seconds}",
    ]
    comment = (
        "D7: messages that reached a final status; failed: un_delivered, rejected, "
        "insufficient_credit (read implies delivered and is counted there). "
        "Meta: messages delivered or failed, from its status webhooks (read implies delivered). "
        "WhatsGate: today's successful and failed counts are running totals that reset at "
        "midnight, which is a counter's behaviour: rate() takes the first value after the "
        "reset as counted from zero (delta() clipped at 0 would lose a whole window across "
        "midnight). "
        f"Betatel: requests and transactions are totals over its rolling {c.betatel_window} "
        f"window; their average over the window divided by {seconds}s is a rate per second; "
        "failed: requests not (yet) processed. max, not sum: an average over a series that "
        "began mid-window (a new leader) is already the whole level."
    )
    return [
        record(
            f"whatsapp:delivery_outcomes:rate{w}",
            "\nor\n".join(outcomes),
            comment if w == SLO_WINDOWS[0] else "",
        ),
        record(f"whatsapp:delivery_failures:rate{w}", "\nor\n".join(failures)),
    ]


def slo(c: Config) -> list[Rule]:
    rules: list[Rule] = []
    for w in SLO_WINDOWS:
        rules += _outcomes_and_failures(c, w)
        rules += [
            record(
                f"whatsapp:delivery_error:ratio_rate{w}",
                f"""
                whatsapp:delivery_failures:rate{w}
                  / (whatsapp:delivery_outcomes:rate{w} > 0)
                """,
                f"Every provider: the share of outcomes over {w} that failed, and that succeeded.",
            ),
            record(
                f"whatsapp:delivery_success:ratio_rate{w}",
                f"1 - whatsapp:delivery_error:ratio_rate{w}",
            ),
        ]
    for provider in SLO_PROVIDERS:
        rules.append(
            record(
                "whatsapp:delivery_success:objective",
                f"vector({c.objective_of(provider)})",
                "The objectives, as series the alerts and the SLO dashboard read."
                if provider == SLO_PROVIDERS[0]
                else "",
                provider=provider,
            )
        )
    rules += [
        record(
            "whatsapp:delivery_error:ratio_rate30d",
            """
            sum_over_time(whatsapp:delivery_failures:rate5m[30d])
              / (sum_over_time(whatsapp:delivery_outcomes:rate5m[30d]) > 0)
            """,
            "30 days, weighted by traffic, from the 5m rates recorded above (cheap: one sample "
            "per evaluation, not every message). It reaches back only as far as those rules "
            "were recorded and Prometheus keeps them (--storage.tsdb.retention.time >= 30d).",
        ),
        record(
            "whatsapp:delivery_success:ratio_rate30d",
            "1 - whatsapp:delivery_error:ratio_rate30d",
        ),
        record(
            "whatsapp:delivery_error_budget:ratio_remaining30d",
            """
            1 - whatsapp:delivery_error:ratio_rate30d
              / on (provider) group_left () (1 - whatsapp:delivery_success:objective)
            """,
            "Share of the 30-day error budget left: 1 untouched, 0 spent, below 0 overspent.",
        ),
    ]
    return rules


def groups(c: Config) -> list[Group]:
    return [
        Group("whatsapp.rules", shared(c)),
        Group(
            "whatsapp.slo",
            slo(c),
            "Delivery SLOs across providers (docs/slo.md): outcomes and failures per second in "
            "one shape, their ratios over the burn-rate alerts' windows, the objectives, and "
            "the 30-day error budget.",
        ),
    ]


HEADER = """
Recording rules shared by the bundled dashboards and alerts: one expression, one meaning.
Load with the alerts:  rule_files: [rules.yml, alerts.yml]

GENERATED by `python -m mixin` from mixin/rules.py (the selector, the objectives and the
thresholds are in mixin/config.py): edit those, not this file.
"""
