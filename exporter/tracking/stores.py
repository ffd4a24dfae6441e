"""Where a delivery ledger keeps its rows: a SQLite file, or a PostgreSQL database replicas share.

The ledger's rules are written once (ledger.py) against a `Store`, which says only what differs:
how a statement is sent, how a list of ids is passed in one statement, how a write transaction
starts (SQLite: `BEGIN IMMEDIATE`, one writer for the whole file; PostgreSQL: `BEGIN` and advisory
locks that serialise the writers of one account across every replica), the column types, and
where request states are counted. Each provider's ledger has its own tables (`Names.prefix`), so
several share one PostgreSQL database (docs/architecture.md, "Delivery tracking").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {p}requests (
    account TEXT NOT NULL,
    request_id TEXT NOT NULL,
    accepted_at {real} NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    next_poll_at {real} NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_found_since {real},
    finished_at {real},
    sent_at {real},
    PRIMARY KEY (account, request_id)
){table_options}""",
    "CREATE INDEX IF NOT EXISTS {p}requests_due ON {p}requests (account, next_poll_at)"
    " WHERE state = 'pending'",
    "CREATE INDEX IF NOT EXISTS {p}requests_age ON {p}requests (state, accepted_at)",
    "CREATE INDEX IF NOT EXISTS {p}requests_finished ON {p}requests (account, finished_at)"
    " WHERE state != 'pending'",
    """CREATE TABLE IF NOT EXISTS {p}messages (
    account TEXT NOT NULL,
    request_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    status TEXT NOT NULL,
    reached TEXT NOT NULL,
    delivered_at {real},
    PRIMARY KEY (account, request_id, msg_id)
){table_options}""",
    """CREATE TABLE IF NOT EXISTS {p}message_counts (
    account TEXT NOT NULL,
    status TEXT NOT NULL,
    conversation_type TEXT NOT NULL,
    message_type TEXT NOT NULL,
    count {count} NOT NULL,
    PRIMARY KEY (account, status, conversation_type, message_type)
){table_options}""",
    """CREATE TABLE IF NOT EXISTS {p}delivery_seconds (
    account TEXT NOT NULL,
    status TEXT NOT NULL,
    bucket INTEGER NOT NULL,   -- index into BUCKETS, len(BUCKETS) for +Inf
    count {count} NOT NULL,
    sum {real} NOT NULL,
    PRIMARY KEY (account, status, bucket)
){table_options}""",
    # messages per status and detail (Meta: failed, per error code); empty for D7
    """CREATE TABLE IF NOT EXISTS {p}detail_counts (
    account TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    count {count} NOT NULL,
    PRIMARY KEY (account, status, detail)
){table_options}""",
    # webhooks acknowledged but not yet counted, one row per call (a request's events, as the
    # provider's module made them: ids and statuses, never a recipient); the writer counts them
    # and deletes their rows in one transaction (ledger.py, "the journal")
    """CREATE TABLE IF NOT EXISTS {p}journal (
    seq {serial},
    account TEXT NOT NULL,
    events INTEGER NOT NULL,
    schedule TEXT NOT NULL,
    body TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS {p}journal_account ON {p}journal (account, seq)",
)


class LedgerError(Exception):
    """The store cannot be opened or written (path, permissions, a corrupt file, the server).
    `again`: the server undid the transaction only to break a deadlock or a conflict, and the
    same transaction run again may well succeed."""

    def __init__(self, message: str, *, again: bool = False):
        super().__init__(message)
        self.again = again


@dataclass(frozen=True)
class Names:
    """One provider's tables and locks in a store: `prefix` before every table and index name,
    `namespace` the high half of its advisory lock keys (4 bytes)."""

    prefix: str
    namespace: bytes

    @classmethod
    def of(cls, provider: str) -> Names:
        return cls(f"{provider}_", hashlib.sha256(provider.encode()).digest()[:4])

    def sql(self, statement: str) -> str:
        return statement.replace("{p}", self.prefix)

    def lock_key(self, account: str | None) -> int:
        """A stable key per account (sha256, the same in every replica and release); None: the
        whole ledger."""
        digest = hashlib.sha256(account.encode()).digest()[:4] if account is not None else bytes(4)
        return int.from_bytes(self.namespace + digest, "big", signed=True)


class Store:
    """One connection to where the rows are; used by the ledger's writer thread alone."""

    # other processes write here too: counts are kept in tables and read back, not only summed
    shared: ClassVar[bool] = False
    types: ClassVar[dict[str, str]]
    schema: ClassVar[tuple[str, ...]] = ()  # the backend's own tables, after SCHEMA
    state_counts: ClassVar[str]  # a query of (account, state, count)
    in_list: ClassVar[str]  # `column <in_list>` matches the values `pack` made one parameter
    # `many` takes its rows as one JSON array, which the statement reads with json_each
    rows_as_json: ClassVar[bool] = False
    errors: tuple[type[Exception], ...]
    # errors about what a statement was given, not about the database: the same rows fail again
    data_errors: tuple[type[Exception], ...]
    where: str  # for messages: never a secret
    names: Names

    def statements(self) -> list[str]:
        return [
            statement.format(p=self.names.prefix, **self.types)
            for statement in SCHEMA + self.schema
        ]

    def pack(self, values: Sequence[str]) -> Any:
        """Many values as the one parameter of `in_list`."""
        raise NotImplementedError

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Runs `sql` once per row; returns how many rows it changed."""
        raise NotImplementedError

    def many(self, sql: str, same: Sequence[Any], rows: Sequence[Sequence[Any]]) -> int:
        """A statement `_Statements.each` made, for all these rows, each preceded by the
        values all of them share; how many rows it changed."""
        return self.executemany(sql, [(*same, *row) for row in rows])

    def begin(self, accounts: Sequence[str] | None, *, wait: bool = True) -> bool:
        """A write transaction that may change these accounts' statuses, or (None) the whole
        ledger. Taking ids in changes none (`()`): a row lock keeps an id new only once.
        `wait=False`: False, and no transaction, when another replica holds an account."""
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def batch(self) -> contextlib.AbstractContextManager[Any]:
        """Statements sent inside wait for no answer until the block ends (or a result is
        read): one round trip for all of them, where the server is far away."""
        return contextlib.nullcontext()

    def count_states(self, rows: list[tuple[str, str, int]]) -> None:
        """(account, state, change) for the requests this transaction moved."""

    def reason(self, error: Exception) -> str:
        return str(error)

    def again(self, error: Exception) -> bool:
        """Whether `error` only broke a deadlock or a conflict (see `LedgerError.again`)."""
        return False

    def close(self) -> None:
        raise NotImplementedError


class SQLiteStore(Store):
    """One file (WAL), one writing process: request states are counted from the rows at open."""

    types: ClassVar = {
        "real": "REAL",
        "count": "INTEGER",
        "table_options": " WITHOUT ROWID",
        "serial": "INTEGER PRIMARY KEY",
    }
    state_counts: ClassVar = (
        "SELECT account, state, COUNT(*) FROM {p}requests GROUP BY account, state"
    )
    in_list: ClassVar = "IN (SELECT value FROM json_each(?))"
    # a burst's rows in one step of one statement: executemany binds and steps each row,
    # taking and dropping the interpreter's lock each time, while the event loop wants it too
    rows_as_json: ClassVar = True
    errors = (sqlite3.Error,)
    data_errors = (
        sqlite3.IntegrityError,
        sqlite3.DataError,
        sqlite3.ProgrammingError,
        sqlite3.InterfaceError,
    )

    def __init__(self, path: str | Path, names: Names, title: str = "the"):
        self.where = str(path)
        self.names = names
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged id survives power loss
            self._db.execute("PRAGMA busy_timeout=5000")
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open {title} ledger at {path}: {exc}") from None

    def pack(self, values: Sequence[str]) -> str:
        return json.dumps(list(values))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        return self._db.executemany(sql, rows).rowcount

    def many(self, sql: str, same: Sequence[Any], rows: Sequence[Sequence[Any]]) -> int:
        # the shared values as parameters: a float in JSON costs its repr, 0.3 us a time
        return self._db.execute(sql, (*same, json.dumps(rows))).rowcount

    def begin(self, accounts: Sequence[str] | None, *, wait: bool = True) -> bool:
        self._db.execute("BEGIN IMMEDIATE")  # one writer at a time for the whole file
        return True

    def close(self) -> None:
        self._db.close()


# a session that waits longer than this for another replica's transaction gives up (the ingest
# answers 503, retry); one that sits in a transaction this long (a frozen process) is cut off
SESSION = {
    "lock_timeout": "10s",
    "statement_timeout": "60s",
    "idle_in_transaction_session_timeout": "60s",
}
# connection parameters the URL may override: a dead server or a vanished host is noticed
# within seconds, not after the kernel's two hours
CONNECTION = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
    "application_name": "whatsapp-exporter-ledger",
}


class PostgresStore(Store):
    """A database replicas share. Every count lives in a table, changed in the transaction that
    changes what it counts, so any replica reads the same totals."""

    shared: ClassVar = True
    types: ClassVar = {
        "real": "DOUBLE PRECISION",
        "count": "BIGINT",
        "table_options": "",
        "serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    }
    schema: ClassVar = (
        """CREATE TABLE IF NOT EXISTS {p}request_counts (
    account TEXT NOT NULL,
    state TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (account, state)
)""",
    )
    state_counts: ClassVar = "SELECT account, state, count FROM {p}request_counts"
    in_list: ClassVar = "= ANY(?)"

    def __init__(self, url: str, names: Names, password: str | None = None, title: str = "the"):
        self.names = names
        try:
            import psycopg  # noqa: PLC0415 - only a shared ledger needs it
            from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415
        except ImportError:
            raise LedgerError(
                "a PostgreSQL ledger needs psycopg 3: pip install 'psycopg[binary]'"
            ) from None
        self._title = title
        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.data_errors = (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError)
        self._secrets = [password] if password else []
        self.where = redact(url)
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise LedgerError(
                f"cannot open {title} ledger at {self.where}: not a PostgreSQL URL: "
                f"{self.reason(exc)}"
            ) from None
        if params.get("password"):
            self._secrets.append(str(params["password"]))
        if password:
            params["password"] = password  # the file or environment wins over the URL
        self._params = {**CONNECTION, **params}
        self._in_transaction = False
        try:
            self._connection = self._connect()
        except psycopg.Error as exc:
            raise LedgerError(
                f"cannot open {title} ledger at {self.where}: {self.reason(exc)}"
            ) from None

    def _connect(self) -> Any:
        connection = self._psycopg.connect(**self._params, autocommit=True)
        try:
            for name, value in SESSION.items():
                connection.execute(f"SET {name} = '{value}'")
        except self._psycopg.Error:
            connection.close()
            raise
        return connection

    def _again_if_lost(self, call: Callable[[], Any]) -> Any:
        """Once more on a new connection when the old one was lost (a server restart, a
        terminated session): only ever around a statement that starts something anew."""
        if self._connection.broken:  # (not one that close() closed: that stays closed)
            self._connection = self._connect()
        try:
            return call()
        except self._psycopg.OperationalError:
            if not self._connection.broken:
                raise
        self._connection = self._connect()
        return call()

    def pack(self, values: Sequence[str]) -> list[str]:
        return list(values)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        sql = sql.replace("?", "%s")
        if self._in_transaction:
            return self._connection.execute(sql, params)
        return self._again_if_lost(lambda: self._connection.execute(sql, params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        cursor = self._connection.cursor()
        cursor.executemany(sql.replace("?", "%s"), rows)
        return cursor.rowcount

    def begin(self, accounts: Sequence[str] | None, *, wait: bool = True) -> bool:
        """Writers of one account's statuses wait for each other; a whole-ledger writer
        (creating the schema) waits for all of them, and they for it. Every transaction takes
        its accounts' locks in the order of their keys, so two never wait for each other."""
        whole = self.names.lock_key(None)
        keys = sorted({self.names.lock_key(a) for a in accounts or ()})
        if accounts is None:
            lock, params = "SELECT pg_advisory_xact_lock(%s), true", (whole,)
        elif wait:
            lock = (
                "SELECT pg_advisory_xact_lock_shared(%s),"
                " (SELECT count(pg_advisory_xact_lock(k)) > -1 FROM unnest(%s::bigint[]) AS k)"
            )
            params = (whole, keys)
        else:  # every lock tried (bool_and does not stop early): ROLLBACK frees those taken
            lock = (
                "SELECT pg_try_advisory_xact_lock_shared(%s),"
                " (SELECT coalesce(bool_and(pg_try_advisory_xact_lock(k)), true)"
                " FROM unnest(%s::bigint[]) AS k)"
            )
            params = (whole, keys)

        def start() -> bool:
            with self._connection.pipeline():  # BEGIN and the locks: one round trip
                self._connection.execute("BEGIN")
                taken = self._connection.execute(lock, params)
            whole_taken, accounts_taken = taken.fetchone()
            return whole_taken is not False and bool(accounts_taken)

        try:
            began = self._again_if_lost(start)
        except self._psycopg.Error:
            with contextlib.suppress(self._psycopg.Error):
                self._connection.execute("ROLLBACK")
            raise
        if not began:  # (a lock another replica holds: what this one took goes with ROLLBACK)
            self._connection.execute("ROLLBACK")
            return False
        self._in_transaction = True
        return True

    def commit(self) -> None:
        self._in_transaction = False
        self._connection.execute("COMMIT")

    def batch(self) -> contextlib.AbstractContextManager[Any]:
        return self._connection.pipeline()

    def rollback(self) -> None:
        self._in_transaction = False
        self._connection.execute("ROLLBACK")

    def count_states(self, rows: list[tuple[str, str, int]]) -> None:
        self.executemany(
            self.names.sql(
                "INSERT INTO {p}request_counts VALUES (?, ?, ?) ON CONFLICT (account, state)"
                " DO UPDATE SET count = {p}request_counts.count + excluded.count"
            ),
            rows,
        )

    def again(self, error: Exception) -> bool:
        """Replicas inserting the same new ids at once can deadlock on them (in sorted order
        they rarely do); PostgreSQL then undoes one transaction, to be run again."""
        return isinstance(
            error,
            (self._psycopg.errors.DeadlockDetected, self._psycopg.errors.SerializationFailure),
        )

    def reason(self, error: Exception) -> str:
        """One line (libpq's run to several), and never a password."""
        text = " ".join(str(error).split()) or type(error).__name__
        for secret in self._secrets:
            text = text.replace(secret, "<secret>")
        return redact(text)

    def close(self) -> None:
        with contextlib.suppress(self._psycopg.Error):
            self._connection.close()


def redact(text: str) -> str:
    """`postgresql://user:password@host/db` and `password=...` without the password."""
    text = re.sub(r"(://[^:@/\s]*):[^@/\s]*@", r"\1@", text)
    return re.sub(r"(password=)[^&\s]*", r"\1<secret>", text)
