"""pywa (a maintained WhatsApp Cloud API client on PyPI) against the Meta simulator.

The simulator is only worth testing the exporter against if it speaks the Graph API the way its
clients expect: pywa asks for its own long list of `fields`, pages with `paging.next` URLs,
parses health, limits and quality scores into its own types and raises its own errors from
Graph error bodies. pywa builds `https://graph.facebook.com/v{api_version}` itself; its httpx
session's base URL is pointed at the simulator, the only change made to it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simulators import MetaSimulator

try:
    import pywa
    from pywa.errors import ExpiredAccessToken, RateLimitIssues
    from pywa.types import Pagination
except ImportError:  # a dev dependency: each test below fails saying so (a skip would hide it)
    pywa = None
    ExpiredAccessToken = RateLimitIssues = Exception

TOKEN = "pywa-test-token"


@pytest.fixture
def sim() -> Iterator[MetaSimulator]:
    if pywa is None:
        pytest.fail('pywa is not installed: run `pip install -e ".[dev]"`', pytrace=False)
    with MetaSimulator(token=TOKEN, auto=False, call_budget=None, numbers=3, templates=7) as s:
        yield s


def client(sim: MetaSimulator, token: str = TOKEN) -> pywa.WhatsApp:
    phone_id = sim.number("15550000001").id
    wa = pywa.WhatsApp(phone_id=phone_id, token=token, waba_id=sim.waba_id, api_version="25.0")
    wa.api._session.base_url = sim.base_url
    return wa


def test_phone_numbers_with_health_and_limits_parse_into_pywas_types(sim):
    sim.set_number("15550000002", quality="RED", can_send="LIMITED")
    sim.set_limit("TIER_2K")
    numbers = client(sim).get_business_phone_numbers()
    assert [n.display_phone_number for n in numbers] == [
        "+1 555-000-0001",
        "+1 555-000-0002",
        "+1 555-000-0003",
    ]
    red = numbers[1]
    assert (red.quality_rating, red.status, red.platform_type) == ("RED", "CONNECTED", "CLOUD_API")
    assert red.whatsapp_business_manager_messaging_limit == "TIER_2K"
    assert red.throughput == {"level": "STANDARD"}
    assert red.health_status["can_send_message"] == "LIMITED"
    entities = {e["entity_type"]: e for e in red.health_status["entities"]}
    assert entities["PHONE_NUMBER"]["can_send_message"] == "LIMITED"
    assert entities["PHONE_NUMBER"]["errors"][0]["error_code"] == 141006
    # pywa asked for its own fields; the simulator answered those it knows
    asked = sim.requests[-1].query["fields"].split(",")
    assert "health_status" in asked and "conversational_automation" in asked


def test_paging_with_pywas_next_urls(sim):
    for index in range(4, 8):
        sim.add_number(f"+1 555-000-{index:04d}")
    first = client(sim).get_business_phone_numbers(pagination=Pagination(limit=3))
    assert len(first) == 3 and first.has_next and not first.has_previous
    everything = first.all()
    assert [n.display_phone_number[-4:] for n in everything] == [f"{i:04d}" for i in range(1, 8)]
    assert [r.query.get("after") is not None for r in sim.requests] == [False, True, True]


def test_one_number_and_the_business_account(sim):
    wa = client(sim)
    number = wa.get_business_phone_number()
    assert number.id == sim.number("15550000001").id
    assert number.verified_name == "Acme Support 1"
    waba = wa.get_business_account()
    assert (waba.id, waba.name, waba.timezone_id) == (sim.waba_id, "Acme", "1")


def test_templates_with_their_quality_scores_and_summary(sim):
    sim.set_template("spring_sale", "en_US", status="PAUSED", quality="RED")
    templates = client(sim).get_templates()
    assert templates.total_count == 7
    assert len(templates) == 7
    paused = next(t for t in templates if t.name == "spring_sale")
    assert str(paused.status) == "PAUSED"
    assert str(paused.quality_score.score) == "RED"
    assert str(paused.category) == "MARKETING"
    approved = client(sim).get_templates(statuses=["APPROVED"])
    assert approved.total_count == 6
    assert "spring_sale" not in {t.name for t in approved}


def test_analytics_through_pywas_graph_request(sim):
    sim.record_traffic("15550000001", 12, 10)
    fields = ('analytics.start(0).end(4102444800).granularity(DAY).phone_numbers(["15550000001"])',)
    answer = client(sim).api.get_waba_info(waba_id=sim.waba_id, fields=fields)
    points = answer["analytics"]["data_points"]
    assert [(p["sent"], p["delivered"]) for p in points] == [(12, 10)]
    assert answer["analytics"]["phone_numbers"] == ["15550000001"]


def test_a_wrong_token_and_a_rate_limit_raise_pywas_own_errors(sim):
    with pytest.raises(ExpiredAccessToken) as refused:
        client(sim, token="wrong").get_business_phone_numbers()
    assert refused.value.code == 190
    sim.rate_limit(minutes=5)
    with pytest.raises(RateLimitIssues) as limited:
        client(sim).get_business_phone_numbers()
    assert limited.value.code == 80007
