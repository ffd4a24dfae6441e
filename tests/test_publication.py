"""What a publication renders: a provider state's families at most once, however often they
changed since the previous one."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

from exporter.metrics import Family, Sample
from exporter.providers import PROVIDERS
from exporter.snapshot import Snapshot
from tests.conftest import run_exporter, value, wait_for

CHANGES = 1000


def ledger_families(calls: list[int]):
    def families() -> list[Family]:
        calls.append(1)
        sample = Sample((("provider", "d7"), ("account", "a")), float(len(calls)), "_total")
        return [Family("whatsapp_test_renders", "counter", "Renders so far.", (sample,))]

    return families


def test_followed_families_are_rendered_once_per_publication_however_often_they_change():
    snapshot = Snapshot("test")
    calls: list[int] = []
    snapshot.follow("d7", ledger_families(calls))
    for _ in range(CHANGES):
        snapshot.outdated("d7")
    assert calls == []  # a change only marks them
    assert snapshot.publish()
    assert len(calls) == 1
    shown = snapshot.exposition.plain
    assert b'whatsapp_test_renders_total{account="a",provider="d7"} 1.0\n' in shown
    assert not snapshot.publish()  # nothing changed since: nothing rendered, nothing published
    assert len(calls) == 1
    for _ in range(CHANGES):
        snapshot.outdated("d7")
    assert snapshot.publish()
    assert len(calls) == 2
    assert b'provider="d7"} 2.0\n' in snapshot.exposition.plain


def test_a_change_wakes_the_publisher():
    async def scenario() -> None:
        snapshot = Snapshot("test")
        snapshot.follow("d7", ledger_families([]))
        snapshot.publish()
        waiting = asyncio.ensure_future(snapshot.changed())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        snapshot.outdated("d7")
        await asyncio.wait_for(waiting, 1)

    asyncio.run(scenario())


def test_a_burst_of_changes_from_a_thread_renders_the_ledger_a_few_times_not_per_change(tmp_path):
    """D7's ledger says it changed on every callback, from the thread that wrote it; during a
    burst its families were rendered on the loop for each one (62% of the CPU). Now a burst of
    CHANGES is rendered at most once per publication, and what is shown is the newest."""
    calls: list[int] = []
    contexts = []
    d7 = PROVIDERS["d7"]
    assert d7.open_state is not None

    def open_state(context):
        contexts.append(context)
        state = d7.open_state(context)
        state.families = ledger_families(calls)  # the real ledger, its rendering counted
        return state

    providers = {**PROVIDERS, "d7": replace(d7, open_state=open_state)}
    config = "kaleyra: [{account: k, base_url: 'http://127.0.0.1:9', numbers: ['+12025550100']}]"
    with run_exporter(config, storage=tmp_path, strict=False, providers=providers) as running:
        running.wait_for_metric("whatsapp_test_renders_total")
        exporter = running.exporter
        before, published = len(calls), exporter._publications
        burst = threading.Thread(target=lambda: [contexts[0].changed() for _ in range(CHANGES)])
        burst.start()
        burst.join()
        wait_for(lambda: len(calls) > before, 5, "the burst to be published")
        time.sleep(0.3)  # any publication still due
        rendered = len(calls) - before
        assert 1 <= rendered <= exporter._publications - published
        assert rendered < CHANGES / 50
        shown = value(running.scrape(), "whatsapp_test_renders_total")
        assert shown == len(calls)
