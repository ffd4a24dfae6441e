"""Shards: a stable split of the configured accounts that every replica computes alike."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exporter.cluster import Shard, ShardError


@pytest.mark.parametrize(
    ("text", "hostname", "expected"),
    [
        ("0/1", None, Shard(0, 1)),
        ("1/3", None, Shard(1, 3)),
        (" 2 / 4 ", None, Shard(2, 4)),
        ("auto/1", "whatsapp-exporter-1", Shard(0, 1)),
        ("auto/2", "whatsapp-exporter-3", Shard(1, 2)),
        ("auto/2", "whatsapp-exporter-4", Shard(0, 2)),
    ],
)
def test_shard_flags(text, hostname, expected):
    assert Shard.parse(text, hostname) == expected


@pytest.mark.parametrize(
    ("text", "hostname", "message"),
    [
        ("2/2", None, "I must be below N"),
        ("1/0", None, "expected I/N or auto/N"),
        ("one/2", None, "expected I/N or auto/N"),
        ("auto/2", "laptop", "does not end in -<n>"),
    ],
)
def test_bad_shard_flags_say_what_is_wrong(text, hostname, message):
    with pytest.raises(ShardError, match=message):
        Shard.parse(text, hostname)


def test_every_account_has_exactly_one_shard_and_the_split_is_fair():
    accounts = [("kaleyra", f"acct-{i}") for i in range(3000)]
    shards = [Shard(i, 3) for i in range(3)]
    owners = [[s for s in shards if s.owns(*a)] for a in accounts]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o[0] == s for o in owners) for s in shards]
    assert all(900 < size < 1100 for size in sizes), sizes


@pytest.mark.processes
def test_the_split_is_the_same_in_every_process():
    """sha256, not hash(): Python randomises str hashes per process."""
    code = (
        "from exporter.cluster import Shard;"
        "print([Shard(i, 4).owns('d7', f'a{n}') for n in range(50) for i in range(4)])"
    )
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 1 and runs.pop().startswith("[")


def test_lock_keys_differ_per_shard_and_fit_a_bigint():
    keys = {Shard(i, n).lock_key for n in (1, 2, 3) for i in range(n)}
    assert len(keys) == 6
    assert all(-(1 << 63) <= k < (1 << 63) for k in keys)
