"""A provider's kit: everything besides the exporter's runtime that a provider brings, in one place.

The demo, the fault server and its matrix, the simulator tests, the golden tests, the example
config test and the mixin loop over `simulators.KITS` instead of keeping tables of their own, and
tests/test_provider_kit.py checks that each kit agrees with the exporter's registry, the golden
files, the dashboards, config.example.yaml and docs/runbooks.md.

Standard library only, like the simulators: the exporter's runtime never imports this, and a kit
never imports the exporter. What must live elsewhere has a fixed place, checked by that test:
tests/golden/<name>.py builds the golden exposition that tests/golden/<name>.prom holds, and
mixin/dashboards/<name>.py defines `<name>(config)`, the provider's dashboard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from simulators.server import Simulator


@dataclass(frozen=True)
class Demo:
    """What `whatsapp-exporter --demo` runs for the provider."""

    options: Mapping[str, Any]  # the simulator's options
    accounts: Callable[[str], str]  # the simulator's base_url -> the provider's YAML section
    metric: str  # a family the running demo must show (tests/test_cli.py)
    # what a sending application does meanwhile: (simulator, exporter URL, stop) in a thread
    traffic: Callable[[Any, str, threading.Event], None] | None = None


@dataclass(frozen=True)
class Probe:
    """One authorized request to the provider's main read endpoint, relative to its base_url."""

    endpoint: str  # the simulator's name of the endpoint the request reaches
    method: str
    path: str  # what the fault server is asked
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None  # JSON
    # a path the simulator answers with 200 where `path` alone gets a 404 (D7 reports only the
    # ids it was sent)
    ready: Callable[[Any], str] | None = None
    # tells the simulator's wrong_shape answer from the documented one
    misshapen: Callable[[Any], bool] = lambda body: False

    def path_for(self, simulator: Simulator) -> str:
        return self.ready(simulator) if self.ready else self.path


@dataclass(frozen=True)
class FaultAnswers:
    """What tests/faultserver.py answers, in the provider's own words as its API documents them."""

    auth: tuple[int, str, Any]  # status, content type, body: a str is sent as it is
    rate_limited: Any  # the 429's body
    not_found: Callable[[str, str], Any]  # (method, path) -> the web framework's 404 body
    valid: Mapping[str, Any]  # endpoint -> a documented success answer, to cut in half
    wrong_shape: Callable[[dict[str, Any]], Any]  # hostile values -> JSON no parser may take
    huge_chunked: bool = False  # the 50 MB answer comes chunked, else with a Content-Length


@dataclass(frozen=True)
class Matrix:
    """The provider's accounts in tests/test_fault_matrix.py."""

    prefix: str  # of the account names: `<prefix>-<fault>`
    endpoints: tuple[str, ...]  # what the exporter polls for an account, each judged
    # (account, interval, healthy) -> what the account needs besides base_url and rate_limit;
    # neither `timeout` nor `body_size_limit`, so the defaults are what is tested
    keys: Callable[[str, str, bool], dict[str, Any]]
    # the exporter polls only the request ids handed in at /api/v1/requests: the matrix hands
    # one to each account, and the healthy one a request its simulator knows (`send()`)
    hand_in: bool = False


@dataclass(frozen=True)
class Example:
    """The provider's entry in config.example.yaml, and what validating it takes."""

    account: str  # the first account's name there
    env: Mapping[str, str] = field(default_factory=dict)  # the ${VAR}s it uses
    files: Mapping[str, str] = field(default_factory=dict)  # secret file path -> its content


@dataclass(frozen=True)
class Kit:
    name: str  # the exporter's provider key
    simulator: type[Simulator]
    # options under which the simulator answers every request at once: no rate limit, no
    # indexing delay (the fault matrix's healthy accounts, the simulator tests)
    quick: Mapping[str, Any]
    probe: Probe
    demo: Demo
    faults: FaultAnswers
    matrix: Matrix
    example: Example
    dashboard: str  # the uid of mixin/dashboards/<name>.py's board, and its file's name
    alerts: tuple[str, ...] = ()  # the alerts about this provider, each a docs/runbooks.md section
