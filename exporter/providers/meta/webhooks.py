"""Meta's webhooks: `GET /webhooks/meta/{account}` (the subscription handshake) and `POST` (signed
deliveries: message statuses, account, number and template events).

Meta reports what happened to each message only here, at least once, out of order and at
campaign rates; and it announces a restriction, a lower limit or a paused template here before
any poll shows it. So a delivery is refused unless its `X-Hub-Signature-256` is the HMAC of its
raw bytes with the account's app secret; it is parsed in one pass (pydantic over the bytes, after
the depth check); its statuses go to the tracking room, which counts each message once per
status and answers only after its COMMIT; its other events are counted, and those that change
what a poll showed (a template's status or quality, a number's limit) change it at once
(`StateContext.amend`). Wamids, recipients, texts and opaque data are stored or dropped, never
shown or logged.

One Meta app has one callback URL for all its WABAs: an entry is attributed to the configured
account whose `waba_id` it names among those sharing the path account's app secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Required
from urllib.parse import parse_qs

import pydantic
from pydantic import Field
from typing_extensions import TypedDict  # (pydantic wants it, not typing's, before 3.12)

from exporter.exposition import safe_text
from exporter.metrics import Family, Sample
from exporter.providers.base import (
    MAX_DEPTH,
    Answer,
    ProviderStateError,
    StateContext,
    nested_deeper_than,
)
from exporter.routing import Request, Response, Route, json_response
from exporter.tracking import (
    LedgerError,
    MessageUpdate,
    Names,
    Shown,
    Totals,
    Vocabulary,
    families,
    open_ledger,
)
from exporter.tracking.families import LAST_WEBHOOK_HELP, PROBLEMS_HELP
from exporter.tracking.times import AHEAD, age, event_time

log = logging.getLogger(__name__)

PREFIX = "/webhooks/meta/"
MAX_BODY = 1 << 20  # the web server's own limit; Meta's deliveries are a few KB
MAX_ENTRIES = 1000
EXPIRE_EVERY = 60.0  # seconds between sweeps of messages that never reached a final status
FIELDS = (
    "messages",
    "account_update",
    "phone_number_quality_update",
    "phone_number_name_update",
    "message_template_status_update",
    "message_template_quality_update",
    "template_category_update",
    "business_capability_update",
)
MAX_EVENTS = 50  # distinct `event` values per account and field; more are "other"
REFUSED = ("signature", "verify_token", "malformed", "too_large")
PROBLEMS = ("bad_timestamp", "unknown_waba")
BANNED = frozenset({"DISABLE", "SCHEDULE_FOR_DISABLE"})

# --- the body -----------------------------------------------------------------------------------


def _text(value: Any) -> Any:
    """Ids and codes come as numbers or strings, depending on the field and the year."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Text = Annotated[str, pydantic.BeforeValidator(_text)]


# A status is a TypedDict, not a model: pydantic makes no object per status (a campaign's burst
# has one per callback), only the dict of the fields below, every other one (the recipient, the
# opaque callback data) dropped (pydantic's default for a TypedDict, checked in the tests); that
# dict is what the tracking room journals and `_decode` reads. Ids and codes may come as numbers
# or strings.


class _Error(TypedDict, total=False):
    code: Text | None


class _Pricing(TypedDict, total=False):
    category: str | None


class _Origin(TypedDict, total=False):
    type: str | None


class _Conversation(TypedDict, total=False):
    origin: _Origin | None


class _Status(TypedDict, total=False):
    id: Required[Annotated[str, Field(min_length=1, max_length=256)]]
    status: Required[Annotated[str, Field(max_length=64)]]
    timestamp: Any
    pricing: _Pricing | None
    conversation: _Conversation | None
    errors: list[_Error]


def _decode(statuses: Iterable[Mapping[str, Any]]) -> list[tuple[str, MessageUpdate, float | None]]:
    """Statuses as `_store` journaled them, as the tracking room counts them: (wamid, its
    update, its send time if it is a `sent`). Run by the ledger's writer, not the event loop."""
    latest = time.time() + AHEAD
    out = []
    for status in statuses:
        wamid, state = status["id"], status["status"]
        at = event_time(status.get("timestamp"), latest=latest)
        pricing = status.get("pricing")
        category = pricing.get("category") if pricing else None
        conversation = status.get("conversation")
        if not category and conversation:
            category = (conversation.get("origin") or {}).get("type")
        code = ""
        if errors := status.get("errors"):
            code = next((e["code"] for e in errors if e.get("code")), "") or ""
            code = code if code.isascii() and code.isdigit() else ("other" if code else "")
        if not (wamid.isascii() and len(wamid) <= 256):
            wamid = safe_text(wamid, 256)
        update = MessageUpdate(wamid, state, category or "", "", at, code)
        out.append((wamid, update, at if state.strip().lower() == "sent" else None))
    return out


def _unusable_times(statuses: Iterable[Mapping[str, Any]], latest: float) -> int:
    """How many statuses give a time that is no time (kept, without it: counted as a problem)."""
    bad = 0
    for status in statuses:
        stamp = status.get("timestamp")
        if stamp is not None and stamp != "" and event_time(stamp, latest=latest) is None:
            bad += 1
    return bad


class _Restriction(Answer):
    restriction_type: Any = None
    expiration: Any = None


class _Value(Answer):
    """Every field's value in one model: Meta sends one envelope for all of them."""

    statuses: tuple[_Status, ...] = ()
    event: Any = None
    # templates
    message_template_name: Any = None
    message_template_language: Any = None
    message_template_category: Any = None
    new_quality_score: Any = None
    new_category: Any = None
    # numbers
    display_phone_number: Any = None
    current_limit: Any = None
    max_daily_conversations_per_business: Any = None
    # the account
    restriction_info: tuple[_Restriction, ...] = ()
    ban_info: dict[str, Any] | None = None


class _Change(Answer):
    field: str = Field(max_length=256)
    value: _Value = _Value()


class _Entry(Answer):
    id: Text = Field(max_length=64)
    time: Any = None
    changes: tuple[_Change, ...] = ()


class _Delivery(Answer):
    object: str | None = None
    entry: tuple[_Entry, ...] = Field(default=(), max_length=MAX_ENTRIES)


_DELIVERY = pydantic.TypeAdapter(_Delivery)


VOCABULARY = Vocabulary(
    title="the Meta",
    statuses=("sent", "delivered", "read", "played", "failed"),
    final=frozenset({"read", "played", "failed"}),
    # a voice message played was read; one read was delivered; one delivered was sent: Meta
    # may skip or reorder the steps in between, and the ratios stay right
    implies={"played": ("read", "delivered", "sent"), "read": ("delivered", "sent")}
    | {"delivered": ("sent",)},
    conversation_types=frozenset(
        {
            "marketing",
            "marketing_lite",
            "utility",
            "authentication",
            "authentication_international",
            "service",
            "referral_conversion",
        }
    ),
    message_types=frozenset(),
    names=Names.of("meta"),
    settled_by_webhooks=True,  # no poll per message: the final status settles it
    detailed=frozenset({"failed"}),
    timed_from_hand_in=False,  # the first webhook's arrival is no send time
    no_conversation_type="",  # a failed status carries no pricing (design.md)
    decode=_decode,
)

SHOWN = Shown(
    provider="meta",
    tracked="messages",
    tracked_help="Meta messages in the exporter's ledger by state: pending until a "
    "final status (read, played, failed) or expire_after, done, expired.",
    details=(
        "failed",
        "whatsapp_message_failures",
        "code",
        "Meta messages that failed, each counted once, by Meta's error code (unknown: none "
        "given; other: past 100 distinct codes).",
    ),
)


def signed(body: bytes, header: str, secret: str) -> bool:
    """`sha256=<hex>` over the raw bytes, compared in constant time."""
    scheme, _, given = header.strip().partition("=")
    if scheme.lower() != "sha256" or not given:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(given.strip().lower().encode(), expected.encode())


# --- the state ----------------------------------------------------------------------------------

# (field, value) -> (the polled endpoint it changes, how it changes the remembered result), or
# None: the polled side's knowledge (exporter/providers/meta), handed in so this module needs none
Amendment = Callable[[str, Any], tuple[str, Callable[[Any], Any]] | None]


@dataclasses.dataclass
class Heard:
    """What the webhooks told about one account, kept on the event loop."""

    events: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    refused: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(REFUSED, 0))
    problems: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    last: float | None = None
    restrictions: dict[str, float] = dataclasses.field(default_factory=dict)  # type -> until
    banned: bool = False

    def restricted(self, now: float) -> bool:
        return self.banned or any(until > now for until in self.restrictions.values())


class Webhooks:
    """Meta's own state: the message ledger, the webhook routes, and the counts they keep."""

    def __init__(self, context: StateContext, amendment: Amendment):
        self._amendment = amendment
        try:
            self.ledger = open_ledger(
                context.storage_url or context.storage_path,
                vocabulary=VOCABULARY,
                password=context.storage_password,
            )
        except LedgerError as exc:
            raise ProviderStateError(str(exc)) from None
        self.ledger.on_change(context.changed)
        self._changed = context.changed
        self._accounts = context.accounts
        self._amend = context.amend
        self._seen: dict[str, Heard] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._routes = [
            Route("GET", PREFIX, self.handshake, prefix=True),
            Route("POST", PREFIX, self.deliver, prefix=True, refused=self._too_large),
        ]
        # the exporter opens its states on its event loop; a tool that only reads a provider's
        # endpoints opens it without one, and has nothing to sweep
        with contextlib.suppress(RuntimeError):
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def routes(self) -> list[Route]:
        return self._routes

    def _account(self, name: str) -> Heard:
        found = self._seen.get(name)
        if found is None:
            found = self._seen[name] = Heard()
        return found

    # --- the routes ---

    async def handshake(self, request: Request) -> Response:
        """Meta's subscription check: the challenge echoed when the verify token is the
        account's; 403 otherwise (and counted)."""
        name = request.path.removeprefix(PREFIX)
        account = self._accounts().get(name)
        if account is None:
            return _error(404, f"no Meta account named {name!r} is configured")
        query = parse_qs(request.query, max_num_fields=16)
        mode = query.get("hub.mode", [""])[0]
        token = query.get("hub.verify_token", [""])[0].encode()
        challenge = query.get("hub.challenge", [""])[0]
        expected = account.verify_token
        if (
            mode != "subscribe"
            or expected is None
            or not hmac.compare_digest(token, expected.get_secret_value().encode())
        ):
            self._refuse(name, "verify_token")
            return _error(403, "hub.mode must be subscribe and hub.verify_token the account's")
        if not challenge or len(challenge) > 256 or not challenge.isascii():
            return _error(400, "hub.challenge is missing or not a short ASCII string")
        if not challenge.isalnum():  # Meta's is digits; echoed bytes must not be markup
            return _error(400, "hub.challenge must be letters and digits")
        return Response(200, challenge.encode(), "text/plain; charset=utf-8")

    async def deliver(self, request: Request) -> Response:
        name = request.path.removeprefix(PREFIX)
        account = self._accounts().get(name)
        if account is None:
            return _error(404, f"no Meta account named {name!r} is configured")
        body = request.body
        if len(body) > MAX_BODY:
            self._refuse(name, "too_large")
            return _error(413, f"the body is {len(body)} bytes; the limit is {MAX_BODY}")
        secret = account.app_secret
        header = request.headers.get("x-hub-signature-256", "")
        if secret is None or not signed(body, header, secret.get_secret_value()):
            self._refuse(name, "signature")
            why = "no app_secret is configured" if secret is None else "it does not match"
            return _error(401, f"X-Hub-Signature-256 refused: {why}")
        delivery = _parse(body)
        if isinstance(delivery, Response):
            self._refuse(name, "malformed")
            return delivery
        by_account = self._attribute(name, secret.get_secret_value(), delivery.entry)
        try:
            for owner, entries in by_account.items():
                await self._store(owner, entries)
        except LedgerError as exc:
            log.error("the Meta ledger refused a write", extra={"fields": {"error": str(exc)}})
            return _error(503, "the exporter cannot store statuses right now; retry")
        for owner, entries in by_account.items():
            await self._events(owner, entries)
        return json_response(200, {"account": name, "accepted": len(delivery.entry)})

    def _too_large(self, request: Request, reason: str) -> None:
        """The web server refused the body unread (over its limit): counted all the same."""
        name = request.path.removeprefix(PREFIX)
        if name in self._accounts():
            self._refuse(name, reason)

    def _refuse(self, name: str, reason: str) -> None:
        refused = self._account(name).refused
        refused[reason] = refused.get(reason, 0) + 1
        self._changed()

    def _attribute(
        self, name: str, secret: str, entries: Iterable[_Entry]
    ) -> dict[str, list[_Entry]]:
        """Entries by the account whose WABA they are about. One of a WABA no account of this
        app has stays with the path's account, counted: its signature proved it Meta's, and a
        status is never dropped over a configuration slip."""
        accounts = self._accounts()
        same_app = {
            a.waba_id: a.account
            for a in accounts.values()
            if a.app_secret is not None
            and hmac.compare_digest(a.app_secret.get_secret_value().encode(), secret.encode())
        }
        same_app.setdefault(accounts[name].waba_id, name)
        out: dict[str, list[_Entry]] = {}
        for entry in entries:
            owner = same_app.get(entry.id)
            if owner is None:
                self._problem(name, "unknown_waba")
                owner = name
            out.setdefault(owner, []).append(entry)
        return out

    def _problem(self, name: str, problem: str, count: int = 1) -> None:
        if count:
            problems = self._account(name).problems
            problems[problem] = problems.get(problem, 0) + count
            self._changed()

    async def _store(self, name: str, entries: list[_Entry]) -> None:
        """The entries' statuses, committed before this returns."""
        batch: list[_Status] = []
        for entry in entries:
            for change in entry.changes:
                batch += change.value.statuses
        self._problem(name, "bad_timestamp", _unusable_times(batch, time.time() + AHEAD))
        if batch:
            await self.ledger.report(name, batch, self._accounts()[name].schedule())

    async def _events(self, name: str, entries: list[_Entry]) -> None:
        seen = self._account(name)
        seen.last = time.time()
        for entry in entries:
            since = event_time(entry.time) or time.time()
            for change in entry.changes:
                field = change.field if change.field in FIELDS else "other"
                event = _event(seen, field, change.value.event)
                seen.events[field, event] = seen.events.get((field, event), 0) + 1
                try:
                    await self._apply(name, seen, field, change.value, since)
                except Exception as exc:  # counted above; the poll will show it anyway
                    log.warning(
                        "a Meta webhook's news could not be applied; the next poll shows it",
                        extra={
                            "fields": {"account": name, "field": field, "error": type(exc).__name__}
                        },
                    )
        self._changed()

    async def _apply(self, name: str, seen: Heard, field: str, value: _Value, at: float) -> None:
        if field == "account_update":
            _account_update(seen, value)
            return
        change = self._amendment(field, value)
        if change is not None and self._amend is not None:
            endpoint, amend = change
            await self._amend(name, endpoint, "", amend, at)

    async def _sweep(self) -> None:
        """With no webhook to say so: messages delivered and never read are done after
        `final_after`, those that never reached a final status expire after `expire_after`,
        and restrictions end at their expiration."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY)
            for name, account in list(self._accounts().items()):
                with contextlib.suppress(LedgerError):
                    await self.ledger.settle_quiet(name, account.schedule())
                    await self.ledger.expire_old(name, account.schedule())
            if self._seen:
                self._changed()

    # --- what is shown ---

    def families(self) -> list[Family]:
        return webhook_families(self.ledger.totals(), self._seen, self._accounts(), time.time())

    async def status(self) -> dict[str, dict[str, str]]:
        totals = self.ledger.totals()
        now = time.time()
        out = {}
        for name in sorted(self._accounts()):
            states = totals[name].states if name in totals else {}
            last = self._seen[name].last if name in self._seen else None
            out[name] = {
                "pending": str(states.get("pending", 0)),
                "done": str(states.get("done", 0)),
                "expired": str(states.get("expired", 0)),
                "last webhook": age(now - last) + " ago" if last else "none yet",
            }
        return out

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.ledger.close()


def webhook_families(
    totals: Mapping[str, Totals], heard: Mapping[str, Heard], accounts: Iterable[str], now: float
) -> list[Family]:
    """Every configured account's counters, at 0 until something happens: a healthy install's
    dashboard shows 0 refused, not an empty panel."""
    names = sorted({*accounts, *heard})
    refused, problems, events, last, restricted, until = [], [], [], [], [], []
    for name in names:
        seen = heard.get(name) or Heard()
        base = (("provider", "meta"), ("account", name))
        refused += [
            Sample((*base, ("reason", r)), float(n), "_total") for r, n in seen.refused.items()
        ]
        problems += [
            Sample((*base, ("problem", p)), float(n), "_total") for p, n in seen.problems.items()
        ]
        counted = {("messages", ""): 0, **seen.events}
        events += [
            Sample((*base, ("field", f), ("event", e)), float(n), "_total")
            for (f, e), n in sorted(counted.items())
        ]
        if seen.last is not None:
            last.append(Sample(base, seen.last))
        restricted.append(Sample(base, float(seen.restricted(now))))
        until += [
            Sample((*base, ("restriction_type", kind)), at)
            for kind, at in sorted(seen.restrictions.items())
            if at > now
        ]
    return [
        *families(SHOWN, totals, names),
        Family(
            "whatsapp_webhook_events",
            "counter",
            "Changes in the webhooks accepted from Meta, by field and event (the change's "
            'own event, "" if it has none).',
            tuple(events),
        ),
        Family(
            "whatsapp_webhook_refused",
            "counter",
            "Webhook requests refused: signature (X-Hub-Signature-256 missing or not the "
            "app secret's), verify_token (a subscription check with the wrong token), "
            "malformed (not Meta's JSON), too_large (over 1 MiB).",
            tuple(refused),
        ),
        Family("whatsapp_tracking_problems", "counter", PROBLEMS_HELP, tuple(problems)),
        Family(
            "whatsapp_exporter_last_webhook_timestamp_seconds",
            "gauge",
            LAST_WEBHOOK_HELP,
            tuple(last),
        ),
        Family(
            "whatsapp_account_restricted",
            "gauge",
            "1 while Meta's webhooks said the WABA is restricted (a restriction not yet "
            "expired) or disabled, else 0. Known from webhooks only: after a restart, 0 "
            "until the next account_update (whatsapp_can_send_message shows it polled).",
            tuple(restricted),
        ),
        Family(
            "whatsapp_account_restriction_expiry_timestamp_seconds",
            "gauge",
            "Unix time a restriction Meta's webhooks announced for the WABA ends, per "
            "restriction_type (e.g. RESTRICTED_BIZ_INITIATED_MESSAGING); +Inf when Meta gave "
            "no end; gone once it ended.",
            tuple(until),
        ),
    ]


def _parse(body: bytes) -> _Delivery | Response:
    if nested_deeper_than(body, MAX_DEPTH):
        return _error(400, f"the body is not JSON: nested deeper than {MAX_DEPTH} levels")
    try:
        return _DELIVERY.validate_json(body)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            return _error(400, f"the body is not JSON: {first['msg']}")
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        return _error(400, f"not a Meta webhook: {where}: {first['msg']}")


def _event(seen: Heard, field: str, raw: Any) -> str:
    """The change's event as a label: Meta's upper-case token, bounded per account and field."""
    if raw is None or raw == "":
        return ""
    text = raw if isinstance(raw, str) else ""
    if not (0 < len(text) <= 64 and text.isascii() and text.replace("_", "").isalnum()):
        return "other"
    if (field, text) not in seen.events:
        distinct = sum(1 for f, e in seen.events if f == field and e != "other")
        if distinct >= MAX_EVENTS:
            return "other"
    return text


def _account_update(seen: Heard, value: _Value) -> None:
    event = value.event if isinstance(value.event, str) else ""
    if event == "ACCOUNT_RESTRICTION":
        for restriction in value.restriction_info:
            kind = safe_text(str(restriction.restriction_type or "unknown"), 64)
            until = event_time(restriction.expiration, ahead=10 * 365 * 86400.0)
            if until is None:  # no end given: restricted until Meta says otherwise
                until = math.inf
            if kind in seen.restrictions or len(seen.restrictions) < 32:
                seen.restrictions[kind] = until
    elif event == "DISABLED_UPDATE":
        state = (value.ban_info or {}).get("waba_ban_state")
        seen.banned = state in BANNED
    elif event in ("ACCOUNT_RECONNECTED", "ACCOUNT_RESTRICTION_LIFTED"):
        seen.banned = False
        seen.restrictions.clear()


def _error(status: int, message: str) -> Response:
    return json_response(status, {"error": message})
