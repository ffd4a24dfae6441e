"""The mixin's parameters: everything a deployment may want to change, in one place.

`python -m mixin --selector 'job="wa"' --objective 0.995 --out DIR` renders a copy for another
deployment; the committed files are rendered with these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# GitHub's copy of docs/runbooks.md. Absolute on purpose: alerts are read in Slack, PagerDuty or an
# email, where a link relative to the repository leads nowhere. A fork or an internal wiki points
# it at its own copy (--runbook-url); the anchor (#whatsappexporterdown) stays the same.
RUNBOOKS = (
    "https://github.com/whatsapp-delivery-exporter/whatsapp-delivery-exporter"
    "/blob/main/docs/runbooks.md"
)

# The providers whose delivery has a service level indicator (docs/slo.md); Kaleyra's client
# counts what it sends, not what was delivered, so it has none.
SLO_PROVIDERS = ("d7", "whatsgate", "betatel", "meta")


@dataclass(frozen=True)
class Config:
    # every raw series the rules and alerts read, and the dashboards' `job` variable
    selector: str = 'job="whatsapp"'
    runbook_url: str = RUNBOOKS

    # delivery SLO: the share of messages that must succeed, per provider (docs/slo.md)
    objective: float = 0.99
    objectives: dict[str, float] = field(default_factory=dict)  # per provider, else `objective`
    # a burn-rate alert needs at least this many outcomes in its long window: 1 failure of 3
    # messages is a 33% error ratio and pages nobody's night for good reason
    slo_min_outcomes: int = 20
    # Betatel's SLI reads this rolling window's totals (it must be configured in `windows`)
    betatel_window: str = "last5m"
    betatel_window_seconds: int = 300

    # thresholds of the other alerts (their promtool unit tests pin these defaults)
    balance_low: int = 100
    balance_runs_out_within: int = 86400  # seconds
    failure_ratio_high: float = 0.2
    failed_messages_min: int = 20
    d7_delivered_ratio_low: float = 0.9
    d7_outcomes_min: int = 20
    backlog: int = 100  # D7 pending ids, Kaleyra callback queue and pending messages
    stale_after: int = 1800  # seconds without a successful poll
    # Meta's status webhooks: failed per sent message over an hour, with at least this many sent
    meta_failure_ratio_high: float = 0.2
    meta_sent_min: int = 50
    # seconds without any webhook while the polled analytics count sends in the last hour: the
    # hour more leaves room for the analytics' own lag and their 15-minute poll
    meta_webhooks_silent_after: int = 7200
    # the tracking journal never empty for this long: statuses come faster than they are counted
    tracking_backlog_for: str = "20m"

    def objective_of(self, provider: str) -> float:
        return self.objectives.get(provider, self.objective)

    def m(self, metric: str, *matchers: str) -> str:
        """`metric{<selector>, matchers...}`: a raw series of this deployment's exporters."""
        return f"{metric}{{{', '.join((self.selector, *matchers))}}}"

    def runbook(self, alert: str) -> str:
        # GitHub's anchor of a heading `## WhatsAppExporterDown` is its lower-cased text
        return f"{self.runbook_url}#{alert.lower()}"
