"""The D7 request ledger: every request id the exporter was given, followed to its final status.

D7 answers for one request id at a time and nothing lists them, so ids come in from the sending
application and from D7's delivery webhooks and are kept in SQLite (WAL), or in a PostgreSQL
database that replicas share (`open_ledger`): an id is committed before it is acknowledged, and a
message's statuses are counted in the same transaction that records them as seen, so neither a
restart nor a `kill -9` loses an id or counts a status twice. The rules are written once; a
`Store` (stores.py) says what differs between the two.

Counts are rows, written in the transaction that changes what they count; memory holds a cache
of the totals for rendering, to which a process adds what it counted after each commit. With
PostgreSQL other replicas write too, so the cache is also read back from the tables every second.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exporter.providers.d7.stores import LedgerError, PostgresStore, SQLiteStore, Store

log = logging.getLogger(__name__)

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
REFRESH_EVERY = 1.0  # seconds between reads of a shared ledger's counts


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


def _storable(text: str) -> str:
    """Ids are kept as given, but PostgreSQL's text cannot hold NUL (JSON's "\\u0000")."""
    return text.replace("\0", "\ufffd") if "\0" in text else text


def open_ledger(
    location: str, *, password: str | None = None, clock: Callable[[], float] = time.time
) -> Ledger:
    """`postgresql://...` or `postgres://...`: the PostgreSQL database replicas share (libpq's
    URL; `password` wins over one in it, and PGPASSWORD or PGPASSFILE serve as libpq reads them).
    Anything else is the path of a SQLite file."""
    if location.startswith(("postgresql://", "postgres://")):
        return Ledger(PostgresStore(location, password), clock=clock)
    return Ledger(location, clock=clock)


@dataclass
class _Counted:
    """What one transaction counted: written just before its COMMIT, added to memory after."""

    messages: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    observed: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # per bucket
    seconds: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # their sum
    states: Counter[tuple[str, str]] = field(default_factory=Counter)  # requests moved


class Ledger:
    """The ledger on a SQLite file (`Ledger(path)`) or on any `Store` (see `open_ledger`)."""

    def __init__(self, where: str | Path | Store, *, clock: Callable[[], float] = time.time):
        self._store = where if isinstance(where, Store) else SQLiteStore(where)
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._counted = _Counted()
        self._totals: dict[str, Totals] = {}
        self._closed = threading.Event()
        try:
            # under the whole-ledger lock: replicas starting at once create the schema once
            with self._lock, self._transaction(failure=f"cannot open {self}"):
                for statement in self._store.statements():
                    self._store.execute(statement)
            with self._lock:
                self._totals = self._load_totals()
        except LedgerError:
            self._store.close()
            raise
        self._refresher = None
        if self._store.shared:
            self._refresher = threading.Thread(
                target=self._refresh_forever, name="d7-ledger-counts", daemon=True
            )
            self._refresher.start()

    def __str__(self) -> str:
        return f"the D7 ledger at {self._store.where}"

    def close(self) -> None:
        self._closed.set()
        if self._refresher is not None:
            self._refresher.join(REFRESH_EVERY * 5)
        with self._lock:
            self._store.close()

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # --- taking ids in ---

    def add(self, account: str, request_ids: Sequence[str], schedule: Schedule) -> int:
        """Track these ids; returns how many were new. Committed before it returns."""
        now = self._clock()
        rows = [
            (account, rid, now, now + schedule.first)
            for rid in dict.fromkeys(_storable(rid) for rid in request_ids)
        ]
        with self._lock, self._transaction(account):
            new = self._store.executemany(
                "INSERT INTO requests (account, request_id, accepted_at, next_poll_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )
            self._counted.states[account, "pending"] += new
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
        with self._lock, self._transaction(account):
            for given_id, update, sent_at in events:
                request_id = _storable(given_id)
                inserted = self._store.execute(
                    "INSERT INTO requests (account, request_id, accepted_at, next_poll_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (account, request_id, now, now + schedule.first),
                ).rowcount
                self._counted.states[account, "pending"] += inserted
                if sent_at is not None:
                    self._store.execute(
                        "UPDATE requests SET sent_at = COALESCE(sent_at, ?)"
                        " WHERE account = ? AND request_id = ?",
                        (sent_at, account, request_id),
                    )
                self._apply(account, request_id, [update], now)
        self._changed()

    # --- following ids ---

    def due(self, account: str, limit: int) -> list[Due]:
        """The ids whose next poll is due, oldest due first."""
        with self._lock, self._reading():
            rows = self._store.execute(
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
        with self._lock, self._transaction(account):
            for due, updates, problem in answers:
                if updates is not None:
                    messages = self._apply(account, due.request_id, updates, now)
                    self._settle(account, due, messages, now, schedule)
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
        with self._lock, self._transaction(account):
            changed = self._expire_old(account, self._clock(), schedule)
        if changed:
            self._changed()

    # --- reading ---

    def totals(self) -> dict[str, Totals]:
        """From memory: never waits for the store (the event loop renders from it)."""
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
        with self._lock, self._reading():
            row = self._store.execute(
                "SELECT MIN(accepted_at) FROM requests WHERE account = ? AND state = 'pending'",
                (account,),
            ).fetchone()
        return row[0] if row else None

    def pending_count(self, account: str) -> int:
        with self._lock:
            return self._totals_for(account).states["pending"]

    # --- counts ---

    def _totals_for(self, account: str) -> Totals:
        return self._totals.setdefault(account, Totals())

    def _load_totals(self) -> dict[str, Totals]:
        """The totals as the tables hold them."""
        counted = _Counted()
        with self._reading():
            for account, status, conversation, kind, count in self._store.execute(
                "SELECT account, status, conversation_type, message_type, count FROM message_counts"
            ).fetchall():
                counted.messages[account, status, conversation, kind] = count
            for account, status, bucket, count, total in self._store.execute(
                "SELECT account, status, bucket, count, sum FROM delivery_seconds"
            ).fetchall():
                counted.observed[account, status, bucket] = count
                counted.seconds[account, status, bucket] = total
            for account, state, count in self._store.execute(self._store.state_counts).fetchall():
                counted.states[account, state] = count
        totals: dict[str, Totals] = {}
        _add_counts(totals, counted)
        return totals

    def _save(self, counted: _Counted) -> None:
        """A transaction's counts, into the tables, in that transaction."""
        if counted.messages:
            self._store.executemany(
                "INSERT INTO message_counts VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                " (account, status, conversation_type, message_type)"
                " DO UPDATE SET count = message_counts.count + excluded.count",
                [(*key, count) for key, count in counted.messages.items()],
            )
        if counted.observed:
            self._store.executemany(
                "INSERT INTO delivery_seconds VALUES (?, ?, ?, ?, ?) ON CONFLICT"
                " (account, status, bucket) DO UPDATE SET"
                " count = delivery_seconds.count + excluded.count,"
                " sum = delivery_seconds.sum + excluded.sum",
                [(*key, n, counted.seconds[key]) for key, n in counted.observed.items()],
            )
        moved = [(*key, change) for key, change in counted.states.items() if change]
        if moved:
            self._store.count_states(moved)

    def _refresh_forever(self) -> None:
        """Other replicas' writes: a shared ledger's counts are read back every second, and
        the listeners told when they moved."""
        failing = False
        while not self._closed.wait(REFRESH_EVERY):
            try:
                with self._lock:
                    if self._closed.is_set():
                        return
                    fresh = self._load_totals()
                    moved = fresh != self._totals
                    self._totals = fresh
            except LedgerError as exc:
                if not failing:
                    log.warning(
                        "the D7 ledger's counts cannot be read; showing the last ones read",
                        extra={"fields": {"error": str(exc)}},
                    )
                failing = True
                continue
            if failing:
                log.info("the D7 ledger's counts can be read again")
                failing = False
            if moved:
                self._changed()

    # --- inside a transaction ---

    def _transaction(
        self, account: str | None = None, *, failure: str = "cannot write the D7 ledger"
    ) -> _Transaction:
        """A write transaction for one account's rows, or (None) for the whole ledger."""
        return _Transaction(self, account, failure)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except self._store.errors as exc:
            raise LedgerError(f"cannot read the D7 ledger: {self._store.reason(exc)}") from None

    def _apply(
        self, account: str, request_id: str, updates: Sequence[MessageUpdate], now: float
    ) -> list[tuple[set[str], float | None]]:
        """Count, once each, the statuses (and the ones they imply) not seen before. Returns
        every message of the request as (statuses reached, when delivered), after the updates."""
        messages = {
            msg_id: (set(reached.split(",")) - {""}, delivered_at)
            for msg_id, reached, delivered_at in self._store.execute(
                "SELECT msg_id, reached, delivered_at FROM messages"
                " WHERE account = ? AND request_id = ?",
                (account, request_id),
            ).fetchall()
        }
        start = None
        for update in updates:
            msg_id = _storable(update.msg_id)
            status = normalise_status(update.status)
            seen = msg_id in messages
            reached, delivered_at = messages.get(msg_id, (set(), None))
            new = [s for s in (status, *IMPLIES.get(status, ())) if s not in reached]
            labels = (
                _bounded(update.conversation_type, CONVERSATION_TYPES),
                _bounded(update.message_type, MESSAGE_TYPES),
            )
            at = update.at if update.at is not None else now
            for reached_status in new:
                self._counted.messages[account, reached_status, *labels] += 1
                if reached_status in TIMED and reached_status == status:
                    if start is None:
                        start = self._start_of(account, request_id)
                    self._observe(account, reached_status, max(0.0, at - start))
            if status == "delivered" and delivered_at is None:
                delivered_at = at
            reached = reached | set(new)
            messages[msg_id] = (reached, delivered_at)
            current = status if status != "unknown" or not seen else _latest(reached)
            self._store.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account, request_id, msg_id) DO UPDATE SET"
                " status = excluded.status, reached = excluded.reached,"
                " delivered_at = excluded.delivered_at",
                (account, request_id, msg_id, current, ",".join(sorted(reached)), delivered_at),
            )
        return list(messages.values())

    def _start_of(self, account: str, request_id: str) -> float:
        accepted, sent = self._store.execute(
            "SELECT accepted_at, sent_at FROM requests WHERE account = ? AND request_id = ?",
            (account, request_id),
        ).fetchone()
        return sent if sent is not None else accepted

    def _observe(self, account: str, status: str, seconds: float) -> None:
        bucket = bisect.bisect_left(BUCKETS, seconds)
        self._counted.observed[account, status, bucket] += 1
        self._counted.seconds[account, status, bucket] += seconds

    def _settle(
        self,
        account: str,
        due: Due,
        messages: list[tuple[set[str], float | None]],
        now: float,
        schedule: Schedule,
    ) -> None:
        """Done when every message is final, or delivered and `final_after` has passed."""
        waiting_for_read = [d for reached, d in messages if not (reached & FINAL)]
        if messages and all(
            d is not None and now - d >= schedule.final_after for d in waiting_for_read
        ):
            self._finish(account, due.request_id, "done", now)
            return
        delay = min(schedule.first * 2 ** min(due.attempts, 30), schedule.max)
        self._store.execute(
            "UPDATE requests SET attempts = attempts + 1, next_poll_at = ?, not_found_since = NULL"
            " WHERE account = ? AND request_id = ? AND finished_at IS NULL",
            (now + delay, account, due.request_id),
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
        self._store.execute(
            "UPDATE requests SET attempts = attempts + 1, next_poll_at = ?, not_found_since = ?"
            " WHERE account = ? AND request_id = ?",
            (now + delay, not_found_since, account, due.request_id),
        )

    def _finish(self, account: str, request_id: str, state: str, now: float) -> None:
        # "not finished yet", not "state = 'pending'": that would tempt PostgreSQL's planner,
        # until it has statistics, to scan the index of every pending id instead of the key
        changed = self._store.execute(
            "UPDATE requests SET state = ?, finished_at = ? WHERE account = ? AND request_id = ?"
            " AND finished_at IS NULL",
            (state, now, account, request_id),
        ).rowcount
        if changed:
            self._counted.states[account, "pending"] -= 1
            self._counted.states[account, state] += 1

    def _expire_old(self, account: str, now: float, schedule: Schedule) -> bool:
        expired = self._store.execute(
            "UPDATE requests SET state = 'expired', finished_at = ? WHERE account = ?"
            " AND state = 'pending' AND accepted_at < ?",
            (now, account, now - schedule.expire_after),
        ).rowcount
        pruned = self._store.execute(
            "DELETE FROM requests WHERE account = ? AND state != 'pending' AND finished_at < ?"
            " RETURNING request_id, state",
            (account, now - schedule.keep_finished),
        ).fetchall()
        if pruned:
            self._store.executemany(
                "DELETE FROM messages WHERE account = ? AND request_id = ?",
                [(account, request_id) for request_id, _ in pruned],
            )
        self._counted.states[account, "pending"] -= expired
        self._counted.states[account, "expired"] += expired
        for _, state in pruned:
            self._counted.states[account, state] -= 1
        return bool(expired or pruned)


def _add_counts(totals: dict[str, Totals], counted: _Counted) -> None:
    for (account, *key), count in counted.messages.items():
        messages = totals.setdefault(account, Totals()).messages
        messages[tuple(key)] = messages.get(tuple(key), 0) + count
    for (account, status, bucket), count in counted.observed.items():
        t = totals.setdefault(account, Totals())
        t.buckets.setdefault(status, [0] * (len(BUCKETS) + 1))[bucket] += count
        t.sums[status] = t.sums.get(status, 0.0) + counted.seconds[account, status, bucket]
    for (account, state), change in counted.states.items():
        states = totals.setdefault(account, Totals()).states
        states[state] = states.get(state, 0) + change


def _latest(reached: set[str]) -> str:
    order = {status: index for index, status in enumerate(STATUSES)}
    return max(reached, key=lambda s: order.get(s, -1), default="unknown")


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on any exception: nothing is half written. What it counted
    is written just before COMMIT and added to memory just after it, never after a ROLLBACK."""

    def __init__(self, ledger: Ledger, account: str | None, failure: str):
        self._ledger = ledger
        self._store = ledger._store
        self._account = account
        self._failure = failure

    def __enter__(self) -> None:
        try:
            self._store.begin(self._account)
        except self._store.errors as exc:
            raise self._error(exc) from None
        self._ledger._counted = _Counted()

    def __exit__(self, kind, exc, tb) -> None:
        counted, self._ledger._counted = self._ledger._counted, _Counted()
        errors = self._store.errors
        try:
            if kind is None:
                try:
                    self._ledger._save(counted)
                    self._store.commit()
                except errors:
                    with contextlib.suppress(*errors):
                        self._store.rollback()
                    raise
                _add_counts(self._ledger._totals, counted)
                return
            self._store.rollback()
        except errors as error:
            exc = error
        if isinstance(exc, errors):
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> LedgerError:
        return LedgerError(f"{self._failure}: {self._store.reason(exc)}")
