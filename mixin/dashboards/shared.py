"""Panels shown on the overview and on a provider's dashboard alike."""

from __future__ import annotations

from mixin.dashboards.builder import (
    HIDE_ALL_ZERO,
    RATE,
    Json,
    Layout,
    colour_by_name,
    fixed_colour,
    matcher,
    override,
    sel,
    stat,
    steps,
    targets,
    timeseries,
)


def devices_disconnected(layout: Layout, size: tuple[int, int], title: str, **extra) -> Json:
    return stat(
        title,
        """Per account: WhatsGate devices that are not connected right now (red from one), and
        how many devices the account has. A disconnected device sends nothing: open the
        WhatsGate dashboard to see which device and since when, then re-link it in WhatsGate
        (scan the QR code again). A configured device the account does not list counts as
        disconnected.""",
        targets(
            (
                f"sum by (account) (1 - {sel('whatsapp_device_connected')})",
                "{{account}} disconnected",
            ),
            (f"count by (account) ({sel('whatsapp_device_connected')})", "{{account}} devices"),
        ),
        unit="short",
        layout=layout,
        size=size,
        thresholds=steps("green", (1, "red")),
        sparkline=False,
        overrides=[override("byFrameRefID", "B", fixed_colour("blue"))],
        **extra,
    )


def balance_runs_out(layout: Layout, size: tuple[int, int], title: str, **extra) -> Json:
    return stat(
        title,
        """Per account, the soonest any device's message balance reaches zero at the rate of the
        last 6 hours (recording rule whatsapp:balance_remaining_messages:seconds_left). Red under
        a day, orange under three: top up the device's balance in WhatsGate. "not falling" means
        no balance went down in the last 6 hours.""",
        targets(
            (
                f"min by (account) ({sel('whatsapp:balance_remaining_messages:seconds_left')})",
                "{{account}}",
            )
        ),
        unit="s",
        layout=layout,
        size=size,
        thresholds=steps("red", (86400, "orange"), (3 * 86400, "green")),
        no_value="not falling",
        decimals=1,
        **extra,
    )


def worst_failure_ratio(layout: Layout, size: tuple[int, int], title: str, **extra) -> Json:
    return stat(
        title,
        """Per account, the highest share of today's messages that failed on any one device
        (recording rule whatsapp:device_messages:failure_ratio; WhatsGate's counts reset daily).
        Orange from 5%, red from 20%: look at the device's failed recipients, whether it is
        connected, and whether one template or one list of recipients is being refused.""",
        targets(
            (
                f"max by (account) ({sel('whatsapp:device_messages:failure_ratio')})",
                "{{account}}",
            )
        ),
        unit="percentunit",
        layout=layout,
        size=size,
        thresholds=steps("green", (0.05, "orange"), (0.2, "red")),
        decimals=1,
        **extra,
    )


def poll_errors(layout: Layout, by: str, legend: str, **extra) -> Json:
    return timeseries(
        "Poll errors by reason",
        """Failed polls of the provider APIs per minute, by reason; series that stayed at zero
        are hidden. auth: the token or key was refused (renew it in the config); rate_limited:
        the provider answered 429 (lower rate_limit or poll less often); timeout, connect,
        http_5xx: the provider is slow or down; not_found: a device, number or path that does not
        exist; bad_response, provider_error: the answer was not what its docs say, see the
        exporter's log and its landing page.""",
        targets(
            (
                f"sum by ({by}) (rate({sel('whatsapp_exporter_poll_errors_total')}[{RATE}])) * 60",
                legend,
            )
        ),
        unit="count:errors/min",
        layout=layout,
        overrides=[HIDE_ALL_ZERO],
        custom={"drawStyle": "bars", "fillOpacity": 60, "stacking": {"mode": "normal"}},
        legend_calcs=("max", "mean"),
        **extra,
    )


# --- the dashboards -----------------------------------------------------------------------------


# --- delivery tracked from statuses (D7 and Meta) -----------------------------------------------


def messages_by_status(layout: Layout, description: str, *overrides: Json) -> Json:
    """Each status's rate per account; sent, delivered and read in the same colours everywhere,
    the provider's failures in `overrides`."""
    return timeseries(
        "Messages by status",
        description,
        targets(
            (
                f"sum by (account, status) (rate({sel('whatsapp_messages_total')}[{RATE}])) * 60",
                "{{status}} ({{account}})",
            )
        ),
        unit="count:msg/min",
        layout=layout,
        overrides=[
            colour_by_name("^sent .*", "blue"),
            colour_by_name("^delivered .*", "green"),
            colour_by_name("^read .*", "purple"),
            *overrides,
        ],
    )


def time_to(status: str, title: str, description: str, layout: Layout) -> Json:
    """Median, 90th and 99th percentile of whatsapp_message_delivery_seconds{status}."""
    buckets = sel("whatsapp_message_delivery_seconds_bucket", matcher("status", status))
    return timeseries(
        title,
        description,
        targets(
            *(
                (
                    f"histogram_quantile({q}, sum by (account, le) (rate({buckets}[{RATE}])))",
                    f"{{{{account}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            )
        ),
        unit="s",
        layout=layout,
        custom={"scaleDistribution": {"type": "log", "log": 10}},
        min_value=None,
    )


def pending_and_expired(metric: str, title: str, description: str, layout: Layout) -> Json:
    return timeseries(
        title,
        description,
        targets((sel(metric, 'state=~"pending|expired"'), "{{account}} {{state}}")),
        unit="short",
        layout=layout,
        overrides=[
            colour_by_name(".* pending$", "blue"),
            colour_by_name(".* expired$", "orange"),
        ],
    )


def newest_webhook(
    layout: Layout,
    title: str,
    description: str,
    size: tuple[int, int],
    thresholds: Json,
    *matchers: str,
    **extra,
) -> Json:
    """Per account, how long ago its provider's newest webhook arrived."""
    return stat(
        title,
        description,
        targets(
            (
                "time() - max by (account) "
                f"({sel('whatsapp_exporter_last_webhook_timestamp_seconds', *matchers)})",
                "{{account}}",
            )
        ),
        unit="s",
        layout=layout,
        size=size,
        thresholds=thresholds,
        sparkline=False,
        **extra,
    )
