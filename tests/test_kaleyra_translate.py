"""Kaleyra without HTTP: answers unwrapped, client stats translated, errors and config read."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import pytest

from exporter.config import ConfigError, Defaults, parse_config
from exporter.metrics import Family, Sample
from exporter.providers.base import POLLED, PollError
from exporter.providers.kaleyra import (
    PROVIDER,
    Account,
    MonitorStats,
    endpoints,
    headers,
    monitor_stats,
    provider_error,
    translate,
)

N = "+12025550100"

# The seed page's success answer (it breaks off after three entries; closed here as they began).
SEED = """
{"RESPONSE":{
"code":"WS201",
"message":"Requested processed successfully",
"error":{
},
"data":{
"stats":{
"app":{
"callback_queue_size":{
"data":[
{
"value":0
}
],
"help":"Current callback queue size",
"type":"gauge"
},
"callback_requests_duration_ms_count":{
"data":[
{
"labels":{
"result":"success",
"type":"inbound_message"
},
"value":4353
},
{
"labels":{
"result":"99",
"type":"status_change"
},
"value":359
},
{
"labels":{
"result":"success",
"type":"status_change"
},
"value":545780
}
]}}}}}}
"""

SEED_FAMILIES = [
    Family(
        "whatsapp_client_app_callback_queue_size",
        "gauge",
        "Current callback queue size (client stat app.callback_queue_size). " + POLLED,
        (Sample((("number", N),), 0.0),),
    ),
    Family(
        "whatsapp_client_app_callback_requests_duration_ms_count",
        "untyped",
        "WhatsApp Business API client stat app.callback_requests_duration_ms_count. " + POLLED,
        (
            Sample((("number", N), ("result", "success"), ("type", "inbound_message")), 4353.0),
            Sample((("number", N), ("result", "99"), ("type", "status_change")), 359.0),
            Sample((("number", N), ("result", "success"), ("type", "status_change")), 545780.0),
        ),
    ),
]


def s(value: float, suffix: str = "", /, **labels: str) -> Sample:
    """A sample of number N; further labels in the order given."""
    return Sample((("number", N), *labels.items()), float(value), suffix)


def stat(
    *entries: tuple[dict[str, Any] | None, Any], type_: str | None = "gauge", help_: str = ""
) -> dict[str, Any]:
    """A source family as the client sends it; `None` labels leaves the key out."""
    data = [
        {"value": v} if labels is None else {"labels": labels, "value": v} for labels, v in entries
    ]
    out: dict[str, Any] = {"data": data}
    if type_ is not None:
        out["type"] = type_
    if help_:
        out["help"] = help_
    return out


def plain_help(path: str, note: str = "") -> str:
    return f"WhatsApp Business API client stat {path}{note}. {POLLED}"


def run(stats: dict[str, Any]) -> list[Family]:
    return translate(N, monitor_stats({"data": {"stats": stats}}))


# --- translate: the table -------------------------------------------------------------------

TABLE = [
    pytest.param(
        {
            "app": {"pending_messages": stat((None, 7), help_="Messages waiting")},
            "db": {
                "db_pending_messages": stat((None, 3)),
                "db_messages": stat(({"type": "inbound"}, 10), ({"type": "outbound"}, 12)),
                "message_receipts": stat((None, 4), type_="counter"),
            },
        },
        [
            Family(
                "whatsapp_client_app_pending_messages",
                "gauge",
                "Messages waiting (client stat app.pending_messages). " + POLLED,
                (s(7),),
            ),
            Family(
                "whatsapp_client_db_message_receipts",
                "counter",
                plain_help("db.message_receipts"),
                (s(4, "_total"),),
            ),
            Family(
                "whatsapp_client_db_messages",
                "gauge",
                plain_help("db.db_messages"),
                (s(10, type="inbound"), s(12, type="outbound")),
            ),
            Family(
                "whatsapp_client_db_pending_messages",
                "gauge",
                plain_help("db.db_pending_messages"),
                (s(3),),
            ),
        ],
        id="app-and-db-sections",
    ),
    pytest.param(
        {
            "db": {
                "host1:4f2a": {
                    "db_pending_messages": stat((None, 3)),
                    "db_messages": stat(({"type": "inbound"}, 10)),
                },
                "host2:9c1d": {},
                "host3:77aa": {"db_pending_messages": stat((None, 5))},
            },
            "app": {"pending_callbacks": stat((None, 1))},
        },
        [
            Family(
                "whatsapp_client_app_pending_callbacks",
                "gauge",
                plain_help("app.pending_callbacks"),
                (s(1),),
            ),
            Family(
                "whatsapp_client_db_messages",
                "gauge",
                plain_help("db.db_messages"),
                (s(10, node="host1:4f2a", type="inbound"),),
            ),
            Family(
                "whatsapp_client_db_pending_messages",
                "gauge",
                plain_help("db.db_pending_messages"),
                (s(3, node="host1:4f2a"), s(5, node="host3:77aa")),
            ),
        ],
        id="per-node-nesting-with-empty-nodes",
    ),
    pytest.param(
        {"db": {"host1:4f2a": {}, "host2:9c1d": {}}},
        [],
        id="only-empty-nodes",
    ),
    pytest.param(
        {
            "app": {
                "in_messages_pending_processing": {
                    "data": [
                        {"value": 1},
                        {"labels": None, "value": 2},
                        {"labels": {}, "value": 3},
                    ],
                    "type": "gauge",
                }
            }
        },
        [
            Family(
                "whatsapp_client_app_in_messages_pending_processing",
                "gauge",
                plain_help("app.in_messages_pending_processing"),
                (s(1),),
            )
        ],
        id="labels-missing-null-or-empty-are-one-label-set",
    ),
    pytest.param(
        {
            "app": {
                "endpoint_requests": stat(
                    (
                        {
                            "number": "+441234567",
                            "node": "n1",
                            "provider": "meta",
                            "account": "acme",
                            "quantile": "x",
                            "le": "y",
                            "method": "GET",
                        },
                        9,
                    ),
                    type_="counter",
                )
            }
        },
        [
            Family(
                "whatsapp_client_app_endpoint_requests",
                "counter",
                plain_help("app.endpoint_requests"),
                (
                    s(
                        9,
                        "_total",
                        exported_number="+441234567",
                        exported_node="n1",
                        exported_provider="meta",
                        exported_account="acme",
                        exported_quantile="x",
                        exported_le="y",
                        method="GET",
                    ),
                ),
            )
        ],
        id="clashing-label-names-are-exported",
    ),
    pytest.param(
        {
            "app": {
                "media.uploads-v2": stat(
                    (
                        {
                            "http-method": "POST",
                            "1st": 1,
                            "__name__": "x",
                            "-_x": 2.5,
                            "a.b": True,
                            "ünit": None,
                            "": "empty",
                        },
                        1,
                    )
                )
            },
            "my-section": {"queue": stat((None, 2))},
        },
        [
            Family(
                "whatsapp_client_app_media_uploads_v2",
                "gauge",
                plain_help("app.media.uploads-v2"),
                (
                    Sample(
                        (
                            ("number", N),
                            ("http_method", "POST"),
                            ("_1st", "1"),
                            ("exported__name__", "x"),
                            ("exported__x", "2.5"),
                            ("a_b", "True"),
                            ("_nit", ""),
                            ("_", "empty"),
                        ),
                        1.0,
                    ),
                ),
            ),
            Family(
                "whatsapp_client_my_section_queue",
                "gauge",
                plain_help("my-section.queue"),
                (s(2),),
            ),
        ],
        id="invalid-characters-in-names-and-labels",
    ),
    pytest.param(
        {"app": {"x": stat(({"a-b": "1", "a_b": "2", "c": "3"}, 1))}},
        [Family("whatsapp_client_app_x", "gauge", plain_help("app.x"), (s(1, a_b="1", c="3"),))],
        id="label-names-alike-after-sanitising-keep-the-first",
    ),
    pytest.param(
        {
            "app": {
                "callback_requests_duration_ms_count": stat(
                    ({"result": "success", "type": "inbound_message"}, 4353),
                    ({"result": "99", "type": "status_change"}, 359),
                    ({"result": "only_count", "type": "status_change"}, 1),
                    type_="counter",
                    help_="Callback request durations",
                ),
                "callback_requests_duration_ms_sum": stat(
                    ({"type": "inbound_message", "result": "success"}, 8706),
                    ({"result": "99", "type": "status_change"}, 1077),
                    ({"result": "only_sum", "type": "status_change"}, 5),
                    type_="counter",
                ),
                "db_request_duration_us_sum": stat(({"db": "main"}, 2_500_000), type_="untyped"),
                "db_request_duration_us_count": stat(({"db": "main"}, 10), type_=None),
            }
        },
        [
            Family(
                "whatsapp_client_app_callback_requests_duration_seconds",
                "summary",
                "Callback request durations (client stats app.callback_requests_duration_ms_count"
                " and app.callback_requests_duration_ms_sum, the sum converted from milliseconds"
                " to seconds). " + POLLED,
                (
                    s(4353, "_count", result="success", type="inbound_message"),
                    s(8.706, "_sum", result="success", type="inbound_message"),
                    s(359, "_count", result="99", type="status_change"),
                    s(1.077, "_sum", result="99", type="status_change"),
                ),
            ),
            Family(
                "whatsapp_client_app_db_request_duration_seconds",
                "summary",
                "WhatsApp Business API client stats app.db_request_duration_us_count and"
                " app.db_request_duration_us_sum, the sum converted from microseconds to seconds. "
                + POLLED,
                (s(10, "_count", db="main"), s(2.5, "_sum", db="main")),
            ),
        ],
        id="count-and-sum-pairs-become-summaries-in-seconds",
    ),
    pytest.param(
        {
            "app": {
                "x_count": stat((None, 3), type_="counter"),
                "x_sum": stat((None, 6), type_="counter"),
                "out_message_sent_duration_ms_count": stat((None, 5), type_="counter"),
                "media_download_bytes_sum": stat((None, 700), type_="gauge"),
            }
        },
        [
            Family(
                "whatsapp_client_app_media_download_bytes_sum",
                "gauge",
                plain_help("app.media_download_bytes_sum"),
                (s(700),),
            ),
            Family(
                "whatsapp_client_app_out_message_sent_duration_ms_count",
                "counter",
                plain_help("app.out_message_sent_duration_ms_count"),
                (s(5, "_total"),),
            ),
            Family(
                "whatsapp_client_app_x",
                "summary",
                "WhatsApp Business API client stats app.x_count and app.x_sum. " + POLLED,
                (s(3, "_count"), s(6, "_sum")),
            ),
        ],
        id="lone-count-or-sum-stays-as-it-is-without-units",
    ),
    pytest.param(
        {
            "app": {
                "a": stat((None, 1), type_="histogram"),
                "b": stat((None, 2), type_=None),
                "c": stat((None, 3), type_="summary"),
                "d": {"data": [{"value": 4}], "type": 5},
                "e": stat((None, 5), type_=" Gauge "),
                "f_ms": stat((None, 6), type_="untyped"),
            }
        },
        [
            Family("whatsapp_client_app_a", "untyped", plain_help("app.a"), (s(1),)),
            Family("whatsapp_client_app_b", "untyped", plain_help("app.b"), (s(2),)),
            Family("whatsapp_client_app_c", "untyped", plain_help("app.c"), (s(3),)),
            Family("whatsapp_client_app_d", "untyped", plain_help("app.d"), (s(4),)),
            Family("whatsapp_client_app_e", "gauge", plain_help("app.e"), (s(5),)),
            Family("whatsapp_client_app_f_ms", "untyped", plain_help("app.f_ms"), (s(6),)),
        ],
        id="other-or-missing-types-are-untyped",
    ),
    pytest.param(
        {
            "app": {
                "media_uploads_total": stat(({"type": "image"}, 4), type_="counter"),
                "media_downloads": stat(({"type": "image"}, 5), type_="counter"),
                "in_message_decoded": stat((None, 6), type_="COUNTER"),
                "queue_total": stat((None, 7), type_="gauge"),
            }
        },
        [
            Family(
                "whatsapp_client_app_in_message_decoded",
                "counter",
                plain_help("app.in_message_decoded"),
                (s(6, "_total"),),
            ),
            Family(
                "whatsapp_client_app_media_downloads",
                "counter",
                plain_help("app.media_downloads"),
                (s(5, "_total", type="image"),),
            ),
            Family(
                "whatsapp_client_app_media_uploads",
                "counter",
                plain_help("app.media_uploads_total"),
                (s(4, "_total", type="image"),),
            ),
            Family(
                "whatsapp_client_app_queue_total", "gauge", plain_help("app.queue_total"), (s(7),)
            ),
        ],
        id="counters-with-and-without-total",
    ),
    pytest.param(
        {
            "app": {
                "lag_ms": stat((None, 250), type_="gauge"),
                "busy_us_total": stat((None, 3_000_000), type_="counter"),
                "ms": stat((None, 1), type_="gauge"),
                "wait_msec": stat((None, 2), type_="gauge"),
            }
        },
        [
            Family(
                "whatsapp_client_app_busy_seconds",
                "counter",
                plain_help("app.busy_us_total", ", converted from microseconds to seconds"),
                (s(3, "_total"),),
            ),
            Family(
                "whatsapp_client_app_lag_seconds",
                "gauge",
                plain_help("app.lag_ms", ", converted from milliseconds to seconds"),
                (s(0.25),),
            ),
            Family("whatsapp_client_app_ms", "gauge", plain_help("app.ms"), (s(1),)),
            Family("whatsapp_client_app_wait_msec", "gauge", plain_help("app.wait_msec"), (s(2),)),
        ],
        id="gauges-and-counters-in-ms-or-us-become-seconds",
    ),
    pytest.param(
        {
            "app": {
                "queue": stat(({"q": "a"}, 1), ({"q": "b"}, 2), help_="First"),
                "app_queue": stat(({"q": "b"}, 20), ({"q": "c"}, 30), help_="Second"),
            },
        },
        [
            Family(
                "whatsapp_client_app_queue",
                "gauge",
                "First (client stat app.queue). " + POLLED,
                (s(1, q="a"), s(2, q="b"), s(30, q="c")),
            )
        ],
        id="same-name-and-type-merge-keeping-the-first-label-set",
    ),
    pytest.param(
        {
            "app": {
                "queue": stat((None, 1), type_="gauge"),
                "app_queue": stat((None, 2), type_="counter"),
                "app_queue_count": stat((None, 3), type_="counter"),
                "app_queue_sum": stat((None, 4), type_="counter"),
            },
            "db": {
                "n1": {"db_rows": stat((None, 5), type_="gauge")},
                "n2": {"db_rows": stat((None, 6), type_="counter")},
            },
        },
        [
            Family("whatsapp_client_app_queue", "gauge", plain_help("app.queue"), (s(1),)),
            Family(
                "whatsapp_client_db_rows", "gauge", plain_help("db.db_rows"), (s(5, node="n1"),)
            ),
        ],
        id="type-conflicts-keep-the-first",
    ),
    pytest.param(
        {
            "app": {
                "sent": stat((None, 1), type_="counter"),
                "sent_total": stat((None, 2), type_="gauge"),
            },
            "db": {
                "n1": {"t_count": stat((None, 3)), "t_sum": stat((None, 4))},
                "n2": {"t_count": stat((None, 5), type_="gauge")},
            },
        },
        [
            Family(
                "whatsapp_client_app_sent", "counter", plain_help("app.sent"), (s(1, "_total"),)
            ),
            Family(
                "whatsapp_client_db_t",
                "summary",
                "WhatsApp Business API client stats db.t_count and db.t_sum. " + POLLED,
                (s(3, "_count", node="n1"), s(4, "_sum", node="n1")),
            ),
        ],
        id="families-whose-samples-would-clash-keep-the-first",
    ),
    pytest.param(
        {
            "app": {
                "not_a_mapping": [1, 2],
                "no_data": {"type": "gauge"},
                "data_a_mapping": {"data": {"value": 1}},
                "data_a_string": {"data": "1"},
                "entry_not_a_mapping": {"data": [5]},
                "entry_without_value": {"data": [{"value": 1}, {"labels": {"a": "b"}}]},
                "value_a_bool": {"data": [{"value": True}]},
                "value_not_a_number": {"data": [{"value": "many"}]},
                "value_null": {"data": [{"value": None}]},
                "value_too_big": {"data": [{"value": 10**400}]},
                "labels_a_list": {"data": [{"labels": ["a"], "value": 1}]},
                "label_value_a_mapping": {"data": [{"labels": {"a": {"b": 1}}, "value": 1}]},
                "value_a_numeric_string": {"data": [{"value": "12.5"}], "type": "gauge"},
                "empty_data": {"data": [], "type": "gauge"},
                "good": stat((None, 1)),
            },
            "web": [1, 2],
            "version": "2.41.3",
        },
        [
            Family("whatsapp_client_app_good", "gauge", plain_help("app.good"), (s(1),)),
            Family(
                "whatsapp_client_app_value_a_numeric_string",
                "gauge",
                plain_help("app.value_a_numeric_string"),
                (s(12.5),),
            ),
        ],
        id="families-of-other-shapes-are-skipped",
    ),
    pytest.param(
        {
            "app": {
                "a": stat((None, 1), help_="Pending  callbacks,\n  total."),
                "b": {"data": [{"value": 2}], "help": 42, "type": "gauge"},
                "c": stat((None, 3), help_="   "),
            }
        },
        [
            Family(
                "whatsapp_client_app_a",
                "gauge",
                "Pending callbacks, total (client stat app.a). " + POLLED,
                (s(1),),
            ),
            Family("whatsapp_client_app_b", "gauge", plain_help("app.b"), (s(2),)),
            Family("whatsapp_client_app_c", "gauge", plain_help("app.c"), (s(3),)),
        ],
        id="help-text-kept-on-one-line-with-the-original-name",
    ),
    pytest.param(
        {
            "app": {
                "callback_requests": stat(
                    ({"result": "success", "type": "inbound_message"}, 4353),
                    type_="counter",
                    help_="Callback requests",
                )
            }
        },
        [
            Family(
                "whatsapp_client_app_callback_requests",
                "counter",
                "Callback requests (client stat app.callback_requests). " + POLLED,
                (s(4353, "_total", result="success", type="inbound_message"),),
            )
        ],
        id="old-client-version",
    ),
    pytest.param(
        {
            "app": {
                "callback_requests_duration_ms_count": stat(
                    ({"result": "success", "type": "inbound_message"}, 4353),
                    type_="counter",
                    help_="Callback requests",
                ),
                "callback_requests_duration_ms_sum": stat(
                    ({"result": "success", "type": "inbound_message"}, 130590),
                    type_="counter",
                    help_="Callback requests time",
                ),
            }
        },
        [
            Family(
                "whatsapp_client_app_callback_requests_duration_seconds",
                "summary",
                "Callback requests (client stats app.callback_requests_duration_ms_count and"
                " app.callback_requests_duration_ms_sum, the sum converted from milliseconds to"
                " seconds). " + POLLED,
                (
                    s(4353, "_count", result="success", type="inbound_message"),
                    s(130.59, "_sum", result="success", type="inbound_message"),
                ),
            )
        ],
        id="new-client-version",
    ),
]


@pytest.mark.parametrize(("stats", "expected"), TABLE)
def test_translate(stats: dict[str, Any], expected: list[Family]) -> None:
    assert run(stats) == expected


@pytest.mark.parametrize("wrapped", [True, False], ids=["RESPONSE-wrapper", "no-wrapper"])
def test_the_seed_answer(wrapped: bool) -> None:
    body = json.loads(SEED)
    if not wrapped:
        body = body["RESPONSE"]
    assert translate(N, monitor_stats(body)) == SEED_FAMILIES


def test_non_finite_values_pass() -> None:
    stats = {"app": {"a": stat((None, "NaN")), "b_ms": stat((None, float("inf")))}}
    a, b = run(stats)
    assert (a.name, b.name) == ("whatsapp_client_app_a", "whatsapp_client_app_b_seconds")
    assert math.isnan(a.samples[0].value)
    assert b.samples[0].value == math.inf


def test_a_type_conflict_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    stats = {"app": {"warned": stat((None, 1)), "app_warned": stat((None, 2), type_="counter")}}
    warned: set[str] = set()  # one account's: it warns once per name, however often polled
    with caplog.at_level(logging.WARNING, logger="exporter.providers.kaleyra"):
        for _ in range(2):
            translate(N, monitor_stats({"data": {"stats": stats}}), warned)
    assert [r.fields for r in caplog.records] == [
        {
            "metric": "whatsapp_client_app_warned",
            "type": "counter",
            "first": "whatsapp_client_app_warned",
            "first_type": "gauge",
        }
    ]


def test_output_is_sorted_and_keeps_source_order_of_samples() -> None:
    stats = {
        "app": {
            "zeta": stat(({"k": "3"}, 3), ({"k": "1"}, 1), ({"k": "2"}, 2)),
            "alpha": stat((None, 0)),
        }
    }
    alpha, zeta = run(stats)
    assert alpha.name == "whatsapp_client_app_alpha"
    assert [dict(x.labels)["k"] for x in zeta.samples] == ["3", "1", "2"]


# --- unwrapping the answer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "(top level): expected an object, got a list"),
        (None, "(top level): expected an object, got null"),
        ({"RESPONSE": 5}, "RESPONSE: expected an object, got a number"),
        ({"code": "WS201"}, "(top level): no 'data'"),
        ({"data": []}, "data: expected an object, got a list"),
        ({"RESPONSE": {"data": {}}}, "RESPONSE.data: no 'stats'"),
        (
            {"RESPONSE": {"data": {"stats": "x"}}},
            "RESPONSE.data.stats: expected an object, got a string",
        ),
        ({"data": {"stats": None}}, "data.stats: expected an object, got null"),
    ],
)
def test_answers_without_stats_are_bad_responses(body: Any, message: str) -> None:
    with pytest.raises(PollError) as caught:
        monitor_stats(body)
    assert (caught.value.reason, caught.value.detail) == (
        "bad_response",
        f"monitor stats: {message}",
    )


def test_the_result_is_a_read_only_view_never_a_deep_copy() -> None:
    """Freezing the answer deeply cost a fifth of the exporter's CPU at 1,000 numbers; it is read
    once by translate and dropped, so the result is a read-only view of it, not a copy."""
    body = json.loads(SEED)
    result = monitor_stats(body)
    assert isinstance(result, MonitorStats)
    with pytest.raises(TypeError):
        result.stats["app"] = {}
    assert result.stats["app"] is body["RESPONSE"]["data"]["stats"]["app"]


# --- provider errors ------------------------------------------------------------------------

WS406 = {
    "code": "WS406",
    "message": "The accept header mismatches the supported server response!",
    "error": {},
    "data": [],
}
WS500 = {"code": "WS500", "message": "somthing went wrong !!!", "error": {}, "data": []}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (WS406, "WS406: The accept header mismatches the supported server response!"),
        ({"RESPONSE": WS406}, "WS406: The accept header mismatches the supported server response!"),
        (WS500, "WS500: somthing went wrong !!!"),
        ({"RESPONSE": WS500}, "WS500: somthing went wrong !!!"),
        ({"code": "ws406", "message": "lower case"}, "ws406: lower case"),
        ({"code": "WS999"}, "WS999"),
        ({"code": "WS500", "message": ["x"]}, "WS500"),
        ({"code": "WS500", "message": "two\n  lines"}, "WS500: two lines"),
        (json.loads(SEED), None),
        (json.loads(SEED)["RESPONSE"], None),
        ({"code": "WS200"}, None),
        ({"code": 406, "message": "x"}, None),
        ({"code": "E406", "message": "x"}, None),
        ({"RESPONSE": [WS406]}, None),
        ([WS406], None),
        ([], None),
        (406, None),
        (1.5, None),
        ("WS406", None),
        (True, None),
        (None, None),
        ({}, None),
    ],
)
def test_provider_error(body: Any, expected: str | None) -> None:
    assert provider_error(body) == expected


# --- config ---------------------------------------------------------------------------------


def load(text: str) -> Account:
    config = parse_config(text, {"kaleyra": Account}, env={"KEY": "s3cret"})
    return config.kaleyra[0]


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text)
    return caught.value.errors


def test_a_minimal_account_takes_the_defaults() -> None:
    account = load("kaleyra: [{account: main, numbers: ['+12025550100', '+919876543210']}]")
    assert account.base_url == "https://api-webhook-monitor-whatsapp.api.kaleyra.io"
    assert account.numbers == ["+12025550100", "+919876543210"]
    assert account.stats_path == "/v1/wamonitor/stats/{number}"
    assert headers(account) == {"Accept": "application/json"}


def test_headers_inline_and_from_files(tmp_path) -> None:
    (tmp_path / "key").write_text("  from-a-file\n", encoding="utf-8")
    account = load(
        "kaleyra: [{account: main, numbers: ['+12025550100'],"
        " headers: {x-sid: '${KEY}', accept: application/json;v=2},"
        f" header_files: {{api-key: {tmp_path / 'key'}}}}}]"
    )
    assert headers(account) == {
        "x-sid": "s3cret",
        "accept": "application/json;v=2",
        "api-key": "from-a-file",
    }
    assert "s3cret" not in repr(account)
    assert "from-a-file" not in repr(account)


@pytest.mark.parametrize(
    ("accounts", "expected"),
    [
        (
            "[{account: a, numbers: [+12025550100, '12025550100', '+0123456', '+1 202 555',"
            " '+123', '+1234567890123456']}]",
            [
                "kaleyra[0].numbers[0]: 12025550100 is a number to YAML: quote it, e.g."
                ' "+12025550100"',
                "kaleyra[0].numbers[1]: '12025550100' is not an E.164 number like +12025550100:"
                " it must start with + and the country code",
                "kaleyra[0].numbers[2]: '+0123456' is not an E.164 number like +12025550100:"
                " country codes do not start with 0",
                "kaleyra[0].numbers[3]: '+1 202 555' is not an E.164 number like +12025550100:"
                " only digits may follow the +",
                "kaleyra[0].numbers[4]: '+123' is not an E.164 number like +12025550100:"
                " it has 3 digits, E.164 allows 7 to 15",
                "kaleyra[0].numbers[5]: '+1234567890123456' is not an E.164 number like"
                " +12025550100: it has 16 digits, E.164 allows 7 to 15",
            ],
        ),
        (
            "[{account: a, numbers: ['+12025550100', '+12025550101', '+12025550100']}]",
            ["kaleyra[0].numbers: '+12025550100' is listed twice"],
        ),
        ("[{account: a, numbers: []}]", ["kaleyra[0].numbers: list at least one number"]),
        ("[{account: a}]", ["kaleyra[0].numbers: is required"]),
        (
            "[{account: a, numbers: ['+12025550100'], devices: []}]",
            [
                "kaleyra[0].devices: unknown key (allowed: account, base_url, body_size_limit,"
                " concurrency, header_files, headers, interval, numbers, proxy_url, rate_limit,"
                " stats_path, timeout, tls)"
            ],
        ),
        (
            "[{account: a, numbers: ['+12025550100'], header_files: {api-key: /nonexistent/k}}]",
            [
                "kaleyra[0].header_files.api-key: cannot read /nonexistent/k:"
                " No such file or directory"
            ],
        ),
        (
            "[{account: a, numbers: ['+12025550100'], header_files: {api-key: }}]",
            ["kaleyra[0].header_files.api-key: must be the path of a file"],
        ),
        (
            "[{account: a, numbers: ['+12025550100'],"
            " headers: {api key: x, a: '', b: 12, c: \"x\\ny\", d: ünï}}]",
            [
                "kaleyra[0].headers.a: the value is empty",
                "kaleyra[0].headers.b: must be text, not a number: put it in quotes",
                "kaleyra[0].headers.c: the value must be printable ASCII on one line",
                "kaleyra[0].headers.d: the value must be printable ASCII on one line",
            ],
        ),
        (
            "[{account: a, numbers: ['+12025550100'], headers: {api key: x}}]",
            ["kaleyra[0].headers: 'api key' is not an HTTP header name"],
        ),
        (
            "[{account: a, numbers: ['+12025550100'], headers: {api-key: x, API-Key: y}}]",
            ["kaleyra[0].headers: 'api-key' and 'API-Key' are the same header"],
        ),
        (
            "[{account: a, numbers: ['+12025550100'], stats_path: /v1/stats}]",
            ["kaleyra[0].stats_path: '/v1/stats' must start with / and contain {number}"],
        ),
        (
            "[{account: a, numbers: ['+12025550100'], stats_path: '/v1/{sid}/{number}'}]",
            [
                "kaleyra[0].stats_path: '/v1/{sid}/{number}' may hold no placeholder but"
                " {number} (write {{ and }} for braces)"
            ],
        ),
    ],
)
def test_invalid_accounts(accounts: str, expected: list[str]) -> None:
    assert errors(f"kaleyra: {accounts}") == expected


def test_a_header_given_inline_and_as_a_file(tmp_path) -> None:
    path = tmp_path / "key"
    path.write_text("k", encoding="utf-8")
    text = (
        "kaleyra: [{account: a, numbers: ['+12025550100'], headers: {api-key: x},"
        f" header_files: {{API-KEY: {path}}}}}]"
    )
    assert errors(text) == ["kaleyra[0]: header API-KEY is given in both headers and header_files"]


def test_an_empty_header_file_is_named(tmp_path) -> None:
    path = tmp_path / "key"
    path.write_text(" \n", encoding="utf-8")
    text = f"kaleyra: [{{account: a, numbers: ['+12025550100'], header_files: {{k: {path}}}}}]"
    assert errors(text) == [f"kaleyra[0].header_files.k: {path} is empty"]


# --- the endpoint ---------------------------------------------------------------------------


class FakeApi:
    """Answers every call with one body and remembers what was asked."""

    def __init__(self, body: Any):
        self.body = body
        self.calls: list[tuple[str, str]] = []

    async def call(self, method: str, path: str, **_: Any) -> Any:
        self.calls.append((method, path))
        return self.body


def test_one_endpoint_polls_every_number_in_config_order() -> None:
    account = load(
        "kaleyra: [{account: a, numbers: ['+919876543210', '+12025550100'], interval: 2m,"
        " stats_path: '/v2/stats/{number}?x=1'}]"
    )
    (endpoint,) = endpoints(account, Defaults(), None)
    assert (endpoint.name, endpoint.interval) == ("monitor_stats", 120.0)
    assert list(endpoint.targets({})) == ["+919876543210", "+12025550100"]
    assert endpoint.families.func is translate  # with the account's own set of warned names

    api = FakeApi(json.loads(SEED))
    result = asyncio.run(endpoint.fetch(api, "+12025550100"))
    assert api.calls == [("GET", "/v2/stats/+12025550100?x=1")]
    assert endpoint.families("+12025550100", result) == SEED_FAMILIES


def test_the_interval_defaults_to_the_global_one() -> None:
    account = load("kaleyra: [{account: a, numbers: ['+12025550100']}]")
    assert endpoints(account, Defaults(interval=30), None)[0].interval == 30.0


def test_the_provider() -> None:
    assert PROVIDER.name == "kaleyra"
    assert PROVIDER.account_model is Account
    assert (PROVIDER.default_rate_limit.requests, PROVIDER.default_rate_limit.period) == (60, 60)
    assert PROVIDER.headers is headers
    assert PROVIDER.provider_error is provider_error
    assert PROVIDER.endpoints is endpoints


def test_names_and_help_are_remembered_but_never_a_hostile_answers_long_texts() -> None:
    """Names and help texts are worked out once for every number; a help text a hostile client
    made megabytes long is worked out each time, not kept."""
    from exporter.providers import kaleyra  # noqa: PLC0415

    kaleyra._memo.cache_clear()
    first = run({"app": {"queue": stat((None, 1), help_="Queue size")}})
    kept = kaleyra._memo.cache_info().currsize
    assert kept > 0
    assert run({"app": {"queue": stat((None, 1), help_="Queue size")}}) == first
    assert kaleyra._memo.cache_info().hits > 0
    huge = "word " * 100_000
    (family,) = run({"app": {"queue": stat((None, 1), help_=huge)}})
    assert family.help.startswith("word word")
    assert kaleyra._memo.cache_info().currsize == kept  # nothing of the long text kept
