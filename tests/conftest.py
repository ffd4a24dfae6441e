"""Shared harness: the exporter runs in a thread on a loopback port against real simulators.

Also the helpers more than one test module needs (import them from here rather than copying
them), and the guard that keeps the `processes` marker honest (see `pytest_configure`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import Config, load_config, parse_config
from exporter.options import Options
from exporter.providers import ACCOUNT_MODELS, PROVIDERS
from exporter.providers.base import Provider
from simulators import KITS

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


class LoopbackServer:
    """A webhook receiver's HTTP server, in a thread on a loopback port, for a simulator to call."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A loopback port nothing listens on now (another process may take it before we do)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def scrape(url: str, timeout: float = 2) -> Series | None:
    """GET {url}/metrics, parsed; None while nothing answers there (yet, or any more)."""
    try:
        return parse_exposition(httpx.get(f"{url}/metrics", timeout=timeout).text)
    except httpx.HTTPError:
        return None


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


def example_config(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """config.example.yaml, and the environment it needs, as each provider's kit says: its
    secret files are written under tmp_path and the text points at them."""
    text = (ROOT / "config.example.yaml").read_text()
    env: dict[str, str] = {}
    for name, kit in KITS.items():
        env.update(kit.example.env)
        text = with_secret_files(name, text, tmp_path)
    return text, env


def with_secret_files(provider: str, text: str, tmp_path: Path) -> str:
    """The text with the provider's example secret files written under tmp_path, pointing there."""
    for number, (path, content) in enumerate(KITS[provider].example.files.items()):
        written = tmp_path / f"{provider}-{number}"
        written.write_text(content)
        text = text.replace(path, str(written))
    return text


def alerts() -> list[dict]:
    """Every alert of prometheus/alerts.yml."""
    groups = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


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


# --- tests that start processes -------------------------------------------------------------------
# Tests marked `processes` (pyproject.toml) start a child process: `python -m exporter`, a
# simulator process, Prometheus, promtool, Alertmanager, PostgreSQL, Chromium, docker. An
# exporter in a thread and loopback servers in this process do not count. So that the mark stays
# true, a test without it that starts a process fails, in every loop. Only `git` is let through:
# the exporter reads its revision with it (exporter/build.py).

PROCESSES = "processes"
_LET_THROUGH = {"git"}
_guarded: pytest.Item | None = None  # the unmarked test now in setup or call, if any
_spawned: list[str] = []  # what it tried to start


def _program(args: object) -> str:
    first = args.split()[0] if isinstance(args, str | bytes) else next(iter(args))
    return os.path.basename(os.fsdecode(first))


def pytest_configure(config: pytest.Config) -> None:
    execute_child = subprocess.Popen._execute_child

    def guarded(self: subprocess.Popen, args, *rest, **named):
        if _guarded is not None and _program(args) not in _LET_THROUGH:
            _spawned.append(repr(args))
            pytest.fail(
                f"{_guarded.nodeid} starts a child process ({args!r}) but is not marked "
                f"`{PROCESSES}`: mark it @pytest.mark.{PROCESSES} (or its module: pytestmark), "
                "so that `make check` leaves it to `make test`",
                pytrace=False,
            )
        return execute_child(self, args, *rest, **named)

    subprocess.Popen._execute_child = guarded


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for the PostgreSQL server (tests/postgres.py) starts one."""
    for item in items:
        if {"postgres_server", "postgres_url"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(PROCESSES)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _watching(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _watching(item))


def _watching(item: pytest.Item):
    """Not in teardown: a session's fixtures end in whichever test happens to run last."""
    global _guarded
    _guarded = None if item.get_closest_marker(PROCESSES) else item
    try:
        return (yield)
    finally:
        _guarded = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Also when the failure was raised in another thread, or caught."""
    report = yield
    if _spawned and report.when != "teardown":
        if report.passed:
            report.outcome = "failed"
            report.longrepr = f"started a child process without the `{PROCESSES}` mark: {_spawned}"
        _spawned.clear()
    return report
