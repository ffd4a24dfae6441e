"""What every dashboard is built from: queries, field config, panels, rows, variables, the frame.

Standard library only; the output is plain Grafana JSON (schema 39). Every query filters by the
dashboard's variables (`sel`): raw series by `job` and `instance` (an HA pair or two exporters
are told apart, or taken together), and by `provider` and `account` wherever the series has them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mixin.config import Config
from simulators import KITS

DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
TAG = "whatsapp"
# the dashboards across providers, and one per provider (its kit names the uid)
UIDS = {
    "overview": "whatsapp-overview",
    "exporter": "whatsapp-exporter",
    "slo": "whatsapp-slo",
} | {name: kit.dashboard for name, kit in KITS.items()}
RATE = "$__rate_interval"
D7_FAILED = "un_delivered|rejected|insufficient_credit"
# series about an exporter process, not about a provider's account
PROCESS_LEVEL = {
    "up",
    "whatsapp_exporter_build_info",
    "whatsapp_exporter_config_last_reload_successful",
    "whatsapp_exporter_event_loop_lag_seconds",
    "whatsapp_exporter_exposition_bytes",
    "whatsapp_exporter_http_requests_total",
    "whatsapp_exporter_leader",
    "whatsapp_exporter_publications_total",
    "whatsapp_exporter_publish_duration_seconds",
    "whatsapp_exporter_requests_held_total",
    "whatsapp_exporter_requests_in_flight_limit",
    "whatsapp_exporter_samples_dropped_total",
}
# recording rules per provider only
PER_PROVIDER = {"whatsapp:delivery_success:objective"}

Json = dict[str, Any]


# --- queries ------------------------------------------------------------------------------------


def sel(metric: str, *matchers: str) -> str:
    """The metric filtered by the dashboard's variables. Recording rules have no `job` or
    `instance` (they aggregate over replicas); process-level series no provider or account."""
    base = [] if ":" in metric else ['job=~"$job"', 'instance=~"$instance"']
    if metric not in PROCESS_LEVEL and not metric.startswith("process_"):
        base.append('provider=~"$provider"')
        if metric not in PER_PROVIDER:
            base.append('account=~"$account"')
    return f"{metric}{{{', '.join((*base, *matchers))}}}"


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

    def newline(self) -> None:
        if self.x:
            self.x, self.y, self.line_height = 0, self.y + self.line_height, 0


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
    mappings: list[Json] | None = None,
    **extra: Any,
) -> Json:
    defaults: Json = {"color": {"mode": "thresholds"}, "thresholds": thresholds}
    if mappings:
        defaults["mappings"] = mappings
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


# --- dashboard ----------------------------------------------------------------------------------


def row(title: str, layout: Layout) -> Json:
    """A row header across the grid; the panels after it (up to the next row) belong to it."""
    layout.newline()
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": layout.place(24, 1),
        "panels": [],
    }


def link_to(key: str, title: str) -> list[Json]:
    """A panel link to another dashboard, keeping the time range, the exporters and accounts."""
    keep = "&".join(
        f"${{{v}:queryparam}}" for v in ("job", "instance", "account", "__url_time_range")
    )
    return [{"title": title, "url": f"/d/{UIDS[key]}?{keep}"}]


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


def label_variable(name: str, label: str, metric: str, all_value: str | None = ".*") -> Json:
    """`all_value` None: "All" means every value listed (Grafana joins them into a regex), for
    `job` and `instance`, so that "All" never reaches another job's process_* series."""
    query = f"label_values({metric}, {name})"
    variable = {
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
    if all_value is None:
        del variable["allValue"]
    return variable


def variables(c: Config, provider: str | None) -> list[Json]:
    """`provider` None: every provider; a name: that provider's dashboard; a regex: those."""
    exporters = 'job=~"$job", instance=~"$instance"'
    if provider is None or "|" in provider:
        only = f'provider=~"{provider}", ' if provider else ""
        providers = label_variable(
            "provider", "Provider", f"whatsapp_exporter_up{{{only}{exporters}}}"
        )
    else:
        # its `provider` variable offers that provider alone ("All" too), so the same queries
        # work on every dashboard and never mix providers
        providers = label_variable(
            "provider",
            "Provider",
            f'whatsapp_exporter_up{{provider="{provider}", {exporters}}}',
            provider,
        )
    return [
        datasource_variable(),
        label_variable("job", "Job", f"whatsapp_exporter_build_info{{{c.selector}}}", None),
        label_variable("instance", "Instance", 'whatsapp_exporter_build_info{job=~"$job"}', None),
        providers,
        label_variable(
            "account", "Account", f'whatsapp_exporter_up{{provider=~"$provider", {exporters}}}'
        ),
    ]


# Firing alerts of the selected providers and accounts, and those about no account (an exporter
# down): a red mark on every time axis where something was wrong.
ALERTS = (
    'ALERTS{alertstate="firing", alertname=~"WhatsApp.+", '
    'provider=~"$provider|", account=~"$account|"}'
)


def annotations() -> Json:
    return {
        "list": [
            {
                "name": "Firing alerts",
                "datasource": DS,
                "enable": True,
                "hide": False,
                "iconColor": "red",
                "expr": ALERTS,
                "step": "1m",
                "titleFormat": "{{alertname}}",
                "textFormat": "{{severity}}: {{provider}} {{account}} {{device}}{{number}}",
                "tagKeys": "severity,provider,account",
                "useValueForTime": False,
            }
        ]
    }


def dashboard(
    c: Config,
    key: str,
    title: str,
    description: str,
    provider: str | None,
    panels: list[Json],
    tag: str | None = None,
) -> Json:
    for number, item in enumerate(panels, 1):
        item["id"] = number
    return {
        "uid": UIDS[key],
        "title": title,
        "description": " ".join(description.split()),
        "tags": [TAG, tag or provider or "overview"],
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
        "annotations": annotations(),
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
        "templating": {"list": variables(c, provider)},
        "panels": panels,
    }


# --- reading dashboards back --------------------------------------------------------------------


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


def annotation_queries(board: Json) -> list[tuple[str, str]]:
    return [
        (item["name"], item["expr"])
        for item in board.get("annotations", {}).get("list", [])
        if "expr" in item
    ]


def render(board: Json) -> str:
    return json.dumps(board, indent=2, ensure_ascii=False) + "\n"
