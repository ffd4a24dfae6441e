"""Meta's WhatsApp Cloud API: the config, the translation of answers (pure functions), and polling
against the simulator over real HTTP: values, paging, auth, Graph error codes and pacing."""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import ConfigError, Defaults, Schedule, parse_config
from exporter.metrics import Family
from exporter.providers import ACCOUNT_MODELS, meta
from exporter.providers.base import PollError
from exporter.snapshot import TargetKey
from simulators import Fault, MetaSimulator
from tests.conftest import parse_exposition, run_exporter, value, values, wait_for
from tests.golden import new_snapshot

WABA = "102290129340398"


def config(sim: MetaSimulator, extra: str = "", *, auth: str = "token: demo-token") -> str:
    return f"""
defaults: {{interval: 30s, timeout: 2s}}
meta:
  - account: acme
    base_url: {sim.base_url}
    {auth}
    waba_id: "{sim.waba_id}"
{extra}"""


def ready(running) -> None:
    wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")


@pytest.fixture
def sim():
    with MetaSimulator(auto=False, call_budget=None) as sim:
        sim.set_number("15550000001", quality="YELLOW", status="FLAGGED", can_send="LIMITED")
        sim.set_number("15550000002", quality="RED", status="RESTRICTED", name_status="DECLINED")
        sim.set_template("spring_sale", "en_US", status="PAUSED", quality="RED")
        sim.record_traffic("15550000001", 40, 38)
        sim.record_traffic("15550000001", 9, 9, day="2020-01-01")  # not today: not counted
        yield sim


def logged(caplog) -> list[dict]:
    return [getattr(r, "fields", {}) for r in caplog.records]


def one_at_1(series, name: str, **labels: str) -> str:
    """The one value of the state set's label that is 1, proving every other is 0."""
    found = values(series, name, **labels)
    current = [lab for lab, v in found if v == 1]
    assert len(current) == 1 and all(v in (0, 1) for _, v in found), found
    key = {"whatsapp_phone_number_quality": "quality", "whatsapp_can_send_message": "status"}
    return current[0][key.get(name, "status" if "status" in current[0] else "name_status")]


# --- polling against the simulator --------------------------------------------------------------


def test_every_numbers_health_limit_templates_and_todays_messages(sim):
    with run_exporter(config(sim)) as running:
        ready(running)
        series = running.scrape()
    q = "whatsapp_phone_number_quality"
    assert one_at_1(series, q, number="15550000001") == "YELLOW"
    assert one_at_1(series, q, number="15550000002") == "RED"
    assert one_at_1(series, q, number="15550000003") == "GREEN"
    assert value(series, q, number="15550000003", quality="UNKNOWN") == 0
    status = "whatsapp_phone_number_status"
    assert value(series, status, number="15550000001", status="FLAGGED") == 1
    assert value(series, status, number="15550000001", status="CONNECTED") == 0
    assert value(series, status, number="15550000002", status="RESTRICTED") == 1
    name = "whatsapp_phone_number_name_status"
    assert value(series, name, number="15550000002", name_status="DECLINED") == 1
    assert value(series, name, number="15550000001", name_status="APPROVED") == 1
    for number in sim.numbers:
        assert value(series, "whatsapp_messaging_limit", number=number) == 10000
    can = "whatsapp_can_send_message"
    assert value(series, can, number="15550000001", entity="overall", status="LIMITED") == 1
    assert value(series, can, number="15550000001", entity="phone_number", status="LIMITED") == 1
    assert value(series, can, number="15550000001", entity="waba", status="AVAILABLE") == 1
    assert value(series, can, number="15550000003", entity="overall", status="AVAILABLE") == 1
    for number in sim.numbers:
        for entity in ("overall", *meta.ENTITIES):
            assert one_at_1(series, can, number=number, entity=entity)
    info = values(series, "whatsapp_phone_number_info", number="15550000001")
    assert info == [
        (
            {
                "provider": "meta",
                "account": "acme",
                "number": "15550000001",
                "phone_number_id": sim.number("15550000001").id,
                "verified_name": "Acme Support 1",
                "platform_type": "CLOUD_API",
                "throughput_level": "STANDARD",
            },
            1.0,
        )
    ]
    templates = values(series, "whatsapp_template_status")
    assert len(templates) == 5 and all(v == 1 for _, v in templates)
    paused = values(series, "whatsapp_template_status", template="spring_sale")
    assert [(lab["language"], lab["category"], lab["status"]) for lab, _ in paused] == [
        ("en_US", "MARKETING", "PAUSED")
    ]
    assert value(series, "whatsapp_template_quality", template="spring_sale", quality="RED") == 1
    assert value(series, "whatsapp_templates_dropped_total") == 0
    sent = "whatsapp_analytics_messages"
    assert value(series, sent, number="15550000001", state="sent") == 40
    assert value(series, sent, number="15550000001", state="delivered") == 38
    assert value(series, sent, number="15550000002", state="sent") == 0
    for endpoint, targets in (("health", [""]), ("templates", [""]), ("analytics", sim.numbers)):
        for target in targets:
            assert value(series, "whatsapp_exporter_up", endpoint=endpoint, target=target) == 1, (
                endpoint
            )


def test_requests_are_read_only_with_the_bearer_token_and_documented_fields(sim):
    with run_exporter(config(sim)) as running:
        ready(running)
    assert {r.method for r in sim.requests} == {"GET"}
    assert not any(r.endpoint == "messages" for r in sim.requests)
    assert all(r.headers["authorization"] == "Bearer demo-token" for r in sim.requests)
    health = [r for r in sim.requests if r.endpoint == "health"]
    assert len(health) == 1  # one call covers every number's health
    assert health[0].query["fields"] == meta.NUMBER_FIELDS
    analytics = sorted(
        (r for r in sim.requests if r.endpoint == "analytics"), key=lambda r: r.query["fields"]
    )
    assert len(analytics) == 3
    now = datetime.now(UTC)
    midnight = int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
    first = analytics[0].query["fields"]
    assert first.startswith(f"analytics.start({midnight}).end(")
    assert first.endswith('.granularity(DAY).phone_numbers(["15550000001"])')


def test_configured_numbers_only_and_a_missing_one_is_a_counted_problem(sim, caplog):
    caplog.set_level(logging.WARNING)
    extra = '    phone_numbers: ["+1 555-000-0002", "+1 555 999 9999"]\n'
    with run_exporter(config(sim, extra)) as running:
        ready(running)
        series = running.scrape()
    assert {lab["number"] for lab, _ in values(series, "whatsapp_messaging_limit")} == {
        "15550000002"
    }
    problems = "whatsapp_answer_problems_total"
    assert value(series, problems, problem="number_not_listed") == 1
    assert value(series, problems, problem="unknown_messaging_limit") == 0
    assert {"account": "acme", "problem": "number_not_listed", "value": "15559999999"} in logged(
        caplog
    )
    # analytics asks exactly the configured numbers; the unlisted one answers zero messages
    asked = {r.query["fields"].rsplit("[", 1)[1] for r in sim.requests if r.endpoint == "analytics"}
    assert asked == {'"15550000002"])', '"15559999999"])'}


@pytest.mark.slow
def test_paging_follows_cursors_on_base_url_never_the_next_urls_host():
    with MetaSimulator(auto=False, call_budget=None, numbers=230, templates=150) as sim:
        with run_exporter(config(sim, "    rate_limit: 1000/m\n")) as running:
            ready(running)
            series = running.scrape()
        health = [r for r in sim.requests if r.endpoint == "health"]
        assert len(health) == 3  # 100 + 100 + 30
        assert (
            "after" not in health[0].query and health[1].query["after"] != health[2].query["after"]
        )
    assert len(values(series, "whatsapp_messaging_limit")) == 230
    assert len(values(series, "whatsapp_template_status")) == 150


def test_a_next_url_elsewhere_is_rebuilt_on_base_url_and_endless_paging_is_bad_response(sim):
    evil = {
        "data": [],
        "paging": {"cursors": {"after": "Y3Vyc29yOjA"}, "next": "http://127.0.0.1:9/steal?x=1"},
    }
    sim.fail("health", Fault.status(200, evil))
    with run_exporter(config(sim), strict=True) as running:
        ready(running)
        series = running.scrape()
    health = [r for r in sim.requests if r.endpoint == "health"]
    # asked twice on base_url with the cursor (the second answer is the real one), never :9
    assert len(health) == 2 and health[1].query["after"] == "Y3Vyc29yOjA"
    assert value(series, "whatsapp_exporter_up", endpoint="health") == 0
    assert (
        value(
            series, "whatsapp_exporter_poll_errors_total", endpoint="health", reason="bad_response"
        )
        == 1
    )


@pytest.mark.slow
def test_endless_distinct_pages_stop_at_the_cap_as_bad_response():
    with MetaSimulator(auto=False, call_budget=None, numbers=1001, templates=0) as sim:
        with run_exporter(config(sim, '    phone_numbers: ["+15550000001"]\n')) as running:
            ready(running)
            series = running.scrape()
        assert sum(r.endpoint == "health" for r in sim.requests) == meta.MAX_NUMBER_PAGES
    errors = "whatsapp_exporter_poll_errors_total"
    assert value(series, errors, endpoint="health", reason="bad_response") == 1
    assert value(series, "whatsapp_exporter_up", endpoint="analytics") == 1  # others go on


def test_templates_over_the_cap_are_counted_as_dropped(sim, caplog):
    with MetaSimulator(auto=False, call_budget=None, numbers=1, templates=1234) as many:
        with run_exporter(config(many)) as running:
            ready(running)
            series = running.scrape()
    assert len(values(series, "whatsapp_template_status")) == meta.MAX_TEMPLATES
    assert value(series, "whatsapp_templates_dropped_total") == 1234 - meta.MAX_TEMPLATES
    assert value(series, "whatsapp_exporter_up", endpoint="templates") == 1


def test_a_bsp_header_instead_of_a_token_and_a_base_url_without_a_version():
    with MetaSimulator(auto=False, call_budget=None, bsp_header="D360-API-KEY") as sim:
        assert sim.base_url == sim.url  # no version in a BSP's base_url
        auth = "headers: {D360-API-KEY: demo-token}"
        with run_exporter(config(sim, auth=auth)) as running:
            ready(running)
            series = running.scrape()
            shown = httpx.get(f"{running.url}/config").text
        assert all(r.headers["d360-api-key"] == "demo-token" for r in sim.requests)
        assert not any("authorization" in r.headers for r in sim.requests)
    assert value(series, "whatsapp_exporter_up", endpoint="health") == 1
    assert "demo-token" not in shown and "<secret>" in shown


def graph(code: int, subcode: int | None = None) -> dict:
    error = {"message": f"(#{code}) something", "type": "OAuthException", "code": code}
    return {"error": error | ({"error_subcode": subcode} if subcode else {})}


FAULTS = [
    (Fault.status(401), "auth"),  # code 190
    (Fault.status(400, graph(190, 463)), "auth"),
    (Fault.status(403, graph(10)), "auth"),
    (Fault.status(400, graph(200)), "auth"),
    (Fault.status(400, graph(4)), "rate_limited"),
    (Fault.status(400, graph(80007)), "rate_limited"),
    (Fault.status(403, graph(613)), "rate_limited"),
    (Fault.rate_limited(retry_after=1), "rate_limited"),
    (Fault.status(400, graph(100, 33)), "not_found"),
    (Fault.status(400, graph(100)), "provider_error"),
    (Fault.status(200, graph(1)), "provider_error"),
    (Fault.status(500, graph(1)), "http_5xx"),
    (Fault.status(503, graph(2)), "http_5xx"),
    (Fault.html_502(), "http_5xx"),
    (Fault.status(400, "<html>bad</html>"), "http_4xx"),
    (Fault.malformed_json(), "bad_response"),
    (Fault.wrong_shape(), "bad_response"),
    pytest.param(Fault.timeout(seconds=5), "timeout", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    ("fault", "reason"),
    FAULTS,
    ids=[
        p.values[1] + "-" + p.values[0].kind if hasattr(p, "values") else p[1] + "-" + p[0].kind
        for p in FAULTS
    ],
)
def test_graph_errors_are_judged_by_their_code_and_other_endpoints_go_on(sim, fault, reason):
    sim.fail("templates", fault)
    with run_exporter(config(sim), strict=True) as running:
        ready(running)
        series = running.scrape()
    errors = "whatsapp_exporter_poll_errors_total"
    assert value(series, "whatsapp_exporter_up", endpoint="templates") == 0
    assert value(series, errors, endpoint="templates", reason=reason) == 1
    assert sum(v for _, v in values(series, errors, endpoint="templates")) == 1
    assert value(series, "whatsapp_template_status", template="spring_sale") is None
    assert value(series, "whatsapp_exporter_up", endpoint="health") == 1
    assert value(series, "whatsapp_phone_number_quality", number="15550000001", quality="YELLOW")


def test_rate_limited_pauses_the_account_for_metas_estimate(sim):
    sim.rate_limit(minutes=7)
    with run_exporter(config(sim)) as running:
        ready(running)
        series = running.scrape()
        (poller,) = running.exporter.scheduler.pollers()
        _, paused = poller.api.budget.usage()
    errors = "whatsapp_exporter_poll_errors_total"
    assert value(series, errors, endpoint="health", reason="rate_limited") == 1
    # templates failed at once, without a request: the pause outlasts its deadline
    assert value(series, errors, endpoint="templates", reason="rate_limited") == 1
    assert 6.5 * 60 < paused <= 7 * 60  # estimated_time_to_regain_access: 7 minutes
    assert len(sim.requests) == 1  # nothing more was sent while paused


def test_usage_near_100_percent_pauses_before_meta_refuses():
    with MetaSimulator(auto=False, call_budget=3, numbers=1) as sim:
        with run_exporter(config(sim)) as running:
            (poller,) = running.exporter.scheduler.pollers()
            wait_for(lambda: poller.api.budget.usage()[1] > 0, 5, "the pause")
            _, paused = poller.api.budget.usage()
            series = running.scrape()
    # the third call took the usage to 100%: the account paused for Meta's 6-minute default
    assert [r.endpoint for r in sim.requests] == ["health", "templates", "analytics"]
    assert 5 * 60 < paused <= meta.PACE_PAUSE
    errors = values(series, "whatsapp_exporter_poll_errors_total", reason="rate_limited")
    assert sum(v for _, v in errors) == 0


def test_integer_limits_and_an_unlimited_tier():
    with MetaSimulator(auto=False, call_budget=None, limit_form="integer", numbers=1) as sim:
        sim.set_limit("TIER_2K")
        with run_exporter(config(sim)) as running:
            ready(running)
            assert value(running.scrape(), "whatsapp_messaging_limit") == 2000
        sim.set_limit("TIER_UNLIMITED")
        with run_exporter(config(sim)) as running:
            ready(running)
            text = running.metrics_text()
    assert (
        'whatsapp_messaging_limit{account="acme",number="15550000001",provider="meta"} +Inf' in text
    )


def test_secrets_stay_out_of_metrics_config_logs_and_the_landing_page(sim, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    secret = tmp_path / "app"
    secret.write_text("the-app-secret\n")
    extra = f"    app_secret_file: {secret}\n    verify_token: the-verify-token\n"
    sim.fail("templates", Fault.status(400, graph(100) | {"echo": "demo-token"}))
    with run_exporter(config(sim, extra)) as running:
        ready(running)
        shown = "".join(
            httpx.get(f"{running.url}{path}").text for path in ("/metrics", "/config", "/")
        )
        (poller,) = running.exporter.scheduler.pollers()
        account = poller.account
    assert account.app_secret.get_secret_value() == "the-app-secret"
    for secret_text in ("demo-token", "the-app-secret", "the-verify-token"):
        assert secret_text not in shown
        assert secret_text not in caplog.text + str(logged(caplog))


# --- config -------------------------------------------------------------------------------------

VALID = "meta:\n  - {account: a, token: t, %s}\n"

INVALID = [
    (
        'waba_id: "12a"',
        ["meta[0].waba_id: '12a' is not a WhatsApp Business Account id (digits only)"],
    ),
    (
        'phone_numbers: ["+1 555", "x"]',
        [
            "meta[0].phone_numbers[0]: '+1 555' is not a display phone number like +1 555 010 0100",
            "meta[0].phone_numbers[1]: 'x' is not a display phone number like +1 555 010 0100",
        ],
    ),
    (
        'phone_numbers: ["+15550000001", "+1 555 000 0001"]',
        ["meta[0].phone_numbers: lists a number twice"],
    ),
    (
        "token_file: /x",
        [
            "meta[0].token_file: cannot read /x: No such file or directory",
            "meta[0]: give either token or token_file, not both",
        ],
    ),
    (
        "app_secret: s, app_secret_file: /x",
        [
            "meta[0].app_secret_file: cannot read /x: No such file or directory",
            "meta[0]: give either app_secret or app_secret_file, not both",
        ],
    ),
    ('verify_token: " "', ["meta[0].verify_token: is empty"]),
    ('headers: {"bad header": x}', ["meta[0].headers: 'bad header' is not an HTTP header name"]),
    (
        "health: {interval: soon}",
        ["meta[0].health.interval: 'soon' is not a duration like 30s, 5m or 24h"],
    ),
    (
        "template: {interval: 5m}",
        [
            "meta[0].template: unknown key (allowed: "
            + ", ".join(sorted(meta.Account.model_fields))
            + ")"
        ],
    ),
]


@pytest.mark.parametrize(("keys", "errors"), INVALID, ids=[k.split(":")[0] for k, _ in INVALID])
def test_invalid_configs_say_every_error_with_its_path(keys, errors):
    if "waba_id" not in keys:
        keys += ', waba_id: "1"'
    with pytest.raises(ConfigError) as caught:
        parse_config(VALID % keys, ACCOUNT_MODELS)
    assert caught.value.errors == errors


def test_all_errors_at_once_and_no_auth_at_all():
    text = (
        'meta:\n  - {account: a, waba_id: "x", phone_numbers: [1], bogus: 1}\n'
        '  - {account: b, waba_id: "1"}\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, ACCOUNT_MODELS)
    assert caught.value.errors == [
        "meta[0].bogus: unknown key (allowed: "
        + ", ".join(sorted(meta.Account.model_fields))
        + ")",
        "meta[0].phone_numbers[0]: '1' is not a display phone number like +1 555 010 0100",
        "meta[0].waba_id: 'x' is not a WhatsApp Business Account id (digits only)",
        "meta[1]: give token or token_file, or headers with a BSP's own auth",
    ]


def test_defaults_and_numbers_kept_as_digits():
    account = parse_config(
        VALID % 'waba_id: 1, phone_numbers: ["+1 (555) 010-0100", 4915112345678]', ACCOUNT_MODELS
    ).meta[0]
    assert account.base_url == "https://graph.facebook.com/v25.0"
    assert account.phone_numbers == ["15550100100", "4915112345678"]
    endpoints = meta.endpoints(account, Defaults(interval=10), None)
    assert [(e.name, e.interval) for e in endpoints] == [
        ("health", 300),
        ("templates", 900),
        ("analytics", 900),
    ]
    every = account.model_copy(update={"interval": 120.0, "health": Schedule(interval=30.0)})
    assert [e.interval for e in meta.endpoints(every, Defaults(), None)] == [30, 120, 120]
    assert str(meta.PROVIDER.default_rate_limit) == "200/3600s"
    assert meta.headers(account) == {"Accept": "application/json", "Authorization": "Bearer t"}


def test_configured_headers_go_besides_the_token_and_replace_one_of_their_name():
    account = parse_config(
        VALID % 'waba_id: "1", headers: {D360-API-KEY: k, authorization: Bearer other}',
        ACCOUNT_MODELS,
    ).meta[0]
    assert meta.headers(account) == {
        "Accept": "application/json",
        "D360-API-KEY": "k",
        "authorization": "Bearer other",
    }


# --- the translation, without HTTP --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "limit"),
    [
        ("TIER_250", 250),
        ("TIER_2K", 2000),
        ("TIER_10K", 10000),
        ("TIER_100K", 100000),
        ("TIER_UNLIMITED", math.inf),
        ("UNLIMITED", math.inf),
        ("tier_1k", 1000),
        (2000, 2000),
        ("100000", 100000),
        (250.0, 250),
    ],
)
def test_messaging_limits_from_tiers_integers_and_numeric_strings(raw, limit):
    assert meta.messaging_limit(raw) == limit


@pytest.mark.parametrize("raw", ["TIER_3", "", "-5", 0, -1, True, math.nan, {"tier": 1}, [250]])
def test_other_limit_forms_are_refused(raw):
    with pytest.raises(ValueError):
        meta.messaging_limit(raw)


def number(**fields) -> meta._NumberAnswer:
    base = {"id": "1", "display_phone_number": "+1 555-000-0001"}
    return meta._NumberAnswer.model_validate(base | fields)


def test_an_unknown_limit_is_no_sample_and_a_counted_problem(caplog):
    tally = meta.Tally()
    numbers = meta.Numbers(
        (
            meta.phone_number(
                number(whatsapp_business_manager_messaging_limit="TIER_HUGE"), "1", "a", tally
            ),
            meta.phone_number(number(messaging_limit_tier="TIER_1K"), "2", "a", tally),
        ),
        tally.totals(),
    )
    families = {f.name: f for f in meta.health_families("", numbers)}
    limits = families["whatsapp_messaging_limit"].samples
    assert [(s.labels, s.value) for s in limits] == [((("number", "2"),), 1000.0)]
    problems = {s.labels: s.value for s in families["whatsapp_answer_problems"].samples}
    assert problems[(("problem", "unknown_messaging_limit"),)] == 1
    assert any(f.get("value") == "'TIER_HUGE'" for f in logged(caplog))


def states(family: Family) -> dict[str, float]:
    return {
        dict(s.labels).get("quality") or dict(s.labels)["status"]: s.value for s in family.samples
    }


def test_unknown_values_are_kept_bounded_and_safe_with_one_series_at_1():
    answer = number(
        quality_rating="PURPLE\n\x00" + "X" * 500,
        status="SUSPENDED",
        health_status={
            "can_send_message": "MAYBE",
            "entities": [
                {"entity_type": "PHONE_NUMBER", "can_send_message": "AVAILABLE"},
                {"entity_type": "PHONE_NUMBER", "can_send_message": "BLOCKED"},
                {"entity_type": "MESSAGE_TEMPLATE", "can_send_message": "BLOCKED"},
                {"entity_type": "SOMETHING_NEW", "can_send_message": "BLOCKED"},
            ],
        },
        verified_name="Acme\u2028\ud800 Support",
    )
    result = meta.phone_number(answer, "15550000001", "a", meta.Tally())
    assert result.quality == "PURPLE_" + "X" * 56 + "…"
    assert result.verified_name == "Acme Support"  # U+2028 and a lone surrogate: spaces
    assert result.entities == (("phone_number", "BLOCKED"),)  # the worse of the two
    families = {f.name: f for f in meta.health_families("", meta.Numbers((result,)))}
    quality = states(families["whatsapp_phone_number_quality"])
    assert quality == dict.fromkeys(meta.QUALITIES, 0.0) | {result.quality: 1.0}
    status = states(families["whatsapp_phone_number_status"])
    assert sum(status.values()) == 1 and status["SUSPENDED"] == 1 and len(status) == 12
    can = [dict(s.labels) | {"v": s.value} for s in families["whatsapp_can_send_message"].samples]
    assert {c["entity"] for c in can} == {"overall", "phone_number"}
    assert [c["status"] for c in can if c["v"] == 1] == ["MAYBE", "BLOCKED"]


def test_template_families_are_one_series_each():
    result = meta.Templates(
        (meta.Template("a", "en_US", "UTILITY", "PAUSED", "RED"),), dropped=3, pages=1
    )
    families = {f.name: f for f in meta.templates_families("", result)}
    assert [(dict(s.labels), s.value) for s in families["whatsapp_template_status"].samples] == [
        ({"template": "a", "language": "en_US", "category": "UTILITY", "status": "PAUSED"}, 1)
    ]
    assert families["whatsapp_templates_dropped"].samples[0].value == 3


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (0, 0)),
        ('{"1": [{"call_count": 95, "total_cputime": 5, "total_time": 7}]}', (95, 0)),
        (
            '{"1": [{"call_count": 10, "estimated_time_to_regain_access": 30}],'
            ' "2": [{"total_time": 99}]}',
            (99, 30),
        ),
        ('{"1": [{"call_count": "100"}]}', (0, 0)),
        ('{"1": {"call_count": 100}}', (0, 0)),
        ("[1, 2]", (0, 0)),
        ("not json", (0, 0)),
        ('{"1": [{"call_count": 1e999}]}', (0, 0)),
        ("[" * 100000, (0, 0)),
    ],
)
def test_the_usage_header_is_read_defensively(header, expected):
    assert meta.usage(header) == expected


def test_pause_honours_metas_estimate_and_paces_before_100_percent():
    usage = '{"1": [{"call_count": %d, "estimated_time_to_regain_access": %d}]}'
    rate_limited = graph(80007)
    assert meta.pause({}, None) == 0
    assert meta.pause({"x-business-use-case-usage": usage % (50, 0)}, None) == 0
    assert meta.pause({"x-business-use-case-usage": usage % (92, 0)}, None) == meta.PACE_PAUSE
    assert meta.pause({"x-business-use-case-usage": usage % (100, 12)}, None) == 720
    assert meta.pause({}, rate_limited) == meta.RATE_LIMITED_PAUSE
    assert meta.pause({"x-business-use-case-usage": usage % (100, 3)}, rate_limited) == 180


def test_error_reasons_by_code():
    assert [meta.error_reason(graph(c)) for c in (190, 10, 200, 299, 4, 17, 32, 613, 80007)] == [
        "auth",
    ] * 4 + ["rate_limited"] * 5
    assert meta.error_reason(graph(100, 33)) == "not_found"
    assert [meta.error_reason(b) for b in (graph(100), graph(1), graph(131000), {}, [], None)] == [
        None
    ] * 6
    assert meta.error_reason({"error": {"code": "190"}}) == "auth"
    assert meta.provider_error(graph(100, 33)) == "code 100/33: (#100) something"
    assert meta.provider_error({"error": "x"}) is None


def test_next_cursor_takes_the_cursor_and_never_the_url():
    paging = meta._Paging.model_validate
    assert meta.next_cursor(None) is None
    assert meta.next_cursor(paging({"cursors": {"after": "A"}})) is None  # no next: the last page
    assert meta.next_cursor(paging({"cursors": {"after": "A"}, "next": "https://evil/x"})) == "A"
    assert meta.next_cursor(paging({"next": "https://evil/x?after=B&access_token=t"})) == "B"
    with pytest.raises(PollError):
        meta.next_cursor(paging({"next": "https://evil/x"}))


def test_analytics_asks_today_utc_for_one_number():
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert meta.analytics_field("15550000001", now) == (
        "analytics.start(1772582400).end(1772600767).granularity(DAY)"
        '.phone_numbers(["15550000001"])'
    )
    midnight = datetime(2026, 3, 4, tzinfo=UTC)
    assert ".end(1772582401)." in meta.analytics_field("1", midnight)


def test_the_example_headers_of_a_usage_answer_parse():
    header = json.dumps({WABA: [{"type": "whatsapp_bsp", "call_count": 91}]})
    assert meta.usage(header) == (91, 0)


# --- hostile answers ----------------------------------------------------------------------------

HOSTILE = [
    ({"data": [{"id": "1", "display_phone_number": 15550000001}]}, "health"),
    ({"data": [{"id": "1", "display_phone_number": "+1", "quality_rating": 5}]}, "health"),
    ({"data": [{"id": "1", "display_phone_number": "+1", "health_status": []}]}, "health"),
    ({"data": "everything"}, "health"),
    ({"data": [], "paging": {"next": "x", "cursors": []}}, "health"),
    ({"data": [{"name": ["x"], "language": "en", "status": "APPROVED"}]}, "templates"),
    ({"data": [], "summary": {"total_count": -1}}, "templates"),
    ({"analytics": {"data_points": [{"start": 1, "end": 2, "sent": -5}]}}, "analytics"),
    ({"analytics": {"data_points": [{"start": 1, "end": 2, "sent": "12"}]}}, "analytics"),
    ({"analytics": {"data_points": [{"start": 1, "end": 2, "sent": True}]}}, "analytics"),
    ({"id": WABA}, "analytics"),
]


@pytest.mark.parametrize(("body", "endpoint"), HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_answers_of_the_wrong_shape_are_bad_response_and_cost_only_their_target(
    sim, body, endpoint
):
    sim.fail(endpoint, Fault.status(200, body))
    with run_exporter(config(sim), strict=True) as running:
        ready(running)
        series = running.scrape()
    errors = "whatsapp_exporter_poll_errors_total"
    assert sum(v for _, v in values(series, errors, endpoint=endpoint, reason="bad_response")) >= 1
    for other in {"health", "templates"} - {endpoint}:
        assert value(series, "whatsapp_exporter_up", endpoint=other) == 1


def test_control_characters_and_exposition_syntax_in_a_template_name_cost_nothing(sim):
    name = "promo\x00\x1b[31m\n" + "é" * 300 + '"} 1\nfake_metric 2'
    sim.add_template(name, "en_US\t", "MARKETING", status="PAUSED\r\n", quality="RED")
    with run_exporter(config(sim), strict=True) as running:
        ready(running)
        text = running.metrics_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "fake_metric" not in names
    series = parse_exposition(text)
    paused = values(series, "whatsapp_template_status", status="PAUSED")
    (hostile,) = [lab for lab, _ in paused if lab["template"].startswith("promo")]
    assert hostile["template"].startswith("promo [31m éé") and len(hostile["template"]) == 256
    assert hostile["language"] == "en_US"
    assert value(series, "whatsapp_exporter_up", endpoint="templates") == 1


def test_a_hostile_template_name_is_made_safe():
    name = "promo\x00\x1b[31m\n" + "é" * 300 + '"} 1\nfake_metric 2'
    page = meta._TemplatesPage.model_validate(
        {"data": [{"name": name, "language": "en_US\t", "status": "PAUSED\r\n"}]}
    )
    template = page.data[0]
    assert meta.clean(template.name).startswith("promo [31m ééé")
    assert len(meta.clean(template.name)) == 256 and meta.clean(template.name).isprintable()
    assert meta.state(template.status) == "PAUSED"
    assert meta.clean(template.language, 32) == "en_US"
    families = meta.templates_families(
        "", meta.Templates((meta.Template(meta.clean(name), "en_US", "", "PAUSED", "RED"),))
    )
    text = render_plain(families)
    parsed = {f.name for f in text_string_to_metric_families(text)}
    assert {"whatsapp_template_status", "whatsapp_template_quality"} <= parsed
    assert "fake_metric" not in parsed


def render_plain(families: list[Family]) -> str:
    snapshot = new_snapshot()
    snapshot.configure(3, [("meta", "a", "templates")])
    snapshot.succeeded(TargetKey("meta", "a", "templates", ""), 900, families, 0.1)
    snapshot.publish()
    return snapshot.exposition.plain.decode()


# --- the simulator ------------------------------------------------------------------------------


def graph_get(sim: MetaSimulator, path: str, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {sim.token}"}
    return httpx.get(f"{sim.base_url}{path}", params=params, headers=headers, timeout=5)


def test_the_simulator_selects_fields_and_pages_with_cursors():
    with MetaSimulator(auto=False, call_budget=None, numbers=5) as sim:
        first = graph_get(sim, f"/{WABA}/phone_numbers", fields="id,quality_rating", limit="2")
        body = first.json()
        assert [set(n) for n in body["data"]] == [{"id", "quality_rating"}] * 2
        assert body["paging"]["next"].startswith(sim.base_url)
        after = body["paging"]["cursors"]["after"]
        rest = graph_get(sim, f"/{WABA}/phone_numbers", limit="10", after=after).json()
        assert len(rest["data"]) == 3 and "next" not in rest["paging"]
        bad = graph_get(sim, f"/{WABA}/phone_numbers", after="nonsense")
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, 100)
        unknown = graph_get(sim, "/999")
        assert unknown.json()["error"]["error_subcode"] == 33
        assert graph_get(sim, "/x/y").json()["error"]["code"] == 2500


def test_the_simulators_usage_header_rises_and_its_limit_answers_80007():
    with MetaSimulator(auto=False, call_budget=4, numbers=1) as sim:
        used = []
        for _ in range(4):
            answer = graph_get(sim, f"/{WABA}/phone_numbers")
            usage = json.loads(answer.headers["x-business-use-case-usage"])[WABA][0]
            used.append(usage["call_count"])
        assert used == [25, 50, 75, 100]
        refused = graph_get(sim, f"/{WABA}/phone_numbers")
        usage = json.loads(refused.headers["x-business-use-case-usage"])[WABA][0]
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, 80007)
        assert usage["estimated_time_to_regain_access"] == 60


def test_the_simulator_as_a_bsp_wants_its_header_not_a_bearer_token():
    with MetaSimulator(auto=False, call_budget=None, bsp_header="D360-API-KEY") as sim:
        bearer = graph_get(sim, f"/{WABA}/phone_numbers")
        assert bearer.status_code == 401 and bearer.json()["error"]["code"] == 190
        keyed = httpx.get(
            f"{sim.base_url}/{WABA}/phone_numbers", headers={"D360-API-KEY": sim.token}
        )
        assert keyed.status_code == 200 and len(keyed.json()["data"]) == 3


def test_the_simulator_changes_quality_limits_and_templates_over_time():
    with MetaSimulator(auto=False, call_budget=None, seed=3) as sim:
        sim.P_QUALITY = sim.P_LIMIT = sim.P_TEMPLATE = 1.0
        before = (sim.state()["limit"], [n["quality_rating"] for n in sim.state()["numbers"]])
        statuses = set()
        for _ in range(20):
            sim.tick()
            statuses |= {t["status"] for t in sim.state()["templates"]}
        after = (sim.state()["limit"], [n["quality_rating"] for n in sim.state()["numbers"]])
        assert before != after
        assert statuses == {"APPROVED", "PAUSED"}
        assert sum(sim.number(n).sent.get(meta_today(), 0) for n in sim.numbers) > 0


def test_the_simulators_control_routes_change_its_state():
    with MetaSimulator(auto=False, call_budget=None) as sim:
        control = f"{sim.url}/_sim"
        assert (
            httpx.post(f"{control}/numbers/15550000001", json={"quality": "RED"}).status_code == 200
        )
        assert httpx.post(f"{control}/numbers/15550009999", json={}).status_code == 201
        assert httpx.post(f"{control}/limit", json={"limit": "TIER_250"}).status_code == 200
        assert httpx.post(f"{control}/limit", json={"limit": "TIER_3"}).status_code == 400
        paused = {"name": "spring_sale", "status": "PAUSED"}
        assert httpx.post(f"{control}/templates", json=paused).status_code == 200
        assert httpx.post(f"{control}/rate_limit", json={"minutes": 1}).status_code == 200
        assert graph_get(sim, f"/{WABA}/phone_numbers").json()["error"]["code"] == 80007
        state = sim.state()
    assert state["limit"] == "TIER_250" and len(state["numbers"]) == 4
    assert state["numbers"][0]["quality_rating"] == "RED"
    assert sim.template("spring_sale").status == "PAUSED"


def meta_today() -> str:
    return datetime.now(UTC).date().isoformat()


@pytest.mark.parametrize(("interval", "warned"), [("1m", True), ("15m", False)])
def test_intervals_that_need_more_than_metas_budget_are_named_in_the_log(
    sim, caplog, interval, warned
):
    caplog.set_level(logging.WARNING, logger="exporter.scheduler")
    with run_exporter(config(sim, f"    interval: {interval}\n")) as running:
        ready(running)
    found = [r.fields for r in caplog.records if "rate_limit allows" in r.getMessage()]
    # health, templates and three numbers' analytics: 5 a minute is 300 an hour
    expected = [
        {"provider": "meta", "account": "acme", "needed": "300/3600s", "rate_limit": "200/3600s"}
    ]
    assert found == (expected if warned else [])
