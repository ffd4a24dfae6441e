"""The HTTP surface: /metrics, landing page, health, readiness, reload; and bad requests."""

from __future__ import annotations

import asyncio
import gzip
import socket
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest

from exporter import exposition as exposition_module
from exporter import serving as serving_module
from exporter import snapshot as snapshot_module
from exporter.metrics import Family, Sample
from exporter.serving import Scrapes, Variant
from exporter.snapshot import Snapshot
from simulators import Fault
from simulators.betatel import BetatelSimulator
from simulators.kaleyra import KaleyraSimulator
from simulators.whatsgate import WhatsGateSimulator
from tests.conftest import (
    parse_exposition,
    require_tool,
    run_exporter,
    value,
    values,
    wait_for,
)


@pytest.fixture
def sims():
    with (
        WhatsGateSimulator(devices=2, auto=True, tick=0.2) as whatsgate,
        BetatelSimulator(auto=True, tick=0.2) as betatel,
        KaleyraSimulator(numbers=["+12025550100"], auto=True, tick=0.2) as kaleyra,
    ):
        yield {"whatsgate": whatsgate, "betatel": betatel, "kaleyra": kaleyra}


def all_config(sims, interval: str = "1s") -> str:
    return f"""
defaults: {{interval: {interval}, timeout: 2s}}
whatsgate:
  - {{account: acme, base_url: "{sims["whatsgate"].base_url}", token: demo-token,
      balance: {{interval: {interval}}}, failed_numbers: {{interval: {interval}}}}}
betatel:
  - {{account: eu, base_url: "{sims["betatel"].base_url}", api_key: demo-key,
      account_id: demo-account, windows: [last5m, today, daily]}}
kaleyra:
  - {{account: main, base_url: "{sims["kaleyra"].base_url}", numbers: ["+12025550100"]}}
"""


@pytest.mark.processes
def test_whole_output_passes_promtool_and_the_parser_and_values_move(sims):
    promtool = require_tool("promtool", "prometheus")
    with run_exporter(all_config(sims)) as running:
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")
        first = running.metrics_text()
        wait_for(lambda: running.metrics_text() != first, 10, "values to change")
        text = running.metrics_text()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == b""
    series = parse_exposition(text)
    names = {name for name, _ in series}
    for expected in (
        "whatsapp_device_connected",
        "whatsapp_balance_remaining_messages",
        "whatsapp_failed_recipients",
        "whatsapp_stats_requests",
        "whatsapp_client_app_callback_queue_size",
        "whatsapp_exporter_up",
        "whatsapp_exporter_build_info",
    ):
        assert expected in names
    # process_* (client_python's process collector) are the only names outside whatsapp_
    assert all(name.startswith(("whatsapp_", "process_")) for name in names)
    assert "process_resident_memory_bytes" in names
    assert all(
        ("provider", p) in labels
        for (name, labels), _ in series.items()
        if not name.startswith(("whatsapp_exporter_", "process_"))
        for p in [dict(labels).get("provider")]
    )
    assert "demo-token" not in text and "demo-key" not in text


def test_gzip_health_landing_page_and_unknown_paths(sims):
    sims["betatel"].fail("stats", Fault.status(401))
    with run_exporter(all_config(sims, "30s")) as running:
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")
        plain = httpx.get(f"{running.url}/metrics", headers={"Accept-Encoding": "identity"})
        zipped = httpx.get(f"{running.url}/metrics", headers={"Accept-Encoding": "gzip"})
        raw = httpx.Client().send(
            httpx.Request("GET", f"{running.url}/metrics", headers={"Accept-Encoding": "gzip"}),
            stream=True,
        )
        compressed = b"".join(raw.iter_raw())
        page = httpx.get(f"{running.url}/")
        healthy = httpx.get(f"{running.url}/-/healthy")
        missing = httpx.get(f"{running.url}/nope")
        reload_get = httpx.get(f"{running.url}/-/reload")
        metrics_post = httpx.post(f"{running.url}/metrics")
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "content-encoding" not in plain.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(compressed) == plain.content
    assert len(compressed) < len(plain.content) / 3
    assert healthy.status_code == 200
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<a href='/metrics'>" in page.text
    assert "<td>whatsgate</td><td>acme</td><td>devices_status</td>" in page.text
    assert "auth: HTTP 401" in page.text  # the failing targets say why
    assert "demo-key" not in page.text
    assert missing.status_code == 404
    assert reload_get.status_code == 405 and reload_get.headers["allow"] == "POST"
    assert metrics_post.status_code == 405


@pytest.mark.slow
def test_ready_only_after_the_first_polls(sims):
    sims["whatsgate"].fail("devices_status", Fault.latency(1.5), times=1)
    with run_exporter(all_config(sims, "30s")) as running:
        assert httpx.get(f"{running.url}/-/ready").status_code == 503
        assert httpx.get(f"{running.url}/-/healthy").status_code == 200
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")


def test_the_usual_answers_are_counted_from_zero(sims):
    """rate() and increase() need a series before its first increment: each built-in handler's
    usual codes exist at 0 from the first exposition (the counts are refreshed every 10 s)."""
    with run_exporter(all_config(sims, "1h")) as running:
        running.wait_for_metric("whatsapp_exporter_http_requests_total", handler="/metrics")
        series = running.scrape()
    requests = {
        (labels["handler"], labels["code"]): count
        for labels, count in values(series, "whatsapp_exporter_http_requests_total")
    }
    assert requests == {
        ("/", "200"): 0,
        ("/config", "200"): 0,
        ("/metrics", "200"): 0,
        ("/-/healthy", "200"): 0,
        ("/-/ready", "200"): 0,
        ("/-/ready", "503"): 0,
        ("/-/reload", "200"): 0,  # the tests' exporter has --web.enable-lifecycle
        ("/-/reload", "500"): 0,
    }


def _count_bodies(monkeypatch) -> list[object]:
    """The variants whose whole body gets made (joined or gzipped), in order."""
    made: list[object] = []
    joined, compress = snapshot_module.Exposition.joined, serving_module.compress
    monkeypatch.setattr(
        snapshot_module.Exposition,
        "joined",
        lambda self, om: made.append(Variant(om)) or joined(self, om),
    )
    monkeypatch.setattr(
        serving_module,
        "compress",
        lambda exposition, om: made.append(Variant(om, gzip=True)) or compress(exposition, om),
    )
    return made


@pytest.mark.slow
def test_scrapes_never_render(sims, monkeypatch):
    """Lines are written when a poll lands; a scrape joins (once per variant) what is there."""
    renders: list[int] = []
    original_lines = exposition_module.sample_lines
    monkeypatch.setattr(
        exposition_module, "sample_lines", lambda *a: renders.append(1) or original_lines(*a)
    )
    joins = _count_bodies(monkeypatch)
    with run_exporter(all_config(sims, "1h")) as running:
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")
        time.sleep(1.5)  # the last publication after the first round
        before, joins_before = len(renders), len(joins)
        bodies = {httpx.get(f"{running.url}/metrics").content for _ in range(30)}
        zipped = {
            httpx.get(f"{running.url}/metrics", headers={"Accept-Encoding": "gzip"}).content
            for _ in range(30)
        }
        assert len(renders) == before
        assert len(joins) - joins_before <= 2  # plain and gzip of the newest version, once each
        assert len(bodies) == 1 and len(zipped) == 1


@pytest.mark.slow
def test_a_big_plain_body_is_streamed_block_by_block_and_matches_gzip(sims, monkeypatch):
    """Over STREAM_OVER the plain body is never joined: written as the family blocks, with its
    length up front; HEAD gets the length and no body; both formats stay whole."""
    monkeypatch.setattr(serving_module, "STREAM_OVER", 1000)  # the small test exposition streams
    joined = _count_bodies(monkeypatch)
    with run_exporter(all_config(sims, "1h")) as running:
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")
        time.sleep(1.5)  # the last publication after the first round
        plain = httpx.get(f"{running.url}/metrics", headers={"Accept-Encoding": "identity"})
        zipped = httpx.get(f"{running.url}/metrics", headers={"Accept-Encoding": "gzip"})
        head = httpx.head(f"{running.url}/metrics", headers={"Accept-Encoding": "identity"})
        openmetrics = httpx.get(
            f"{running.url}/metrics",
            headers={"Accept": "application/openmetrics-text", "Accept-Encoding": "identity"},
        )
    assert len(plain.content) > 1000
    assert plain.headers["content-length"] == str(len(plain.content))
    assert "chunked" not in plain.headers.get("transfer-encoding", "")
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.content == plain.content  # httpx decompressed it
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(plain.content))
    assert openmetrics.content.endswith(b"# EOF\n")
    assert all(variant.gzip for variant in joined)  # no plain body was ever joined
    parse_exposition(plain.text)


@pytest.mark.slow
def test_reload_good_and_bad_keeps_the_old_config(sims, tmp_path):
    path = tmp_path / "config.yaml"
    whatsgate_only = all_config(sims, "1s").split("betatel:")[0]
    path.write_text(whatsgate_only)
    with run_exporter(path) as running:
        wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")
        assert value(running.scrape(), "whatsapp_exporter_up", provider="kaleyra") is None

        path.write_text(all_config(sims, "1s"))
        good = httpx.post(f"{running.url}/-/reload", timeout=30)
        assert (good.status_code, good.text) == (200, "Reloaded.\n")
        running.wait_for_metric("whatsapp_client_app_callback_queue_size", number="+12025550100")
        assert value(running.scrape(), "whatsapp_exporter_config_last_reload_successful") == 1

        path.write_text(all_config(sims, "1s") + "bogus: 1\n")
        bad = httpx.post(f"{running.url}/-/reload", timeout=30)
        assert bad.status_code == 500
        assert "bogus: unknown key" in bad.text
        series = running.scrape()
        assert value(series, "whatsapp_exporter_config_last_reload_successful") == 0
        # the old config keeps polling
        count = len(sims["kaleyra"].requests)
        wait_for(lambda: len(sims["kaleyra"].requests) > count, 10, "polls to go on")
        assert value(running.scrape(), "whatsapp_exporter_up", provider="kaleyra") == 1

        path.write_text(whatsgate_only)
        assert httpx.post(f"{running.url}/-/reload", timeout=30).status_code == 200
        series = running.scrape()
        assert value(series, "whatsapp_exporter_config_last_reload_successful") == 1
        # a removed account leaves /metrics entirely, its error counters too
        assert not any(dict(labels).get("provider") == "kaleyra" for _, labels in series)


RELOADS = 16


def test_a_reload_is_on_metrics_when_it_is_answered(sims, tmp_path):
    """Automation checks whatsapp_exporter_config_last_reload_successful right after POST
    /-/reload answers, as Prometheus has it updated before answering: every scrape after the
    answer, gzip or plain, shows the result. The publication once followed the answer by up to
    its coalescing delay (50 ms with polls running), so this is repeated, bad and good in turn."""
    path = tmp_path / "config.yaml"
    good = all_config(sims, "1s")
    path.write_text(good)
    with run_exporter(path) as running, httpx.Client(timeout=30) as client:
        wait_for(lambda: client.get(f"{running.url}/-/ready").status_code == 200, 15, "readiness")
        for attempt in range(RELOADS):
            ok = attempt % 2 == 1
            path.write_text(good if ok else good + "bogus: 1\n")
            answer = client.post(f"{running.url}/-/reload")
            assert answer.status_code == (200 if ok else 500)
            for encoding in ("gzip", "identity"):
                scraped = client.get(
                    f"{running.url}/metrics", headers={"Accept-Encoding": encoding}
                )
                series = parse_exposition(scraped.text)
                shown = value(series, "whatsapp_exporter_config_last_reload_successful")
                assert shown == float(ok), f"reload {attempt} ({encoding}): {shown}"


def test_garbage_requests_get_an_answer_and_the_server_lives_on(sims):
    with run_exporter(all_config(sims, "30s")) as running:
        port = int(running.url.rsplit(":", 1)[1])
        for garbage in (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"POST /-/reload HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(garbage)
                answer = conn.recv(4096)
            # HTTP/0.9-style garbage gets its answer without a status line, as the protocol says
            assert b"400" in answer or b"505" in answer, answer
        assert httpx.get(f"{running.url}/-/healthy").status_code == 200


GZIP_REQUEST = SimpleNamespace(headers={"Accept-Encoding": "gzip"}, method="GET")


def shown(response) -> float:
    """The version a gzip /metrics body shows (published by `publish`)."""
    text = gzip.decompress(response.body).decode()
    return float(text.split("\nwhatsapp_test_version ")[1].split("\n")[0])


def publish(snapshot: Snapshot, version: float) -> None:
    snapshot.set_extra("t", [Family("whatsapp_test_version", "gauge", "v", (Sample((), version),))])
    snapshot.publish()


def test_gzip_scrapers_share_recent_work_but_never_get_old_data(monkeypatch):
    """A gzip scrape that meets a version not compressed yet gets the previous body if that was
    the newest less than GZIP_STALE ago, and starts the newest one; after it, the next starts only
    after a rest (GZIP_REST times as long as it took); a body older than GZIP_STALE is never
    served: that scrape waits for the newest (a scraper every 15 s always gets fresh data)."""
    clock = [1000.0]
    monkeypatch.setattr(serving_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(serving_module, "COMPRESS_IN_THREAD", 0)  # every gzip in a thread
    request = GZIP_REQUEST
    zipped = Variant(gzip=True)

    async def done(scrapes: Scrapes) -> None:
        while zipped in scrapes._zipping:  # until its done callback ran, not only the compression
            await asyncio.sleep(0.001)

    async def scenario() -> None:
        snapshot = Snapshot("test")
        scrapes = Scrapes(lambda: snapshot.exposition)
        publish(snapshot, 1)
        assert shown(await scrapes.answer(request)) == 1  # nothing to fall back on: waits
        publish(snapshot, 2)
        assert shown(await scrapes.answer(request)) == 1  # the previous one, the newest is started
        clock[0] += 0.5  # compressing takes 0.5 s (by this clock)
        await done(scrapes)
        assert shown(await scrapes.answer(request)) == 2
        publish(snapshot, 3)
        clock[0] += 0.1
        assert shown(await scrapes.answer(request)) == 2  # resting: min(4 x 0.5, 2 - 2.5 x 0.5) s
        await asyncio.sleep(0.05)
        assert scrapes.ready(zipped) is None  # nothing was started
        clock[0] += 1.5  # version 2 was the newest 1.6 s ago
        assert shown(await scrapes.answer(request)) == 2
        clock[0] += 0.5  # 2.1 s ago: too old to serve, whatever the rest says
        assert shown(await scrapes.answer(request)) == 3

    asyncio.run(scenario())


def test_a_gzip_scrape_after_a_reload_was_answered_never_gets_an_older_version(monkeypatch):
    """A reload's answer promises that /metrics shows its result (`show_from`): a gzip scrape
    then neither falls back to a body older than that version nor takes an older one that was
    on its way: it waits for that one, then for the promised version's."""
    clock = [1000.0]
    monkeypatch.setattr(serving_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    computed = count_compressions(monkeypatch)

    async def scenario() -> None:
        snapshot = Snapshot("test")
        scrapes = Scrapes(lambda: snapshot.exposition)
        publish(snapshot, 1)
        assert shown(await scrapes.answer(GZIP_REQUEST)) == 1
        publish(snapshot, 2)
        scrapes.show_from(snapshot.exposition.generation)
        assert shown(await scrapes.answer(GZIP_REQUEST)) == 2  # not 1, the newest a moment ago
        publish(snapshot, 3)
        assert shown(await scrapes.answer(GZIP_REQUEST)) == 2  # the fallback: 3 is on its way
        publish(snapshot, 4)
        scrapes.show_from(snapshot.exposition.generation)
        assert shown(await scrapes.answer(GZIP_REQUEST)) == 4  # 3 made, then 4
        assert computed == [snapshot.exposition.generation - g for g in (3, 2, 1, 0)]

    asyncio.run(asyncio.wait_for(scenario(), 30))


def count_compressions(monkeypatch) -> list[int]:
    """Every gzip in a thread, and the generation of each compressed, in order."""
    monkeypatch.setattr(serving_module, "COMPRESS_IN_THREAD", 0)
    computed: list[int] = []
    original = serving_module.compress

    def counted(exposition, openmetrics):
        computed.append(exposition.generation)
        return original(exposition, openmetrics)

    monkeypatch.setattr(serving_module, "compress", counted)
    return computed


def test_gzip_scrapes_with_nothing_recent_share_the_compression_on_its_way(monkeypatch):
    """Ten scrapers that each met another new version once started ten compressions at once
    (1.3 s each): a scrape with nothing recent to fall back on waits for the one on its way."""
    computed = count_compressions(monkeypatch)

    async def scenario() -> None:
        snapshot = Snapshot("test")
        scrapes = Scrapes(lambda: snapshot.exposition)
        publish(snapshot, 1)
        first = asyncio.ensure_future(scrapes.answer(GZIP_REQUEST))
        await asyncio.sleep(0)  # it started compressing version 1
        publish(snapshot, 2)
        second = await scrapes.answer(GZIP_REQUEST)
        assert shown(await first) == shown(second) == 1
        assert len(computed) == 1

    asyncio.run(scenario())


def test_rhythm_knows_when_a_steady_scraper_comes_next():
    """Three scrapes at a steady gap of at least RHYTHM_MIN: due one gap after the last. Back to
    back, unsteady, or too few: not followed. The most recent RHYTHM_KEEP scrapers are kept."""
    rhythm = serving_module.Rhythm()
    prometheus = ("10.0.0.7", "Prometheus/2.53")
    assert rhythm.scraped(prometheus, 100.0)[::2] == (None, [])
    assert rhythm.scraped(prometheus, 115.0)[::2] == (None, [])
    assert rhythm.scraped(prometheus, 130.2) == (pytest.approx(145.4), pytest.approx(0.2), [])
    assert rhythm.scraped(prometheus, 140.0)[0] is None  # 9.8 s after 15.2: a new interval
    assert rhythm.scraped(prometheus, 150.0)[0] == pytest.approx(160.0)  # 10 after 9.8
    fast = ("10.0.0.8", "curl")
    for at in (0.0, 1.0, 2.0, 3.0):
        assert rhythm.scraped(fast, at)[0] is None  # under RHYTHM_MIN: the fallback's business
    others = [(f"10.0.1.{i}", "x") for i in range(serving_module.RHYTHM_KEEP - 2)]
    for other in others:
        assert rhythm.scraped(other, 200.0)[2] == []
    assert rhythm.scraped(("10.0.2.1", "x"), 201.0)[2] == [prometheus]  # the least recent goes


def test_a_steady_gzip_scraper_finds_its_body_made_before_it_comes(monkeypatch):
    """Prometheus scrapes at a fixed interval, and with nothing recent to fall back on each
    scrape waited for a compression. From its third scrape on, the newest version is compressed
    just before the next one is due: that scrape is served at once, with what was the newest a
    moment ago, and no other compression is made for it (one per scrape, as before)."""
    clock = [1000.0]
    monkeypatch.setattr(serving_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    computed = count_compressions(monkeypatch)
    prometheus = SimpleNamespace(
        headers={"Accept-Encoding": "gzip", "User-Agent": "Prometheus/2.53"},
        method="GET",
        remote="10.0.0.7",
    )
    zipped = Variant(gzip=True)

    async def scenario() -> None:
        snapshot = Snapshot("test")
        scrapes = Scrapes(lambda: snapshot.exposition)
        for version in (1, 2, 3):  # a new version before each scrape, 15 s apart
            if version > 1:
                clock[0] += 15
            publish(snapshot, version)
            assert shown(await scrapes.answer(prometheus)) == version  # waits: nothing recent
            assert len(computed) == version
        [(key, timer)] = scrapes._ahead.items()
        lead = 0.1  # twice the last compression's time (0 by this clock), plus 0.1 s
        assert timer.when() - asyncio.get_running_loop().time() == pytest.approx(15 - lead, abs=1)
        timer.cancel()
        clock[0] += 15 - lead
        publish(snapshot, 4)
        scrapes._ahead_of(key)  # what the timer does when it fires
        while scrapes.ready(zipped) is None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)  # the done callback
        publish(snapshot, 5)  # polls go on meanwhile
        clock[0] += lead
        assert shown(await scrapes.answer(prometheus)) == 4  # the newest 0.1 s ago, at once
        assert not scrapes._zipping  # and nothing else was started for it
        assert len(computed) == 4
        scrapes.stop()
        assert not scrapes._ahead

    asyncio.run(asyncio.wait_for(scenario(), 30))
