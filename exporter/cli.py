"""`whatsapp-exporter`: Prometheus-style flags; every failure is a message, never a traceback."""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from exporter import __version__, logs
from exporter.config import ConfigError, load_config
from exporter.providers import ACCOUNT_MODELS
from exporter.web import DEFAULT_PORT, ListenAddressError, parse_listen_address

log = logging.getLogger("exporter")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="whatsapp-exporter",
        description="Prometheus exporter for WhatsApp gateway providers "
        "(WhatsGate, Betatel, D7 Networks, Kaleyra).",
    )
    parser.add_argument(
        "--config.file",
        dest="config_file",
        default="config.yaml",
        help="path of the YAML config (default: %(default)s)",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=f":{DEFAULT_PORT}",
        help="address to serve /metrics on (default: %(default)s)",
    )
    parser.add_argument(
        "--storage.path",
        dest="storage_path",
        default=None,
        help="SQLite file of the D7 request ledger (default: %(default)s, in the working dir)",
    )
    parser.add_argument("--log.level", dest="log_level", choices=logs.LEVELS, default="info")
    parser.add_argument(
        "--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt"
    )
    parser.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the config file, print every error and exit (0 ok, 2 bad)",
    )
    parser.add_argument(
        "--demo", action="store_true", help="start the built-in provider simulators and poll them"
    )
    parser.add_argument("--version", action="version", version=f"whatsapp-exporter {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        parse_listen_address(args.listen_address)
    except ListenAddressError as exc:
        print(f"whatsapp-exporter: {exc}", file=sys.stderr)
        return 2
    if args.demo:
        from exporter import demo  # noqa: PLC0415 - the simulators load only when asked for

        return demo.run(args.listen_address, args.storage_path)
    storage_path = args.storage_path or "whatsapp-exporter.db"

    load = functools.partial(load_config, args.config_file, ACCOUNT_MODELS)
    try:
        config = load()
    except ConfigError as exc:
        print(f"{args.config_file}: invalid config, {len(exc.errors)} error(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    if args.config_check:
        print(f"{args.config_file}: OK, {len(config.accounts())} account(s)")
        return 0
    return serve(load, config, args.listen_address, storage_path)


def serve(load, config, listen_address: str, storage_path: str) -> int:
    from exporter.app import Exporter, run_until_stopped  # noqa: PLC0415 - keeps --config.check light

    exporter = Exporter(load, listen_address, storage_path=storage_path)
    return run_until_stopped(exporter.run(config), listen_address)
