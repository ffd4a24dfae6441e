"""The one interface every provider module implements, and the HTTP client they all share.

A provider turns an account's config into endpoints. Each endpoint names its targets, fetches one
target into a plain result object, and (separately, as a pure function) turns that result into
metric families. The scheduler owns timing, errors and the snapshot; a provider owns only what its
API means (docs/architecture.md, "Providers").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import functools
import hashlib
import json
import re
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import pydantic

from exporter.config import AccountBase, Defaults, RateLimit
from exporter.exposition import safe_text
from exporter.metrics import REASONS, Family
from exporter.ratelimit import Paused, RequestBudget
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
        return _adapter(model).validate_python(data)
    except pydantic.ValidationError as exc:
        raise shape_error(exc, what) from None


@functools.cache
def _adapter(model: Any) -> pydantic.TypeAdapter[Any]:
    """Built once per answer type: building one for `list[Entry]` costs ~0.3 ms, 80x the
    validation of an answer."""
    return pydantic.TypeAdapter(model)


# --- HTTP ---------------------------------------------------------------------------------------

MAX_RETRY_AFTER = 900.0
MAX_PAUSE = 3600.0  # a provider's own "come back in N minutes" is honoured up to an hour
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
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    content: bytes

    def snippet(self) -> str:
        kind = self.headers.get("content-type", "").split(";")[0] or "no content type"
        text = " ".join(self.content[:240].decode("utf-8", "replace")[:120].split())
        return f"HTTP {self.status} ({kind}): {text}" if text else f"HTTP {self.status}"


def nested_deeper_than(content: bytes, limit: int) -> bool:
    """Whether brackets nest deeper than `limit`, strings skipped: checked before json.loads,
    whose recursion a hostile answer could otherwise exhaust. All C-speed byte operations (a
    character loop in Python was 17% of the CPU of a burst of batched webhooks): escapes and
    strings go, braces become brackets, and each pass strips one innermost level. Brackets that
    do not pair are left for json.loads to refuse."""
    if content.count(b"[") + content.count(b"{") <= limit:
        return False
    if b"\\" in content:  # an escaped backslash or quote is no string's end
        content = content.replace(b"\\\\", b"").replace(b'\\"', b"")
    # "" is an empty string or two strings' meeting: either way nothing between them is inside
    brackets = content.translate(_SQUARE, _NOT_BRACKETS).replace(b'""', b"")
    if b'"' in brackets:
        brackets = _STRING.sub(b"", brackets)
    for stripped in range(limit + 1):
        if b"[" * (limit + 1 - stripped) in brackets:
            return True
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            return False
        brackets = inner
    return True


_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(range(256)).translate(None, b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')


def load_json(content: bytes) -> Any:
    """json.loads, refusing nesting deeper than any request to the exporter needs (ingest,
    webhooks); raises ValueError for anything that is no JSON."""
    if nested_deeper_than(content, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    return json.loads(content)


# The answers of the poll running in this task, as digests: a poll of a pure endpoint whose
# answers are byte for byte the last ones needs no new lines. Set per target by the scheduler.
ANSWERS: contextvars.ContextVar[list[bytes] | None] = contextvars.ContextVar(
    "answers", default=None
)


class Client:
    """One account's connections: its base URL, default headers, TLS, proxy and pool.

    aiohttp rather than httpx: at the same answers, httpx cost 2.7 ms of CPU per request and
    `Api.call` on aiohttp 1.2 ms, its own JSON parsing included (bench/http_client.py); at 1,000
    numbers the polls were mostly that. The session is opened on the first request, inside the
    event loop that owns it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        connections: int = 1,
        proxy_url: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._tls = tls
        self._connections = connections
        self.proxy, self._proxy_problem = (proxy_url, None) if proxy_url else env_proxy(base_url)
        self._session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> str:
        """base_url's path, then the request's (`https://h/api` + `/v1/x` is `https://h/api/v1/x`),
        as configs were written for."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        if self._proxy_problem:
            raise PollError("connect", self._proxy_problem)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(
                    ssl=self._tls if self._tls is not None else True,
                    limit=self._connections,
                    limit_per_host=0,
                ),
                # the deadline of the whole answer is Api's; these only bound each wait
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._timeout, sock_read=self._timeout
                ),
                cookie_jar=aiohttp.DummyCookieJar(),  # a poll carries no state to the next
                trust_env=False,  # the environment's proxy is looked up once (env_proxy)
            )
        return self._session.request(
            method,
            self.url(path),
            params=params,
            json=json_body,
            headers=headers,
            allow_redirects=False,
            proxy=self.proxy,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def env_proxy(url: str) -> tuple[str | None, str | None]:
    """The `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` proxy for this base URL, looked up once (aiohttp
    would look it up on a thread for every request); and what is wrong with it, if anything."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None, None
    if urlsplit(proxy).scheme not in ("http", "https"):
        scheme = urlsplit(proxy).scheme or "no scheme"
        return None, f"the environment's proxy for {parts.scheme} URLs is {scheme}, not http(s)"
    return proxy, None


class Api:
    """One account's client: its connection pool, request budget and gate; every answer read
    within one deadline (connect and every read) and a byte cap; errors as PollError.

    `provider_error` recognises the provider's own error body and returns its message (or None).
    `answer_rules`, when the provider has them, judge every answer before its HTTP status does
    (AnswerRules).
    """

    def __init__(
        self,
        client: Client,
        budget: RequestBudget,
        provider_error: Callable[[Any], str | None],
        concurrency: int = 1,
        *,
        deadline: float = 10.0,
        body_size_limit: int = 4 << 20,
        pacer: contextlib.AbstractAsyncContextManager[Any] | None = None,
        answer_rules: AnswerRules | None = None,
    ):
        self.client = client
        self._rules = answer_rules
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
        try:
            async with self.gate, self.budget.slot(patience=self.deadline), self.pacer:
                try:
                    async with asyncio.timeout(self.deadline):
                        answered = await self._read(
                            self.client.request(
                                method, path, params=params, json_body=json_body, headers=headers
                            )
                        )
                except TimeoutError:  # aiohttp's own (connect, each read) are TimeoutErrors too
                    raise PollError(
                        "timeout", f"no complete answer within {self.deadline:g}s"
                    ) from None
                except aiohttp.ClientSSLError as exc:
                    raise PollError("connect", f"TLS: {_ssl_reason(exc)}") from None
                except aiohttp.ClientError as exc:
                    raise PollError("connect", f"{type(exc).__name__}: {exc}") from None
                except (
                    ssl.SSLError
                ) as exc:  # TLS 1.3 alerts (a client certificate wanted) come late
                    raise PollError("connect", f"TLS: {exc.reason or exc}") from None
        except Paused as paused:  # the provider's own pause outlasts this request's deadline
            raise PollError(
                "rate_limited",
                f"the provider asked for a pause: {paused.seconds:.0f}s left, nothing sent",
            ) from None
        seen = ANSWERS.get()
        if seen is not None:
            digest = hashlib.blake2b(answered.content, digest_size=16)
            digest.update(answered.status.to_bytes(2, "big"))
            seen.append(digest.digest())
        return await self._interpret(answered)

    async def _read(self, request: Any) -> Answered:
        limit = self.body_size_limit
        async with request as response:
            declared = response.content_length
            if declared is not None and declared > limit:
                raise _too_large(response.status, limit, f"declares {declared} bytes")
            chunks, size = [], 0
            async for chunk in response.content.iter_any():  # decoded: a gzip bomb counts in full
                size += len(chunk)
                if size > limit:
                    raise _too_large(response.status, limit, "runs past that")
                chunks.append(chunk)
            return Answered(response.status, response.headers, b"".join(chunks))

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
        if self._rules is not None:
            pause = min(max(self._rules.pause(answered.headers, error), 0.0), MAX_PAUSE)
            if pause > 0:
                self.budget.block_for(pause)
            reason = self._rules.reason(error) if error is not None else None
            if reason is not None:
                waiting = f", waiting {pause:g}s before the next request" if pause else ""
                raise PollError(reason, detail + waiting, error)
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


def _ssl_reason(exc: aiohttp.ClientSSLError) -> str:
    """The TLS library's own words (`certificate verify failed: unable to get local issuer
    certificate`), not aiohttp's wrapping of them."""
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None)
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(exc)


def _too_large(status: int, limit: int, how: str) -> PollError:
    return PollError("too_large", f"HTTP {status}: the answer {how}; body_size_limit is {limit} B")


_NOT_JSON = object()


# --- the provider interface ---------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerRules:
    """For an API whose answers say more than their HTTP status: Meta's Graph API puts the kind
    of error in the body's own code (a rate limit comes as HTTP 400, an expired token as 400 or
    401) and how much of the account's budget is used in a header on every answer."""

    # the body of any answer (parsed JSON, or None) -> a reason from REASONS, or None to let the
    # HTTP status decide
    reason: Callable[[Any], str | None]
    # (headers, body or None) -> seconds the account should send nothing more (0: go on)
    pause: Callable[[Mapping[str, str], Any], float]


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
    # requests one target's poll takes (pages), from what is known; the budget check counts them
    requests: Callable[[Known], float] | None = None
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
    # (account, endpoint, target, change, since) -> whether a remembered polled result was
    # changed and shown at once (Scheduler.amend): news from a webhook, before the next poll
    amend: Callable[[str, str, str, Callable[[Any], Any], float], Awaitable[bool]] | None = None


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
    answer_rules: AnswerRules | None = None
