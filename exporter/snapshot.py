"""The newest answer of every target, and the exposition rendered from them.

The scheduler writes here from the event loop; the web server only reads `exposition` and
`targets()` from its own threads. Rendering happens when something changed, never per scrape, so
a scrape is a copy of bytes that are already there.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from exporter.providers.base import REASONS, Family, PollError

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class TargetKey:
    provider: str
    account: str
    endpoint: str
    target: str


@dataclass(frozen=True)
class TargetState:
    """What the landing page and the health metrics show about one target."""

    key: TargetKey
    interval: float
    families: tuple[Family, ...] = ()
    up: bool | None = None  # None: not polled yet
    last_poll: float | None = None
    last_success: float | None = None
    duration: float | None = None
    error: str = ""
    stale: bool = False


@dataclass(frozen=True)
class Exposition:
    plain: bytes
    gzipped: bytes


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HEALTH_HELP = {
    "whatsapp_exporter_up": "Whether the newest poll of this provider endpoint and target "
    "succeeded (1) or not (0).",
    "whatsapp_exporter_last_success_timestamp_seconds": "Unix time of the newest successful "
    "poll of this provider endpoint and target.",
    "whatsapp_exporter_poll_duration_seconds": "Wall time of the newest poll of this target, "
    "including any wait for the account's request budget.",
}


def _no_errors() -> dict[str, int]:
    return dict.fromkeys(REASONS, 0)


class Snapshot:
    def __init__(
        self, version: str, *, stale_after: int = 3, clock: Callable[[], float] = time.time
    ):
        self._version = version
        self._stale_after = stale_after
        self._clock = clock
        self._lock = threading.Lock()
        self._targets: dict[TargetKey, TargetState] = {}
        self._errors: dict[tuple[str, str, str], dict[str, int]] = {}
        self._extra: dict[str, tuple[Family, ...]] = {}
        self._reload_ok = True
        self._dirty = True
        self.exposition = Exposition(b"", b"")
        self.publish()

    # --- writing (event loop) ---

    def configure(self, stale_after: int, endpoints: Iterable[tuple[str, str, str]]) -> None:
        """Start counting errors for these endpoints (at 0, so rate() works from the first scrape)
        and forget every target and counter of endpoints no longer configured."""
        wanted = set(endpoints)
        with self._lock:
            self._stale_after = stale_after
            self._errors = {k: self._errors.get(k) or _no_errors() for k in sorted(wanted)}
            self._targets = {
                k: v
                for k, v in self._targets.items()
                if (k.provider, k.account, k.endpoint) in wanted
            }
            self._dirty = True

    def retain(self, provider: str, account: str, endpoint: str, targets: Iterable[str]) -> None:
        """Forget targets an endpoint no longer polls (a device removed from the account)."""
        keep = set(targets)
        with self._lock:
            gone = [
                k
                for k in self._targets
                if (k.provider, k.account, k.endpoint) == (provider, account, endpoint)
                and k.target not in keep
            ]
            for key in gone:
                del self._targets[key]
            self._dirty |= bool(gone)

    def succeeded(
        self, key: TargetKey, interval: float, families: Iterable[Family], duration: float
    ) -> None:
        now = self._clock()
        with self._lock:
            self._targets[key] = TargetState(
                key,
                interval,
                tuple(families),
                up=True,
                last_poll=now,
                last_success=now,
                duration=duration,
            )
            self._dirty = True

    def failed(self, key: TargetKey, interval: float, error: PollError, duration: float) -> None:
        """Keep the target's last values (until they go stale), mark it down, count the reason."""
        now = self._clock()
        with self._lock:
            old = self._targets.get(key) or TargetState(key, interval)
            self._targets[key] = replace(
                old,
                interval=interval,
                up=False,
                last_poll=now,
                duration=duration,
                error=f"{error.reason}: {error.detail}",
            )
            counts = self._errors.setdefault(
                (key.provider, key.account, key.endpoint), _no_errors()
            )
            counts[error.reason] += 1
            self._dirty = True

    def set_extra(self, name: str, families: Iterable[Family]) -> None:
        """Families that belong to no single poll (state kept by the exporter itself)."""
        with self._lock:
            self._extra[name] = tuple(families)
            self._dirty = True

    def reload_result(self, ok: bool) -> None:
        with self._lock:
            self._reload_ok = ok
            self._dirty = True

    def expire(self) -> None:
        """Drop the values of targets with no success for `stale_after` of their intervals."""
        now = self._clock()
        with self._lock:
            for key, state in self._targets.items():
                stale = bool(
                    state.last_success is not None
                    and now - state.last_success > self._stale_after * state.interval
                )
                if stale != state.stale:
                    self._targets[key] = replace(state, stale=stale)
                    self._dirty = True

    def publish(self) -> bool:
        """Render the exposition if anything changed since the last render."""
        with self._lock:
            if not self._dirty:
                return False
            self._dirty = False
            targets = sorted(self._targets.values(), key=lambda s: s.key)
            errors = {k: dict(v) for k, v in self._errors.items()}
            extra = [f for name in sorted(self._extra) for f in self._extra[name]]
            reload_ok = self._reload_ok
        plain = render(self._version, targets, errors, extra, reload_ok)
        self.exposition = Exposition(plain, gzip.compress(plain, compresslevel=6))
        return True

    # --- reading (any thread) ---

    def targets(self) -> list[TargetState]:
        with self._lock:
            return sorted(self._targets.values(), key=lambda s: s.key)


def render(
    version: str,
    targets: list[TargetState],
    errors: dict[tuple[str, str, str], dict[str, int]],
    extra: list[Family],
    reload_ok: bool,
) -> bytes:
    return generate_latest(_Collected(_metrics(version, targets, errors, extra, reload_ok)))


class _Collected:
    """What generate_latest wants: anything with collect()."""

    def __init__(self, metrics: list[Metric]):
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


def _metrics(
    version: str,
    targets: list[TargetState],
    errors: dict[tuple[str, str, str], dict[str, int]],
    extra: list[Family],
    reload_ok: bool,
) -> list[Metric]:
    out: dict[str, Metric] = {}

    def add(name: str, type_: str, help_: str, labels: dict[str, str], value: float, suffix=""):
        metric = out.get(name)
        if metric is None:
            metric = out[name] = Metric(name, help_, type_)
        metric.add_sample(name + suffix, labels, value)

    add(
        "whatsapp_exporter_build_info",
        "gauge",
        "Version of the exporter, always 1.",
        {"version": version},
        1,
    )
    add(
        "whatsapp_exporter_config_last_reload_successful",
        "gauge",
        "Whether the newest config reload succeeded (1) or kept the old config (0).",
        {},
        int(reload_ok),
    )
    for state in targets:
        if state.up is None:
            continue
        labels = _key_labels(state.key)
        add(
            "whatsapp_exporter_up",
            "gauge",
            _HEALTH_HELP["whatsapp_exporter_up"],
            labels,
            int(state.up),
        )
        if state.last_success is not None:
            name = "whatsapp_exporter_last_success_timestamp_seconds"
            add(name, "gauge", _HEALTH_HELP[name], labels, state.last_success)
        if state.duration is not None:
            name = "whatsapp_exporter_poll_duration_seconds"
            add(name, "gauge", _HEALTH_HELP[name], labels, state.duration)
    for (provider, account, endpoint), counts in errors.items():
        for reason, count in counts.items():
            add(
                "whatsapp_exporter_poll_errors",
                "counter",
                "Failed polls by reason.",
                {"provider": provider, "account": account, "endpoint": endpoint, "reason": reason},
                count,
                "_total",
            )

    families: list[tuple[TargetKey, Family]] = [
        (state.key, f) for state in targets if not state.stale for f in state.families
    ]
    families += [(None, f) for f in extra]
    seen_types: dict[str, str] = {}
    seen_labels: dict[str, set] = {}
    for key, fam in families:
        if seen_types.setdefault(fam.name, fam.type) != fam.type:
            log.warning(
                "dropping a metric family whose type differs from an earlier one of that name",
                extra={
                    "fields": {
                        "metric": fam.name,
                        "type": fam.type,
                        "first_type": seen_types[fam.name],
                    }
                },
            )
            continue
        labels_seen = seen_labels.setdefault(fam.name, set())
        prefix = {"provider": key.provider, "account": key.account} if key else {}
        for sample in fam.samples:
            identity = (sample.suffix, prefix.get("provider"), prefix.get("account"), sample.labels)
            if identity in labels_seen:
                continue  # never two samples with one label set
            labels_seen.add(identity)
            add(
                fam.name,
                fam.type,
                fam.help,
                {**prefix, **dict(sample.labels)},
                sample.value,
                sample.suffix,
            )
    return [out[name] for name in sorted(out)]


def _key_labels(key: TargetKey) -> dict[str, str]:
    return {
        "provider": key.provider,
        "account": key.account,
        "endpoint": key.endpoint,
        "target": key.target,
    }
