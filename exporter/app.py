"""Wires config, scheduler, snapshot and web together, and owns reload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.ingest import Ingest
from exporter.ledger import Ledger, LedgerError
from exporter.providers import PROVIDERS, d7
from exporter.providers.base import Services
from exporter.scheduler import Scheduler
from exporter.snapshot import Snapshot
from exporter.web import WebServer

log = logging.getLogger(__name__)


def run_until_stopped(main: Coroutine[Any, Any, None], listen_address: str) -> int:
    """Run the exporter's main coroutine; every way it can fail to start is a one-line message."""
    try:
        asyncio.run(main)
    except LedgerError as exc:
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
    ):
        self._load = load
        self._listen = listen_address
        self._storage_path = storage_path
        self._strict = strict
        self._config: Config | None = None
        self.ledger: Ledger | None = None
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
        # the ledger opens before anything listens: a bad --storage.path stops the start
        self.ledger = Ledger(self._storage_path)
        self.ledger.on_change(self._publish_ledger)
        self._publish_ledger()
        self.scheduler = Scheduler(
            self.snapshot, PROVIDERS, services=Services(ledger=self.ledger), strict=self._strict
        )
        routes, prefix_routes = Ingest(self.ledger, self._d7_accounts).routes()
        self.web = WebServer(
            self._listen,
            self.snapshot,
            ready=lambda: self.scheduler is not None and self.scheduler.ready,
            reload=self.reload_from_thread,
            routes=routes,
            prefix_routes=prefix_routes,
        )
        await self.scheduler.apply(config)
        self.web.start()
        self._handle_signals()
        log.info(
            "listening",
            extra={"fields": {"address": self._listen, "port": self.port, "version": __version__}},
        )
        self.started.set()
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down")
            self.web.stop()
            await self.scheduler.close()
            self.ledger.close()

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
                self.snapshot.publish()
                for error in exc.errors:
                    log.error(
                        "reload failed, keeping the running config",
                        extra={"fields": {"error": error}},
                    )
                return False, "Reload failed, the running config is kept:\n" + "\n".join(exc.errors)
            await self.scheduler.apply(config)
            self._config = config
            self.snapshot.reload_result(True)
            self.snapshot.publish()
            log.info("config reloaded", extra={"fields": {"accounts": len(config.accounts())}})
            return True, "Reloaded."

    def _d7_accounts(self) -> dict[str, d7.Account]:
        config = self._config
        return {a.account: a for a in getattr(config, "d7", [])} if config else {}

    def _publish_ledger(self) -> None:
        """Counters kept by the exporter itself: shown as soon as they change, never stale."""
        assert self.ledger is not None
        self.snapshot.set_extra("d7", d7.ledger_families(self.ledger.totals()))
        self.snapshot.publish()

    def reload_from_thread(self) -> tuple[bool, str]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(self.reload(), self._loop).result(timeout=120)

    def _handle_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # run in a thread by tests: the caller stops it with stop()
        assert self._loop is not None and self._stop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop.set)
        self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
