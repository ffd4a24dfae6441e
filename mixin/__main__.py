"""Render the rules, the alerts and the dashboards; or check that the committed ones are current."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from mixin import alerts, rules
from mixin.config import SLO_PROVIDERS, Config
from mixin.dashboards import BOARDS, render
from mixin.rulefile import render as render_rules

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = Path("grafana/dashboards")


def rendered(c: Config) -> dict[Path, str]:
    """Relative path -> the text it should have."""
    files = {
        Path("prometheus/rules.yml"): render_rules(rules.groups(c), rules.HEADER),
        Path("prometheus/alerts.yml"): render_rules(alerts.groups(c), alerts.header(c)),
    }
    for name, build in BOARDS.items():
        files[DASHBOARDS / name] = render(build(c))
    return files


def objectives(values: list[str]) -> dict[str, float]:
    """`0.995` for every provider, `d7=0.995` for one; the last word wins."""
    found: dict[str, float] = {}
    for value in values:
        provider, _, ratio = value.rpartition("=")
        for name in [provider] if provider else SLO_PROVIDERS:
            if name not in SLO_PROVIDERS:
                raise SystemExit(f"--objective {value}: no SLO for provider {name!r}")
            found[name] = float(ratio)
            if not 0 < found[name] <= 1:
                raise SystemExit(f"--objective {value}: a ratio in (0, 1], like 0.99")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixin", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file would change")
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write under")
    parser.add_argument("--selector", default=Config.selector, help="e.g. 'job=\"whatsapp\"'")
    parser.add_argument(
        "--objective",
        action="append",
        default=[],
        metavar="[PROVIDER=]RATIO",
        help=f"delivery objective, default {Config.objective}; repeat for several providers",
    )
    parser.add_argument("--runbook-url", default=Config.runbook_url, help="docs/runbooks.md")
    args = parser.parse_args(argv)
    config = replace(
        Config(),
        selector=args.selector,
        runbook_url=args.runbook_url,
        objectives=objectives(args.objective),
    )
    wanted = rendered(config)
    if args.check:
        stale = [
            path
            for path, text in wanted.items()
            if not (args.out / path).is_file() or (args.out / path).read_text("utf-8") != text
        ]
        extra = sorted(
            p.relative_to(args.out)
            for p in (args.out / DASHBOARDS).glob("*.json")
            if p.relative_to(args.out) not in wanted
        )
        for path in stale:
            print(f"{args.out / path} is not what `python -m mixin` writes", file=sys.stderr)
        for path in extra:
            print(f"{args.out / path} is not written by `python -m mixin`", file=sys.stderr)
        if stale or extra:
            print("run: python -m mixin", file=sys.stderr)
            return 1
        return 0
    for path, text in wanted.items():
        (args.out / path).parent.mkdir(parents=True, exist_ok=True)
        (args.out / path).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
