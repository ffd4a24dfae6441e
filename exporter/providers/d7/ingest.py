"""How D7 request ids reach the ledger: from the sending application, and from D7's webhooks.

`POST /api/v1/requests` {"account": ..., "request_ids": [...]} and `POST /webhooks/d7/{account}`,
both with `Authorization: Bearer <the account's ingest_token>`. A request is validated whole
before anything is stored, and ids are committed before the answer goes out.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import pydantic
from pydantic import Field, StringConstraints

from exporter.exposition import safe_text
from exporter.providers.base import MAX_DEPTH, Answer, load_json, nested_deeper_than
from exporter.providers.d7.account import Account
from exporter.routing import Request, Response, Route, json_response
from exporter.tracking import Ledger, LedgerError, MessageUpdate
from exporter.tracking.times import event_time

log = logging.getLogger(__name__)

MAX_IDS = 1000
MAX_BODY = 256 * 1024
REQUESTS_PATH = "/api/v1/requests"
WEBHOOK_PREFIX = "/webhooks/d7/"

RequestId = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
]


class WebhookEvent(Answer):
    """One delivery event as D7 posts it; reference fields may be flat or nested (ignored).
    The timestamp is taken as it comes and judged once, in `update`."""

    request_id: str = Field(min_length=1, max_length=128)
    msg_id: str | None = Field(None, max_length=128)
    status: str = Field(min_length=1, max_length=64)
    timestamp: Any = None  # ms since epoch, as a number or a numeric string
    conversation_type: str | None = None
    message_type: str | None = None

    def update(self) -> tuple[MessageUpdate, bool]:
        """The event for the ledger, and whether its timestamp was bad (dropped, counted)."""
        at = event_time(self.timestamp, per_second=1000)
        return (
            MessageUpdate(
                msg_id=safe_text(self.msg_id or "#0", 128),
                status=self.status,
                conversation_type=self.conversation_type or "",
                message_type=self.message_type or "",
                at=at,
            ),
            at is None and self.timestamp not in ("", None),
        )


_ONE = pydantic.TypeAdapter(WebhookEvent)
_MANY = pydantic.TypeAdapter(Annotated[list[WebhookEvent], Field(min_length=1, max_length=MAX_IDS)])


def events(body: bytes) -> list[WebhookEvent] | Response:
    """A webhook body, one event object or a list of them, parsed and checked in one pass over
    its bytes (json.loads and then a model for each event cost twice as much, a burst's tenth)."""
    if len(body) > MAX_BODY:
        return _error(413, f"the body is {len(body)} bytes; the limit is {MAX_BODY}")
    if nested_deeper_than(body, MAX_DEPTH):
        return _error(400, f"the body is not JSON: nested deeper than {MAX_DEPTH} levels")
    many = body.lstrip()[:1] == b"["
    try:
        return _MANY.validate_json(body) if many else [_ONE.validate_json(body)]
    except pydantic.ValidationError as exc:
        return _refusal(exc, many)


def _refusal(exc: pydantic.ValidationError, many: bool) -> Response:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return _error(400, f"the body is not JSON: {first['msg']}")
    if many and first["type"] in ("too_short", "too_long") and first["loc"] == ():
        got = first.get("ctx", {}).get("actual_length", "another number")
        return _error(422, f"send 1 to {MAX_IDS} events at a time, not {got}")
    loc = list(first["loc"])
    where = f"event[{loc.pop(0) if many else 0}]"
    path = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return _error(422, f"{where}: {path}: {first['msg']}{more}")


class _Handover(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    account: str
    request_ids: list[RequestId] = pydantic.Field(min_length=1, max_length=MAX_IDS)


class Ingest:
    def __init__(
        self,
        ledger: Ledger,
        accounts: Callable[[], Mapping[str, Account]],
        count: Callable[[str, str, int], None],
        webhook_arrived: Callable[[str, int], None],
    ):
        self._ledger = ledger
        self._accounts = accounts  # the running config's D7 accounts, by name
        self._count = count  # (account, what, how many): ids new/known/refused, events, problems
        self._webhook_arrived = webhook_arrived  # (account, events stored)
        self._routes = [
            Route("POST", REQUESTS_PATH, self.requests),
            Route("POST", WEBHOOK_PREFIX, self.webhook, prefix=True),
        ]

    def routes(self) -> list[Route]:
        return self._routes  # (made once: the web server asks on every request)

    async def requests(self, request: Request) -> Response:
        refused = self._authenticated(request)
        if refused:
            return refused
        body = _json(request.body)
        if isinstance(body, Response):
            return body
        try:
            handover = _Handover.model_validate(body)
        except pydantic.ValidationError as exc:
            self._refused(body)
            return _invalid(exc)
        account = self._account(request, handover.account)
        if isinstance(account, Response):
            return account
        try:
            new = await self._ledger.add(account.account, handover.request_ids, account.schedule())
        except LedgerError as exc:
            self._refused(body)
            return _unavailable(exc)
        self._count(account.account, "ids_new", new)
        self._count(account.account, "ids_known", len(set(handover.request_ids)) - new)
        return json_response(
            202,
            {
                "account": account.account,
                "received": len(handover.request_ids),
                "new": new,
                "pending": self._ledger.pending_count(account.account),
            },
        )

    async def webhook(self, request: Request) -> Response:
        """`/webhooks/d7/{account}` with the bearer token, or `/webhooks/d7/{account}/{secret}`
        for a callback that cannot send headers."""
        name, _, secret = request.path.removeprefix(WEBHOOK_PREFIX).partition("/")
        if secret:
            account = self._by_secret(name, secret)
        else:
            account = self._authenticated(request) or self._account(request, name)
        if isinstance(account, Response):
            return account
        received = events(request.body)
        if isinstance(received, Response):
            return received
        batch, ignored = [], 0
        for event in received:
            update, bad = event.update()
            ignored += bad
            sent = update.at if update.status.lower() == "sent" else None
            batch.append((safe_text(event.request_id, 128), update, sent))
        if ignored:
            self._count(account.account, "bad_timestamp", ignored)
        try:
            await self._ledger.report(account.account, batch, account.schedule())
        except LedgerError as exc:
            return _unavailable(exc)
        self._webhook_arrived(account.account, len(batch))
        return json_response(200, {"account": account.account, "accepted": len(batch)})

    def _by_secret(self, name: str, secret: str) -> Account | Response:
        """Compared in constant time; a wrong secret and an unknown account look alike."""
        account = self._accounts().get(name)
        expected = account.webhook_secret if account is not None else None
        given = secret.encode()
        if expected is None or not hmac.compare_digest(given, expected.get_secret_value().encode()):
            return _error(401, "unknown webhook path")
        return account

    def _refused(self, body: Any) -> None:
        """Ids in a refused hand-in, counted for a configured account (never an unknown name:
        labels stay bounded)."""
        if not isinstance(body, dict) or body.get("account") not in self._accounts():
            return
        ids = body.get("request_ids")
        self._count(body["account"], "ids_refused", len(ids) if isinstance(ids, list) else 1)

    def _authenticated(self, request: Request) -> Response | None:
        """401 unless the bearer token is some D7 account's ingest_token."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "send Authorization: Bearer <the account's ingest_token>")
        if not any(_same(token.strip(), a) for a in self._accounts().values()):
            return _error(401, "the bearer token is not an ingest_token of this exporter")
        return None

    def _account(self, request: Request, name: str) -> Account | Response:
        account = self._accounts().get(name)
        if account is None:
            return _error(404, f"no D7 account named {name!r} is configured")
        token = request.headers["authorization"].partition(" ")[2].strip()
        if not _same(token, account):
            return _error(403, f"the bearer token is not the ingest_token of account {name!r}")
        return account


def _same(token: str, account: Account) -> bool:
    return hmac.compare_digest(token.encode(), account.ingest_token.get_secret_value().encode())


def _json(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        return _error(413, f"the body is {len(body)} bytes; the limit is {MAX_BODY}")
    try:
        return load_json(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return _error(400, f"the body is not JSON: {exc}")


def _invalid(exc: pydantic.ValidationError) -> Response:
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
        for e in exc.errors(include_url=False)
    ]
    return json_response(422, {"error": "; ".join(problems[:10]), "errors": problems[:100]})


def _error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


def _unavailable(exc: LedgerError) -> Response:
    log.error("the D7 ledger refused a write", extra={"fields": {"error": str(exc)}})
    return _error(503, "the exporter cannot store ids right now; nothing was stored, retry")
