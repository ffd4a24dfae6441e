"""A real PostgreSQL for the tests (and the benchmark): Debian's server, started once per session.

`initdb` into a temporary directory, owned and run by the `postgres` OS user when we are root
(the server refuses to run as root), listening on 127.0.0.1 at a free port and on a unix socket
in that directory. The superuser `postgres` administers over the socket without a password; the
ledgers connect over TCP as `exporter`, with a password (scram-sha-256), as a deployment would.
Each test gets a database of its own, dropped after it.

Test modules take the fixtures by importing them: `from tests.postgres import ledger_location`.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
USER = "exporter"
PASSWORD = "s3cret-Ledger-pw"  # the test role's; tests check it never shows in an error


def binaries() -> Path | None:
    """The newest installed server's bin directory (Debian keeps it off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> tuple[int, ...]:
    number = Path(path).parent.parent.name
    return tuple(int(part) for part in number.split(".") if part.isdigit())


def require_binaries() -> Path:
    """Present, or installed here by scripts/install-test-tools, or a failure saying what is
    missing: never a silent skip."""
    found = binaries()
    installer = ROOT / "scripts" / "install-test-tools"
    if found is None and installer.exists() and os.geteuid() == 0:
        subprocess.run([str(installer)], check=False)
        found = binaries()
    if found is None:
        pytest.fail(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): run "
            "`make test` (scripts/install-test-tools installs the Debian package postgresql), "
            "or `apt-get install postgresql`",
            pytrace=False,
        )
    return found


@dataclass
class Server:
    bin: Path
    directory: Path
    port: int
    _names: Iterator[int]

    @property
    def socket_dir(self) -> Path:
        return self.directory / "socket"

    def url(self, database: str, *, password: str | None = PASSWORD) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> list[tuple]:
        """One statement as the superuser, over the unix socket."""
        import psycopg  # noqa: PLC0415 - a SQLite-only run never needs it

        with psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
        ) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def create_database(self) -> str:
        name = f"ledger_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} OWNER {USER} STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def running(*, durable: bool = False) -> Iterator[Server]:
    """A fresh server for as long as the block runs. `durable=False` (the tests) turns fsync
    off: a test kills clients, never the machine. The benchmark keeps PostgreSQL's defaults."""
    bin_dir = require_binaries()
    directory = Path(tempfile.mkdtemp(prefix="pg-test-"))
    as_user = _as_postgres(directory)
    (directory / "socket").mkdir()
    (directory / "pwfile").write_text("postgres\n")
    if as_user:
        for path in (directory, directory / "socket", directory / "pwfile"):
            shutil.chown(path, "postgres", "postgres")
    data, log = directory / "data", directory / "server.log"
    _run(
        [
            bin_dir / "initdb",
            f"--pgdata={data}",
            "--username=postgres",
            f"--pwfile={directory / 'pwfile'}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ],
        as_user,
    )
    port = free_port()
    options = [
        "-c listen_addresses=127.0.0.1",
        f"-c port={port}",
        f"-c unix_socket_directories={directory / 'socket'}",
        "-c max_connections=200",
    ]
    if not durable:
        options += ["-c fsync=off", "-c full_page_writes=off", "-c synchronous_commit=off"]
    server = Server(bin_dir, directory, port, itertools.count(1))
    try:
        _run(
            [
                bin_dir / "pg_ctl",
                "start",
                "--wait",
                f"--pgdata={data}",
                f"--log={log}",
                f"--options={' '.join(options)}",
            ],
            as_user,
        )
        server.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            _run(
                [bin_dir / "pg_ctl", "stop", f"--pgdata={data}", "--mode=immediate", "--wait"],
                as_user,
            )
        shutil.rmtree(directory, ignore_errors=True)


def _as_postgres(directory: Path) -> bool:
    """Root runs the server as the `postgres` user that Debian's package creates."""
    if os.geteuid() != 0:
        return False
    try:
        shutil.chown(directory, "postgres", "postgres")
    except LookupError:
        pytest.fail("running as root, and there is no `postgres` user to run PostgreSQL as")
    return True


def _run(command: list, as_user: bool) -> None:
    user = {"user": "postgres", "group": "postgres", "extra_groups": []} if as_user else {}
    done = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        cwd="/",
        check=False,
        **user,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[Server]:
    with running() as server:
        yield server


@pytest.fixture(name="postgres_url")
def postgres_url_fixture(postgres_server: Server) -> Iterator[str]:
    """A database of this test's own, as `postgresql://exporter:<password>@127.0.0.1:<port>/..`."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(
    name="ledger_location",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.processes)],
)
def ledger_location_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a ledger lives, for each backend: a SQLite file, or a PostgreSQL database. The
    server starts only when a PostgreSQL case runs."""
    if request.param == "sqlite":
        return str(tmp_path / "l.db")
    return request.getfixturevalue("postgres_url")
