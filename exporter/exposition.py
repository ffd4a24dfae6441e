"""The Prometheus text format (0.0.4) and OpenMetrics 1.0, written from our own `Family` type.

Lines are written once per poll, per target, and joined for every scrape format: sample lines are
the same in both formats, only the family headers differ (OpenMetrics names a counter without
`_total`, calls untyped `unknown`, escapes `"` in HELP and ends with `# EOF`). Writing never raises:
whatever a provider sent, a bad label value is made valid and bounded, and a sample that cannot be
written (an invalid name, a label named twice) is dropped and counted by the caller.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from exporter.metrics import TYPES, Family, Labels

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
EOF = b"# EOF\n"

MAX_LABEL_VALUE = 256  # characters; a longer provider string is cut and marked with "…"

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPENMETRICS_TYPES = {"untyped": "unknown"}
_COUNTS = frozenset({"_count", "_bucket"})


def float_text(value: float) -> str:
    """Go's formatting of floats, as every Prometheus client writes them (`1.7e+09`, `+Inf`)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to exponents sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def safe_text(value: str, limit: int = MAX_LABEL_VALUE) -> str:
    """Valid UTF-8 and at most `limit` characters: lone surrogates (valid JSON, invalid UTF-8)
    become U+FFFD, so one hostile string can never make an exposition unencodable."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    if not value.isascii():
        value = _SURROGATE.sub("\ufffd", value)
    return value


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_text(labels: Labels) -> str:
    """`name="value",...` in this order, values escaped: what goes between the braces."""
    return ",".join([_pair(k, v) for k, v in labels])


def _pair(name: str, value: str) -> str:
    if len(value) > MAX_LABEL_VALUE or len(name) > MAX_LABEL_VALUE:
        return f'{name}="{_escape_value(safe_text(value))}"'
    return _memo_pair(name, value)


MEMO = 8192  # label pairs and names remembered: ~1 MB at most, the longest being capped


@functools.lru_cache(maxsize=MEMO)
def _memo_pair(name: str, value: str) -> str:
    """The same few thousand pairs (numbers, accounts, a client's own labels) come on every
    poll; escaping each again was a third of writing the lines."""
    return f'{name}="{_escape_value(safe_text(value))}"'


def _label_name_ok(name: str) -> bool:
    return _memo_name_ok(name) if len(name) <= MAX_LABEL_VALUE else bool(_LABEL_NAME.match(name))


@functools.lru_cache(maxsize=MEMO)
def _memo_name_ok(name: str) -> bool:
    return bool(_LABEL_NAME.match(name))


def valid_name(name: str) -> bool:
    return bool(_METRIC_NAME.match(name))


def header(family: Family, *, openmetrics: bool = False) -> bytes:
    help_ = safe_text(family.help, 4096).replace("\\", r"\\").replace("\n", r"\n")
    if openmetrics:
        help_ = help_.replace('"', r"\"")
        kind = _OPENMETRICS_TYPES.get(family.type, family.type)
        return f"# HELP {family.name} {help_}\n# TYPE {family.name} {kind}\n".encode()
    name = family.name + "_total" if family.type == "counter" else family.name
    return f"# HELP {name} {help_}\n# TYPE {name} {family.type}\n".encode()


def sample_lines(family: Family, prefix: Labels = ()) -> tuple[bytes, int]:
    """The family's samples with `prefix` labels added, sorted by label name as client_python
    writes them; a label set seen twice is written once. Returns the lines and how many samples
    were dropped as unwritable: an invalid or repeated label name, or a count below zero (a
    counter, a summary's or histogram's `_count` or `_bucket` can only grow from 0)."""
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    dropped = 0
    counts = family.type == "counter"
    for sample in family.samples:
        if sample.value < 0 and (counts or sample.suffix in _COUNTS):
            dropped += 1
            continue
        labels = sorted((*prefix, *sample.labels))
        names = [name for name, _ in labels]
        if len(set(names)) != len(names) or not all(map(_label_name_ok, names)):
            dropped += 1
            continue
        text = label_text(labels)
        if (sample.suffix, text) in seen:
            continue
        seen.add((sample.suffix, text))
        braces = "{" + text + "}" if text else ""
        out.append(f"{family.name}{sample.suffix}{braces} {float_text(sample.value)}\n")
    return "".join(out).encode("utf-8", "replace"), dropped


@dataclass(frozen=True, slots=True)
class Rendered:
    """A family's name, type and help, and its sample lines: written wherever the poll's work
    runs (a worker thread), handed to the snapshot as bytes."""

    family: Family  # without samples
    lines: bytes
    dropped: int  # samples that could not be written
    valid: bool = True  # False: the family's name or type is unusable, nothing of it is shown


def render(families: Iterable[Family], prefix: Labels = ()) -> list[Rendered]:
    """Pure, so it may run off the event loop."""
    out = []
    for family in families:
        header = Family(family.name, family.type, family.help, ())
        if not valid_name(family.name) or family.type not in TYPES:
            out.append(Rendered(header, b"", len(family.samples), valid=False))
            continue
        lines, dropped = sample_lines(family, prefix)
        out.append(Rendered(header, lines, dropped))
    return out
