"""`whatsapp-exporter --demo`: every provider's simulator on loopback, polled at short intervals.

Each provider's kit (simulators/kit.py) says how its simulator runs, its part of the config and
the traffic a sending application would make. The config is YAML text that goes through the same
validation as an operator's file, so the demo also shows what a real config looks like (printed
at start).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading

from exporter.app import Exporter, run_until_stopped
from exporter.config import Config, parse_config
from exporter.options import Options
from exporter.providers import ACCOUNT_MODELS
from simulators import KITS, Simulator

DEFAULTS = """\
defaults:
  interval: 5s
  timeout: 3s
  stale_after: 3
"""


def start_simulators(seed: int = 1) -> dict[str, Simulator]:
    return {
        name: kit.simulator(seed=seed, auto=True, tick=1.0, **kit.demo.options).start()
        for name, kit in KITS.items()
    }


def demo_config_text(sims: dict[str, Simulator]) -> str:
    return DEFAULTS + "".join(KITS[name].demo.accounts(sim.base_url) for name, sim in sims.items())


def run(listen_address: str, storage_path: str | None = None) -> int:
    sims = start_simulators()
    text = demo_config_text(sims)

    def load() -> Config:
        return parse_config(text, ACCOUNT_MODELS, source="demo config")

    # demo data is throwaway unless a --storage.path says otherwise
    # (a directory, as --storage.path is: each provider's state is a file in it)
    storage = storage_path or tempfile.mkdtemp(prefix="whatsapp-demo-")
    exporter = Exporter(load, Options(listen_address, storage_path=storage))
    print("Demo mode: polling the built-in simulators with this config:\n", file=sys.stderr)
    print(text, file=sys.stderr)
    for name, sim in sims.items():
        print(f"  {name:<9} simulator: {sim.url}", file=sys.stderr)
    try:
        return run_until_stopped(_run_and_announce(exporter, load(), sims), listen_address)
    finally:
        for sim in sims.values():
            sim.stop()


async def _run_and_announce(exporter: Exporter, config: Config, sims: dict[str, Simulator]) -> None:
    task = asyncio.create_task(exporter.run(config))
    while not exporter.started.is_set() and not task.done():
        await asyncio.sleep(0.05)
    stop = threading.Event()
    if exporter.started.is_set():
        url = f"http://localhost:{exporter.port}"
        print(f"\nExporter: {url}/  metrics: {url}/metrics  (Ctrl-C stops)\n", file=sys.stderr)
        local = f"http://127.0.0.1:{exporter.port}"
        for name, sim in sims.items():
            traffic = KITS[name].demo.traffic
            if traffic is not None:
                threading.Thread(
                    target=traffic, args=(sim, local, stop), daemon=True, name=f"{name}-traffic"
                ).start()
    try:
        await task
    finally:
        stop.set()
