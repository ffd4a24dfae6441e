"""Kaleyra: the WhatsApp Business API client's own monitoring stats, one request per number.

The client's metric names change between versions (`callback_requests` became
`callback_requests_duration_ms_count` and `_sum`), so nothing here lists them: every family that
arrives is translated by rule, and a family of an unexpected shape is skipped rather than failing
the number's whole poll.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import AfterValidator, BeforeValidator, SecretStr, field_validator, model_validator

from exporter.config import (
    AccountBase,
    ByteSize,
    Defaults,
    HeaderFile,
    HeaderValue,
    RateLimit,
    header_names,
    json_kind,
)
from exporter.metrics import Family, Labels, Sample
from exporter.providers.base import (
    POLLED,
    Api,
    Endpoint,
    Known,
    PollError,
    Provider,
)

log = logging.getLogger(__name__)

# --- config -------------------------------------------------------------------------------------

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def _not_a_yaml_number(value: Any) -> Any:
    """Unquoted, `+12025550100` is an integer to YAML and loses its plus."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f'{value} is a number to YAML: quote it, e.g. "+{value}"')
    return value


def _e164(value: str) -> str:
    reason = None
    if not value.startswith("+"):
        reason = "it must start with + and the country code"
    elif not value[1:].isascii() or not value[1:].isdigit():
        reason = "only digits may follow the +"
    elif value[1] == "0":
        reason = "country codes do not start with 0"
    elif not _E164.match(value):
        reason = f"it has {len(value) - 1} digits, E.164 allows 7 to 15"
    if reason:
        raise ValueError(f"{value!r} is not an E.164 number like +12025550100: {reason}")
    return value


_Number = Annotated[str, BeforeValidator(_not_a_yaml_number), AfterValidator(_e164)]


class Account(AccountBase):
    base_url: str = "https://api-webhook-monitor-whatsapp.api.kaleyra.io"
    numbers: list[_Number]
    # Kaleyra serves stats to whitelisted IPs without auth; its other APIs want `api-key`.
    headers: dict[str, HeaderValue] = {}
    header_files: dict[str, HeaderFile] = {}
    stats_path: str = "/v1/wamonitor/stats/{number}"
    body_size_limit: ByteSize = 16 << 20  # a multi-node client's stats run to megabytes

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, numbers: list[str]) -> list[str]:
        if not numbers:
            raise ValueError("list at least one number")
        seen: set[str] = set()
        for number in numbers:
            if number in seen:
                raise ValueError(f"{number!r} is listed twice")
            seen.add(number)
        return numbers

    @field_validator("headers", "header_files")
    @classmethod
    def _names(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        header_names(headers)
        return headers

    @field_validator("stats_path")
    @classmethod
    def _stats_path(cls, path: str) -> str:
        marker = "\0"
        try:
            formatted = path.format(number=marker)
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"{path!r} may hold no placeholder but {{number}} (write {{{{ and }}}} for braces)"
            ) from None
        if not path.startswith("/") or marker not in formatted:
            raise ValueError(f"{path!r} must start with / and contain {{number}}")
        return path

    @model_validator(mode="after")
    def _merge_header_files(self) -> Account:
        """After load `headers` holds every header, wherever its value came from."""
        inline = {name.lower() for name in self.headers}
        for name in self.header_files:
            if name.lower() in inline:
                raise ValueError(f"header {name} is given in both headers and header_files")
        if self.header_files:
            object.__setattr__(self, "headers", {**self.headers, **self.header_files})
        return self


def headers(account: Account) -> dict[str, str]:
    """A configured header replaces the default of the same name, whatever its case."""
    configured = {name: value.get_secret_value() for name, value in account.headers.items()}
    if any(name.lower() == "accept" for name in configured):
        return configured
    return {"Accept": "application/json", **configured}


def provider_error(body: Any) -> str | None:
    """`{"code": "WS406", "message": ...}`, maybe inside `RESPONSE`; WS2xx codes are success."""
    if isinstance(body, Mapping) and isinstance(body.get("RESPONSE"), Mapping):
        body = body["RESPONSE"]
    if not isinstance(body, Mapping):
        return None
    code = body.get("code")
    if not isinstance(code, str) or code[:2].upper() != "WS" or code[2:3] == "2":
        return None
    message = body.get("message")
    message = " ".join(message.split())[:200] if isinstance(message, str) else ""
    return f"{code}: {message}" if message else code


# --- fetching -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorStats:
    """The client's stats as sent (read-only): which of them matter is `translate`'s business."""

    stats: Mapping[str, Any]


def _object(value: Any, path: list[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        where = ".".join(path) or "(top level)"
        raise PollError(
            "bad_response", f"monitor stats: {where}: expected an object, got {json_kind(value)}"
        )
    return value


def monitor_stats(body: Any) -> MonitorStats:
    """`data.stats` of Kaleyra's answer, with or without its `RESPONSE` wrapper, or `stats` at the
    top level as Meta's WhatsApp Business API client answers itself (`{"meta": ..., "stats":
    ...}`), so a client that is not behind Kaleyra reads the same."""
    answer, path = body, []
    if isinstance(answer, Mapping) and "RESPONSE" in answer:
        answer, path = answer["RESPONSE"], ["RESPONSE"]
    keys = ("stats",) if isinstance(answer, Mapping) and "stats" in answer else ("data", "stats")
    for key in keys:
        if key not in _object(answer, path):
            where = ".".join(path) or "(top level)"
            raise PollError("bad_response", f"monitor stats: {where}: no {key!r}")
        answer = answer[key]
        path.append(key)
    # read-only by convention, not by a deep copy: the answer is this poll's alone, read once by
    # translate and dropped, and freezing it cost a fifth of the exporter's CPU at 1,000 numbers
    return MonitorStats(MappingProxyType(_object(answer, path)))


async def fetch(account: Account, api: Api, number: str) -> MonitorStats:
    return monitor_stats(
        await api.call("GET", account.stats_path.format(number=quote(number, safe="+")))
    )


# --- translating --------------------------------------------------------------------------------

# Ours (number, node, and the exporter's provider, account) or Prometheus' (a summary's `quantile`
# and a histogram's `le` break parsing when they carry other values).
_TAKEN_LABELS = frozenset({"number", "node", "provider", "account", "quantile", "le"})
_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_UNITS = {"_ms": ("milliseconds", 1e3), "_us": ("microseconds", 1e6)}  # divisors: exact results
_EXPOSED = {
    "counter": ("", "_total"),
    "summary": ("", "_count", "_sum"),
}


@dataclass(frozen=True)
class _Source:
    """One source family of one section (and node) whose every entry is of the documented shape."""

    name: str  # sanitised
    path: str  # `section.name` as sent, for help texts
    type: str
    help: str
    entries: tuple[tuple[Labels, float], ...]


def _sanitise(name: str) -> str:
    return _INVALID.sub("_", name)


def _label_name(name: str) -> str:
    name = _sanitise(name) or "_"
    if name[0].isdigit():
        name = "_" + name
    if name.startswith("__"):
        return "exported" + name
    return "exported_" + name if name in _TAKEN_LABELS else name


def _label_value(value: Any) -> str | None:
    if value is None:
        return ""
    return str(value) if isinstance(value, str | int | float) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _object_like(value: Any) -> bool:
    """A JSON object. `isinstance(x, Mapping)` costs 340 ns (an ABC), `type(x) is dict` 40:
    translating checks every family and entry of every answer, and json.loads makes dicts."""
    return type(value) is dict or isinstance(value, Mapping)


def _list_like(value: Any) -> bool:
    return type(value) is list or isinstance(value, list | tuple)


def _labels(raw: Any, base: Labels) -> Labels | None:
    if raw is None:
        return base
    if not _object_like(raw):
        return None
    labels = list(base)
    names = {name for name, _ in base}
    for key, value in raw.items():
        name, text = _label_name(str(key)), _label_value(value)
        if text is None:
            return None
        if name in names:
            log.debug(
                "dropping a label named like an earlier one", extra={"fields": {"label": key}}
            )
            continue
        names.add(name)
        labels.append((name, text))
    return tuple(labels)


def _source(section: str, key: str, raw: Any, base: Labels) -> _Source | None:
    data = raw.get("data") if _object_like(raw) else None
    if not _list_like(data):
        return None
    entries = []
    for entry in data:
        if not _object_like(entry):
            return None
        value, labels = _number(entry.get("value")), _labels(entry.get("labels"), base)
        if value is None or labels is None:
            return None
        entries.append((labels, value))
    kind, text = raw.get("type"), raw.get("help")
    kind = kind if isinstance(kind, str) else ""
    text = text if isinstance(text, str) else ""
    name, path, kind, text = _cached(_describe, section, key, kind, text)
    return _Source(name=name, path=path, type=kind, help=text, entries=tuple(entries))


def _describe(section: str, key: str, kind: str, text: str) -> tuple[str, str, str, str]:
    sentence = " ".join(text.split()).removesuffix(".")
    return _sanitise(key), f"{section}.{key}", kind.strip().lower(), sentence


MEMO_TEXT = 1024  # characters: longer names and help texts are worked out each time, not kept


def _cached(work: Any, *texts: str) -> Any:
    """`work(*texts)`, remembered: names and help texts are the same on every poll of every
    number, and working them out was a third of translating an answer. Long texts (a hostile
    answer's) are not kept."""
    if sum(map(len, texts)) > MEMO_TEXT:
        return work(*texts)
    return _memo(work, *texts)


@functools.lru_cache(maxsize=8192)
def _memo(work: Any, *texts: str) -> Any:
    """Pure functions of their arguments only: what is kept never depends on an account."""
    return work(*texts)


def _is_family(value: Any) -> bool:
    return _object_like(value) and _list_like(value.get("data"))


def _is_node(value: Any) -> bool:
    """A node's part of a section: families by name, or `{}` on all but the primary node."""
    return (
        _object_like(value)
        and not _is_family(value)
        and all(_object_like(v) for v in value.values())
    )


def _nodes(content: Mapping[str, Any]) -> Iterator[tuple[str | None, Mapping[str, Any]]]:
    """Multi-node clients nest a section per node; single-node ones hold the families directly."""
    if any(_is_family(v) for v in content.values()):
        yield None, content
        return
    for node, families in content.items():
        if _is_node(families):
            yield node, families
        else:
            log.debug("skipping a client stats node that holds no families", extra=_at(node))


def _seconds(name: str) -> tuple[str, float, str]:
    for suffix, (unit, per_second) in _UNITS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name.removesuffix(suffix) + "_seconds", per_second, unit
    return name, 1.0, ""


def _metric_name(section: str, name: str) -> str:
    section = _sanitise(section)
    return f"whatsapp_client_{name if name.startswith(section + '_') else f'{section}_{name}'}"


def _help(text: str, origin: str, note: str) -> str:
    if text:
        return f"{text} ({origin}{note}). {POLLED}"
    return f"WhatsApp Business API {origin}{note}. {POLLED}"


def _plain(section: str, source: _Source) -> Family:
    name, kind, help_, per_second, suffix = _cached(
        _plain_header, section, source.name, source.type, source.help, source.path
    )
    return Family(
        name,
        kind,
        help_,
        tuple(Sample(labels, value / per_second, suffix) for labels, value in source.entries),
    )


def _plain_header(
    section: str, name: str, kind: str, text: str, path: str
) -> tuple[str, str, str, float, str]:
    kind = kind if kind in ("gauge", "counter") else "untyped"
    per_second, unit = 1.0, ""
    if kind == "counter" and name.endswith("_total") and name != "_total":
        name = name.removesuffix("_total")
    if kind != "untyped":
        name, per_second, unit = _seconds(name)
    note = f", converted from {unit} to seconds" if unit else ""
    suffix = "_total" if kind == "counter" else ""
    return (
        _metric_name(section, name),
        kind,
        _help(text, f"client stat {path}", note),
        per_second,
        suffix,
    )


def _summary(section: str, base: str, count: _Source, sum_: _Source) -> Family:
    """Only label sets present in both halves: a count without its sum is no usable summary."""
    name, per_second, unit = _seconds(base)
    sums: dict[frozenset, float] = {}
    for labels, value in sum_.entries:
        sums.setdefault(frozenset(labels), value)
    counted = {frozenset(labels) for labels, _ in count.entries}
    samples = []
    for labels, value in count.entries:
        if frozenset(labels) not in sums:
            log.debug("dropping a count without its sum", extra=_at(count.path, labels))
            continue
        sum_value = sums[frozenset(labels)] / per_second
        samples += [Sample(labels, value, "_count"), Sample(labels, sum_value, "_sum")]
    for labels, _ in sum_.entries:
        if frozenset(labels) not in counted:
            log.debug("dropping a sum without its count", extra=_at(sum_.path, labels))
    note = f", the sum converted from {unit} to seconds" if unit else ""
    return Family(
        _metric_name(section, name),
        "summary",
        _help(count.help or sum_.help, f"client stats {count.path} and {sum_.path}", note),
        tuple(samples),
    )


def _group(section: str, families: Mapping[str, Any], base: Labels) -> Iterator[Family]:
    """One section (of one node): pairs `<base>_count` with `<base>_sum`, the rest one by one."""
    sources: dict[str, _Source] = {}
    for key, raw in families.items():
        source = _source(section, str(key), raw, base)
        if source is None:
            log.debug("skipping a client stat of an unknown shape", extra=_at(f"{section}.{key}"))
        elif source.name in sources:
            log.debug("skipping a client stat named like another", extra=_at(f"{section}.{key}"))
        else:
            sources[source.name] = source
    paired: set[str] = set()
    for name, source in sources.items():
        stem, _, part = name.rpartition("_")
        count, sum_ = sources.get(f"{stem}_count"), sources.get(f"{stem}_sum")
        if not stem or part not in ("count", "sum") or count is None or sum_ is None:
            yield _plain(section, source)
        elif stem not in paired:
            paired.add(stem)
            yield _summary(section, stem, count, sum_)


def _clash(message: str, family: Family, first: Family, warned: set[str]) -> None:
    """Once per name and account: a clash would otherwise be logged on every poll."""
    if family.name not in warned:
        warned.add(family.name)
        fields = {"metric": family.name, "type": family.type, "first": first.name}
        log.warning(message, extra={"fields": {**fields, "first_type": first.type}})


def _at(stat: Any, labels: Labels = ()) -> dict[str, Any]:
    """Log fields naming a client stat (never a secret; the number is the business's own)."""
    return {"fields": {"stat": str(stat), **({"labels": dict(labels)} if labels else {})}}


def _exposed(family: Family) -> list[str]:
    return [family.name + suffix for suffix in _EXPOSED.get(family.type, ("",))]


def _merge(families: Iterable[Family], warned: set[str]) -> list[Family]:
    """Same name and type: one family. Otherwise the first wins, so the exposition stays valid."""
    kept: dict[str, Family] = {}
    # samples by suffix and label set, made only for a family that may repeat one: most have a
    # single sample under a name of their own, and are kept as they are
    samples: dict[str, dict[tuple[str, frozenset], Sample]] = {}
    owner: dict[str, Family] = {}  # every sample name a kept family exposes -> that family
    for family in families:
        name = family.name
        first = kept.get(name)
        if first is None:
            exposed = _exposed(family)
            other = next((owner[n] for n in exposed if n in owner), None)
            if other is not None:
                _clash(
                    "dropping a client stat whose samples clash with another's",
                    family,
                    other,
                    warned,
                )
                continue
            kept[name] = family
            owner.update(dict.fromkeys(exposed, family))
            if len(family.samples) < 2:
                continue
            bucket = samples[name] = {}
        elif first.type != family.type:
            _clash(
                "dropping a client stat of another type than the first of its name",
                family,
                first,
                warned,
            )
            continue
        else:
            bucket = samples.get(name)
            if bucket is None:
                bucket = samples[name] = {}
                for sample in first.samples:
                    bucket.setdefault((sample.suffix, frozenset(sample.labels)), sample)
            kept[name] = replace(first, samples=())  # merged: its samples are the bucket's
        for sample in family.samples:
            bucket.setdefault((sample.suffix, frozenset(sample.labels)), sample)
    out = []
    for name in sorted(kept):
        family, bucket = kept[name], samples.get(name)
        if bucket is not None and len(bucket) != len(family.samples):
            family = replace(family, samples=tuple(bucket.values()))
        if family.samples:
            out.append(family)
    return out


def translate(number: str, result: MonitorStats, warned: set[str] | None = None) -> list[Family]:
    """Every family the client sent, renamed and typed by rule (README.md, "Metrics").
    `warned`: names of clashes already logged for this account."""

    def families() -> Iterator[Family]:
        for section, content in result.stats.items():
            if not _object_like(content):
                log.debug("skipping a client stats section that is no object", extra=_at(section))
                continue
            for node, group in _nodes(content):
                base: Labels = (("number", number),)
                if node is not None:
                    base += (("node", str(node)),)
                yield from _group(str(section), group, base)

    return _merge(families(), set() if warned is None else warned)


# --- the provider -------------------------------------------------------------------------------


def endpoints(account: Account, defaults: Defaults, state: object) -> list[Endpoint]:
    numbers = tuple(account.numbers)
    warned: set[str] = set()

    def targets(known: Known) -> Sequence[str]:
        return numbers

    return [
        Endpoint(
            "monitor_stats",
            account.interval or defaults.interval,
            targets,
            functools.partial(fetch, account),
            functools.partial(translate, warned=warned),
            pure=True,
        )
    ]


PROVIDER = Provider(
    name="kaleyra",
    account_model=Account,
    default_rate_limit=RateLimit(requests=60, period=60.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
)
