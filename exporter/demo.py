"""`whatsapp-exporter --demo`: the four simulators on loopback, polled at short intervals.

The config is YAML text that goes through the same validation as an operator's file, so the demo
also shows what a real config looks like (printed at start).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from exporter.app import Exporter, run_until_stopped
from exporter.config import Config, parse_config
from exporter.options import Options
from exporter.providers import ACCOUNT_MODELS
from simulators import SIMULATORS, Simulator

log = logging.getLogger(__name__)

KALEYRA_NUMBERS = ("+12025550100", "+12025550101")
INGEST_TOKEN = "demo-ingest-token"


def start_simulators(seed: int = 1) -> dict[str, Simulator]:
    options = {
        "whatsgate": {"devices": 4, "rate_limit": 60},
        "betatel": {},
        "d7": {},
        "kaleyra": {"numbers": list(KALEYRA_NUMBERS)},
    }
    return {
        name: SIMULATORS[name](seed=seed, auto=True, tick=1.0, **options[name]).start()
        for name in SIMULATORS
    }


def demo_config_text(sims: dict[str, Simulator]) -> str:
    numbers = ", ".join(f'"{n}"' for n in KALEYRA_NUMBERS)
    return f"""\
defaults:
  interval: 5s
  timeout: 3s
  stale_after: 3
whatsgate:
  - account: demo
    base_url: {sims["whatsgate"].base_url}
    token: demo-token
    devices: []
    rate_limit: 60/m
    balance: {{interval: 10s}}
    failed_numbers: {{interval: 15s, lookback: 24h}}
betatel:
  - account: demo
    base_url: {sims["betatel"].base_url}
    api_key: demo-key
    account_id: demo-account
    windows: [lastm, last5m, lasth, today, daily]
    timezone: Europe/Berlin
d7:
  - account: demo
    base_url: {sims["d7"].base_url}
    token: demo-token
    ingest_token: {INGEST_TOKEN}
    interval: 1s
    retry_first: 2s
    retry_max: 10s
    not_found_grace: 30s
kaleyra:
  - account: demo
    base_url: {sims["kaleyra"].base_url}
    numbers: [{numbers}]
"""


def send_d7_traffic(sim: Simulator, exporter_url: str, stop: threading.Event) -> None:
    """What a sending application does: send through D7, hand the request ids to the exporter.
    D7's webhooks (from the simulator) report the same messages: each status still counts once."""
    rng = random.Random(7)
    auth = {"Authorization": f"Bearer {INGEST_TOKEN}"}
    sim.webhook_url = f"{exporter_url}/webhooks/d7/demo"
    sim.webhook_headers = auth
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    while not stop.wait(1.0):
        ids = [
            sim.send(
                recipients=rng.randint(1, 2),
                conversation_type=rng.choice(("marketing", "utility", "service")),
                message_type=rng.choice(("TEMPLATE", "TEXT")),
            )
            for _ in range(rng.randint(1, 3))
        ]
        handed = urllib.request.Request(
            f"{exporter_url}/api/v1/requests",
            data=json.dumps({"account": "demo", "request_ids": ids}).encode(),
            headers={**auth, "Content-Type": "application/json"},
        )
        try:
            with direct.open(handed, timeout=5) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as exc:
            log.warning("demo traffic: %s", exc)


def run(listen_address: str, storage_path: str | None = None) -> int:
    sims = start_simulators()
    text = demo_config_text(sims)

    def load() -> Config:
        return parse_config(text, ACCOUNT_MODELS, source="demo config")

    # demo data is throwaway unless a --storage.path says otherwise
    storage = storage_path or str(Path(tempfile.mkdtemp(prefix="whatsapp-demo-")) / "ledger.db")
    exporter = Exporter(load, Options(listen_address, storage_path=storage))
    print("Demo mode: polling the built-in simulators with this config:\n", file=sys.stderr)
    print(text, file=sys.stderr)
    for name, sim in sims.items():
        print(f"  {name:<9} simulator: {sim.url}", file=sys.stderr)
    try:
        return run_until_stopped(_run_and_announce(exporter, load(), sims["d7"]), listen_address)
    finally:
        for sim in sims.values():
            sim.stop()


async def _run_and_announce(exporter: Exporter, config: Config, d7_sim: Simulator) -> None:
    task = asyncio.create_task(exporter.run(config))
    while not exporter.started.is_set() and not task.done():
        await asyncio.sleep(0.05)
    stop = threading.Event()
    if exporter.started.is_set():
        url = f"http://localhost:{exporter.port}"
        print(f"\nExporter: {url}/  metrics: {url}/metrics  (Ctrl-C stops)\n", file=sys.stderr)
        local = f"http://127.0.0.1:{exporter.port}"
        threading.Thread(
            target=send_d7_traffic, args=(d7_sim, local, stop), daemon=True, name="d7-traffic"
        ).start()
    try:
        await task
    finally:
        stop.set()
