"""WhatsGate devices: connection, balance, today's messages, failed recipients."""

from __future__ import annotations

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
from mixin.dashboards.shared import balance_runs_out, devices_disconnected, worst_failure_ratio


def whatsgate(c: Config) -> Json:
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
        row("Now", layout),
        devices_disconnected(layout, (5, 4), "Devices disconnected"),
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
        balance_runs_out(layout, (5, 4), "Balance runs out in (soonest)"),
        worst_failure_ratio(layout, (5, 4), "Worst failure ratio today"),
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
        row("Connection", layout),
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
        row("Balance", layout),
        timeseries(
            "Remaining balance",
            """Messages left in each device's WhatsGate balance. Sending stops at zero; the
            WhatsAppBalanceLow alert fires under 100 (the red band). A jump up is a top-up.""",
            targets((sel("whatsapp_balance_remaining_messages"), device)),
            unit="short",
            layout=layout,
            size=(8, 8),
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
            size=(8, 8),
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
            size=(8, 8),
            min_value=None,
        ),
        row("Messages today", layout),
        timeseries(
            "Messages today by state",
            """Today's successful, pending and failed messages of each device, as WhatsGate's
            balance report counts them (they reset daily). Pending that keeps rising while
            successful stays flat: the device is not sending, check its status above.""",
            targets((sel("whatsapp_device_messages"), "{{device}} {{state}} ({{account}})")),
            unit="short",
            layout=layout,
            size=(8, 8),
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
            size=(8, 8),
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
            size=(8, 8),
        ),
    ]
    return dashboard(
        c,
        "whatsgate",
        "WhatsApp: WhatsGate devices",
        """WhatsGate devices: connection state over time, message balance and how long it
        lasts, today's successful, pending and failed messages, and failed recipients.""",
        "whatsgate",
        panels,
    )
