"""Wires config, provider states, scheduler, snapshot, serving and web together; owns reload,
publication and shutdown.

Everything here runs on one event loop, the only writer of exporter state. Threads (SQLite writes,
big joins) hand their results back to it; a provider whose state changed in a thread says so
through `call_soon_threadsafe`, which only marks its families outdated for the next publication
(docs/architecture.md, "One owner of mutable state"). A reload publishes before it answers (and
logs), so whoever checks /metrics next sees its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import ProcessCollector

from exporter import build as builds
from exporter.cluster import Election, LockSession
from exporter.config import Config, ConfigError, redacted
from exporter.metrics import Family, Sample
from exporter.options import Options
from exporter.providers import PROVIDERS
from exporter.providers.base import Provider, ProviderState, ProviderStateError, StateContext
from exporter.routing import Route
from exporter.scheduler import Scheduler
from exporter.serving import Scrapes
from exporter.snapshot import Snapshot
from exporter.status import Budget, Status
from exporter.web import WebServer

log = logging.getLogger(__name__)

# A publication waits this many times what the previous one cost, within these bounds: a burst
# of polls is published a handful of times, and publishing never takes more than ~5% of a core.
PUBLISH_COST_FACTOR = 20
PUBLISH_DELAY = (0.05, 1.0)
# The exporter's own metrics (HTTP requests, process) change on every scrape; they are refreshed
# this often rather than on each, so a scrape never makes the next scrape join a new exposition.
SELF_EVERY = 10.0
GC_YOUNG = 10_000  # allocations between two young collections (Python's default: 700)


def run_until_stopped(main: Coroutine[Any, Any, None], listen_address: str) -> int:
    """Run the exporter's main coroutine; every way it can fail to start is a one-line message."""
    try:
        asyncio.run(main)
    except ProviderStateError as exc:
        print(f"whatsapp-exporter: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"whatsapp-exporter: cannot listen on {listen_address}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


class Exporter:
    """The running exporter. `load` is called at start and on every reload (SIGHUP, /-/reload)."""

    def __init__(
        self,
        load: Callable[[], Config],
        options: Options,
        *,
        providers: Mapping[str, Provider] = PROVIDERS,
        build: builds.Build | None = None,
    ):
        self._load = load
        self.options = options
        self._providers = providers
        self.build = build or builds.current()
        self.shard = options.shard
        # without a shared database there is no one to elect: this process leads
        self.leader = options.storage_url is None
        self._election: Election | None = None
        self._config: Config | None = None
        self.states: dict[str, ProviderState] = {}
        self._all_routes: list[Route] | None = None
        self._accounts_of: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.snapshot = Snapshot(self.build.version, build_labels=self.build.labels())
        self.scrapes = Scrapes(lambda: self.snapshot.exposition)
        self._publish_cost = 0.0
        self._publications = 0
        self._ready_generation: int | None = None
        self.scheduler: Scheduler | None = None
        self.web: WebServer | None = None
        self.started = threading.Event()  # for whoever runs this in a thread (tests, the demo)

    @property
    def port(self) -> int:
        assert self.web is not None
        return self.web.port

    async def run(self, config: Config) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._config = config
        # provider states open before anything listens: a bad --storage.path stops the start
        self._open_states()
        options = self.options
        self.scheduler = Scheduler(
            self.snapshot, self._providers, states=self.states, strict=options.strict
        )
        guard = options.guard
        self.web = WebServer(
            options.listen_address,
            self.scrapes,
            ready=self._ready,
            reload=self.reload,
            routes=self._routes,
            lifecycle=options.lifecycle,
            ingest_address=options.ingest_address,
            **(
                {"security": guard.security, "tls": guard.tls, "ingest_tls": guard.ingest_tls}
                if guard
                else {}
            ),
            status=self._status,
            config_view=lambda: redacted(self._config) if self._config else "",
        )
        publisher = asyncio.create_task(self._publish_forever())
        own = asyncio.create_task(self._own_metrics_forever())
        tasks = [publisher, own]
        self.snapshot.set_extra("~leader", [self._leader_family()])
        if options.storage_url is not None:
            url = options.storage_url
            self._election = Election(
                self.shard,
                lambda: LockSession.open(url, options.storage_password, options.lease / 3),
                lease=options.lease,
                on_change=self._leadership,
            )
            tasks.append(asyncio.create_task(self._election.run()))
        if options.own_process:
            _settle()
        try:
            await self.scheduler.apply(self._polled(config))
            await self.web.start()
            self._handle_signals()
            log.info(
                "listening",
                extra={
                    "fields": {
                        "address": options.listen_address,
                        "port": self.port,
                        **(
                            {"ingest_port": self.web.port_of("ingest")}
                            if options.ingest_address
                            else {}
                        ),
                        "version": self.build.version,
                        "revision": self.build.revision,
                    }
                },
            )
            self.started.set()
            await self._stop.wait()
        finally:
            log.info("shutting down")
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.web.stop()
            await self.scheduler.close()
            for state in self.states.values():
                state.close()

    async def _status(self) -> Status:
        assert self.scheduler is not None
        budgets = []
        for poller in self.scheduler.pollers():
            used, paused = poller.api.budget.usage()
            provider, account = poller.name
            budget = poller.api.budget
            budgets.append(Budget(provider, account, used, budget.requests, budget.period, paused))
        return Status(
            version=self.build.version,
            revision=self.build.revision,
            now=time.time(),
            targets=self.snapshot.targets(),
            history=self.snapshot.history,
            budgets=sorted(budgets, key=lambda b: (b.provider, b.account)),
            providers={name: await state.status() for name, state in self.states.items()},
        )

    def _ready(self) -> bool:
        """Once the first round is over and published: a scrape right after a 200 sees it. A
        follower polls nothing and is ready at once: it serves ingest and webhooks."""
        if not self.leader:
            return True
        if self._ready_generation is None:
            if self.scheduler is None or not self.scheduler.ready:
                return False
            self._ready_generation = self.snapshot.generation
        return self.snapshot.exposition.generation >= self._ready_generation

    def stop(self) -> None:
        """Thread-safe: end run()."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def reload(self) -> tuple[bool, str]:
        """Answered (and logged) once its result is on /metrics: automation checks
        `whatsapp_exporter_config_last_reload_successful` right after, as with Prometheus."""
        assert self._reload_lock is not None and self.scheduler is not None
        async with self._reload_lock:
            try:
                config = self._load()
            except ConfigError as exc:
                self.snapshot.reload_result(False)
                self._publish_now()
                for error in exc.errors:
                    log.error(
                        "reload failed, keeping the running config",
                        extra={"fields": {"error": error}},
                    )
                return False, "Reload failed, the running config is kept:\n" + "\n".join(exc.errors)
            self._config = config
            await self.scheduler.apply(self._polled(config))
            self.snapshot.reload_result(True)
            self._publish_now()
            log.info("config reloaded", extra={"fields": {"accounts": len(config.accounts())}})
            return True, "Reloaded."

    # --- provider states ---

    def _open_states(self) -> None:
        storage = Path(self.options.storage_path)
        legacy = storage.suffix == ".db" or storage.is_file()
        if legacy:
            log.warning(
                "--storage.path names a file; it now names a directory (default data/), which "
                "holds each provider's state file. The file keeps being used for now.",
                extra={"fields": {"path": str(storage)}},
            )
        for name, provider in self._providers.items():
            if provider.open_state is None:
                continue
            context = StateContext(
                storage_path=str(storage if legacy else storage / f"{name}.db"),
                accounts=lambda name=name: self._accounts(name),
                changed=lambda name=name: self._state_changed_from_any_thread(name),
                storage_url=self.options.storage_url,
                storage_password=self.options.storage_password,
                amend=functools.partial(self._amend, name),
            )
            self.states[name] = provider.open_state(context)
            self.snapshot.follow(name, functools.partial(self._state_families, name))

    async def _amend(
        self,
        provider: str,
        account: str,
        endpoint: str,
        target: str,
        change: Callable[[Any], Any],
        since: float,
    ) -> bool:
        """Only where this replica polls the account (the leader of its shard)."""
        if self.scheduler is None:
            return False
        return await self.scheduler.amend(provider, account, endpoint, target, change, since)

    def _accounts(self, provider: str) -> dict[str, Any]:
        """The running config's accounts of a provider by name: asked on every ingest request,
        so made once per config."""
        config = self._config
        if config is None:
            return {}
        made, accounts = self._accounts_of.get(provider, (None, {}))
        if made is not config:
            accounts = {a.account: a for a in getattr(config, provider, [])}
            self._accounts_of[provider] = (config, accounts)
        return accounts

    def _routes(self) -> list[Route]:
        """Asked on every request; the states, and so their routes, are fixed once opened."""
        if self._all_routes is None:
            self._all_routes = [r for state in self.states.values() for r in state.routes()]
        return self._all_routes

    def _state_changed_from_any_thread(self, name: str) -> None:
        """Only marks the state's families outdated: they are rendered once, at the next
        publication, however many changes come before it."""
        assert self._loop is not None
        if _on_loop(self._loop):
            self.snapshot.outdated(name)
        else:
            self._loop.call_soon_threadsafe(self.snapshot.outdated, name)

    def _state_families(self, name: str) -> list[Family]:
        """Counters kept by a provider itself: shown from the publication after they change,
        never stale, and only by the replica that leads their accounts' shard (they come from
        the shared ledger, so they continue where the previous leader left them)."""
        families = self.states[name].families() if self.leader else []
        return [self._owned(f) for f in families]

    def _owned(self, family: Family) -> Family:
        if self.shard.count == 1:
            return family
        return replace(
            family,
            samples=tuple(
                s
                for s in family.samples
                if self.shard.owns(
                    dict(s.labels).get("provider", ""), dict(s.labels).get("account", "")
                )
            ),
        )

    # --- leadership ---

    def _polled(self, config: Config) -> Config:
        """What this replica polls: its shard's accounts while it leads, none while it follows."""
        update = {
            provider: [
                account
                for account in getattr(config, provider)
                if self.leader and self.shard.owns(provider, account.account)
            ]
            for provider in self._providers
        }
        return config.model_copy(update=update)

    async def _leadership(self, leader: bool) -> None:
        self.leader = leader
        self._ready_generation = None
        assert self.scheduler is not None and self._reload_lock is not None
        async with self._reload_lock:
            if self._config is not None:
                await self.scheduler.apply(self._polled(self._config))
        for name in self.states:
            self.snapshot.outdated(name)
        self.snapshot.set_extra("~leader", [self._leader_family()])

    def _leader_family(self) -> Family:
        return Family(
            "whatsapp_exporter_leader",
            "gauge",
            "Whether this replica leads its shard (1): only the leader polls the shard's accounts "
            "and shows their values. A single process without --storage.url always leads.",
            (Sample((("shard", str(self.shard)),), float(self.leader)),),
        )

    # --- publishing ---

    async def _publish_forever(self) -> None:
        """Coalesced: publish on the first change, then wait in proportion to what that cost."""
        low, high = PUBLISH_DELAY
        settled = not self.options.own_process
        while True:
            await self.snapshot.changed()
            if not settled and self.scheduler is not None and self.scheduler.ready:
                settled = True
                _settle()
            self._publish()
            await asyncio.sleep(min(high, max(low, PUBLISH_COST_FACTOR * self._publish_cost)))

    def _publish(self) -> None:
        started = time.perf_counter()
        if self.snapshot.publish():
            self._publications += 1
        self._publish_cost = time.perf_counter() - started

    def _publish_now(self) -> None:
        """Out of turn, for an answer that promises what /metrics shows: every later scrape,
        gzip ones too, sees this version or a newer one."""
        self._publish()
        self.scrapes.show_from(self.snapshot.exposition.generation)

    async def _own_metrics_forever(self) -> None:
        process = ProcessCollector(registry=None)
        libc = _glibc()
        while True:
            self.snapshot.set_extra("~exporter", self._own_families(process))
            if libc is not None:
                # hand freed heap back to the system: each exposition version frees megabytes
                # of small objects that glibc would otherwise keep as resident memory
                libc.malloc_trim(0)
            await asyncio.sleep(SELF_EVERY)

    def _own_families(self, process: ProcessCollector) -> list[Family]:
        assert self.web is not None
        requests = tuple(
            Sample((("handler", handler), ("code", code)), float(count), "_total")
            for (handler, code), count in sorted(self.web.requests.items())
        )
        return [
            Family(
                "whatsapp_exporter_http_requests",
                "counter",
                f"HTTP requests served, by handler and status code (every {SELF_EVERY:g}s).",
                requests,
            ),
            Family(
                "whatsapp_exporter_publish_duration_seconds",
                "gauge",
                "Event-loop time the newest publication of /metrics took (lining up the lines).",
                (Sample((), self._publish_cost),),
            ),
            Family(
                "whatsapp_exporter_publications",
                "counter",
                "Publications of /metrics: coalesced, so far fewer than polls.",
                (Sample((), float(self._publications), "_total"),),
            ),
            Family(
                "whatsapp_exporter_exposition_bytes",
                "gauge",
                "Size of the newest uncompressed /metrics body served.",
                (Sample((), float(self.scrapes.exposition_bytes)),),
            ),
            *self._pacing_families(),
            *(_family(metric) for metric in process.collect()),
        ]

    def _pacing_families(self) -> list[Family]:
        assert self.scheduler is not None
        pacer = self.scheduler.pacer
        return [
            Family(
                "whatsapp_exporter_event_loop_lag_seconds",
                "gauge",
                f"Worst delay of the event loop (which serves /metrics) in the last "
                f"{SELF_EVERY:g}s; over 0.02 s, polling is held back until it catches up.",
                (Sample((), pacer.take_worst()),),
            ),
            Family(
                "whatsapp_exporter_requests_in_flight_limit",
                "gauge",
                "Provider requests the pacer lets be in flight at once, across all accounts "
                "(lowered while the event loop lags).",
                (Sample((), float(pacer.limit)),),
            ),
            Family(
                "whatsapp_exporter_requests_held",
                "counter",
                "Provider requests that waited for the pacer because the exporter was short of "
                "CPU: a steady rise means polls are due faster than this exporter can make them.",
                (Sample((), float(pacer.held), "_total"),),
            ),
        ]

    def _handle_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # run in a thread by tests: the caller stops it with stop()
        assert self._loop is not None and self._stop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))


def _family(metric: Any) -> Family:
    """A client_python collector's metric (public attributes only) as our own type."""
    return Family(
        metric.name,
        metric.type,
        metric.documentation,
        tuple(
            Sample(tuple(s.labels.items()), float(s.value), s.name[len(metric.name) :])
            for s in metric.samples
        ),
    )


def _settle() -> None:
    """Keep what exists now out of every later full garbage collection: at start the modules
    and the config, after the first round its targets, blocks and connections, all of which live
    as long as the process. At 100k series a full collection took 70 ms of CPU with the
    interpreter lock held, a stall scrapes saw as 100-130 ms answers; and with the default
    threshold of 700 objects, answers still being translated survived into the old generation
    so often that collecting took 6% of the CPU. After 10,000 it is about 1%."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def _glibc() -> Any:
    """glibc, for malloc_trim and one malloc arena for all threads (each thread's own arena held
    tens of MB); None elsewhere (musl, macOS), where nothing of this applies."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX: the loop's and the render thread's
        return libc
    except (OSError, AttributeError):
        return None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
