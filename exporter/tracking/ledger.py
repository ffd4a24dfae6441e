"""A delivery ledger: message ids followed to their final status, each status counted once.

A provider that reports what happened to each message (D7 per request id, polled and by webhook;
Meta's Cloud API by webhook) hands the ledger (message id, status, time, category) updates; how a
provider's statuses relate is its `Vocabulary`. Ids are kept in SQLite (WAL) or in a PostgreSQL
database that replicas share (`open_ledger`): an update is committed before it is acknowledged,
and a message's statuses are counted in the transaction that records them as seen, so neither a
restart nor a `kill -9` loses an update or counts a status twice. The rules are written once; a
`Store` (stores.py) says what differs between the two.

One writer thread owns the store's connection (docs/architecture.md, "Delivery tracking"). Every
call is a job on its queue and returns a future (`Pending`): the writer takes all the jobs that
queued while it was busy, runs them in one transaction, and resolves their futures after its
COMMIT (group commit: one fsync for many callbacks). A call made on an event loop gets an asyncio
future, and a batch's futures are settled with one wake-up of their loop, not one each. The
totals the metrics show are published after each commit as a new mapping that is never changed
again, so a reader (the event loop) takes them without a lock and never waits for a transaction.
With PostgreSQL other replicas write too, so the writer also reads the totals back every second.

While the writer keeps up, a webhook's statuses are counted in the transaction that commits them.
When webhooks queue faster than that (a campaign's burst), each call is committed as one row of a
journal instead and answered after that COMMIT: durable, at the rate rows can be stored. The
writer counts the journal's rows when no job is waiting (and, past SOFT_BACKLOG, between
batches), deleting them in the transaction that counts them, so each is counted once across
restarts and `kill -9`; what waits is `Totals.backlog`, shown as whatsapp_tracking_backlog_statuses.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import functools
import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pydantic_core

from exporter.tracking.stores import LedgerError, Names, PostgresStore, SQLiteStore, Store

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400)
REFRESH_EVERY = 1.0  # seconds between reads of a shared ledger's counts
# what a call returns: awaited on an event loop (an asyncio future, made there), `.result()` in
# a thread (a concurrent one)
Pending = asyncio.Future | Future
MAX_BATCH = 1024  # jobs in one transaction at most
MAX_DETAILS = 100  # distinct details per account and status; more are counted as "other"
MAX_DETAIL = 32  # characters of one
MAX_SETTLE = 10_000  # requests looked at by one settle_quiet; the next call takes the rest
AGAIN = 3  # runs of a transaction the server undid to break a deadlock, before it fails
# On a shared ledger, jobs whose account another replica has locked (its poll cycle) wait aside,
# tried again this often, while the writer serves the rest; after PATIENCE they wait for it.
BUSY_RETRY = 0.05
PATIENCE = 5.0
STATES = ("pending", "done", "expired")
# The journal (see the top): webhook calls are journaled, not counted at once, when a batch of
# the writer's holds this many of them or this many events, or while the journal holds any
JOURNAL_CALLS = 4
JOURNAL_EVENTS = 256
IDLE = 0.02  # seconds without a job after which the writer counts from the journal
CHUNK = 4096  # events counted from the journal in one transaction, at least one call's
# events waiting: past SOFT, the writer counts a chunk between batches too (acknowledging slows
# to the counting rate); past HARD, webhooks are refused (503: the provider sends them again)
SOFT_BACKLOG = 1_000_000
HARD_BACKLOG = 2_000_000


@dataclass(frozen=True)
class Vocabulary:
    """What one provider's statuses mean: the order a message goes through them, which are
    final, which imply others (a message that was read was delivered), and the bounded values
    its category labels may take. `names` are its tables and locks in a store."""

    title: str  # in messages: "the D7 ledger"
    statuses: tuple[str, ...]
    final: frozenset[str]
    implies: Mapping[str, tuple[str, ...]]
    conversation_types: frozenset[str]
    message_types: frozenset[str]
    names: Names
    timed: tuple[str, ...] = ("delivered", "read")  # observed in the delivery histogram
    # a webhook that brings a final status settles its message: for a provider that is never
    # polled per id (Meta), where nothing else would; D7's webhooks speak for one message of a
    # request, so only its poll settles one
    settled_by_webhooks: bool = False
    # statuses whose detail (Meta: a failure's error code) is counted, once per message that
    # newly reaches them, in Totals.details
    detailed: frozenset[str] = frozenset()
    # a delivery time starts at the `sent` status, or, unknown, at the id's hand-in (D7: the
    # sending app hands ids in as it sends); off, a message whose sent time is unknown is not
    # observed, rather than observed from whenever its first webhook happened to arrive
    timed_from_hand_in: bool = True
    # the conversation_type of a status that names none (design.md: Meta's is "")
    no_conversation_type: str = "unknown"
    # a provider whose webhook events reach `Ledger.report` as its module validated them
    # (JSON-able, pruned to ids, statuses, times and codes: never a recipient) turns them into
    # (id, update, send time) here, in the writer: answering a webhook then costs its parse and
    # one journal row, not an update per status made on the event loop. None: they come as those.
    decode: Callable[[Sequence[Any]], Iterable[tuple[str, MessageUpdate, float | None]]] | None = (
        None
    )

    def status(self, raw: object) -> str:
        status = str(raw or "").strip().lower().replace(" ", "_").replace("-", "_")
        return status if status in self.statuses else "unknown"

    def normalised(self) -> _Normalised:
        return _Normalised(self)

    def latest(self, reached: set[str]) -> str:
        order = {status: index for index, status in enumerate(self.statuses)}
        return max(reached, key=lambda s: order.get(s, -1), default="unknown")


class MessageUpdate(NamedTuple):
    """One message's status as an answer or a webhook told it; ids are never labels. A tuple:
    a burst makes one per event, and a frozen dataclass took three times as long to make."""

    msg_id: str
    status: str
    conversation_type: str = ""
    message_type: str = ""
    at: float | None = None  # when the status happened, if the source says (webhooks do)
    detail: str = ""  # what the status says besides itself (a failure's code), for `detailed`


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

    def delay(self, attempts: int) -> float:
        return min(self.first * 2 ** min(attempts, 30), self.max)


@functools.lru_cache(maxsize=256)
def _schedule_json(schedule: Schedule) -> str:
    """A journal row's schedule, made once: an account's is the same in every row (astuple
    and dumps of it were 4% of the exporter's samples at one status per request)."""
    return json.dumps(dataclasses.astuple(schedule))


@dataclass
class Totals:
    """What the metrics show for one account, as plain numbers. A published one is never
    changed: the writer publishes new ones."""

    messages: dict[tuple[str, str, str], int] = field(default_factory=dict)
    buckets: dict[str, list[int]] = field(default_factory=dict)  # status -> per-bucket counts
    sums: dict[str, float] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    details: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, detail)
    backlog: int = 0  # events acknowledged into the journal, not yet counted

    def copy(self) -> Totals:
        return Totals(
            dict(self.messages),
            {s: list(b) for s, b in self.buckets.items()},
            dict(self.sums),
            dict(self.states),
            dict(self.details),
            self.backlog,
        )


def _bounded(raw: object, known: frozenset[str], missing: str = "unknown") -> str:
    """A category label: one of `known`, "other", or `missing` when none is given; always ""
    for a provider without such categories (Meta has no message types)."""
    if not known:
        return ""
    value = str(raw or "").strip().lower()
    return value if value in known else ("other" if value else missing)


class _Normalised:
    """A vocabulary's statuses and labels as the ledger counts them, each raw value worked out
    once: a burst repeats a handful of values, and the string work was a tenth of its cost. Only
    short strings are remembered, and at most MEMO of each kind: a hostile sender's endless
    new values cost their work, not memory."""

    MEMO = 1024
    LONGEST = 64

    def __init__(self, vocabulary: Vocabulary):
        self._v = vocabulary
        self._memo: tuple[dict[Any, str], dict[Any, str], dict[Any, str]] = ({}, {}, {})
        self._triples: dict[tuple[Any, Any, Any], tuple[str, str, str]] = {}  # of short values
        # each status with the ones it implies, in the order they are counted
        self.chains = {
            status: (status, *vocabulary.implies.get(status, ()))
            for status in (*vocabulary.statuses, "unknown")
        }
        self.reached = {status: frozenset(chain) for status, chain in self.chains.items()}
        # statuses reached, as the messages table keeps them: subsets of the vocabulary's
        # statuses and "unknown", a few hundred at most (and at most MEMO remembered)
        self._texts: dict[frozenset[str], str] = {}

    def text(self, reached: frozenset[str]) -> str:
        found = self._texts.get(reached)
        if found is None:
            found = ",".join(sorted(reached))
            if len(self._texts) < self.MEMO:
                self._texts[reached] = found
        return found

    def labels(self, update: MessageUpdate) -> tuple[str, str, str]:
        """(status, conversation_type, message_type): one look-up for a combination seen
        before, which is nearly every event of a burst."""
        raw = update[1:4]
        found = self._triples.get(raw)
        if found is not None:
            return found
        v, (statuses, conversations, kinds) = self._v, self._memo
        found = (
            self._once(statuses, update.status, v.status),
            self._once(
                conversations,
                update.conversation_type,
                _bounded,
                v.conversation_types,
                v.no_conversation_type,
            ),
            self._once(kinds, update.message_type, _bounded, v.message_types),
        )
        if len(self._triples) < self.MEMO and all(
            type(r) is str and len(r) <= self.LONGEST for r in raw
        ):
            self._triples[raw] = found
        return found

    def _once(self, memo: dict[Any, str], raw: Any, work: Callable[..., str], *more: Any) -> str:
        found = memo.get(raw) if type(raw) is str else None
        if found is None:
            found = work(raw, *more)
            if type(raw) is str and len(raw) <= self.LONGEST and len(memo) < self.MEMO:
                memo[raw] = found
        return found


def _storable(text: str) -> str:
    """Ids are kept as given, but PostgreSQL's text cannot hold NUL (JSON's "\\u0000")."""
    return text.replace("\0", "\ufffd") if "\0" in text else text


def open_ledger(
    location: str,
    *,
    vocabulary: Vocabulary,
    password: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Ledger:
    """`postgresql://...` or `postgres://...`: the PostgreSQL database replicas share (libpq's
    URL; `password` wins over one in it, and PGPASSWORD or PGPASSFILE serve as libpq reads them).
    Anything else is the path of a SQLite file."""
    if location.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(location, vocabulary.names, password, vocabulary.title)
        return Ledger(store, vocabulary=vocabulary, clock=clock)
    return Ledger(location, vocabulary=vocabulary, clock=clock)


@dataclass
class _Counted:
    """What one transaction counted: written just before its COMMIT, published after."""

    messages: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    observed: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # per bucket
    seconds: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # their sum
    states: Counter[tuple[str, str]] = field(default_factory=Counter)  # requests moved
    details: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    backlog: Counter[str] = field(default_factory=Counter)  # journal events added or counted

    def accounts(self) -> set[str]:
        return {
            key[0]
            for counts in (self.messages, self.observed, self.states, self.details)
            for key in counts
        } | set(self.backlog)


@dataclass(slots=True)
class _Job:
    """One call, run by the writer. `accounts`: whose statuses it may change (their locks), or
    None for the whole ledger. Jobs with the same `merge` key run as one (`run` takes all their
    argument tuples at once)."""

    run: Callable[..., Any]
    args: tuple[Any, ...]
    accounts: tuple[str, ...] | None
    future: Pending
    loop: asyncio.AbstractEventLoop | None  # the future's, if it is an asyncio one
    write: bool = True
    merge: Hashable | None = None


class Ledger:
    """A ledger on a SQLite file (`Ledger(path, vocabulary=...)`) or on any `Store`."""

    def __init__(
        self,
        where: str | Path | Store,
        *,
        vocabulary: Vocabulary,
        clock: Callable[[], float] = time.time,
    ):
        self._v = vocabulary
        self._store = (
            where
            if isinstance(where, Store)
            else SQLiteStore(where, vocabulary.names, vocabulary.title)
        )
        self._sql = _Statements(vocabulary.names, self._store)
        self._normalised = vocabulary.normalised()  # (the writer's alone)
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []
        self._counted = _Counted()
        self._totals: Mapping[str, Totals] = {}
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._gate = threading.Lock()  # a job is queued before close's end mark, or refused
        try:
            # the whole ledger's lock: replicas starting at once create the schema once
            with self._transaction(None, failure=f"cannot open {self}"):
                for statement in self._store.statements():
                    self._store.execute(statement)
            self._totals = self._load_totals()
        except LedgerError:
            self._store.close()
            raise
        self._refreshed = time.monotonic()
        self._failing = False
        self._waiting: list[_Job] = []  # jobs set aside while another replica held their lock
        self._busy_since: float | None = None
        self._drain_after = 0.0  # (monotonic) a journal that could not be counted waits a bit
        self._drain_failing = False
        self._drain_busy: dict[str, float] = {}  # accounts another replica held, until when
        # accounts whose chunk failed: how many of their rows are still counted one at a time
        self._drain_suspect: dict[str, int] = {}
        self._writer = threading.Thread(
            target=self._write_forever, name=f"ledger {vocabulary.names.prefix}", daemon=True
        )
        self._writer.start()

    def __str__(self) -> str:
        return f"{self._v.title} ledger at {self._store.where}"

    def close(self) -> None:
        """What was queued before is still done; what comes after is refused."""
        with self._gate:
            if not self._closing.is_set():
                self._closing.set()
                self._queue.put(None)
        self._writer.join(30)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called from the writer thread after new totals are published."""
        self._listeners.append(listener)

    # --- taking ids in ---

    def add(self, account: str, request_ids: Sequence[str], schedule: Schedule) -> Pending:
        """Track these ids; resolves to how many were new, once committed. Changes no status,
        so it waits for no poll cycle: a row lock keeps an id new only once across replicas."""
        return self._submit(self._add, (account, request_ids, schedule), ())

    def report(
        self,
        account: str,
        events: Sequence[tuple[str, MessageUpdate, float | None]],
        schedule: Schedule,
    ) -> Pending:
        """Delivery webhooks, (request id, status, send time if known) each: an unknown id
        starts being tracked, and each status counts once. Resolves once committed.

        Unless the vocabulary says webhooks settle messages, only a poll, whose answer lists
        every message of the request, decides that a request is done. Under a burst the
        statuses are journaled when this resolves, and counted soon after (see the top); with
        HARD_BACKLOG of them waiting, refused."""
        waiting = self.backlog()
        if waiting >= HARD_BACKLOG:
            return self._failed(
                f"cannot write {self._v.title} ledger: its journal holds {waiting} statuses not"
                " yet counted; more are refused until it drains"
            )
        return self._submit(
            self._report, (account, events, schedule), (account,), merge=("report", account)
        )

    # --- following ids ---

    def due(self, account: str, limit: int) -> Pending:
        """The ids whose next poll is due, oldest due first."""
        return self._submit(self._due, (account, limit), (), write=False)

    def record(
        self,
        account: str,
        answers: Iterable[tuple[Due, list[MessageUpdate] | None, str | None]],
        schedule: Schedule,
    ) -> Pending:
        """One poll cycle's answers, in one transaction of a few statements whatever its size.

        Each answer is (id, its messages, None), or (id, None, "not_found"), or (id, None,
        "gone") for an id the provider will never know (a malformed id), or (id, None, "retry").
        """
        return self._submit(self._record, (account, _Replayable(answers), schedule), (account,))

    def expire_old(self, account: str, schedule: Schedule) -> Pending:
        return self._submit(self._expire_old, (account, schedule), (account,))

    def settle_quiet(self, account: str, schedule: Schedule) -> Pending:
        """Requests whose messages were delivered `final_after` ago and never read are done:
        for a provider never polled per id (Meta) no later answer would settle them, and they
        would end as expired. Resolves to how many were settled."""
        return self._submit(self._settle_quiet, (account, schedule), (account,))

    # --- reading ---

    def totals(self) -> Mapping[str, Totals]:
        """The newest published totals: never waits (the event loop renders from them)."""
        return self._totals

    def backlog(self) -> int:
        """Events journaled and not yet counted, over all accounts."""
        return sum(t.backlog for t in self._totals.values())

    def pending_count(self, account: str) -> int:
        totals = self._totals.get(account)
        return totals.states.get("pending", 0) if totals else 0

    def oldest_pending(self, account: str) -> Pending:
        """When the oldest id still pending came in (for the status page)."""
        return self._submit(self._oldest_pending, (account,), (), write=False)

    # --- the writer ---

    def _submit(
        self,
        run: Callable[..., Any],
        args: tuple[Any, ...],
        accounts: tuple[str, ...] | None,
        *,
        write: bool = True,
        merge: Hashable | None = None,
    ) -> Pending:
        future, loop = _caller_future()
        with self._gate:
            if not self._closing.is_set():
                self._queue.put(_Job(run, args, accounts, future, loop, write, merge))
                return future
        verb = "write" if write else "read"
        future.set_exception(LedgerError(f"cannot {verb} {self._v.title} ledger: it is closed"))
        return future

    def _failed(self, message: str) -> Pending:
        future, _ = _caller_future()
        future.set_exception(LedgerError(message))
        return future

    def _write_forever(self) -> None:
        try:
            while self._write_once():
                pass
        finally:
            with self._gate:
                self._refuse_the_rest()
            self._store.close()

    def _write_once(self) -> bool:
        """One batch (or, idle, a chunk of the journal or a refresh); False once closed."""
        try:
            waiting, self._waiting = self._waiting, []
            backlog = self.backlog()
            timeout = (
                BUSY_RETRY
                if waiting
                else IDLE
                if backlog
                else REFRESH_EVERY
                if self._store.shared
                else None
            )
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                if waiting:
                    self._run(waiting)
                elif backlog:
                    self._drain(CHUNK)
                else:
                    self._refresh()
                self._refresh_if_due()
                return True
            jobs = [*waiting, first]
            while len(jobs) < MAX_BATCH:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closing = None in jobs
            jobs, journaled = self._journaled([job for job in jobs if job is not None], backlog)
            self._run(jobs)
            if backlog + journaled >= SOFT_BACKLOG:  # count faster than calls come in
                self._drain(max(CHUNK, 2 * journaled))
            self._refresh_if_due()
            return not closing
        except Exception:  # a bug here must not leave every later caller waiting forever
            log.exception(f"{self._v.title} ledger's writer failed; it goes on")
            return not self._closing.is_set()

    def _refresh_if_due(self) -> None:
        if self._store.shared and time.monotonic() - self._refreshed >= REFRESH_EVERY:
            self._refresh()

    def _journaled(self, jobs: list[_Job], backlog: int) -> tuple[list[_Job], int]:
        """The batch, its webhook calls made journal rows if it is a burst's (or the journal
        holds any: the rows are counted in the order they came); and how many events that is."""
        calls = [job for job in jobs if job.run == self._report]
        events = sum(len(job.args[1]) for job in calls)
        if not calls or not (backlog or len(calls) >= JOURNAL_CALLS or events >= JOURNAL_EVENTS):
            return jobs, 0
        journal = {"run": self._journal, "accounts": (), "merge": ("journal",)}
        return [
            dataclasses.replace(job, **journal) if job.run == self._report else job for job in jobs
        ], events

    def _drain(self, at_least: int) -> None:
        """Counts the oldest journal rows of one account (whose lock no other replica holds),
        at least `at_least` events of them, in one transaction that deletes them."""
        now = time.monotonic()
        if now < self._drain_after:
            return
        try:
            with self._reading():
                heads = self._store.execute(self._sql.journal_heads).fetchall()
            for (account,) in heads:
                if self._drain_busy.get(account, 0.0) > now:
                    continue
                alone = self._drain_suspect.get(account, 0)
                try:
                    with self._transaction((account,), wait=False):
                        if not alone:
                            self._count_journaled(account, at_least)
                        elif self._count_journaled(account, 1, drop=True):
                            self._drain_suspect[account] = alone - 1
                        else:  # (found, and dropped)
                            self._drain_suspect[account] = 0
                except _Busy:  # another replica's poll cycle: its rows wait, others' go on
                    self._drain_busy[account] = now + BUSY_RETRY
                    continue
                except LedgerError:
                    raise
                except Exception:  # not the database: a row it cannot take; found one by one
                    log.exception(
                        f"{self._v.title} ledger cannot count journal rows of {account!r};"
                        " they are tried one at a time"
                    )
                    self._drain_suspect[account] = MAX_BATCH  # rows a chunk may hold
                    continue
                self._changed()
                break
        except LedgerError as exc:
            self._drain_after = now + (0.0 if exc.again else 1.0)
            if not exc.again and not self._drain_failing:
                log.warning(
                    f"{self._v.title} ledger cannot count its journal; it tries again",
                    extra={"fields": {"error": str(exc)}},
                )
            self._drain_failing = not exc.again
            return
        if self._drain_failing:
            log.info(f"{self._v.title} ledger counts its journal again")
            self._drain_failing = False

    def _refuse_the_rest(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                closed = LedgerError(f"cannot use {self._v.title} ledger: closed")
                _deliver([(job, None, closed)])

    def _run(self, jobs: list[_Job]) -> None:
        """Jobs that take no lock (hand-ins, reads) in one transaction, then those that change
        statuses in another: a hand-in never waits for another replica's poll cycle, even when
        it is queued beside a webhook that must."""
        free = [job for job in jobs if job.accounts == ()]
        locked = [job for job in jobs if job.accounts != ()]
        self._run_together(free)
        if not locked:
            return
        now = time.monotonic()
        patient = not self._store.shared or now - (self._busy_since or now) >= PATIENCE
        if self._run_together(locked, wait=patient):
            self._busy_since = None
        else:  # another replica holds one of these accounts: aside, and the rest go on
            self._waiting = locked
            self._busy_since = self._busy_since or now

    def _run_together(self, jobs: list[_Job], *, wait: bool = True) -> bool:
        """One transaction for all of them; if it fails, each alone, so that one bad job (or a
        lost connection) fails only itself. False, and nothing done, when `wait` is off and an
        account's lock is held elsewhere."""
        if not jobs:
            return True
        groups = _merged(jobs)
        writes = [job for job in jobs if job.write]
        try:
            for run in range(AGAIN):
                try:
                    if writes:
                        locks = (
                            None if any(j.accounts is None for j in writes) else _accounts(writes)
                        )
                        with self._transaction(locks, wait=wait):
                            results = [group[0].run(*_arguments(group)) for group in groups]
                    else:
                        with self._reading():
                            results = [group[0].run(*_arguments(group)) for group in groups]
                    break
                except LedgerError as error:
                    if not error.again or run == AGAIN - 1:
                        raise
                    log.info(
                        f"{self._v.title} ledger's transaction was undone to break a deadlock;"
                        " running it again",
                        extra={"fields": {"jobs": len(jobs)}},
                    )
        except _Busy:
            return False
        except Exception as exc:
            if len(jobs) > 1:
                for job in jobs:
                    self._run_together([job])
                return
            if not isinstance(exc, LedgerError):
                log.exception(
                    "a ledger job failed", extra={"fields": {"job": jobs[0].run.__name__}}
                )
            _deliver([(jobs[0], None, exc)])
            return True
        _deliver(
            [
                (job, result, None)
                for group, result in zip(groups, results, strict=True)
                for job in group
            ]
        )
        if writes:
            self._changed()
        return True

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("a ledger listener failed")

    # --- the jobs (on the writer thread) ---

    def _add(self, account: str, request_ids: Sequence[str], schedule: Schedule) -> int:
        now = self._clock()
        # sorted: every transaction takes new ids' index entries in the same order, so two
        # replicas inserting the same ids do not deadlock on them
        rows = [(rid,) for rid in sorted({_storable(rid) for rid in request_ids})]
        new = self._store.many(self._sql.insert_request, (account, now, now + schedule.first), rows)
        self._counted.states[account, "pending"] += new
        return new

    def _report(self, *calls: tuple[str, Sequence[Any], Schedule]) -> None:
        """Every queued webhook call of one account, as one."""
        if decode := self._v.decode:
            calls = tuple((account, list(decode(events)), s) for account, events, s in calls)
        self._tally(calls)

    def _tally(self, calls: Sequence[tuple[str, Sequence[Any], Schedule]]) -> None:
        """Webhook calls of one account, their events (id, update, send time) each."""
        account, _, schedule = calls[0]
        now = self._clock()
        # one pass over the events: each request's updates and its first send time
        by_request: dict[str, list[MessageUpdate]] = {}
        first_sent: dict[str, float] = {}
        for _, batch, _ in calls:
            for given_id, update, sent_at in batch:
                rid = given_id if "\0" not in given_id else _storable(given_id)
                found = by_request.get(rid)
                if found is None:
                    by_request[rid] = [update]
                else:
                    found.append(update)
                if sent_at is not None and rid not in first_sent:
                    first_sent[rid] = sent_at
        ids = sorted(by_request)  # (sorted: see `_add`)
        inserted = self._store.many(
            self._sql.insert_request, (account, now, now + schedule.first), [(r,) for r in ids]
        )
        self._counted.states[account, "pending"] += inserted
        if first_sent:
            sent = [(rid, first_sent[rid]) for rid in sorted(first_sent)]
            self._store.many(self._sql.set_sent_at, (account,), sent)
        messages = self._apply(account, by_request, now)
        if self._v.settled_by_webhooks:
            done = [rid for rid, m in messages.items() if self._settled(m, now, schedule)]
            self._finish(account, done, "done", now)

    def _journal(self, *calls: tuple[str, Sequence[Any], Schedule]) -> None:
        """Webhook calls as journal rows, one each: what `_report` will need, and no more."""
        rows = []
        for account, events, schedule in calls:
            try:
                body = pydantic_core.to_json(events).decode()  # (twice json.dumps' speed)
            except pydantic_core.PydanticSerializationError:  # a lone surrogate: escaped
                body = json.dumps(events)
            rows.append((account, len(events), _schedule_json(schedule), body))
            self._counted.backlog[account] += len(events)
        self._store.executemany(self._sql.journal_add, rows)

    def _count_journaled(self, account: str, at_least: int, *, drop: bool = False) -> bool:
        """The account's oldest journal rows counted, as the calls they were, and deleted.
        `drop`: one row, tried in a savepoint; if it cannot be counted it is deleted all the
        same, with an error logged (never tried forever). True when that row counted."""
        chosen, events = [], 0
        for seq, count in self._store.execute(
            self._sql.journal_next, (account, MAX_BATCH)
        ).fetchall():
            chosen.append(seq)
            events += count
            if events >= at_least:
                break
        taken = self._store.execute(
            self._sql.journal_take, (account, self._store.pack(chosen))
        ).fetchall()
        calls = []
        for seq, count, schedule, body in sorted(taken):
            self._counted.backlog[account] -= count
            try:
                events = json.loads(body)
                batch = (
                    list(self._v.decode(events))
                    if self._v.decode
                    else [(rid, MessageUpdate(*update), sent) for rid, update, sent in events]
                )
                calls.append((account, batch, Schedule(*json.loads(schedule))))
            except (ValueError, TypeError, LookupError, AttributeError) as exc:  # not `_journal`'s
                log.error(
                    f"{self._v.title} ledger's journal row {seq} cannot be read; it is dropped",
                    extra={"fields": {"account": account, "events": count, "error": str(exc)}},
                )
        if not calls:
            return not drop
        if not drop:
            self._tally(calls)
            return True
        counted, self._counted = self._counted, _Counted()
        self._store.execute("SAVEPOINT one_row")
        try:
            self._tally(calls)
        except Exception as exc:
            if isinstance(exc, self._store.errors) and not isinstance(exc, self._store.data_errors):
                raise  # the database itself: the row waits
            self._store.execute("ROLLBACK TO SAVEPOINT one_row")
            self._counted = counted
            log.error(
                f"{self._v.title} ledger's journal row {taken[0][0]} cannot be counted; it is"
                " dropped",
                extra={"fields": {"account": account, "error": type(exc).__name__}},
            )
            return False
        self._store.execute("RELEASE SAVEPOINT one_row")
        for counts in dataclasses.fields(_Counted):
            getattr(counted, counts.name).update(getattr(self._counted, counts.name))
        self._counted = counted
        return True

    def _due(self, account: str, limit: int) -> list[Due]:
        rows = self._store.execute(self._sql.due, (account, self._clock(), limit)).fetchall()
        return [Due(account, rid, acc, att, nf) for rid, acc, att, nf in rows]

    def _record(
        self,
        account: str,
        answers: Iterable[tuple[Due, list[MessageUpdate] | None, str | None]],
        schedule: Schedule,
    ) -> None:
        now = self._clock()
        answers = list(answers)  # (read here, inside the transaction)
        answered = {d.request_id: u for d, u, _ in answers if u is not None}
        messages = self._apply(account, answered, now) if answered else {}
        finished: dict[str, list[str]] = {"done": [], "expired": []}
        later = []  # (next poll, not found since, account, request id)
        for due, updates, problem in answers:
            since = due.not_found_since
            delay = schedule.delay(due.attempts)
            if updates is not None:
                if self._settled(messages[due.request_id], now, schedule):
                    finished["done"].append(due.request_id)
                    continue
                since = None
            elif problem == "not_found":
                since = since or now
                if now - since >= schedule.not_found_grace:
                    finished["expired"].append(due.request_id)
                    continue
                delay = min(delay, max(1.0, schedule.not_found_grace / 4))  # ask a fresh id soon
            elif problem == "gone":
                finished["expired"].append(due.request_id)
                continue
            later.append((now + delay, since, account, due.request_id))
        if later:
            self._store.executemany(self._sql.reschedule, later)
        for state, request_ids in finished.items():
            self._finish(account, request_ids, state, now)
        self._expire(account, now, schedule)

    def _expire_old(self, account: str, schedule: Schedule) -> bool:
        return self._expire(account, self._clock(), schedule)

    def _settle_quiet(self, account: str, schedule: Schedule) -> int:
        now = self._clock()
        rows = self._store.execute(
            self._sql.delivered_before, (account, now - schedule.final_after, MAX_SETTLE)
        ).fetchall()
        ids = sorted({rid for (rid,) in rows})
        if not ids:
            return 0
        known: dict[str, dict[str, tuple[frozenset[str], float | None]]] = {r: {} for r in ids}
        for rid, msg_id, reached, delivered_at in self._store.execute(
            self._sql.messages_of, (account, self._store.pack(ids))
        ).fetchall():
            known[rid][msg_id] = (frozenset(reached.split(",")) - {""}, delivered_at)
        done = [rid for rid in ids if self._settled(known[rid], now, schedule)]
        self._finish(account, done, "done", now)
        return len(done)

    def _oldest_pending(self, account: str) -> float | None:
        row = self._store.execute(self._sql.oldest_pending, (account,)).fetchone()
        return row[0] if row else None

    # --- inside a transaction ---

    def _apply(
        self, account: str, updates: Mapping[str, Sequence[MessageUpdate]], now: float
    ) -> dict[str, dict[str, tuple[frozenset[str], float | None]]]:
        """Count, once each, the statuses (and the ones they imply) not seen before. Returns,
        per request, its messages by id as (statuses reached, when delivered), after the
        updates. Two reads and one write for any number of requests; the loop runs once per
        event of a burst, so what it needs is bound to locals first."""
        ids = list(updates)
        known: dict[str, dict[str, tuple[frozenset[str], float | None]]] = {rid: {} for rid in ids}
        for rid, msg_id, reached, delivered_at in self._store.execute(
            self._sql.messages_of, (account, self._store.pack(ids))
        ).fetchall():
            known[rid][msg_id] = (frozenset(reached.split(",")) - {""}, delivered_at)
        starts: dict[str, float] | None = None
        rows: dict[tuple[str, str], tuple[Any, ...]] = {}
        v, normalised = self._v, self._normalised
        labels_of, chains, chain_sets, text = (
            normalised.labels,
            normalised.chains,
            normalised.reached,
            normalised.text,
        )
        counted, timed, detailed = self._counted.messages, v.timed, v.detailed
        for rid in ids:
            messages = known[rid]
            for update in updates[rid]:
                msg_id = update.msg_id if "\0" not in update.msg_id else _storable(update.msg_id)
                status, conversation, kind = labels_of(update)
                seen = msg_id in messages
                if seen:
                    reached, delivered_at = messages[msg_id]
                    new = [s for s in chains[status] if s not in reached]
                    if new:
                        reached = reached | chain_sets[status]
                else:  # (a burst's usual case: all of its chain is new)
                    reached, delivered_at, new = chain_sets[status], None, chains[status]
                at = update.at if update.at is not None else now
                for reached_status in new:
                    counted[account, reached_status, conversation, kind] += 1
                    if reached_status != status:
                        continue
                    if status in timed:
                        if starts is None:
                            starts = self._starts(account, ids)
                        start = starts.get(rid)
                        if start is not None:
                            self._observe(account, status, max(0.0, at - start))
                    if status in detailed:
                        self._detail(account, status, update.detail)
                if status == "delivered" and delivered_at is None:
                    delivered_at = at
                messages[msg_id] = (reached, delivered_at)
                current = status if status != "unknown" or not seen else v.latest(reached)
                rows[rid, msg_id] = (rid, msg_id, current, text(reached), delivered_at)
        if rows:
            self._store.many(self._sql.upsert_message, (account,), list(rows.values()))
        return known

    def _starts(self, account: str, ids: Sequence[str]) -> dict[str, float]:
        """When each request was sent, or else (if the vocabulary says so) handed in: where its
        delivery time starts. An id with neither is not timed."""
        rows = self._store.execute(self._sql.starts, (account, self._store.pack(ids))).fetchall()
        if self._v.timed_from_hand_in:
            return {rid: sent if sent is not None else accepted for rid, accepted, sent in rows}
        return {rid: sent for rid, _, sent in rows if sent is not None}

    def _detail(self, account: str, status: str, detail: str) -> None:
        """Bounded: a hostile sender's endless new codes end up as "other"."""
        detail = detail[:MAX_DETAIL] or "unknown"
        key = (status, detail)
        known = self._totals.get(account)
        if not (known and key in known.details) and (account, *key) not in self._counted.details:
            distinct = {d for s, d in known.details if s == status} if known else set()
            distinct |= {d for a, s, d in self._counted.details if a == account and s == status}
            if len(distinct) >= MAX_DETAILS:
                detail = "other"
        self._counted.details[account, status, detail] += 1

    def _observe(self, account: str, status: str, seconds: float) -> None:
        bucket = bisect.bisect_left(BUCKETS, seconds)
        self._counted.observed[account, status, bucket] += 1
        self._counted.seconds[account, status, bucket] += seconds

    def _settled(
        self,
        messages: Mapping[str, tuple[frozenset[str], float | None]],
        now: float,
        schedule: Schedule,
    ) -> bool:
        """Done when every message is final, or delivered and `final_after` has passed."""
        final = self._v.final
        waiting_for_read = [d for reached, d in messages.values() if not (reached & final)]
        return bool(messages) and all(
            d is not None and now - d >= schedule.final_after for d in waiting_for_read
        )

    def _finish(self, account: str, request_ids: list[str], state: str, now: float) -> None:
        if not request_ids:
            return
        changed = self._store.execute(
            self._sql.finish, (state, now, account, self._store.pack(request_ids))
        ).rowcount
        self._counted.states[account, "pending"] -= changed
        self._counted.states[account, state] += changed

    def _expire(self, account: str, now: float, schedule: Schedule) -> bool:
        expired = self._store.execute(
            self._sql.expire, (now, account, now - schedule.expire_after)
        ).rowcount
        pruned = self._store.execute(
            self._sql.prune, (account, now - schedule.keep_finished)
        ).fetchall()
        if pruned:
            self._store.execute(
                self._sql.prune_messages, (account, self._store.pack([rid for rid, _ in pruned]))
            )
        self._counted.states[account, "pending"] -= expired
        self._counted.states[account, "expired"] += expired
        for _, state in pruned:
            self._counted.states[account, state] -= 1
        return bool(expired or pruned)

    # --- counts ---

    def _load_totals(self) -> dict[str, Totals]:
        """The totals as the tables hold them."""
        counted = _Counted()
        with self._reading():
            with self._store.batch():  # every second on a shared ledger: one round trip
                queries = (
                    self._sql.message_counts,
                    self._sql.delivery_seconds,
                    self._sql.state_counts,
                    self._sql.detail_counts,
                    self._sql.journal_counts,
                )
                cursors = [self._store.execute(q) for q in queries]
            messages, seconds, states, details, journal = (c.fetchall() for c in cursors)
            for account, status, conversation, kind, count in messages:
                counted.messages[account, status, conversation, kind] = count
            for account, status, bucket, count, total in seconds:
                counted.observed[account, status, bucket] = count
                counted.seconds[account, status, bucket] = total
            for account, state, count in states:
                counted.states[account, state] = count
            for account, status, detail, count in details:
                counted.details[account, status, detail] = count
            for account, count in journal:
                counted.backlog[account] = int(count)
        totals: dict[str, Totals] = {}
        _add_counts(totals, counted)
        return totals

    def _save(self, counted: _Counted) -> None:
        """A transaction's counts, into the tables, in that transaction."""
        if counted.messages:
            self._store.executemany(
                self._sql.add_message_counts,
                [(*key, count) for key, count in counted.messages.items()],
            )
        if counted.observed:
            self._store.executemany(
                self._sql.add_delivery_seconds,
                [(*key, n, counted.seconds[key]) for key, n in counted.observed.items()],
            )
        if counted.details:
            self._store.executemany(
                self._sql.add_detail_counts,
                [(*key, count) for key, count in counted.details.items()],
            )
        moved = [(*key, change) for key, change in counted.states.items() if change]
        if moved:
            self._store.count_states(moved)

    def _publish(self, counted: _Counted) -> None:
        """New totals, copied where this commit changed them: the old ones may be in a
        reader's hands."""
        totals = dict(self._totals)
        for account in counted.accounts():
            totals[account] = totals[account].copy() if account in totals else Totals()
        _add_counts(totals, counted)
        self._totals = totals

    def _refresh(self) -> None:
        """Other replicas' writes: a shared ledger's counts are read back, and the listeners
        told when they moved."""
        self._refreshed = time.monotonic()
        try:
            fresh = self._load_totals()
        except LedgerError as exc:
            if not self._failing:
                log.warning(
                    f"{self._v.title} ledger's counts cannot be read; showing the last ones read",
                    extra={"fields": {"error": str(exc)}},
                )
            self._failing = True
            return
        if self._failing:
            log.info(f"{self._v.title} ledger's counts can be read again")
            self._failing = False
        if fresh != self._totals:
            self._totals = fresh
            self._changed()

    def _transaction(
        self, accounts: Sequence[str] | None, *, failure: str | None = None, wait: bool = True
    ) -> _Transaction:
        """A write transaction for these accounts' statuses, or (None) for the whole ledger."""
        failure = failure or f"cannot write {self._v.title} ledger"
        return _Transaction(self, accounts, failure, wait)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except self._store.errors as exc:
            raise LedgerError(
                f"cannot read {self._v.title} ledger: {self._store.reason(exc)}"
            ) from None


class _Statements:
    """Every statement, with the provider's table names, written once."""

    def __init__(self, names: Names, store: Store):
        def sql(text: str) -> str:
            return names.sql(text.replace("<in>", store.in_list))

        def each(text: str, json_rows: str) -> str:
            """A statement for `Store.many`: `text`, with a `?` per column, run once per row
            (the shared values first); or, where the store takes the rows as one JSON array,
            `json_rows`, with a `?` per shared value and then `json_each(?) AS r` (`r.value ->>
            i`: a row's i-th value)."""
            return sql(json_rows if store.rows_as_json else text)

        self.insert_request = each(
            "INSERT INTO {p}requests (account, accepted_at, next_poll_at, request_id)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            "INSERT INTO {p}requests (account, accepted_at, next_poll_at, request_id)"
            " SELECT ?, ?, ?, r.value ->> 0 FROM json_each(?) AS r WHERE true"
            " ON CONFLICT DO NOTHING",
        )
        self.set_sent_at = each(
            "UPDATE {p}requests AS q SET sent_at = COALESCE(q.sent_at, v.at)"
            " FROM (VALUES (?, ?, ?)) AS v (account, request_id, at)"
            " WHERE q.account = v.account AND q.request_id = v.request_id",
            # (the rows made a table first: joined to json_each directly, SQLite's planner
            # walks every id of the account for each row instead of finding each row's id)
            "WITH v AS MATERIALIZED (SELECT r.value ->> 0 AS id, r.value ->> 1 AS at"
            " FROM json_each(?2) AS r) UPDATE {p}requests SET sent_at = COALESCE(sent_at, v.at)"
            " FROM v WHERE account = ?1 AND request_id = v.id",
        )
        self.due = sql(
            "SELECT request_id, accepted_at, attempts, not_found_since FROM {p}requests"
            " WHERE account = ? AND state = 'pending' AND next_poll_at <= ?"
            " ORDER BY next_poll_at LIMIT ?"
        )
        self.delivered_before = sql(
            "SELECT q.request_id FROM {p}requests AS q JOIN {p}messages AS m"
            " ON m.account = q.account AND m.request_id = q.request_id"
            " WHERE q.account = ? AND q.state = 'pending' AND m.delivered_at < ? LIMIT ?"
        )
        self.oldest_pending = sql(
            "SELECT MIN(accepted_at) FROM {p}requests WHERE account = ? AND state = 'pending'"
        )
        self.messages_of = sql(
            "SELECT request_id, msg_id, reached, delivered_at FROM {p}messages"
            " WHERE account = ? AND request_id <in>"
        )
        self.starts = sql(
            "SELECT request_id, accepted_at, sent_at FROM {p}requests"
            " WHERE account = ? AND request_id <in>"
        )
        upsert = (
            " ON CONFLICT (account, request_id, msg_id) DO UPDATE SET"
            " status = excluded.status, reached = excluded.reached,"
            " delivered_at = excluded.delivered_at"
        )
        self.upsert_message = each(
            "INSERT INTO {p}messages VALUES (?, ?, ?, ?, ?, ?)" + upsert,
            "INSERT INTO {p}messages SELECT ?, r.value ->> 0, r.value ->> 1, r.value ->> 2,"
            " r.value ->> 3, r.value ->> 4 FROM json_each(?) AS r WHERE true" + upsert,
        )
        self.reschedule = sql(
            "UPDATE {p}requests SET attempts = attempts + 1, next_poll_at = ?, not_found_since = ?"
            " WHERE account = ? AND request_id = ? AND finished_at IS NULL"
        )
        # "not finished yet", not "state = 'pending'": that would tempt PostgreSQL's planner,
        # until it has statistics, to scan the index of every pending id instead of the key
        self.finish = sql(
            "UPDATE {p}requests SET state = ?, finished_at = ? WHERE account = ?"
            " AND request_id <in> AND finished_at IS NULL"
        )
        self.expire = sql(
            "UPDATE {p}requests SET state = 'expired', finished_at = ? WHERE account = ?"
            " AND state = 'pending' AND accepted_at < ?"
        )
        self.prune = sql(
            "DELETE FROM {p}requests WHERE account = ? AND state != 'pending' AND finished_at < ?"
            " RETURNING request_id, state"
        )
        self.prune_messages = sql("DELETE FROM {p}messages WHERE account = ? AND request_id <in>")
        self.message_counts = sql(
            "SELECT account, status, conversation_type, message_type, count FROM {p}message_counts"
        )
        self.delivery_seconds = sql(
            "SELECT account, status, bucket, count, sum FROM {p}delivery_seconds"
        )
        self.state_counts = sql(store.state_counts)
        self.detail_counts = sql("SELECT account, status, detail, count FROM {p}detail_counts")
        self.add_detail_counts = sql(
            "INSERT INTO {p}detail_counts VALUES (?, ?, ?, ?) ON CONFLICT"
            " (account, status, detail)"
            " DO UPDATE SET count = {p}detail_counts.count + excluded.count"
        )
        self.journal_add = sql(
            "INSERT INTO {p}journal (account, events, schedule, body) VALUES (?, ?, ?, ?)"
        )
        self.journal_heads = sql(
            "SELECT account FROM {p}journal GROUP BY account ORDER BY MIN(seq)"
        )
        self.journal_next = sql(
            "SELECT seq, events FROM {p}journal WHERE account = ? ORDER BY seq LIMIT ?"
        )
        self.journal_take = sql(
            "DELETE FROM {p}journal WHERE account = ? AND seq <in>"
            " RETURNING seq, events, schedule, body"
        )
        self.journal_counts = sql("SELECT account, SUM(events) FROM {p}journal GROUP BY account")
        self.add_message_counts = sql(
            "INSERT INTO {p}message_counts VALUES (?, ?, ?, ?, ?) ON CONFLICT"
            " (account, status, conversation_type, message_type)"
            " DO UPDATE SET count = {p}message_counts.count + excluded.count"
        )
        self.add_delivery_seconds = sql(
            "INSERT INTO {p}delivery_seconds VALUES (?, ?, ?, ?, ?) ON CONFLICT"
            " (account, status, bucket) DO UPDATE SET"
            " count = {p}delivery_seconds.count + excluded.count,"
            " sum = {p}delivery_seconds.sum + excluded.sum"
        )


def _caller_future() -> tuple[Pending, asyncio.AbstractEventLoop | None]:
    """An asyncio future for a caller on an event loop (with its loop), else a thread's."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return Future(), None
    return loop.create_future(), loop


def _deliver(outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """Each job's result or error to its caller: a thread's future at once, an event loop's
    all in one callback on that loop (a wake-up each cost a loop ~15% of a burst's CPU)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Pending, Any, BaseException | None]]]
    by_loop = defaultdict(list)
    for job, result, error in outcomes:
        if job.loop is None:
            _settle([(job.future, result, error)])
        else:
            by_loop[job.loop].append((job.future, result, error))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[Pending, Any, BaseException | None]]) -> None:
    for future, result, error in settled:
        if future.done():  # (cancelled: the caller went away)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _merged(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs in order, those with the same merge key together (at the first one's place)."""
    groups: list[list[_Job]] = []
    by_key: dict[Hashable, list[_Job]] = {}
    for job in jobs:
        if job.merge is None:
            groups.append([job])
        elif job.merge in by_key:
            by_key[job.merge].append(job)
        else:
            by_key[job.merge] = [job]
            groups.append(by_key[job.merge])
    return groups


def _arguments(group: list[_Job]) -> tuple[Any, ...]:
    return group[0].args if group[0].merge is None else tuple(job.args for job in group)


def _accounts(jobs: list[_Job]) -> list[str]:
    return sorted({account for job in jobs for account in job.accounts or ()})


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
    for (account, *key), count in counted.details.items():
        details = totals.setdefault(account, Totals()).details
        details[tuple(key)] = details.get(tuple(key), 0) + count
    for account, change in counted.backlog.items():
        totals.setdefault(account, Totals()).backlog += change


class _Replayable:
    """An iterable read lazily inside the transaction, and again, from what was read, if the
    transaction runs again."""

    def __init__(self, items: Iterable[Any]):
        self._rest = iter(items)
        self._read: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        yield from self._read
        for item in self._rest:
            self._read.append(item)
            yield item


class _Busy(Exception):
    """An account's lock is held by another replica, and the transaction was not to wait."""


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on any exception: nothing is half written. What it counted
    is written just before COMMIT and published just after it, never after a ROLLBACK."""

    def __init__(self, ledger: Ledger, accounts: Sequence[str] | None, failure: str, wait: bool):
        self._ledger = ledger
        self._store = ledger._store
        self._accounts = accounts
        self._failure = failure
        self._wait = wait

    def __enter__(self) -> None:
        try:
            began = self._store.begin(self._accounts, wait=self._wait)
        except self._store.errors as exc:
            raise self._error(exc) from None
        if not began:
            raise _Busy
        self._ledger._counted = _Counted()

    def __exit__(self, kind, exc, tb) -> None:
        counted, self._ledger._counted = self._ledger._counted, _Counted()
        errors = self._store.errors
        try:
            if kind is None:
                try:
                    with self._store.batch():  # the counts and COMMIT: one round trip
                        self._ledger._save(counted)
                        self._store.commit()
                except errors:
                    with contextlib.suppress(*errors):
                        self._store.rollback()
                    raise
                self._ledger._publish(counted)
                return
            self._store.rollback()
        except errors as error:
            exc = error
        if isinstance(exc, errors):
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> LedgerError:
        return LedgerError(
            f"{self._failure}: {self._store.reason(exc)}", again=self._store.again(exc)
        )
