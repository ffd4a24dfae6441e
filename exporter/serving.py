"""/metrics as a scraper gets it: the format it asked for, as bytes that already exist.

The snapshot publishes expositions (both formats, as the pieces they are made of); this room turns
the newest one into answers. Text 0.0.4 or OpenMetrics, by the scraper's Accept header; gzip by its
Accept-Encoding. A big plain body is written from its pieces, never joined whole. A gzip body is
made at most once per published exposition, and a gzip scrape that arrives while the newest one
is still being compressed gets the previous one rather than waiting, if that one was the newest
a moment ago (GZIP_STALE). Scrapers back to back get a new gzip after a rest (GZIP_REST), not one
per version. A scraper at a steady interval (Prometheus) has its next body compressed just before
it is due (Rhythm), so it finds it ready instead of waiting for a compression. A reload's answer
may promise that every later scrape shows its version at least (`show_from`): no fallback older
than that is served.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from aiohttp import web

from exporter.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE
from exporter.snapshot import Exposition

STREAM_OVER = 1 << 20  # bytes: a bigger plain /metrics body is written in batches
STREAM_BATCH = 256 << 10  # bytes per write of a streamed body
COMPRESS_IN_THREAD = 256 << 10  # bytes: below this, gzip costs less than a thread hop
GZIP_BATCH = 1 << 20  # bytes per zlib call: each lets go of the lock and takes it back
# after compressing a version for gzip scrapers, rest up to this many times as long before the
# next: with scrapers back to back and a new version every 100 ms, gzip stays under ~20% of a core
GZIP_REST = 4
GZIP_STALE = 2.0  # seconds: the oldest gzip body served rather than waiting for the newest
# A scraper whose last three gzip scrapes came this far apart or more, at a steady interval
# (within RHYTHM_SLACK of it), has the next body compressed just before it is due.
RHYTHM_MIN = 2 * GZIP_STALE
RHYTHM_SLACK = 0.05
RHYTHM_KEEP = 16  # scrapers followed at most (the most recent)

Scraper = tuple[str, str]  # its address and User-Agent


@dataclass(frozen=True)
class Variant:
    openmetrics: bool = False
    gzip: bool = False

    @classmethod
    def asked(cls, headers: Mapping[str, str]) -> Variant:
        return cls(
            openmetrics=_wants_openmetrics(headers.get("Accept", "")),
            gzip=_accepts_gzip(headers.get("Accept-Encoding", "")),
        )

    @property
    def content_type(self) -> str:
        return OPENMETRICS_CONTENT_TYPE if self.openmetrics else TEXT_CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class _Zipped:
    generation: int
    body: bytes
    newest_at: float  # a moment its version was the newest


class Scrapes:
    """Answers /metrics from the newest published exposition (`exposition()`), on the loop."""

    def __init__(self, exposition: Callable[[], Exposition]):
        self._exposition = exposition
        self._zipped: dict[Variant, _Zipped] = {}  # per variant, the newest gzip body made
        # no new gzip before then: compressing every version scrapers meet would take a core
        self._rest_until: dict[Variant, float] = {}
        self._zipping: dict[Variant, tuple[int, asyncio.Future[bytes]]] = {}  # one at a time
        self._took: dict[Variant, float] = {}  # how long the newest compression took
        self._floor = 0  # no gzip body of an older generation is served any more
        self._rhythm = Rhythm()
        self._ahead: dict[tuple[Scraper, Variant], asyncio.TimerHandle] = {}  # per scraper
        self.exposition_bytes = 0  # the newest uncompressed body served

    def stop(self) -> None:
        for timer in self._ahead.values():
            timer.cancel()
        self._ahead.clear()

    def show_from(self, generation: int) -> None:
        """From now on every scrape shows this version or a newer one: a reload was answered."""
        self._floor = max(self._floor, generation)

    def ready(self, variant: Variant) -> bytes | None:
        """The newest exposition's gzip body, if it is made."""
        zipped = self._zipped.get(variant)
        if zipped is None or zipped.generation != self._exposition().generation:
            return None
        return zipped.body

    async def answer(self, request: web.Request) -> web.StreamResponse:
        variant = Variant.asked(request.headers)
        exposition = self._exposition()
        headers = {"Content-Type": variant.content_type, "Vary": "Accept, Accept-Encoding"}
        if variant.gzip:
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=await self._gzip(request, variant), headers=headers)
        size = self.exposition_bytes = exposition.size(variant.openmetrics)
        if size > STREAM_OVER:
            return await _stream(request, exposition.pieces(variant.openmetrics), size, headers)
        return web.Response(body=exposition.body(variant.openmetrics), headers=headers)

    async def _gzip(self, request: web.Request, variant: Variant) -> bytes:
        steady = self._follow(request, variant)
        exposition = self._exposition()
        body = self.ready(variant)
        if body is None and _cheap(exposition, variant):
            body = compress(exposition, variant.openmetrics)
        if body is not None:
            self._keep(exposition.generation, variant, body, time.monotonic())
            return body
        previous = self._fallback(variant)
        if previous is not None:
            # the newest gzip is on its way, or resting; until then the previous one, a moment older
            if (
                not steady  # its next body is made before it comes: this one would be wasted
                and variant not in self._zipping
                and time.monotonic() >= self._rest_until.get(variant, 0.0)
            ):
                self._zip(exposition, variant)
            return previous
        return await self._wait(variant)

    async def _wait(self, variant: Variant) -> bytes:
        """Nothing recent enough at hand: wait for the compression on its way (its version was
        the newest when it started, a moment ago), or for this version's; one at a time, as ten
        scrapers that each started their own once took 1.3 s. One older than a promised version
        is waited for, then the newest is made."""
        while True:
            if (body := self.ready(variant)) is not None:
                return body
            zipping = self._zipping.get(variant)
            if zipping is None or zipping[1].done():
                zipping = self._zip(self._exposition(), variant)
            generation, work = zipping
            body = await asyncio.shield(work)
            if generation >= self._floor:
                return body

    def _follow(self, request: web.Request, variant: Variant) -> bool:
        """Note this gzip scrape; if its scraper comes at a steady interval (Prometheus does),
        compress the newest version just before the next one is due, so that it finds a body
        ready rather than waiting for a compression (100-300 ms at 100k series), for the same
        work: one compression per scrape. True if the scraper is steady."""
        scraper = (getattr(request, "remote", None) or "", request.headers.get("User-Agent", ""))
        now = time.monotonic()
        due, jitter, forgotten = self._rhythm.scraped(scraper, now)
        for gone in forgotten:
            for key in [k for k in self._ahead if k[0] == gone]:
                self._ahead.pop(key).cancel()
        key = (scraper, variant)
        if (timer := self._ahead.pop(key, None)) is not None:
            timer.cancel()
        if due is None:
            return False
        # ahead by twice the newest compression's time and by how much the interval varied,
        # but the body must still be recent enough to serve (GZIP_STALE) when the scrape comes
        lead = min(2 * self._took.get(variant, 0.0) + 0.1 + jitter, GZIP_STALE / 2)
        loop = asyncio.get_running_loop()
        self._ahead[key] = loop.call_later(max(0.0, due - lead - now), self._ahead_of, key)
        return True

    def _ahead_of(self, key: tuple[Scraper, Variant]) -> None:
        self._ahead.pop(key, None)
        variant = key[1]
        if variant in self._zipping or self.ready(variant) is not None:
            return
        self._zip(self._exposition(), variant)

    def _fallback(self, variant: Variant) -> bytes | None:
        """The newest gzip body at hand, if it was the newest version less than GZIP_STALE ago
        (and is not older than a reload's answer promised): a scraper every 15 s always gets a
        fresh one (it waits for it), scrapers back to back share the work."""
        zipped = self._zipped.get(variant)
        if zipped is None or zipped.generation < self._floor:
            return None
        return zipped.body if time.monotonic() - zipped.newest_at < GZIP_STALE else None

    def _zip(self, exposition: Exposition, variant: Variant) -> tuple[int, asyncio.Future[bytes]]:
        work = asyncio.ensure_future(_compressed(exposition, variant))
        work.add_done_callback(
            functools.partial(self._remember, exposition.generation, variant, time.monotonic())
        )
        zipping = self._zipping[variant] = (exposition.generation, work)
        return zipping

    def _remember(
        self, generation: int, variant: Variant, started: float, done: asyncio.Future[bytes]
    ) -> None:
        if self._zipping.get(variant, (0, None))[1] is done:
            del self._zipping[variant]
        finished = time.monotonic()
        took = self._took[variant] = finished - started
        # short enough that the next body is ready before this one is GZIP_STALE old: it is
        # served until then, and was the newest at `started` at least
        rest = max(0.0, min(GZIP_REST * took, GZIP_STALE - 2.5 * took))
        self._rest_until[variant] = finished + rest
        if not done.cancelled() and done.exception() is None:
            newest = self._exposition().generation == generation
            self._keep(generation, variant, done.result(), finished if newest else started)

    def _keep(self, generation: int, variant: Variant, body: bytes, newest_at: float) -> None:
        zipped = self._zipped.get(variant)
        if zipped is None or generation >= zipped.generation:
            self._zipped[variant] = _Zipped(generation, body, newest_at)


class Rhythm:
    """When each scraper is next due, if it scrapes at a steady interval of at least RHYTHM_MIN:
    its last three scrapes, the two gaps within RHYTHM_SLACK of each other. Scrapers back to
    back are left to the fallback and the rest. Keeps the RHYTHM_KEEP most recent scrapers."""

    def __init__(self) -> None:
        self._seen: dict[Scraper, tuple[float, float]] = {}  # -> the last two scrapes

    def scraped(self, scraper: Scraper, now: float) -> tuple[float | None, float, list[Scraper]]:
        """When `scraper` is next due (None: not steady), by how much its last two gaps
        differed, and the scrapers forgotten to make room for it."""
        before, last = self._seen.pop(scraper, (math.nan, math.nan))
        self._seen[scraper] = (last, now)  # the most recent last: dicts keep insertion order
        forgotten = []
        while len(self._seen) > RHYTHM_KEEP:
            oldest = next(iter(self._seen))
            del self._seen[oldest]
            forgotten.append(oldest)
        gap, previous = now - last, last - before
        jitter = abs(gap - previous)
        if gap >= RHYTHM_MIN and jitter <= RHYTHM_SLACK * previous:
            return now + gap, jitter, forgotten
        return None, jitter, forgotten


def compress(exposition: Exposition, openmetrics: bool) -> bytes:
    """Pure: safe in a thread (zlib lets go of the interpreter lock)."""
    return _gzip(exposition.pieces(openmetrics), exposition.size(openmetrics))


def _cheap(exposition: Exposition, variant: Variant) -> bool:
    """Small enough to compress on the loop, right away (a couple of milliseconds)."""
    return exposition.size(variant.openmetrics) < COMPRESS_IN_THREAD


async def _compressed(exposition: Exposition, variant: Variant) -> bytes:
    exposition.size(variant.openmetrics)  # counted here, on the loop
    if _cheap(exposition, variant):
        return compress(exposition, variant.openmetrics)
    return await asyncio.to_thread(compress, exposition, variant.openmetrics)


def batches(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Consecutive pieces joined into runs of about `size` bytes: few calls, no whole copy."""
    batch: list[bytes] = []
    held = 0
    for piece in pieces:
        batch.append(piece)
        held += len(piece)
        if held >= size:
            yield b"".join(batch)
            batch.clear()
            held = 0
    if batch:
        yield b"".join(batch)


def _gzip(pieces: list[bytes], size: int) -> bytes:
    """One gzip member, fed in batches of about GZIP_BATCH: never a joined copy of the plain
    body, and not one call per piece either (zlib lets go of the interpreter lock on each call,
    and at 600 pieces taking it back each time slowed the event loop's scrapes 10x). Level 1 on
    big bodies: ~4x cheaper than 6 for Prometheus text, and still ~10x smaller."""
    packer = zlib.compressobj(6 if size < 1 << 20 else 1, zlib.DEFLATED, 31)
    out = [packer.compress(batch) for batch in batches(pieces, GZIP_BATCH)]
    out.append(packer.flush())
    return b"".join(out)


async def _stream(
    request: web.Request, pieces: list[bytes], size: int, headers: dict[str, str]
) -> web.StreamResponse:
    """A big plain body as the chunks it is made of, with its length up front, written in
    batches of about STREAM_BATCH. Each connection then buffers at most about a batch of it,
    where one write of the whole body would have the transport copy what the socket did not
    take at once: ~10 MB per scraper."""
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    await response.prepare(request)
    if request.method != "HEAD":
        for batch in batches(pieces, STREAM_BATCH):
            await response.write(batch)
    await response.write_eof()
    return response


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = re.search(r"q\s*=\s*([0-9.]+)", params)
            return not q or float(q[1]) > 0
    return False


def _wants_openmetrics(header: str) -> bool:
    """OpenMetrics when the scraper lists it (Prometheus does, first) with a q above 0."""
    for part in header.split(","):
        kind, _, params = part.strip().partition(";")
        if kind.strip().lower() == "application/openmetrics-text":
            q = re.search(r"q\s*=\s*([0-9.]+)", params)
            return not q or float(q[1]) > 0
    return False
