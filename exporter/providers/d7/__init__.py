"""D7 Networks: the delivery status of sent WhatsApp requests, followed id by id.

Nothing in D7's API lists request ids, so the sending application hands them in (and D7's delivery
webhooks add more); the ledger keeps them. Each poll cycle asks D7 about the ids that are due,
oldest due first, within the account's request budget, and writes what it learned in one
transaction. With nothing due, one request for an id that cannot exist still proves, every
interval, that the token works.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from exporter.config import Defaults, RateLimit
from exporter.exposition import safe_text
from exporter.metrics import Family, Sample
from exporter.providers.base import (
    Answer,
    Api,
    Endpoint,
    PollError,
    Provider,
    ProviderStateError,
    StateContext,
    account_wide,
    parse,
    scrub,
)
from exporter.providers.d7.account import Account
from exporter.providers.d7.ingest import Ingest
from exporter.providers.d7.statuses import SHOWN, open_d7_ledger
from exporter.routing import Route
from exporter.tracking import Ledger, LedgerError, MessageUpdate, Pending, Totals, families
from exporter.tracking.families import LAST_WEBHOOK_HELP, PROBLEMS_HELP
from exporter.tracking.times import age

log = logging.getLogger(__name__)

CANARY_ID = "00000000-0000-4000-8000-000000000000"
NOT_INDEXED = "WHATSAPP_LOG_NOT_EXISTS"
ACCOUNT_LEVEL = frozenset({"auth", "timeout", "connect", "http_5xx", "rate_limited"})


def provider_error(body: Any) -> str | None:
    """`{"detail": {"code": ..., "message": ...}}`, or FastAPI's 422 list of problems."""
    if not isinstance(body, dict) or "detail" not in body:
        return None
    detail = body["detail"]
    if isinstance(detail, dict):
        return f"{detail.get('code', 'error')}: {detail.get('message', '')}".rstrip(": ")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(p) for p in first.get("loc", []))
        return f"{where}: {first.get('msg', 'invalid')}"
    return str(detail)[:200]


def headers(account: Account) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {account.token.get_secret_value()}",
        "Accept": "application/json",
    }


# --- answers ------------------------------------------------------------------------------------


class _Message(Answer):
    msg_id: str | None = None
    status: str
    conversation_type: str | None = None
    message_type: str | None = None


class _Report(Answer):
    request_id: str | None = None
    messages: list[_Message]


def report_updates(body: Any) -> list[MessageUpdate]:
    report = parse(_Report, body, "report")
    return [
        MessageUpdate(
            msg_id=safe_text(m.msg_id or f"#{index}", 128),  # stored: valid UTF-8, bounded
            status=m.status,
            conversation_type=m.conversation_type or "",
            message_type=m.message_type or "",
        )
        for index, m in enumerate(report.messages)
    ]


# --- the poll cycle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cycle:
    polled: int
    pending: int


def not_indexed(error: PollError) -> bool:
    """D7's own answer for an id it does not know (yet). Any other 404, such as a missing route's
    `{"detail": "Not Found"}` after a wrong report_path, is a failure of the account."""
    body = error.body
    detail = body.get("detail") if isinstance(body, dict) else None
    return (
        error.reason == "not_found"
        and isinstance(detail, dict)
        and detail.get("code") == NOT_INDEXED
    )


class _BadReport(Exception):
    """One id's report was malformed: that id is retried later, the cycle goes on."""


class Follower:
    """One account's poll cycle; keeps only when it last proved the token on an idle cycle."""

    def __init__(
        self,
        account: Account,
        ledger: Ledger,
        canary_every: float,
        problem: Callable[[str, str, int], None] = lambda *_: None,
    ):
        self.account = account
        self.ledger = ledger
        self.schedule = account.schedule()
        self.canary_every = canary_every
        self._problem = problem
        self._last_canary = -math.inf

    def path(self, request_id: str) -> str:
        return self.account.report_path.format(request_id=quote(request_id, safe=""))

    async def cycle(self, api: Api, target: str) -> Cycle:
        name = self.account.account
        per_cycle = max(
            1, math.ceil(api.budget.requests * (self.account.interval or 5.0) / api.budget.period)
        )
        due = await self._ledger(self.ledger.due, name, per_cycle)
        if not due:
            await self._ledger(self.ledger.expire_old, name, self.schedule)
            await self._canary(api)
            return Cycle(0, self.ledger.pending_count(name))

        async def one(item):  # at most `concurrency` in flight: Api.call holds the account's gate
            try:
                body = await api.call("GET", self.path(item.request_id))
            except PollError as error:
                if not_indexed(error):
                    return item, None, "not_found"
                if error.reason in ("provider_error", "http_4xx"):
                    log.info(
                        "D7 refuses a request id; expiring it",
                        extra={"fields": {"account": name, "error": self._scrub(error.detail)}},
                    )
                    return item, None, "gone"
                return item, None, error
            try:
                return item, report_updates(body), None
            except PollError as error:
                return item, None, _BadReport(error)

        outcomes = await asyncio.gather(*(one(item) for item in due))
        errors = [problem for _, _, problem in outcomes if isinstance(problem, PollError)]
        bad = [problem for _, _, problem in outcomes if isinstance(problem, _BadReport)]
        answers = [
            (d, u, "retry" if isinstance(p, PollError | _BadReport) else p) for d, u, p in outcomes
        ]
        await self._ledger(self.ledger.record, name, answers, self.schedule)
        if bad:
            self._problem(name, "bad_report", len(bad))
        if errors:
            raise errors[0]
        if bad and len(bad) == len(due):  # nothing usable came back: the cycle failed
            raise bad[0].args[0]
        return Cycle(len(due), self.ledger.pending_count(name))

    async def _ledger(self, call: Callable[..., Pending], *args: Any) -> Any:
        """A ledger call, done by its writer thread; its failure is the exporter's disk, not D7."""
        try:
            return await call(*args)
        except LedgerError as exc:
            raise PollError("storage", f"the D7 ledger cannot be used: {exc}") from None

    async def _canary(self, api: Api) -> None:
        """Proves the token and the report path: only D7's documented 404 for an unknown id
        counts. A failed canary is asked again on the next cycle, so `up` does not flicker."""
        now = time.monotonic()
        if now - self._last_canary < self.canary_every:
            return
        try:
            await api.call("GET", self.path(CANARY_ID))
        except PollError as error:
            if not not_indexed(error):
                raise
        else:
            raise PollError(
                "bad_response",
                f"a report came back for an id that cannot exist; expected 404 {NOT_INDEXED}",
            )
        self._last_canary = now

    def _scrub(self, text: str) -> str:
        return scrub(text, self.account.secret_values())


def cycle_families(target: str, result: Cycle) -> list[Family]:
    """The D7 metrics are the ledger's (`Tracking.families`); a cycle adds none itself."""
    return []


def ledger_families(totals: Mapping[str, Totals], accounts: Iterable[str] = ()) -> list[Family]:
    """whatsapp_messages_total, whatsapp_tracked_requests, whatsapp_message_delivery_seconds."""
    return families(SHOWN, totals, accounts)


class Tracking:
    """D7's own state: the request ledger, the routes that feed it, and the families it keeps.

    Routes run on the event loop; every ledger write goes to a thread, and the ledger says when
    its totals changed through `changed`, which hands over to the loop."""

    def __init__(self, context: StateContext):
        if context.storage_url is None:
            _adopt_the_old_ledger(Path(context.storage_path))
        try:
            self.ledger = open_d7_ledger(
                context.storage_url or context.storage_path, password=context.storage_password
            )
        except LedgerError as exc:
            raise ProviderStateError(str(exc)) from None
        self.ledger.on_change(context.changed)
        self._changed = context.changed
        # per (account, what): ids new/known/refused, webhook events, problems; on the loop
        self.counts: dict[tuple[str, str], int] = {}
        self.last_webhook: dict[str, float] = {}
        self._ingest = Ingest(self.ledger, context.accounts, self.count, self._webhook_arrived)
        self._accounts = context.accounts

    def count(self, account: str, what: str, count: int = 1) -> None:
        if count:
            key = (account, what)
            self.counts[key] = self.counts.get(key, 0) + count
            self._changed()

    def problem(self, account: str, problem: str, count: int = 1) -> None:
        self.count(account, problem, count)

    def _webhook_arrived(self, account: str, events: int) -> None:
        """Its events counted and its time noted, with one change signal (one per webhook)."""
        key = (account, "events")
        self.counts[key] = self.counts.get(key, 0) + events
        self.last_webhook[account] = time.time()
        self._changed()

    def routes(self) -> list[Route]:
        return self._ingest.routes()

    def families(self) -> list[Family]:
        """Every configured account's counters, at 0 until something happens: a dashboard of a
        healthy install shows 0 problems, not an empty panel."""
        accounts = sorted({*self._accounts(), *(a for a, _ in self.counts)})

        def counted(kinds: dict[str, str], label: str) -> tuple[Sample, ...]:
            return tuple(
                Sample(
                    (*_labels(a), (label, value)), float(self.counts.get((a, what), 0)), "_total"
                )
                for a in accounts
                for what, value in sorted(kinds.items(), key=lambda kind: kind[1])
            )

        return [
            *ledger_families(self.ledger.totals(), self._accounts()),
            Family(
                "whatsapp_tracking_problems",
                "counter",
                PROBLEMS_HELP,
                counted({"bad_report": "bad_report", "bad_timestamp": "bad_timestamp"}, "problem"),
            ),
            Family(
                "whatsapp_tracking_ids",
                "counter",
                "D7 request ids handed in over the ingest API: new (now tracked), known (already "
                "tracked), refused (in a hand-in that was refused, nothing stored).",
                counted(
                    {"ids_new": "new", "ids_known": "known", "ids_refused": "refused"}, "result"
                ),
            ),
            Family(
                "whatsapp_tracking_webhook_events",
                "counter",
                "D7 delivery events received by the webhook and stored.",
                tuple(
                    Sample(_labels(a), float(self.counts.get((a, "events"), 0)), "_total")
                    for a in accounts
                ),
            ),
            Family(
                "whatsapp_exporter_last_webhook_timestamp_seconds",
                "gauge",
                LAST_WEBHOOK_HELP,
                tuple(Sample(_labels(a), at) for a, at in sorted(self.last_webhook.items())),
            ),
        ]

    async def status(self) -> dict[str, dict[str, str]]:
        totals = self.ledger.totals()
        now = time.time()
        out = {}
        for account in sorted(self._accounts()):
            states = totals[account].states if account in totals else {}
            oldest = await self.ledger.oldest_pending(account)
            webhook = self.last_webhook.get(account)
            out[account] = {
                "pending": str(states.get("pending", 0)),
                "done": str(states.get("done", 0)),
                "expired": str(states.get("expired", 0)),
                "oldest pending": age(now - oldest) if oldest else "none",
                "last webhook": age(now - webhook) + " ago" if webhook else "none yet",
            }
        return out

    def close(self) -> None:
        self.ledger.close()


def _labels(account: str) -> tuple[tuple[str, str], ...]:
    return (("provider", "d7"), ("account", account))


def _adopt_the_old_ledger(path: Path) -> None:
    """Version 0.1 kept the ledger as `ledger.db` where `--storage.path` pointed (the container:
    /var/lib/whatsapp-exporter/ledger.db). Now that the flag names the directory, the old file,
    with its write-ahead log, becomes this one, once, so no tracked id is lost on upgrade."""
    old = path.with_name("ledger.db")
    if path.exists() or not old.is_file() or path.name == old.name:
        return
    for suffix in ("", "-wal", "-shm"):
        source = old.with_name(old.name + suffix)
        if source.exists():
            source.rename(path.with_name(path.name + suffix))
    log.warning(
        "adopted the D7 ledger of version 0.1",
        extra={"fields": {"from": str(old), "to": str(path)}},
    )


def endpoints(account: Account, defaults: Defaults, state: Tracking | None) -> list[Endpoint]:
    if state is None:
        return []
    follower = Follower(
        account, state.ledger, canary_every=max(defaults.interval, 60.0), problem=state.problem
    )
    return [
        Endpoint("report", account.interval or 5.0, account_wide, follower.cycle, cycle_families)
    ]


PROVIDER = Provider(
    name="d7",
    account_model=Account,
    default_rate_limit=RateLimit(requests=600, period=60.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
    open_state=Tracking,
)
