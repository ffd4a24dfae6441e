"""Meta's WhatsApp Cloud API (`https://graph.facebook.com/v25.0`): a WABA's phone numbers with
their health, its message templates and its messaging analytics, as the Graph API serves them.

Bearer tokens (or a BSP's own header, as 360dialog's `D360-API-KEY`), `fields` selection, cursor
paging with `paging.next`, Graph error bodies with their codes (a rate limit is an HTTP 400), and
`X-Business-Use-Case-Usage` on every answer, rising with the calls of the last hour. In demo mode
quality ratings, the portfolio's messaging limit and template statuses change over time.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from simulators.kit import Demo, Example, FaultAnswers, Kit, Matrix, Probe
from simulators.server import (
    CONTROL_PREFIX,
    RecordedRequest,
    Response,
    Route,
    Simulator,
    control_json,
    json_response,
    route,
)

VERSION = "v25.0"
WABA_ID = "102290129340398"
QUALITIES = ("GREEN", "YELLOW", "RED")
LIMITS = ("TIER_250", "TIER_2K", "TIER_10K", "TIER_100K", "TIER_UNLIMITED")
LIMIT_NUMBERS = {"TIER_250": 250, "TIER_2K": 2000, "TIER_10K": 10000, "TIER_100K": 100000}
TEMPLATE_STATUSES = ("APPROVED", "PAUSED", "DISABLED", "PENDING", "REJECTED", "IN_APPEAL")
CAN_SEND = ("AVAILABLE", "LIMITED", "BLOCKED")
NUMBER_DEFAULT_FIELDS = ("id", "display_phone_number", "verified_name", "quality_rating")
TEMPLATE_DEFAULT_FIELDS = ("id", "name", "language", "status", "category")
DEFAULT_PAGE = 25
MAX_PAGE = 100
TEMPLATE_NAMES = (
    ("order_confirmation", "UTILITY"),
    ("shipping_update", "UTILITY"),
    ("verification_code", "AUTHENTICATION"),
    ("spring_sale", "MARKETING"),
    ("appointment_reminder", "UTILITY"),
)


@dataclass
class PhoneNumber:
    id: str
    display: str  # "+1 555-000-0001", as Meta writes it
    verified_name: str
    quality: str = "GREEN"
    status: str = "CONNECTED"
    name_status: str = "APPROVED"
    throughput: str = "STANDARD"
    platform_type: str = "CLOUD_API"
    can_send: str = "AVAILABLE"  # the phone number entity's own
    sent: dict[str, int] = field(default_factory=dict)  # UTC day -> messages
    delivered: dict[str, int] = field(default_factory=dict)

    @property
    def digits(self) -> str:
        return re.sub(r"\D", "", self.display)


@dataclass
class Template:
    id: str
    name: str
    language: str
    category: str
    status: str = "APPROVED"
    quality: str = "GREEN"


class MetaSimulator(Simulator):
    """`bsp_header="D360-API-KEY"` answers like a BSP that passes the Graph API through (that
    header, not a Bearer token, and no version in the path; 360dialog's own paths differ);
    `call_budget` is the calls an hour before Meta's code 80007 (None: unlimited, the usage
    header then stays low); `limit_form="integer"` sends the messaging limit as a number
    instead of a tier string."""

    name = "meta"
    base_path = "/" + VERSION
    server_header = ""

    P_QUALITY = 0.02
    P_LIMIT = 0.01
    P_TEMPLATE = 0.01

    def __init__(
        self,
        *,
        token: str = "demo-token",
        waba_id: str = WABA_ID,
        numbers: int = 3,
        templates: int = 5,
        bsp_header: str | None = None,
        call_budget: int | None = 200,
        usage_window: float = 3600.0,
        limit: str = "TIER_10K",
        limit_form: str = "tier",
        **base: Any,
    ) -> None:
        if not waba_id.isdigit():
            raise ValueError("waba_id must be digits")
        if limit not in LIMITS:
            raise ValueError(f"limit must be one of {', '.join(LIMITS)}")
        if limit_form not in ("tier", "integer"):
            raise ValueError("limit_form must be 'tier' or 'integer'")
        if call_budget is not None and (not isinstance(call_budget, int) or call_budget < 1):
            raise ValueError("call_budget must be a positive integer or None")
        self.token = token
        self.waba_id = waba_id
        self.bsp_header = bsp_header
        self.call_budget = call_budget
        self.usage_window = float(usage_window)
        self.limit = limit
        self.limit_form = limit_form
        self.waba_can_send = "AVAILABLE"
        self._calls: deque[float] = deque()
        self._blocked_until = 0.0  # an injected rate limit (code 80007)
        self.base_path = "" if bsp_header is not None else "/" + VERSION  # read by routes()
        super().__init__(**base)
        self._numbers: dict[str, PhoneNumber] = {}
        for index in range(1, numbers + 1):
            self.add_number(f"+1 555-000-{index:04d}", verified_name=f"Acme Support {index}")
        self._templates: dict[str, Template] = {}
        for index in range(templates):
            name, category = TEMPLATE_NAMES[index % len(TEMPLATE_NAMES)]
            suffix = f"_{index // len(TEMPLATE_NAMES) + 1}" if index >= len(TEMPLATE_NAMES) else ""
            self.add_template(name + suffix, "en_US", category)

    # --- explicit state changes -----------------------------------------------------------------

    @property
    def numbers(self) -> list[str]:
        """The display numbers' digits, as the exporter labels them."""
        with self._lock:
            return [n.digits for n in self._numbers.values()]

    def number(self, digits: str) -> PhoneNumber:
        with self._lock:
            found = self._by_digits(digits)
            return PhoneNumber(**{**found.__dict__, "sent": dict(found.sent)})

    def add_number(self, display: str, **fields: Any) -> str:
        with self._lock:
            index = len(self._numbers) + 1
            number_id = str(106540352242900 + index)
            number = PhoneNumber(number_id, display, fields.pop("verified_name", f"Acme {index}"))
            self._numbers[number_id] = number
            self.set_number(number.digits, **fields)
            return number_id

    def set_number(self, digits: str, **fields: Any) -> None:
        allowed = {
            "quality",
            "status",
            "name_status",
            "throughput",
            "platform_type",
            "can_send",
            "verified_name",
            "display",
        }
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"unknown number fields {unknown}; allowed: {sorted(allowed)}")
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
        with self._lock:
            number = self._by_digits(digits)
            for key, value in fields.items():
                setattr(number, key, value)

    def remove_number(self, digits: str) -> None:
        with self._lock:
            del self._numbers[self._by_digits(digits).id]

    def set_limit(self, limit: str) -> None:
        """The business portfolio's messaging limit, shared by all its numbers."""
        if limit not in LIMITS:
            raise ValueError(f"limit must be one of {', '.join(LIMITS)}")
        with self._lock:
            self.limit = limit

    def add_template(self, name: str, language: str, category: str, **fields: Any) -> str:
        with self._lock:
            template_id = str(564750795574598 + len(self._templates))
            self._templates[template_id] = Template(template_id, name, language, category)
            self.set_template(name, language, **fields)
            return template_id

    def set_template(
        self, name: str, language: str, *, status: str | None = None, quality: str | None = None
    ) -> None:
        with self._lock:
            found = [
                t for t in self._templates.values() if (t.name, t.language) == (name, language)
            ]
            if not found:
                raise KeyError(f"unknown template {name} ({language})")
            if status is not None:
                found[0].status = status
            if quality is not None:
                found[0].quality = quality

    def template(self, name: str, language: str = "en_US") -> Template:
        with self._lock:
            for t in self._templates.values():
                if (t.name, t.language) == (name, language):
                    return Template(**t.__dict__)
        raise KeyError(f"unknown template {name} ({language})")

    def record_traffic(
        self, digits: str, sent: int, delivered: int, day: str | None = None
    ) -> None:
        with self._lock:
            number = self._by_digits(digits)
            day = day or _today()
            number.sent[day] = number.sent.get(day, 0) + sent
            number.delivered[day] = number.delivered.get(day, 0) + delivered

    def rate_limit(self, minutes: float) -> None:
        """Every request answers Meta's code 80007 for `minutes` (0 lifts it)."""
        with self._lock:
            self._blocked_until = time.time() + minutes * 60

    def _by_digits(self, digits: str) -> PhoneNumber:
        for number in self._numbers.values():
            if digits in (number.digits, number.id):
                return number
        raise KeyError(f"unknown number {digits}")

    def tick(self) -> None:
        rng = self.random
        with self._lock:
            for number in self._numbers.values():
                if rng.random() < self.P_QUALITY:
                    index = QUALITIES.index(number.quality) if number.quality in QUALITIES else 0
                    step = rng.choice((-1, 1))
                    number.quality = QUALITIES[min(max(index + step, 0), len(QUALITIES) - 1)]
                    number.can_send = "LIMITED" if number.quality == "RED" else "AVAILABLE"
                if number.status == "CONNECTED":
                    sent = rng.randint(0, 5)
                    self._add(number, sent, sent - rng.randint(0, min(sent, 1)))
            if rng.random() < self.P_LIMIT:
                index = LIMITS.index(self.limit) + rng.choice((-1, 1))
                self.limit = LIMITS[min(max(index, 0), len(LIMITS) - 1)]
            for template in self._templates.values():
                if rng.random() < self.P_TEMPLATE:
                    template.status = "PAUSED" if template.status == "APPROVED" else "APPROVED"
                    template.quality = "RED" if template.status == "PAUSED" else "GREEN"

    @staticmethod
    def _add(number: PhoneNumber, sent: int, delivered: int) -> None:
        day = _today()
        number.sent[day] = number.sent.get(day, 0) + sent
        number.delivered[day] = number.delivered.get(day, 0) + delivered

    def state(self) -> dict[str, Any]:
        return {
            "waba_id": self.waba_id,
            "limit": self.limit,
            "call_budget": self.call_budget,
            "calls_in_window": len(self._calls),
            "numbers": [self._number_view(n, None) for n in self._numbers.values()],
            "templates": [self._template_view(t, None) for t in self._templates.values()],
        }

    def credentials(self) -> dict[str, str]:
        if self.bsp_header:
            return {self.bsp_header: self.token}
        return {"Authorization": f"Bearer {self.token}"}

    # --- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        prefix, waba = self.base_path, self.waba_id
        return [
            route("GET", f"{prefix}/{waba}/phone_numbers", "health", self._phone_numbers),
            route(
                "GET", f"{prefix}/{waba}/message_templates", "templates", self._message_templates
            ),
            route("GET", f"{prefix}/{waba}", "analytics", self._waba),
            route("GET", prefix + r"/(?P<node>\d+)", "node", self._node),
            route("POST", prefix + r"/(?P<node>\d+)/messages", "messages", self._messages),
        ]

    def control_routes(self) -> list[Route]:
        number = CONTROL_PREFIX + r"/numbers/(?P<digits>\d+)"
        return [
            route("POST", number, "", self._ctl_set_number),
            route("POST", CONTROL_PREFIX + "/limit", "", self._ctl_limit),
            route("POST", CONTROL_PREFIX + "/templates", "", self._ctl_template),
            route("POST", CONTROL_PREFIX + "/rate_limit", "", self._ctl_rate_limit),
        ]

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        if self.bsp_header:
            given = request.headers.get(self.bsp_header.lower(), "")
        else:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not given:
            return graph_error(401, 190, "An access token is required to request this resource.")
        if given != self.token:
            return graph_error(
                401, 190, "Invalid OAuth access token - Cannot parse access token", 463
            )
        now = time.time()
        with self._lock:
            while self._calls and self._calls[0] <= now - self.usage_window:
                self._calls.popleft()
            blocked = self._blocked_until - now
            used = 0
            if self.call_budget is not None:
                used = math.ceil(100 * (len(self._calls) + 1) / self.call_budget)
            regain = 0
            if blocked > 0:
                regain = math.ceil(blocked / 60)
            elif used > 100:
                regain = math.ceil((self._calls[0] + self.usage_window - now) / 60)
            else:
                self._calls.append(now)
            headers["X-Business-Use-Case-Usage"] = _usage_header(self.waba_id, used, regain)
        if blocked > 0 or used > 100:
            return graph_error(400, 80007, "(#80007) Rate limit issues", type_="OAuthException")
        return None

    def _phone_numbers(self, request: RecordedRequest) -> Response:
        wanted = _fields(request.query.get("fields"), NUMBER_DEFAULT_FIELDS)
        with self._lock:
            views = [self._number_view(n, wanted) for n in self._numbers.values()]
        return self._page(request, views)

    def _message_templates(self, request: RecordedRequest) -> Response:
        wanted = _fields(request.query.get("fields"), TEMPLATE_DEFAULT_FIELDS)
        statuses = request.query.get("status")
        with self._lock:
            templates = list(self._templates.values())
        if statuses:
            templates = [t for t in templates if t.status in statuses.split(",")]
        views = [self._template_view(t, wanted) for t in templates]
        answer = self._page(request, views)
        if "summary" in request.query:
            body = json_body(answer)
            body["summary"] = {
                "total_count": len(templates),
                "message_template_count": len(self._templates),
                "message_template_limit": 6000,
                "are_translations_complete": True,
            }
            answer = json_response(200, body)
        return answer

    def _waba(self, request: RecordedRequest) -> Response:
        requested = _split_fields(request.query.get("fields", ""))
        body: dict[str, Any] = {"id": self.waba_id}
        for item in requested:
            name, _, modifiers = item.partition(".")
            if name == "analytics":
                try:
                    body["analytics"] = self._analytics(modifiers)
                except ValueError as exc:
                    return graph_error(400, 100, f"(#100) {exc}")
            elif name in WABA_FIELDS:
                body[name] = WABA_FIELDS[name]
        if not requested:
            body |= {
                k: WABA_FIELDS[k] for k in ("name", "timezone_id", "message_template_namespace")
            }
        return json_response(200, body)

    def _analytics(self, modifiers: str) -> dict[str, Any]:
        args = dict(re.findall(r"(\w+)\(([^()]*)\)", modifiers))
        if "start" not in args or "end" not in args:
            raise ValueError("analytics requires start and end")
        start, end = int(args["start"]), int(args["end"])
        if end <= start:
            raise ValueError("end must be after start")
        granularity = args.get("granularity", "DAY")
        if granularity not in ("HALF_HOUR", "DAY", "MONTH"):
            raise ValueError(f"granularity {granularity} is not one of HALF_HOUR, DAY, MONTH")
        wanted = re.findall(r"\d+", args.get("phone_numbers", ""))
        with self._lock:
            numbers = [n for n in self._numbers.values() if not wanted or n.digits in wanted]
            points = []
            day = datetime.fromtimestamp(start, UTC).replace(hour=0, minute=0, second=0)
            while day.timestamp() < end:
                key = day.date().isoformat()
                sent = sum(n.sent.get(key, 0) for n in numbers)
                delivered = sum(n.delivered.get(key, 0) for n in numbers)
                if sent or delivered:
                    points.append(
                        {
                            "start": int(day.timestamp()),
                            "end": int((day + timedelta(days=1)).timestamp()),
                            "sent": sent,
                            "delivered": delivered,
                        }
                    )
                day += timedelta(days=1)
        return {
            "phone_numbers": [n.digits for n in numbers],
            "granularity": granularity,
            "data_points": points,
        }

    def _node(self, request: RecordedRequest, node: str) -> Response:
        with self._lock:
            if node in self._numbers:
                wanted = _fields(request.query.get("fields"), NUMBER_DEFAULT_FIELDS)
                return json_response(200, self._number_view(self._numbers[node], wanted))
            if node in self._templates:
                wanted = _fields(request.query.get("fields"), TEMPLATE_DEFAULT_FIELDS)
                return json_response(200, self._template_view(self._templates[node], wanted))
        return graph_error(
            400,
            100,
            f"Unsupported get request. Object with ID '{node}' does not exist, cannot be loaded "
            "due to missing permissions, or does not support this operation.",
            33,
        )

    def _messages(self, request: RecordedRequest, node: str) -> Response:
        """Exists so that tests can prove the exporter never sends a message."""
        return json_response(
            200, {"messaging_product": "whatsapp", "messages": [{"id": "wamid.x"}]}
        )

    def _page(self, request: RecordedRequest, items: list[dict[str, Any]]) -> Response:
        try:
            size = min(int(request.query.get("limit", DEFAULT_PAGE)), MAX_PAGE)
            first = _decode_cursor(request.query["after"]) if "after" in request.query else 0
        except ValueError:
            return graph_error(400, 100, "(#100) Invalid parameter")
        size = max(size, 1)
        chunk = items[first : first + size]
        body: dict[str, Any] = {"data": chunk}
        if chunk:
            paging: dict[str, Any] = {
                "cursors": {"before": _cursor(first), "after": _cursor(first + len(chunk))}
            }
            if first + size < len(items):
                query = {**request.query, "after": _cursor(first + size)}
                paging["next"] = f"{self.url}{request.path}?{urlencode(query)}"
            if first > 0:
                query = {**request.query, "before": _cursor(first)}
                query.pop("after", None)
                paging["previous"] = f"{self.url}{request.path}?{urlencode(query)}"
            body["paging"] = paging
        return json_response(200, body)

    def _number_view(self, n: PhoneNumber, wanted: tuple[str, ...] | None) -> dict[str, Any]:
        limit: Any = self.limit
        if self.limit_form == "integer":
            limit = LIMIT_NUMBERS.get(self.limit, "UNLIMITED")
        entities = [
            {"entity_type": "PHONE_NUMBER", "id": n.id, "can_send_message": n.can_send},
            {"entity_type": "WABA", "id": self.waba_id, "can_send_message": self.waba_can_send},
            {"entity_type": "BUSINESS", "id": "2729063490586005", "can_send_message": "AVAILABLE"},
            {"entity_type": "APP", "id": "334096983071734", "can_send_message": "AVAILABLE"},
        ]
        for entity in entities:
            if entity["can_send_message"] != "AVAILABLE":
                entity["errors"] = [
                    {
                        "error_code": 141006,
                        "error_description": "The number's quality is low.",
                        "possible_solution": "Improve the quality of the messages you send.",
                    }
                ]
        statuses = [e["can_send_message"] for e in entities]
        overall = max(statuses, key=CAN_SEND.index)
        view = {
            "id": n.id,
            "display_phone_number": n.display,
            "verified_name": n.verified_name,
            "quality_rating": n.quality,
            "status": n.status,
            "name_status": n.name_status,
            "code_verification_status": "VERIFIED",
            "platform_type": n.platform_type,
            "throughput": {"level": n.throughput},
            "whatsapp_business_manager_messaging_limit": limit,
            "health_status": {"can_send_message": overall, "entities": entities},
        }
        return _select(view, wanted)

    @staticmethod
    def _template_view(t: Template, wanted: tuple[str, ...] | None) -> dict[str, Any]:
        view = {
            "id": t.id,
            "name": t.name,
            "language": t.language,
            "status": t.status,
            "category": t.category,
            "quality_score": {"score": t.quality, "date": 1700000000},
            "components": [{"type": "BODY", "text": f"Hello {{{{1}}}}, this is {t.name}."}],
            "parameter_format": "POSITIONAL",
        }
        return _select(view, wanted)

    # --- provider-specific answers to faults ----------------------------------------------------

    def error_response(self, code: int, endpoint: str) -> Response:
        if code == 401:
            return graph_error(401, 190, "Invalid OAuth access token - Cannot parse access token")
        if code == 403:
            return graph_error(403, 200, "(#200) Permissions error")
        if code == 404:
            return graph_error(404, 803, "(#803) Some of the aliases you requested do not exist")
        if code == 429:
            return self.rate_limited_response(60)
        if code == 503:
            return graph_error(503, 2, "An unexpected error has occurred. Please retry.")
        if code >= 500:
            return graph_error(code, 1, "An unknown error occurred")
        return graph_error(code, 100, "(#100) Invalid parameter")

    def rate_limited_response(self, retry_after: float) -> Response:
        answer = graph_error(429, 4, "(#4) Application request limit reached")
        answer.headers["X-Business-Use-Case-Usage"] = _usage_header(
            self.waba_id, 100, max(1, math.ceil(retry_after / 60))
        )
        return answer

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        return graph_error(400, 100, message or "(#100) Invalid parameter")

    def wrong_shape(self, endpoint: str) -> Any:
        return {
            "health": {"data": {"id": 1, "display_phone_number": 15550000001}},
            "templates": {"data": [{"name": ["x"], "status": 1}]},
            "analytics": {"id": self.waba_id, "analytics": [{"sent": "many"}]},
        }.get(endpoint, [])

    def not_found(self, request: RecordedRequest) -> Response:
        parts = request.path.rstrip("/").rsplit("/", 1)
        return graph_error(400, 2500, f"Unknown path components: /{parts[-1]}")

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        return graph_error(
            400, 100, f"Unsupported {request.method.lower()} request.", type_="GraphMethodException"
        )

    # --- control --------------------------------------------------------------------------------

    def _ctl_set_number(self, request: RecordedRequest, digits: str) -> Response:
        fields = control_json(request)
        with self._lock:
            try:
                self._by_digits(digits)
            except KeyError:
                display = fields.pop("display", f"+{digits}")
                self.add_number(display, **fields)
                return json_response(201, self._number_view(self._by_digits(digits), None))
            self.set_number(digits, **fields)
            return json_response(200, self._number_view(self._by_digits(digits), None))

    def _ctl_limit(self, request: RecordedRequest) -> Response:
        self.set_limit(control_json(request).get("limit"))
        return json_response(200, {"limit": self.limit})

    def _ctl_template(self, request: RecordedRequest) -> Response:
        data = control_json(request)
        name, language = data.pop("name", None), data.pop("language", "en_US")
        if not isinstance(name, str):
            raise ValueError("'name' is required")
        self.set_template(name, language, **data)
        return json_response(200, self._template_view(self.template(name, language), None))

    def _ctl_rate_limit(self, request: RecordedRequest) -> Response:
        minutes = control_json(request).get("minutes")
        if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes < 0:
            raise ValueError("'minutes' must be a number >= 0")
        self.rate_limit(minutes)
        return json_response(200, {"minutes": minutes})


WABA_FIELDS = {
    "name": "Acme",
    "timezone_id": "1",
    "message_template_namespace": "05155c78_261e_4b2f_82b3_d7958d4cf75f",
    "account_review_status": "APPROVED",
    "business_verification_status": "verified",
    "country": "US",
    "currency": "USD",
    "ownership_type": "SELF",
}


def graph_error(
    status: int, code: int, message: str, subcode: int | None = None, type_: str = "OAuthException"
) -> Response:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = "AbCdEfGhIjKlMnOpQrStUvW"
    return json_response(status, {"error": error})


def json_body(answer: Response) -> dict[str, Any]:
    return json.loads(answer.body)


def _usage_header(waba_id: str, used: int, regain: int) -> str:
    entry = {
        "type": "whatsapp_bsp",
        "call_count": min(used, 100),
        "total_cputime": max(1, min(used, 100) // 4),
        "total_time": max(1, min(used, 100) // 3),
        "estimated_time_to_regain_access": regain,
    }
    return json.dumps({waba_id: [entry]}, separators=(",", ":"))


def _split_fields(text: str) -> list[str]:
    """`a,b.start(1).phone_numbers(["x","y"]),c` -> three fields: commas inside () do not split."""
    fields, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            fields.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        current += ch
    if current.strip():
        fields.append(current.strip())
    return [f for f in fields if f]


def _fields(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_split_fields(text)) if text else default


def _select(view: dict[str, Any], wanted: tuple[str, ...] | None) -> dict[str, Any]:
    if wanted is None:
        return view
    return {"id": view["id"], **{k: view[k] for k in wanted if k in view}}


def _cursor(index: int) -> str:
    return base64.urlsafe_b64encode(f"cursor:{index}".encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError(text) from None
    prefix, _, index = raw.partition(":")
    if prefix != "cursor" or not index.isdigit():
        raise ValueError(text)
    return int(index)


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def _demo_accounts(base_url: str) -> str:
    return f"""\
meta:
  - account: demo
    base_url: {base_url}
    token: demo-token
    waba_id: "{WABA_ID}"
    phone_numbers: []
    rate_limit: 5000/h   # Meta's budget for a WABA with a registered number; 200/h before
    health: {{interval: 10s}}
    templates: {{interval: 15s}}
    analytics: {{interval: 15s}}
"""


def _matrix_keys(account: str, interval: str, healthy: bool) -> dict[str, Any]:
    keys = {
        "token": "demo-token",
        "waba_id": WABA_ID,
        "health": {"interval": interval},
        "templates": {"interval": interval},
        "analytics": {"interval": interval},
    }
    # analytics asks per number: it needs targets even when the number list fails
    return keys if healthy else {**keys, "phone_numbers": ["+1 555-000-0001"]}


def _valid_number() -> dict[str, Any]:
    return {
        "id": "106540352242922",
        "display_phone_number": "+1 555-000-0001",
        "verified_name": "Acme Support",
        "quality_rating": "GREEN",
        "status": "CONNECTED",
        "name_status": "APPROVED",
        "platform_type": "CLOUD_API",
        "throughput": {"level": "STANDARD"},
        "whatsapp_business_manager_messaging_limit": "TIER_10K",
        "health_status": {
            "can_send_message": "AVAILABLE",
            "entities": [
                {
                    "entity_type": "PHONE_NUMBER",
                    "id": "106540352242922",
                    "can_send_message": "AVAILABLE",
                },
                {"entity_type": "WABA", "id": WABA_ID, "can_send_message": "AVAILABLE"},
            ],
        },
    }


KIT = Kit(
    name="meta",
    simulator=MetaSimulator,
    quick={"call_budget": None},
    probe=Probe(
        endpoint="health",
        method="GET",
        path=f"/{WABA_ID}/phone_numbers",
        headers={"Authorization": "Bearer demo-token"},
        misshapen=lambda body: not isinstance(body["data"], list),
    ),
    demo=Demo(
        options={"numbers": 3, "templates": 6, "call_budget": 5000},
        accounts=_demo_accounts,
        metric="whatsapp_phone_number_quality",
    ),
    faults=FaultAnswers(
        auth=(
            401,
            "application/json",
            {
                "error": {
                    "message": "Error validating access token: Session has expired.",
                    "type": "OAuthException",
                    "code": 190,
                    "error_subcode": 463,
                    "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
                }
            },
        ),
        rate_limited={
            "error": {
                "message": "(#80007) Rate limit issues",
                "type": "OAuthException",
                "code": 80007,
                "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
            }
        },
        not_found=lambda method, path: {
            "error": {
                "message": f"Unknown path components: {path}",
                "type": "OAuthException",
                "code": 2500,
                "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
            }
        },
        valid={
            "health": {
                "data": [_valid_number()],
                "paging": {"cursors": {"before": "QVFIUk", "after": "QVFIUk"}},
            },
            "templates": {
                "data": [
                    {
                        "id": "564750795574598",
                        "name": "order_confirmation",
                        "language": "en_US",
                        "status": "APPROVED",
                        "category": "UTILITY",
                        "quality_score": {"score": "GREEN", "date": 1700000000},
                    }
                ],
                "paging": {"cursors": {"before": "QVFIUk", "after": "QVFIUk"}},
                "summary": {"total_count": 1},
            },
            "analytics": {
                "analytics": {
                    "phone_numbers": ["15550000001"],
                    "granularity": "DAY",
                    "data_points": [
                        {"start": 1700006400, "end": 1700092800, "sent": 120, "delivered": 118}
                    ],
                },
                "id": WABA_ID,
            },
        },
        # `data` an object, `analytics` a list: no key the exporter reads as a Graph error
        wrong_shape=lambda junk: {"data": {**junk, "id": "\ud800"}, "analytics": [junk]},
    ),
    matrix=Matrix(
        prefix="meta",
        endpoints=("health", "templates", "analytics"),
        keys=_matrix_keys,
    ),
    example=Example(
        account="acme",
        env={"META_VERIFY_TOKEN": "v"},
        # meta-app first: the test writes each file and replaces its path, and /run/secrets/meta
        # is the start of the other
        files={"/run/secrets/meta-app": "app-secret", "/run/secrets/meta": "EAAG-token"},
    ),
    dashboard="whatsapp-meta-cloud-api",
    alerts=(
        "WhatsAppNumberQualityYellow",
        "WhatsAppNumberQualityRed",
        "WhatsAppNumberCannotSend",
        "WhatsAppMessagingLimitDowngraded",
        "WhatsAppTemplatePausedOrDisabled",
        "WhatsAppMetaTokenRejected",
        "WhatsAppMetaFailureRatioHigh",
        "WhatsAppMetaAccountRestricted",
        "WhatsAppMetaWebhooksSilent",
    ),
)
