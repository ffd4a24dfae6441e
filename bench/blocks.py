"""CPU of keeping /metrics' families up to date: the exporter's chunked blocks against a family
joined whole.

Why families are kept in chunks, found in a dict and renumbered lazily: at 1,000 Kaleyra numbers a
family has 1,000 members (one per number), a poll changes one member in each of ~94 families, and
the exposition is lined up again a few times a second. Two phases, as the exporter lives them:

- a first round: 1,000 targets come in random order, the exposition lined up every 50 of them;
- steady polls: every target's lines change once, lined up every 50 polls.

The baseline, measured in the same run, joins each family whole from its members sorted once per
lining up: what the exporter did before its families had chunks.

    python bench/blocks.py [--targets N]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

from exporter.metrics import Family
from exporter.snapshot import _Block

FAMILIES = 94  # families of one Kaleyra answer (bench/scale.py's fake provider)
EVERY = 50  # polls between two linings up
ROUNDS = 3  # steady rounds measured, after one not measured (the first look-ups)
# the chunked blocks' CPU as a share of the baseline's: never more in a first round (targets
# coming cost a bisection each), and a small part of it in steady polls
TARGETS = {"first round": 1.0, "steady round": 0.25}


class Whole:
    """A family joined whole: the members' lines sorted and joined on each lining up after a
    change (the baseline)."""

    def __init__(self) -> None:
        self.members: dict[tuple[str, ...], bytes] = {}
        self.joined: bytes | None = None

    def put(self, member: tuple[str, ...], lines: bytes) -> None:
        if self.members.get(member) != lines:
            self.members[member] = lines
            self.joined = None

    def lines(self, openmetrics: bool) -> list[bytes]:
        if self.joined is None:
            self.joined = b"".join(self.members[m] for m in sorted(self.members))
        return [self.joined]


def phases(make: Callable[[int], object], targets: int) -> tuple[float, float]:
    """CPU seconds of the first round, and of one steady round."""
    rng = random.Random(7)
    members = [
        ("v", "kaleyra", f"acct-{i // 10:03d}", "monitor_stats", f"+1{i // 10:05d}{i % 10:04d}")
        for i in range(targets)
    ]
    rng.shuffle(members)
    blocks = [make(f) for f in range(FAMILIES)]

    def round_of(version: int) -> None:
        for n, member in enumerate(members, 1):
            line = f'whatsapp_f{{number="{member[4]}"}} {version}.0\n'.encode()
            for block in blocks:
                block.put(member, line)  # type: ignore[attr-defined]
            if n % EVERY == 0 or n == len(members):
                for block in blocks:
                    block.lines(False)  # type: ignore[attr-defined]

    started = time.process_time()
    round_of(0)
    first = time.process_time() - started
    round_of(1)
    started = time.process_time()
    for version in range(2, 2 + ROUNDS):
        round_of(version)
    return first, (time.process_time() - started) / ROUNDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=1000)
    args = parser.parse_args(argv)
    ours = phases(lambda f: _Block(Family(f"whatsapp_f{f}", "gauge", "h", ())), args.targets)
    whole = phases(lambda f: Whole(), args.targets)
    ok = True
    for (name, target), mine, base in zip(TARGETS.items(), ours, whole, strict=True):
        ratio = mine / base
        ok &= ratio <= target
        print(
            f"{'PASS' if ratio <= target else 'FAIL'} {name} of {args.targets} targets x "
            f"{FAMILIES} families, lined up every {EVERY} polls: chunked {mine * 1000:.0f} ms, "
            f"joined whole {base * 1000:.0f} ms = x{ratio:.2f} (target <= x{target})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
