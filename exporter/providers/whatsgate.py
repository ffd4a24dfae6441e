"""WhatsGate: device status of the whole account, per-device balance and failed recipients.

One `/devices/status` call covers every device, so status is polled account-wide every interval and
the costlier per-device reports at their own, longer intervals: 20 devices polled per minute would
exhaust the 60 requests a minute a token gets.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BeforeValidator, Field, SecretStr, field_validator

from exporter.config import AccountBase, Defaults, Duration, RateLimit, Schedule, SecretFile, Strict
from exporter.metrics import Family, gauge
from exporter.providers.base import (
    POLLED,
    Answer,
    Api,
    Endpoint,
    Known,
    Provider,
    account_wide,
    parse,
)

log = logging.getLogger(__name__)

STATUSES = ("connected", "disconnected", "not_connected", "not_initialized", "unknown")


def _number_as_text(value: Any) -> Any:
    """`devices: [123456789]` is an int to YAML and a device number to the operator."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class FailedNumbersSchedule(Strict):
    interval: Duration | None = None
    lookback: Duration = 86400.0


class Account(AccountBase):
    SECRETS = ("token",)

    token: SecretStr | None = None
    token_file: SecretFile = None
    devices: list[Annotated[str, BeforeValidator(_number_as_text)]] = []
    balance: Schedule = Schedule(interval=300.0)
    failed_numbers: FailedNumbersSchedule = FailedNumbersSchedule(interval=300.0)

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[str]) -> list[str]:
        for device in devices:
            if not device.strip() or "/" in device:
                raise ValueError(f"{device!r} is not a device number")
        if len(set(devices)) != len(devices):
            raise ValueError("lists a device twice")
        return devices


# --- answers ------------------------------------------------------------------------------------


class _DeviceAnswer(Answer):
    mobile: str
    name: str | None = None
    instance: str | None = None
    status: str | None = None
    connected: bool | None = None


class _DevicesAnswer(Answer):
    data: list[_DeviceAnswer]


class _BalanceAnswer(Answer):
    remaining: float
    successful_count: float = 0
    pending: float = 0
    failed: float = 0


class _FailureAnswer(Answer):
    number: str
    date: dt.datetime


class _FailedAnswer(Answer):
    data: list[_FailureAnswer] = Field(default_factory=list)


@dataclass(frozen=True)
class Device:
    mobile: str
    name: str
    instance: str
    status: str  # one of STATUSES
    connected: bool


@dataclass(frozen=True)
class Devices:
    devices: tuple[Device, ...]
    missing: tuple[str, ...]  # configured devices that /devices/status did not list


@dataclass(frozen=True)
class Balance:
    remaining: float
    successful: float
    pending: float
    failed: float


@dataclass(frozen=True)
class FailedRecipients:
    """Only the count and the newest time leave this module: the numbers are customers' data."""

    distinct: int
    newest: dt.datetime | None


def status_name(raw: str | None) -> str:
    """`"not connected"` -> `not_connected`; anything undocumented -> `unknown`."""
    name = (raw or "").strip().lower().replace(" ", "_")
    return name if name in STATUSES else "unknown"


def provider_error(body: Any) -> str | None:
    """`{"success": false, "message": ...}`, or an auth answer that has only a message."""
    if not isinstance(body, dict):
        return None
    if body.get("success") is False or (set(body) == {"message"}):
        message = body.get("message")
        return str(message) if message else "success is false, no message"
    return None


def headers(account: Account) -> dict[str, str]:
    return {"Access-Token": account.token.get_secret_value(), "Accept": "application/json"}


# --- fetching -----------------------------------------------------------------------------------


async def fetch_devices(account: Account, api: Api, target: str) -> Devices:
    answer = parse(_DevicesAnswer, await api.call("GET", "/devices/status"), "/devices/status")
    listed = {
        d.mobile: Device(
            mobile=d.mobile,
            name=d.name or "",
            instance=d.instance or "",
            status=status_name(d.status),
            connected=d.connected if d.connected is not None else d.status == "connected",
        )
        for d in answer.data
    }
    wanted = account.devices or sorted(listed)
    missing = tuple(m for m in wanted if m not in listed)
    if missing:
        log.warning(
            "configured devices are not listed by /devices/status",
            extra={"fields": {"account": account.account, "devices": ",".join(missing)}},
        )
    return Devices(tuple(listed[m] for m in wanted if m in listed), missing)


async def fetch_balance(api: Api, device: str) -> Balance:
    path = f"/reports/balance/{quote(device, safe='+')}"
    answer = parse(_BalanceAnswer, await api.call("GET", path), "/reports/balance")
    return Balance(answer.remaining, answer.successful_count, answer.pending, answer.failed)


def failed_window(now: dt.datetime, lookback: float) -> tuple[dt.date, dt.date]:
    """Whole UTC days covering the lookback; WhatsGate wants `to` after `from`."""
    start = (now - dt.timedelta(seconds=lookback)).date()
    return start, max(now.date(), start + dt.timedelta(days=1))


async def fetch_failed(
    account: Account, api: Api, device: str, *, now: dt.datetime | None = None
) -> FailedRecipients:
    now = now or dt.datetime.now(dt.UTC)
    start, end = failed_window(now, account.failed_numbers.lookback)
    params = {"device": device, "from": start.isoformat(), "to": end.isoformat()}
    body = await api.call("GET", "/reports/failed_numbers", params=params)
    answer = parse(_FailedAnswer, body, "/reports/failed_numbers")
    since = now - dt.timedelta(seconds=account.failed_numbers.lookback)
    recent = [f for f in answer.data if _utc(f.date) >= since]
    newest = max((_utc(f.date) for f in recent), default=None)
    return FailedRecipients(len({f.number for f in recent}), newest)


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


# --- metrics ------------------------------------------------------------------------------------


def devices_families(target: str, result: Devices) -> list[Family]:
    devices = [(d.mobile, d.connected, d.status) for d in result.devices]
    devices += [(m, False, "unknown") for m in result.missing]
    return [
        gauge(
            "whatsapp_device_connected",
            "Whether the WhatsGate device is connected (1) or not (0); a configured device that "
            "/devices/status does not list counts as not connected. " + POLLED,
            (({"device": m}, connected) for m, connected, _ in devices),
        ),
        gauge(
            "whatsapp_device_info",
            "WhatsGate device name and instance, always 1. " + POLLED,
            (
                ({"device": d.mobile, "name": d.name, "instance": d.instance}, 1)
                for d in result.devices
            ),
        ),
        gauge(
            "whatsapp_device_status",
            "WhatsGate device connection state: 1 for the current state, 0 for the others. "
            + POLLED,
            (
                ({"device": m, "status": s}, s == status)
                for m, _, status in devices
                for s in STATUSES
            ),
        ),
    ]


def balance_families(device: str, result: Balance) -> list[Family]:
    states = (("successful", result.successful), ("pending", result.pending))
    states += (("failed", result.failed),)
    return [
        gauge(
            "whatsapp_balance_remaining_messages",
            "Messages left in the WhatsGate device's balance. " + POLLED,
            [({"device": device}, result.remaining)],
        ),
        gauge(
            "whatsapp_device_messages",
            "Messages of the WhatsGate device by state, as the balance report counts them "
            "(believed to be today's usage, resetting daily). " + POLLED,
            (({"device": device, "state": state}, value) for state, value in states),
        ),
    ]


def failed_families(device: str, result: FailedRecipients) -> list[Family]:
    families = [
        gauge(
            "whatsapp_failed_recipients",
            "Distinct recipients a WhatsGate device failed to reach within the lookback. " + POLLED,
            [({"device": device}, result.distinct)],
        )
    ]
    if result.newest is not None:
        families.append(
            gauge(
                "whatsapp_last_failure_timestamp_seconds",
                "Unix time of the WhatsGate device's newest failed message within the lookback. "
                + POLLED,
                [({"device": device}, result.newest.timestamp())],
            )
        )
    return families


def device_targets(account: Account, known: Known) -> Sequence[str]:
    """Configured devices, or (with `devices: []`) every device the newest status poll listed."""
    if account.devices:
        return account.devices
    listed = known.get("devices_status", {}).get("")
    return [d.mobile for d in listed.devices] if listed else []


def endpoints(account: Account, defaults: Defaults, state: object) -> list[Endpoint]:
    interval = account.interval or defaults.interval
    targets = functools.partial(device_targets, account)
    return [
        Endpoint(
            "devices_status",
            interval,
            account_wide,
            functools.partial(fetch_devices, account),
            devices_families,
            remember=True,  # the per-device endpoints poll the devices it lists
            pure=True,
        ),
        Endpoint(
            "balance",
            account.balance.interval or interval,
            targets,
            fetch_balance,
            balance_families,
            pure=True,
        ),
        Endpoint(
            "failed_numbers",
            account.failed_numbers.interval or interval,
            targets,
            functools.partial(fetch_failed, account),
            failed_families,
        ),
    ]


PROVIDER = Provider(
    name="whatsgate",
    account_model=Account,
    default_rate_limit=RateLimit(requests=60, period=60.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
)
