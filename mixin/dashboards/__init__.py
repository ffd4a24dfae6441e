"""The bundled Grafana dashboards: one module per dashboard, built from `builder`.

Every query filters by the `job` and `instance` variables (raw series) and by `provider` and
`account` (where the series has them), uses no variable but those and $__rate_interval and
$__range (tests/test_e2e.py substitutes exactly these), and reads the recording rules wherever
a panel shows what a rule records.
"""

from __future__ import annotations

from collections.abc import Callable

from mixin.config import Config
from mixin.dashboards.betatel import betatel
from mixin.dashboards.builder import Json, all_panels, annotation_queries, panel_queries, render
from mixin.dashboards.d7 import d7
from mixin.dashboards.exporter import exporter
from mixin.dashboards.kaleyra import kaleyra
from mixin.dashboards.overview import overview
from mixin.dashboards.slo import slo
from mixin.dashboards.whatsgate import whatsgate

BOARDS: dict[str, Callable[[Config], Json]] = {
    "whatsapp-overview.json": overview,
    "whatsapp-whatsgate-devices.json": whatsgate,
    "whatsapp-d7-delivery.json": d7,
    "whatsapp-kaleyra-client.json": kaleyra,
    "whatsapp-betatel-stats.json": betatel,
    "whatsapp-exporter.json": exporter,
    "whatsapp-slo.json": slo,
}

__all__ = ["BOARDS", "all_panels", "annotation_queries", "panel_queries", "render"]
