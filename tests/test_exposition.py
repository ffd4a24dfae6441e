"""Our own text-format writer: every line round-trips through client_python's parsers (text 0.0.4
and OpenMetrics) and promtool, whatever a provider put in a label value."""

from __future__ import annotations

import gzip
import math
import random
import subprocess
from dataclasses import dataclass

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import exposition as exposition_module
from exporter import serving
from exporter import snapshot as snapshot_module
from exporter.exposition import MAX_LABEL_VALUE, float_text, safe_text
from exporter.metrics import Family, Sample
from exporter.snapshot import Snapshot, TargetKey
from tests.conftest import require_tool


@dataclass
class PollError:
    reason: str
    detail: str


HOSTILE = [
    'quote " inside',
    "back\\slash",
    "new\nline",
    "lone \ud800 surrogate",
    "\udfff",
    "emoji 📱 and ünïcödé",
    "x" * 10_000,
    "",
    "tab\tand\rreturn",
    '} {brace="',
]


def _snapshot_with(values: list[str]) -> Snapshot:
    snapshot = Snapshot("test", clock=lambda: 1_700_000_000.0)
    snapshot.configure(3, [("kaleyra", "main", "monitor_stats")])
    for index, text in enumerate(values):
        key = TargetKey("kaleyra", "main", "monitor_stats", f"+1202555010{index}")
        families = [
            Family(
                "whatsapp_client_hostile",
                "gauge",
                'help with "quotes", \\ and\nnewline \ud800',
                (Sample((("number", key.target), ("label", text)), float(index)),),
            ),
            Family(
                "whatsapp_client_events",
                "counter",
                "a counter",
                (Sample((("number", key.target),), 3.0, "_total"),),
            ),
        ]
        snapshot.succeeded(key, 60, families, 0.1)
    snapshot.publish()
    return snapshot


def test_hostile_label_values_round_trip_through_both_parsers():
    snapshot = _snapshot_with(HOSTILE)
    text = snapshot.exposition.body().decode()
    parsed = {
        s.labels["number"]: s.labels["label"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "whatsapp_client_hostile"
    }
    assert len(parsed) == len(HOSTILE)
    for index, original in enumerate(HOSTILE):
        assert parsed[f"+1202555010{index}"] == safe_text(original)
    assert parsed["+12025550103"] == "lone \ufffd surrogate"
    assert len(parsed["+12025550106"]) == MAX_LABEL_VALUE
    assert parsed["+12025550106"].endswith("…")

    openmetrics = snapshot.exposition.body(openmetrics=True).decode()
    assert openmetrics.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(openmetrics)}
    assert families["whatsapp_client_events"].type == "counter"
    created = [
        s for s in families["whatsapp_exporter_poll_errors"].samples if s.name.endswith("_created")
    ]
    assert created and all(s.value == 1_700_000_000.0 for s in created)


@pytest.mark.processes
def test_hostile_exposition_passes_promtool():
    promtool = require_tool("promtool", "prometheus")
    body = _snapshot_with(HOSTILE).exposition.body()
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_unwritable_samples_are_dropped_and_counted_never_raised():
    snapshot = Snapshot("test")
    key = TargetKey("kaleyra", "main", "monitor_stats", "+12025550100")
    families = [
        Family("bad name!", "gauge", "x", (Sample((), 1.0),)),
        Family("whatsapp_ok", "gauge", "x", (Sample((("bad-label", "v"),), 1.0),)),
        Family("whatsapp_ok", "gauge", "x", (Sample((("provider", "twice"),), 1.0),)),
        Family("whatsapp_ok", "gauge", "x", (Sample((("fine", "v"),), 2.0),)),
    ]
    snapshot.succeeded(key, 60, families, 0.1)
    snapshot.publish()
    text = snapshot.exposition.plain.decode()
    assert 'whatsapp_ok{account="main",fine="v",provider="kaleyra"} 2.0' in text
    assert "bad name" not in text and "bad-label" not in text and "twice" not in text
    assert snapshot.dropped_samples == 2
    list(text_string_to_metric_families(text))  # parses


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1.0"),
        (0.0, "0.0"),
        (-2.5, "-2.5"),
        (1.7e9, "1.7e+09"),
        (123456.0, "123456.0"),
        (1234567.0, "1.234567e+06"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
        (1e-05, "1e-05"),
    ],
)
def test_floats_are_written_as_go_writes_them(value, text):
    assert float_text(value) == text


def test_a_newer_generation_is_never_replaced_by_an_older_one():
    snapshot = Snapshot("test")
    first = snapshot.exposition
    snapshot.configure(3, [("betatel", "eu", "stats")])
    assert snapshot.publish()
    second = snapshot.exposition
    assert second.generation > first.generation
    assert not snapshot.publish()  # nothing changed: the same object stays
    assert snapshot.exposition is second


def test_one_target_change_rewrites_only_that_targets_lines(monkeypatch):
    from exporter import exposition as exposition_module  # noqa: PLC0415

    snapshot = _snapshot_with([f"v{i}" for i in range(5)])
    written = []
    original = exposition_module.sample_lines
    monkeypatch.setattr(
        exposition_module,
        "sample_lines",
        lambda fam, prefix=(): written.append(fam.name) or original(fam, prefix),
    )
    key = TargetKey("kaleyra", "main", "monitor_stats", "+12025550102")
    snapshot.succeeded(
        key,
        60,
        [
            Family(
                "whatsapp_client_hostile", "gauge", "h", (Sample((("number", key.target),), 9.0),)
            )
        ],
        0.1,
    )
    snapshot.publish()
    # its one family, plus its own three health lines
    # its one family (its three health lines are written from its label text, made once)
    assert written == ["whatsapp_client_hostile"]
    text = snapshot.exposition.plain.decode()
    assert (
        'whatsapp_exporter_poll_duration_seconds{account="main",endpoint="monitor_stats",'
        'provider="kaleyra",target="+12025550102"} 0.1\n'
    ) in text
    assert (
        'whatsapp_client_hostile{account="main",number="+12025550102",provider="kaleyra"} 9.0'
        in text
    )
    assert text.count("whatsapp_client_events_total{") == 4  # the changed target dropped its own


@pytest.mark.slow
def test_an_answer_seen_before_is_not_translated_again_and_a_new_one_is(monkeypatch):
    """Kaleyra with no ticks answers the same bytes every poll: after the first, only health
    lines are written; a changed answer is translated and shown."""
    import httpx  # noqa: PLC0415

    from exporter import exposition as exposition_module  # noqa: PLC0415
    from simulators import Fault, KaleyraSimulator  # noqa: PLC0415
    from tests.conftest import run_exporter, value, wait_for  # noqa: PLC0415

    written: list[str] = []
    original = exposition_module.sample_lines
    monkeypatch.setattr(
        exposition_module,
        "sample_lines",
        lambda fam, prefix=(): written.append(fam.name) or original(fam, prefix),
    )
    number = "+12025550100"
    with KaleyraSimulator(numbers=[number], auto=False) as sim:
        config = f"kaleyra: [{{account: k, base_url: '{sim.base_url}', numbers: ['{number}'],"
        config += " interval: 0.3s, rate_limit: 100/s}]"
        with run_exporter(config) as running:
            wait_for(lambda: httpx.get(f"{running.url}/-/ready").status_code == 200, 10, "ready")
            polls = len(sim.requests)
            written.clear()
            last = "whatsapp_exporter_last_success_timestamp_seconds"
            before = value(running.scrape(), last)
            wait_for(lambda: len(sim.requests) >= polls + 3, 10, "three more polls")
            client = [name for name in written if name.startswith("whatsapp_client_")]
            assert client == [], "an unchanged answer was translated again"
            wait_for(lambda: value(running.scrape(), last) > before, 5, "its health is new")
            changed = {"stats": {"app": {"fresh": {"type": "gauge", "data": [{"value": 7}]}}}}
            sim.fail("*", Fault.status(200, changed))
            shown = running.wait_for_metric("whatsapp_client_app_fresh", number=number)
            assert shown == 7
            assert value(running.scrape(), "whatsapp_client_app_callback_queue_size") is None


def test_a_big_exposition_gzips_in_batches_to_exactly_its_plain_bytes():
    """Pieces of every size, some bigger than a batch, some empty: one gzip member whose content
    is the pieces in order, and the plain body is the same bytes."""
    pieces = [bytes([65 + i % 26]) * (i * 7919 % (3 * serving.GZIP_BATCH // 2)) for i in range(40)]
    exposition = snapshot_module.Exposition(1, pieces, [*pieces, b"# EOF\n"])
    plain = exposition.body()
    assert plain == b"".join(pieces)
    assert exposition.size(False) == len(plain) > 4 * serving.GZIP_BATCH
    zipped = serving.compress(exposition, openmetrics=False)
    assert gzip.decompress(zipped) == plain
    openmetrics = serving.compress(exposition, openmetrics=True)
    assert gzip.decompress(openmetrics) == plain + b"# EOF\n"


def test_a_poll_that_changes_one_family_rejoins_only_that_family():
    """Every poll hands over all of its target's families; those whose lines are the same bytes
    as before keep their joined block (the same object in the next published version)."""
    snapshot = Snapshot("test", clock=lambda: 1_700_000_000.0)
    snapshot.configure(3, [("kaleyra", "main", "monitor_stats")])
    keys = [TargetKey("kaleyra", "main", "monitor_stats", f"+120255501{i:02d}") for i in range(20)]

    def families(key: TargetKey, queue: float) -> list[Family]:
        labels = (("number", key.target),)
        return [
            Family("whatsapp_client_queue", "gauge", "queue", (Sample(labels, queue),)),
            Family("whatsapp_client_other", "gauge", "steady", (Sample(labels, 7.0),)),
        ]

    for key in keys:
        snapshot.succeeded(key, 60, families(key, 1.0), 0.1)
    snapshot.publish()
    before = {id(piece): piece for piece in snapshot.exposition.pieces(False)}

    snapshot.succeeded(keys[3], 60, families(keys[3], 2.0), 0.1)
    snapshot.publish()
    after = snapshot.exposition.pieces(False)
    steady = next(p for p in after if p.startswith(b"whatsapp_client_other{"))
    changed = next(p for p in after if p.startswith(b"whatsapp_client_queue{"))
    assert id(steady) in before  # not joined again
    assert id(changed) not in before
    assert b'number="+12025550103",provider="kaleyra"} 2.0\n' in changed


def test_a_change_rejoins_only_its_chunk_of_the_family():
    """A family of 1,000 members is joined in chunks: one member's change leaves the family's
    other chunks the very same objects in the next version."""
    snapshot = Snapshot("test", clock=lambda: 1_700_000_000.0)
    snapshot.configure(3, [("kaleyra", "main", "monitor_stats")])
    keys = [TargetKey("kaleyra", "main", "monitor_stats", f"+1202555{i:04d}") for i in range(1000)]

    def queue(key: TargetKey, value: float) -> list[Family]:
        return [Family("whatsapp_q", "gauge", "q", (Sample((("number", key.target),), value),))]

    for key in keys:
        snapshot.succeeded(key, 60, queue(key, 1.0), 0.1)
    snapshot.publish()
    before = [p for p in snapshot.exposition.pieces(False) if p.startswith(b"whatsapp_q{")]
    assert len(before) > 1
    assert all(0 < p.count(b"\n") <= 2 * snapshot_module.CHUNK for p in before)
    snapshot.succeeded(keys[500], 60, queue(keys[500], 2.0), 0.1)
    snapshot.publish()
    after = [p for p in snapshot.exposition.pieces(False) if p.startswith(b"whatsapp_q{")]
    rejoined = [i for i, (old, new) in enumerate(zip(before, after, strict=True)) if old is not new]
    assert len(rejoined) == 1
    assert b'number="+12025550500",provider="kaleyra"} 2.0\n' in after[rejoined[0]]


def test_a_member_that_comes_or_goes_rejoins_only_its_chunk():
    """A new target, or one gone stale, among 1,000: the other chunks of the family stay the
    same objects (no new cut of the whole family), and the new piece is right."""
    snapshot = Snapshot("test", clock=lambda: 1_700_000_000.0)
    snapshot.configure(3, [("kaleyra", "main", "monitor_stats")])
    keys = [TargetKey("kaleyra", "main", "monitor_stats", f"+1202555{i:04d}") for i in range(1001)]

    def queue(key: TargetKey) -> list[Family]:
        return [Family("whatsapp_q", "gauge", "q", (Sample((("number", key.target),), 1.0),))]

    def pieces() -> list[bytes]:
        snapshot.publish()
        return [p for p in snapshot.exposition.pieces(False) if p.startswith(b"whatsapp_q{")]

    for key in keys[:500] + keys[501:]:
        snapshot.succeeded(key, 60, queue(key), 0.1)
    before = pieces()
    snapshot.succeeded(keys[500], 60, queue(keys[500]), 0.1)  # comes
    after = pieces()
    assert len([p for p in after if not any(p is q for q in before)]) <= 2  # one, or its halves
    body = b"".join(after)
    assert body.count(b"\n") == 1001
    assert body.index(b"+12025550499") < body.index(b"+12025550500") < body.index(b"+12025550501")
    snapshot.retain("kaleyra", "main", "monitor_stats", [k.target for k in keys if k != keys[7]])
    gone = pieces()  # goes
    assert len([p for p in gone if not any(p is q for q in after)]) <= 2  # one, or a merge
    assert b"+12025550007" not in b"".join(gone)
    assert b"".join(gone).count(b"\n") == 1000


def test_a_block_keeps_its_chunks_sorted_and_sized_through_random_changes(monkeypatch):
    """Members put, changed and removed at random, chunks of 4, in phases that mostly add and
    mostly remove: after each step the chunks hold the members in order, each between 1 and
    2 x CHUNK of them, and join to the members' lines."""
    monkeypatch.setattr(snapshot_module, "CHUNK", 4)
    rng = random.Random(11)
    block = snapshot_module._Block(Family("whatsapp_q", "gauge", "q", ()))
    live: dict[tuple[str, ...], bytes] = {}
    for step in range(3000):
        member = ("v", f"{rng.randrange(60):03d}")
        if member in live and rng.random() < (0.3 if step % 2000 < 1000 else 0.7):
            block.remove(member)
            del live[member]
        else:
            live[member] = f'q{{n="{member[1]}"}} {step}\n'.encode()
            block.put(member, live[member])
        if not live:
            continue
        sizes = [len(chunk.keys) for chunk in block.chunks]
        assert all(1 <= size <= 8 for size in sizes), sizes
        assert [m for chunk in block.chunks for m in chunk.keys] == sorted(live)
        found = {m: block.where[m] for m in live}
        assert all(m in chunk.keys for m, (chunk, _) in found.items())
        assert all(chunk.keys[j] == m for m, (chunk, j) in found.items() if chunk.numbered)
        assert b"".join(block.lines(False)) == b"".join(live[m] for m in sorted(live))


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [snapshot_module.CHUNK, 4])
def test_chunks_stay_right_as_targets_come_change_and_go(monkeypatch, chunk):
    """Random polls, failures and removals over 300 targets, published in between: every version
    parses, lists each family's series once in sorted order, with the newest values, in both
    formats; OpenMetrics has the text's samples plus `_created` lines and `# EOF`. With chunks
    of 4 members, chunks split and merge all the time."""
    monkeypatch.setattr(snapshot_module, "CHUNK", chunk)
    rng = random.Random(7)
    now = [1_700_000_000.0]
    snapshot = Snapshot("test", clock=lambda: now[0])
    endpoints = [("kaleyra", "main", "monitor_stats")]
    snapshot.configure(3, endpoints)
    numbers = [f"+1202555{i:04d}" for i in range(300)]
    live: dict[str, float] = {}
    for step in range(400):
        number = rng.choice(numbers)
        key = TargetKey("kaleyra", "main", "monitor_stats", number)
        action = rng.random()
        if action < 0.7:
            live[number] = float(step)
            sample = Sample((("number", number),), float(step))
            snapshot.succeeded(key, 60, [Family("whatsapp_q", "gauge", "q", (sample,))], 0.1)
        elif action < 0.85:
            snapshot.failed(key, 60, PollError("timeout", "slow"), 0.1)
        else:
            snapshot.retain("kaleyra", "main", "monitor_stats", set(numbers) - {number})
            live.pop(number, None)
        if rng.random() < 0.2:
            now[0] += 1
            snapshot.publish()
            text = snapshot.exposition.plain.decode()
            lines = [line for line in text.splitlines() if line.startswith("whatsapp_q{")]
            assert lines == sorted(lines)
            pieces = snapshot.exposition.pieces(False)
            assert b"" not in pieces
            assert all(p.count(b"\n") <= 2 * chunk for p in pieces if p.startswith(b"whatsapp_q{"))
            seen = {
                s.labels["number"]: s.value
                for f in text_string_to_metric_families(text)
                if f.name == "whatsapp_q"
                for s in f.samples
            }
            assert seen == live
            om = snapshot.exposition.body(openmetrics=True).decode()
            assert om.endswith("# EOF\n")
            om_samples = [x for x in om.splitlines() if not x.startswith("#")]
            assert [x for x in om_samples if "_created" not in x] == [
                x for x in text.splitlines() if not x.startswith("#")
            ]
            assert any("_created" in x for x in om_samples)
            list(openmetrics_families(om))


def test_label_pairs_are_remembered_only_when_short():
    """Label pairs repeat on every poll, so their escaped text is remembered; a hostile answer's
    long values and names are written each time and never kept, and come out capped all the same."""
    exposition_module._memo_pair.cache_clear()
    exposition_module._memo_name_ok.cache_clear()
    short = Family("whatsapp_q", "gauge", "q", (Sample((("number", 'a"b\\c\n'),), 1.0),))
    lines, _ = exposition_module.sample_lines(short)
    assert lines == b'whatsapp_q{number="a\\"b\\\\c\\n"} 1.0\n'
    assert exposition_module._memo_pair.cache_info().currsize == 1
    name, value = "n" * (MAX_LABEL_VALUE + 1), "v" * (MAX_LABEL_VALUE * 40)
    long = Family("whatsapp_q", "gauge", "q", (Sample(((name, value),), 1.0),))
    lines, dropped = exposition_module.sample_lines(long)
    assert dropped == 0
    assert lines == f'whatsapp_q{{{name}="{"v" * (MAX_LABEL_VALUE - 1)}…"}} 1.0\n'.encode()
    assert exposition_module._memo_pair.cache_info().currsize == 1
    assert exposition_module._memo_name_ok.cache_info().currsize == 1
