"""Betatel: message counts and billed amounts over time windows, one stats request per window.

Rolling windows (`last5m`, `lasth`, `today`, ...) are answered as one total. Bucketed types
(`hourly`, `daily`, ...) answer one entry per bucket of a range, so the exporter asks for the range
of the bucket that is running now, in the configured timezone: `daily` is "today so far", by the
customer's clock.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import SecretStr, field_validator

from exporter.config import AccountBase, Defaults, RateLimit, SecretFile
from exporter.metrics import Family, gauge
from exporter.providers.base import (
    POLLED,
    Answer,
    Api,
    Endpoint,
    Known,
    Provider,
    parse,
)

ROLLING = (
    "today",
    "lastm",
    "last5m",
    "last10m",
    "last30m",
    "lasth",
    "last12h",
    "last24h",
    "lastmonth",
)
BUCKETED = ("hourly", "daily", "weekly", "monthly", "yearly")
Window = Literal[ROLLING + BUCKETED]


class Account(AccountBase):
    SECRETS = ("api_key", "account_id")

    base_url: str = "https://api.betatel.com/api/v1/connect-hub/whatsapp"
    api_key: SecretStr | None = None
    api_key_file: SecretFile = None
    account_id: SecretStr | None = None
    account_id_file: SecretFile = None
    windows: list[Window] = ["last5m", "lasth", "today", "last24h"]
    timezone: str = "UTC"
    currency: str = "EUR"  # labels the amount when a window has no entries (Betatel's default)

    @field_validator("windows")
    @classmethod
    def _windows(cls, windows: list[str]) -> list[str]:
        if not windows:
            raise ValueError("must list at least one window")
        if len(set(windows)) != len(windows):
            raise ValueError("lists a window twice")
        return windows

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"{name!r} is not an IANA timezone like UTC or Europe/Berlin"
            ) from None
        return name


class _Entry(Answer):
    total_requests: float = 0
    total_transactions: float = 0
    total_amount: float = 0
    currency: str = "EUR"


@dataclass(frozen=True)
class WindowStats:
    requests: float
    transactions: float
    amounts: tuple[tuple[str, float], ...]  # (currency, amount), one per currency seen


def bucket(window: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The running bucket of a bucketed type around `now` (aware, in the account's timezone).

    Weeks start on Monday (ISO 8601); Betatel does not document its choice.
    """
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "hourly":
        start = now.replace(minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(hours=1)
    elif window == "daily":
        start, end = day, day + dt.timedelta(days=1)
    elif window == "weekly":
        start = day - dt.timedelta(days=day.weekday())
        end = start + dt.timedelta(days=7)
    elif window == "monthly":
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    elif window == "yearly":
        start = day.replace(month=1, day=1)
        end = start.replace(year=start.year + 1)
    else:
        raise ValueError(window)
    # aware arithmetic in zoneinfo is wall-clock: across a DST change a "day" is 23 or 25 hours
    return start, end - dt.timedelta(milliseconds=1)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{moment.microsecond // 1000:03d}Z"
    )


def request_body(account: Account, window: str, now: dt.datetime) -> dict[str, str]:
    body = {"type": window, "timezone": account.timezone}
    if window in BUCKETED:
        start, end = bucket(window, now.astimezone(ZoneInfo(account.timezone)))
        body |= {"start_time": _iso(start), "end_time": _iso(end)}
    return body


async def fetch_stats(
    account: Account, api: Api, window: str, *, now: dt.datetime | None = None
) -> WindowStats:
    body = request_body(account, window, now or dt.datetime.now(dt.UTC))
    entries = parse(list[_Entry], await api.call("POST", "/stats", json_body=body), "/stats")
    amounts: dict[str, float] = defaultdict(float)
    for entry in entries:
        amounts[entry.currency] += entry.total_amount
    return WindowStats(
        requests=sum(e.total_requests for e in entries),
        transactions=sum(e.total_transactions for e in entries),
        amounts=tuple(sorted(amounts.items())) or ((account.currency, 0.0),),
    )


def provider_error(body: Any) -> str | None:
    """Betatel's error bodies are undocumented: take a message where one is given."""
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str):
                return body[key]
    return None


def headers(account: Account) -> dict[str, str]:
    return {
        "x-api-key": account.api_key.get_secret_value(),
        "x-account-id": account.account_id.get_secret_value(),
        "Accept": "application/json",
    }


def stats_families(window: str, result: WindowStats) -> list[Family]:
    labels = {"window": window}
    return [
        gauge(
            "whatsapp_stats_requests",
            "Messages requested from Betatel within the window. " + POLLED,
            [(labels, result.requests)],
        ),
        gauge(
            "whatsapp_stats_transactions",
            "Messages Betatel processed successfully within the window. " + POLLED,
            [(labels, result.transactions)],
        ),
        gauge(
            "whatsapp_stats_amount",
            "Amount Betatel billed within the window, in the labelled currency. " + POLLED,
            (({"window": window, "currency": c}, amount) for c, amount in result.amounts),
        ),
    ]


def window_targets(account: Account, known: Known) -> Sequence[str]:
    return account.windows


def endpoints(account: Account, defaults: Defaults, state: object) -> list[Endpoint]:
    return [
        Endpoint(
            "stats",
            account.interval or defaults.interval,
            functools.partial(window_targets, account),
            functools.partial(fetch_stats, account),
            stats_families,
            pure=True,
        )
    ]


PROVIDER = Provider(
    name="betatel",
    account_model=Account,
    # undocumented: a conservative budget, configurable per account
    default_rate_limit=RateLimit(requests=60, period=60.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
)
