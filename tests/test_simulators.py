"""The simulators speak the documented APIs over real loopback HTTP, and misbehave on cue."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulators import (
    KITS,
    SIMULATORS,
    BetatelSimulator,
    D7Simulator,
    Fault,
    KaleyraSimulator,
    MetaSimulator,
    RecordedRequest,
    Simulator,
    WhatsGateSimulator,
)
from simulators.__main__ import main as simulator_main
from tests.conftest import LoopbackServer

ROOT = Path(__file__).resolve().parent.parent
# One pooled client for plain-HTTP loopback calls: building a verifying client costs ~50 ms.
HTTP = httpx.Client(timeout=5, verify=False)
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
WG = {"Access-Token": "demo-token"}
BT = {"x-api-key": "demo-key", "x-account-id": "demo-account"}
D7 = {"Authorization": "Bearer demo-token"}
NUMBER = "+12025550100"
SEND_BODY = {
    "messages": [
        {
            "originator": "+15550100100",
            "recipients": ["+491700000001"],
            "content": {"message_type": "TEMPLATE", "template": {"template_id": "welcome"}},
        }
    ]
}

Start = Callable[..., Any]


@pytest.fixture
def start() -> Iterator[Start]:
    """Starts simulators (still unless auto=True is asked for) and stops them after the test."""
    started: list[Simulator] = []

    def _start(cls: type[Simulator], **options: Any) -> Any:
        options.setdefault("auto", False)
        sim = cls(**options).start()
        started.append(sim)
        return sim

    yield _start
    for sim in started:
        sim.stop()


def call(sim: Simulator) -> httpx.Response:
    """One authorized request to the provider's main read endpoint (a D7 report sends first)."""
    probe = KITS[sim.name].probe
    return HTTP.request(
        probe.method, sim.base_url + probe.path_for(sim), headers=probe.headers, json=probe.body
    )


ALL = [kit.simulator for kit in KITS.values()]
IDS = list(KITS)


def main_endpoint(cls: type[Simulator]) -> str:
    return KITS[cls.name].probe.endpoint


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return first
    raise AssertionError("no run of free ports found")


# --- shared machinery ---------------------------------------------------------------------------


def test_registry_names_every_simulator() -> None:
    assert {name: kit.simulator for name, kit in KITS.items()} == SIMULATORS
    assert all(kit.name == name == kit.simulator.name for name, kit in KITS.items())


def test_base_urls_point_at_the_provider_roots(start: Start) -> None:
    sims = {name: start(cls) for name, cls in SIMULATORS.items()}
    for sim in sims.values():
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", sim.url)
        assert sim.port != 0
    assert sims["whatsgate"].base_url == sims["whatsgate"].url + "/api"
    assert sims["betatel"].base_url == sims["betatel"].url + "/api/v1/connect-hub/whatsapp"
    assert sims["d7"].base_url == sims["d7"].url
    assert sims["kaleyra"].base_url == sims["kaleyra"].url


def test_binds_loopback_only_by_default(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    assert sim._server.server_address[0] == "127.0.0.1"


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_requests_are_recorded_with_their_endpoint(start: Start, cls: type[Simulator]) -> None:
    sim = start(cls, index_delay=0) if cls is D7Simulator else start(cls)
    before = time.time()
    answer = call(sim)
    assert answer.status_code == 200
    recorded = sim.requests[-1]
    assert isinstance(recorded, RecordedRequest)
    assert recorded.endpoint == main_endpoint(cls)
    assert before <= recorded.time <= time.time()
    assert all(key == key.lower() for key in recorded.headers)
    assert recorded.headers["host"].startswith("127.0.0.1:")
    sim.clear_requests()
    assert sim.requests == []


def test_recorded_request_keeps_method_path_query_headers_and_body(start: Start) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    HTTP.post(f"{sim.base_url}/stats?x=1&y=", json={"type": "today"}, headers=BT)
    HTTP.get(f"{sim.url}/nowhere")
    HTTP.get(f"{sim.url}/_sim/state")
    stats, unknown = sim.requests
    assert (stats.method, stats.path, stats.query) == (
        "POST",
        "/api/v1/connect-hub/whatsapp/stats",
        {"x": "1", "y": ""},
    )
    assert stats.headers["x-api-key"] == "demo-key"
    assert stats.json() == {"type": "today"}
    assert (unknown.endpoint, unknown.path) == ("unknown", "/nowhere")


def test_unknown_path_gets_the_providers_404(start: Start) -> None:
    wg = start(WhatsGateSimulator)
    d7 = start(D7Simulator)
    assert HTTP.get(f"{wg.url}/api/nope").json() == {
        "message": "The route api/nope could not be found."
    }
    assert HTTP.get(f"{d7.url}/nope").json() == {"detail": "Not Found"}
    wrong = HTTP.get(f"{d7.url}/whatsapp/v2/send", headers=D7)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")


# --- faults, one per kind, on every provider ----------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_fault_latency_delays_then_answers(start: Start, cls: type[Simulator]) -> None:
    sim = start(cls, **KITS[cls.name].quick)
    sim.fail(main_endpoint(cls), Fault.latency(0.15))
    began = time.monotonic()
    answer = call(sim)
    assert time.monotonic() - began >= 0.15
    assert answer.status_code == 200


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_fault_timeout_holds_then_hangs_up(start: Start, cls: type[Simulator]) -> None:
    sim = start(cls)
    sim.fail(main_endpoint(cls), Fault.timeout(0.2), times=1)
    began = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        call(sim)
    assert time.monotonic() - began >= 0.2
    sim.fail(main_endpoint(cls), Fault.timeout(30))
    with pytest.raises(httpx.ReadTimeout):
        _call_with_timeout(sim, 0.1)


def _call_with_timeout(sim: Simulator, timeout: float) -> httpx.Response:
    probe = KITS[sim.name].probe
    with httpx.Client(timeout=timeout, verify=False) as client:
        return client.request(
            probe.method, sim.base_url + probe.path, headers=probe.headers, json=probe.body
        )


STATUS_BODIES = [
    (WhatsGateSimulator, 403, {"message": "invalid Access-Token"}),
    (WhatsGateSimulator, 404, {"success": False, "message": "Device not found"}),
    (WhatsGateSimulator, 500, {"message": "Server Error"}),
    (BetatelSimulator, 401, "Invalid API Key"),
    (
        BetatelSimulator,
        500,
        {
            "statusCode": 500,
            "error": "Internal Server Error",
            "message": "An unexpected error occurred",
        },
    ),
    (D7Simulator, 401, {"detail": {"code": "ACCESS_TOKEN_SIGNATURE_VERIFICATION_FAILED"}}),
    (D7Simulator, 404, {"detail": {"code": "WHATSAPP_LOG_NOT_EXISTS"}}),
    (D7Simulator, 422, {"detail": [{"loc": ["path", "request_id"]}]}),
    (
        KaleyraSimulator,
        500,
        {"code": "WS500", "message": "somthing went wrong !!!", "error": {}, "data": []},
    ),
    (KaleyraSimulator, 406, {"code": "WS406"}),
    (MetaSimulator, 401, {"error": {"code": 190, "type": "OAuthException"}}),
    (MetaSimulator, 403, {"error": {"code": 200}}),
    (MetaSimulator, 500, {"error": {"code": 1, "message": "An unknown error occurred"}}),
    (MetaSimulator, 503, {"error": {"code": 2}}),
]


def _contains(actual: Any, expected: Any) -> bool:
    """True when `expected` is a partial view of `actual` (dicts by key, lists by position)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and _contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) >= len(expected)
            and all(_contains(a, e) for a, e in zip(actual, expected, strict=False))
        )
    return actual == expected


@pytest.mark.parametrize(
    ("cls", "code", "body"), STATUS_BODIES, ids=[f"{c.name}-{code}" for c, code, _ in STATUS_BODIES]
)
def test_fault_status_answers_the_documented_error_body(
    start: Start, cls: type[Simulator], code: int, body: Any
) -> None:
    sim = start(cls)
    sim.fail(main_endpoint(cls), Fault.status(code))
    answer = call(sim)
    assert answer.status_code == code
    if isinstance(body, str):
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.text == body
    else:
        assert _contains(answer.json(), body), answer.text


def test_fault_status_with_a_custom_body(start: Start) -> None:
    sim = start(KaleyraSimulator)
    sim.fail("monitor_stats", Fault.status(503, {"oops": True}), times=1)
    first = call(sim)
    assert (first.status_code, first.json()) == (503, {"oops": True})
    sim.fail("monitor_stats", Fault.status(503, "<h1>down</h1>"), times=1)
    second = call(sim)
    assert (second.status_code, second.text) == (503, "<h1>down</h1>")
    assert second.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_fault_rate_limited_sends_retry_after(start: Start, cls: type[Simulator]) -> None:
    sim = start(cls)
    sim.fail(main_endpoint(cls), Fault.rate_limited(7))
    answer = call(sim)
    assert (answer.status_code, answer.headers["retry-after"]) == (429, "7")


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_fault_html_502_is_an_nginx_page(start: Start, cls: type[Simulator]) -> None:
    sim = start(cls)
    sim.fail("*", Fault.html_502())
    answer = call(sim)
    assert answer.status_code == 502
    assert answer.headers["content-type"].startswith("text/html")
    assert "<title>502 Bad Gateway</title>" in answer.text


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_fault_malformed_json_is_truncated(start: Start, cls: type[Simulator]) -> None:
    sim = start(cls, **KITS[cls.name].quick)
    sim.fail(main_endpoint(cls), Fault.malformed_json())
    answer = call(sim)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.content
    with pytest.raises(json.JSONDecodeError):
        answer.json()


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_fault_wrong_shape_is_valid_json_of_another_shape(
    start: Start, cls: type[Simulator]
) -> None:
    sim = start(cls)
    sim.fail(main_endpoint(cls), Fault.wrong_shape())
    answer = call(sim)
    assert answer.status_code == 200
    assert KITS[cls.name].probe.misshapen(answer.json())


def test_fault_wrong_shape_on_whatsgate_device_list(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    sim.fail("devices_status", Fault.wrong_shape())
    body = HTTP.get(f"{sim.base_url}/devices/status", headers=WG).json()
    assert not isinstance(body["data"], list)


@pytest.mark.parametrize(
    ("cls", "status", "body"),
    [
        (WhatsGateSimulator, 200, {"success": False, "message": "quota exceeded"}),
        (
            KaleyraSimulator,
            200,
            {"code": "WS500", "message": "quota exceeded", "error": {}, "data": []},
        ),
        (D7Simulator, 400, {"detail": {"code": "BAD_REQUEST", "message": "quota exceeded"}}),
        (
            BetatelSimulator,
            400,
            {"statusCode": 400, "error": "Bad Request", "message": "quota exceeded"},
        ),
        (
            MetaSimulator,
            400,
            {
                "error": {
                    "message": "quota exceeded",
                    "type": "OAuthException",
                    "code": 100,
                    "fbtrace_id": "AbCdEfGhIjKlMnOpQrStUvW",
                }
            },
        ),
    ],
    ids=["whatsgate", "kaleyra", "d7", "betatel", "meta"],
)
def test_fault_provider_error_is_the_providers_logical_error(
    start: Start, cls: type[Simulator], status: int, body: Any
) -> None:
    sim = start(cls)
    sim.fail(main_endpoint(cls), Fault.provider_error("quota exceeded"))
    answer = call(sim)
    assert (answer.status_code, answer.json()) == (status, body)


def test_provider_error_default_messages(start: Start) -> None:
    wg = start(WhatsGateSimulator)
    ka = start(KaleyraSimulator)
    wg.fail("*", Fault.provider_error())
    ka.fail("*", Fault.provider_error())
    assert call(wg).json()["success"] is False
    assert call(ka).json() == {
        "code": "WS500",
        "message": "somthing went wrong !!!",
        "error": {},
        "data": [],
    }


def test_fault_times_counts_requests_then_clears_itself(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    sim.fail("balance", Fault.status(500), times=2)
    assert [call(sim).status_code for _ in range(3)] == [500, 500, 200]
    sim.fail("balance", Fault.status(500))
    assert [call(sim).status_code for _ in range(3)] == [500, 500, 500]
    sim.clear_faults()
    assert call(sim).status_code == 200


def test_fault_on_one_endpoint_leaves_the_others_alone(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    sim.fail("balance", Fault.status(500))
    assert HTTP.get(f"{sim.base_url}/devices/status", headers=WG).status_code == 200
    assert call(sim).status_code == 500


def test_faults_come_before_auth_and_are_recorded(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    sim.fail("balance", Fault.status(503), times=1)
    answer = HTTP.get(f"{sim.base_url}/reports/balance/15550000001")
    assert answer.status_code == 503
    assert [r.endpoint for r in sim.requests] == ["balance"]


def test_fail_rejects_unknown_endpoints_and_bad_times(start: Start) -> None:
    sim = start(D7Simulator)
    with pytest.raises(ValueError, match="unknown endpoint 'balance'"):
        sim.fail("balance", Fault.status(500))
    with pytest.raises(ValueError, match="times"):
        sim.fail("report", Fault.status(500), times=0)
    with pytest.raises(ValueError):
        Fault.status(99)
    with pytest.raises(ValueError):
        Fault.latency(-1)
    assert sim.endpoints == ("report", "send")


def test_fault_from_dict_checks_its_parameters() -> None:
    assert Fault.from_dict({"kind": "status", "code": 500}) == Fault.status(500)
    assert Fault.from_dict({"kind": "timeout"}) == Fault.timeout(30)
    with pytest.raises(ValueError, match="kind must be one of"):
        Fault.from_dict({"kind": "explode"})
    with pytest.raises(ValueError, match="unknown: code"):
        Fault.from_dict({"kind": "latency", "seconds": 1, "code": 3})
    with pytest.raises(ValueError, match="needs 'code'"):
        Fault.from_dict({"kind": "status"})


# --- lifecycle ----------------------------------------------------------------------------------


def test_stop_is_quick_idempotent_and_interrupts_held_requests() -> None:
    sim = WhatsGateSimulator(auto=True, tick=0.05).start()
    sim.fail("balance", Fault.timeout(30))
    client = httpx.Client(timeout=5, verify=False)
    keep_alive = client.get(f"{sim.base_url}/devices/status", headers=WG)
    assert keep_alive.status_code == 200
    errors: list[BaseException] = []

    def held() -> None:
        try:
            call(sim)
        except httpx.TransportError as exc:
            errors.append(exc)

    thread = threading.Thread(target=held)
    thread.start()
    time.sleep(0.1)
    began = time.monotonic()
    sim.stop()
    sim.stop()
    assert time.monotonic() - began < 1.0
    thread.join(2)
    assert errors, "the held request should end with the connection closed"
    with pytest.raises(httpx.TransportError):
        client.get(f"{sim.base_url}/devices/status", headers=WG)
    client.close()


def test_context_manager_starts_and_stops() -> None:
    with KaleyraSimulator(auto=False) as sim:
        assert call(sim).status_code == 200
        url = sim.url
    with pytest.raises(httpx.TransportError):
        HTTP.get(f"{url}/v1/wamonitor/stats/{NUMBER}")


def test_start_twice_is_an_error(start: Start) -> None:
    sim = start(KaleyraSimulator)
    with pytest.raises(RuntimeError):
        sim.start()


def test_auto_ticks_in_the_background(start: Start) -> None:
    sim = start(BetatelSimulator, auto=True, tick=0.02, history_hours=0)
    deadline = time.monotonic() + 3
    while not sim.message_uuids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.message_uuids()


def test_bad_raw_input_gets_an_answer_not_a_traceback(
    start: Start, capfd: pytest.CaptureFixture[str]
) -> None:
    sim = start(WhatsGateSimulator)
    for raw in (
        b"BREW /api/devices/status HTTP/1.1\r\n\r\n",
        b"GET /api/devices/status HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
        b"POST /api/delete HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
        b"POST /api/delete HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with socket.create_connection(("127.0.0.1", sim.port), timeout=2) as conn:
            conn.sendall(raw)
            first_line = conn.recv(4096).split(b"\r\n")[0]
        assert re.match(rb"HTTP/1\.[01] (400|413|501)", first_line), first_line
    chunked = HTTP.post(
        f"{sim.base_url}/delete",
        content=iter([b'{"sender_device": ', b'"15550000003"}']),
        headers=WG,
    )
    assert chunked.json() == {"success": True, "message": "Device deleted successfully"}
    assert "Traceback" not in capfd.readouterr().err


# --- control API --------------------------------------------------------------------------------


def test_control_requests_faults_and_state(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    ctl = f"{sim.url}/_sim"
    call(sim)
    listed = HTTP.get(f"{ctl}/requests").json()
    assert listed["total"] == 1
    assert listed["requests"][0]["endpoint"] == "balance"
    assert listed["requests"][0]["body"] == ""
    assert HTTP.delete(f"{ctl}/requests").json() == {"cleared": 1}
    assert sim.requests == []

    created = HTTP.post(
        f"{ctl}/faults", json={"endpoint": "balance", "kind": "status", "code": 500, "times": 1}
    )
    assert created.status_code == 201
    assert HTTP.get(f"{ctl}/faults").json()["faults"][0]["times"] == 1
    assert call(sim).status_code == 500
    assert call(sim).status_code == 200
    HTTP.post(f"{ctl}/faults", json={"endpoint": "*", "kind": "html_502"})
    assert call(sim).status_code == 502
    assert HTTP.delete(f"{ctl}/faults").json() == {"faults": []}
    assert call(sim).status_code == 200

    state = HTTP.get(f"{ctl}/state").json()
    assert state["provider"] == "whatsgate"
    assert [d["mobile"] for d in state["devices"]] == sim.devices


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/faults", b"{nope", 400, "not valid JSON"),
        ("POST", "/faults", b"[1]", 400, "JSON object"),
        ("POST", "/faults", b'{"kind": "status", "code": 500}', 400, "'endpoint' is required"),
        ("POST", "/faults", b'{"endpoint": "balance", "kind": "boom"}', 400, "kind must be"),
        ("POST", "/faults", b'{"endpoint": "nope", "kind": "html_502"}', 400, "unknown endpoint"),
        ("POST", "/faults", b'{"endpoint": "balance", "kind": "latency"}', 400, "seconds"),
        ("POST", "/faults", b'{"endpoint":"balance","kind":"html_502","times":-1}', 400, "times"),
        ("POST", "/devices/15550000001", b'{"status": "asleep"}', 400, "status must be"),
        ("POST", "/devices/15550000001", b'{"colour": 1}', 400, "unknown device fields"),
        ("POST", "/devices/15550000001", b'{"remaining": -1}', 400, "non-negative"),
        ("DELETE", "/devices/999", b"", 404, "unknown device 999"),
        ("GET", "/nothing", b"", 404, "no control endpoint"),
        ("PUT", "/faults", b"", 405, "use"),
    ],
)
def test_control_rejects_malformed_requests(
    start: Start, method: str, path: str, body: bytes, status: int, message: str
) -> None:
    sim = start(WhatsGateSimulator)
    answer = HTTP.request(method, f"{sim.url}/_sim{path}", content=body)
    assert answer.status_code == status
    assert message in answer.json()["error"]
    assert sim.requests == []


def test_control_tick_advances_the_state(start: Start) -> None:
    sim = start(KaleyraSimulator)
    before = sim.value(NUMBER, "out_message_persisted")
    for _ in range(5):
        assert HTTP.post(f"{sim.url}/_sim/tick").status_code == 200
    assert sim.value(NUMBER, "out_message_persisted") > before


# --- WhatsGate ----------------------------------------------------------------------------------


def test_whatsgate_documented_shapes(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    with httpx.Client(base_url=sim.base_url, headers=WG, verify=False) as client:
        devices = client.get("/devices/status").json()
        assert devices["success"] is True
        assert devices["total"] == 3
        first = devices["data"][0]
        assert first == {
            "mobile": "15550000001",
            "name": "Support 1",
            "instance": "instance-1",
            "status": "connected",
            "connected": True,
        }
        assert client.get("/status/15550000002").json() == {
            "success": True,
            "message": "connected",
        }
        balance = client.get("/reports/balance/15550000001").json()
        assert set(balance) == {"success", "remaining", "successful_count", "pending", "failed"}
        assert all(isinstance(balance[k], int) for k in balance if k != "success")
        failed = client.get("/reports/failed_numbers", params={"device": "15550000001"}).json()
        assert failed["success"] is True
        assert failed["data"], "a fresh device has some failures to report"
        for row in failed["data"]:
            assert set(row) == {"number", "date"}
            assert ISO_Z.fullmatch(row["date"])
        assert [r["date"] for r in failed["data"]] == sorted(r["date"] for r in failed["data"])


def test_whatsgate_failed_numbers_filters_by_calendar_day(start: Start) -> None:
    sim = start(WhatsGateSimulator, devices=["4911", "4922"])
    sim.add_failure("4911", "+4915100000001", datetime(2024, 3, 1, 0, 0, 1, tzinfo=UTC))
    sim.add_failure("4911", "+4915100000002", datetime(2024, 3, 2, 23, 59, 59, tzinfo=UTC))
    sim.add_failure("4911", "+4915100000003", datetime(2024, 3, 3, 0, 0, 0, tzinfo=UTC))
    sim.add_failure("4922", "+4915100000004", datetime(2024, 3, 2, 12, 0, 0, tzinfo=UTC))
    url = f"{sim.base_url}/reports/failed_numbers"
    one = HTTP.get(
        url, params={"device": "4911", "from": "2024-03-01", "to": "2024-03-02"}, headers=WG
    ).json()
    assert one == {
        "success": True,
        "data": [
            {"number": "+4915100000001", "date": "2024-03-01T00:00:01Z"},
            {"number": "+4915100000002", "date": "2024-03-02T23:59:59Z"},
        ],
    }
    both = HTTP.get(url, params={"from": "2024-03-02", "to": "2024-03-03"}, headers=WG).json()
    assert [r["number"] for r in both["data"]] == [
        "+4915100000004",
        "+4915100000002",
        "+4915100000003",
    ]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"device": "999"}, "The selected device is invalid."),
        ({"from": "2024-03-02", "to": "2024-03-02"}, "The to date must be a date after from."),
        ({"from": "2024-03-02", "to": "2024-03-01"}, "The to date must be a date after from."),
        ({"from": "02.03.2024"}, "The from does not match the format Y-m-d."),
        ({"to": "2024-3-1"}, "The to does not match the format Y-m-d."),
    ],
)
def test_whatsgate_failed_numbers_validation(
    start: Start, params: dict[str, str], message: str
) -> None:
    sim = start(WhatsGateSimulator)
    answer = HTTP.get(f"{sim.base_url}/reports/failed_numbers", params=params, headers=WG)
    assert (answer.status_code, answer.json()) == (422, {"success": False, "message": message})


def test_whatsgate_unknown_device(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    for path in ("/reports/balance/999", "/status/999"):
        answer = HTTP.get(sim.base_url + path, headers=WG)
        assert (answer.status_code, answer.json()) == (
            404,
            {"success": False, "message": "Device not found"},
        )


@pytest.mark.parametrize(
    ("headers", "status", "body", "options"),
    [
        ({}, 403, {"message": "an Access-Token is required"}, {}),
        ({"Access-Token": "nope"}, 403, {"message": "invalid Access-Token"}, {}),
        ({"Access-Token": "nope"}, 401, {"message": "invalid Access-Token"}, {"auth_status": 401}),
        ({"Access-Token": "s3cret"}, 200, None, {"token": "s3cret"}),
    ],
)
def test_whatsgate_auth(
    start: Start, headers: dict[str, str], status: int, body: Any, options: dict[str, Any]
) -> None:
    sim = start(WhatsGateSimulator, **options)
    answer = HTTP.get(f"{sim.base_url}/devices/status", headers=headers)
    assert answer.status_code == status
    if body is not None:
        assert answer.json() == body


def test_whatsgate_rate_limit_per_token_sliding_window(start: Start) -> None:
    sim = start(WhatsGateSimulator, rate_limit=5)
    with httpx.Client(base_url=sim.base_url, headers=WG, verify=False) as client:
        remaining = [
            client.get("/devices/status").headers["x-ratelimit-remaining"] for _ in range(5)
        ]
        assert remaining == ["4", "3", "2", "1", "0"]
        refused = client.get("/reports/balance/15550000001")
    assert refused.status_code == 429
    assert refused.json() == {"success": False, "message": "Too Many Attempts."}
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining"] == "0"
    # An unauthenticated caller is refused for its token, not counted against the real one.
    assert HTTP.get(f"{sim.base_url}/devices/status").status_code == 403


def test_whatsgate_rate_limit_frees_slots_as_the_window_slides(start: Start) -> None:
    sim = start(WhatsGateSimulator, rate_limit=2, rate_window=0.3)
    codes = [HTTP.get(f"{sim.base_url}/devices/status", headers=WG).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    time.sleep(0.35)
    assert HTTP.get(f"{sim.base_url}/devices/status", headers=WG).status_code == 200


def test_whatsgate_rate_limit_off(start: Start) -> None:
    sim = start(WhatsGateSimulator, rate_limit=None)
    with httpx.Client(base_url=sim.base_url, headers=WG, verify=False) as client:
        answers = [client.get("/devices/status") for _ in range(70)]
    assert {a.status_code for a in answers} == {200}
    assert "x-ratelimit-limit" not in answers[0].headers


def test_whatsgate_connect_and_delete_exist_and_are_recorded(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    sim.set_device("15550000002", status="not connected")
    with httpx.Client(base_url=sim.base_url, headers=WG, verify=False) as client:
        qr = client.get("/connect/15550000002").json()
        assert qr["success"] is True
        assert qr["qrCode"].startswith("data:image/png;base64,")
        assert client.get("/connect/15550000001").json() == {
            "success": False,
            "message": "device is already connected",
        }
        missing = client.get("/connect/999")
        assert missing.json() == {"success": False, "message": "device not found!"}
        gone = client.post("/delete", json={"sender_device": "15550000003"})
        assert gone.json() == {"success": True, "message": "Device deleted successfully"}
        again = client.post("/delete", json={"sender_device": "15550000003"})
        assert (again.status_code, again.json()) == (
            422,
            {"success": False, "message": "The selected sender device is invalid."},
        )
        assert client.get("/devices/status").json()["total"] == 2
    assert [r.endpoint for r in sim.requests].count("connect") == 3
    assert [r.endpoint for r in sim.requests].count("delete") == 2


def test_whatsgate_explicit_state_changes(start: Start) -> None:
    sim = start(WhatsGateSimulator, devices=["4930111", "4930222"])
    assert sim.devices == ["4930111", "4930222"]
    sim.set_device(
        "4930111",
        status="disconnected",
        remaining=7,
        successful_count=1,
        pending=2,
        failed=3,
        name="Sales",
    )
    sim.add_device("4930333", status="not initialized", remaining=0)
    sim.remove_device("4930222")
    devices = HTTP.get(f"{sim.base_url}/devices/status", headers=WG).json()["data"]
    assert [(d["mobile"], d["status"], d["connected"]) for d in devices] == [
        ("4930111", "disconnected", False),
        ("4930333", "not initialized", False),
    ]
    assert devices[0]["name"] == "Sales"
    balance = HTTP.get(f"{sim.base_url}/reports/balance/4930111", headers=WG).json()
    assert balance == {
        "success": True,
        "remaining": 7,
        "successful_count": 1,
        "pending": 2,
        "failed": 3,
    }
    with pytest.raises(ValueError):
        sim.set_device("4930111", status="sleeping")
    with pytest.raises(KeyError):
        sim.set_device("nope", remaining=1)


def test_whatsgate_control_disconnects_and_adds_devices(start: Start) -> None:
    sim = start(WhatsGateSimulator)
    changed = HTTP.post(f"{sim.url}/_sim/devices/15550000001", json={"status": "disconnected"})
    assert changed.status_code == 200
    assert changed.json()["connected"] is False
    added = HTTP.post(f"{sim.url}/_sim/devices/15550000009", json={"remaining": 5})
    assert (added.status_code, added.json()["remaining"]) == (201, 5)
    status = HTTP.get(f"{sim.base_url}/status/15550000001", headers=WG).json()
    assert status == {"success": True, "message": "disconnected"}
    assert HTTP.delete(f"{sim.url}/_sim/devices/15550000009").status_code == 200
    assert sim.devices == ["15550000001", "15550000002", "15550000003"]


def test_whatsgate_tick_sends_messages(start: Start) -> None:
    sim = start(WhatsGateSimulator, devices=1)
    before = sim.device("15550000001")
    for _ in range(40):
        sim.tick()
    after = sim.device("15550000001")
    assert after.remaining < before.remaining
    sent = before.remaining - after.remaining
    settled = (after.successful_count - before.successful_count) + (after.failed - before.failed)
    assert settled + (after.pending - before.pending) == sent
    assert len(after.failures) - len(before.failures) == after.failed - before.failed


def test_whatsgate_balance_never_goes_below_zero(start: Start) -> None:
    sim = start(WhatsGateSimulator, devices=1)
    sim.set_device("15550000001", remaining=3)
    for _ in range(30):
        sim.tick()
        assert sim.device("15550000001").remaining >= 0
    assert sim.device("15550000001").remaining == 0


def test_whatsgate_is_repeatable_for_a_seed(start: Start) -> None:
    def run(seed: int) -> list[Any]:
        sim = start(WhatsGateSimulator, seed=seed)
        for _ in range(50):
            sim.tick()
        return HTTP.get(f"{sim.url}/_sim/state").json()["devices"]

    assert run(3) == run(3)
    assert run(3) != run(4)


# --- Betatel ------------------------------------------------------------------------------------


def stats(sim: BetatelSimulator, **body: Any) -> httpx.Response:
    return HTTP.post(f"{sim.base_url}/stats", json=body, headers=BT)


def test_betatel_windows_are_consistent(start: Start) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    now = time.time()
    sim.record_messages(3, at=now - 20)
    sim.record_messages(5, at=now - 20 * 60, transactions=4)
    sim.record_messages(7, at=now - 3 * 3600)
    sim.record_messages(11, at=now - 30 * 3600, amount_each=0.05)

    def requests_in(kind: str) -> int:
        answer = stats(sim, type=kind).json()
        return answer[0]["total_requests"] if answer else 0

    counts = {
        kind: requests_in(kind)
        for kind in (
            "lastm",
            "last5m",
            "last10m",
            "last30m",
            "lasth",
            "last12h",
            "last24h",
            "lastmonth",
        )
    }
    assert counts == {
        "lastm": 3,
        "last5m": 3,
        "last10m": 3,
        "last30m": 8,
        "lasth": 8,
        "last12h": 15,
        "last24h": 15,
        "lastmonth": 26,
    }
    assert stats(sim, type="lasth").json() == [
        {"total_requests": 8, "total_transactions": 7, "total_amount": 0.14, "currency": "EUR"}
    ]
    assert stats(sim, type="lastmonth").json()[0]["total_amount"] == 0.83
    assert 3 <= requests_in("today") <= 15


def test_betatel_defaults_to_today_and_answers_empty_windows_with_an_empty_list(
    start: Start,
) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    assert stats(sim).json() == []
    empty = HTTP.post(f"{sim.base_url}/stats", headers=BT)
    assert (empty.status_code, empty.json()) == (200, [])
    sim.record_messages(2)
    assert stats(sim).json()[0]["total_requests"] == 2
    assert stats(sim, type="today", timezone="Pacific/Kiritimati").json()[0]["total_requests"] == 2


def test_betatel_empty_option_always_answers_an_empty_list(start: Start) -> None:
    sim = start(BetatelSimulator, empty=True)
    assert stats(sim, type="last24h").json() == []
    assert stats(sim, type="daily").json() == []


def test_betatel_buckets_follow_the_timezone(start: Start) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    sim.record_messages(1, at=datetime(2024, 1, 1, 12, 0, tzinfo=UTC))
    sim.record_messages(2, at=datetime(2024, 1, 1, 23, 30, tzinfo=UTC))  # Jan 2 in Berlin
    sim.record_messages(4, at=datetime(2024, 1, 3, 8, 0, tzinfo=UTC))
    body = {"start_time": "2024-01-01T00:00:00.000Z", "end_time": "2024-01-03T23:59:59.000Z"}
    utc = [e["total_requests"] for e in stats(sim, type="daily", **body).json()]
    assert utc == [3, 0, 4]
    berlin = stats(sim, type="daily", timezone="Europe/Berlin", **body).json()
    # 23:59:59Z on Jan 3 is already Jan 4 in Berlin: the range touches four local days.
    assert [e["total_requests"] for e in berlin] == [1, 2, 4, 0]
    assert set(berlin[0]) == {"total_requests", "total_transactions", "total_amount", "currency"}
    hourly = stats(
        sim, type="hourly", start_time="2024-01-01T10:00:00Z", end_time="2024-01-01T13:59:59Z"
    ).json()
    assert [e["total_requests"] for e in hourly] == [0, 0, 1, 0]
    monthly = stats(
        sim, type="monthly", start_time="2023-12-15T00:00:00Z", end_time="2024-02-10T00:00:00Z"
    ).json()
    assert [e["total_requests"] for e in monthly] == [0, 7, 0]
    weekly = stats(
        sim, type="weekly", start_time="2024-01-01T00:00:00Z", end_time="2024-01-14T00:00:00Z"
    ).json()
    assert [e["total_requests"] for e in weekly] == [7, 0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "minutely"}, "Invalid stat type"),
        ({"timezone": "Mars/Olympus_Mons"}, "Invalid timezone"),
        ({"timezone": "../../etc/passwd"}, "Invalid timezone"),
        ({"type": "daily", "start_time": "yesterday"}, "start_time is not a valid ISO 8601"),
        ({"type": "daily", "end_time": 5}, "end_time must be an ISO 8601 string"),
        (
            {
                "type": "daily",
                "start_time": "2024-02-01T00:00:00Z",
                "end_time": "2024-01-01T00:00:00Z",
            },
            "end_time must not be before start_time",
        ),
        (
            {
                "type": "hourly",
                "start_time": "1900-01-01T00:00:00Z",
                "end_time": "2024-01-01T00:00:00Z",
            },
            "Time range too large",
        ),
    ],
)
def test_betatel_bad_requests(start: Start, body: dict[str, Any], message: str) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    answer = stats(sim, **body)
    assert answer.status_code == 400
    error = answer.json()
    assert error["error"] == "Bad Request"
    assert message in error["message"]


@pytest.mark.parametrize("content", [b"{type: daily}", b"[1, 2]", b"\xff\xfe"])
def test_betatel_rejects_bodies_that_are_not_json_objects(start: Start, content: bytes) -> None:
    sim = start(BetatelSimulator)
    answer = HTTP.post(f"{sim.base_url}/stats", content=content, headers=BT)
    assert answer.status_code == 400
    assert answer.json()["error"] == "Bad Request"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "demo-key"},
        {"x-api-key": "nope", "x-account-id": "demo-account"},
        {"x-api-key": "demo-key", "x-account-id": "someone-else"},
    ],
)
def test_betatel_auth_failures_are_plain_text(start: Start, headers: dict[str, str]) -> None:
    sim = start(BetatelSimulator)
    answer = HTTP.post(f"{sim.base_url}/stats", json={}, headers=headers)
    assert (answer.status_code, answer.text) == (401, "Invalid API Key")
    assert answer.headers["content-type"].startswith("text/plain")


def test_betatel_custom_credentials(start: Start) -> None:
    sim = start(BetatelSimulator, api_key="k", account_id="a")
    assert stats(sim).status_code == 401
    ok = HTTP.post(
        f"{sim.base_url}/stats", json={}, headers={"x-api-key": "k", "x-account-id": "a"}
    )
    assert ok.status_code == 200


def test_betatel_wdr_pages_and_single_reports(start: Start) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    sim.record_messages(25, transactions=20)
    page = HTTP.post(
        f"{sim.base_url}/wdr", json={"page": 2, "rows_per_page": 10}, headers=BT
    ).json()
    assert {
        k: page[k] for k in ("page", "rows_per_page", "total", "total_pages", "has_next_page")
    } == {"page": 2, "rows_per_page": 10, "total": 25, "total_pages": 3, "has_next_page": True}
    assert len(page["list"]) == 10
    record = page["list"][0]
    assert set(record) == {
        "uuid",
        "wam_id",
        "to",
        "text",
        "status",
        "timestamp",
        "delivery_timestamp",
        "delivery_time",
        "webhook_delivered",
    }
    failed = HTTP.post(
        f"{sim.base_url}/wdr", json={"filter": {"status": "failed"}}, headers=BT
    ).json()
    assert failed["total"] == 5
    assert {r["status"] for r in failed["list"]} == {"FAILED"}
    delivered = next(
        u
        for u in sim.message_uuids()
        if HTTP.get(f"{sim.base_url}/{u}/wdr", headers=BT).json()["status"] == "DELIVERED"
    )
    single = HTTP.get(f"{sim.base_url}/{delivered}/wdr", headers=BT).json()
    assert single["uuid"] == delivered
    assert isinstance(single["delivery_time"], int)
    assert [r.endpoint for r in sim.requests][:2] == ["wdr", "wdr"]
    assert sim.requests[-1].endpoint == "wdr_uuid"


def test_betatel_wdr_errors(start: Start) -> None:
    sim = start(BetatelSimulator)
    too_many = HTTP.post(f"{sim.base_url}/wdr", json={"rows_per_page": 101}, headers=BT)
    assert too_many.status_code == 400
    assert "rows_per_page" in too_many.json()["message"]
    assert HTTP.get(f"{sim.base_url}/not-a-uuid/wdr", headers=BT).status_code == 400
    missing = HTTP.get(f"{sim.base_url}/{uuid.uuid4()}/wdr", headers=BT)
    assert (missing.status_code, missing.json()["error"]) == (404, "Not Found")


def test_betatel_tick_and_control_grow_the_log(start: Start) -> None:
    sim = start(BetatelSimulator, history_hours=0)
    for _ in range(20):
        sim.tick()
    grown = len(sim.message_uuids())
    assert grown > 0
    answer = HTTP.post(
        f"{sim.url}/_sim/messages",
        json={"count": 4, "transactions": 3, "at": "2024-05-01T10:00:00Z"},
    )
    assert answer.json() == {"messages": grown + 4}
    day = stats(
        sim, type="daily", start_time="2024-05-01T00:00:00Z", end_time="2024-05-01T23:59:59Z"
    ).json()
    assert day == [
        {"total_requests": 4, "total_transactions": 3, "total_amount": 0.06, "currency": "EUR"}
    ]
    bad = HTTP.post(f"{sim.url}/_sim/messages", json={"count": -1})
    assert bad.status_code == 400


def test_betatel_history_is_repeatable_for_a_seed(start: Start) -> None:
    one = start(BetatelSimulator, seed=5)
    two = start(BetatelSimulator, seed=5)
    assert one.message_uuids() == two.message_uuids()
    assert stats(one, type="last24h").json() == stats(two, type="last24h").json()


# --- D7 -----------------------------------------------------------------------------------------


def report(sim: D7Simulator, request_id: str, version: str = "v2") -> httpx.Response:
    return HTTP.get(f"{sim.url}/whatsapp/{version}/report/{request_id}", headers=D7)


def test_d7_send_and_report_have_the_documented_shapes(start: Start) -> None:
    sim = start(D7Simulator, index_delay=0)
    sent = HTTP.post(f"{sim.url}/whatsapp/v2/send", json=SEND_BODY, headers=D7)
    assert sent.status_code == 200
    accepted = sent.json()
    assert set(accepted) == {"request_id", "status", "created_at"}
    assert accepted["status"] == "accepted"
    assert uuid.UUID(accepted["request_id"]).version == 4
    datetime.fromisoformat(accepted["created_at"])
    body = report(sim, accepted["request_id"]).json()
    assert set(body) == {"request_id", "messages", "request_stage", "schedule_time"}
    assert (body["request_id"], body["request_stage"], body["schedule_time"]) == (
        accepted["request_id"],
        "processed",
        None,
    )
    (message,) = body["messages"]
    assert set(message) == {
        "msg_id",
        "originator",
        "recipient",
        "reference",
        "conversation_type",
        "message_type",
        "template_id",
        "waConvId",
        "status",
        "reason",
    }
    assert set(message["reference"]) == {
        "cust_ref",
        "message_tag1",
        "message_tag2",
        "message_tag3",
        "message_tag4",
        "message_tag5",
        "conversation_id",
    }
    assert (message["originator"], message["recipient"], message["template_id"]) == (
        "+15550100100",
        "+491700000001",
        "welcome",
    )
    assert (message["conversation_type"], message["message_type"]) == ("marketing", "TEMPLATE")
    assert (message["status"], message["reason"]) == ("processed", "Message is processed")
    assert re.fullmatch(r"[0-9a-f]{32}", message["waConvId"])
    assert report(sim, accepted["request_id"], "v1").json() == body
    assert [r.endpoint for r in sim.requests] == ["send", "report", "report"]


def test_d7_send_accepts_recipient_objects_with_references(start: Start) -> None:
    sim = start(D7Simulator, index_delay=0)
    body = {
        "messages": [
            {
                "recipients": [
                    {
                        "recipient": "+4917011",
                        "recipient_type": "individual",
                        "reference": {"cust_ref": "order-9", "message_tag1": "promo"},
                    }
                ],
                "content": {"message_type": "TEXT", "text": {"body": "hi"}},
            }
        ],
        "message_globals": {"originator": "SignOTP"},
    }
    request_id = HTTP.post(f"{sim.url}/whatsapp/v2/send", json=body, headers=D7).json()[
        "request_id"
    ]
    (message,) = report(sim, request_id).json()["messages"]
    assert message["reference"]["cust_ref"] == "order-9"
    assert message["reference"]["message_tag1"] == "promo"
    assert (message["originator"], message["message_type"], message["conversation_type"]) == (
        "SignOTP",
        "TEXT",
        "service",
    )


@pytest.mark.parametrize(
    ("content", "loc"),
    [
        (b"not json", ["body", 0]),
        (b"{}", ["body", "messages"]),
        (b'{"messages": [{"recipients": []}]}', ["body", "messages", 0]),
    ],
)
def test_d7_send_rejects_bad_bodies(start: Start, content: bytes, loc: list[Any]) -> None:
    sim = start(D7Simulator)
    answer = HTTP.post(f"{sim.url}/whatsapp/v2/send", content=content, headers=D7)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == loc


def test_d7_report_errors(start: Start) -> None:
    sim = start(D7Simulator, index_delay=0)
    missing = report(sim, str(uuid.uuid4()))
    assert (missing.status_code, missing.json()) == (
        404,
        {
            "detail": {
                "code": "WHATSAPP_LOG_NOT_EXISTS",
                "message": "Given whatsapp message request id not exists in the system. "
                "Please Try Again!",
            }
        },
    )
    malformed = report(sim, "not-a-uuid")
    assert malformed.status_code == 422
    (problem,) = malformed.json()["detail"]
    assert problem["loc"] == ["path", "request_id"]
    assert problem["msg"] and problem["type"]
    request_id = sim.send()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "demo-token"}):
        denied = HTTP.get(f"{sim.url}/whatsapp/v2/report/{request_id}", headers=headers)
        assert denied.status_code == 401
        assert denied.json()["detail"]["code"] == "ACCESS_TOKEN_SIGNATURE_VERIFICATION_FAILED"
    # Auth is checked before the path is validated, as FastAPI's dependencies do.
    assert HTTP.get(f"{sim.url}/whatsapp/v2/report/bad").status_code == 401


def test_d7_fresh_requests_are_not_found_until_indexed(start: Start) -> None:
    sim = start(D7Simulator, index_delay=0.3)
    request_id = sim.send()
    assert report(sim, request_id).status_code == 404
    time.sleep(0.35)
    assert report(sim, request_id).status_code == 200


def test_d7_lifecycle_to_read(start: Start) -> None:
    sim = start(D7Simulator, index_delay=0, p_rejected=0, p_undelivered=0, p_read=1)
    request_id = sim.send(recipients=["+4917001", "+4917002"])
    now = time.time()
    seen = []
    for step in range(1, 6):
        sim.tick(now=now + 100 * step)
        seen.append({m["status"] for m in report(sim, request_id).json()["messages"]})
    assert seen == [{"sent"}, {"delivered"}, {"read"}, {"read"}, {"read"}]
    (first, _) = sim.messages(request_id)
    assert [s for s, _ in first.history] == ["processed", "sent", "delivered", "read"]
    assert first.sent_at <= now
    assert first.history[-1][1] - first.sent_at >= 300
    body = report(sim, request_id).json()["messages"][0]
    assert body["reason"] == "Read by the user"


@pytest.mark.parametrize(
    ("options", "final"),
    [
        ({"p_rejected": 1.0}, ["processed", "rejected"]),
        ({"p_rejected": 0, "p_undelivered": 1.0}, ["processed", "sent", "un_delivered"]),
        ({"p_rejected": 0, "p_undelivered": 0, "p_read": 0}, ["processed", "sent", "delivered"]),
    ],
)
def test_d7_lifecycle_endings(start: Start, options: dict[str, float], final: list[str]) -> None:
    sim = start(D7Simulator, index_delay=0, **options)
    request_id = sim.send()
    for step in range(1, 8):
        sim.tick(now=time.time() + 100 * step)
    (message,) = sim.messages(request_id)
    assert [s for s, _ in message.history] == final


def test_d7_steps_wait_for_their_delay(start: Start) -> None:
    sim = start(D7Simulator, sent_delay=50)
    request_id = sim.send()
    sim.tick()
    assert sim.messages(request_id)[0].status == "processed"
    sim.tick(now=time.time() + 100)
    assert sim.messages(request_id)[0].status == "sent"


def test_d7_advance_and_its_errors(start: Start) -> None:
    sim = start(D7Simulator, index_delay=0)
    request_id = sim.send(recipients=2)
    _, second = sim.messages(request_id)
    sim.advance(request_id, "insufficient_credit", msg_id=second.msg_id)
    statuses = [m["status"] for m in report(sim, request_id).json()["messages"]]
    assert statuses == ["processed", "insufficient_credit"]
    sim.advance(request_id, "delivered")
    assert [m.status for m in sim.messages(request_id)] == ["delivered", "delivered"]
    with pytest.raises(ValueError):
        sim.advance(request_id, "lost")
    with pytest.raises(KeyError):
        sim.advance(str(uuid.uuid4()), "sent")
    answer = HTTP.post(f"{sim.url}/_sim/messages/{request_id}", json={"status": "read"})
    assert {m["status"] for m in answer.json()["messages"]} == {"read"}
    assert HTTP.post(f"{sim.url}/_sim/messages/{request_id}", json={}).status_code == 400
    assert HTTP.get(f"{sim.url}/_sim/messages/{uuid.uuid4()}").status_code == 404
    created = HTTP.post(f"{sim.url}/_sim/send", json={"recipients": 3})
    assert len(sim.messages(created.json()["request_id"])) == 3


def test_d7_is_repeatable_for_a_seed(start: Start) -> None:
    one = start(D7Simulator, seed=9, send_rate=1.5)
    two = start(D7Simulator, seed=9, send_rate=1.5)
    for sim in (one, two):
        for _ in range(5):
            sim.tick(now=time.time() + 1000)
    assert one.request_ids == two.request_ids
    assert len(one.request_ids) >= 5
    assert [m.status for r in one.request_ids for m in one.messages(r)] == [
        m.status for r in two.request_ids for m in two.messages(r)
    ]


class Receiver(LoopbackServer):
    """A tiny webhook endpoint that keeps what it is sent."""

    def __init__(self) -> None:
        self.events: list[tuple[dict[str, str], Any]] = []
        received = self.events

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)
        self.url = self.base + "/d7/events"

    def wait(self, count: int) -> list[tuple[dict[str, str], Any]]:
        deadline = time.monotonic() + 5
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.events)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def test_d7_webhooks_flat(start: Start, receiver: Receiver) -> None:
    sim = start(
        D7Simulator,
        p_rejected=0,
        p_undelivered=0,
        p_read=1,
        webhook_url=receiver.url,
        webhook_headers={"Authorization": "Bearer hook-secret"},
    )
    request_id = sim.send(conversation_type="utility", reference={"cust_ref": "c-1"})
    for step in range(1, 4):
        sim.tick(now=time.time() + 100 * step)
    events = receiver.wait(3)
    assert [e["status"] for _, e in events] == ["sent", "delivered", "read"]
    headers, event = events[-1]
    assert headers["authorization"] == "Bearer hook-secret"
    assert headers["content-type"] == "application/json"
    (message,) = sim.messages(request_id)
    assert set(event) == {
        "event_type",
        "timestamp",
        "date",
        "request_id",
        "msg_id",
        "conversation_type",
        "message_type",
        "waConvId",
        "recipient",
        "cust_ref",
        "message_tag1",
        "message_tag2",
        "message_tag3",
        "message_tag4",
        "message_tag5",
        "conversation_id",
        "originator",
        "status",
    }
    assert event["event_type"] == "DELIVERY_EVENTS"
    assert (event["request_id"], event["msg_id"]) == (request_id, message.msg_id)
    assert (event["conversation_type"], event["cust_ref"]) == ("utility", "c-1")
    assert event["timestamp"] == int(message.history[-1][1] * 1000)


def test_d7_webhooks_nested_and_per_message_report_url(start: Start, receiver: Receiver) -> None:
    sim = start(D7Simulator, webhook_url="http://127.0.0.1:9/unused", webhook_nested_reference=True)
    request_id = sim.send(reference={"cust_ref": "c-2"}, report_url=receiver.url)
    sim.advance(request_id, "rejected")
    ((_, event),) = receiver.wait(1)
    assert event["status"] == "rejected"
    assert event["reference"]["cust_ref"] == "c-2"
    assert "cust_ref" not in event


def test_d7_webhook_failures_do_not_block(start: Start) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/hook"
    sim = D7Simulator(auto=False, webhook_url=dead).start()
    request_id = sim.send()
    began = time.monotonic()
    sim.advance(request_id, "sent")
    sim.advance(request_id, "delivered")
    assert time.monotonic() - began < 0.2
    sim.stop()
    assert time.monotonic() - began < 1.5


# --- Kaleyra ------------------------------------------------------------------------------------


def monitor(sim: KaleyraSimulator, number: str = NUMBER, **headers: str) -> httpx.Response:
    return HTTP.get(f"{sim.url}/v1/wamonitor/stats/{number}", headers=headers)


def test_kaleyra_wrapped_answer(start: Start) -> None:
    sim = start(KaleyraSimulator)
    answer = monitor(sim, accept="application/json")
    envelope = answer.json()["RESPONSE"]
    assert {k: envelope[k] for k in ("code", "message", "error")} == {
        "code": "WS201",
        "message": "Requested processed successfully",
        "error": {},
    }
    stats_ = envelope["data"]["stats"]
    assert set(stats_) == {"app", "db"}
    app = stats_["app"]
    assert set(app) == {
        "callback_queue_size",
        "callback_requests_duration_ms_count",
        "callback_requests_duration_ms_sum",
        "concurrent_rate_limit_triggered",
        "db_request_duration_us_count",
        "db_request_duration_us_sum",
        "endpoint_requests",
        "in_message_decoded",
        "in_messages_pending_processing",
        "media_downloads",
        "media_uploads",
        "out_message_persisted",
        "out_message_sent_duration_ms_count",
        "out_message_sent_duration_ms_sum",
        "out_message_status",
        "pending_callbacks",
        "pending_messages",
    }
    assert set(stats_["db"]) == {
        "db_contacts",
        "db_message_receipts",
        "db_messages",
        "db_pending_callbacks",
        "db_pending_messages",
    }
    queue_size = app["callback_queue_size"]
    assert queue_size["type"] == "gauge"
    assert queue_size["help"] == "Current callback queue size"
    assert "labels" not in queue_size["data"][0]
    callbacks = app["callback_requests_duration_ms_count"]
    assert callbacks["type"] == "counter"
    assert {tuple(sorted(d["labels"])) for d in callbacks["data"]} == {("result", "type")}
    assert {tuple(sorted(d["labels"])) for d in app["endpoint_requests"]["data"]} == {
        ("method", "request", "status")
    }
    assert {d["labels"]["type"] for d in stats_["db"]["db_messages"]["data"]} == {
        "inbound",
        "outbound",
    }


def test_kaleyra_unwrapped_old_client_multinode(start: Start) -> None:
    sim = start(KaleyraSimulator, wrapper=False, client_version="old", multinode=True)
    body = monitor(sim).json()
    assert body["code"] == "WS201"
    assert "RESPONSE" not in body
    stats_ = body["data"]["stats"]
    assert "callback_requests" in stats_["app"]
    assert "callback_requests_duration_ms_count" not in stats_["app"]
    assert set(stats_["db"]) == {"host1:abc123", "host2:def456"}
    assert "db_pending_messages" in stats_["db"]["host1:abc123"]
    assert stats_["db"]["host2:def456"] == {}


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/json", "application/*", "text/html, application/json;q=0.5"],
)
def test_kaleyra_acceptable_accept_headers(start: Start, accept: str | None) -> None:
    sim = start(KaleyraSimulator)
    with httpx.Client(verify=False) as client:
        del client.headers["accept"]
        headers = {"Accept": accept} if accept else {}
        answer = client.get(f"{sim.url}/v1/wamonitor/stats/{NUMBER}", headers=headers)
    assert answer.status_code == 200
    assert sim.requests[-1].headers.get("accept") == accept


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "application/json;q=0"])
def test_kaleyra_ws406(start: Start, accept: str) -> None:
    sim = start(KaleyraSimulator)
    answer = monitor(sim, accept=accept)
    assert (answer.status_code, answer.json()) == (
        406,
        {
            "code": "WS406",
            "message": "The accept header mismatches the supported server response!",
            "error": {},
            "data": [],
        },
    )


@pytest.mark.parametrize("number", ["+12025550199", "12025550100", "+1", "abc", "%2B1202"])
def test_kaleyra_ws500_for_unknown_or_malformed_numbers(start: Start, number: str) -> None:
    sim = start(KaleyraSimulator)
    answer = monitor(sim, number)
    assert (answer.status_code, answer.json()) == (
        500,
        {"code": "WS500", "message": "somthing went wrong !!!", "error": {}, "data": []},
    )


def test_kaleyra_number_may_be_percent_encoded(start: Start) -> None:
    sim = start(KaleyraSimulator)
    assert monitor(sim, "%2B12025550100").status_code == 200


def test_kaleyra_required_headers(start: Start) -> None:
    sim = start(KaleyraSimulator, required_headers={"api-key": "k1"})
    denied = monitor(sim)
    assert denied.status_code == 401
    assert denied.json()["code"] == "WS401"
    assert monitor(sim, **{"api-key": "wrong"}).status_code == 401
    assert monitor(sim, **{"api-key": "k1"}).status_code == 200


def test_kaleyra_tick_grows_counters_and_keeps_gauges_non_negative(start: Start) -> None:
    sim = start(KaleyraSimulator, numbers=[NUMBER, "+442071838750"])
    before = monitor(sim).json()["RESPONSE"]["data"]["stats"]["app"]
    queue_sizes = []
    for _ in range(60):
        sim.tick()
        queue_sizes.append(sim.value(NUMBER, "callback_queue_size"))
    after = monitor(sim).json()["RESPONSE"]["data"]["stats"]["app"]
    for name, family in after.items():
        if family["type"] != "counter":
            continue
        for old, new in zip(before[name]["data"], family["data"], strict=True):
            assert new["value"] >= old["value"], name
    assert (
        after["out_message_persisted"]["data"][0]["value"]
        > before["out_message_persisted"]["data"][0]["value"]
    )
    assert min(queue_sizes) >= 0
    assert len(set(queue_sizes)) > 5, "the callback queue should fill and drain"
    for name in ("pending_messages", "pending_callbacks", "in_messages_pending_processing"):
        assert after[name]["data"][0]["value"] >= 0


def test_kaleyra_set_gauge_and_control(start: Start) -> None:
    sim = start(KaleyraSimulator)
    sim.set_gauge(NUMBER, "callback_queue_size", 500)
    app = monitor(sim).json()["RESPONSE"]["data"]["stats"]["app"]
    assert app["callback_queue_size"]["data"] == [{"value": 500}]
    answer = HTTP.post(
        f"{sim.url}/_sim/numbers/{NUMBER}", json={"callback_queue_size": 7, "pending_messages": 10}
    )
    assert answer.status_code == 200
    assert sim.value(NUMBER, "pending_messages") == 10
    added = HTTP.post(f"{sim.url}/_sim/numbers/+442071838750", json={"pending_messages": 1})
    assert added.status_code == 201
    assert monitor(sim, "+442071838750").status_code == 200
    assert (
        HTTP.post(f"{sim.url}/_sim/numbers/{NUMBER}", json={"out_message_status": 1}).status_code
        == 400
    )
    assert (
        HTTP.post(f"{sim.url}/_sim/numbers/{NUMBER}", json={"pending_messages": -1}).status_code
        == 400
    )
    with pytest.raises(ValueError):
        sim.set_gauge(NUMBER, "endpoint_requests", 1)


def test_kaleyra_is_repeatable_for_a_seed(start: Start) -> None:
    one = start(KaleyraSimulator, seed=11)
    two = start(KaleyraSimulator, seed=11)
    for sim in (one, two):
        for _ in range(10):
            sim.tick()
    assert monitor(one).json() == monitor(two).json()


# --- command line -------------------------------------------------------------------------------


@pytest.mark.processes
def test_cli_serves_all_providers_and_stops_on_sigterm() -> None:
    port = free_ports(4)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators",
            "--provider",
            "all",
            "--port",
            str(port),
            "--set",
            "whatsgate.rate_limit=1000",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        urls = dict(re.match(r"(\w+): base_url=(\S+)", line).groups() for line in lines)
        assert urls == {
            "whatsgate": f"http://127.0.0.1:{port}/api",
            "betatel": f"http://127.0.0.1:{port + 1}/api/v1/connect-hub/whatsapp",
            "d7": f"http://127.0.0.1:{port + 2}",
            "kaleyra": f"http://127.0.0.1:{port + 3}",
        }
        assert "Access-Token: demo-token" in lines[0]
        assert HTTP.get(f"{urls['whatsgate']}/devices/status", headers=WG).status_code == 200
        assert HTTP.post(f"{urls['betatel']}/stats", json={}, headers=BT).status_code == 200
        assert HTTP.get(f"{urls['kaleyra']}/v1/wamonitor/stats/{NUMBER}").status_code == 200
        assert HTTP.get(f"{urls['d7']}/_sim/state").json()["provider"] == "d7"
        garbage = HTTP.post(f"{urls['d7']}/_sim/faults", content=b"{")
        assert garbage.status_code == 400
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=5)
    assert process.returncode == 0
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--provider", "nope"],
        ["--provider", "d7", "--port", "70000"],
        ["--provider", "d7", "--tick", "0"],
        ["--provider", "d7", "--set", "colour=blue"],
        ["--provider", "d7", "--set", "p_read=2"],
        ["--provider", "all", "--set", "index_delay=0"],
        ["--provider", "whatsgate", "--set", "d7.index_delay=0"],
        ["--port", "8081"],
    ],
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        simulator_main(argv)
    assert exit_.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_cli_port_in_use_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit) as exit_:
            simulator_main(["--provider", "kaleyra", "--port", str(busy.getsockname()[1])])
    assert exit_.value.code == 2
    assert "cannot listen" in capsys.readouterr().err


def test_recorded_dates_use_utc(start: Start) -> None:
    sim = start(WhatsGateSimulator, devices=1)
    naive_utc = datetime(2024, 6, 1, 14, 0)
    sim.add_failure("15550000001", "+491", naive_utc)
    sim.add_failure("15550000001", "+492", naive_utc.replace(tzinfo=UTC) - timedelta(days=1))
    rows = HTTP.get(
        f"{sim.base_url}/reports/failed_numbers",
        params={"from": "2024-06-01", "to": "2024-06-02"},
        headers=WG,
    ).json()["data"]
    assert rows == [{"number": "+491", "date": "2024-06-01T14:00:00Z"}]
