"""Alert and recording rules: what the mixin writes, valid, unit-tested with promtool, and each
with a runbook."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mixin.__main__ import rendered
from mixin.config import RUNBOOKS, Config
from tests.conftest import ROOT, alerts, github_anchor, require_tool

PROMETHEUS = ROOT / "prometheus"
RUNBOOK_FILE = ROOT / "docs" / "runbooks.md"


def test_the_rule_files_are_what_the_mixin_writes():
    files = rendered(Config())
    for name in ("rules.yml", "alerts.yml"):
        path = Path("prometheus") / name
        assert (ROOT / path).read_text() == files[path], f"{path}: run python -m mixin"


@pytest.mark.processes
def test_rules_are_valid():
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", "rules.yml", "alerts.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.processes
def test_every_alert_passes_its_promtool_unit_tests():
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", "tests/alerts_test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_case_and_a_quiet_case():
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in alerts()}
    for test in tests:
        # a near miss: some input series of the test must not be among the firing ones
        firing = [
            a["exp_labels"]
            for c in test.get("alert_rule_test", [])
            for a in c.get("exp_alerts") or []
        ]
        assert len(test["input_series"]) > len(firing), test["name"]


def test_every_rule_group_is_in_the_unit_tests_evaluation_order():
    """Recording rules first (the shared ones, then the SLO's, which read nothing of them), so
    an alert reads this evaluation's values, not the previous one's."""
    order = yaml.safe_load((PROMETHEUS / "tests" / "alerts_test.yml").read_text())
    groups = [
        group["name"]
        for name in ("rules.yml", "alerts.yml")
        for group in yaml.safe_load((PROMETHEUS / name).read_text())["groups"]
    ]
    assert order["group_eval_order"] == groups


def test_alerts_follow_the_mixin_conventions_and_have_runbooks():
    headings = re.findall(r"^## (.+)$", RUNBOOK_FILE.read_text(), flags=re.M)
    anchors = {github_anchor(h): h for h in headings}
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"WhatsApp[A-Z][A-Za-z0-9]+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name
        assert name in headings, f"docs/runbooks.md has no section ## {name}"
        base, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert base == RUNBOOKS and anchors.get(anchor) == name, rule["annotations"]
    assert sorted(anchors.values()) == sorted(rule["alert"] for rule in alerts())


def test_github_anchor():
    assert github_anchor("WhatsAppExporterDown") == "whatsappexporterdown"
    assert github_anchor("What the D7 ratio means (and why)") == "what-the-d7-ratio-means-and-why"


def test_alerts_about_a_device_outlive_a_flap_and_a_change_of_replica():
    """A device's or account's alert keeps only what it is about (not `instance`), and a flapping
    phone pages once."""
    rules = {rule["alert"]: rule for rule in alerts()}
    assert rules["WhatsAppDeviceDisconnected"]["keep_firing_for"] == "10m"
    for name, rule in rules.items():
        if name in {"WhatsAppExporterDown", "WhatsAppConfigReloadFailed"}:
            continue
        # every raw series is aggregated by what it is about (recording rules already are)
        for raw in re.finditer(r"whatsapp_\w+\{", rule["expr"]):
            before = rule["expr"][: raw.start()]
            assert re.search(r"\b(max|min|sum) by \([^)]*\) \($", before), (name, raw[0])


def test_burn_rate_alerts_follow_the_workbook():
    rules = {rule["alert"]: rule for rule in alerts()}
    fast = rules["WhatsAppDeliveryErrorBudgetFastBurn"]
    slow = rules["WhatsAppDeliveryErrorBudgetSlowBurn"]
    assert fast["labels"]["severity"] == "critical" and slow["labels"]["severity"] == "warning"
    for rule, windows, factor in ((fast, ("1h", "5m"), "14.4"), (slow, ("6h", "30m"), "6")):
        for window in windows:
            assert f"whatsapp:delivery_error:ratio_rate{window} >" in rule["expr"]
        assert rule["expr"].count(f"({factor} * (1 - whatsapp:delivery_success:objective))") == 2
