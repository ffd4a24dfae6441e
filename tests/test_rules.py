"""Alert and recording rules: valid, unit-tested with promtool, and each documented."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.conftest import ROOT, require_tool

PROMETHEUS = ROOT / "prometheus"


def alerts() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


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
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in alerts()}
    for test in tests:
        # a near miss: some input series of the test must not be among the firing ones
        firing = [
            a["exp_labels"] for c in test["alert_rule_test"] for a in c.get("exp_alerts") or []
        ]
        assert len(test["input_series"]) > len(firing), test["name"]


def test_alerts_follow_the_mixin_conventions_and_have_runbooks():
    readme = (ROOT / "README.md").read_text()
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"WhatsApp[A-Z][A-Za-z0-9]+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert f"### {name}" in readme, f"README.md has no runbook for {name}"
