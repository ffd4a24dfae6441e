"""`whatsapp-exporter`: Prometheus-style flags; every failure is a message, never a traceback."""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from exporter import build, logs
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
        "--web.ingest-address",
        dest="ingest_address",
        default=None,
        help="a second address serving only the ingest API and webhooks (for the internet)",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="exporter-toolkit web config: TLS, client certificates, basic auth, headers",
    )
    parser.add_argument(
        "--web.enable-lifecycle",
        dest="lifecycle",
        action="store_true",
        help="allow POST /-/reload (SIGHUP always reloads)",
    )
    parser.add_argument(
        "--storage.path",
        dest="storage_path",
        default=None,
        help="directory of the exporter's own state, created if missing (default: data/)",
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
    parser.add_argument("--version", action="version", version=str(build.current()))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        parse_listen_address(args.listen_address)
        if args.ingest_address:
            parse_listen_address(args.ingest_address, flag="--web.ingest-address")
    except ListenAddressError as exc:
        print(f"whatsapp-exporter: {exc}", file=sys.stderr)
        return 2
    if args.demo:
        from exporter import demo  # noqa: PLC0415 - the simulators load only when asked for

        return demo.run(args.listen_address, args.storage_path)
    storage_path = args.storage_path or "data"

    load = functools.partial(load_config, args.config_file, ACCOUNT_MODELS)
    try:
        config = load()
    except ConfigError as exc:
        print(f"{args.config_file}: invalid config, {len(exc.errors)} error(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    guard = None
    if args.web_config_file:
        from exporter.webconfig import WebConfigError, WebConfigWatcher, WebGuard  # noqa: PLC0415

        try:
            guard = WebGuard(WebConfigWatcher(args.web_config_file))
        except WebConfigError as exc:
            print(
                f"{args.web_config_file}: invalid web config, {len(exc.errors)} error(s):",
                file=sys.stderr,
            )
            for error in exc.errors:
                print(f"  {error}", file=sys.stderr)
            return 2
    if args.config_check:
        print(f"{args.config_file}: OK, {len(config.accounts())} account(s)")
        return 0
    return serve(load, config, args, storage_path, guard)


def serve(load, config, args: argparse.Namespace, storage_path: str, guard=None) -> int:
    from exporter.app import Exporter, run_until_stopped  # noqa: PLC0415 - keeps --config.check light

    exporter = Exporter(
        load,
        args.listen_address,
        storage_path=storage_path,
        lifecycle=args.lifecycle,
        ingest_address=args.ingest_address,
        security=guard.current if guard else None,
        tls=guard.tls if guard else None,
    )
    return run_until_stopped(exporter.run(config), args.listen_address)
