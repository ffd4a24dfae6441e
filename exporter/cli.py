"""`whatsapp-exporter`: Prometheus-style flags; every failure is a message, never a traceback."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import replace

from exporter import build, logs
from exporter.cluster import Shard, ShardError
from exporter.config import Config, ConfigError, load_config, parse_duration, read_secret_file
from exporter.options import DEFAULT_STORAGE, Guard, Options
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
    parser.add_argument(
        "--storage.url",
        dest="storage_url",
        default=None,
        help="postgresql://user@host:5432/db: the D7 ledger in PostgreSQL, shared by replicas, "
        "which then elect a leader per shard (default: SQLite under --storage.path)",
    )
    parser.add_argument(
        "--storage.password-file",
        dest="storage_password_file",
        default=None,
        help="file holding the PostgreSQL password (or libpq's PGPASSWORD / PGPASSFILE)",
    )
    parser.add_argument(
        "--cluster.shard",
        dest="shard",
        default="0/1",
        help="I/N: poll the I-th of N shards of the accounts; auto/N takes I from a StatefulSet "
        "pod's ordinal (default: %(default)s, every account)",
    )
    parser.add_argument(
        "--cluster.lease",
        dest="lease",
        default="15s",
        help="how soon a follower takes over from a leader that died (default: %(default)s)",
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
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    return parser.parse_args(argv)


class _Version(argparse.Action):
    """argparse's own version action re-wraps lines; this prints them as written."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(build.current())
        parser.exit()


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
    load = functools.partial(load_config, args.config_file, ACCOUNT_MODELS)
    try:
        config = load()
    except ConfigError as exc:
        print(f"{args.config_file}: invalid config, {len(exc.errors)} error(s):", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    options = parse_options(args)
    if isinstance(options, str):
        print(f"whatsapp-exporter: {options}", file=sys.stderr)
        return 2
    if args.web_config_file:
        from exporter.webconfig import WebConfigError, WebConfigWatcher, WebGuard  # noqa: PLC0415

        try:
            guard = WebGuard(WebConfigWatcher(args.web_config_file))
            options = replace(options, guard=Guard(guard.current, guard.tls, guard.ingest_tls))
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
    return serve(load, config, options)


def parse_options(args: argparse.Namespace) -> Options | str:
    """The flags as the exporter's options (the web config aside: it has its own errors), or
    the message that says what is wrong."""
    try:
        shard = Shard.parse(args.shard)
        lease = parse_duration(args.lease)
    except ValueError as exc:
        return str(exc) if isinstance(exc, ShardError) else f"--cluster.lease: {exc}"
    if (shard.count > 1 or args.shard.strip().startswith("auto")) and not args.storage_url:
        return "--cluster.shard needs --storage.url: the shards' replicas share one database"
    if lease < 3:
        return "--cluster.lease: at least 3s (the leader confirms its lock every lease/3)"
    password = None
    if args.storage_password_file:
        try:
            password = read_secret_file(args.storage_password_file).get_secret_value()
        except ValueError as exc:
            return f"--storage.password-file: {exc}"
    return Options(
        listen_address=args.listen_address,
        ingest_address=args.ingest_address,
        lifecycle=args.lifecycle,
        storage_path=args.storage_path or DEFAULT_STORAGE,
        storage_url=args.storage_url,
        storage_password=password,
        shard=shard,
        lease=lease,
        own_process=True,
    )


def serve(load: Callable[[], Config], config: Config, options: Options) -> int:
    from exporter.app import Exporter, run_until_stopped  # noqa: PLC0415 - keeps --config.check light
    from exporter.web import raise_open_files_limit  # noqa: PLC0415

    raise_open_files_limit()
    exporter = Exporter(load, options)
    return run_until_stopped(exporter.run(config), options.listen_address)
