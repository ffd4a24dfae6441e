"""Every provider brings the same pieces, and they agree: the exporter's registry, the provider's
kit (simulators/kit.py), its golden case and file, its dashboard, its entry in config.example.yaml,
its runbooks, the fault server's answers and the demo's config. Each failure names the provider and
the piece it lacks, so that the README's recipe for a new provider is checked, not just written.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from exporter.config import ConfigError, parse_config
from exporter.demo import DEFAULTS
from exporter.providers import ACCOUNT_MODELS, PROVIDERS
from exporter.providers.base import StateContext
from mixin.config import SLO_PROVIDERS
from simulators import KITS
from tests.conftest import GOLDEN, ROOT, alerts, github_anchor, with_secret_files

NAMES = sorted(set(PROVIDERS) | set(KITS))
each_provider = pytest.mark.parametrize("name", NAMES)


def kit_of(name: str):
    assert name in KITS, f"{name}: no kit: simulators/{name}.py declares KIT, listed in KITS"
    return KITS[name]


def validated(name: str, text: str, env: dict[str, str], what: str) -> list:
    try:
        config = parse_config(text, ACCOUNT_MODELS, env=env, source=what)
    except ConfigError as exc:
        pytest.fail(f"{name}: {what} does not validate: {exc}", pytrace=False)
    return [account for provider, account in config.accounts() if provider == name]


@cache
def example_sections() -> dict[str, str]:
    """config.example.yaml's top-level sections, each with its comments, by key."""
    text = (ROOT / "config.example.yaml").read_text()
    return {m[1]: m[0] for m in re.finditer(r"^(\w+):\n(?:[ #].*\n|\n(?=[ #]))*", text, re.M)}


@cache
def golden_families(name: str) -> frozenset[str]:
    text = (GOLDEN / f"{name}.prom").read_text()
    return frozenset(re.findall(r"^# TYPE (\S+)", text, re.M))


@cache
def provider_families() -> dict[str, frozenset[str]]:
    """Per provider, the families of its golden file that no other provider's has too."""
    everyone = {name: golden_families(name) for name in KITS if (GOLDEN / f"{name}.prom").exists()}
    return {
        name: families - frozenset().union(*(f for n, f in everyone.items() if n != name))
        for name, families in everyone.items()
    }


@cache
def raw_metrics_of(expr: str) -> frozenset[str]:
    """The raw series an expression reads, through the recording rules it reads."""
    records = {
        rule["record"]: rule["expr"]
        for group in yaml.safe_load((ROOT / "prometheus" / "rules.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    found: set[str] = set()
    for metric in re.findall(r"\bwhatsapp[\w:]*", expr):
        if metric in records:
            found |= raw_metrics_of(records[metric])
        else:
            found.add(re.sub(r"_(bucket|sum|count)$", "", metric))
    return frozenset(found)


def declared_endpoints(name: str, tmp_path: Path) -> set[str]:
    """The endpoints the exporter polls for the provider's example account, its state opened
    (as the exporter opens it) when it keeps one."""
    kit = kit_of(name)
    section = example_sections().get(name)
    assert section, f"{name}: config.example.yaml has no `{name}:` entry"
    text = with_secret_files(name, section, tmp_path)
    config = parse_config(text, ACCOUNT_MODELS, env=dict(kit.example.env))
    provider = PROVIDERS[name]
    state = None
    if provider.open_state is not None:
        accounts = {a.account: a for p, a in config.accounts() if p == name}
        state = provider.open_state(
            StateContext(str(tmp_path / "state.db"), lambda: accounts, lambda: None)
        )
    try:
        return {
            endpoint.name
            for _, account in config.accounts()
            for endpoint in provider.endpoints(account, config.defaults, state)
        }
    finally:
        if state is not None:
            state.close()


def test_the_kits_are_the_registry_in_its_order():
    assert list(KITS) == list(PROVIDERS), (
        "simulators.KITS must list exactly the providers of exporter.providers.PROVIDERS, in "
        f"the same order: kits {list(KITS)}, providers {list(PROVIDERS)}"
    )


@each_provider
def test_provider_and_kit_name_each_other(name):
    assert name in PROVIDERS, f"{name}: a kit but no provider in exporter/providers/__init__.py"
    kit = kit_of(name)
    assert kit.name == name == kit.simulator.name, (
        f"{name}: the kit's name {kit.name!r} and its simulator's {kit.simulator.name!r} differ"
    )
    assert PROVIDERS[name].name == name, f"{name}: the provider calls itself {PROVIDERS[name].name}"


@each_provider
def test_golden_case_and_file_exist(name):
    kit_of(name)
    case = ROOT / "tests" / "golden" / f"{name}.py"
    assert case.is_file(), f"{name}: no golden case tests/golden/{name}.py"
    spec = importlib.util.find_spec(f"tests.golden.{name}")
    assert spec is not None and callable(
        getattr(importlib.import_module(f"tests.golden.{name}"), "exposition", None)
    ), f"{name}: tests/golden/{name}.py defines no exposition()"
    assert (GOLDEN / f"{name}.prom").is_file(), (
        f"{name}: no golden file tests/golden/{name}.prom (UPDATE_GOLDEN=1 pytest "
        "tests/test_golden.py writes it)"
    )


@each_provider
def test_dashboard_module_exists_and_is_generated(name):
    kit = kit_of(name)
    module = ROOT / "mixin" / "dashboards" / f"{name}.py"
    assert module.is_file(), f"{name}: no dashboard module mixin/dashboards/{name}.py"
    try:
        build = getattr(importlib.import_module(f"mixin.dashboards.{name}"), name, None)
    except (ImportError, LookupError) as exc:
        pytest.fail(f"{name}: mixin/dashboards does not import: {exc}", pytrace=False)
    assert callable(build), f"{name}: mixin/dashboards/{name}.py defines no {name}(config)"
    generated = ROOT / "grafana" / "dashboards" / f"{kit.dashboard}.json"
    assert generated.is_file(), (
        f"{name}: no grafana/dashboards/{kit.dashboard}.json (the kit's dashboard): run "
        "python -m mixin"
    )
    uid = yaml.safe_load(generated.read_text())["uid"]
    assert uid == kit.dashboard, f"{name}: {generated.name} has the uid {uid!r}"


def test_slo_providers_have_kits():
    unknown = [name for name in SLO_PROVIDERS if name not in KITS]
    assert not unknown, f"mixin/config.py SLO_PROVIDERS names providers without a kit: {unknown}"


@each_provider
def test_example_entry_is_in_the_example_config_and_validates(name, tmp_path):
    kit = kit_of(name)
    section = example_sections().get(name)
    assert section, f"{name}: config.example.yaml has no `{name}:` entry"
    for path in kit.example.files:
        assert path in section, f"{name}: the kit's secret file {path} is not in its example entry"
    text = with_secret_files(name, section, tmp_path)
    accounts = validated(name, text, dict(kit.example.env), "its config.example.yaml entry")
    assert [a.account for a in accounts][:1] == [kit.example.account], (
        f"{name}: config.example.yaml's first {name} account is not the kit's "
        f"{kit.example.account!r}"
    )


@each_provider
def test_demo_entry_validates_and_shows_its_metric(name):
    kit = kit_of(name)
    text = DEFAULTS + kit.demo.accounts("http://127.0.0.1:8081")
    accounts = validated(name, text, {}, "its demo config")
    assert accounts, f"{name}: its demo config has no {name} account"
    assert kit.demo.metric in golden_families(name), (
        f"{name}: the demo's metric {kit.demo.metric} is not in tests/golden/{name}.prom"
    )


@each_provider
def test_runbooks_exist_for_the_providers_alerts(name):
    kit = kit_of(name)
    headings = re.findall(r"^## (.+)$", (ROOT / "docs" / "runbooks.md").read_text(), flags=re.M)
    anchors = {github_anchor(h) for h in headings}
    by_name = {rule["alert"]: rule for rule in alerts()}
    for alert in kit.alerts:
        assert alert in by_name, f"{name}: the kit's alert {alert} is not in prometheus/alerts.yml"
        anchor = by_name[alert]["annotations"]["runbook_url"].partition("#")[2]
        assert anchor in anchors, (
            f"{name}: alert {alert} links to #{anchor}, no section of docs/runbooks.md"
        )
    own = provider_families().get(name, frozenset())
    about = sorted(
        rule["alert"]
        for rule in alerts()
        if (read := raw_metrics_of(rule["expr"]) & frozenset().union(*provider_families().values()))
        and read <= own
    )
    missing = [alert for alert in about if alert not in kit.alerts]
    assert not missing, (
        f"{name}: alerts that read only {name}'s families are not in its kit's alerts (so not "
        f"checked for a runbook): {missing}"
    )


@each_provider
def test_fault_answers_cover_every_endpoint_the_provider_declares(name, tmp_path):
    kit = kit_of(name)
    declared = declared_endpoints(name, tmp_path)
    assert set(kit.matrix.endpoints) == declared, (
        f"{name}: the fault matrix judges {sorted(kit.matrix.endpoints)}, the provider declares "
        f"{sorted(declared)}"
    )
    uncovered = sorted(declared - set(kit.faults.valid))
    assert not uncovered, f"{name}: the fault server has no valid answer for {uncovered}"
    simulated = set(kit.simulator(auto=False).endpoints)
    assert declared <= simulated, (
        f"{name}: its simulator does not serve {sorted(declared - simulated)}"
    )


@each_provider
def test_probe_reaches_its_endpoint(name):
    kit = kit_of(name)
    reached = kit.simulator(auto=False).endpoint_of(kit.probe.method, kit.probe.path)
    assert reached == kit.probe.endpoint, (
        f"{name}: the kit's probe {kit.probe.method} {kit.probe.path} reaches {reached!r}, not "
        f"{kit.probe.endpoint!r}"
    )


def test_matrix_prefixes_are_unique():
    prefixes = [kit.matrix.prefix for kit in KITS.values()]
    assert len(prefixes) == len(set(prefixes)), f"fault matrix account prefixes repeat: {prefixes}"
