"""Issue #8: every provider (simulators.KITS) against all eleven faults at once, in one real
exporter process.

One fault server (tests/faultserver.py) answers every faulty account by path; each provider's
`refused` one points at a port that is bound but never listens. Beside them one healthy account
per provider polls the project's simulators, so a fault that leaks out of its cell (a blocked
event loop, a log line that cannot be written, memory blown by a 50 MB answer) shows on them, in
the log or in the peak RSS. Every cell is judged and the whole matrix reported, not only the
first failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from simulators import KITS
from tests.conftest import Series, free_port, parse_exposition, require_tool, values, wait_for
from tests.faultserver import DRIP_EVERY, FAULTS, HUGE_BYTES, FaultServer, closed_port

INTERVAL = 2.0  # defaults.interval, and every endpoint's own interval below
WITHIN = 2 * INTERVAL + 1.5  # two poll intervals and a margin, counted from the exporter listening
PEAK_RSS_KB = 256 * 1024
RATE = "100/s"  # far above what the test asks for: no cell may be the budget's doing
EXPECTED = {
    "timeout": "timeout",
    "refused": "connect",
    "auth": "auth",
    "not_found": "not_found",
    "rate_limited": "rate_limited",
    "http_500": "http_5xx",
    "http_502_html": "http_5xx",
    "truncated": "bad_response",
    "wrong_shape": "bad_response",
    "huge": "too_large",
    "drip": "timeout",
}
CELLS = [(provider, fault) for fault in FAULTS for provider in KITS]


def name(provider: str, fault: str) -> str:
    return f"{KITS[provider].matrix.prefix}-{fault}"


def provider_keys(provider: str, account: str, *, healthy: bool) -> dict:
    return KITS[provider].matrix.keys(account, f"{INTERVAL:g}s", healthy)


def config(faults: FaultServer, refused: int, healthy: dict[str, str]) -> str:
    data: dict = {"defaults": {"interval": f"{INTERVAL:g}s", "timeout": "1s"}}
    for provider in KITS:
        accounts = [
            {
                "account": name(provider, "healthy"),
                "base_url": healthy[provider],
                "rate_limit": RATE,
                **provider_keys(provider, name(provider, "healthy"), healthy=True),
            }
        ]
        for fault in FAULTS:
            url = faults.url(fault, provider)
            if fault == "refused":
                url = f"http://127.0.0.1:{refused}/refused/{provider}"
            accounts.append(
                {
                    "account": name(provider, fault),
                    "base_url": url,
                    "rate_limit": RATE,
                    **provider_keys(provider, name(provider, fault), healthy=False),
                }
            )
        data[provider] = accounts
    return yaml.safe_dump(data, sort_keys=False)


def scrape(url: str) -> tuple[str, Series]:
    text = httpx.get(f"{url}/metrics", timeout=3).text
    return text, parse_exposition(text)


def of(series: Series, metric: str, provider: str, account: str, endpoint: str) -> list[float]:
    """The values of one endpoint's samples, whatever their target."""
    found = values(series, metric, provider=provider, account=account, endpoint=endpoint)
    return [v for _, v in found]


def errors_by_reason(series: Series, provider: str, account: str, endpoint: str) -> dict:
    found = values(
        series,
        "whatsapp_exporter_poll_errors_total",
        provider=provider,
        account=account,
        endpoint=endpoint,
    )
    return {labels["reason"]: int(v) for labels, v in found if v > 0}


def judge(series: Series, provider: str, fault: str) -> str | None:
    """None when every endpoint of the cell's account is down with the expected reason; else
    what was seen instead, endpoint by endpoint."""
    account, expected = name(provider, fault), EXPECTED[fault]
    seen = []
    for endpoint in KITS[provider].matrix.endpoints:
        ups = of(series, "whatsapp_exporter_up", provider, account, endpoint)
        errors = errors_by_reason(series, provider, account, endpoint)
        if ups and not any(ups) and errors.get(expected, 0) > 0:
            continue
        up = "no up series" if not ups else "up=" + ",".join(f"{v:g}" for v in ups)
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(errors.items())) or "no errors"
        seen.append(f"{endpoint}: {up}; {reasons}")
    return "; ".join(seen) or None


def healthy_problems(series: Series) -> list[str]:
    problems = []
    for provider, kit in KITS.items():
        account = name(provider, "healthy")
        for endpoint in kit.matrix.endpoints:
            ups = of(series, "whatsapp_exporter_up", provider, account, endpoint)
            errors = errors_by_reason(series, provider, account, endpoint)
            if not ups or any(v != 1 for v in ups):
                problems.append(f"{account} {endpoint}: up={','.join(f'{v:g}' for v in ups)}")
            if errors:
                problems.append(f"{account} {endpoint}: poll errors {errors}")
    return problems


def last_successes(series: Series) -> dict[tuple[str, str], float]:
    """The newest success per healthy account and endpoint."""
    metric = "whatsapp_exporter_last_success_timestamp_seconds"
    return {
        (account, endpoint): max(of(series, metric, provider, account, endpoint), default=0.0)
        for provider, kit in KITS.items()
        for account in [name(provider, "healthy")]
        for endpoint in kit.matrix.endpoints
    }


def settle(problems_now: Callable[[], list[str]], seconds: float = WITHIN) -> list[str]:
    """Poll until no problem is left or `seconds` have passed; the problems last seen."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            problems = problems_now()
        except (httpx.HTTPError, ValueError) as exc:
            problems = [f"/metrics failed: {type(exc).__name__}: {exc}"]
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.1)


def hand_in(url: str, account: str, request_id: str) -> None:
    response = httpx.post(
        f"{url}/api/v1/requests",
        json={"account": account, "request_ids": [request_id]},
        headers={"Authorization": f"Bearer ingest-{account}"},
        timeout=5,
    )
    assert response.status_code == 202, f"hand-in to {account}: {response.text}"


def peak_rss_kb(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        return int(match[1]) if match else None
    return None


def last_log_line(log: str, account: str) -> str | None:
    lines = [line for line in log.splitlines() if f"account={account} " in line]
    return lines[-1][:300] if lines else None


def render(results: dict[tuple[str, str], str | None], log: str) -> str:
    width = max(len(f) for f in FAULTS) + 2
    rows = ["fault".ljust(width) + "".join(p.ljust(11) for p in KITS)]
    for fault in FAULTS:
        cells = ("ok" if results[p, fault] is None else "FAIL" for p in KITS)
        rows.append(fault.ljust(width) + "".join(c.ljust(11) for c in cells))
    ok = sum(problem is None for problem in results.values())
    rows.append(f"{ok}/{len(CELLS)} cells ok")
    for provider, fault in CELLS:
        problem = results[provider, fault]
        if problem is not None:
            rows.append(f"  {provider} x {fault} (want {EXPECTED[fault]}): {problem}")
            line = last_log_line(log, name(provider, fault))
            if line:
                rows.append(f"      last log: {line}")
    return "\n".join(rows)


def after_the_matrix(url: str, promtool: str) -> list[str]:
    """The healthy accounts (up, no errors, fresh values while the faults go on) and the
    exposition as a whole."""
    failures = [f"healthy: {p}" for p in settle(lambda: healthy_problems(scrape(url)[1]))]
    before_text, before = scrape(url)
    first = last_successes(before)
    stale = settle(
        lambda: [
            f"{account} {endpoint}"
            for (account, endpoint), newest in last_successes(scrape(url)[1]).items()
            if newest <= first[account, endpoint]
        ]
    )
    if stale:
        failures.append(f"healthy: no new success within {WITHIN:g}s: {', '.join(stale)}")
    text, _ = scrape(url)  # parsed by prometheus_client's parser, or ValueError
    if text == before_text:
        failures.append("/metrics served the same bytes twice, intervals apart")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    if check.returncode != 0 or check.stdout + check.stderr:
        output = (check.stdout + check.stderr).decode(errors="replace")[:2000]
        failures.append(f"promtool check metrics (exit {check.returncode}): {output}")
    return failures


@pytest.mark.processes
def test_every_provider_reports_every_fault_and_stays_healthy_beside_them(tmp_path):
    promtool = require_tool("promtool", "prometheus")
    began = time.monotonic()
    failures: list[str] = []
    results: dict[tuple[str, str], str | None] = {}
    with contextlib.ExitStack() as stack:
        faults = stack.enter_context(FaultServer())
        refused = stack.enter_context(closed_port())
        sims = {name: kit.simulator(seed=1, **kit.quick) for name, kit in KITS.items()}
        for sim in sims.values():
            stack.enter_context(sim)
        path = tmp_path / "config.yaml"
        path.write_text(config(faults, refused, {p: s.base_url for p, s in sims.items()}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "exporter.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    f"--config.file={path}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    f"--storage.path={tmp_path / 'ledger.db'}",
                    "--log.format=logfmt",
                ],
                cwd=tmp_path,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        stack.callback(lambda: process.poll() is None and process.kill())

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the exporter exited: {log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/-/healthy", timeout=1).status_code == 200
            return False

        wait_for(listening, 20, "the exporter to listen")
        started = time.monotonic()
        for provider in (p for p, kit in KITS.items() if kit.matrix.hand_in):
            for fault in FAULTS:
                hand_in(url, name(provider, fault), str(uuid.uuid4()))
            hand_in(url, name(provider, "healthy"), sims[provider].send())

        # the matrix: poll until every cell showed its fault, or two intervals have passed
        pending = set(CELLS)
        last: dict[tuple[str, str], str] = dict.fromkeys(CELLS, "never scraped")
        scrape_errors: list[str] = []
        while pending and time.monotonic() < started + WITHIN:
            try:
                _, series = scrape(url)
            except (httpx.HTTPError, ValueError) as exc:
                scrape_errors.append(f"{type(exc).__name__}: {exc}")
            else:
                for cell in list(pending):
                    problem = judge(series, *cell)
                    if problem is None:
                        results[cell] = None
                        pending.discard(cell)
                    else:
                        last[cell] = problem
            time.sleep(0.1)
        for cell in pending:
            problem = last[cell]
            if cell[1] != "refused" and not faults.seen[cell[1], cell[0]]:
                problem += " (the fault server saw no request for this cell)"
            results[cell] = problem
        matrix_took = time.monotonic() - started
        if scrape_errors:
            failures.append(
                f"/metrics failed {len(scrape_errors)} times during the matrix, last: "
                f"{scrape_errors[-1]}"
            )

        try:
            failures += after_the_matrix(url, promtool)
        except (httpx.HTTPError, ValueError) as exc:
            failures.append(f"/metrics unreachable or unparsable: {type(exc).__name__}: {exc}")

        peak = peak_rss_kb(process.pid)
        if peak is None:
            failures.append(f"no VmHWM in /proc/{process.pid}/status")
        elif peak >= PEAK_RSS_KB:
            failures.append(f"peak RSS (VmHWM) {peak} kB, the limit is {PEAK_RSS_KB} kB")
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(5)
            failures.append("the exporter did not stop within 15s of SIGTERM")
        if code not in (0, -signal.SIGKILL):
            failures.append(f"the exporter exited with {code}")
        # the server must notice the hang-ups itself: a hung or dripping answer ends with its client
        with contextlib.suppress(AssertionError):
            wait_for(lambda: faults.open_connections() == 0, 3, "hang-ups")
        if faults.open_connections():
            failures.append(
                f"fault server (a harness bug): {faults.open_connections()} connections still "
                "open 3s after the exporter exited"
            )
        lingering = faults.stop()
        if lingering:
            failures.append(f"fault server: {len(lingering)} handler(s) alive after stop")
        failures += [f"fault server (a harness bug): {e}" for e in faults.errors]

    log = log_path.read_text(errors="replace")
    if "Traceback" in log:
        at = log.index("Traceback")
        failures.append(f"a traceback in the exporter's log:\n{log[max(0, at - 300) : at + 2000]}")
    ok = sum(problem is None for problem in results.values())
    report = render(results, log)
    took = time.monotonic() - began
    peak_text = f"{peak / 1024:.0f} MiB" if peak else "unknown"
    summary = (
        f"{report}\nmatrix judged after {matrix_took:.1f}s (limit {WITHIN:g}s); peak RSS "
        f"{peak_text}; the test took {took:.1f}s"
    )
    print(summary)
    assert ok == len(CELLS) and not failures, "\n".join([summary, *failures])


@pytest.mark.slow
def test_the_fault_server_serves_each_fault_as_described():
    """When a cell fails, this says whether the harness or the exporter is to blame."""
    statuses = {"not_found": 404, "rate_limited": 429, "http_500": 500, "http_502_html": 502}
    with FaultServer() as faults, httpx.Client(timeout=5) as client:
        for provider, kit in KITS.items():
            method, path = kit.probe.method, kit.probe.path
            for fault, status in statuses.items():
                answer = client.request(method, faults.url(fault, provider) + path, json={})
                assert answer.status_code == status, (provider, fault)
            assert client.get(faults.url("rate_limited", provider)).headers["retry-after"] == "1"
            html = client.get(faults.url("http_502_html", provider))
            assert html.headers["content-type"] == "text/html"
            auth = client.request(method, faults.url("auth", provider) + path)
            assert auth.status_code in (401, 403), provider
            cut = client.request(method, faults.url("truncated", provider) + path)
            assert cut.status_code == 200 and int(cut.headers["content-length"]) == len(cut.content)
            with pytest.raises(ValueError):
                cut.json()
            shape = client.request(method, faults.url("wrong_shape", provider) + path)
            assert "\\ud800" in shape.text and shape.json()
            size = 0
            with client.stream(method, faults.url("huge", provider) + path) as huge:
                for chunk in huge.iter_raw():
                    size += len(chunk)
            assert size == HUGE_BYTES, provider
        assert {kit.faults.auth[0] for kit in KITS.values()} == {401, 403}

        began = time.monotonic()
        with client.stream("GET", faults.url("drip", "d7") + "/x") as drip:
            raw = drip.iter_raw(1)
            first = next(raw) + next(raw) + next(raw)
        assert first == b'{"s' and time.monotonic() - began >= 2 * DRIP_EVERY
        with pytest.raises(httpx.ReadTimeout):
            client.get(faults.url("timeout", "kaleyra") + "/x", timeout=0.5)
        client.close()
        wait_for(lambda: faults.open_connections() == 0, 3, "hung connections to close")
    assert not faults.errors
    with closed_port() as port, pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/refused/d7/x", timeout=1)
