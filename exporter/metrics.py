"""Metric families as plain data: what providers produce and the snapshot renders.

A room of its own so that providers and the snapshot share the types without importing each
other. Provider and account labels are not part of a family: the snapshot adds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]

TYPES = frozenset({"gauge", "counter", "summary", "histogram", "untyped"})

# Why a poll failed: the `reason` label of whatsapp_exporter_poll_errors_total.
REASONS = (
    "timeout",
    "connect",
    "auth",
    "rate_limited",
    "not_found",
    "http_4xx",
    "http_5xx",
    "bad_response",
    "provider_error",
    "too_large",  # the answer was over the account's body_size_limit
    "storage",  # the exporter could not write its own state (D7's ledger): not the provider
)


@dataclass(frozen=True, slots=True)
class Sample:
    labels: Labels
    value: float
    suffix: str = ""  # "", "_total", "_count", "_sum", "_bucket"


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as the provider sees it; provider and account labels are added later."""

    name: str
    type: str  # one of TYPES
    help: str
    samples: tuple[Sample, ...]


def family(
    name: str, type_: str, help_: str, samples: Iterable[tuple[Mapping[str, str], float]]
) -> Family:
    suffix = "_total" if type_ == "counter" else ""
    return Family(
        name,
        type_,
        help_,
        tuple(Sample(tuple(labels.items()), float(value), suffix) for labels, value in samples),
    )


def gauge(name: str, help_: str, samples: Iterable[tuple[Mapping[str, str], float]]) -> Family:
    return family(name, "gauge", help_, samples)
