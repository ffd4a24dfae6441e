"""The bundled Grafana dashboards: one module per dashboard, built from `builder`.

Every query filters by the `job` and `instance` variables (raw series) and by `provider` and
`account` (where the series has them), uses no variable but those and $__rate_interval and
$__range (tests/test_e2e.py substitutes exactly these), and reads the recording rules wherever
a panel shows what a rule records.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mixin.config import Config
from mixin.dashboards.builder import Json, all_panels, annotation_queries, panel_queries, render
from mixin.dashboards.exporter import exporter
from mixin.dashboards.overview import overview
from mixin.dashboards.slo import slo
from simulators import KITS


def provider_board(name: str) -> Callable[[Config], Json]:
    """A provider's dashboard: `<name>(config)` in mixin/dashboards/<name>.py."""
    build = getattr(importlib.import_module(f"mixin.dashboards.{name}"), name, None)
    if build is None:
        raise LookupError(f"mixin/dashboards/{name}.py defines no {name}(config), its dashboard")
    return build


# file name -> what builds it: the three across providers, and one per provider kit
BOARDS: dict[str, Callable[[Config], Json]] = {
    "whatsapp-overview.json": overview,
    "whatsapp-exporter.json": exporter,
    "whatsapp-slo.json": slo,
    **{f"{kit.dashboard}.json": provider_board(name) for name, kit in KITS.items()},
}

__all__ = ["BOARDS", "all_panels", "annotation_queries", "panel_queries", "render"]
