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
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator

from exporter.config import AccountBase, Defaults, Duration, RateLimit, SecretFile
from exporter.ledger import BUCKETS, Ledger, MessageUpdate, Schedule, Totals
from exporter.providers.base import (
    Answer,
    Api,
    Endpoint,
    Family,
    PollError,
    Provider,
    Sample,
    Services,
    account_wide,
    parse,
)

log = logging.getLogger(__name__)

CANARY_ID = "00000000-0000-4000-8000-000000000000"
ACCOUNT_LEVEL = frozenset({"auth", "timeout", "connect", "http_5xx", "rate_limited"})


class Account(AccountBase):
    SECRETS = ("token", "ingest_token")

    base_url: str = "https://api.d7networks.com"
    token: SecretStr | None = None
    token_file: SecretFile = None
    ingest_token: SecretStr | None = None  # what the sending app and D7's webhook present
    ingest_token_file: SecretFile = None
    # the docs say v2; every official SDK calls /whatsapp/v1/report/{request_id}
    report_path: str = "/whatsapp/v2/report/{request_id}"
    interval: Duration | None = 5.0  # how often due ids are picked, not how often each is asked
    retry_first: Duration = 30.0  # an id's first poll after it came in, and its first back-off
    retry_max: Duration = 1800.0  # back-off doubles up to this
    not_found_grace: Duration = 600.0  # 404 for a fresh id is retried this long, then expired
    final_after: Duration = 86400.0  # a delivered message is followed this long for `read`
    expire_after: Duration = 259200.0  # an id not final by then is expired
    keep_finished: Duration = 604800.0  # finished ids are remembered (and not counted again)
    concurrency: int = Field(8, ge=1, le=64)

    @field_validator("report_path")
    @classmethod
    def _report_path(cls, path: str) -> str:
        if "{request_id}" not in path or not path.startswith("/"):
            raise ValueError(f"{path!r} must start with / and contain {{request_id}}")
        return path

    def schedule(self) -> Schedule:
        return Schedule(
            first=self.retry_first,
            max=self.retry_max,
            not_found_grace=self.not_found_grace,
            final_after=self.final_after,
            expire_after=self.expire_after,
            keep_finished=self.keep_finished,
        )


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
            msg_id=m.msg_id or f"#{index}",
            status=m.status,
            conversation_type=m.conversation_type or "",
            message_type=m.message_type or "",
        )
        for index, m in enumerate(report.messages)
    ]


class WebhookEvent(Answer):
    """One delivery event as D7 posts it; reference fields may be flat or nested (ignored)."""

    request_id: str = Field(min_length=1, max_length=128)
    msg_id: str | None = Field(None, max_length=128)
    status: str = Field(min_length=1, max_length=64)
    timestamp: float | None = None  # ms since epoch
    conversation_type: str | None = None
    message_type: str | None = None

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    def update(self) -> MessageUpdate:
        at = self.timestamp / 1000 if self.timestamp and self.timestamp > 0 else None
        return MessageUpdate(
            msg_id=self.msg_id or "#0",
            status=self.status,
            conversation_type=self.conversation_type or "",
            message_type=self.message_type or "",
            at=at,
        )


# --- the poll cycle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Cycle:
    polled: int
    pending: int


class Follower:
    """One account's poll cycle; keeps only when it last proved the token on an idle cycle."""

    def __init__(self, account: Account, ledger: Ledger, canary_every: float):
        self.account = account
        self.ledger = ledger
        self.schedule = account.schedule()
        self.canary_every = canary_every
        self._last_canary = -math.inf

    def path(self, request_id: str) -> str:
        return self.account.report_path.format(request_id=quote(request_id, safe=""))

    async def cycle(self, api: Api, target: str) -> Cycle:
        name = self.account.account
        per_cycle = max(
            1, math.ceil(api.budget.requests * (self.account.interval or 5.0) / api.budget.period)
        )
        due = await asyncio.to_thread(self.ledger.due, name, per_cycle)
        if not due:
            await asyncio.to_thread(self.ledger.expire_old, name, self.schedule)
            await self._canary(api)
            return Cycle(0, self.ledger.pending_count(name))
        gate = asyncio.Semaphore(self.account.concurrency)

        async def one(item):
            async with gate:
                try:
                    return (
                        item,
                        report_updates(await api.call("GET", self.path(item.request_id))),
                        None,
                    )
                except PollError as error:
                    if error.reason == "not_found":
                        return item, None, "not_found"
                    if error.reason in ("provider_error", "http_4xx"):
                        log.info(
                            "D7 refuses a request id; expiring it",
                            extra={"fields": {"account": name, "error": error.detail}},
                        )
                        return item, None, "gone"
                    return item, None, error

        outcomes = await asyncio.gather(*(one(item) for item in due))
        errors = [problem for _, _, problem in outcomes if isinstance(problem, PollError)]
        answers = [(d, u, "retry" if isinstance(p, PollError) else p) for d, u, p in outcomes]
        await asyncio.to_thread(self.ledger.record, name, answers, self.schedule)
        if errors:
            raise errors[0]
        return Cycle(len(due), self.ledger.pending_count(name))

    async def _canary(self, api: Api) -> None:
        now = time.monotonic()
        if now - self._last_canary < self.canary_every:
            return
        try:
            await api.call("GET", self.path(CANARY_ID))
        except PollError as error:
            if error.reason != "not_found":
                raise
        self._last_canary = now


def cycle_families(target: str, result: Cycle) -> list[Family]:
    """The D7 metrics are the ledger's, published as it changes; a cycle adds none itself."""
    return []


def ledger_families(totals: dict[str, Totals]) -> list[Family]:
    """whatsapp_messages_total, whatsapp_tracked_requests, whatsapp_message_delivery_seconds."""
    messages, tracked, delivery = [], [], []
    for account in sorted(totals):
        t = totals[account]
        base = (("provider", "d7"), ("account", account))
        for (status, conversation, kind), count in sorted(t.messages.items()):
            labels = (
                *base,
                ("status", status),
                ("conversation_type", conversation),
                ("message_type", kind),
            )
            messages.append(Sample(labels, float(count), "_total"))
        for state in ("pending", "done", "expired"):
            tracked.append(Sample((*base, ("state", state)), float(t.states.get(state, 0))))
        for status in sorted(t.buckets):
            counts, running = t.buckets[status], 0
            labels = (*base, ("status", status))
            for bound, count in zip((*BUCKETS, math.inf), counts, strict=True):
                running += count
                le = "+Inf" if bound == math.inf else f"{float(bound)}"
                delivery.append(Sample((*labels, ("le", le)), float(running), "_bucket"))
            delivery.append(Sample(labels, float(running), "_count"))
            delivery.append(Sample(labels, t.sums.get(status, 0.0), "_sum"))
    return [
        Family(
            "whatsapp_messages",
            "counter",
            "D7 messages that reached a status, each counted "
            "once per status (read implies delivered implies sent).",
            tuple(messages),
        ),
        Family(
            "whatsapp_tracked_requests",
            "gauge",
            "D7 request ids in the exporter's ledger by state.",
            tuple(tracked),
        ),
        Family(
            "whatsapp_message_delivery_seconds",
            "histogram",
            "Seconds from a D7 request's "
            "send (or its hand-in to the exporter) to a message's delivered and read status.",
            tuple(delivery),
        ),
    ]


def endpoints(account: Account, defaults: Defaults, services: Services) -> list[Endpoint]:
    if services.ledger is None:
        return []
    follower = Follower(account, services.ledger, canary_every=max(defaults.interval, 60.0))
    return [
        Endpoint("report", account.interval or 5.0, account_wide, follower.cycle, cycle_families)
    ]


def events(body: Any) -> list[WebhookEvent]:
    """A webhook body: one event object, or a list of them."""
    items = body if isinstance(body, list) else [body]
    return [parse(WebhookEvent, item, f"event[{i}]") for i, item in enumerate(items)]


def sent_at(event: WebhookEvent) -> float | None:
    if event.status.lower() == "sent" and event.timestamp:
        return event.timestamp / 1000
    return None


PROVIDER = Provider(
    name="d7",
    account_model=Account,
    default_rate_limit=RateLimit(requests=600, period=60.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
)
