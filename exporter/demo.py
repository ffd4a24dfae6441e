"""`whatsapp-exporter --demo`: the four simulators on loopback, polled at short intervals.

The config is YAML text that goes through the same validation as an operator's file, so the demo
also shows what a real config looks like (printed at start).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from exporter.app import Exporter
from exporter.config import Config, parse_config
from exporter.providers import ACCOUNT_MODELS
from exporter.simulator import SIMULATORS, Simulator

log = logging.getLogger(__name__)

KALEYRA_NUMBERS = ("+12025550100", "+12025550101")


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
kaleyra:
  - account: demo
    base_url: {sims["kaleyra"].base_url}
    numbers: [{numbers}]
"""


def run(listen_address: str) -> int:
    sims = start_simulators()
    text = demo_config_text(sims)

    def load() -> Config:
        return parse_config(text, ACCOUNT_MODELS, source="demo config")

    exporter = Exporter(load, listen_address)
    print("Demo mode: polling the built-in simulators with this config:\n", file=sys.stderr)
    print(text, file=sys.stderr)
    for name, sim in sims.items():
        print(f"  {name:<9} simulator: {sim.url}", file=sys.stderr)
    try:
        asyncio.run(_run_and_announce(exporter, load()))
    except OSError as exc:
        print(
            f"whatsapp-exporter: cannot listen on {listen_address}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        for sim in sims.values():
            sim.stop()
    return 0


async def _run_and_announce(exporter: Exporter, config: Config) -> None:
    task = asyncio.create_task(exporter.run(config))
    while not exporter.started.is_set() and not task.done():
        await asyncio.sleep(0.05)
    if exporter.started.is_set():
        url = f"http://localhost:{exporter.port}"
        print(f"\nExporter: {url}/  metrics: {url}/metrics  (Ctrl-C stops)\n", file=sys.stderr)
    await task
