"""Meta's WhatsApp Cloud API (the Graph API), directly or through a BSP that proxies it.

Three read-only calls per WABA: `/{waba_id}/phone_numbers` with every number's quality, status,
messaging limit and `health_status` in one paged answer (`health`), `/{waba_id}/message_templates`
(`templates`, paged and capped), and the WABA's `analytics` field for today's sent and delivered
messages, one request per number (`analytics`).

The Graph API says what went wrong in its body's `error.code`, not in the HTTP status (a rate
limit is an HTTP 400), and how much of the account's budget is used in `X-Business-Use-Case-Usage`
on every answer: ANSWER_RULES read both, and the account pauses before Meta cuts it off.

What an answer means is in the pure functions `health_families` and `templates_families`, over
`Numbers` and `Templates`: the latest known limit per number and status per template, which
Meta's webhooks can later change without a poll.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator

from exporter import tracking
from exporter.config import (
    AccountBase,
    Defaults,
    Duration,
    HeaderValue,
    RateLimit,
    Schedule,
    SecretFile,
    header_names,
)
from exporter.exposition import safe_text
from exporter.metrics import Family, family, gauge
from exporter.providers.base import (
    POLLED,
    Answer,
    AnswerRules,
    Api,
    Endpoint,
    Known,
    PollError,
    Provider,
    StateContext,
    account_wide,
    parse,
)
from exporter.providers.meta import webhooks

log = logging.getLogger(__name__)

# v25.0 lives until 2028-07-29; after a version expires Meta answers with a newer one, silently
DEFAULT_BASE_URL = "https://graph.facebook.com/v25.0"

QUALITIES = ("GREEN", "YELLOW", "RED", "UNKNOWN")
STATUSES = (
    "CONNECTED",
    "PENDING",
    "FLAGGED",
    "RESTRICTED",
    "RATE_LIMITED",
    "OFFLINE",
    "DISCONNECTED",
    "DELETED",
    "BANNED",
    "UNVERIFIED",
    "MIGRATED",
)
NAME_STATUSES = (
    "APPROVED",
    "PENDING_REVIEW",
    "DECLINED",
    "NONE",
    "AVAILABLE_WITHOUT_REVIEW",
    "EXPIRED",
)
CAN_SEND = ("AVAILABLE", "LIMITED", "BLOCKED")
# health_status entities that get a series; MESSAGE_TEMPLATE entities would be one per template,
# and a template's state is whatsapp_template_status's
ENTITIES = ("phone_number", "waba", "business", "app")
PROBLEMS = ("unknown_messaging_limit", "number_without_digits", "number_not_listed")

# business-initiated conversations (unique users) per 24 h; the older per-number tiers too
TIERS = {
    "TIER_50": 50.0,
    "TIER_250": 250.0,
    "TIER_1K": 1000.0,
    "TIER_2K": 2000.0,
    "TIER_10K": 10_000.0,
    "TIER_100K": 100_000.0,
    "TIER_UNLIMITED": math.inf,
    "UNLIMITED": math.inf,
}

NUMBER_FIELDS = (
    "id,display_phone_number,verified_name,quality_rating,status,name_status,throughput,"
    "platform_type,whatsapp_business_manager_messaging_limit,health_status"
)
TEMPLATE_FIELDS = "id,name,language,status,category,quality_score"
PAGE_SIZE = 100
INTERVALS = {"health": 300.0, "templates": 900.0, "analytics": 900.0}
MAX_NUMBER_PAGES = 10  # 1,000 numbers: far beyond any WABA's; more is a hostile answer
MAX_TEMPLATES = 1000  # kept per WABA; the rest are counted in whatsapp_templates_dropped_total
MAX_CURSOR = 4096  # Meta's are ~100 characters; a longer one would only bloat the next URL
MAX_STATE = 64  # characters of a state value Meta may add (kept as it comes, made safe)

# Graph error codes (developers.facebook.com/docs/graph-api/guides/error-handling)
AUTH_CODES = frozenset({190, 10, *range(200, 300)})
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613, 80007})
NOT_FOUND = (100, 33)  # "object with ID ... does not exist": a wrong waba_id
PACE_AT = 90.0  # percent of any X-Business-Use-Case-Usage figure: pause before Meta's 100%
PACE_PAUSE = 360.0  # without Meta's estimate: a tenth of its hour-long window
RATE_LIMITED_PAUSE = 900.0  # rate limited without an estimate
MAX_USAGE_HEADER = 16 << 10

# --- config -------------------------------------------------------------------------------------

_DISPLAY_NUMBER = re.compile(r"^\+?[0-9 ()./-]+$")


def _id_text(value: Any) -> Any:
    """`waba_id: 102290129340398` is an int to YAML and an id to Meta."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def digits(text: str) -> str:
    """`+1 555-010-0100` -> `15550100100`: the `number` label, as Meta's own webhooks write it."""
    return "".join(ch for ch in text if "0" <= ch <= "9")[:20]


def _display_number(value: Any) -> Any:
    value = _id_text(value)
    if not isinstance(value, str):
        return value
    if not _DISPLAY_NUMBER.match(value.strip()) or not 7 <= len(digits(value)) <= 15:
        raise ValueError(f"{value!r} is not a display phone number like +1 555 010 0100")
    return digits(value)


class Account(AccountBase):
    OPTIONAL_SECRETS = ("token", "app_secret")

    base_url: str = DEFAULT_BASE_URL
    token: SecretStr | None = None  # a system user's access token: Authorization: Bearer
    token_file: SecretFile = None
    # a BSP proxy's own auth (e.g. D360-API-KEY); sent besides the Bearer token if any
    headers: dict[str, HeaderValue] = {}
    waba_id: Annotated[str, BeforeValidator(_id_text)]
    # display numbers (digits are kept); [] = every number the WABA lists
    phone_numbers: list[Annotated[str, BeforeValidator(_display_number)]] = []
    # for Meta's webhooks (X-Hub-Signature-256 and the subscription handshake); unused by polls
    app_secret: SecretStr | None = None
    app_secret_file: SecretFile = None
    verify_token: SecretStr | None = None
    # each endpoint's own interval, else the account's `interval`, else INTERVALS: never
    # `defaults.interval`, whose minute would spend Meta's hourly budget on nothing that changes
    health: Schedule = Schedule()
    templates: Schedule = Schedule()
    analytics: Schedule = Schedule()
    # messages known from status webhooks: a delivered one waits this long for `read`, one
    # with no final status is expired after expire_after, finished ones are remembered (and
    # not counted again when Meta repeats a status) for keep_finished
    final_after: Duration = 86400.0
    expire_after: Duration = 259200.0
    keep_finished: Duration = 604800.0

    @field_validator("waba_id")
    @classmethod
    def _waba_id(cls, value: str) -> str:
        if not value.isascii() or not value.isdigit() or len(value) > 32:
            raise ValueError(f"{value!r} is not a WhatsApp Business Account id (digits only)")
        return value

    @field_validator("phone_numbers")
    @classmethod
    def _phone_numbers(cls, numbers: list[str]) -> list[str]:
        if len(set(numbers)) != len(numbers):
            raise ValueError("lists a number twice")
        return numbers

    @field_validator("headers")
    @classmethod
    def _headers(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        header_names(headers)
        return headers

    @field_validator("verify_token")
    @classmethod
    def _verify_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty")
        return value

    @model_validator(mode="after")
    def _some_auth(self) -> Account:
        if self.token is None and self.token_file is None and not self.headers:
            raise ValueError("give token or token_file, or headers with a BSP's own auth")
        return self

    def schedule(self) -> tracking.Schedule:
        return tracking.Schedule(
            final_after=self.final_after,
            expire_after=self.expire_after,
            keep_finished=self.keep_finished,
        )


def headers(account: Account) -> dict[str, str]:
    """The Bearer token, then the configured headers (which replace one of the same name)."""
    out = {"Accept": "application/json"}
    if account.token is not None:
        out["Authorization"] = f"Bearer {account.token.get_secret_value()}"
    for name, value in account.headers.items():
        for same in [n for n in out if n.lower() == name.lower()]:
            del out[same]
        out[name] = value.get_secret_value()
    return out


# --- errors and pacing --------------------------------------------------------------------------


def _error(body: Any) -> Mapping[str, Any] | None:
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        return body["error"]
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 12:
        return int(value)
    return None


def provider_error(body: Any) -> str | None:
    """`{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}`."""
    error = _error(body)
    if error is None:
        return None
    code, subcode = _int(error.get("code")), _int(error.get("error_subcode"))
    message = error.get("message")
    message = " ".join(message.split())[:200] if isinstance(message, str) else "no message"
    where = f"code {code}" + (f"/{subcode}" if subcode is not None else "")
    return f"{where}: {message}"


def error_reason(body: Any) -> str | None:
    """The reason a Graph error's code means, whatever HTTP status it came with."""
    error = _error(body)
    if error is None:
        return None
    code, subcode = _int(error.get("code")), _int(error.get("error_subcode"))
    if code in AUTH_CODES:
        return "auth"
    if code in RATE_LIMIT_CODES:
        return "rate_limited"
    if (code, subcode) == NOT_FOUND:
        return "not_found"
    return None


def _percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return min(max(float(value), 0.0), 1000.0)


def usage(header: str | None) -> tuple[float, float]:
    """X-Business-Use-Case-Usage `{"<id>": [{"type", "call_count", "total_cputime",
    "total_time", "estimated_time_to_regain_access"}]}`: the highest percent used and the
    longest estimate (minutes) to regain access. A header that is no such thing counts as none."""
    if not header or len(header) > MAX_USAGE_HEADER:
        return 0.0, 0.0
    try:
        data = json.loads(header)
    except (ValueError, RecursionError):
        return 0.0, 0.0
    used, regain = 0.0, 0.0
    lists = data.values() if isinstance(data, Mapping) else ()
    for entries in lists:
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, Mapping):
                for key in ("call_count", "total_cputime", "total_time"):
                    used = max(used, _percent(entry.get(key)))
                regain = max(regain, _percent(entry.get("estimated_time_to_regain_access")))
    return used, regain


def _seconds(value: str | None) -> float:
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def pause(headers: Mapping[str, str], body: Any) -> float:
    """Seconds the account sends nothing: Meta's own estimate (or Retry-After) when it is rate
    limited or nearly so; otherwise a default."""
    used, regain = usage(headers.get("x-business-use-case-usage"))
    if error_reason(body) == "rate_limited":
        return regain * 60 or _seconds(headers.get("retry-after")) or RATE_LIMITED_PAUSE
    if used >= PACE_AT:
        return regain * 60 or PACE_PAUSE
    return 0.0


ANSWER_RULES = AnswerRules(reason=error_reason, pause=pause)

# --- answers ------------------------------------------------------------------------------------

_Id = Annotated[str, BeforeValidator(_id_text)]
_Count = Annotated[int, Field(ge=0, strict=True)]


class _Cursors(Answer):
    after: str | None = None


class _Paging(Answer):
    cursors: _Cursors | None = None
    next: str | None = None


class _Entity(Answer):
    entity_type: str
    can_send_message: str


class _Health(Answer):
    can_send_message: str | None = None
    entities: list[_Entity] = []


class _Throughput(Answer):
    level: str | None = None


class _NumberAnswer(Answer):
    id: _Id
    display_phone_number: str
    verified_name: str | None = None
    quality_rating: str | None = None
    status: str | None = None
    name_status: str | None = None
    platform_type: str | None = None
    throughput: _Throughput | None = None
    whatsapp_business_manager_messaging_limit: Any = None
    messaging_limit_tier: Any = None  # deprecated by Meta; still in some BSPs' answers
    health_status: _Health | None = None


class _NumbersPage(Answer):
    data: list[_NumberAnswer]
    paging: _Paging | None = None


class _QualityScore(Answer):
    score: str | None = None


class _TemplateAnswer(Answer):
    name: str
    language: str
    status: str
    category: str | None = None
    quality_score: _QualityScore | None = None


class _Summary(Answer):
    total_count: _Count | None = None


class _TemplatesPage(Answer):
    data: list[_TemplateAnswer]
    paging: _Paging | None = None
    summary: _Summary | None = None


class _DataPoint(Answer):
    start: _Count
    end: _Count
    sent: _Count = 0
    delivered: _Count = 0


class _Analytics(Answer):
    data_points: list[_DataPoint] = []


class _WabaAnswer(Answer):
    analytics: _Analytics


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhoneNumber:
    number: str  # the display number's digits
    id: str
    verified_name: str
    platform_type: str
    throughput: str
    quality: str
    status: str | None
    name_status: str | None
    limit: float | None  # unique users per 24 h, inf when unlimited; None when unknown
    can_send: str | None  # health_status.can_send_message
    entities: tuple[tuple[str, str], ...] = ()  # (entity, can_send_message), one per entity


@dataclass(frozen=True)
class Numbers:
    numbers: tuple[PhoneNumber, ...]
    problems: tuple[tuple[str, int], ...] = ()  # the account's running totals, per problem
    pages: int = 1


@dataclass(frozen=True)
class Template:
    name: str
    language: str
    category: str
    status: str
    quality: str


@dataclass(frozen=True)
class Templates:
    templates: tuple[Template, ...]
    dropped: int = 0  # the account's running total of templates left out over the cap
    pages: int = 1


@dataclass(frozen=True)
class DayMessages:
    """Today's (UTC) messages of one number so far."""

    sent: int
    delivered: int


@dataclass
class Tally:
    """An account's running counts, kept by its polls (on the event loop) and handed to the
    translation in each result, which stays a pure function of it."""

    problems: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    warned: set[tuple[str, str]] = field(default_factory=set)

    def problem(self, account: str, problem: str, value: str) -> None:
        self.problems[problem] += 1
        if (problem, value) not in self.warned and len(self.warned) < 1000:
            self.warned.add((problem, value))
            log.warning(
                "a Meta answer held a value the exporter cannot read",
                extra={"fields": {"account": account, "problem": problem, "value": value}},
            )

    def totals(self) -> tuple[tuple[str, int], ...]:
        return tuple((p, self.problems[p]) for p in PROBLEMS)


# --- making provider strings safe ---------------------------------------------------------------


def clean(value: Any, limit: int = 256) -> str:
    """Printable, valid UTF-8 and bounded: a provider string fit to be a label value."""
    text = value if isinstance(value, str) else ""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " for ch in text)
    return safe_text(" ".join(text.split()), limit)


def state(value: Any, default: str | None = None) -> str | None:
    """One of Meta's enum values, kept as it comes when unknown, but bounded and safe."""
    text = clean(value, MAX_STATE).upper().replace(" ", "_")
    return text or default


def messaging_limit(raw: Any) -> float | None:
    """`TIER_2K`, `TIER_UNLIMITED`, 2000 or "2000" -> 2000.0 / inf; ValueError for other forms."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, int | float):
        if math.isfinite(raw) and raw > 0:
            return float(raw)
        raise ValueError(raw)
    if isinstance(raw, str):
        text = raw.strip().upper()
        if text in TIERS:
            return TIERS[text]
        if text.isascii() and text.isdigit() and 0 < int(text) < 10**12:
            return float(text)
    raise ValueError(raw)


# --- fetching -----------------------------------------------------------------------------------


def next_cursor(paging: _Paging | None) -> str | None:
    """The cursor of the next page, or None on the last. The next page is asked on base_url with
    this cursor; `paging.next`'s own URL is never called: a proxy's may name another host, and
    a hostile one any host, which would then receive the token."""
    if paging is None or not paging.next:
        return None
    if paging.cursors is not None and paging.cursors.after:
        return paging.cursors.after
    after = parse_qs(urlsplit(paging.next).query).get("after")
    if not after or not after[0]:
        raise PollError("bad_response", "paging.next has no after cursor")
    return after[0]


async def pages(
    api: Api, path: str, params: Mapping[str, str], model: Any, max_pages: int
) -> AsyncIterator[Any]:
    """Each page of a paged Graph list, up to `max_pages` (the caller decides what more means);
    every page a request within the account's budget."""
    seen: set[str] = set()
    cursor = None
    for _ in range(max_pages):
        query = {**params, "after": cursor} if cursor else dict(params)
        page = parse(model, await api.call("GET", path, params=query), path)
        yield page
        cursor = next_cursor(page.paging)
        if cursor is None:
            return
        if cursor in seen:
            raise PollError("bad_response", f"{path}: paging repeats a cursor")
        if len(cursor) > MAX_CURSOR:
            raise PollError("bad_response", f"{path}: a cursor over {MAX_CURSOR} characters")
        seen.add(cursor)
    raise TooManyPages(cursor)


class TooManyPages(Exception):
    def __init__(self, cursor: str | None):
        super().__init__("more pages than the cap")
        self.cursor = cursor


def phone_number(answer: _NumberAnswer, number: str, account: str, tally: Tally) -> PhoneNumber:
    raw = answer.whatsapp_business_manager_messaging_limit
    if raw is None:
        raw = answer.messaging_limit_tier
    limit = None
    if raw is not None:
        try:
            limit = messaging_limit(raw)
        except ValueError:
            tally.problem(account, "unknown_messaging_limit", clean(repr(raw), 60))
    health = answer.health_status
    entities: dict[str, str] = {}
    for entity in health.entities if health else ():
        kind = clean(entity.entity_type, MAX_STATE).lower()
        status = state(entity.can_send_message)
        if kind in ENTITIES and status:
            entities[kind] = _worse(entities.get(kind), status)
    return PhoneNumber(
        number=number,
        id=clean(answer.id, 64),
        verified_name=clean(answer.verified_name),
        platform_type=state(answer.platform_type, "") or "",
        throughput=state(answer.throughput.level if answer.throughput else None, "") or "",
        quality=state(answer.quality_rating, "UNKNOWN") or "UNKNOWN",
        status=state(answer.status),
        name_status=state(answer.name_status),
        limit=limit,
        can_send=state(health.can_send_message) if health else None,
        entities=tuple(sorted(entities.items())),
    )


def _worse(first: str | None, second: str) -> str:
    """Of two answers for one entity, the one that lets less through."""
    if first is None:
        return second
    rank = {value: index for index, value in enumerate(CAN_SEND)}
    return max(first, second, key=lambda v: rank.get(v, len(CAN_SEND)))


async def fetch_health(account: Account, tally: Tally, api: Api, target: str) -> Numbers:
    path = f"/{account.waba_id}/phone_numbers"
    params = {"fields": NUMBER_FIELDS, "limit": str(PAGE_SIZE)}
    found: dict[str, PhoneNumber] = {}
    read = 0
    try:
        async for page in pages(api, path, params, _NumbersPage, MAX_NUMBER_PAGES):
            read += 1
            for answer in page.data:
                number = digits(answer.display_phone_number)
                if not number:
                    tally.problem(account.account, "number_without_digits", clean(answer.id, 64))
                elif number not in found:
                    found[number] = phone_number(answer, number, account.account, tally)
    except TooManyPages:
        raise PollError(
            "bad_response", f"{path}: more than {MAX_NUMBER_PAGES} pages of numbers"
        ) from None
    wanted = account.phone_numbers or sorted(found)
    for number in wanted:
        if number not in found:
            tally.problem(account.account, "number_not_listed", number)
    kept = tuple(found[n] for n in wanted if n in found)
    return Numbers(kept, tally.totals(), read)


async def fetch_templates(account: Account, tally: Tally, api: Api, target: str) -> Templates:
    path = f"/{account.waba_id}/message_templates"
    params = {"fields": TEMPLATE_FIELDS, "limit": str(PAGE_SIZE), "summary": "total_count"}
    kept: dict[tuple[str, str], Template] = {}
    seen, total, read, more = 0, 0, 0, False
    max_pages = -(-MAX_TEMPLATES // PAGE_SIZE)
    try:
        async for page in pages(api, path, params, _TemplatesPage, max_pages):
            read += 1
            if page.summary is not None and page.summary.total_count is not None:
                total = page.summary.total_count
            for answer in page.data:
                seen += 1
                template = Template(
                    name=clean(answer.name),
                    language=clean(answer.language, 32),
                    category=state(answer.category, "") or "",
                    status=state(answer.status, "UNKNOWN") or "UNKNOWN",
                    quality=state(answer.quality_score.score if answer.quality_score else None)
                    or "UNKNOWN",
                )
                key = (template.name, template.language)
                if key not in kept and len(kept) < MAX_TEMPLATES:
                    kept[key] = template
    except TooManyPages:
        more = True  # the cap: what was not read is counted below, from Meta's own total
    # without Meta's total, pages left unread count as at least one template
    dropped = max(total, seen + more) - len(kept)
    if dropped > 0:
        tally.dropped += dropped
        if ("templates_dropped", "") not in tally.warned:
            tally.warned.add(("templates_dropped", ""))
            log.warning(
                "the WABA has more templates than the exporter keeps: the rest are left out",
                extra={
                    "fields": {
                        "account": account.account,
                        "kept": len(kept),
                        "dropped": dropped,
                    }
                },
            )
    return Templates(tuple(kept.values()), tally.dropped, read)


def analytics_field(number: str, now: datetime) -> str:
    midnight = int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    end = max(int(now.timestamp()), midnight + 1)
    return f'analytics.start({midnight}).end({end}).granularity(DAY).phone_numbers(["{number}"])'


async def fetch_analytics(
    account: Account, api: Api, number: str, *, now: datetime | None = None
) -> DayMessages:
    now = now or datetime.now(UTC)
    path = f"/{account.waba_id}"
    body = await api.call("GET", path, params={"fields": analytics_field(number, now)})
    answer = parse(_WabaAnswer, body, f"{path}?fields=analytics")
    points = answer.analytics.data_points
    return DayMessages(sum(p.sent for p in points), sum(p.delivered for p in points))


# --- metrics ------------------------------------------------------------------------------------


def _state_set(known: Sequence[str], current: str) -> Iterator[tuple[str, float]]:
    """Every known value, 1 for the current one, which is kept even when Meta's is new to us."""
    values = known if current in known else (*known, current)
    return ((value, float(value == current)) for value in values)


def _number_states(
    numbers: Iterable[PhoneNumber],
    label: str,
    known: Sequence[str],
    current: Callable[[PhoneNumber], str | None],
) -> Iterator[tuple[dict[str, str], float]]:
    """A state set per number that has a value for it."""
    for n in numbers:
        value = current(n)
        if value is not None:
            for s, v in _state_set(known, value):
                yield {"number": n.number, label: s}, v


def _entities(n: PhoneNumber) -> Iterable[tuple[str, str]]:
    if n.can_send is not None:
        yield "overall", n.can_send
    yield from n.entities


def health_families(target: str, result: Numbers) -> list[Family]:
    numbers = result.numbers
    return [
        gauge(
            "whatsapp_phone_number_info",
            "A WhatsApp Cloud API number's id, verified name, platform and throughput level, "
            "always 1. " + POLLED,
            (
                (
                    {
                        "number": n.number,
                        "phone_number_id": n.id,
                        "verified_name": n.verified_name,
                        "platform_type": n.platform_type,
                        "throughput_level": n.throughput,
                    },
                    1,
                )
                for n in numbers
            ),
        ),
        gauge(
            "whatsapp_phone_number_quality",
            "The number's quality rating at Meta: 1 for the current one, 0 for the others. "
            + POLLED,
            _number_states(numbers, "quality", QUALITIES, lambda n: n.quality),
        ),
        gauge(
            "whatsapp_phone_number_status",
            "The number's status at Meta: 1 for the current one, 0 for the others. " + POLLED,
            _number_states(numbers, "status", STATUSES, lambda n: n.status),
        ),
        gauge(
            "whatsapp_phone_number_name_status",
            "The review status of the number's display name: 1 for the current one, 0 for the "
            "others. " + POLLED,
            _number_states(numbers, "name_status", NAME_STATUSES, lambda n: n.name_status),
        ),
        gauge(
            "whatsapp_messaging_limit",
            "Business-initiated conversations (unique users) the number may open per 24 h, "
            "shared by the business portfolio's numbers; +Inf when unlimited. " + POLLED,
            (({"number": n.number}, n.limit) for n in numbers if n.limit is not None),
        ),
        gauge(
            "whatsapp_can_send_message",
            "Whether the number can send, overall and per entity of its health status (phone "
            "number, WABA, business, app): 1 for the current value, 0 for the others. " + POLLED,
            (
                ({"number": n.number, "entity": entity, "status": s}, v)
                for n in numbers
                for entity, status in _entities(n)
                for s, v in _state_set(CAN_SEND, status)
            ),
        ),
        family(
            "whatsapp_answer_problems",
            "counter",
            "Values in Meta's answers the exporter could not use, per poll that met them: a "
            "messaging limit of an unknown form, a number without digits, a configured number "
            "the WABA does not list.",
            (({"problem": p}, count) for p, count in result.problems),
        ),
    ]


def templates_families(target: str, result: Templates) -> list[Family]:
    templates = result.templates
    return [
        gauge(
            "whatsapp_template_status",
            "The message template's review status at Meta (APPROVED, PAUSED, DISABLED, ...): "
            "one series per template and language, always 1. " + POLLED,
            (
                (
                    {
                        "template": t.name,
                        "language": t.language,
                        "category": t.category,
                        "status": t.status,
                    },
                    1,
                )
                for t in templates
            ),
        ),
        gauge(
            "whatsapp_template_quality",
            "The message template's quality score at Meta: one series per template and "
            "language, always 1. " + POLLED,
            (
                ({"template": t.name, "language": t.language, "quality": t.quality}, 1)
                for t in templates
            ),
        ),
        family(
            "whatsapp_templates_dropped",
            "counter",
            f"Templates left out of whatsapp_template_status because the WABA has more than "
            f"{MAX_TEMPLATES}, summed over polls.",
            [({}, result.dropped)],
        ),
    ]


def analytics_families(number: str, result: DayMessages) -> list[Family]:
    return [
        gauge(
            "whatsapp_analytics_messages",
            "Messages the number sent and delivered today (UTC) so far, from the WABA's "
            "analytics. " + POLLED,
            (
                ({"number": number, "state": "sent"}, result.sent),
                ({"number": number, "state": "delivered"}, result.delivered),
            ),
        )
    ]


# --- what a webhook changes of a poll's result ------------------------------------------------


def amendment(field: str, value: Any) -> tuple[str, Callable[[Any], Any]] | None:
    """The polled result a webhook change updates at once: (endpoint, result -> new result or
    None). `value` is the change's parsed value (webhooks._Value); nothing in it is trusted."""
    if field in TEMPLATE_CHANGES:
        name = clean(value.message_template_name)
        language = clean(value.message_template_language, 32)
        changed = TEMPLATE_CHANGES[field](value)
        if not name or not language or not changed:
            return None
        return "templates", functools.partial(_amend_template, name, language, changed)
    if field == "phone_number_quality_update":
        number = digits(_id_text(value.display_phone_number) or "")
        raw = value.max_daily_conversations_per_business
        if raw is None:
            raw = value.current_limit
        try:
            limit = messaging_limit(raw)
        except ValueError:
            return None
        if not number or limit is None:
            return None
        return "health", functools.partial(_amend_limit, number, limit)
    return None


def _template_status(value: Any) -> dict[str, str]:
    event = state(value.event)
    if event is None or event == "FLAGGED":  # flagged: a warning about quality, still approved
        return {}
    changed = {"status": "APPROVED" if event == "REINSTATED" else event}
    category = state(value.message_template_category)
    return {**changed, "category": category} if category else changed


TEMPLATE_CHANGES: dict[str, Callable[[Any], dict[str, str]]] = {
    "message_template_status_update": _template_status,
    "message_template_quality_update": lambda v: (
        {"quality": q} if (q := state(v.new_quality_score)) else {}
    ),
    "template_category_update": lambda v: {"category": c} if (c := state(v.new_category)) else {},
}


def _amend_template(
    name: str, language: str, changed: dict[str, str], result: Templates
) -> Templates | None:
    """The template changed, or added (a new one, within the cap) with what the webhook says."""
    kept = list(result.templates)
    at = next((i for i, t in enumerate(kept) if (t.name, t.language) == (name, language)), None)
    if at is None:
        if len(kept) >= MAX_TEMPLATES or "status" not in changed:
            return None
        fresh = Template(name, language, changed.get("category", ""), changed["status"], "UNKNOWN")
        kept.append(fresh)
    else:
        new = replace(kept[at], **changed)
        if new == kept[at]:
            return None
        kept[at] = new
    return replace(result, templates=tuple(kept))


def _amend_limit(number: str, limit: float, result: Numbers) -> Numbers | None:
    """Limits belong to the business portfolio: every number of the WABA shares the new one."""
    if not any(n.number == number for n in result.numbers):
        return None
    numbers = tuple(replace(n, limit=limit) for n in result.numbers)
    return None if numbers == result.numbers else replace(result, numbers=numbers)


def open_state(context: StateContext) -> webhooks.Webhooks:
    return webhooks.Webhooks(context, amendment)


# --- endpoints ----------------------------------------------------------------------------------


def number_targets(account: Account, known: Known) -> Sequence[str]:
    """Configured numbers, or (with `phone_numbers: []`) every number the newest health poll
    listed."""
    if account.phone_numbers:
        return account.phone_numbers
    listed = known.get("health", {}).get("")
    return [n.number for n in listed.numbers] if listed else []


def _pages_of(endpoint: str, known: Known) -> float:
    result = known.get(endpoint, {}).get("")
    return float(result.pages) if result is not None else 1.0


def endpoints(account: Account, defaults: Defaults, state: object) -> list[Endpoint]:
    def interval(endpoint: str) -> float:
        own = getattr(account, endpoint).interval
        return own or account.interval or INTERVALS[endpoint]

    tally = Tally()
    return [
        Endpoint(
            "health",
            interval("health"),
            account_wide,
            functools.partial(fetch_health, account, tally),
            health_families,
            remember=True,  # analytics polls the numbers it lists; pages count in the budget
            requests=functools.partial(_pages_of, "health"),
        ),
        Endpoint(
            "templates",
            interval("templates"),
            account_wide,
            functools.partial(fetch_templates, account, tally),
            templates_families,
            remember=True,
            requests=functools.partial(_pages_of, "templates"),
        ),
        Endpoint(
            "analytics",
            interval("analytics"),
            functools.partial(number_targets, account),
            functools.partial(fetch_analytics, account),
            analytics_families,
        ),
    ]


PROVIDER = Provider(
    name="meta",
    account_model=Account,
    # Meta documents 200 calls an hour per app and WABA, 5,000 for a WABA with a registered
    # number: the defaults need ~30 (3 numbers, one page each)
    default_rate_limit=RateLimit(requests=200, period=3600.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
    open_state=open_state,
    answer_rules=ANSWER_RULES,
)
