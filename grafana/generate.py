"""The bundled Grafana dashboards, as code.

    python grafana/generate.py           writes grafana/dashboards/*.json
    python grafana/generate.py --check   writes nothing; exits 1 if any file there would change

Standard library only. Every query filters by the `account` variable and by provider (the
`provider` variable, or the provider a dashboard is about), uses no variable but $provider,
$account, $__rate_interval and $__range (tests/test_e2e.py substitutes exactly these), and reads
the recording rules of prometheus/rules.yml wherever a panel shows what a rule records.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
TAG = "whatsapp"
UIDS = {
    "overview": "whatsapp-overview",
    "whatsgate": "whatsapp-whatsgate-devices",
    "d7": "whatsapp-d7-delivery",
    "kaleyra": "whatsapp-kaleyra-client",
    "betatel": "whatsapp-betatel-stats",
}
RATE = "$__rate_interval"
D7_FAILED = "un_delivered|rejected|insufficient_credit"

Json = dict[str, Any]
Selector = Callable[..., str]


# --- queries ------------------------------------------------------------------------------------


def selector(provider: str | None) -> Selector:
    """`sel(metric, 'label="x"', ...)`: the metric filtered by the dashboard's variables."""
    # a provider's dashboard has a `provider` variable too, whose only option (and "All") is that
    # provider, so the same queries work on every dashboard and never mix providers
    base = 'provider=~"$provider", account=~"$account"'

    def sel(metric: str, *matchers: str) -> str:
        return f"{metric}{{{', '.join((base, *matchers))}}}"

    return sel


def matcher(label: str, value: str, op: str = "=") -> str:
    return f'{label}{op}"{value}"'


def target(
    expr: str, legend: str, ref: str = "A", *, table: bool = False, instant: bool = False
) -> Json:
    """A query; a table's and an `instant` one are evaluated once, at the end of the range."""
    query = {"datasource": DS, "editorMode": "code", "expr": expr, "legendFormat": legend}
    if table:
        query["format"] = "table"
    query.update(instant=table or instant, range=not (table or instant))
    return {**query, "refId": ref}


def targets(*queries: tuple[str, str]) -> list[Json]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


# --- field config -------------------------------------------------------------------------------


def steps(first: str, *rest: tuple[float, str]) -> Json:
    """Absolute thresholds: the colour below the first value, then (value, colour) upwards."""
    return {
        "mode": "absolute",
        "steps": [{"color": first, "value": None}]
        + [{"color": color, "value": value} for value, color in rest],
    }


def value_map(*entries: tuple[int, str, str]) -> list[Json]:
    return [
        {
            "type": "value",
            "options": {
                str(value): {"text": text, "color": color, "index": i}
                for i, (value, text, color) in enumerate(entries)
            },
        }
    ]


def fixed_colour(colour: str) -> Json:
    return {"id": "color", "value": {"mode": "fixed", "fixedColor": colour}}


def override(matcher_id: str, options: Any, *properties: Json) -> Json:
    return {"matcher": {"id": matcher_id, "options": options}, "properties": list(properties)}


# Series that stayed at zero over the whole range are left out of the drawing, the legend and the
# tooltip: an error panel then lists only what actually went wrong, while its query still returns
# every series (so a quiet panel says "nothing failed" rather than "no data").
HIDE_ALL_ZERO = override(
    "byValue",
    {"reducer": "allIsZero", "op": "gte", "value": 0},
    {"id": "custom.hideFrom", "value": {"legend": True, "tooltip": True, "viz": True}},
)


def colour_by_name(pattern: str, colour: str) -> Json:
    return override("byRegexp", pattern, fixed_colour(colour))


# --- panels -------------------------------------------------------------------------------------


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to a new line when full."""

    def __init__(self) -> None:
        self.x = self.y = self.line_height = 0

    def place(self, w: int, h: int) -> Json:
        if self.x + w > 24:
            self.x, self.y, self.line_height = 0, self.y + self.line_height, 0
        position = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.line_height = max(self.line_height, h)
        return position


def panel(
    kind: str,
    title: str,
    description: str,
    queries: list[Json],
    *,
    unit: str,
    size: tuple[int, int],
    layout: Layout,
    defaults: Json | None = None,
    overrides: list[Json] | None = None,
    options: Json | None = None,
    links: list[Json] | None = None,
    **extra: Any,
) -> Json:
    result: Json = {
        "type": kind,
        "title": title,
        "description": " ".join(description.split()),
        "datasource": DS,
        "gridPos": layout.place(*size),
        "fieldConfig": {
            "defaults": {"unit": unit, **(defaults or {})},
            "overrides": overrides or [],
        },
        "options": options or {},
        "targets": queries,
    }
    if links:
        result["links"] = links
    result.update(extra)
    return result


def timeseries(
    title: str,
    description: str,
    queries: list[Json],
    *,
    unit: str,
    layout: Layout,
    size: tuple[int, int] = (12, 8),
    thresholds: Json | None = None,
    threshold_style: str = "off",
    custom: Json | None = None,
    min_value: float | None = 0,
    max_value: float | None = None,
    legend_calcs: tuple[str, ...] = ("lastNotNull", "max"),
    decimals: int | None = None,
    **extra: Any,
) -> Json:
    defaults: Json = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
            "thresholdsStyle": {"mode": threshold_style},
            **(custom or {}),
        },
        "thresholds": thresholds or steps("green"),
    }
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "legend": {
            "showLegend": True,
            "displayMode": "table",
            "placement": "bottom",
            "calcs": list(legend_calcs),
        },
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return panel(
        "timeseries",
        title,
        description,
        queries,
        unit=unit,
        size=size,
        layout=layout,
        defaults=defaults,
        options=options,
        **extra,
    )


def stat(
    title: str,
    description: str,
    queries: list[Json],
    *,
    unit: str,
    layout: Layout,
    thresholds: Json,
    size: tuple[int, int] = (6, 5),
    sparkline: bool = True,
    no_value: str | None = None,
    decimals: int | None = None,
    **extra: Any,
) -> Json:
    defaults: Json = {"color": {"mode": "thresholds"}, "thresholds": thresholds}
    if no_value is not None:
        defaults["noValue"] = no_value
    if decimals is not None:
        defaults["decimals"] = decimals
    options = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "background",
        "graphMode": "area" if sparkline else "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "value_and_name",
        "wideLayout": True,
        "showPercentChange": False,
    }
    return panel(
        "stat",
        title,
        description,
        queries,
        unit=unit,
        size=size,
        layout=layout,
        defaults=defaults,
        options=options,
        **extra,
    )


def state_timeline(
    title: str,
    description: str,
    queries: list[Json],
    *,
    mappings: list[Json],
    layout: Layout,
    size: tuple[int, int] = (24, 8),
) -> Json:
    defaults = {
        "color": {"mode": "thresholds"},
        "thresholds": steps("text"),
        "mappings": mappings,
        "custom": {"fillOpacity": 80, "lineWidth": 0},
    }
    options = {
        "mergeValues": True,
        "showValue": "auto",
        "alignValue": "left",
        "rowHeight": 0.9,
        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
        "tooltip": {"mode": "single", "sort": "none"},
    }
    return panel(
        "state-timeline",
        title,
        description,
        queries,
        unit="none",
        size=size,
        layout=layout,
        defaults=defaults,
        options=options,
    )


def link_to(key: str, title: str) -> list[Json]:
    """A panel link to a provider's dashboard, keeping the time range and the selected accounts."""
    url = f"/d/{UIDS[key]}?${{account:queryparam}}&${{__url_time_range}}"
    return [{"title": title, "url": url}]


# --- dashboard ----------------------------------------------------------------------------------


def datasource_variable() -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def label_variable(name: str, label: str, metric: str, all_value: str = ".*") -> Json:
    query = f"label_values({metric}, {name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {
            "qryType": 1,
            "query": query,
            "refId": "PrometheusVariableQueryEditor-VariableQuery",
        },
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "includeAll": True,
        "allValue": all_value,
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }


def dashboard(
    key: str, title: str, description: str, provider: str | None, panels: list[Json]
) -> Json:
    """`provider` None: a `provider` variable; else the dashboard is that provider's."""
    if provider is None:
        variables = [
            label_variable("provider", "Provider", "whatsapp_exporter_up"),
            label_variable("account", "Account", 'whatsapp_exporter_up{provider=~"$provider"}'),
        ]
    else:
        variables = [
            label_variable(
                "provider", "Provider", f'whatsapp_exporter_up{{provider="{provider}"}}', provider
            ),
            label_variable("account", "Account", 'whatsapp_exporter_up{provider=~"$provider"}'),
        ]
    for number, item in enumerate(panels, 1):
        item["id"] = number
    return {
        "uid": UIDS[key],
        "title": title,
        "description": " ".join(description.split()),
        "tags": [TAG, provider or "overview"],
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "weekStart": "",
        "version": 1,
        "annotations": {"list": []},
        "links": [
            {
                "title": "WhatsApp dashboards",
                "type": "dashboards",
                "tags": [TAG],
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
            }
        ],
        "templating": {"list": [datasource_variable(), *variables]},
        "panels": panels,
    }


# --- panels shared by the overview and a provider's dashboard ----------------------------------


def devices_disconnected(
    sel: Selector, layout: Layout, size: tuple[int, int], title: str, **extra
) -> Json:
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


def balance_runs_out(
    sel: Selector, layout: Layout, size: tuple[int, int], title: str, **extra
) -> Json:
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


def worst_failure_ratio(
    sel: Selector, layout: Layout, size: tuple[int, int], title: str, **extra
) -> Json:
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


def poll_errors(sel: Selector, layout: Layout, by: str, legend: str, **extra) -> Json:
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


def overview() -> Json:
    sel = selector(None)
    layout = Layout()
    by_target = "provider, account, endpoint, target"
    today = 'window="today"'
    today_transactions = sel("whatsapp_stats_transactions", today)
    today_requests = sel("whatsapp_stats_requests", today)
    panels = [
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
        devices_disconnected(
            sel,
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
            sel,
            layout,
            (5, 5),
            "WhatsGate balance runs out in",
            links=link_to("whatsgate", "WhatsGate devices"),
        ),
        worst_failure_ratio(
            sel,
            layout,
            (5, 5),
            "WhatsGate worst failure ratio today",
            links=link_to("whatsgate", "WhatsGate devices"),
        ),
        stat(
            "WhatsGate failed recipients",
            """Per account, distinct recipient numbers whose messages failed within the lookback
            (default 24h), summed over devices. A sudden rise means many recipients are refused:
            numbers without WhatsApp, a blocked device, or a template WhatsApp rejects.""",
            targets(
                (f"sum by (account) ({sel('whatsapp_failed_recipients')})", "{{account}}"),
            ),
            unit="short",
            layout=layout,
            size=(5, 5),
            thresholds=steps("green", (10, "orange"), (100, "red")),
            links=link_to("whatsgate", "WhatsGate devices"),
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
            size=(7, 5),
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
            "Kaleyra callback queue",
            """Per number, callbacks the WhatsApp Business API client has not yet delivered to
            your webhook. Orange from 100, red from 1,000; a queue that keeps growing means the
            webhook receiver is slow or down (the WhatsAppClientCallbackQueueGrowing alert).""",
            targets(
                (sel("whatsapp_client_app_callback_queue_size"), "{{account}} {{number}}"),
            ),
            unit="short",
            layout=layout,
            thresholds=steps("green", (100, "orange"), (1000, "red")),
            links=link_to("kaleyra", "Kaleyra client"),
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
            thresholds=steps("red", (0.9, "orange"), (0.97, "green")),
            decimals=1,
            links=link_to("betatel", "Betatel stats"),
        ),
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
            sel,
            layout,
            "provider, account, reason",
            "{{provider}} {{account}}: {{reason}}",
            size=(10, 9),
        ),
    ]
    return dashboard(
        "overview",
        "WhatsApp: overview",
        """Every WhatsApp provider and account at a glance: is the exporter able to poll them,
        are WhatsGate devices connected and funded, do messages fail, does D7 deliver, does the
        Kaleyra client keep up. Panels link to each provider's own dashboard.""",
        None,
        panels,
    )


def whatsgate() -> Json:
    sel = selector("whatsgate")
    layout = Layout()
    device = "{{device}} ({{account}})"
    status_codes = (
        ("connected", 1),
        ("disconnected", 2),
        ("not_connected", 3),
        ("not_initialized", 4),
        ("unknown", 5),
    )
    # one number per state, so that each device is one row of the state timeline
    states = "\n  or ".join(
        sel("whatsapp_device_status", matcher("status", status)) + f" * {code}"
        for status, code in status_codes
    )
    status_expr = f"sum by (account, device) (\n    {states}\n)"
    panels = [
        devices_disconnected(sel, layout, (5, 4), "Devices disconnected"),
        stat(
            "Failing polls",
            """Per account and endpoint: WhatsGate targets whose newest poll failed (red from
            one). While a poll fails the panels below show old values, and after `stale_after`
            intervals none. The overview's errors panel and the exporter's landing page say
            why.""",
            targets(
                (
                    f"sum by (account, endpoint) (1 - {sel('whatsapp_exporter_up')})",
                    "{{account}} {{endpoint}}",
                )
            ),
            unit="short",
            layout=layout,
            size=(5, 4),
            thresholds=steps("green", (1, "red")),
            sparkline=False,
        ),
        balance_runs_out(sel, layout, (5, 4), "Balance runs out in (soonest)"),
        worst_failure_ratio(sel, layout, (5, 4), "Worst failure ratio today"),
        stat(
            "Newest failure",
            """Per account, when a message of any of its devices last failed within the lookback
            (default 24h). "none" means no failure in the lookback. A failure minutes ago while the
            failure ratio rises is a live problem; look at the failed recipients below.""",
            targets(
                (
                    f"max by (account) ({sel('whatsapp_last_failure_timestamp_seconds')}) * 1000",
                    "{{account}}",
                )
            ),
            unit="dateTimeFromNow",
            layout=layout,
            size=(4, 4),
            thresholds=steps("blue"),
            sparkline=False,
            no_value="none",
        ),
        state_timeline(
            "Device status",
            """Each device's connection state over time, as WhatsGate reports it. Anything but
            connected (green) means the device sends nothing: disconnected and not connected
            (red) need the device re-linked in WhatsGate (scan the QR code); not initialized
            (orange) is a device that was never set up; unknown (purple) is a configured device
            WhatsGate does not list. Gaps: the exporter had no recent status for the device.""",
            targets((status_expr, device)),
            mappings=value_map(
                (1, "connected", "green"),
                (2, "disconnected", "red"),
                (3, "not connected", "red"),
                (4, "not initialized", "orange"),
                (5, "unknown", "purple"),
            ),
            layout=layout,
        ),
        timeseries(
            "Remaining balance",
            """Messages left in each device's WhatsGate balance. Sending stops at zero; the
            WhatsAppBalanceLow alert fires under 100 (the red band). A jump up is a top-up.""",
            targets((sel("whatsapp_balance_remaining_messages"), device)),
            unit="short",
            layout=layout,
            thresholds=steps("red", (100, "transparent")),
            threshold_style="area",
        ),
        timeseries(
            "Time until the balance runs out",
            """How long each device's balance lasts at the rate of the last 6 hours (recording
            rule whatsapp:balance_remaining_messages:seconds_left; shown only while the balance
            falls). Under a day (red band) the WhatsAppBalanceRunningOut alert fires: top up
            before it reaches zero.""",
            targets((sel("whatsapp:balance_remaining_messages:seconds_left"), device)),
            unit="s",
            layout=layout,
            thresholds=steps("red", (86400, "orange"), (3 * 86400, "transparent")),
            threshold_style="area",
            custom={"scaleDistribution": {"type": "log", "log": 10}},
            min_value=None,
        ),
        timeseries(
            "Balance used per hour",
            """How fast each device's balance goes down, in messages per hour over the last 6
            hours (the trend the time-left estimate uses). A sudden rise is a burst of sending,
            wanted or not; below zero the balance was topped up.""",
            targets((f"-deriv({sel('whatsapp_balance_remaining_messages')}[6h]) * 3600", device)),
            unit="count:msg/h",
            layout=layout,
            min_value=None,
        ),
        timeseries(
            "Messages today by state",
            """Today's successful, pending and failed messages of each device, as WhatsGate's
            balance report counts them (they reset daily). Pending that keeps rising while
            successful stays flat: the device is not sending, check its status above.""",
            targets((sel("whatsapp_device_messages"), "{{device}} {{state}} ({{account}})")),
            unit="short",
            layout=layout,
            overrides=[
                colour_by_name(".* successful .*", "green"),
                colour_by_name(".* pending .*", "orange"),
                colour_by_name(".* failed .*", "red"),
            ],
        ),
        timeseries(
            "Failure ratio today",
            """Share of each device's messages today that failed (recording rule
            whatsapp:device_messages:failure_ratio). Orange band from 5%, red from 20% (with at
            least 20 failures the WhatsAppFailureRatioHigh alert fires): check the device's
            status and its failed recipients.""",
            targets((sel("whatsapp:device_messages:failure_ratio"), device)),
            unit="percentunit",
            layout=layout,
            thresholds=steps("transparent", (0.05, "orange"), (0.2, "red")),
            threshold_style="area",
            max_value=1,
        ),
        timeseries(
            "Failed recipients",
            """Distinct recipient numbers whose messages from each device failed within the
            lookback (default 24h). A steep rise means many recipients are refused: numbers
            without WhatsApp, a device WhatsApp restricted, or a rejected template.""",
            targets((sel("whatsapp_failed_recipients"), device)),
            unit="short",
            layout=layout,
        ),
    ]
    return dashboard(
        "whatsgate",
        "WhatsApp: WhatsGate devices",
        """WhatsGate devices: connection state over time, message balance and how long it
        lasts, today's successful, pending and failed messages, and failed recipients.""",
        "whatsgate",
        panels,
    )


def d7() -> Json:
    sel = selector("d7")
    layout = Layout()
    failed_messages = sel("whatsapp_messages_total", matcher("status", D7_FAILED, "=~"))

    def quantiles(status: str) -> list[Json]:
        buckets = sel("whatsapp_message_delivery_seconds_bucket", matcher("status", status))
        return targets(
            *(
                (
                    f"histogram_quantile({q}, sum by (account, le) (rate({buckets}[{RATE}])))",
                    f"{{{{account}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            )
        )

    panels = [
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
        timeseries(
            "Messages by status",
            """Messages reaching each status per minute (a read message also counts as
            delivered and sent). delivered should follow sent closely; un_delivered, rejected or
            insufficient_credit rising is the problem to chase (insufficient_credit: top up the
            D7 account).""",
            targets(
                (
                    f"sum by (account, status) "
                    f"(rate({sel('whatsapp_messages_total')}[{RATE}])) * 60",
                    "{{status}} ({{account}})",
                )
            ),
            unit="count:msg/min",
            layout=layout,
            overrides=[
                colour_by_name("^sent .*", "blue"),
                colour_by_name("^delivered .*", "green"),
                colour_by_name("^read .*", "purple"),
                colour_by_name("^(un_delivered|rejected) .*", "red"),
                colour_by_name("^insufficient_credit .*", "orange"),
            ],
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
        timeseries(
            "Time to delivered",
            """Median, 90th and 99th percentile of the time from send to delivered for the
            messages delivered in each interval. A rising p50 means D7 or WhatsApp are slow for
            everyone; a rising p99 alone means a few recipients are offline.""",
            quantiles("delivered"),
            unit="s",
            layout=layout,
            custom={"scaleDistribution": {"type": "log", "log": 10}},
            min_value=None,
        ),
        timeseries(
            "Time to read",
            """Median, 90th and 99th percentile of the time from send to read for the messages
            read in each interval. Mostly the recipients' habits; a sudden jump for every
            percentile may mean read receipts arrive late.""",
            quantiles("read"),
            unit="s",
            layout=layout,
            custom={"scaleDistribution": {"type": "log", "log": 10}},
            min_value=None,
        ),
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
        timeseries(
            "Pending and expired requests",
            """Request ids still followed (pending) and those given up on (expired: no final
            status within expire_after, default 72h, or unknown to D7 after not_found_grace).
            Expired ids are kept for keep_finished (7d); a rise means ids the exporter could not
            follow, so the ratios miss them.""",
            targets(
                (
                    sel("whatsapp_tracked_requests", 'state=~"pending|expired"'),
                    "{{account}} {{state}}",
                )
            ),
            unit="short",
            layout=layout,
            overrides=[
                colour_by_name(".* pending$", "blue"),
                colour_by_name(".* expired$", "orange"),
            ],
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
        poll_errors(sel, layout, "account, reason", "{{account}}: {{reason}}"),
    ]
    return dashboard(
        "d7",
        "WhatsApp: D7 delivery",
        """D7 Networks messages followed to their final status: rates per status, delivered
        and read ratios, time to delivered and to read, failures by message type, and the
        request ids still pending or expired.""",
        "d7",
        panels,
    )


def kaleyra() -> Json:
    sel = selector("kaleyra")
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
        "kaleyra",
        "WhatsApp: Kaleyra client",
        """The WhatsApp Business API client behind each Kaleyra number: callback queue, pending
        messages, API traffic, durations of callbacks, database requests and sends, and
        errors.""",
        "kaleyra",
        panels,
    )


def betatel() -> Json:
    sel = selector("betatel")
    layout = Layout()
    per_window = "{{window}} ({{account}})"
    share = f"{sel('whatsapp_stats_transactions')}\n  / ({sel('whatsapp_stats_requests')} > 0)"
    panels = [
        stat(
            "Requests",
            """Messages requested from Betatel in each configured window (rolling windows like
            last5m, or the running bucket like today), as Betatel counts them now.""",
            targets((sel("whatsapp_stats_requests"), per_window)),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
        ),
        stat(
            "Transactions",
            """Messages Betatel processed in each window. Far fewer than the requests: see the
            success share.""",
            targets((sel("whatsapp_stats_transactions"), per_window)),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
        ),
        stat(
            "Amount",
            """What Betatel billed in each window, in the currency named in each value's label
            (accounts may bill in different currencies, so no currency unit is assumed).""",
            targets((sel("whatsapp_stats_amount"), "{{window}} {{currency}} ({{account}})")),
            unit="short",
            layout=layout,
            thresholds=steps("blue"),
            decimals=2,
        ),
        stat(
            "Success share",
            """Transactions as a share of requests in each window (blank for a window without
            requests). Red under 90%, orange under 97%: messages are being refused; check the
            recipients and templates of recent sends, and Betatel's status.""",
            targets((share, per_window)),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (0.9, "orange"), (0.97, "green")),
            decimals=1,
        ),
        timeseries(
            "Requests and transactions",
            """Each window's requests and transactions over time. A rolling window (last5m,
            lasth) shows the traffic's shape; a running bucket (today, daily) climbs and resets
            when the bucket starts anew. Transactions falling behind requests: messages are
            refused.""",
            targets(
                (sel("whatsapp_stats_requests"), "{{window}} requests ({{account}})"),
                (sel("whatsapp_stats_transactions"), "{{window}} transactions ({{account}})"),
            ),
            unit="short",
            layout=layout,
        ),
        timeseries(
            "Amount billed",
            """What each window cost over time, per currency (in the legend). A rolling window
            that costs more than usual is a burst of sending, wanted or not.""",
            targets((sel("whatsapp_stats_amount"), "{{window}} {{currency}} ({{account}})")),
            unit="short",
            layout=layout,
            decimals=2,
        ),
        timeseries(
            "Success share",
            """Transactions as a share of requests in each window over time (red band under
            90%). A drop in a short window is happening now; in a long one it happened
            earlier.""",
            targets((share, per_window)),
            unit="percentunit",
            layout=layout,
            thresholds=steps("red", (0.9, "transparent")),
            threshold_style="area",
            max_value=1,
        ),
        state_timeline(
            "Polls per window",
            """Whether the newest stats poll of each window succeeded (green) or failed (red).
            Failing: the API key or account id was refused (auth), or Betatel is down; the
            overview's errors panel and the exporter's landing page say why. Values of a
            failing window go stale and then disappear.""",
            targets((sel("whatsapp_exporter_up"), "{{target}} ({{account}})")),
            mappings=value_map((0, "failing", "red"), (1, "up", "green")),
            layout=layout,
            size=(12, 8),
        ),
    ]
    return dashboard(
        "betatel",
        "WhatsApp: Betatel stats",
        """Betatel's own counts per configured time window: requests, processed messages
        (transactions), the amount billed in its currency, and the share that succeeded.""",
        "betatel",
        panels,
    )


BUILDERS = {
    "whatsapp-overview.json": overview,
    "whatsapp-whatsgate-devices.json": whatsgate,
    "whatsapp-d7-delivery.json": d7,
    "whatsapp-kaleyra-client.json": kaleyra,
    "whatsapp-betatel-stats.json": betatel,
}


# --- output -------------------------------------------------------------------------------------


def all_panels(board: Json) -> Iterator[Json]:
    """Every panel, including those inside (collapsed) rows."""
    for item in board.get("panels", []):
        yield item
        yield from item.get("panels", [])


def panel_queries(board: Json) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, rows included."""
    return [
        (item.get("title", ""), query["expr"])
        for item in all_panels(board)
        for query in item.get("targets", [])
        if "expr" in query
    ]


def render(board: Json) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    return {name: render(build()) for name, build in BUILDERS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a file is not what would be written"
    )
    parser.add_argument("--dir", type=Path, default=DASHBOARDS, help="the dashboards' folder")
    args = parser.parse_args(argv)
    wanted = rendered()
    if args.check:
        stale = [
            name
            for name, text in wanted.items()
            if not (args.dir / name).is_file()
            or (args.dir / name).read_text(encoding="utf-8") != text
        ]
        extra = sorted(p.name for p in args.dir.glob("*.json") if p.name not in wanted)
        for name in stale:
            print(f"{args.dir / name} is not what grafana/generate.py writes", file=sys.stderr)
        for name in extra:
            print(f"{args.dir / name} is not written by grafana/generate.py", file=sys.stderr)
        if stale or extra:
            print("run: python grafana/generate.py", file=sys.stderr)
            return 1
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (args.dir / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
