"""Shared harness: the exporter runs in a thread on a loopback port against real simulators."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import Config, load_config, parse_config
from exporter.options import Options
from exporter.providers import ACCOUNT_MODELS, PROVIDERS
from exporter.providers.base import Provider

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


Series = dict[tuple[str, frozenset], float]


def parse_exposition(text: str) -> Series:
    """Sample name and label set -> value, through the official parser (which also validates)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, name: str, /, **labels: str) -> float | None:
    """The value of the one sample with these labels (a subset of its labels), or None."""
    found = [v for (n, ls), v in series.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def values(series: Series, name: str, /, **labels: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(ls), v)
        for (n, ls), v in sorted(series.items(), key=lambda i: sorted(i[0][1]))
        if n == name and set(labels.items()) <= ls
    ]


@dataclass
class Running:
    exporter: Exporter
    url: str

    def scrape(self) -> Series:
        return parse_exposition(self.metrics_text())

    def metrics_text(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=5)
        response.raise_for_status()
        return response.text

    def wait_for_metric(self, name: str, timeout: float = 10.0, **labels: str) -> float:
        found: list[float] = []

        def check() -> bool:
            v = value(self.scrape(), name, **labels)
            if v is not None:
                found.append(v)
                return True
            return False

        wait_for(check, timeout, f"{name}{labels}")
        return found[-1]


@contextlib.contextmanager
def run_exporter(
    config: str | Path,
    *,
    env: dict[str, str] | None = None,
    strict: bool = True,
    storage: Path | None = None,
    providers: Mapping[str, Provider] = PROVIDERS,
    **options: object,
) -> Iterator[Running]:
    """Run the exporter against YAML text (or a file, which then also serves reloads)."""
    if isinstance(config, Path):
        path = config

        def load() -> Config:
            return load_config(path, ACCOUNT_MODELS)
    else:
        text = config

        def load() -> Config:
            return parse_config(text, ACCOUNT_MODELS, env=env or {})

    storage = storage or Path(tempfile.mkdtemp(prefix="storage-"))
    options = {"lifecycle": True, **options}  # tests reload through POST /-/reload
    exporter = Exporter(
        load,
        Options("127.0.0.1:0", storage_path=str(storage), strict=strict, **options),
        providers=providers,
    )
    first = load()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(exporter.run(first))
        except BaseException as exc:  # surfaced to the test below
            failure.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    wait_for(lambda: exporter.started.is_set() or failure, 10, "the exporter to start")
    if failure:
        raise failure[0]
    try:
        yield Running(exporter, f"http://127.0.0.1:{exporter.port}")
    finally:
        exporter.stop()
        thread.join(10)
        assert not thread.is_alive(), "the exporter did not stop within 10s"
        if failure:
            raise failure[0]


def require_tool(name: str, apt_package: str) -> str:
    """A tool the tests need: present, or installed here, or a failure that says what's missing."""
    found = shutil.which(name)
    if found:
        return found
    installer = ROOT / "scripts" / "install-test-tools"
    if installer.exists() and os.geteuid() == 0:
        subprocess.run([str(installer)], check=False)
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        f"{name} is not installed: run `make test` (it installs the Debian package "
        f"{apt_package}), or `apt-get install {apt_package}`",
        pytrace=False,
    )
