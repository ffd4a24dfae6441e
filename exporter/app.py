"""Wires config, provider states, scheduler, snapshot and web together; owns reload and shutdown.

Everything here runs on one event loop, the only writer of exporter state. Threads (SQLite writes,
big joins) hand their results back to it; a provider whose state changed in a thread says so
through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.providers import PROVIDERS
from exporter.providers.base import Provider, ProviderState, ProviderStateError, StateContext
from exporter.routing import Route
from exporter.scheduler import Scheduler
from exporter.snapshot import Snapshot
from exporter.web import WebServer

log = logging.getLogger(__name__)

# A publication waits this many times what the previous one cost, within these bounds: a burst
# of polls is published a handful of times, and publishing never takes more than ~5% of a core.
PUBLISH_COST_FACTOR = 20
PUBLISH_DELAY = (0.05, 1.0)


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
        listen_address: str,
        *,
        storage_path: str = "whatsapp-exporter.db",
        strict: bool = False,
        providers: Mapping[str, Provider] = PROVIDERS,
    ):
        self._load = load
        self._listen = listen_address
        self._storage_path = storage_path
        self._strict = strict
        self._providers = providers
        self._config: Config | None = None
        self.states: dict[str, ProviderState] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.snapshot = Snapshot(__version__)
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
        self.scheduler = Scheduler(
            self.snapshot, self._providers, states=self.states, strict=self._strict
        )
        self.web = WebServer(
            self._listen,
            self.snapshot,
            ready=lambda: self.scheduler is not None and self.scheduler.ready,
            reload=self.reload,
            routes=self._routes,
        )
        publisher = asyncio.create_task(self._publish_forever())
        try:
            await self.scheduler.apply(config)
            await self.web.start()
            self._handle_signals()
            log.info(
                "listening",
                extra={
                    "fields": {"address": self._listen, "port": self.port, "version": __version__}
                },
            )
            self.started.set()
            await self._stop.wait()
        finally:
            log.info("shutting down")
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await self.web.stop()
            await self.scheduler.close()
            for state in self.states.values():
                state.close()

    def stop(self) -> None:
        """Thread-safe: end run()."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def reload(self) -> tuple[bool, str]:
        assert self._reload_lock is not None and self.scheduler is not None
        async with self._reload_lock:
            try:
                config = self._load()
            except ConfigError as exc:
                self.snapshot.reload_result(False)
                for error in exc.errors:
                    log.error(
                        "reload failed, keeping the running config",
                        extra={"fields": {"error": error}},
                    )
                return False, "Reload failed, the running config is kept:\n" + "\n".join(exc.errors)
            await self.scheduler.apply(config)
            self._config = config
            self.snapshot.reload_result(True)
            log.info("config reloaded", extra={"fields": {"accounts": len(config.accounts())}})
            return True, "Reloaded."

    # --- provider states ---

    def _open_states(self) -> None:
        for name, provider in self._providers.items():
            if provider.open_state is None:
                continue
            context = StateContext(
                storage_path=self._storage_path,
                accounts=lambda name=name: self._accounts(name),
                changed=lambda name=name: self._state_changed_from_any_thread(name),
            )
            self.states[name] = provider.open_state(context)
            self._refresh_state(name)

    def _accounts(self, provider: str) -> dict[str, Any]:
        config = self._config
        return {a.account: a for a in getattr(config, provider, [])} if config else {}

    def _routes(self) -> list[Route]:
        return [route for state in self.states.values() for route in state.routes()]

    def _state_changed_from_any_thread(self, name: str) -> None:
        assert self._loop is not None
        if _on_loop(self._loop):
            self._refresh_state(name)
        else:
            self._loop.call_soon_threadsafe(self._refresh_state, name)

    def _refresh_state(self, name: str) -> None:
        """Counters kept by a provider itself: shown as soon as they change, never stale."""
        self.snapshot.set_extra(name, self.states[name].families())

    # --- publishing ---

    async def _publish_forever(self) -> None:
        """Coalesced: publish on the first change, then wait in proportion to what that cost."""
        low, high = PUBLISH_DELAY
        while True:
            await self.snapshot.changed()
            started = time.perf_counter()
            self.snapshot.publish()
            cost = time.perf_counter() - started
            await asyncio.sleep(min(high, max(low, PUBLISH_COST_FACTOR * cost)))

    def _handle_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # run in a thread by tests: the caller stops it with stop()
        assert self._loop is not None and self._stop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
