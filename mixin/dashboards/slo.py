"""Delivery SLOs across providers: the 30-day error budget, the burn rates the alerts watch, and
the success ratio behind them (docs/slo.md says what each provider's ratio means).

Every query reads the recording rules of the `whatsapp.slo` group, never a provider's own
series, so D7, WhatsGate, Betatel and Meta look alike here.
"""

from __future__ import annotations

from mixin.alerts import BURNS
from mixin.config import SLO_PROVIDERS, Config
from mixin.dashboards.builder import (
    Json,
    Layout,
    dashboard,
    row,
    sel,
    stat,
    steps,
    targets,
    timeseries,
)

PER_ACCOUNT = "{{provider}} {{account}}"


def burn_rate(window: str) -> str:
    """How many times faster than the objective allows the budget goes, over `window`."""
    return (
        f"{sel(f'whatsapp:delivery_error:ratio_rate{window}')}\n"
        "  / on (provider) group_left ()\n"
        f"  (1 - {sel('whatsapp:delivery_success:objective')})"
    )


def burn_panel(layout: Layout, alert: str, description: str) -> Json:
    long, short, factor, _, severity = BURNS[alert]
    return timeseries(
        f"Burn rate over {long} and {short}",
        description,
        targets(
            (burn_rate(long), f"{PER_ACCOUNT} {long}"),
            (burn_rate(short), f"{PER_ACCOUNT} {short}"),
        ),
        unit="suffix:x",
        layout=layout,
        thresholds=steps("transparent", (factor, "red" if severity == "critical" else "orange")),
        threshold_style="dashed",
    )


def slo(c: Config) -> Json:
    layout = Layout()
    remaining = sel("whatsapp:delivery_error_budget:ratio_remaining30d")
    panels = [
        row("30 days", layout),
        stat(
            "Error budget left",
            """Share of the 30-day error budget not yet spent, per provider and account: 100%
            untouched, 0% spent, below zero overspent. The budget is what the objective allows
            to fail (1% at 99%). Red under 10%, orange under 50%: slow down risky changes
            (templates, recipient lists, devices) until it recovers.""",
            targets((remaining, PER_ACCOUNT)),
            unit="percentunit",
            layout=layout,
            size=(8, 5),
            thresholds=steps("red", (0.1, "orange"), (0.5, "green")),
            decimals=1,
            sparkline=False,
        ),
        stat(
            "Success ratio",
            """Share of the messages that reached an outcome in the last 30 days that
            succeeded, weighted by traffic (recording rule whatsapp:delivery_success:
            ratio_rate30d). Red below the default objective. It reaches back only as far as
            Prometheus has kept the rules' history.""",
            targets((sel("whatsapp:delivery_success:ratio_rate30d"), PER_ACCOUNT)),
            unit="percentunit",
            layout=layout,
            size=(8, 5),
            thresholds=steps("red", (c.objective, "green")),
            decimals=2,
            sparkline=False,
        ),
        stat(
            "Objective",
            """The share of messages that must succeed over 30 days, per provider, as set in
            mixin/config.py (recording rule whatsapp:delivery_success:objective). One minus it
            is the error budget the alerts and the panels here measure against.""",
            targets((sel("whatsapp:delivery_success:objective"), "{{provider}}")),
            unit="percentunit",
            layout=layout,
            size=(8, 5),
            thresholds=steps("blue"),
            decimals=2,
            sparkline=False,
        ),
        timeseries(
            "Error budget left over time",
            """The 30-day error budget left at each point in time. A steep fall is an incident
            (the burn-rate panels below say how fast); a slow slide is a provider that fails a
            little more than the objective allows, every day.""",
            targets((remaining, PER_ACCOUNT)),
            unit="percentunit",
            layout=layout,
            size=(24, 7),
            thresholds=steps("red", (0, "transparent")),
            threshold_style="area",
            min_value=None,
        ),
        row("Burn rates", layout),
        burn_panel(
            layout,
            "WhatsAppDeliveryErrorBudgetFastBurn",
            """How many times faster than the objective allows the error budget goes, over the
            last hour and the last 5 minutes. Both above 14.4 (the red line; 2% of the 30-day
            budget in an hour) with enough traffic: WhatsAppDeliveryErrorBudgetFastBurn
            pages.""",
        ),
        burn_panel(
            layout,
            "WhatsAppDeliveryErrorBudgetSlowBurn",
            """The same over the last 6 hours and 30 minutes. Both above 6 (the orange line; 5%
            of the budget in 6 hours): WhatsAppDeliveryErrorBudgetSlowBurn opens a ticket.""",
        ),
        row("Success ratio and traffic", layout),
        timeseries(
            "Success ratio",
            """Share of outcomes that succeeded over the last hour and the last 6 hours, per
            provider and account: D7 and Meta delivered, WhatsGate successful, Betatel processed
            (docs/slo.md). The red band is below the default objective.""",
            targets(
                (sel("whatsapp:delivery_success:ratio_rate1h"), f"{PER_ACCOUNT} 1h"),
                (sel("whatsapp:delivery_success:ratio_rate6h"), f"{PER_ACCOUNT} 6h"),
            ),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (c.objective, "transparent")),
            threshold_style="area",
            min_value=None,
            max_value=1,
        ),
        timeseries(
            "Outcomes and failures",
            """Messages per minute that reached an outcome, and those that failed, over 5
            minutes: what the ratios rest on. A ratio over a handful of messages means little;
            the burn-rate alerts wait for enough outcomes.""",
            targets(
                (f"{sel('whatsapp:delivery_outcomes:rate5m')} * 60", f"{PER_ACCOUNT} outcomes"),
                (f"{sel('whatsapp:delivery_failures:rate5m')} * 60", f"{PER_ACCOUNT} failed"),
            ),
            unit="count:msg/min",
            layout=layout,
        ),
    ]
    return dashboard(
        c,
        "slo",
        "WhatsApp: delivery SLO",
        """Delivery SLOs across providers: the 30-day error budget left, the burn rates the
        multiwindow alerts watch, and the success ratio and traffic behind them, for D7,
        WhatsGate and Betatel alike.""",
        "|".join(SLO_PROVIDERS),
        panels,
        tag="slo",
    )
