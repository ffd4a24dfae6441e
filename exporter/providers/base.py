"""The one interface every provider module implements, and the HTTP client they all share.

A provider turns an account's config into endpoints. Each endpoint names its targets, fetches one
target into a plain result object, and (separately, as a pure function) turns that result into
metric families. The scheduler owns timing, errors and the snapshot; a provider owns only what its
API means.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import hashlib
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import pydantic

from exporter.config import AccountBase, Defaults, RateLimit
from exporter.exposition import safe_text
from exporter.metrics import REASONS, Family
from exporter.ratelimit import RequestBudget
from exporter.routing import Route

POLLED = "Polled in the background; up to one poll interval old."

# --- errors -------------------------------------------------------------------------------------


class PollError(Exception):
    """A target's poll failed for a known reason; `detail` is safe to log (no secret, no PII)."""

    def __init__(self, reason: str, detail: str, body: Any = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.body = body  # the provider's parsed error answer, for a provider to look into


_TOKENISH = re.compile(
    r"(?i)\b(bearer|basic|token|api[-_ ]?key|access[-_ ]?token|secret|password|authorization)"
    r"(\s*[:=]\s*|\s+)([\"']?)(?:(?:bearer|basic|token)\s+)?([^\s\"',;}]+)"
)
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
MAX_DETAIL = 300


def scrub(text: str, secrets: Iterable[str]) -> str:
    """What a provider said, safe to log and show: the account's secrets and anything that looks
    like a credential replaced, valid UTF-8, at most MAX_DETAIL characters. Providers echo
    credentials in their errors (`invalid Access-Token: abc...`)."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "<secret>")
    text = _JWT.sub("<redacted>", text)
    text = _TOKENISH.sub(lambda m: f"{m[1]}{m[2]}{m[3]}<redacted>", text)
    return safe_text(text, MAX_DETAIL)


def shape_error(exc: pydantic.ValidationError, what: str) -> PollError:
    """A provider answer that parsed as JSON but is not the documented shape."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return PollError("bad_response", f"{what}: {where}: {first['msg']}{more}")


class Answer(pydantic.BaseModel):
    """Base of provider answer models: extra fields are the provider's business, not an error."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


def parse(model: Any, data: Any, what: str) -> Any:
    try:
        return pydantic.TypeAdapter(model).validate_python(data)
    except pydantic.ValidationError as exc:
        raise shape_error(exc, what) from None


# --- HTTP ---------------------------------------------------------------------------------------

MAX_RETRY_AFTER = 900.0
PARSE_IN_THREAD = 1 << 20  # bytes: a bigger JSON answer is parsed off the event loop
MAX_DEPTH = 64  # JSON nesting deeper than any provider's documented answer is refused


def _retry_after(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Answered:
    """A whole answer, read within the deadline and the byte cap."""

    status: int
    headers: httpx.Headers
    content: bytes

    def snippet(self) -> str:
        kind = self.headers.get("content-type", "").split(";")[0] or "no content type"
        text = " ".join(self.content[:240].decode("utf-8", "replace")[:120].split())
        return f"HTTP {self.status} ({kind}): {text}" if text else f"HTTP {self.status}"


def json_depth(content: bytes | str) -> int:
    """How deeply brackets nest, strings skipped: checked before json.loads, whose recursion a
    hostile answer could otherwise exhaust."""
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    depth = deepest = 0
    for token in _BRACKETS.findall(text):
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def load_json(content: bytes) -> Any:
    """json.loads, refusing nesting deeper than any request to the exporter needs (ingest,
    webhooks); raises ValueError for anything that is no JSON."""
    if json_depth(content) > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return json.loads(content)


# The answers of the poll running in this task, as digests: a poll of a pure endpoint whose
# answers are byte for byte the last ones needs no new lines. Set per target by the scheduler.
ANSWERS: contextvars.ContextVar[list[bytes] | None] = contextvars.ContextVar(
    "answers", default=None
)


class Api:
    """One account's client: its connection pool, request budget and gate; every answer read
    within one deadline (connect and every read) and a byte cap; errors as PollError.

    `provider_error` recognises the provider's own error body and returns its message (or None).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        budget: RequestBudget,
        provider_error: Callable[[Any], str | None],
        concurrency: int = 1,
        *,
        deadline: float = 10.0,
        body_size_limit: int = 4 << 20,
        pacer: contextlib.AbstractAsyncContextManager[Any] | None = None,
    ):
        self.client = client
        # shared by every account: holds requests back while the event loop lags (pacer.py)
        self.pacer = pacer or contextlib.nullcontext()
        self.budget = budget
        self._provider_error = provider_error
        # requests in flight for this account, whichever endpoint sends them; taken before a
        # budget slot, so a request waiting here holds no place in the budget
        self.gate = asyncio.Semaphore(concurrency)
        self.deadline = deadline
        self.body_size_limit = body_size_limit

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        async with self.gate, self.budget.slot(), self.pacer:
            request = self.client.build_request(
                method, path, params=params, json=json_body, headers=headers
            )
            try:
                async with asyncio.timeout(self.deadline):
                    answered = await self._read(request)
            except (TimeoutError, httpx.TimeoutException):
                raise PollError(
                    "timeout", f"no complete answer within {self.deadline:g}s"
                ) from None
            except httpx.TransportError as exc:
                raise PollError("connect", f"{type(exc).__name__}: {exc}") from None
            except ssl.SSLError as exc:  # TLS 1.3 alerts (a client certificate wanted) come late
                raise PollError("connect", f"TLS: {exc.reason or exc}") from None
        seen = ANSWERS.get()
        if seen is not None:
            digest = hashlib.blake2b(answered.content, digest_size=16)
            digest.update(answered.status.to_bytes(2, "big"))
            seen.append(digest.digest())
        return await self._interpret(answered)

    async def _read(self, request: httpx.Request) -> Answered:
        limit = self.body_size_limit
        response = await self.client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(response.status_code, limit, f"declares {int(declared)} bytes")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():  # decoded: a gzip bomb counts in full
                size += len(chunk)
                if size > limit:
                    raise _too_large(response.status_code, limit, "runs past that")
                chunks.append(chunk)
        finally:
            await response.aclose()
        return Answered(response.status_code, response.headers, b"".join(chunks))

    async def _interpret(self, answered: Answered) -> Any:
        status, content = answered.status, answered.content
        body: Any = None
        if content:
            try:  # json.loads' own recursion guard stops a hostile nesting (RecursionError)
                if len(content) > PARSE_IN_THREAD:
                    body = await asyncio.to_thread(json.loads, content)
                else:
                    body = json.loads(content)
            except (ValueError, RecursionError):
                body = _NOT_JSON
        message = self._provider_error(body) if body is not _NOT_JSON else None
        # the provider's own message after the status, or the snippet, which names the status
        detail = f"HTTP {status}: {message}" if message else answered.snippet()
        error = body if body is not _NOT_JSON else None
        if status in (401, 403):
            raise PollError("auth", detail, error)
        if status == 429:
            wait = _retry_after(answered.headers.get("retry-after"), self.budget.period)
            self.budget.block_for(wait)
            raise PollError("rate_limited", f"HTTP 429, waiting {wait:g}s before the next request")
        if status == 404:
            raise PollError("not_found", detail, error)
        if status >= 500:  # the provider's server broke, whatever its body says
            raise PollError("http_5xx", detail)
        if status >= 300 or status < 200:
            raise PollError("provider_error" if message else "http_4xx", detail, error)
        if body is _NOT_JSON:
            raise PollError("bad_response", f"the answer is not JSON: {answered.snippet()}")
        if message:
            raise PollError("provider_error", message, error)
        return body


def _too_large(status: int, limit: int, how: str) -> PollError:
    return PollError("too_large", f"HTTP {status}: the answer {how}; body_size_limit is {limit} B")


_NOT_JSON = object()


# --- the provider interface ---------------------------------------------------------------------

# The account's newest successful results: endpoint -> target -> result. Lets an endpoint's
# targets depend on another's answer (WhatsGate's balance job polls the devices that
# /devices/status listed).
Known = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Endpoint:
    name: str
    interval: float
    targets: Callable[[Known], Sequence[str]]
    fetch: Callable[[Api, str], Awaitable[Any]]
    families: Callable[[str, Any], Sequence[Family]]
    remember: bool = False  # keep the newest results in `Known`, for other endpoints' targets
    # families depend only on the target and the answers' bytes (not on the time of the poll):
    # when the answers are the previous ones, the lines are too, and nothing is translated
    pure: bool = False


def account_wide(known: Known) -> Sequence[str]:
    """An endpoint with one target, the account itself."""
    return ("",)


# --- what a provider may keep besides its polls (D7's ledger) -----------------------------------


class ProviderStateError(Exception):
    """A provider's own state cannot be opened: the exporter does not start."""


@dataclass(frozen=True)
class StateContext:
    """What the exporter hands a provider when it opens the provider's own state."""

    storage_path: str  # this provider's own file under --storage.path
    accounts: Callable[[], Mapping[str, Any]]  # the running config's accounts of this provider
    changed: Callable[[], None]  # thread-safe: the state's families changed
    storage_url: str | None = None  # a database replicas share (--storage.url), if any
    storage_password: str | None = None


class ProviderState(Protocol):
    """Opened once at start, kept across reloads, closed at shutdown."""

    def routes(self) -> Sequence[Route]: ...

    def families(self) -> Sequence[Family]: ...

    async def status(self) -> Mapping[str, Mapping[str, str]]:
        """Per account, what the status page shows of this state (field -> text)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Provider:
    name: str
    account_model: type[AccountBase]
    default_rate_limit: RateLimit
    headers: Callable[[Any], dict[str, str]]
    # (account, defaults, the provider's state or None) -> the account's endpoints
    endpoints: Callable[[Any, Defaults, Any], list[Endpoint]]
    provider_error: Callable[[Any], str | None]
    open_state: Callable[[StateContext], ProviderState] | None = None
