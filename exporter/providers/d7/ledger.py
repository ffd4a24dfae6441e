"""The D7 request ledger: every request id the exporter was given, followed to its final status.

D7 answers for one request id at a time and nothing lists them, so ids come in from the sending
application and from D7's delivery webhooks and are kept in SQLite (WAL): an id is committed
before it is acknowledged, and a message's statuses are counted in the same transaction that
records them as seen, so neither a restart nor a `kill -9` loses an id or counts a status twice.

Counters and histograms are kept in memory for rendering and loaded back from the database at
start; the database is the truth, memory is a cache updated after each commit.
"""

from __future__ import annotations

import bisect
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = (
    "processed",
    "scheduled",
    "sent",
    "delivered",
    "read",
    "un_delivered",
    "rejected",
    "insufficient_credit",
)
FINAL = frozenset({"read", "un_delivered", "rejected", "insufficient_credit"})
# a message that was read was delivered, and one that was delivered was sent, even when no
# answer showed the step in between: counting them keeps delivered/read ratios right
IMPLIES = {"read": ("delivered", "sent"), "delivered": ("sent",)}
CONVERSATION_TYPES = frozenset({"marketing", "utility", "service", "authentication"})
MESSAGE_TYPES = frozenset({"text", "attachment", "location", "contacts", "template"})
TIMED = ("delivered", "read")
BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    account TEXT NOT NULL,
    request_id TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    next_poll_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_found_since REAL,
    finished_at REAL,
    sent_at REAL,
    PRIMARY KEY (account, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_due ON requests (account, next_poll_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS requests_age ON requests (state, accepted_at);
CREATE INDEX IF NOT EXISTS requests_finished ON requests (account, finished_at)
    WHERE state != 'pending';
CREATE TABLE IF NOT EXISTS messages (
    account TEXT NOT NULL,
    request_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    status TEXT NOT NULL,
    reached TEXT NOT NULL,
    delivered_at REAL,
    PRIMARY KEY (account, request_id, msg_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_counts (
    account TEXT NOT NULL,
    status TEXT NOT NULL,
    conversation_type TEXT NOT NULL,
    message_type TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (account, status, conversation_type, message_type)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_seconds (
    account TEXT NOT NULL,
    status TEXT NOT NULL,
    bucket INTEGER NOT NULL,   -- index into BUCKETS; len(BUCKETS) is +Inf
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    PRIMARY KEY (account, status, bucket)
) WITHOUT ROWID;
"""


class LedgerError(Exception):
    """The store cannot be opened or written (path, permissions, a corrupt file)."""


@dataclass(frozen=True)
class MessageUpdate:
    """One message's status as an answer or a webhook told it; ids are never labels."""

    msg_id: str
    status: str
    conversation_type: str = ""
    message_type: str = ""
    at: float | None = None  # when the status happened, if the source says (webhooks do)


@dataclass(frozen=True)
class Due:
    account: str
    request_id: str
    accepted_at: float
    attempts: int
    not_found_since: float | None


@dataclass(frozen=True)
class Schedule:
    """How one account's ids are followed; from its config."""

    first: float = 30.0
    max: float = 1800.0
    not_found_grace: float = 600.0
    final_after: float = 86400.0
    expire_after: float = 259200.0
    keep_finished: float = 604800.0


@dataclass
class Totals:
    """What the metrics show for one account, as plain numbers."""

    messages: dict[tuple[str, str, str], int] = field(default_factory=dict)
    buckets: dict[str, list[int]] = field(default_factory=dict)  # status -> per-bucket counts
    sums: dict[str, float] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))


STATES = ("pending", "done", "expired")


def normalise_status(raw: object) -> str:
    status = str(raw or "").strip().lower().replace(" ", "_").replace("-", "_")
    return status if status in STATUSES else "unknown"


def _bounded(raw: object, known: frozenset[str]) -> str:
    value = str(raw or "").strip().lower()
    return value if value in known else ("other" if value else "unknown")


class Ledger:
    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged id survives power loss
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open the D7 ledger at {path}: {exc}") from None
        self._totals: dict[str, Totals] = {}
        self._load_totals()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # --- taking ids in ---

    def add(self, account: str, request_ids: Sequence[str], schedule: Schedule) -> int:
        """Track these ids; returns how many were new. Committed before it returns."""
        now = self._clock()
        rows = [(account, rid, now, now + schedule.first) for rid in dict.fromkeys(request_ids)]
        with self._lock, self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO requests (account, request_id, accepted_at, next_poll_at)"
                " VALUES (?, ?, ?, ?)",
                rows,
            )
            new = self._db.total_changes - before
            self._totals_for(account).states["pending"] += new
        if new:
            self._changed()
        return new

    def report(
        self,
        account: str,
        events: Sequence[tuple[str, MessageUpdate, float | None]],
        schedule: Schedule,
    ) -> None:
        """Delivery webhooks, (request id, status, send time if known) each, in one transaction:
        an unknown id starts being tracked, and each status counts once.

        A webhook speaks for one message, so only a poll, whose answer lists every message of
        the request, decides that a request is done."""
        now = self._clock()
        with self._lock, self._transaction():
            for request_id, update, sent_at in events:
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO requests (account, request_id, accepted_at,"
                    " next_poll_at) VALUES (?, ?, ?, ?)",
                    (account, request_id, now, now + schedule.first),
                ).rowcount
                self._totals_for(account).states["pending"] += inserted
                if sent_at is not None:
                    self._db.execute(
                        "UPDATE requests SET sent_at = COALESCE(sent_at, ?)"
                        " WHERE account = ? AND request_id = ?",
                        (sent_at, account, request_id),
                    )
                self._apply(account, request_id, [update], now)
        self._changed()

    # --- following ids ---

    def due(self, account: str, limit: int) -> list[Due]:
        """The ids whose next poll is due, oldest due first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, accepted_at, attempts, not_found_since FROM requests"
                " WHERE account = ? AND state = 'pending' AND next_poll_at <= ?"
                " ORDER BY next_poll_at LIMIT ?",
                (account, self._clock(), limit),
            ).fetchall()
        return [Due(account, rid, acc, att, nf) for rid, acc, att, nf in rows]

    def record(
        self,
        account: str,
        answers: Iterable[tuple[Due, list[MessageUpdate] | None, str | None]],
        schedule: Schedule,
    ) -> None:
        """Write one poll cycle's answers in one transaction.

        Each answer is (id, its messages, None), or (id, None, "not_found"), or (id, None,
        "gone") for an id D7 will never know (a malformed id), or (id, None, "retry").
        """
        now = self._clock()
        with self._lock, self._transaction():
            for due, updates, problem in answers:
                if updates is not None:
                    self._apply(account, due.request_id, updates, now)
                    self._settle(account, due.request_id, now, schedule)
                elif problem == "not_found":
                    since = due.not_found_since or now
                    if now - since >= schedule.not_found_grace:
                        self._finish(account, due.request_id, "expired", now)
                    else:
                        self._retry(account, due, now, schedule, not_found_since=since)
                elif problem == "gone":
                    self._finish(account, due.request_id, "expired", now)
                else:
                    self._retry(account, due, now, schedule)
            self._expire_old(account, now, schedule)
        self._changed()

    def expire_old(self, account: str, schedule: Schedule) -> None:
        with self._lock, self._transaction():
            changed = self._expire_old(account, self._clock(), schedule)
        if changed:
            self._changed()

    # --- reading ---

    def totals(self) -> dict[str, Totals]:
        with self._lock:
            return {
                account: Totals(
                    dict(t.messages),
                    {s: list(b) for s, b in t.buckets.items()},
                    dict(t.sums),
                    dict(t.states),
                )
                for account, t in self._totals.items()
            }

    def oldest_pending(self, account: str) -> float | None:
        """When the oldest id still pending came in (for the status page)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(accepted_at) FROM requests WHERE account = ? AND state = 'pending'",
                (account,),
            ).fetchone()
        return row[0] if row else None

    def pending_count(self, account: str) -> int:
        with self._lock:
            return self._totals_for(account).states["pending"]

    # --- inside a transaction ---

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._reload_totals)

    def _reload_totals(self) -> None:
        """After a rollback the cache may hold counts the database does not: rebuild it."""
        self._totals = {}
        self._load_totals()

    def _totals_for(self, account: str) -> Totals:
        return self._totals.setdefault(account, Totals())

    def _apply(
        self, account: str, request_id: str, updates: Sequence[MessageUpdate], now: float
    ) -> None:
        """Count, once each, the statuses (and the ones they imply) not seen before."""
        totals = self._totals_for(account)
        start = None
        for update in updates:
            status = normalise_status(update.status)
            row = self._db.execute(
                "SELECT reached, delivered_at FROM messages"
                " WHERE account = ? AND request_id = ? AND msg_id = ?",
                (account, request_id, update.msg_id),
            ).fetchone()
            reached = set(row[0].split(",")) - {""} if row else set()
            delivered_at = row[1] if row else None
            new = [s for s in (status, *IMPLIES.get(status, ())) if s not in reached]
            labels = (
                _bounded(update.conversation_type, CONVERSATION_TYPES),
                _bounded(update.message_type, MESSAGE_TYPES),
            )
            at = update.at if update.at is not None else now
            for reached_status in new:
                key = (reached_status, *labels)
                totals.messages[key] = totals.messages.get(key, 0) + 1
                self._db.execute(
                    "INSERT INTO message_counts VALUES (?, ?, ?, ?, 1) ON CONFLICT DO UPDATE"
                    " SET count = count + 1",
                    (account, *key),
                )
                if reached_status in TIMED and reached_status == status:
                    if start is None:
                        start = self._start_of(account, request_id)
                    self._observe(account, reached_status, max(0.0, at - start))
            if status == "delivered" and delivered_at is None:
                delivered_at = at
            reached |= set(new)
            current = status if status != "unknown" or not row else _latest(reached)
            self._db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                " status = excluded.status, reached = excluded.reached,"
                " delivered_at = excluded.delivered_at",
                (
                    account,
                    request_id,
                    update.msg_id,
                    current,
                    ",".join(sorted(reached)),
                    delivered_at,
                ),
            )

    def _start_of(self, account: str, request_id: str) -> float:
        accepted, sent = self._db.execute(
            "SELECT accepted_at, sent_at FROM requests WHERE account = ? AND request_id = ?",
            (account, request_id),
        ).fetchone()
        return sent if sent is not None else accepted

    def _observe(self, account: str, status: str, seconds: float) -> None:
        totals = self._totals_for(account)
        index = bisect.bisect_left(BUCKETS, seconds)
        counts = totals.buckets.setdefault(status, [0] * (len(BUCKETS) + 1))
        counts[index] += 1
        totals.sums[status] = totals.sums.get(status, 0.0) + seconds
        self._db.execute(
            "INSERT INTO delivery_seconds VALUES (?, ?, ?, 1, ?) ON CONFLICT DO UPDATE"
            " SET count = count + 1, sum = sum + excluded.sum",
            (account, status, index, seconds),
        )

    def _settle(self, account: str, request_id: str, now: float, schedule: Schedule) -> None:
        """Done when every message is final, or delivered and `final_after` has passed."""
        state, attempts = self._db.execute(
            "SELECT state, attempts FROM requests WHERE account = ? AND request_id = ?",
            (account, request_id),
        ).fetchone()
        if state != "pending":
            return
        finals = self._db.execute(
            "SELECT reached, delivered_at FROM messages WHERE account = ? AND request_id = ?",
            (account, request_id),
        ).fetchall()
        waiting_for_read = [d for r, d in finals if not (set(r.split(",")) & FINAL)]
        if finals and all(
            d is not None and now - d >= schedule.final_after for d in waiting_for_read
        ):
            self._finish(account, request_id, "done", now)
            return
        delay = min(schedule.first * 2 ** min(attempts, 30), schedule.max)
        self._db.execute(
            "UPDATE requests SET attempts = attempts + 1, next_poll_at = ?, not_found_since = NULL"
            " WHERE account = ? AND request_id = ?",
            (now + delay, account, request_id),
        )

    def _retry(
        self,
        account: str,
        due: Due,
        now: float,
        schedule: Schedule,
        *,
        not_found_since: float | None = None,
    ) -> None:
        delay = min(schedule.first * 2 ** min(due.attempts, 30), schedule.max)
        if not_found_since is not None:  # a fresh id: ask again soon, within the grace
            delay = min(delay, max(1.0, schedule.not_found_grace / 4))
        self._db.execute(
            "UPDATE requests SET attempts = attempts + 1, next_poll_at = ?, not_found_since = ?"
            " WHERE account = ? AND request_id = ?",
            (now + delay, not_found_since, account, due.request_id),
        )

    def _finish(self, account: str, request_id: str, state: str, now: float) -> None:
        changed = self._db.execute(
            "UPDATE requests SET state = ?, finished_at = ? WHERE account = ? AND request_id = ?"
            " AND state = 'pending'",
            (state, now, account, request_id),
        ).rowcount
        if changed:
            states = self._totals_for(account).states
            states["pending"] -= 1
            states[state] += 1

    def _expire_old(self, account: str, now: float, schedule: Schedule) -> bool:
        expired = self._db.execute(
            "UPDATE requests SET state = 'expired', finished_at = ? WHERE account = ?"
            " AND state = 'pending' AND accepted_at < ?",
            (now, account, now - schedule.expire_after),
        ).rowcount
        pruned = self._db.execute(
            "DELETE FROM requests WHERE account = ? AND state != 'pending' AND finished_at < ?"
            " RETURNING state",
            (account, now - schedule.keep_finished),
        ).fetchall()
        if pruned:
            self._db.execute(
                "DELETE FROM messages WHERE account = ? AND request_id NOT IN"
                " (SELECT request_id FROM requests WHERE account = ?)",
                (account, account),
            )
        states = self._totals_for(account).states
        states["pending"] -= expired
        states["expired"] += expired
        for (state,) in pruned:
            states[state] -= 1
        return bool(expired or pruned)

    def _load_totals(self) -> None:
        for account, state, count in self._db.execute(
            "SELECT account, state, COUNT(*) FROM requests GROUP BY account, state"
        ):
            self._totals_for(account).states[state] = count
        for account, *key, count in self._db.execute("SELECT * FROM message_counts"):
            self._totals_for(account).messages[tuple(key)] = count
        for account, status, bucket, count, total in self._db.execute(
            "SELECT * FROM delivery_seconds"
        ):
            totals = self._totals_for(account)
            totals.buckets.setdefault(status, [0] * (len(BUCKETS) + 1))[bucket] = count
            totals.sums[status] = totals.sums.get(status, 0.0) + total


def _latest(reached: set[str]) -> str:
    order = {status: index for index, status in enumerate(STATUSES)}
    return max(reached, key=lambda s: order.get(s, -1), default="unknown")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: nothing is half written."""

    def __init__(self, db: sqlite3.Connection, on_rollback: Callable[[], None]):
        self._db = db
        self._on_rollback = on_rollback

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot write the D7 ledger: {exc}") from None

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self._db.execute("COMMIT")
                return
            self._db.execute("ROLLBACK")
        except sqlite3.Error as error:
            exc = error
        self._on_rollback()
        if isinstance(exc, sqlite3.Error):
            raise LedgerError(f"cannot write the D7 ledger: {exc}") from None
