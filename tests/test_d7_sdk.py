"""D7's own Python client (`direct7` on PyPI) against the D7 simulator.

The simulator is only worth testing the exporter against if it speaks D7's API the way D7's
clients expect; the official SDK is the closest thing to a reference client there is. It calls
the v1 report path (the docs say v2), which is why the exporter's `report_path` is configurable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from simulators import D7Simulator

try:
    import direct7
    from direct7.errors import AuthenticationError, NotFoundError
except ImportError:  # a dev dependency: each test below fails saying so (a skip would hide it)
    direct7 = None
    AuthenticationError = NotFoundError = Exception

TOKEN = "sdk-test-token"
MESSAGE_KEYS = {
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


@pytest.fixture
def sim() -> Iterator[D7Simulator]:
    if direct7 is None:
        pytest.fail(
            'the direct7 SDK is not installed: run `pip install -e ".[dev]"`', pytrace=False
        )
    with D7Simulator(token=TOKEN, auto=False, index_delay=0) as simulator:
        yield simulator


def client(sim: D7Simulator, token: str = TOKEN) -> direct7.Client:
    """The SDK hard-codes https://api.d7networks.com; `host()` is its own setter for the base."""
    sdk = direct7.Client(api_token=token, timeout=5, max_retries=0)
    sdk.host(sim.url)
    return sdk


def test_sdk_reads_a_report_from_the_simulator(sim: D7Simulator) -> None:
    request_id = sim.send(2, conversation_type="utility", message_type="TEMPLATE")
    sim.advance(request_id, "read")
    sim.clear_requests()

    report = client(sim).whatsapp.get_status(request_id=request_id)

    assert set(report) == {"request_id", "messages", "request_stage", "schedule_time"}
    assert report["request_id"] == request_id
    assert report["request_stage"] == "processed"
    assert len(report["messages"]) == 2
    for message in report["messages"]:
        assert set(message) == MESSAGE_KEYS
        assert message["status"] == "read"
        assert message["reason"] == "Read by the user"
        assert message["conversation_type"] == "utility"
        assert message["message_type"] == "TEMPLATE"
    assert {m["msg_id"] for m in report["messages"]} == {m.msg_id for m in sim.messages(request_id)}

    (call,) = sim.requests
    assert (call.method, call.path, call.endpoint) == (
        "GET",
        f"/whatsapp/v1/report/{request_id}",
        "report",
    )
    assert call.headers["authorization"] == f"Bearer {TOKEN}"
    assert call.headers["user-agent"].startswith("direct7-python-sdk/")


def test_sdk_raises_its_own_errors_for_a_bad_token_and_an_unknown_id(sim: D7Simulator) -> None:
    request_id = sim.send(1)
    sim.advance(request_id, "delivered")

    with pytest.raises(AuthenticationError):
        client(sim, token="not-the-token").whatsapp.get_status(request_id=request_id)
    with pytest.raises(NotFoundError, match="WHATSAPP_LOG_NOT_EXISTS"):
        client(sim).whatsapp.get_status(request_id=str(uuid.uuid4()))

    assert [(r.path, r.headers["authorization"]) for r in sim.requests][:1] == [
        (f"/whatsapp/v1/report/{request_id}", "Bearer not-the-token")
    ]


def test_sdk_send_is_accepted_and_its_request_id_reported(sim: D7Simulator) -> None:
    """The SDK's send body (recipient objects, a template) is one the simulator understands."""
    sdk = client(sim)
    sent = sdk.whatsapp.send_whatsapp_templated_message(
        originator="+15550100100",
        recipient="+491700000001",
        template_id="welcome",
        language="en",
    )

    assert sent["status"] == "accepted"
    request_id = sent["request_id"]
    assert [m.recipient for m in sim.messages(request_id)] == ["+491700000001"]
    sim.advance(request_id, "un_delivered")
    (message,) = sdk.whatsapp.get_status(request_id=request_id)["messages"]
    assert (message["status"], message["template_id"]) == ("un_delivered", "welcome")
    assert [r.path for r in sim.requests] == [
        "/whatsapp/v2/send",
        f"/whatsapp/v1/report/{request_id}",
    ]
