"""The status page at `/`: what an operator opens when an alert fires.

Server-rendered HTML from plain data, with a few lines of script that fetch the main section again
every few seconds (`/?fragment=1`), so the page stays current without a reload and without a
build step. Failing targets come first, with their reason and since when; then counts per
provider, the providers' own state (D7's ledger), request budgets and every target with its last
polls. A very large deployment sees the failing targets in full and the first healthy ones.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from exporter.snapshot import Poll, TargetKey, TargetState

REFRESH_SECONDS = 5
MAX_HEALTHY_ROWS = 300


@dataclass(frozen=True)
class Budget:
    provider: str
    account: str
    used: int
    limit: int
    period: float
    paused_for: float  # seconds left of a 429's pause; 0 when not paused


@dataclass(frozen=True)
class Status:
    version: str
    revision: str
    now: float
    targets: Sequence[TargetState]
    history: Callable[[TargetKey], Sequence[Poll]]
    budgets: Sequence[Budget]
    # provider -> account -> field -> text, from providers that keep state (D7's ledger)
    providers: Mapping[str, Mapping[str, Mapping[str, str]]]


def state(target: TargetState) -> str:
    """down means failing now; stale means its values left /metrics (it is failing too)."""
    if target.up is None:
        return "pending"
    if target.up:
        return "up"
    return "stale" if target.stale else "down"


def page(status: Status) -> bytes:
    return (
        _HEAD
        + f"<main id='main'>{_main(status)}</main>"
        + _SCRIPT.replace("REFRESH", str(REFRESH_SECONDS * 1000))
        + "</body></html>\n"
    ).encode()


def fragment(status: Status) -> bytes:
    return _main(status).encode()


def _main(status: Status) -> str:
    failing = sorted(
        (t for t in status.targets if state(t) in ("down", "stale")),
        key=lambda t: (t.failing_since or 0, t.key),
    )
    healthy = [t for t in status.targets if state(t) not in ("down", "stale")]
    parts = [
        f"<p class='meta'>Version {_e(status.version)} (revision {_e(status.revision)}), "
        f"page of {_clock(status.now)}. <a href='/metrics'>/metrics</a> · "
        "<a href='/config'>/config</a> · <a href='/-/healthy'>/-/healthy</a> · "
        "<a href='/-/ready'>/-/ready</a>. Values are polled in the background: each is at most "
        "one poll interval old.</p>",
        _summary(status.targets),
        _failing(failing, status),
        _providers(status.providers),
        _budgets(status.budgets),
        _targets(healthy, status),
    ]
    return "\n".join(parts)


def _summary(targets: Sequence[TargetState]) -> str:
    counts: dict[str, dict[str, int]] = {}
    for target in targets:
        row = counts.setdefault(target.key.provider, dict.fromkeys(_STATES, 0))
        row[state(target)] += 1
    if not counts:
        return "<p>No targets configured.</p>"
    cards = "".join(
        f"<div class='card{' bad' if row['down'] + row['stale'] else ''}'>"
        f"<h3>{_e(provider)}</h3>"
        + "".join(
            f"<span class='n {name if row[name] else 'zero'}' title='{_TITLES[name]}'>"
            f"{row[name]} {name}</span>"
            for name in _STATES
        )
        + "</div>"
        for provider, row in sorted(counts.items())
    )
    return f"<section class='cards' id='summary'>{cards}</section>"


def _failing(failing: Sequence[TargetState], status: Status) -> str:
    if not failing:
        return "<h2>Failing</h2><p class='ok' id='failing'>No target is failing.</p>"
    rows = "".join(
        f"<tr class='{state(t)}'>{_who(t)}<td>{state(t)}</td>"
        f"<td class='t'>{_ago(t.failing_since, status.now)}</td>"
        f"<td class='t'>{_ago(t.last_success, status.now)}</td>"
        f"<td class='err'>{_e(t.error)}</td><td>{_dots(status.history(t.key))}</td></tr>"
        for t in failing
    )
    return (
        f"<h2>Failing ({len(failing)})</h2><table id='failing'><thead><tr>{_WHO}<th>state</th>"
        "<th>failing since</th><th>last success</th><th>error</th><th>last polls</th></tr>"
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _providers(providers: Mapping[str, Mapping[str, Mapping[str, str]]]) -> str:
    out = []
    for provider, accounts in sorted(providers.items()):
        if not accounts:
            continue
        fields = list(next(iter(accounts.values())))
        head = "".join(f"<th>{_e(f)}</th>" for f in fields)
        rows = "".join(
            f"<tr><td>{_e(account)}</td>"
            + "".join(f"<td>{_e(values.get(f, ''))}</td>" for f in fields)
            + "</tr>"
            for account, values in sorted(accounts.items())
        )
        out.append(
            f"<h2>{_e(provider)}: tracking</h2><table id='tracking-{_e(provider)}'><thead><tr>"
            f"<th>account</th>{head}</tr></thead><tbody>{rows}</tbody></table>"
        )
    return "".join(out)


def _budgets(budgets: Sequence[Budget]) -> str:
    if not budgets:
        return ""
    rows = "".join(
        f"<tr class='{'down' if b.paused_for else ''}'><td>{_e(b.provider)}</td>"
        f"<td>{_e(b.account)}</td><td>{b.used} / {b.limit} per {b.period:g}s</td>"
        f"<td>{f'paused by a 429 for {b.paused_for:.0f}s more' if b.paused_for else ''}</td>"
        "</tr>"
        for b in budgets
    )
    return (
        "<h2>Request budgets</h2><table id='budgets'><thead><tr><th>provider</th>"
        f"<th>account</th><th>used</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _targets(healthy: Sequence[TargetState], status: Status) -> str:
    shown = healthy[:MAX_HEALTHY_ROWS]
    rows = "".join(
        f"<tr class='{state(t)}'>{_who(t)}<td>{state(t)}</td>"
        f"<td class='t'>{_ago(t.last_poll, status.now)}</td>"
        f"<td class='num'>{_seconds(t.duration)}</td><td>{_dots(status.history(t.key))}</td>"
        "</tr>"
        for t in shown
    )
    more = (
        f"<p>And {len(healthy) - len(shown)} more targets, all up or not polled yet.</p>"
        if len(healthy) > len(shown)
        else ""
    )
    return (
        f"<h2>Other targets ({len(healthy)})</h2><table id='targets'><thead><tr>{_WHO}"
        "<th>state</th><th>last poll</th><th>took</th><th>last polls</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{more}"
    )


def _who(target: TargetState) -> str:
    key = target.key
    shown = _e(key.target) if key.target else "<i>account</i>"
    return (
        f"<td>{_e(key.provider)}</td><td>{_e(key.account)}</td><td>{_e(key.endpoint)}</td>"
        f"<td>{shown}</td>"
    )


def _dots(polls: Sequence[Poll]) -> str:
    """The newest polls, newest first: a green or red mark each, the details on hover."""
    return "".join(
        f"<span class='dot {'bad' if p.reason else 'ok'}' title='{_clock(p.at)}, "
        f"{_seconds(p.duration)}, {_e(p.reason or 'ok')}'></span>"
        for p in polls
    )


def _clock(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%H:%M:%S UTC")


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, now - moment)
    if seconds < 120:
        age = f"{seconds:.0f}s"
    elif seconds < 7200:
        age = f"{seconds / 60:.0f}m"
    else:
        age = f"{seconds / 3600:.1f}h"
    return f"<span title='{_full(moment)}'>{age} ago</span>"


def _full(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}s"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


_STATES = ("up", "down", "stale", "pending")
_TITLES = {
    "up": "the newest poll succeeded",
    "down": "the newest poll failed",
    "stale": "failing so long that its values left /metrics",
    "pending": "not polled yet",
}
_WHO = "<th>provider</th><th>account</th><th>endpoint</th><th>target</th>"

_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>WhatsApp Delivery Exporter</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em 2em; color: #1d2329; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.meta { color: #555; margin: 0 0 1em; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; }
.card { border: 1px solid #cfd6dd; border-radius: 6px; padding: .5em .9em; min-width: 14em; }
.card.bad { border-color: #d33; background: #fff5f5; }
.card h3 { margin: 0 0 .3em; font-size: 1em; }
.n { margin-right: .8em; white-space: nowrap; } .n.down, .n.stale { color: #b00; }
.n.pending, .n.zero { color: #777; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: .25em .6em; border-bottom: 1px solid #e3e7eb; text-align: left;
  vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; white-space: nowrap; }
td.t, td.num { white-space: nowrap; } td.num { text-align: right; }
td.err { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-word; }
tr.down td, tr.stale td { background: #fff1f0; } tr.pending td { color: #888; }
.ok { color: #1a7f37; }
.dot { display: inline-block; width: .7em; height: .7em; border-radius: 50%; margin-right: 2px; }
.dot.ok { background: #2da44e; } .dot.bad { background: #cf222e; }
#refresh { color: #777; font-size: 12px; }
</style></head>
<body>
<h1>WhatsApp Delivery Exporter <span id="refresh"></span></h1>
"""

_SCRIPT = """<script>
// Fetch the main section again every few seconds; the page itself never reloads.
(function () {
  var stamp = document.getElementById("refresh"), last = Date.now();
  function tick() {
    fetch("/?fragment=1", {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error(r.status); }
      return r.text();
    }).then(function (text) {
      document.getElementById("main").innerHTML = text;
      last = Date.now();
      stamp.textContent = "";
    }).catch(function () {
      stamp.textContent = "(not updated for " + Math.round((Date.now() - last) / 1000) + "s)";
    });
  }
  setInterval(tick, REFRESH);
})();
</script>
"""
