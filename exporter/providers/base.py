"""The one interface every provider module implements, and the HTTP client they all share.

A provider turns an account's config into endpoints. Each endpoint names its targets, fetches one
target into a plain result object, and (separately, as a pure function) turns that result into
metric families. The scheduler owns timing, errors and the snapshot; a provider owns only what its
API means.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import pydantic

from exporter.config import AccountBase, Defaults, RateLimit
from exporter.metrics import REASONS, Family
from exporter.ratelimit import RequestBudget
from exporter.routing import Route

POLLED = "Polled in the background; up to one poll interval old."

# --- errors -------------------------------------------------------------------------------------


class PollError(Exception):
    """A target's poll failed for a known reason; `detail` is safe to log (no secret, no PII)."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


def _snippet(response: httpx.Response) -> str:
    kind = response.headers.get("content-type", "").split(";")[0] or "no content type"
    text = " ".join(response.text[:120].split())
    return (
        f"HTTP {response.status_code} ({kind}): {text}" if text else f"HTTP {response.status_code}"
    )


class Api:
    """One account's client: a shared connection pool, its request budget, errors as PollError.

    `provider_error` recognises the provider's own error body and returns its message (or None).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        budget: RequestBudget,
        provider_error: Callable[[Any], str | None],
        concurrency: int = 1,
    ):
        self.client = client
        self.budget = budget
        self._provider_error = provider_error
        # requests in flight for this account, whichever endpoint sends them; taken before a
        # budget slot, so a request waiting here holds no place in the budget
        self.gate = asyncio.Semaphore(concurrency)

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        async with self.gate, self.budget.slot():
            try:
                response = await self.client.request(
                    method, path, params=params, json=json_body, headers=headers
                )
            except httpx.TimeoutException:
                raise PollError("timeout", f"no answer within {self._timeout()}") from None
            except httpx.TransportError as exc:
                raise PollError("connect", f"{type(exc).__name__}: {exc}") from None
        return self._interpret(response)

    def _timeout(self) -> str:
        timeout = self.client.timeout.read
        return f"{timeout:g}s" if timeout else "the timeout"

    def _interpret(self, response: httpx.Response) -> Any:
        status = response.status_code
        try:
            body = json.loads(response.content) if response.content else None
        except ValueError:
            body = _NOT_JSON
        message = self._provider_error(body) if body is not _NOT_JSON else None
        detail = message or _snippet(response)
        if status in (401, 403):
            raise PollError("auth", f"HTTP {status}: {detail}")
        if status == 429:
            wait = _retry_after(response.headers.get("retry-after"), self.budget.period)
            self.budget.block_for(wait)
            raise PollError("rate_limited", f"HTTP 429, waiting {wait:g}s before the next request")
        if status == 404:
            raise PollError("not_found", f"HTTP 404: {detail}")
        if status >= 500:  # the provider's server broke, whatever its body says
            raise PollError("http_5xx", detail if not message else f"HTTP {status}: {message}")
        if status >= 300 or status < 200:
            if message:
                raise PollError("provider_error", f"HTTP {status}: {message}")
            raise PollError("http_4xx", detail)
        if body is _NOT_JSON:
            raise PollError("bad_response", f"the answer is not JSON: {_snippet(response)}")
        if message:
            raise PollError("provider_error", message)
        return body


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


def account_wide(known: Known) -> Sequence[str]:
    """An endpoint with one target, the account itself."""
    return ("",)


# --- what a provider may keep besides its polls (D7's ledger) -----------------------------------


class ProviderStateError(Exception):
    """A provider's own state cannot be opened: the exporter does not start."""


@dataclass(frozen=True)
class StateContext:
    """What the exporter hands a provider when it opens the provider's own state."""

    storage_path: str
    accounts: Callable[[], Mapping[str, Any]]  # the running config's accounts of this provider
    changed: Callable[[], None]  # thread-safe: the state's families changed


class ProviderState(Protocol):
    """Opened once at start, kept across reloads, closed at shutdown."""

    def routes(self) -> Sequence[Route]: ...

    def families(self) -> Sequence[Family]: ...

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
