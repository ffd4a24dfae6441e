"""The newest answer of every target as rendered sample lines, and the exposition joined from them
(docs/architecture.md, "Data flow").

Owned by the event loop: only the loop calls the writing methods. A poll re-renders only its own
target's lines, into one block per metric family, joined in chunks of members; publishing
lines up the blocks' headers and chunks as references (cheap), re-joining only the chunks whose
members changed. Every change bumps `generation`, and an exposition is only ever replaced by one
of a newer generation. Families kept by someone else (a provider's own state, which may change
hundreds of times a second) are followed: a change only marks them outdated, and they are
rendered once, just before the next publication. What a scrape gets of an exposition (its
format, gzip) is the serving room's business (exporter.serving).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from exporter.exposition import (
    EOF,
    Rendered,
    float_text,
    header,
    label_text,
    render,
    sample_lines,
)
from exporter.metrics import REASONS, Family, Labels, Sample

log = logging.getLogger(__name__)


class PollFailure(Protocol):
    reason: str  # one of REASONS
    detail: str


@dataclass(frozen=True, order=True)
class TargetKey:
    provider: str
    account: str
    endpoint: str
    target: str


@dataclass(frozen=True)
class TargetState:
    """What the landing page and the health metrics show about one target (never its values:
    those live only as rendered lines)."""

    key: TargetKey
    interval: float
    up: bool | None = None  # None: not polled yet
    last_poll: float | None = None
    last_success: float | None = None
    duration: float | None = None
    error: str = ""
    reason: str = ""
    stale: bool = False
    failing_since: float | None = None  # the first failure after the newest success


@dataclass(frozen=True, slots=True)
class Poll:
    """One poll as the status page lists it."""

    at: float
    duration: float
    reason: str  # "" for a success


HISTORY = 6  # polls kept per target for the status page: at 30k targets, ~15 MB


class Exposition:
    """One published version: the pieces of both formats (headers and chunks, shared with the
    snapshot, never copied). A big plain body is written in batches of pieces: joining it would be
    one more copy of the whole exposition (12 MB at 100k series) for as long as the version is
    served. Compressing it is the serving room's business (exporter.serving)."""

    def __init__(self, generation: int, text: list[bytes], openmetrics: list[bytes]):
        self.generation = generation
        self._pieces = {False: text, True: openmetrics}
        self._sizes: dict[bool, int] = {}
        self._bodies: dict[bool, bytes] = {}  # joined ones asked for

    def pieces(self, openmetrics: bool) -> list[bytes]:
        return self._pieces[openmetrics]

    def size(self, openmetrics: bool) -> int:
        """Bytes of the uncompressed body."""
        if openmetrics not in self._sizes:
            self._sizes[openmetrics] = sum(map(len, self._pieces[openmetrics]))
        return self._sizes[openmetrics]

    def body(self, openmetrics: bool = False) -> bytes:
        """The whole body, joined once."""
        if openmetrics not in self._bodies:
            self._bodies[openmetrics] = self.joined(openmetrics)
        return self._bodies[openmetrics]

    @property
    def plain(self) -> bytes:
        return self.body()

    def joined(self, openmetrics: bool) -> bytes:
        return b"".join(self._pieces[openmetrics])


CHUNK = 64  # members joined together: a change re-joins its chunk, not its whole family


class _Chunk:
    """A run of members in sorted order, their lines, and those lines joined (None: one of them
    changed since). `numbered`: False while the places its members have in the block's `where`
    are out of date, after members came or went; set right on the next look-up. During a first
    round a chunk gets dozens of new members before any is looked up, and renumbering after each
    one was 60% of the work."""

    __slots__ = ("keys", "numbered", "om", "parts", "text")

    def __init__(self, keys: list[tuple[str, ...]], parts: list[bytes]):
        self.keys = keys
        self.parts = parts
        self.text: bytes | None = None
        self.om: bytes | None = None
        self.numbered = False


class _Block:
    """One metric family: its header and, per member (a target, an endpoint, an extra), the
    member's rendered sample lines, kept in sorted order in chunks of CHUNK to 2 x CHUNK members.
    A changed member re-joins only its chunk: at 1,000 numbers a family has 1,000 members, and a
    poll changes one; it is found in a dict. A member that comes or goes is placed by bisection
    and changes only its chunk too (a full new cut, sorting all members, took 2 ms per family:
    at the end of a first round, or when a target went stale and came back, a publication cut
    ~100 families)."""

    __slots__ = ("chunks", "family", "firsts", "om_header", "openmetrics", "text_header", "where")

    def __init__(self, family: Family):
        self.family = family
        self.text_header = header(family)
        self.om_header = header(family, openmetrics=True)
        # a member's lines where OpenMetrics differs (counters with `_created` after each series)
        self.openmetrics: dict[tuple[str, ...], bytes] = {}
        self.chunks: list[_Chunk] = []
        self.firsts: list[tuple[str, ...]] = []  # each chunk's first member, for bisection
        self.where: dict[tuple[str, ...], tuple[_Chunk, int]] = {}  # member -> chunk, place

    def __len__(self) -> int:
        return len(self.where)

    def put(self, member: tuple[str, ...], lines: bytes) -> None:
        found = self.where.get(member)
        if found is not None:
            chunk, j = found
            if not chunk.numbered:
                chunk, j = self._renumber(chunk, member)
            if chunk.parts[j] == lines:  # a poll hands over all its families, mostly the same
                return
            chunk.parts[j] = lines
            chunk.text = chunk.om = None
            return
        if not self.chunks:
            self._place(0, _Chunk([member], [lines]))
            return
        i = max(bisect_right(self.firsts, member) - 1, 0)
        chunk = self.chunks[i]
        j = bisect_left(chunk.keys, member)
        chunk.keys.insert(j, member)
        chunk.parts.insert(j, lines)
        self.firsts[i] = chunk.keys[0]
        self.where[member] = (chunk, j)
        chunk.numbered = False
        chunk.text = chunk.om = None
        if len(chunk.keys) > 2 * CHUNK:
            self._split(i)

    def remove(self, member: tuple[str, ...]) -> None:
        chunk, j = self.where[member]
        if not chunk.numbered:
            chunk, j = self._renumber(chunk, member)
        del self.where[member]
        self.openmetrics.pop(member, None)
        del chunk.keys[j]
        del chunk.parts[j]
        i = max(bisect_right(self.firsts, member) - 1, 0)
        if len(chunk.keys) < CHUNK // 2 and len(self.chunks) > 1:  # merge with a neighbour
            i = i if i + 1 < len(self.chunks) else i - 1
            first, second = self.chunks[i], self.chunks[i + 1]
            self._drop(i + 1)
            self._drop(i)
            self._place(i, _Chunk(first.keys + second.keys, first.parts + second.parts))
            if len(self.chunks[i].keys) > 2 * CHUNK:
                self._split(i)
        elif not chunk.keys:
            self._drop(i)
        else:
            self.firsts[i] = chunk.keys[0]
            chunk.numbered = False
            chunk.text = chunk.om = None

    def _split(self, i: int) -> None:
        keys, parts = self.chunks[i].keys, self.chunks[i].parts
        self._drop(i)
        self._place(i, _Chunk(keys[CHUNK:], parts[CHUNK:]))
        self._place(i, _Chunk(keys[:CHUNK], parts[:CHUNK]))

    def _place(self, i: int, chunk: _Chunk) -> None:
        self.chunks.insert(i, chunk)
        self.firsts.insert(i, chunk.keys[0])
        self.where.update(dict.fromkeys(chunk.keys, (chunk, -1)))  # numbered when looked up

    def _drop(self, i: int) -> None:
        del self.chunks[i]
        del self.firsts[i]

    def _renumber(self, chunk: _Chunk, member: tuple[str, ...]) -> tuple[_Chunk, int]:
        """The chunk's members' places made right; `member`'s."""
        where = self.where
        for j, key in enumerate(chunk.keys):
            where[key] = (chunk, j)
        chunk.numbered = True
        return where[member]

    def lines(self, openmetrics: bool) -> list[bytes]:
        out = []
        for chunk in self.chunks:
            if chunk.text is None:
                chunk.text = b"".join(chunk.parts)
            out.append(chunk.text)
        if not openmetrics or not self.openmetrics:
            return out
        own = self.openmetrics
        for k, chunk in enumerate(self.chunks):
            if chunk.om is None:
                chunk.om = (
                    b"".join(own.get(m) or p for m, p in zip(chunk.keys, chunk.parts, strict=True))
                    if any(m in own for m in chunk.keys)
                    else chunk.text
                )
            out[k] = chunk.om  # type: ignore[assignment]
        return out


_HEALTH = {
    "up": Family(
        "whatsapp_exporter_up",
        "gauge",
        "Whether the newest poll of this provider endpoint and target succeeded (1) or not (0).",
        (),
    ),
    "last_success": Family(
        "whatsapp_exporter_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the newest successful poll of this provider endpoint and target.",
        (),
    ),
    "duration": Family(
        "whatsapp_exporter_poll_duration_seconds",
        "gauge",
        "Wall time of the newest poll of this target, including any wait for the account's "
        "request budget.",
        (),
    ),
}
_ERRORS = Family("whatsapp_exporter_poll_errors", "counter", "Failed polls by reason.", ())


def _no_errors() -> dict[str, int]:
    return dict.fromkeys(REASONS, 0)


class Snapshot:
    def __init__(
        self,
        version: str,
        *,
        stale_after: int = 3,
        clock: Callable[[], float] = time.time,
        build_labels: Mapping[str, str] | None = None,
    ):
        self._version = version
        self._stale_after = stale_after
        self._clock = clock
        self._targets: dict[TargetKey, TargetState] = {}
        # no target's values go stale before this: expire() runs every second and looked at all
        # of them each time (1.5 ms at 1,000 targets)
        self._next_stale = -math.inf
        self._history: dict[TargetKey, deque[Poll]] = {}
        self._health_labels: dict[TargetKey, str] = {}  # `{account="...",...}` per target
        self._errors: dict[tuple[str, str, str], dict[str, int]] = {}
        self._created: dict[tuple[str, str, str], float] = {}  # when each endpoint's counting began
        self._blocks: dict[str, _Block] = {}
        self._names: list[str] | None = None  # sorted block names
        self._owned: dict[tuple[str, ...], set[str]] = {}  # member -> names of its blocks
        self._clashes: set[str] = set()  # family names already warned about
        self._followed: dict[str, Callable[[], Iterable[Family]]] = {}
        self._outdated: set[str] = set()  # followed families changed since they were rendered
        self.dropped_samples = 0
        self.generation = 0
        self._changed = asyncio.Event()
        self._put(("g", "build"), [_build_info(version, build_labels or {})])
        self._put(("g", "dropped"), [_samples_dropped(0)])
        self.reload_result(True)
        self.exposition = self._exposition()

    # --- writing (event loop) ---

    def configure(self, stale_after: int, endpoints: Iterable[tuple[str, str, str]]) -> None:
        """Start counting errors for these endpoints (at 0, so rate() works from the first scrape)
        and forget every target and counter of endpoints no longer configured."""
        wanted = set(endpoints)
        self._stale_after = stale_after
        self._next_stale = -math.inf
        now = self._clock()
        for gone in set(self._errors) - wanted:
            del self._errors[gone]
            self._created.pop(gone, None)
            self._put(("e", *gone), ())
        for new in sorted(wanted - set(self._errors)):
            self._errors[new] = _no_errors()
            self._render_errors(new, created=now)
        self._forget(k for k in self._targets if (k.provider, k.account, k.endpoint) not in wanted)
        self._touch()

    def retain(self, provider: str, account: str, endpoint: str, targets: Iterable[str]) -> None:
        """Forget targets an endpoint no longer polls (a device removed from the account)."""
        keep = set(targets)
        self._forget(
            k
            for k in self._targets
            if (k.provider, k.account, k.endpoint) == (provider, account, endpoint)
            and k.target not in keep
        )

    def succeeded(
        self,
        key: TargetKey,
        interval: float,
        families: Iterable[Family | Rendered],
        duration: float,
    ) -> None:
        now = self._clock()
        state = TargetState(
            key, interval, up=True, last_poll=now, last_success=now, duration=duration
        )
        self._set(state)
        self._remember(key, Poll(now, duration, ""))
        self._put(
            ("v", *_fields(key)),
            families,
            (("provider", key.provider), ("account", key.account)),
        )
        self._render_health(state)

    def amended(self, key: TargetKey, families: Iterable[Family | Rendered], since: float) -> bool:
        """A target's values changed by news from elsewhere (a provider's webhook) that
        happened at `since`: shown at once, its health untouched. Refused (False) when the
        target has no values shown or its newest success is later than the news, which the
        poll then already knew."""
        state = self._targets.get(key)
        if state is None or state.last_success is None or state.stale:
            return False
        if state.last_success > since:
            return False
        self._put(
            ("v", *_fields(key)),
            families,
            (("provider", key.provider), ("account", key.account)),
        )
        return True

    def unchanged(self, key: TargetKey, interval: float, duration: float) -> bool:
        """A success whose answer is byte for byte the previous one: only health is new. False
        when the target has no values to keep (never succeeded, or gone stale): render then."""
        old = self._targets.get(key)
        if old is None or old.last_success is None or old.stale:
            return False
        now = self._clock()
        state = TargetState(
            key, interval, up=True, last_poll=now, last_success=now, duration=duration
        )
        self._set(state)
        self._remember(key, Poll(now, duration, ""))
        self._render_health(state)
        return True

    def failed(self, key: TargetKey, interval: float, error: PollFailure, duration: float) -> None:
        """Keep the target's last values (until they go stale), mark it down, count the reason."""
        reason = error.reason
        old = self._targets.get(key) or TargetState(key, interval)
        now = self._clock()
        state = replace(
            old,
            interval=interval,
            up=False,
            last_poll=now,
            duration=duration,
            error=f"{reason}: {error.detail}",
            reason=reason,
            failing_since=old.failing_since if old.up is False else now,
        )
        self._set(state)
        self._remember(key, Poll(now, duration, reason))
        endpoint = (key.provider, key.account, key.endpoint)
        counts = self._errors.get(endpoint)
        if counts is None:  # polled before configure() named it: count it all the same
            counts = self._errors[endpoint] = _no_errors()
        counts[reason] += 1
        self._render_errors(endpoint)
        self._render_health(state)

    def set_extra(self, name: str, families: Iterable[Family]) -> None:
        """Families that belong to no single poll (state kept by a provider, such as D7's
        ledger); their samples carry their own provider and account labels."""
        self._put(("x", name), families)

    def follow(self, name: str, families: Callable[[], Iterable[Family]]) -> None:
        """Extra families that someone else keeps and says when they change (`outdated`):
        rendered from `families()` just before the next publication, once however many changes
        came since the previous one. A burst of D7 callbacks once rendered the ledger's families
        three times per request, 62% of the exporter's CPU."""
        self._followed[name] = families
        self.outdated(name)

    def outdated(self, name: str) -> None:
        """`name`'s followed families changed: render them before the next publication."""
        self._outdated.add(name)
        self._changed.set()

    def reload_result(self, ok: bool) -> None:
        self._put(
            ("g", "reload"),
            [
                Family(
                    "whatsapp_exporter_config_last_reload_successful",
                    "gauge",
                    "Whether the newest config reload succeeded (1) or kept the old config (0).",
                    (Sample((), float(ok)),),
                )
            ],
        )

    def expire(self) -> None:
        """Drop the values of targets with no success for `stale_after` of their intervals."""
        now = self._clock()
        if now <= self._next_stale:
            return
        self._next_stale = math.inf
        for key, state in list(self._targets.items()):
            if state.stale or state.last_success is None:
                continue
            due = state.last_success + self._stale_after * state.interval
            if now > due:
                self._targets[key] = replace(state, stale=True)
                self._put(("v", *_fields(key)), ())
            else:
                self._next_stale = min(self._next_stale, due)

    def _set(self, state: TargetState) -> None:
        self._targets[state.key] = state
        if state.last_success is not None and not state.stale:
            due = state.last_success + self._stale_after * state.interval
            self._next_stale = min(self._next_stale, due)

    # --- publishing (event loop) ---

    async def changed(self) -> None:
        """Returns once something changed since the newest published exposition."""
        while self.generation == self.exposition.generation and not self._outdated:
            self._changed.clear()
            await self._changed.wait()

    def publish(self) -> bool:
        """Make the newest state the published exposition, if anything changed; followed
        families that changed are rendered first."""
        outdated, self._outdated = self._outdated, set()
        for name in sorted(outdated):
            try:
                families = list(self._followed[name]())
            except Exception:  # the publisher lives on, with that state's previous lines
                log.exception("rendering followed families failed", extra={"fields": {"of": name}})
                continue
            self.set_extra(name, families)
        if self.generation == self.exposition.generation:
            return False
        self.exposition = self._exposition()
        return True

    def _exposition(self) -> Exposition:
        text: list[bytes] = []
        openmetrics: list[bytes] = []
        if self._names is None:
            self._names = sorted(self._blocks)
        for name in self._names:
            block = self._blocks[name]
            text.append(block.text_header)
            text += block.lines(False)
            openmetrics.append(block.om_header)
            openmetrics += block.lines(True)
        openmetrics.append(EOF)
        return Exposition(self.generation, text, openmetrics)

    # --- reading (event loop) ---

    def targets(self) -> list[TargetState]:
        return sorted(self._targets.values(), key=lambda s: s.key)

    def history(self, key: TargetKey) -> tuple[Poll, ...]:
        """The newest polls of a target, newest first."""
        return tuple(reversed(self._history.get(key, ())))

    # --- inside ---

    def _touch(self) -> None:
        self.generation += 1
        self._changed.set()

    def _remember(self, key: TargetKey, poll: Poll) -> None:
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = deque(maxlen=HISTORY)
        history.append(poll)

    def _forget(self, keys: Iterable[TargetKey]) -> None:
        for key in list(keys):
            del self._targets[key]
            self._history.pop(key, None)
            self._health_labels.pop(key, None)
            self._put(("v", *_fields(key)), ())
            self._put(("h", *_fields(key)), ())

    def _render_health(self, state: TargetState) -> None:
        """Written straight from the target's label text, made once: every poll of every target
        comes here, and the general renderer cost more than the rest of an unchanged poll."""
        key = state.key
        braces = self._health_labels.get(key)
        if braces is None:
            braces = self._health_labels[key] = "{" + label_text(_health_labels(key)) + "}"
        items = [_health_line("up", braces, float(state.up))]
        if state.last_success is not None:
            items.append(_health_line("last_success", braces, state.last_success))
        if state.duration is not None:
            items.append(_health_line("duration", braces, state.duration))
        self._put(("h", *_fields(key)), items)

    def _render_errors(self, endpoint: tuple[str, str, str], created: float | None = None) -> None:
        provider, account, name = endpoint
        base = (("provider", provider), ("account", account), ("endpoint", name))
        samples = tuple(
            Sample((*base, ("reason", reason)), float(count), "_total")
            for reason, count in self._errors[endpoint].items()
        )
        member = ("e", *endpoint)
        self._put(member, [replace(_ERRORS, samples=samples)])
        if created is not None:  # OpenMetrics: each series' start right after it
            interleaved = tuple(
                x for s in samples for x in (s, Sample(s.labels, created, "_created"))
            )
            self._created[endpoint] = created
        elif endpoint in self._created:
            at = self._created[endpoint]
            interleaved = tuple(x for s in samples for x in (s, Sample(s.labels, at, "_created")))
        else:
            return
        block = self._blocks[_ERRORS.name]
        # its text lines changed with it (a count), so _put already marked its chunk
        block.openmetrics[member] = sample_lines(replace(_ERRORS, samples=interleaved))[0]

    def _put(
        self,
        member: tuple[str, ...],
        families: Iterable[Family | Rendered],
        prefix: Labels = (),
    ) -> None:
        """Replace every line `member` has in the exposition with these families' samples
        (families are rendered here; a poll hands them over rendered already)."""
        families = list(families)
        items = [f for f in families if isinstance(f, Rendered)]
        items += render([f for f in families if not isinstance(f, Rendered)], prefix)
        rendered: dict[str, bytes] = {}
        for item in items:
            fam = item.family
            if not item.valid:
                self._clash(fam, "dropping a metric family with an invalid name or type")
                continue
            block = self._blocks.get(fam.name)
            if block is not None and block.family.type != fam.type:
                self._clash(
                    fam,
                    "dropping a metric family whose type differs from an earlier one of that name",
                    block.family.type,
                )
                continue
            if item.dropped:
                self._dropped(fam, item.dropped)
            if not item.lines:
                continue
            if block is None:
                block = self._blocks[fam.name] = _Block(fam)
                self._names = None
            rendered[fam.name] = rendered.get(fam.name, b"") + item.lines
        for name, lines in rendered.items():
            self._blocks[name].put(member, lines)
        for name in self._owned.get(member, set()) - set(rendered):
            block = self._blocks[name]
            block.remove(member)
            if not block:
                del self._blocks[name]
                self._names = None
        if rendered:
            self._owned[member] = set(rendered)
        else:
            self._owned.pop(member, None)
        self._touch()

    def _dropped(self, fam: Family, count: int) -> None:
        self.dropped_samples += count
        self._clash(
            fam, "dropping samples that cannot be exposed: a negative count, or a bad label name"
        )
        self._put(("g", "dropped"), [_samples_dropped(self.dropped_samples)])

    def _clash(self, fam: Family, message: str, first_type: str = "") -> None:
        if fam.name in self._clashes:
            return
        self._clashes.add(fam.name)
        fields = {"metric": fam.name, "type": fam.type}
        log.warning(
            message,
            extra={"fields": {**fields, **({"first_type": first_type} if first_type else {})}},
        )


def _health_labels(key: TargetKey) -> Labels:
    """Sorted by name, as sample_lines writes labels."""
    return (
        ("account", key.account),
        ("endpoint", key.endpoint),
        ("provider", key.provider),
        ("target", key.target),
    )


def _health_line(name: str, braces: str, value: float) -> Rendered:
    family = _HEALTH[name]
    line = f"{family.name}{braces} {float_text(value)}\n".encode("utf-8", "replace")
    return Rendered(family, line, 0)


def _fields(key: TargetKey) -> tuple[str, str, str, str]:
    return key.provider, key.account, key.endpoint, key.target


def _samples_dropped(count: int) -> Family:
    return Family(
        "whatsapp_exporter_samples_dropped",
        "counter",
        "Samples from providers that could not be exposed (a negative counter, an invalid or "
        "repeated label name) and were left out; the log names the metric.",
        (Sample((), float(count), "_total"),),
    )


def _build_info(version: str, labels: Mapping[str, str]) -> Family:
    return Family(
        "whatsapp_exporter_build_info",
        "gauge",
        "Version of the exporter, always 1.",
        (Sample((("version", version), *labels.items()), 1.0),),
    )
