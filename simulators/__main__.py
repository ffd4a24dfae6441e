"""Runs provider simulators in the foreground, for a person or an end-to-end test to point at.

python -m simulators --provider whatsgate --port 8081
python -m simulators --provider all --port 8081 --set whatsgate.rate_limit=120
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any, NoReturn

from simulators import SIMULATORS, Simulator


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {port}")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _option(text: str) -> tuple[str | None, str, Any]:
    """Parses `[provider.]key=value`; the value is JSON when it parses, a string otherwise."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    provider, dot, name = key.rpartition(".")
    if dot and provider not in SIMULATORS:
        raise argparse.ArgumentTypeError(f"unknown provider {provider!r} in {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return (provider or None), name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulators",
        description="Serve simulated WhatsApp gateway provider APIs on loopback.",
    )
    parser.add_argument(
        "--provider",
        required=True,
        choices=[*SIMULATORS, "all"],
        help="which provider to simulate; 'all' uses consecutive ports",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=8081,
        help="port to listen on, the first of one per provider with --provider all (0: any)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--seed", type=int, default=0, help="seed for repeatable random state")
    parser.add_argument("--tick", type=_positive, default=1.0, help="seconds between state changes")
    parser.add_argument(
        "--no-auto",
        action="store_true",
        help="keep the state still (change it through /_sim/ instead)",
    )
    parser.add_argument(
        "--set",
        dest="options",
        metavar="[PROVIDER.]KEY=VALUE",
        type=_option,
        action="append",
        default=[],
        help="a simulator option, e.g. rate_limit=5 or d7.index_delay=0",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    names = list(SIMULATORS) if args.provider == "all" else [args.provider]
    if args.port and args.port + len(names) - 1 > 65535:
        parser.error(f"--port {args.port} leaves no room for {len(names)} consecutive ports")
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for provider, key, value in args.options:
        if provider is None and len(names) > 1:
            parser.error(f"--set {key}=...: name the provider (e.g. whatsgate.{key}) with 'all'")
        target = provider or names[0]
        if target not in options:
            parser.error(f"--set {provider}.{key}: provider {provider} is not running")
        options[target][key] = value

    simulators: list[Simulator] = []

    def fail(message: str) -> NoReturn:
        for running in simulators:
            running.stop()
        parser.error(message)

    try:
        for offset, name in enumerate(names):
            port = args.port + offset if args.port else 0
            try:
                simulator = SIMULATORS[name](
                    host=args.host,
                    port=port,
                    seed=args.seed,
                    auto=not args.no_auto,
                    tick=args.tick,
                    **options[name],
                )
            except (TypeError, ValueError) as exc:
                fail(f"{name}: {exc}")
            try:
                simulator.start()
            except OSError as exc:
                fail(f"{name}: cannot listen on {args.host}:{port}: {exc.strerror or exc}")
            simulators.append(simulator)
    except KeyboardInterrupt:
        for running in simulators:
            running.stop()
        return 130

    for simulator in simulators:
        headers = simulator.credentials()
        accepted = ", ".join(f"{k}: {v}" for k, v in headers.items()) or "none (no auth)"
        print(f"{simulator.name}: base_url={simulator.base_url}  headers: {accepted}", flush=True)
    print(
        "control API: GET <url>/_sim/state, /_sim/requests, POST /_sim/faults; Ctrl-C stops",
        flush=True,
    )

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    while not stopping.wait(0.5):
        pass
    for simulator in simulators:
        simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
