"""Betatel (`https://api.betatel.com/api/v1/connect-hub/whatsapp`): stats over time windows.

Stats are computed from one log of sent messages, so every window agrees with every other (the last
minute never holds more than the last hour). Error bodies are undocumented: JSON in the shape of a
NestJS API, except the 401, which the provider answers in plain text.
"""

from __future__ import annotations

import bisect
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from simulators.kit import Demo, Example, FaultAnswers, Kit, Matrix, Probe
from simulators.server import (
    CONTROL_PREFIX,
    RecordedRequest,
    Response,
    Route,
    Simulator,
    control_json,
    json_response,
    phrase,
    read_json,
    route,
    text_response,
)

PREFIX = "/api/v1/connect-hub/whatsapp"

WINDOWS = {
    "lastm": 60,
    "last5m": 300,
    "last10m": 600,
    "last30m": 1800,
    "lasth": 3600,
    "last12h": 12 * 3600,
    "last24h": 24 * 3600,
    "lastmonth": 30 * 86400,
}
BUCKETED = ("hourly", "daily", "weekly", "monthly", "yearly")
TYPES = ("today", *BUCKETED, *WINDOWS)
# How far back a bucketed query reaches when it names no start_time.
DEFAULT_SPAN = {
    "hourly": timedelta(hours=23),
    "daily": timedelta(days=6),
    "weekly": timedelta(weeks=3),
    "monthly": timedelta(days=335),
    "yearly": timedelta(days=2 * 366),
}
MAX_BUCKETS = 10_000
SORT_KEYS = ("timestamp", "delivery_timestamp", "delivery_time", "status", "to")
TEXTS = (
    "Your verification code is {code}. It expires in 10 minutes.",
    "{code} is your login code. Do not share it.",
    "Use {code} to confirm your order.",
)


@dataclass(frozen=True)
class SentMessage:
    at: float
    uuid: str
    to: str
    text: str
    delivered: bool
    amount: float
    delivery_ms: int
    webhook_delivered: bool

    def wdr(self) -> dict[str, Any]:
        delivered_at = self.at + self.delivery_ms / 1000 if self.delivered else None
        return {
            "uuid": self.uuid,
            "wam_id": "wamid.HBgL" + self.uuid.replace("-", "").upper()[:24],
            "to": self.to,
            "text": self.text,
            "status": "DELIVERED" if self.delivered else "FAILED",
            "timestamp": _iso(self.at),
            "delivery_timestamp": _iso(delivered_at) if delivered_at is not None else None,
            "delivery_time": self.delivery_ms if self.delivered else None,
            "webhook_delivered": self.webhook_delivered,
        }


class BetatelSimulator(Simulator):
    """`history_hours` pre-fills the log so that a first look already shows traffic; `empty=True`
    answers `[]` to every query, the way an account that sent nothing does."""

    name = "betatel"
    base_path = PREFIX
    server_header = "nginx"

    MAX_LOG = 200_000
    P_SUCCESS = 0.96

    def __init__(
        self,
        *,
        api_key: str = "demo-key",
        account_id: str = "demo-account",
        empty: bool = False,
        history_hours: float = 24,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.api_key = api_key
        self.account_id = account_id
        self.empty = empty
        self._log: list[SentMessage] = []
        self._by_uuid: dict[str, SentMessage] = {}
        now = time.time()
        slot = 300.0
        for index in range(int(history_hours * 3600 / slot), 0, -1):
            for _ in range(self.random.randint(0, 6)):
                self._add(self._random_message(now - index * slot + self.random.uniform(0, slot)))

    # --- explicit state changes -----------------------------------------------------------------

    def record_messages(
        self,
        count: int,
        *,
        at: datetime | float | None = None,
        transactions: int | None = None,
        amount_each: float = 0.02,
    ) -> None:
        """Logs `count` requests at `at`, the first `transactions` of them billed and delivered."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        transactions = count if transactions is None else transactions
        if not isinstance(transactions, int) or not 0 <= transactions <= count:
            raise ValueError(f"transactions must be between 0 and count, got {transactions!r}")
        if at is None:
            when = time.time()
        elif isinstance(at, datetime):
            when = (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
        else:
            when = float(at)
        with self._lock:
            for index in range(count):
                message = self._random_message(when)
                delivered = index < transactions
                self._add(
                    SentMessage(
                        message.at,
                        message.uuid,
                        message.to,
                        message.text,
                        delivered,
                        amount_each if delivered else 0.0,
                        message.delivery_ms,
                        message.webhook_delivered,
                    )
                )

    def tick(self) -> None:
        now = time.time()
        with self._lock:
            for _ in range(self.random.choice((0, 0, 1, 1, 2, 3))):
                self._add(self._random_message(now))
            overflow = len(self._log) - self.MAX_LOG
            if overflow > 0:
                for message in self._log[:overflow]:
                    del self._by_uuid[message.uuid]
                del self._log[:overflow]

    def state(self) -> dict[str, Any]:
        now = time.time()
        return {
            "messages": len(self._log),
            "empty": self.empty,
            "windows": {
                name: self._totals(now - seconds, now) for name, seconds in WINDOWS.items()
            },
            "latest": [m.wdr() for m in self._log[-5:]],
        }

    def credentials(self) -> dict[str, str]:
        return {"x-api-key": self.api_key, "x-account-id": self.account_id}

    def message_uuids(self) -> list[str]:
        """The uuids of logged messages, oldest first, for tests of `GET .../{uuid}/wdr`."""
        with self._lock:
            return [m.uuid for m in self._log]

    def _random_message(self, at: float) -> SentMessage:
        rng = self.random
        delivered = rng.random() < self.P_SUCCESS
        return SentMessage(
            at=at,
            uuid=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            to=f"+3538{rng.randrange(10**8):08d}",
            text=rng.choice(TEXTS).format(code=f"{rng.randrange(10**6):06d}"),
            delivered=delivered,
            amount=0.02 if delivered else 0.0,
            delivery_ms=rng.randint(300, 6000),
            webhook_delivered=rng.random() < 0.98,
        )

    def _add(self, message: SentMessage) -> None:
        bisect.insort(self._log, message, key=lambda m: m.at)
        self._by_uuid[message.uuid] = message

    def _totals(self, start: float, end: float, *, end_inclusive: bool = True) -> dict[str, Any]:
        """Sums the log over [start, end], or [start, end) for a bucket another one follows."""
        find_end = bisect.bisect_right if end_inclusive else bisect.bisect_left
        low = bisect.bisect_left(self._log, start, key=lambda m: m.at)
        high = find_end(self._log, end, key=lambda m: m.at)
        window = self._log[low:high]
        delivered = [m for m in window if m.delivered]
        return {
            "total_requests": len(window),
            "total_transactions": len(delivered),
            "total_amount": round(sum(m.amount for m in delivered), 2),
            "currency": "EUR",
        }

    # --- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            route("POST", PREFIX + "/stats", "stats", self._stats),
            route("POST", PREFIX + "/wdr", "wdr", self._wdr),
            route("GET", PREFIX + r"/(?P<message_uuid>[^/]+)/wdr", "wdr_uuid", self._wdr_uuid),
        ]

    def control_routes(self) -> list[Route]:
        return [route("POST", CONTROL_PREFIX + "/messages", "", self._ctl_record)]

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        key = request.headers.get("x-api-key")
        account = request.headers.get("x-account-id")
        if key != self.api_key or account != self.account_id:
            return text_response(401, "Invalid API Key")
        return None

    def _stats(self, request: RecordedRequest) -> Response:
        try:
            body = _json_object(request.body)
            kind = body.get("type", "today")
            if kind not in TYPES:
                raise ValueError(f"Invalid stat type {kind!r}; supported: {', '.join(TYPES)}")
            zone = _zone(body.get("timezone", "UTC"))
            start = _time(body, "start_time")
            end = _time(body, "end_time")
            if start is not None and end is not None and end < start:
                raise ValueError("end_time must not be before start_time")
        except ValueError as exc:
            return _bad_request(str(exc))
        now = time.time()
        with self._lock:
            if self.empty:
                return json_response(200, [])
            if kind in BUCKETED:
                try:
                    entries = self._buckets(kind, zone, start, end, now)
                except ValueError as exc:
                    return _bad_request(str(exc))
                return json_response(200, entries)
            if kind == "today":
                local_now = datetime.fromtimestamp(now, zone)
                begin = local_now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
            else:
                begin = now - WINDOWS[kind]
            totals = self._totals(begin, now)
        return json_response(200, [totals] if totals["total_requests"] else [])

    def _buckets(
        self, kind: str, zone: tzinfo, start: float | None, end: float | None, now: float
    ) -> list[dict[str, Any]]:
        end = now if end is None else end
        start = (end - DEFAULT_SPAN[kind].total_seconds()) if start is None else start
        local = _floor(datetime.fromtimestamp(start, zone), kind)
        entries = []
        while local.timestamp() <= end:
            following = _following(local, kind, zone)
            bucket_start = max(local.timestamp(), start)
            if following.timestamp() > end:
                entries.append(self._totals(bucket_start, end))
            else:
                entries.append(
                    self._totals(bucket_start, following.timestamp(), end_inclusive=False)
                )
            if len(entries) > MAX_BUCKETS:
                raise ValueError(f"Time range too large for type {kind!r}")
            local = following
        return entries

    def _wdr(self, request: RecordedRequest) -> Response:
        try:
            body = _json_object(request.body)
            page = _int_field(body, "page", 1, minimum=1)
            rows = _int_field(body, "rows_per_page", 10, minimum=1, maximum=100)
            sort_by = body.get("sort_by", "timestamp")
            if sort_by not in SORT_KEYS:
                raise ValueError(f"sort_by must be one of {', '.join(SORT_KEYS)}")
            direction = str(body.get("sort_direction", "desc")).lower()
            if direction not in ("asc", "desc"):
                raise ValueError("sort_direction must be 'asc' or 'desc'")
            wanted = body.get("filter") or {}
            if not isinstance(wanted, dict) or set(wanted) - {"status", "to"}:
                raise ValueError("filter must be an object with 'status' and/or 'to'")
        except ValueError as exc:
            return _bad_request(str(exc))
        with self._lock:
            records = [m.wdr() for m in self._log]
        if wanted.get("status"):
            records = [r for r in records if r["status"] == str(wanted["status"]).upper()]
        if wanted.get("to"):
            records = [r for r in records if r["to"] == str(wanted["to"])]
        records.sort(
            key=lambda r: (r[sort_by] is None, r[sort_by] or 0), reverse=direction == "desc"
        )
        total = len(records)
        total_pages = math.ceil(total / rows)
        return json_response(
            200,
            {
                "page": page,
                "rows_per_page": rows,
                "total": total,
                "total_pages": total_pages,
                "has_next_page": page < total_pages,
                "list": records[(page - 1) * rows : page * rows],
            },
        )

    def _wdr_uuid(self, _request: RecordedRequest, message_uuid: str) -> Response:
        try:
            key = str(uuid.UUID(message_uuid))
        except ValueError:
            return _bad_request(f"Invalid uuid {message_uuid!r}")
        with self._lock:
            found = self._by_uuid.get(key)
        if found is None:
            return json_response(404, _error(404, "Not Found", f"No WDR found for uuid {key}"))
        return json_response(200, found.wdr())

    # --- provider-specific answers to faults ----------------------------------------------------

    def error_response(self, code: int, endpoint: str) -> Response:
        if code == 401:
            return text_response(401, "Invalid API Key")
        messages = {
            400: "Invalid stat type, missing fields, or malformed time range",
            402: "Insufficient funds",
            404: "Not Found",
            500: "An unexpected error occurred",
        }
        return json_response(code, _error(code, phrase(code), messages.get(code, phrase(code))))

    def rate_limited_response(self, retry_after: float) -> Response:
        return json_response(
            429, _error(429, "Too Many Requests", "ThrottlerException: Too Many Requests")
        )

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        return _bad_request(message or "Invalid stat type, missing fields, or malformed time range")

    def wrong_shape(self, endpoint: str) -> Any:
        return {
            "stats": {
                "total_requests": "12",
                "total_transactions": None,
                "total_amount": "0.24",
                "currency": 978,
            },
            "wdr": [{"uuid": 1, "status": 200}],
            "wdr_uuid": ["DELIVERED"],
        }.get(endpoint, [])

    def not_found(self, request: RecordedRequest) -> Response:
        return json_response(
            404, _error(404, "Not Found", f"Cannot {request.method} {request.path}")
        )

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        return self.not_found(request)

    # --- control --------------------------------------------------------------------------------

    def _ctl_record(self, request: RecordedRequest) -> Response:
        data = control_json(request)
        unknown = sorted(set(data) - {"count", "at", "transactions", "amount_each"})
        if unknown:
            raise ValueError(
                f"unknown fields {unknown}; allowed: count, at, transactions, amount_each"
            )
        at = data.get("at")
        if isinstance(at, str):
            at = _parse_time(at, "at")
        self.record_messages(
            data.get("count", 1),
            at=at,
            transactions=data.get("transactions"),
            amount_each=data.get("amount_each", 0.02),
        )
        with self._lock:
            size = len(self._log)
        return json_response(201, {"messages": size})


def _error(code: int, error: str, message: str) -> dict[str, Any]:
    return {"statusCode": code, "error": error, "message": message}


def _bad_request(message: str) -> Response:
    return json_response(400, _error(400, "Bad Request", message))


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        data = read_json(body)
    except ValueError as exc:
        raise ValueError(f"Body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("Body must be a JSON object")
    return data


def _zone(name: Any) -> tzinfo:
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid timezone {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"Invalid timezone {name!r}") from None


def _time(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be an ISO 8601 string")
    return _parse_time(value, key).timestamp()


def _parse_time(text: str, key: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key} is not a valid ISO 8601 date: {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _int_field(
    body: dict[str, Any], key: str, default: int, *, minimum: int, maximum: int | None = None
) -> int:
    value = body.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f"between {minimum} and {maximum}" if maximum else f"at least {minimum}"
        raise ValueError(f"{key} must be an integer {bounds}")
    return value


def _floor(local: datetime, kind: str) -> datetime:
    if kind == "hourly":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "daily":
        return day
    if kind == "weekly":
        return _local(day.replace(tzinfo=None) - timedelta(days=day.weekday()), local.tzinfo)
    if kind == "monthly":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def _following(local: datetime, kind: str, zone: tzinfo) -> datetime:
    """The start of the next bucket, in local wall time so days and months survive DST."""
    if kind == "hourly":
        return datetime.fromtimestamp(local.timestamp() + 3600, zone)
    naive = local.replace(tzinfo=None)
    if kind == "daily":
        naive += timedelta(days=1)
    elif kind == "weekly":
        naive += timedelta(weeks=1)
    elif kind == "monthly":
        naive = naive.replace(year=naive.year + naive.month // 12, month=naive.month % 12 + 1)
    else:
        naive = naive.replace(year=naive.year + 1)
    return _local(naive, zone)


def _local(naive: datetime, zone: tzinfo | None) -> datetime:
    return naive.replace(tzinfo=zone)


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{int(at * 1000) % 1000:03d}Z"
    )


def _demo_accounts(base_url: str) -> str:
    return f"""\
betatel:
  - account: demo
    base_url: {base_url}
    api_key: demo-key
    account_id: demo-account
    windows: [lastm, last5m, lasth, today, daily]
    timezone: Europe/Berlin
"""


def _matrix_keys(account: str, interval: str, healthy: bool) -> dict[str, Any]:
    # one rolling and one bucketed window: both kinds of request body, two targets
    return {"api_key": "demo-key", "account_id": "demo-account", "windows": ["last5m", "daily"]}


KIT = Kit(
    name="betatel",
    simulator=BetatelSimulator,
    quick={},
    probe=Probe(
        endpoint="stats",
        method="POST",
        path="/stats",
        headers={"x-api-key": "demo-key", "x-account-id": "demo-account"},
        body={"type": "lasth"},
        misshapen=lambda body: not isinstance(body, list),
    ),
    demo=Demo(options={}, accounts=_demo_accounts, metric="whatsapp_stats_requests"),
    faults=FaultAnswers(
        auth=(401, "text/plain; charset=utf-8", "Invalid API Key"),
        rate_limited={
            "statusCode": 429,
            "error": "Too Many Requests",
            "message": "Too Many Requests",
        },
        # NestJS's
        not_found=lambda method, path: {
            "statusCode": 404,
            "message": f"Cannot {method} {path}",
            "error": "Not Found",
        },
        valid={
            "stats": [
                {
                    "total_requests": 1248,
                    "total_transactions": 1201,
                    "total_amount": 24.02,
                    "currency": "EUR",
                }
            ]
        },
        # an object where the list of entries belongs
        wrong_shape=lambda junk: {
            "total_requests": "NaN",
            "currency": "\ud800",
            "entries": [junk],
        },
        huge_chunked=True,
    ),
    matrix=Matrix(prefix="bt", endpoints=("stats",), keys=_matrix_keys),
    example=Example(account="eu", env={"BETATEL_API_KEY": "b", "BETATEL_ACCOUNT_ID": "a"}),
    dashboard="whatsapp-betatel-stats",
)
