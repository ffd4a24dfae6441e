"""The exporter itself: is it scraped, how it polls, what serving /metrics costs, what D7's
ingest API and webhook receive, and the process's memory and CPU.

The exporter keeps no request-budget gauge: how long a poll waited for its account's budget is
part of its duration, which the poll panel shows.
"""

from __future__ import annotations

from mixin.config import Config
from mixin.dashboards.builder import (
    HIDE_ALL_ZERO,
    RATE,
    Json,
    Layout,
    dashboard,
    link_to,
    matcher,
    override,
    row,
    sel,
    stat,
    steps,
    targets,
    timeseries,
    value_map,
)
from mixin.dashboards.shared import newest_webhook, poll_errors


def right_axis(ref: str, unit: str) -> Json:
    """The query `ref` in its own unit, on an axis of its own."""
    return override(
        "byFrameRefID",
        ref,
        {"id": "unit", "value": unit},
        {"id": "custom.axisPlacement", "value": "right"},
    )


def exporter(c: Config) -> Json:
    layout = Layout()
    per_instance = "{{instance}}"
    panels = [
        row("Exporters", layout),
        stat(
            "Scraped",
            """Whether Prometheus scraped each exporter at its last attempt (up). Down: nothing
            of its providers is watched; the WhatsAppExporterDown alert fires after 5 minutes,
            and WhatsAppExporterAbsent when no exporter of the job is known at all.""",
            targets((sel("up"), per_instance)),
            unit="none",
            layout=layout,
            size=(5, 4),
            thresholds=steps("red", (1, "green")),
            sparkline=False,
            mappings=value_map((0, "down", "red"), (1, "up", "green")),
        ),
        stat(
            "Leader",
            """Whether each exporter leads its shard (whatsapp_exporter_leader): only the leader
            polls the shard's accounts and shows their values; the others accept ingest and
            webhooks. Exactly one leader per shard is right; none for long means no replica
            reaches the database (--storage.url). A single process always leads.""",
            targets((sel("whatsapp_exporter_leader"), "{{instance}} shard {{shard}}")),
            unit="none",
            layout=layout,
            size=(5, 4),
            thresholds=steps("blue"),
            sparkline=False,
            mappings=value_map((0, "follower", "blue"), (1, "leader", "green")),
        ),
        stat(
            "Config reload",
            """Whether each exporter's last config reload (SIGHUP or POST /-/reload) was
            accepted. Failed: the old config still runs; the exporter's log lists every error
            with its path, and whatsapp-exporter --config.check shows them too.""",
            targets((sel("whatsapp_exporter_config_last_reload_successful"), per_instance)),
            unit="none",
            layout=layout,
            size=(5, 4),
            thresholds=steps("red", (1, "green")),
            sparkline=False,
            mappings=value_map((0, "failed", "red"), (1, "ok", "green")),
        ),
        stat(
            "Samples dropped",
            """Provider samples left out of /metrics over the selected range because they cannot
            be exposed (a negative counter, an invalid or repeated label name). Anything but
            zero: the exporter's log names the metric once; a provider changed its answers.""",
            targets(
                (
                    "sum by (instance) "
                    f"(increase({sel('whatsapp_exporter_samples_dropped_total')}[$__range]))",
                    per_instance,
                )
            ),
            unit="short",
            layout=layout,
            size=(5, 4),
            thresholds=steps("green", (1, "orange")),
            sparkline=False,
            decimals=0,
        ),
        newest_webhook(
            layout,
            "Newest D7 webhook",
            """How long ago each D7 account's delivery webhook last arrived. Growing while you
            send: D7's callback no longer reaches the exporter (a changed URL, secret or
            certificate, or the ingest listener unreachable); statuses then come only from the
            slower report polls.""",
            (4, 4),
            steps("green", (900, "orange"), (3600, "red")),
            matcher("provider", "d7"),
            links=link_to("d7", "D7 delivery"),
        ),
        row("Polling", layout),
        timeseries(
            "Poll duration",
            """How long the newest poll of each provider endpoint took, slowest target per
            account and endpoint, including the wait for the account's request budget. Close to
            the poll interval: the budget is too small for the targets (lengthen intervals or
            raise rate_limit if the provider allows); close to the timeout: the provider is
            slow.""",
            targets(
                (
                    "max by (provider, account, endpoint) "
                    f"({sel('whatsapp_exporter_poll_duration_seconds')})",
                    "{{provider}} {{account}} {{endpoint}}",
                )
            ),
            unit="s",
            layout=layout,
        ),
        poll_errors(layout, "provider, account, reason", "{{provider}} {{account}}: {{reason}}"),
        row("Serving /metrics", layout),
        timeseries(
            "HTTP requests",
            """Requests the exporter served per second, by route and status code (counted every
            10 s). 401 or 403 on the ingest or webhook routes: a sender with a wrong token;
            503: the D7 ledger cannot be written; 429 never comes from here.""",
            targets(
                (
                    "sum by (instance, handler, code) "
                    f"(rate({sel('whatsapp_exporter_http_requests_total')}[{RATE}]))",
                    "{{handler}} {{code}} ({{instance}})",
                )
            ),
            unit="reqps",
            layout=layout,
            size=(8, 8),
        ),
        timeseries(
            "Publishing /metrics and the event loop",
            """Left axis: event-loop time the newest publication of /metrics took, and the worst
            delay of the event loop (which serves /metrics) in each 10 s. Right axis, per minute:
            publications (coalesced: far fewer than polls) and provider requests held back
            because the loop lagged over 20 ms. Held requests now and then are a burst; all the
            time, polls are due faster than this process has CPU for: lengthen intervals or
            shard the accounts.""",
            targets(
                (sel("whatsapp_exporter_publish_duration_seconds"), "publish ({{instance}})"),
                (sel("whatsapp_exporter_event_loop_lag_seconds"), "loop lag ({{instance}})"),
                (
                    f"rate({sel('whatsapp_exporter_publications_total')}[{RATE}]) * 60",
                    "publications ({{instance}})",
                ),
                (
                    f"rate({sel('whatsapp_exporter_requests_held_total')}[{RATE}]) * 60",
                    "requests held ({{instance}})",
                ),
            ),
            unit="s",
            layout=layout,
            size=(8, 8),
            overrides=[right_axis("C", "short"), right_axis("D", "short")],
        ),
        timeseries(
            "Exposition size",
            """Size of the newest uncompressed /metrics body. It grows with accounts, devices,
            numbers and the Kaleyra client's families; a sudden jump is new label values (a
            provider sending more devices or a new client version).""",
            targets((sel("whatsapp_exporter_exposition_bytes"), per_instance)),
            unit="bytes",
            layout=layout,
            size=(8, 8),
        ),
        row("D7 ingest and the process", layout),
        timeseries(
            "D7 ingest and webhooks",
            """Per minute: request ids handed in over the ingest API (new, known: already
            tracked, refused: in a refused hand-in), delivery events stored from D7's webhook,
            and problems (bad_report: a malformed report, asked again later; bad_timestamp: an
            event time before 2015 or in the future, ignored). Series that stayed at zero are
            hidden.""",
            targets(
                (
                    "sum by (account, result) "
                    f"(rate({sel('whatsapp_tracking_ids_total')}[{RATE}])) * 60",
                    "ids {{result}} ({{account}})",
                ),
                (
                    "sum by (account) "
                    f"(rate({sel('whatsapp_tracking_webhook_events_total')}[{RATE}])) * 60",
                    "webhook events ({{account}})",
                ),
                (
                    "sum by (account, problem) "
                    f"(rate({sel('whatsapp_tracking_problems_total')}[{RATE}])) * 60",
                    "{{problem}} ({{account}})",
                ),
            ),
            unit="count:/min",
            layout=layout,
            overrides=[HIDE_ALL_ZERO],
        ),
        timeseries(
            "Memory and CPU",
            """Resident memory of each exporter process (left axis) and the CPU it uses, as a
            share of one core (right axis). Memory grows with the exposition and the D7 ledger's
            pending ids; CPU near one core means the single event loop is saturated.""",
            targets(
                (sel("process_resident_memory_bytes"), "memory ({{instance}})"),
                (f"rate({sel('process_cpu_seconds_total')}[{RATE}])", "CPU ({{instance}})"),
            ),
            unit="bytes",
            layout=layout,
            overrides=[right_axis("B", "percentunit")],
        ),
    ]
    return dashboard(
        c,
        "exporter",
        "WhatsApp: exporter",
        """The exporter itself: whether Prometheus scrapes it, which replica leads, its config
        reloads, how long
        polls take and why they fail, what serving /metrics costs, D7's ingest API and webhook
        traffic, and the process's memory and CPU.""",
        None,
        panels,
        tag="exporter",
    )
