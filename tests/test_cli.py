"""The command as an operator runs it: a real process, real signals, real ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from simulators import KITS
from simulators.whatsgate import WhatsGateSimulator
from tests.conftest import free_port, parse_exposition, require_tool, scrape, value, wait_for

IDENTITY = {"Accept-Encoding": "identity"}

pytestmark = pytest.mark.processes  # every test runs `python -m exporter`


def start(*args: str, cwd: Path | None = None, log: Path | None = None) -> subprocess.Popen:
    """Runs in a fresh directory unless told otherwise: the ledger file lands there. With a
    `log`, its output goes to that file (read while it runs) instead of a pipe."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(log.open("wb")) if log else subprocess.PIPE
        return subprocess.Popen(
            [sys.executable, "-m", "exporter", *args],
            cwd=cwd or tempfile.mkdtemp(prefix="exporter-cwd-"),
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str, float]:
    began = time.monotonic()
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=15)
    return process.returncode, stderr, time.monotonic() - began


def test_demo_shows_live_metrics_of_every_provider_within_10s_and_stops_on_sigterm():
    promtool = require_tool("promtool", "prometheus")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    process = start("--demo", f"--web.listen-address=127.0.0.1:{port}")
    try:
        wanted = {name: kit.demo.metric for name, kit in KITS.items()}

        def every_provider() -> dict | None:
            series = scrape(url)
            if series and all(value_of(series, m) for m in wanted.values()):
                return series
            return None

        first = wait_for(every_provider, 10, "metrics of every provider")
        assert time.monotonic() - began < 10
        assert value(first, "whatsapp_exporter_up", provider="d7", endpoint="report") == 1
        wait_for(lambda: scrape(url) != first, 10, "values to change")
        text = httpx.get(f"{url}/metrics").text
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
        )
        assert check.returncode == 0 and check.stdout + check.stderr == b"", check
    finally:
        code, stderr, took = stop(process)
    assert code == 0
    assert took < 5
    assert "Traceback" not in stderr
    assert f"http://localhost:{port}/metrics" in stderr


def value_of(series: dict, name: str) -> bool:
    return any(n == name for n, _ in series)


def test_sighup_reloads_the_config_file(tmp_path):
    with WhatsGateSimulator(devices=1, auto=False) as sim:
        port = free_port()
        config = tmp_path / "config.yaml"
        first = "kaleyra: [{account: k, base_url: 'http://127.0.0.1:9', numbers: ['+12025550100']}]"
        first += "\n"
        config.write_text(first)
        process = start(f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: scrape(url) is not None, 10, "the exporter to listen")
            config.write_text(
                first
                + f"whatsgate:\n  - {{account: a, base_url: '{sim.base_url}', token: demo-token}}\n"
            )
            process.send_signal(signal.SIGHUP)
            wait_for(
                lambda: (
                    value(scrape(url) or {}, "whatsapp_device_connected", account="a") is not None
                ),
                10,
                "the reloaded account's metrics",
            )
        finally:
            code, stderr, _ = stop(process, signal.SIGINT)
    assert code == 0
    assert "config reloaded" in stderr


SIGHUPS = 8


def test_a_sighup_reload_is_on_metrics_when_it_is_logged(tmp_path):
    """Whoever sends SIGHUP and waits for the log line checks /metrics next: the reload's
    result is published before it is logged. The publication once followed the log line by up
    to its coalescing delay, which starts with every publication: each SIGHUP is sent right
    after one (polls publish every second)."""
    with WhatsGateSimulator(devices=2, auto=True, tick=0.2) as sim:
        port = free_port()
        config = tmp_path / "config.yaml"
        good = (
            "defaults: {interval: 1s, timeout: 1s}\n"
            f"whatsgate:\n  - {{account: a, base_url: '{sim.base_url}', token: demo-token,\n"
            "      balance: {interval: 1s}, failed_numbers: {interval: 1s}}\n"
        )
        config.write_text(good)
        log = tmp_path / "exporter.log"
        address = f"--web.listen-address=127.0.0.1:{port}"
        process = start(f"--config.file={config}", address, cwd=tmp_path, log=log)
        url = f"http://127.0.0.1:{port}"
        # one client, kept: a new one costs tens of ms (its TLS context), longer than the race
        client = httpx.Client(timeout=5, headers=IDENTITY)
        try:
            wait_for(lambda: scrape(url) is not None, 10, "the exporter to listen")
            wait_for(lambda: httpx.get(f"{url}/-/ready").status_code == 200, 15, "readiness")
            for attempt in range(SIGHUPS):
                ok = attempt % 2 == 1
                said = "config reloaded" if ok else "reload failed"
                before = log.read_text().count(said)
                config.write_text(good if ok else good + "bogus: 1\n")
                first = client.get(f"{url}/metrics").content
                deadline = time.monotonic() + 10
                while client.get(f"{url}/metrics").content == first:
                    assert time.monotonic() < deadline, "no publication within 10 s"
                process.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while log.read_text().count(said) == before:
                    assert time.monotonic() < deadline, f"no {said!r} after SIGHUP {attempt}"
                    time.sleep(0.002)
                series = parse_exposition(client.get(f"{url}/metrics").text)
                shown = value(series, "whatsapp_exporter_config_last_reload_successful")
                assert shown == float(ok), f"SIGHUP {attempt}: {shown}"
        finally:
            client.close()
            code, _, _ = stop(process)
    assert code == 0


def test_json_logs_are_one_object_a_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("whatsgate:\n  - {account: a, base_url: 'http://127.0.0.1:9', token: t}\n")
    port = free_port()
    process = start(
        f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}", "--log.format=json"
    )
    wait_for(
        lambda: value(scrape(f"http://127.0.0.1:{port}") or {}, "whatsapp_exporter_up") == 0,
        10,
        "the first poll to fail",
    )
    code, stderr, _ = stop(process)
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert code == 0
    failed = [line for line in lines if line["msg"] == "poll failed"]
    assert failed and failed[0]["reason"] == "connect" and failed[0]["level"] == "warn"
    assert all({"ts", "level", "msg"} <= set(line) for line in lines)
    assert "t" not in {line.get("token") for line in lines}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--web.listen-address=nope"], 2, "--web.listen-address 'nope': expected host:port"),
        (["--log.level=loud"], 2, "invalid choice: 'loud'"),
        (["--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_are_messages(args, code, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_message_and_exit_1(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("whatsgate:\n  - {account: a, base_url: 'http://127.0.0.1:9', token: t}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                f"--config.file={config}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
