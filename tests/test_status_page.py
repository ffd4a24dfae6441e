"""The status page as a person sees it: rendered by headless Chromium from Debian, with one failing
and one healthy account; the DOM is asserted on, and a 1280x800 screenshot is kept as a test
artefact in test-artifacts/status-page.png."""

from __future__ import annotations

import re
import subprocess
import tempfile

import httpx
import pytest

from simulators import BetatelSimulator, Fault, KaleyraSimulator
from tests.conftest import ROOT, require_tool, run_exporter, wait_for

pytestmark = pytest.mark.processes  # headless Chromium

ARTIFACTS = ROOT / "test-artifacts"
NUMBER = "+12025550100"


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = require_tool("chromium", "chromium")
    profile = tempfile.mkdtemp(prefix="chromium-")
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )


def test_the_status_page_in_a_browser_puts_the_failing_target_first(tmp_path):
    with (
        KaleyraSimulator(numbers=[NUMBER]) as kaleyra,
        BetatelSimulator() as betatel,
    ):
        betatel.fail("stats", Fault.status(401))
        config = f"""
kaleyra:
  - {{account: main, base_url: "{kaleyra.base_url}", numbers: ["{NUMBER}"]}}
betatel:
  - {{account: eu, base_url: "{betatel.base_url}", api_key: k, account_id: a, windows: [today]}}
"""
        with run_exporter(config) as running:
            wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "ready")
            dom = chromium("--dump-dom", f"{running.url}/")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            shot.unlink(missing_ok=True)
            chromium("--window-size=1280,800", f"--screenshot={shot}", f"{running.url}/")
            fragment = httpx.get(f"{running.url}/?fragment=1").text
            config_view = httpx.get(f"{running.url}/config").text

    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    html = dom.stdout.decode()
    failing = re.search(r"<table id=\"failing\">.*?</table>", html, re.S)
    assert failing, "no table of failing targets"
    rows = re.findall(r"<tr class=\"(\w+)\">(.*?)</tr>", failing.group(0), re.S)
    assert [cls for cls, _ in rows] == ["down"]
    assert "<td>betatel</td><td>eu</td><td>stats</td><td>today</td>" in rows[0][1]
    assert "auth: HTTP 401" in rows[0][1]
    # per-provider counts, the healthy number among the other targets, its last polls
    summary = re.search(r"<section class=\"cards\" id=\"summary\">(.*?)</section>", html, re.S)
    assert summary and "1 down" in summary.group(1) and "1 up" in summary.group(1)
    targets = re.search(r"<table id=\"targets\">(.*?)</table>", html, re.S)
    assert targets and NUMBER in targets.group(1) and "dot ok" in targets.group(1)
    assert 'id="budgets"' in html
    # the script that refreshes it, and the fragment it fetches, which is the same section
    assert 'fetch("/?fragment=1"' in html
    assert "id='failing'" in fragment and "<html" not in fragment
    # /config shows the running config with its secrets hidden
    assert "api_key: <secret>" in config_view and "account_id: <secret>" in config_view
    assert shot.exists() and shot.stat().st_size > 10_000
