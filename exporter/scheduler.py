"""Polls every account's endpoints on their own schedule and writes the answers to the snapshot.

Each account has one HTTP client (one connection pool), one request budget and a few requests in
flight (`concurrency`), shared by all of its endpoints. Each endpoint is one APScheduler job: its
first run happens at start, in endpoint order (WhatsGate's device list before the per-device
reports), then at its interval with jitter, never overlapping itself. Failures stop at the target
they happened to. Everything here runs on the event loop, the snapshot's only writer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from exporter import __version__
from exporter.config import AccountBase, ClientTLS, Config
from exporter.exposition import Rendered, render
from exporter.metrics import Labels
from exporter.pacer import Pacer
from exporter.providers.base import ANSWERS, Api, Client, Endpoint, PollError, Provider, scrub
from exporter.ratelimit import RequestBudget
from exporter.snapshot import Snapshot, TargetKey

log = logging.getLogger(__name__)

USER_AGENT = f"whatsapp-delivery-exporter/{__version__}"


@dataclass(eq=False)
class Poller:
    """One configured account while it runs."""

    provider: Provider
    account: AccountBase
    timeout: float
    endpoints: list[Endpoint]
    api: Api
    known: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)
    job_ids: list[str] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    failing: dict[str, str] = field(default_factory=dict)  # target key -> reason, to log changes
    secrets: list[str] = field(default_factory=list)  # scrubbed from every error shown or logged
    # (endpoint, target) -> digest of the newest answers of a pure endpoint
    digests: dict[tuple[str, str], bytes] = field(default_factory=dict)

    @property
    def name(self) -> tuple[str, str]:
        return self.provider.name, self.account.account


class Scheduler:
    def __init__(
        self,
        snapshot: Snapshot,
        providers: Mapping[str, Provider],
        *,
        states: Mapping[str, object] | None = None,
        strict: bool = False,
        rng: random.Random | None = None,
    ):
        self.snapshot = snapshot
        self.providers = providers
        self.states = states or {}  # provider name -> its own state (D7's ledger)
        self.strict = (
            strict  # tests: a programming error raises instead of counting as bad_response
        )
        self._rng = rng or random.Random()
        self._pollers: dict[tuple[str, str], Poller] = {}
        self._config: Config | None = None
        self._aps: AsyncIOScheduler | None = None
        self._ready = False
        # one TLS context per distinct `tls` setting: each would otherwise load the CA bundle
        # again (~1 MB and ~20 ms of CPU per account)
        self._tls: dict[ClientTLS, ssl.SSLContext] = {}
        # one thread translates and writes every poll's lines: the interpreter lock makes more
        # no faster, and each thread costs its own malloc arena (tens of MB of RSS)
        self._renderer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="render")
        self.pacer = Pacer()
        self._watch: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True once every account of the first config finished its first round of polls."""
        if not self._ready and self._pollers:
            self._ready = all(p.started.is_set() for p in self._pollers.values())
        return self._ready

    def pollers(self) -> list[Poller]:
        return list(self._pollers.values())

    async def apply(self, config: Config) -> None:
        """Start polling `config`; on reload, only accounts whose config changed are restarted."""
        if self._aps is None:
            self._aps = AsyncIOScheduler(timezone=dt.UTC)
            self._aps.add_job(self._expire, IntervalTrigger(seconds=1), id="staleness")
            self._aps.start()
            self._watch = asyncio.create_task(self.pacer.watch())
        defaults_changed = self._config is None or self._config.defaults != config.defaults
        wanted = {(provider, account.account): account for provider, account in config.accounts()}
        for name, poller in list(self._pollers.items()):
            if defaults_changed or wanted.get(name) != poller.account:
                await self._stop_poller(poller)
                del self._pollers[name]
        new = [
            self._make_poller(provider, account, config)
            for (provider, _), account in wanted.items()
            if (provider, account.account) not in self._pollers
        ]
        for poller in new:
            self._pollers[poller.name] = poller
        self.snapshot.configure(
            config.defaults.stale_after,
            [(*p.name, e.name) for p in self._pollers.values() for e in p.endpoints],
        )
        self._config = config
        for poller in new:
            self._track(poller, asyncio.create_task(self._start_poller(poller)))

    async def close(self) -> None:
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for poller in list(self._pollers.values()):
            await self._stop_poller(poller)
        self._pollers.clear()
        self._renderer.shutdown(wait=False, cancel_futures=True)

    # --- account lifecycle ---

    def _make_poller(self, provider_name: str, account: AccountBase, config: Config) -> Poller:
        provider = self.providers[provider_name]
        timeout = account.timeout or config.defaults.timeout
        rate = account.rate_limit or provider.default_rate_limit
        client = Client(
            account.base_url,
            headers={"User-Agent": USER_AGENT, **provider.headers(account)},
            timeout=timeout,
            tls=self._tls_context(account.tls),
            connections=account.concurrency,
            proxy_url=account.proxy_url,
        )
        budget = RequestBudget(rate.requests, rate.period)
        api = Api(
            client,
            budget,
            provider.provider_error,
            account.concurrency,
            deadline=timeout,
            body_size_limit=account.body_size_limit,
            pacer=self.pacer,
            answer_rules=provider.answer_rules,
        )
        return Poller(
            provider,
            account,
            timeout,
            provider.endpoints(account, config.defaults, self.states.get(provider_name)),
            api,
            secrets=account.secret_values(),
        )

    def _tls_context(self, tls: ClientTLS) -> ssl.SSLContext:
        if tls not in self._tls:
            self._tls[tls] = tls.context()
        return self._tls[tls]

    async def _start_poller(self, poller: Poller) -> None:
        # no random delay: accounts are independent (own token, own budget); later rounds get
        # a random phase below
        try:
            for endpoint in poller.endpoints:
                await self._poll(poller, endpoint)
        finally:
            poller.started.set()
        self._check_budget(poller)
        if self._aps is None or self._pollers.get(poller.name) is not poller:
            return
        now = dt.datetime.now(dt.UTC)
        for endpoint in poller.endpoints:
            job_id = f"{poller.provider.name}/{poller.account.account}/{endpoint.name}"
            offset = self._rng.uniform(0, min(endpoint.interval * 0.1, 10))
            self._aps.add_job(
                self._run_job,
                IntervalTrigger(
                    seconds=endpoint.interval,
                    start_date=now + dt.timedelta(seconds=endpoint.interval + offset),
                    jitter=min(endpoint.interval * 0.05, 5),
                    timezone=dt.UTC,
                ),
                args=(poller, endpoint),
                id=job_id,
                replace_existing=True,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
            poller.job_ids.append(job_id)

    def _check_budget(self, poller: Poller) -> None:
        """Once the targets are known: intervals that need more requests than the account's
        budget allows make every poll late, and values go stale. Say so, with the numbers."""
        budget = poller.api.budget
        demand = sum(
            len(e.targets(poller.known))
            * (e.requests(poller.known) if e.requests else 1)
            * budget.period
            / e.interval
            for e in poller.endpoints
        )
        if demand > budget.requests:
            provider, account = poller.name
            log.warning(
                "the account's polls need more requests than its rate_limit allows: polls will "
                "lag and values may go stale; lengthen intervals or raise rate_limit if the "
                "provider allows it",
                extra={
                    "fields": {
                        "provider": provider,
                        "account": account,
                        "needed": f"{demand:.0f}/{budget.period:g}s",
                        "rate_limit": f"{budget.requests}/{budget.period:g}s",
                    }
                },
            )

    async def _stop_poller(self, poller: Poller) -> None:
        for job_id in poller.job_ids:
            if self._aps is not None and self._aps.get_job(job_id):
                self._aps.remove_job(job_id)
        for task in list(poller.tasks):
            task.cancel()
        await asyncio.gather(*poller.tasks, return_exceptions=True)
        await poller.api.client.close()

    def _track(self, poller: Poller, task: asyncio.Task) -> None:
        poller.tasks.add(task)
        task.add_done_callback(poller.tasks.discard)

    async def _expire(self) -> None:
        """A coroutine on purpose: APScheduler runs plain functions in a thread, and only the
        loop may write the snapshot."""
        self.snapshot.expire()

    async def _run_job(self, poller: Poller, endpoint: Endpoint) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._track(poller, task)
        try:
            await self._poll(poller, endpoint)
        except asyncio.CancelledError:
            # stopped by a reload or shutdown; APScheduler would log it as a crash with a traceback
            return

    # --- one endpoint, every target ---

    async def _poll(self, poller: Poller, endpoint: Endpoint) -> None:
        """Every target of the endpoint, a few at a time: `concurrency` workers take the next
        target as they finish one (the account's gate and budget still bound the requests)."""
        provider, account = poller.name
        targets = list(dict.fromkeys(endpoint.targets(poller.known)))
        self.snapshot.retain(provider, account, endpoint.name, targets)
        known = poller.known.setdefault(endpoint.name, {}) if endpoint.remember else None
        if known is not None:
            for gone in set(known) - set(targets):
                del known[gone]
        listed = set(targets)
        for gone in [k for k in poller.digests if k[0] == endpoint.name and k[1] not in listed]:
            del poller.digests[gone]
        queue = iter(targets)

        async def worker() -> None:
            for target in queue:
                await self._poll_target(poller, endpoint, target, known)

        workers = min(poller.account.concurrency, len(targets))
        if workers == 1:
            await worker()
        else:
            await asyncio.gather(*(worker() for _ in range(workers)))

    async def _poll_target(
        self, poller: Poller, endpoint: Endpoint, target: str, known: dict[str, Any] | None
    ) -> None:
        provider, account = poller.name
        key = TargetKey(provider, account, endpoint.name, target)
        started = time.monotonic()
        answers: list[bytes] = []
        token = ANSWERS.set(answers)
        try:
            result = await endpoint.fetch(poller.api, target)
            digest = b"".join(answers) if endpoint.pure else None
            took = time.monotonic() - started
            if (
                digest is None
                or poller.digests.get((endpoint.name, target)) != digest
                or not self.snapshot.unchanged(key, endpoint.interval, took)
            ):
                rendered = await self._render(endpoint, key, result)
                self.snapshot.succeeded(key, endpoint.interval, rendered, took)
        except PollError as error:
            self._failed(poller, key, endpoint, error, time.monotonic() - started)
        except Exception as exc:
            if self.strict:
                raise
            error = PollError("bad_response", f"unexpected {type(exc).__name__}: {exc}"[:300])
            log.debug("unexpected error while polling", exc_info=True)
            self._failed(poller, key, endpoint, error, time.monotonic() - started)
        else:
            if digest is not None:
                poller.digests[endpoint.name, target] = digest
            if known is not None:
                known[target] = result
            if poller.failing.pop(_tag(key), None):
                log.info("poll recovered", extra={"fields": _fields(key)})
        finally:
            ANSWERS.reset(token)

    async def amend(
        self,
        provider: str,
        account: str,
        endpoint_name: str,
        target: str,
        change: Callable[[Any], Any],
        since: float,
    ) -> bool:
        """A remembered result changed by a provider's webhook (`change(result)` -> the new one,
        or None for no change) and shown at once, until the next poll says otherwise. Nothing
        happens where nothing was polled yet, or the newest poll is newer than the news
        (`since`, unix time): a webhook Meta retried for hours must not undo a fresher poll."""
        poller = self._pollers.get((provider, account))
        if poller is None:
            return False
        endpoint = next((e for e in poller.endpoints if e.name == endpoint_name), None)
        known = poller.known.get(endpoint_name) if endpoint and endpoint.remember else None
        if endpoint is None or known is None or target not in known:
            return False
        before = known[target]
        result = change(before)
        if result is None:
            return False
        key = TargetKey(provider, account, endpoint_name, target)
        rendered = await self._render(endpoint, key, result)
        # (a poll that finished meanwhile is as fresh as the news, or fresher)
        if known.get(target) is before and self.snapshot.amended(key, rendered, since):
            known[target] = result
            # the next poll renders even an answer byte for byte the previous one
            poller.digests.pop((endpoint_name, target), None)
            return True
        return False

    async def _render(self, endpoint: Endpoint, key: TargetKey, result: Any) -> list[Rendered]:
        """Translating and writing lines is a poll's CPU: in the render thread, off the loop,
        which keeps serving scrapes meanwhile (the snapshot gets bytes)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._renderer,
            _render,
            endpoint,
            key.target,
            result,
            (("provider", key.provider), ("account", key.account)),
        )

    def _failed(
        self, poller: Poller, key: TargetKey, endpoint: Endpoint, error: PollError, took: float
    ) -> None:
        error = PollError(error.reason, scrub(error.detail, poller.secrets))
        self.snapshot.failed(key, endpoint.interval, error, took)
        # log when a target starts failing or fails differently, not on every poll of a dead one
        level = logging.WARNING if poller.failing.get(_tag(key)) != error.reason else logging.DEBUG
        poller.failing[_tag(key)] = error.reason
        log.log(
            level,
            "poll failed",
            extra={"fields": {**_fields(key), "reason": error.reason, "error": error.detail}},
        )


def _render(endpoint: Endpoint, target: str, result: Any, prefix: Labels) -> list[Rendered]:
    """In the render thread: pure functions of the result."""
    return render(endpoint.families(target, result), prefix)


def _tag(key: TargetKey) -> str:
    return f"{key.endpoint}/{key.target}"


def _fields(key: TargetKey) -> dict[str, str]:
    return {
        "provider": key.provider,
        "account": key.account,
        "endpoint": key.endpoint,
        "target": key.target,
    }
