"""WhatsGate (`https://{subdomain}.whatsgate.net/api`): devices, their balance and failed numbers.

A Laravel API behind nginx: 403 without a valid `Access-Token`, 60 requests a minute per token, and
`{"success": false, "message": ...}` for logical errors. Connect and delete exist only so tests can
prove the exporter never calls them.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from simulators.kit import Demo, Example, FaultAnswers, Kit, Matrix, Probe
from simulators.server import (
    CONTROL_PREFIX,
    RecordedRequest,
    Response,
    Route,
    Simulator,
    control_json,
    json_response,
    read_json,
    route,
)

STATUSES = ("connected", "disconnected", "not connected", "not initialized")
NUMBER_FIELDS = ("remaining", "successful_count", "pending", "failed")

# 1x1 transparent PNG: the QR code a real connect call would return.
QR_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB"
    "0C8AAAAASUVORK5CYII="
)


@dataclass
class Failure:
    number: str
    at: datetime


@dataclass
class Device:
    mobile: str
    name: str
    instance: str
    status: str = "connected"
    remaining: int = 1000
    successful_count: int = 0
    pending: int = 0
    failed: int = 0
    failures: list[Failure] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return self.status == "connected"


class WhatsGateSimulator(Simulator):
    """`auth_status=401` mimics the older docs; `rate_limit=None` lifts the 60-a-minute cap, and a
    short `rate_window` lets a test watch slots free up without waiting a minute."""

    name = "whatsgate"
    base_path = "/api"
    server_header = "nginx"

    P_DISCONNECT = 0.01
    P_RECONNECT = 0.1
    P_FAIL = 0.05
    MAX_FAILURES = 2000

    def __init__(
        self,
        *,
        token: str = "demo-token",
        devices: int | list[str] = 3,
        auth_status: int = 403,
        rate_limit: int | None = 60,
        rate_window: float = 60.0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if auth_status not in (401, 403):
            raise ValueError("auth_status must be 401 or 403")
        if rate_limit is not None and (not isinstance(rate_limit, int) or rate_limit < 1):
            raise ValueError("rate_limit must be a positive integer or None")
        if not rate_window > 0:
            raise ValueError("rate_window must be > 0")
        self.token = token
        self.auth_status = auth_status
        self.rate_limit = rate_limit
        self.rate_window = float(rate_window)
        self._hits: dict[str, deque[float]] = {}
        self._day = _utcnow().date()
        self._devices: dict[str, Device] = {}
        mobiles = (
            [f"1555{i:07d}" for i in range(1, devices + 1)]
            if isinstance(devices, int)
            else [str(m) for m in devices]
        )
        for index, mobile in enumerate(mobiles, start=1):
            self._devices[mobile] = self._new_device(mobile, index)

    def _new_device(self, mobile: str, index: int) -> Device:
        rng = self.random
        now = _utcnow()
        device = Device(
            mobile=mobile,
            name=f"Support {index}",
            instance=f"instance-{index}",
            remaining=rng.randint(500, 5000),
            successful_count=rng.randint(0, 300),
            pending=rng.randint(0, 10),
            failed=rng.randint(0, 8),
        )
        midnight = datetime.combine(now.date(), datetime.min.time(), UTC)
        today_span = max(1, int((now - midnight).total_seconds()))
        times = [
            midnight + timedelta(seconds=rng.randrange(today_span)) for _ in range(device.failed)
        ]
        for days_back in (1, 2):
            day = midnight - timedelta(days=days_back)
            times += [
                day + timedelta(seconds=rng.randrange(86400)) for _ in range(rng.randint(0, 5))
            ]
        device.failures = [
            Failure(_recipient(rng), at.replace(microsecond=0)) for at in sorted(times)
        ]
        return device

    # --- explicit state changes -----------------------------------------------------------------

    @property
    def devices(self) -> list[str]:
        with self._lock:
            return list(self._devices)

    def device(self, mobile: str) -> Device:
        """A copy of one device's state."""
        with self._lock:
            d = self._devices[mobile]
            return Device(**{**d.__dict__, "failures": list(d.failures)})

    def add_device(self, mobile: str, **fields: Any) -> None:
        with self._lock:
            if mobile in self._devices:
                raise ValueError(f"device {mobile} already exists")
            index = len(self._devices) + 1
            self._devices[mobile] = Device(mobile, f"Support {index}", f"instance-{index}")
            try:
                self.set_device(mobile, **fields)
            except (TypeError, ValueError):
                del self._devices[mobile]
                raise

    def remove_device(self, mobile: str) -> None:
        with self._lock:
            if mobile not in self._devices:
                raise KeyError(f"unknown device {mobile}")
            del self._devices[mobile]

    def set_device(
        self,
        mobile: str,
        *,
        status: str | None = None,
        remaining: int | None = None,
        successful_count: int | None = None,
        pending: int | None = None,
        failed: int | None = None,
        name: str | None = None,
        instance: str | None = None,
    ) -> None:
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(map(repr, STATUSES))}")
        numbers = {
            "remaining": remaining,
            "successful_count": successful_count,
            "pending": pending,
            "failed": failed,
        }
        for key, value in numbers.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        for key, value in (("name", name), ("instance", instance)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
        with self._lock:
            if mobile not in self._devices:
                raise KeyError(f"unknown device {mobile}")
            device = self._devices[mobile]
            changes = {**numbers, "status": status, "name": name, "instance": instance}
            for key, value in changes.items():
                if value is not None:
                    setattr(device, key, value)

    def add_failure(self, mobile: str, number: str, at: datetime) -> None:
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        with self._lock:
            if mobile not in self._devices:
                raise KeyError(f"unknown device {mobile}")
            failures = self._devices[mobile].failures
            failures.append(Failure(number, at.astimezone(UTC).replace(microsecond=0)))
            failures.sort(key=lambda f: f.at)

    def tick(self) -> None:
        rng = self.random
        now = _utcnow()
        with self._lock:
            if now.date() != self._day:
                self._day = now.date()
                for device in self._devices.values():
                    device.successful_count = device.pending = device.failed = 0
            for device in self._devices.values():
                if device.status == "connected" and rng.random() < self.P_DISCONNECT:
                    device.status = "disconnected"
                elif device.status == "disconnected" and rng.random() < self.P_RECONNECT:
                    device.status = "connected"
                if not device.connected:
                    continue
                settled = rng.randint(0, device.pending)
                for _ in range(settled):
                    if rng.random() < self.P_FAIL:
                        device.failed += 1
                        device.failures.append(Failure(_recipient(rng), now.replace(microsecond=0)))
                    else:
                        device.successful_count += 1
                device.pending -= settled
                sent = min(device.remaining, rng.randint(0, 4))
                device.remaining -= sent
                device.pending += sent
                del device.failures[: -self.MAX_FAILURES]

    def state(self) -> dict[str, Any]:
        return {
            "rate_limit": self.rate_limit,
            "devices": [
                self._device_view(d)
                | {key: getattr(d, key) for key in NUMBER_FIELDS}
                | {"failures": len(d.failures)}
                for d in self._devices.values()
            ],
        }

    def credentials(self) -> dict[str, str]:
        return {"Access-Token": self.token}

    # --- HTTP -----------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        device = r"(?P<device>[^/]+)"
        return [
            route("GET", "/api/devices/status", "devices_status", self._devices_status),
            route("GET", f"/api/status/{device}", "status", self._status),
            route("GET", f"/api/reports/balance/{device}", "balance", self._balance),
            route("GET", "/api/reports/failed_numbers", "failed_numbers", self._failed_numbers),
            route("GET", f"/api/connect/{device}", "connect", self._connect),
            route("POST", "/api/delete", "delete", self._delete),
        ]

    def control_routes(self) -> list[Route]:
        path = CONTROL_PREFIX + r"/devices/(?P<mobile>[^/]+)"
        return [
            route("POST", path, "", self._ctl_set_device),
            route("DELETE", path, "", self._ctl_remove_device),
        ]

    def check(self, request: RecordedRequest, headers: dict[str, str]) -> Response | None:
        token = request.headers.get("access-token", "")
        if not token:
            return json_response(self.auth_status, {"message": "an Access-Token is required"})
        if token != self.token:
            return json_response(self.auth_status, {"message": "invalid Access-Token"})
        if self.rate_limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            hits = self._hits.setdefault(token, deque())
            while hits and hits[0] <= now - self.rate_window:
                hits.popleft()
            headers["X-RateLimit-Limit"] = str(self.rate_limit)
            if len(hits) >= self.rate_limit:
                retry_after = max(1, math.ceil(hits[0] + self.rate_window - now))
                headers["X-RateLimit-Remaining"] = "0"
                headers["Retry-After"] = str(retry_after)
                headers["X-RateLimit-Reset"] = str(int(time.time()) + retry_after)
                return self.rate_limited_response(retry_after)
            hits.append(now)
            headers["X-RateLimit-Remaining"] = str(self.rate_limit - len(hits))
        return None

    def _devices_status(self, _request: RecordedRequest) -> Response:
        with self._lock:
            data = [self._device_view(d) for d in self._devices.values()]
        return json_response(200, {"success": True, "data": data, "total": len(data)})

    def _status(self, _request: RecordedRequest, device: str) -> Response:
        with self._lock:
            found = self._devices.get(device)
            if found is None:
                return self._device_not_found()
            return json_response(200, {"success": True, "message": found.status})

    def _balance(self, _request: RecordedRequest, device: str) -> Response:
        with self._lock:
            found = self._devices.get(device)
            if found is None:
                return self._device_not_found()
            counts = {key: getattr(found, key) for key in NUMBER_FIELDS}
        return json_response(200, {"success": True, **counts})

    def _failed_numbers(self, request: RecordedRequest) -> Response:
        query = request.query
        days: dict[str, date] = {}
        for key in ("from", "to"):
            if query.get(key):
                try:
                    days[key] = _parse_day(query[key])
                except ValueError:
                    return _invalid(f"The {key} does not match the format Y-m-d.")
        if "from" in days and "to" in days and days["to"] <= days["from"]:
            return _invalid("The to date must be a date after from.")
        mobile = query.get("device") or None
        with self._lock:
            if mobile is not None and mobile not in self._devices:
                return _invalid("The selected device is invalid.")
            devices = [self._devices[mobile]] if mobile else list(self._devices.values())
            failures = sorted((f for d in devices for f in d.failures), key=lambda f: f.at)
        first, last = days.get("from", date.min), days.get("to", date.max)
        data = [
            {"number": f.number, "date": _iso(f.at)}
            for f in failures
            if first <= f.at.date() <= last
        ]
        return json_response(200, {"success": True, "data": data})

    def _connect(self, _request: RecordedRequest, device: str) -> Response:
        with self._lock:
            found = self._devices.get(device)
            if found is None:
                return json_response(404, {"success": False, "message": "device not found!"})
            if found.connected:
                return json_response(
                    200, {"success": False, "message": "device is already connected"}
                )
        return json_response(200, {"success": True, "qrCode": QR_PNG})

    def _delete(self, request: RecordedRequest) -> Response:
        mobile: Any = None
        if request.body.strip():
            try:
                payload = read_json(request.body)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                mobile = payload.get("sender_device")
        mobile = mobile or request.query.get("sender_device")
        if not mobile:
            return _invalid("The sender device field is required.")
        with self._lock:
            if str(mobile) not in self._devices:
                return _invalid("The selected sender device is invalid.")
            del self._devices[str(mobile)]
        return json_response(200, {"success": True, "message": "Device deleted successfully"})

    def _device_not_found(self) -> Response:
        return json_response(404, {"success": False, "message": "Device not found"})

    @staticmethod
    def _device_view(device: Device) -> dict[str, Any]:
        return {
            "mobile": device.mobile,
            "name": device.name,
            "instance": device.instance,
            "status": device.status,
            "connected": device.connected,
        }

    # --- provider-specific answers to faults ----------------------------------------------------

    def error_response(self, code: int, endpoint: str) -> Response:
        if code in (401, 403):
            return json_response(code, {"message": "invalid Access-Token"})
        if code == 404:
            return self._device_not_found()
        if code == 422:
            message = (
                "The selected sender device is invalid."
                if endpoint == "delete"
                else "The selected device is invalid."
            )
            return json_response(422, {"success": False, "message": message})
        if code == 429:
            return self.rate_limited_response(60)
        if code >= 500:
            return json_response(code, {"message": "Server Error"})
        return json_response(code, {"success": False, "message": "Something went wrong."})

    def rate_limited_response(self, retry_after: float) -> Response:
        return json_response(429, {"success": False, "message": "Too Many Attempts."})

    def provider_error_response(self, endpoint: str, message: str | None) -> Response:
        default = "device not found!" if endpoint == "connect" else "Something went wrong."
        return json_response(200, {"success": False, "message": message or default})

    def wrong_shape(self, endpoint: str) -> Any:
        return {
            "devices_status": {
                "success": True,
                "data": {"mobile": 15550000001, "status": True},
                "total": "1",
            },
            "status": {"success": True, "message": {"status": "connected"}},
            "balance": {
                "success": True,
                "remaining": "plenty",
                "successful_count": None,
                "pending": [],
                "failed": {"count": 1},
            },
            "failed_numbers": {"success": True, "data": {"number": 987654321, "date": 20230101}},
            "connect": {"success": True, "qrCode": None},
            "delete": ["Device deleted successfully"],
        }.get(endpoint, [])

    def not_found(self, request: RecordedRequest) -> Response:
        return json_response(
            404, {"message": f"The route {request.path.lstrip('/')} could not be found."}
        )

    def method_not_allowed(self, request: RecordedRequest, allowed: list[str]) -> Response:
        answer = json_response(
            405,
            {
                "message": f"The {request.method} method is not supported for route "
                f"{request.path.lstrip('/')}. Supported methods: {', '.join(allowed)}."
            },
        )
        answer.headers["Allow"] = ", ".join(allowed)
        return answer

    # --- control --------------------------------------------------------------------------------

    def _ctl_set_device(self, request: RecordedRequest, mobile: str) -> Response:
        fields = control_json(request)
        allowed = {"status", *NUMBER_FIELDS, "name", "instance"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(f"unknown device fields {unknown}; allowed: {sorted(allowed)}")
        with self._lock:
            if mobile in self._devices:
                self.set_device(mobile, **fields)
                status = 200
            else:
                self.add_device(mobile, **fields)
                status = 201
            device = self._devices[mobile]
            view = self._device_view(device) | {k: getattr(device, k) for k in NUMBER_FIELDS}
        return json_response(status, view)

    def _ctl_remove_device(self, _request: RecordedRequest, mobile: str) -> Response:
        self.remove_device(mobile)
        return json_response(200, {"removed": mobile})


def _invalid(message: str) -> Response:
    return json_response(422, {"success": False, "message": message})


def _parse_day(text: str) -> date:
    if len(text) != 10:
        raise ValueError(text)
    return date.fromisoformat(text)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _recipient(rng: Any) -> str:
    return f"+49151{rng.randrange(10**8):08d}"


def _demo_accounts(base_url: str) -> str:
    return f"""\
whatsgate:
  - account: demo
    base_url: {base_url}
    token: demo-token
    devices: []
    rate_limit: 60/m
    balance: {{interval: 10s}}
    failed_numbers: {{interval: 15s, lookback: 24h}}
"""


def _matrix_keys(account: str, interval: str, healthy: bool) -> dict[str, Any]:
    keys = {
        "token": "demo-token",
        "balance": {"interval": interval},
        "failed_numbers": {"interval": interval},
    }
    # per-device endpoints need targets even when /devices/status fails
    return keys if healthy else {**keys, "devices": ["15550000001"]}


KIT = Kit(
    name="whatsgate",
    simulator=WhatsGateSimulator,
    quick={"devices": 1, "rate_limit": None},
    probe=Probe(
        endpoint="balance",
        method="GET",
        path="/reports/balance/15550000001",
        headers={"Access-Token": "demo-token"},
        misshapen=lambda body: not isinstance(body["remaining"], int),
    ),
    demo=Demo(
        options={"devices": 4, "rate_limit": 60},
        accounts=_demo_accounts,
        metric="whatsapp_balance_remaining_messages",
    ),
    faults=FaultAnswers(
        auth=(403, "application/json", {"message": "invalid Access-Token"}),
        rate_limited={"success": False, "message": "Too Many Attempts."},
        # Laravel's
        not_found=lambda method, path: {"message": f"The route api{path} could not be found."},
        valid={
            "devices_status": {
                "success": True,
                "data": [
                    {
                        "mobile": "15550000001",
                        "name": "Support",
                        "instance": "device-instance",
                        "status": "connected",
                        "connected": True,
                    }
                ],
                "total": 1,
            },
            "balance": {
                "success": True,
                "remaining": 1000,
                "successful_count": 500,
                "pending": 50,
                "failed": 10,
            },
            "failed_numbers": {
                "success": True,
                "data": [
                    {"number": "987654321", "date": "2023-01-01T12:00:00Z"},
                    {"number": "987654322", "date": "2023-01-02T14:30:00Z"},
                ],
            },
        },
        # `data` an object, `remaining` a list: status, balance, failed
        wrong_shape=lambda junk: {
            "success": True,
            "data": {**junk, "mobile": "\ud800"},
            "remaining": [junk],
        },
    ),
    matrix=Matrix(
        prefix="wg",
        endpoints=("devices_status", "balance", "failed_numbers"),
        keys=_matrix_keys,
    ),
    example=Example(account="acme", env={"WHATSGATE_TOKEN": "w"}),
    dashboard="whatsapp-whatsgate-devices",
    alerts=(
        "WhatsAppDeviceDisconnected",
        "WhatsAppBalanceRunningOut",
        "WhatsAppBalanceLow",
        "WhatsAppFailureRatioHigh",
    ),
)
