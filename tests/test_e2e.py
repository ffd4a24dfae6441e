"""End to end with the real thing: simulators -> exporter -> Prometheus (with the bundled rules)
-> Alertmanager -> a webhook receiver run here; and every dashboard query against that Prometheus.

Prometheus and Alertmanager run from the very files the compose stack mounts
(prometheus/prometheus.yml, alertmanager.yml, rules.yml, alerts.yml). What the test changes, so it
finishes in seconds rather than minutes: scrape and evaluation intervals (1s), the `for` of the
device alert (5s) and its `keep_firing_for` (none), Alertmanager's grouping waits (1s), the
targets and the receiver's URL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from mixin.dashboards import panel_queries
from simulators import (
    BetatelSimulator,
    D7Simulator,
    KaleyraSimulator,
    MetaSimulator,
    WhatsGateSimulator,
)
from tests.conftest import ROOT, free_port, require_tool, run_exporter, wait_for

pytestmark = pytest.mark.processes  # Prometheus, Alertmanager and the exporter as processes

DEVICE = "15550000002"
FOR = "5s"
INGEST = "e2e-ingest"
META_SECRET = "e2e-app-secret"


class Receiver:
    """Alertmanager's webhook target: keeps every notification it is sent."""

    def __init__(self) -> None:
        self.notifications: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.notifications.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str, status: str) -> list[dict]:
        return [
            alert
            for n in self.notifications
            for alert in n["alerts"]
            if alert["labels"]["alertname"] == name and alert["status"] == status
        ]


def started(command: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def is_ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{command[0]} exited: {log.read_text()[-2000:]}")
        try:
            return httpx.get(ready_url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(is_ready, 30, f"{command[0]} to be ready")
    return process


def load_dashboards() -> list[tuple[str, dict]]:
    boards = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert boards, "no dashboards in grafana/dashboards"
    return [
        (f"{path.stem}: {title}", expr)
        for path in boards
        for title, expr in panel_queries(json.loads(path.read_text()))
    ]


def substitute(expr: str) -> str:
    for variable, value in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "1h"),
        *((f"${{{name}}}", ".*") for name in ("job", "instance", "provider", "account")),
        *((f"${name}", ".*") for name in ("job", "instance", "provider", "account")),
    ):
        expr = expr.replace(variable, value)
    return expr


@pytest.fixture
def stack(tmp_path) -> Iterator[dict]:
    prometheus = require_tool("prometheus", "prometheus")
    alertmanager = require_tool("prometheus-alertmanager", "prometheus-alertmanager")
    receiver = Receiver()
    with (
        WhatsGateSimulator(devices=3, auto=True, tick=0.5, rate_limit=None) as whatsgate,
        BetatelSimulator(auto=True, tick=0.5) as betatel,
        D7Simulator(
            auto=True, tick=0.2, index_delay=0, sent_delay=0.2, delivered_delay=0.5, read_delay=1.0
        ) as d7,
        KaleyraSimulator(numbers=["+12025550100"], auto=True, tick=0.5) as kaleyra,
        # a fifth of Meta's messages fail, so that its failures-by-code panel has data
        MetaSimulator(auto=True, tick=0.5, call_budget=None, p_failed=0.2) as meta,
    ):
        # a number at risk and a paused template, so that the Meta panels of those have data
        meta.P_QUALITY = meta.P_LIMIT = meta.P_TEMPLATE = 0.0
        meta.set_number("15550000001", quality="YELLOW", can_send="LIMITED")
        meta.set_template("spring_sale", "en_US", status="PAUSED", quality="RED")
        # only the test connects and disconnects devices; balances and failures still move
        whatsgate.P_DISCONNECT = whatsgate.P_RECONNECT = 0.0
        for mobile in whatsgate.devices:
            whatsgate.set_device(mobile, status="connected")
        config = f"""
defaults: {{interval: 1s, timeout: 2s}}   # budgets to match: the defaults allow 60/m
whatsgate:
  - {{account: acme, base_url: "{whatsgate.base_url}", token: demo-token, rate_limit: 100/s,
      balance: {{interval: 1s}}, failed_numbers: {{interval: 2s}}}}
betatel:
  - {{account: eu, base_url: "{betatel.base_url}", api_key: demo-key,
      account_id: demo-account, windows: [last5m, lasth, today, daily], rate_limit: 100/s}}
d7:
  - {{account: prod, base_url: "{d7.base_url}", token: demo-token, ingest_token: {INGEST},
      interval: 0.5s, retry_first: 0.5s, retry_max: 2s, rate_limit: 100/s}}
kaleyra:
  - {{account: main, base_url: "{kaleyra.base_url}", numbers: ["+12025550100"],
      rate_limit: 100/s}}
meta:
  - {{account: acme, base_url: "{meta.base_url}", token: demo-token, waba_id: "{meta.waba_id}",
      interval: 1s, rate_limit: 100/s, app_secret: {META_SECRET}, verify_token: e2e-verify}}
"""
        with run_exporter(config, strict=False) as running:
            d7.webhook_url = f"{running.url}/webhooks/d7/prod"
            d7.webhook_headers = {"Authorization": f"Bearer {INGEST}"}
            stop = threading.Event()
            traffic = threading.Thread(target=send_d7, args=(d7, running.url, stop), daemon=True)
            traffic.start()
            # Meta's signed status webhooks for what the business sends
            meta.app_secret = META_SECRET
            meta.webhook_url = f"{running.url}/webhooks/meta/acme"
            statuses = threading.Thread(target=send_meta, args=(meta, stop), daemon=True)
            statuses.start()

            # Alertmanager from the bundled file: the receiver's URL and short waits
            am_config = yaml.safe_load((ROOT / "prometheus/alertmanager.yml").read_text())
            receivers = [w for r in am_config["receivers"] for w in r.get("webhook_configs", [])]
            assert receivers, "alertmanager.yml has no webhook receiver to point at the test"
            for webhook in receivers:
                webhook["url"] = receiver.url
            for route in [am_config["route"], *am_config["route"].get("routes", [])]:
                route.update(group_wait="1s", group_interval="1s")
            (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
            am_port = free_port()
            am = started(
                [
                    alertmanager,
                    f"--config.file={tmp_path / 'alertmanager.yml'}",
                    f"--storage.path={tmp_path / 'am'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                f"http://127.0.0.1:{am_port}/-/ready",
                tmp_path / "alertmanager.log",
            )

            # Prometheus from the bundled files: 1s intervals, its own targets, a short `for`
            prom_dir = tmp_path / "prometheus"
            shutil.copytree(ROOT / "prometheus", prom_dir, ignore=shutil.ignore_patterns("tests"))
            prom_config = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
            prom_config["global"].update(scrape_interval="1s", evaluation_interval="1s")
            (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
            alerts = yaml.safe_load((prom_dir / "alerts.yml").read_text())
            for group in alerts["groups"]:
                for rule in group["rules"]:
                    if rule.get("alert") == "WhatsAppDeviceDisconnected":
                        rule["for"] = FOR
                        # flap protection (10m, unit-tested with promtool) would outlast the test
                        rule.pop("keep_firing_for", None)
            (prom_dir / "alerts.yml").write_text(yaml.safe_dump(alerts))
            targets = prom_dir / "targets"
            shutil.rmtree(targets, ignore_errors=True)
            targets.mkdir()
            port = running.url.rsplit(":", 1)[1]
            (targets / "exporter.yml").write_text(f"- targets: ['127.0.0.1:{port}']\n")
            (targets / "alertmanager.yml").write_text(f"- targets: ['127.0.0.1:{am_port}']\n")
            prom_port = free_port()
            prom = started(
                [
                    prometheus,
                    f"--config.file={prom_dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                f"http://127.0.0.1:{prom_port}/-/ready",
                tmp_path / "prometheus.log",
            )
            # one event with a time before 2015: whatsapp_tracking_problems_total exists only
            # once a problem happened, and the exporter dashboard shows it
            bad_time = {"request_id": d7.send(), "status": "sent", "timestamp": 1000}
            response = httpx.post(d7.webhook_url, json=bad_time, headers=d7.webhook_headers)
            assert response.status_code == 200, response.text
            try:
                yield {
                    "prometheus": f"http://127.0.0.1:{prom_port}",
                    "receiver": receiver,
                    "whatsgate": whatsgate,
                }
            finally:
                stop.set()
                for process in (prom, am):
                    process.terminate()
                    process.wait(10)
                receiver.server.shutdown()


def send_d7(sim: D7Simulator, url: str, stop: threading.Event) -> None:
    with httpx.Client(timeout=5) as client:
        while not stop.wait(0.3):
            ids = [
                sim.send(conversation_type="marketing", message_type="TEMPLATE") for _ in range(3)
            ]
            client.post(
                f"{url}/api/v1/requests",
                json={"account": "prod", "request_ids": ids},
                headers={"Authorization": f"Bearer {INGEST}"},
            )


def send_meta(sim: MetaSimulator, stop: threading.Event) -> None:
    while not stop.wait(0.3):
        sim.send_messages(3)


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body.get('error')}"
    return body["data"]["result"]


def test_dashboards_have_data_and_a_disconnected_device_pages_and_resolves(stack):
    prometheus, receiver = stack["prometheus"], stack["receiver"]
    wait_for(lambda: query(prometheus, 'up{job="whatsapp"} == 1'), 30, "the first scrape")

    # every query of every dashboard panel returns data
    panels = load_dashboards()
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [
            f"{title}: {expr}" for title, expr in panels if not query(prometheus, substitute(expr))
        ]
        return not empty

    began = time.monotonic()
    try:
        wait_for(all_have_data, 60, "every dashboard panel to have data")
    except AssertionError:
        raise AssertionError("panels without data:\n" + "\n".join(empty)) from None
    print(f"{len(panels)} panel queries have data after {time.monotonic() - began:.1f}s")

    # a device disconnects at the provider: its alert reaches the receiver through Alertmanager
    stack["whatsgate"].set_device(DEVICE, status="disconnected")
    began = time.monotonic()
    wait_for(
        lambda: receiver.alerts("WhatsAppDeviceDisconnected", "firing"),
        40,
        "WhatsAppDeviceDisconnected at the receiver",
    )
    took = time.monotonic() - began
    (alert,) = receiver.alerts("WhatsAppDeviceDisconnected", "firing")
    assert alert["labels"]["device"] == DEVICE
    assert alert["labels"]["account"] == "acme" and alert["labels"]["severity"] == "critical"
    assert DEVICE in alert["annotations"]["summary"]
    # the rule's `for` (5s) plus the pipeline: poll 1s, scrape 1s, evaluation 1s, group_wait 1s
    assert took < 5 + 20, took

    # it reconnects: the alert resolves
    stack["whatsgate"].set_device(DEVICE, status="connected")
    began = time.monotonic()
    wait_for(
        lambda: receiver.alerts("WhatsAppDeviceDisconnected", "resolved"),
        40,
        "the alert to resolve",
    )
    print(f"alert fired after {took:.1f}s, resolved {time.monotonic() - began:.1f}s later")
    (resolved,) = receiver.alerts("WhatsAppDeviceDisconnected", "resolved")[:1]
    assert resolved["labels"]["device"] == DEVICE


def test_prometheus_scrapes_the_exporter_over_https_with_basic_auth(tmp_path):
    """Prometheus' own TLS and basic-auth client against the exporter's web config (issue #9):
    the target is up with the right password and the test CA, down with a wrong password, and
    the exporter's metrics are queryable."""
    # imported here so the test appends to this file without touching its header
    from tests.test_web_security import (  # noqa: PLC0415
        PASSWORD,
        USER,
        finish,
        launch,
        secure_web_config,
    )

    prometheus = require_tool("prometheus", "prometheus")
    web = secure_web_config(tmp_path / "pki")
    exporter = launch(tmp_path / "exporter", f"--web.config.file={web}")
    try:
        job = {
            "scheme": "https",
            "tls_config": {"ca_file": str(tmp_path / "pki" / "ca.pem")},
            "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}],
        }
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": "tls", "basic_auth": {"username": USER, "password": PASSWORD}, **job},
                {"job_name": "wrong", "basic_auth": {"username": USER, "password": "no"}, **job},
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        prom = started(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            f"{url}/-/ready",
            tmp_path / "prometheus.log",
        )
        try:
            wait_for(lambda: query(url, 'up{job="tls"} == 1'), 30, "the first https scrape")
            wait_for(lambda: query(url, 'up{job="wrong"} == 0'), 30, "the refused scrape")
            targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]
            health = {t["labels"]["job"]: t for t in targets["activeTargets"]}
            assert health["tls"]["health"] == "up", health["tls"]
            assert health["tls"]["scrapeUrl"].startswith("https://127.0.0.1:")
            assert health["wrong"]["health"] == "down"
            assert "401" in health["wrong"]["lastError"], health["wrong"]["lastError"]
            (build,) = wait_for(
                lambda: query(url, 'whatsapp_exporter_build_info{job="tls"}'), 10, "build_info"
            )
            assert build["metric"]["instance"] == f"127.0.0.1:{exporter.port}"
            # the exporter's own count: Prometheus' scrapes were answered 200, the wrong one 401
            wait_for(
                lambda: query(
                    url, 'whatsapp_exporter_http_requests_total{job="tls",code="401"} > 0'
                ),
                15,
                "the refused scrapes in the exporter's request counter",
            )
            assert query(url, 'whatsapp_exporter_http_requests_total{job="tls",code="200"} > 0')
        finally:
            prom.terminate()
            prom.wait(10)
    finally:
        finish(exporter)
