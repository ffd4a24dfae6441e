"""The bundled Grafana dashboards (mixin/dashboards/ -> grafana/dashboards/*.json).

The committed JSON is what `python -m mixin` writes; every dashboard is portable (a `datasource`
variable, no data source uid of its own) and filters by job, instance, provider and account
wherever a series has those labels; every query parses (promtool) and reads only metrics and
labels the exporter exposes: those of the golden expositions, of the Kaleyra client's stats as
the exporter translates them, the exporter's own families, and the recording rules.
tests/test_e2e.py runs every query against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
import yaml

from exporter.providers.kaleyra import monitor_stats, translate
from mixin import dashboards as mixin_boards
from simulators import KITS
from simulators.kaleyra import KaleyraSimulator
from tests.conftest import GOLDEN, ROOT, parse_exposition, require_tool

GRAFANA = ROOT / "grafana"
DS = {"type": "prometheus", "uid": "${datasource}"}
# file -> the provider it is fixed to (None: it has a `provider` variable; a regex: those)
BOARDS = {
    "whatsapp-overview.json": None,
    "whatsapp-exporter.json": None,
    "whatsapp-slo.json": "d7|whatsgate|betatel|meta",
    **{f"{kit.dashboard}.json": name for name, kit in KITS.items()},
}
FILTERS = ("job", "instance", "provider", "account")
VARIABLES = {*FILTERS, "__rate_interval", "__interval", "__range"}
# what tests/test_e2e.py puts in their place
VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    **dict.fromkeys(FILTERS, ".*"),
}
# The exporter's own families, which no golden file holds (README's metric table): their labels
# besides job and instance. tests/test_e2e.py proves each has data from the real exporter.
OWN = {
    "up": set(),
    "whatsapp_exporter_http_requests_total": {"handler", "code"},
    "whatsapp_exporter_leader": {"shard"},
    "whatsapp_exporter_publish_duration_seconds": set(),
    "whatsapp_exporter_publications_total": set(),
    "whatsapp_exporter_exposition_bytes": set(),
    "whatsapp_exporter_event_loop_lag_seconds": set(),
    "whatsapp_exporter_requests_held_total": set(),
    "whatsapp_exporter_last_webhook_timestamp_seconds": {"provider", "account"},
    "whatsapp_tracking_ids_total": {"provider", "account", "result"},
    "whatsapp_tracking_webhook_events_total": {"provider", "account"},
    "whatsapp_tracking_problems_total": {"provider", "account", "problem"},
    "process_resident_memory_bytes": set(),
    "process_cpu_seconds_total": set(),
}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
SELECTOR = re.compile(r"(?<![\w:])(whatsapp[\w:]*|process_\w+|up)(?![\w:])(\{[^}]*\})?")
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
BY = re.compile(r"\bby \(([^)]*)\)")


def board(name: str) -> dict:
    return json.loads((GRAFANA / "dashboards" / name).read_text(encoding="utf-8"))


def panels(dashboard: dict) -> list[dict]:
    return [p for p in mixin_boards.all_panels(dashboard) if p.get("type") != "row"]


def substitute(expr: str) -> str:
    return VARIABLE.sub(lambda m: VALUES.get(m.group(1) or m.group(2), m.group(0)), expr)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every (path, dict) in a JSON document."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


# --- what the exporter exposes ------------------------------------------------------------------


def _kaleyra_series() -> dict[str, set[str]]:
    """Names and labels of the simulated client's stats (every shape) as the exporter names them."""
    found: dict[str, set[str]] = {}
    for shape in ({}, {"client_version": "old"}, {"multinode": True}):
        simulator = KaleyraSimulator(**shape)
        for number, payload in simulator.state()["numbers"].items():
            for family in translate(number, monitor_stats({"data": {"stats": payload}})):
                for sample in family.samples:
                    labels = {name for name, _ in sample.labels} | {"provider", "account"}
                    found.setdefault(family.name + sample.suffix, set()).update(labels)
    return found


@cache
def exposed() -> dict[str, frozenset[str]]:
    """Sample name -> label names, for every series a dashboard may read."""
    found: dict[str, set[str]] = {}
    for path in sorted(GOLDEN.glob("*.prom")):
        for name, labels in parse_exposition(path.read_text()):
            found.setdefault(name, set()).update(label for label, _ in labels)
    for name, labels in [*_kaleyra_series().items(), *OWN.items()]:
        found.setdefault(name, set()).update(labels)
    for labels in found.values():
        labels.update({"job", "instance"})  # Prometheus' target labels
    for rule in recording_rules():
        # what it aggregates by, else (a ratio of rules) the labels of what it reads
        by = {label.strip() for group in BY.findall(rule["expr"]) for label in group.split(",")}
        read = (found.get(m, set()) for m, _ in SELECTOR.findall(rule["expr"]))
        labels = by or set().union(*read)
        found.setdefault(rule["record"], set()).update(labels, rule.get("labels", {}))
    return {name: frozenset(labels) for name, labels in found.items()}


@cache
def recording_rules() -> list[dict]:
    rules = yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "record" in rule]


# --- the generator ------------------------------------------------------------------------------


def run_generator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mixin", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.processes
def test_the_committed_json_is_what_the_generator_writes():
    result = run_generator("--check")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json")) == sorted(BOARDS)
    assert sorted(mixin_boards.BOARDS) == sorted(BOARDS)


@pytest.mark.processes
def test_check_fails_on_a_changed_missing_or_unknown_file(tmp_path):
    out = ["--out", str(tmp_path)]
    folder = tmp_path / "grafana" / "dashboards"
    assert run_generator(*out).returncode == 0
    assert run_generator("--check", *out).returncode == 0

    changed = folder / "whatsapp-overview.json"
    changed.write_text(changed.read_text().replace("Polled targets", "Polled"))
    result = run_generator("--check", *out)
    assert result.returncode == 1
    assert "whatsapp-overview.json" in result.stderr
    assert "python -m mixin" in result.stderr

    assert run_generator(*out).returncode == 0
    (folder / "whatsapp-d7-delivery.json").unlink()
    assert run_generator("--check", *out).returncode == 1

    assert run_generator(*out).returncode == 0
    shutil.copy(changed, folder / "old-board.json")
    result = run_generator("--check", *out)
    assert result.returncode == 1 and "old-board.json" in result.stderr


@pytest.mark.processes
def test_another_selector_and_objective_reach_every_file(tmp_path):
    """A deployment whose job is called otherwise renders its own copy; the committed one is
    untouched."""
    result = run_generator(
        "--out", str(tmp_path), "--selector", 'job="wa"', "--objective", "d7=0.995"
    )
    assert result.returncode == 0, result.stderr
    rules = (tmp_path / "prometheus" / "rules.yml").read_text()
    alerts = (tmp_path / "prometheus" / "alerts.yml").read_text()
    assert 'job="whatsapp"' not in rules + alerts
    assert 'whatsapp_device_connected{job="wa"}' in alerts
    assert 'absent(up{job="wa"})' in alerts
    assert "vector(0.995)" in rules and "vector(0.99)" in rules
    overview = json.loads((tmp_path / "grafana/dashboards/whatsapp-overview.json").read_text())
    job = next(v for v in overview["templating"]["list"] if v["name"] == "job")
    assert job["definition"] == 'label_values(whatsapp_exporter_build_info{job="wa"}, job)'


def test_panel_queries_reach_into_rows():
    dashboard = {
        "panels": [
            {"type": "row", "title": "r", "panels": [{"title": "in", "targets": [{"expr": "a"}]}]},
            {"type": "stat", "title": "out", "targets": [{"expr": "b"}, {"refId": "C"}]},
        ]
    }
    assert mixin_boards.panel_queries(dashboard) == [("in", "a"), ("out", "b")]


# --- each dashboard -----------------------------------------------------------------------------

each_board = pytest.mark.parametrize("name", sorted(BOARDS))


def test_uids_are_stable_and_unique():
    uids = {name: board(name)["uid"] for name in BOARDS}
    assert uids == {name: name.removesuffix(".json") for name in BOARDS}


@each_board
def test_dashboard_basics(name):
    dashboard = board(name)
    assert dashboard["title"].startswith("WhatsApp: ")
    assert dashboard["description"]
    assert 38 <= dashboard["schemaVersion"] <= 41
    assert "whatsapp" in dashboard["tags"]
    # Meta's board shows what it polls and what its webhooks push: about twice a board's share
    assert 6 <= len(panels(dashboard)) <= 24
    ids = [p["id"] for p in mixin_boards.all_panels(dashboard)]
    assert len(ids) == len(set(ids))


@each_board
def test_variables(name):
    variables = {v["name"]: v for v in board(name)["templating"]["list"]}
    provider = BOARDS[name]
    assert list(variables) == ["datasource", *FILTERS]
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    # job and instance: "All" is every value listed, never `.*` (another job's process_*)
    assert variables["job"]["definition"] == (
        'label_values(whatsapp_exporter_build_info{job="whatsapp"}, job)'
    )
    assert 'job=~"$job"' in variables["instance"]["definition"]
    for label in ("job", "instance"):
        assert "allValue" not in variables[label]
    for label in FILTERS:
        variable = variables[label]
        assert variable["type"] == "query"
        assert variable["datasource"] == DS
        assert re.fullmatch(
            rf"label_values\(whatsapp_\w+(\{{.*\}})?, {label}\)", variable["definition"]
        )
        assert variable["query"]["query"] == variable["definition"]
        assert variable["includeAll"] is True
        assert variable["multi"] is True
    for label in ("provider", "account"):
        assert 'job=~"$job", instance=~"$instance"' in variables[label]["definition"]
    assert 'provider=~"$provider"' in variables["account"]["definition"]
    assert variables["account"]["allValue"] == ".*"
    if provider is None or "|" in provider:
        assert variables["provider"]["allValue"] == ".*"
        if provider:
            assert f'provider=~"{provider}"' in variables["provider"]["definition"]
    else:
        # a provider's dashboard: its provider variable offers that provider alone, "All" too
        assert f'provider="{provider}"' in variables["provider"]["definition"]
        assert variables["provider"]["allValue"] == provider


@each_board
def test_no_data_source_but_the_variable(name):
    dashboard = board(name)
    for path, node in walk(dashboard):
        if "datasource" in node:
            assert node["datasource"] == DS, path
        if path and "uid" in node:
            assert node["uid"] == "${datasource}", path


@each_board
def test_every_panel_has_a_unit_a_description_and_queries(name):
    for panel in panels(board(name)):
        title = panel["title"]
        assert title
        assert len(panel["description"]) >= 80, f"{title}: say what it means and what to do"
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["datasource"] == DS, title
        assert panel["targets"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for query in panel["targets"]:
            assert query["datasource"] == DS, title
            assert query["expr"].strip(), title


@each_board
def test_panels_fit_the_grid_without_overlapping(name):
    taken: set[tuple[int, int]] = set()
    for panel in mixin_boards.all_panels(board(name)):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] >= 1 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@each_board
def test_queries_use_only_the_variables_the_e2e_test_substitutes(name):
    for title, expr in mixin_boards.panel_queries(board(name)):
        used = {a or b for a, b in VARIABLE.findall(expr)}
        assert used <= VARIABLES, f"{title}: {used - VARIABLES}"


@each_board
def test_queries_read_only_exposed_metrics_and_labels(name):
    known = exposed()
    for title, expr in mixin_boards.panel_queries(board(name)):
        for metric, matchers in SELECTOR.findall(expr):
            assert metric in known, f"{title}: {metric} is not exposed"
            for label, _, _ in MATCHER.findall(matchers):
                assert label in known[metric], f"{title}: {metric} has no label {label}"


@each_board
def test_every_selector_filters_by_each_variable_its_series_has(name):
    """job and instance tell an HA pair or two exporters apart; recording rules have neither
    (they aggregate over replicas), process-level series have no provider or account."""
    known = exposed()
    for title, expr in mixin_boards.panel_queries(board(name)):
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: reads no whatsapp series: {expr}"
        for metric, matchers in selectors:
            assert matchers, f"{title}: {metric} without a selector"
            found = {f'{label}{op}"{value}"' for label, op, value in MATCHER.findall(matchers)}
            for label in FILTERS:
                if label in known[metric]:
                    assert f'{label}=~"${label}"' in found, f"{title}: {metric}{matchers}"


@each_board
def test_firing_alerts_are_annotations(name):
    (annotation,) = board(name)["annotations"]["list"]
    assert annotation["datasource"] == DS and annotation["enable"] is True
    assert 'ALERTS{alertstate="firing"' in annotation["expr"]
    assert 'provider=~"$provider|"' in annotation["expr"]  # and alerts about no provider


@each_board
def test_links_reach_the_other_dashboards(name):
    dashboard = board(name)
    (dropdown,) = dashboard["links"]
    assert dropdown["type"] == "dashboards" and dropdown["tags"] == ["whatsapp"]
    assert dropdown["includeVars"] and dropdown["keepTime"]
    uids = {n.removesuffix(".json") for n in BOARDS}
    for panel in mixin_boards.all_panels(dashboard):
        for link in panel.get("links", []):
            uid = re.fullmatch(r"/d/([\w-]+)\?.*", link["url"]).group(1)
            assert uid in uids, f"{panel['title']}: {link['url']}"
            assert "${job:queryparam}" in link["url"], link["url"]


def test_the_overview_links_to_every_other_dashboard_but_the_exporters():
    linked = {
        re.fullmatch(r"/d/([\w-]+)\?.*", link["url"]).group(1)
        for panel in mixin_boards.all_panels(board("whatsapp-overview.json"))
        for link in panel.get("links", [])
    }
    others = {n.removesuffix(".json") for n in BOARDS} - {"whatsapp-overview", "whatsapp-exporter"}
    assert linked == others


def test_every_dashboard_has_rows():
    for name in BOARDS:
        rows = [p for p in board(name)["panels"] if p["type"] == "row"]
        assert len(rows) >= 2, name
        assert board(name)["panels"][0]["type"] == "row", name


def test_every_recording_rule_is_on_a_dashboard():
    """rules.yml is shared by the dashboards and the alerts: a rule no panel shows is either
    missing from a dashboard or computed again by one. The SLO's intermediate windows (30m,
    6h outcomes and failures) are what the ratios are made of, shown through them."""
    used = {
        metric
        for name in BOARDS
        for _, expr in mixin_boards.panel_queries(board(name))
        for metric, _ in SELECTOR.findall(expr)
    }
    records = {rule["record"] for rule in recording_rules()}
    parts = {
        f"whatsapp:delivery_{kind}:rate{w}"
        for kind in ("outcomes", "failures")
        for w in ("30m", "1h", "6h")
    }
    parts |= {
        "whatsapp:delivery_success:ratio_rate5m",
        "whatsapp:delivery_success:ratio_rate30m",
        "whatsapp:delivery_error:ratio_rate30d",
    }
    assert records - parts <= used, records - parts - used


@pytest.mark.processes
def test_every_query_parses(tmp_path):
    """promtool 2.42 has no `check query`: each query becomes a recording rule to check."""
    promtool = require_tool("promtool", "prometheus")
    queries = [
        (f"{name}: {title}", substitute(expr))
        for name in sorted(BOARDS)
        for title, expr in [
            *mixin_boards.panel_queries(board(name)),
            *mixin_boards.annotation_queries(board(name)),
        ]
    ]
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    listing = "\n".join(f"{i}: {where}: {expr}" for i, (where, expr) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{listing}"
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# --- provisioning -------------------------------------------------------------------------------


def test_datasource_provisioning():
    config = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["name"] == "Prometheus" and source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True and source["access"] == "proxy"


def test_dashboard_provisioning():
    config = yaml.safe_load((GRAFANA / "provisioning/dashboards/whatsapp.yml").read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file" and provider["folder"] == "WhatsApp"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_mounts_what_provisioning_expects():
    compose = ROOT / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("no docker-compose.yml")
    grafana = yaml.safe_load(compose.read_text())["services"]["grafana"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in grafana["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards"
