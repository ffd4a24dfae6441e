"""Wires config, scheduler, snapshot and web together, and owns reload and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from exporter import __version__
from exporter.config import Config, ConfigError
from exporter.providers import PROVIDERS
from exporter.scheduler import Scheduler
from exporter.snapshot import Snapshot
from exporter.web import WebServer

log = logging.getLogger(__name__)


class Exporter:
    """The running exporter. `load` is called at start and on every reload (SIGHUP, /-/reload)."""

    def __init__(self, load: Callable[[], Config], listen_address: str, *, strict: bool = False):
        self._load = load
        self._listen = listen_address
        self._strict = strict
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
        self.scheduler = Scheduler(self.snapshot, PROVIDERS, strict=self._strict)
        self.web = WebServer(
            self._listen,
            self.snapshot,
            ready=lambda: self.scheduler is not None and self.scheduler.ready,
            reload=self.reload_from_thread,
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
            self.snapshot.reload_result(True)
            self.snapshot.publish()
            log.info("config reloaded", extra={"fields": {"accounts": len(config.accounts())}})
            return True, "Reloaded."

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
