"""Benchmark: the D7 ledger with 100,000 pending request ids, against the D7 simulator.

The issue's targets: with 100,000 pending ids in the store the exporter stays under 150 MB of
memory, and each poll cycle's bookkeeping (choosing what is due, writing the results) takes
under 1 s. Timed tests flake on shared CI machines, so the targets are checked here instead, and
every number is printed beside a baseline measured in the same run (an idle exporter with an
empty ledger; a ledger of 1,000 ids), so a slow machine shows up as a slow baseline too.

What runs: the D7 simulator (in this process) holding one request per id, and the exporter as a
real subprocess on a temporary `--storage.path`, fed over its real ingest API (`POST
/api/v1/requests`, 1,000 ids a call) and polling the simulator at its default per-cycle size of
50 ids. Bookkeeping is then timed in-process (`Ledger.due` + `Ledger.record`) on consistent
copies of the exporter's own ledger file, taken at 1,000 ids and at the full size.

Then the same on PostgreSQL, the ledger replicas share, against SQLite: a server started as the
tests start it (tests/postgres.py), but with PostgreSQL's durable defaults, as SQLite's
`synchronous=FULL` is. The exporter has no `--storage.url` to be fed through yet, so both are
driven in-process through the Ledger API: ingest by `Ledger.add`, 1,000 ids a call, into an
empty ledger on each; bookkeeping as above, each cycle on a fresh copy of the database
(`CREATE DATABASE ... TEMPLATE`) taken at 1,000 ids and at the full size.

    python bench/d7_ledger.py            # 100,000 ids
    python bench/d7_ledger.py --ids 20000
    python bench/d7_ledger.py --no-postgres
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.postgres, run as a script

from scale import free_port, stop_process

from exporter.providers.d7 import Account
from exporter.providers.d7.statuses import VOCABULARY, open_d7_ledger
from exporter.tracking import Due, Ledger, MessageUpdate, Schedule
from simulators import D7Simulator
from tests import postgres

ACCOUNT = "bench"
INGEST_TOKEN = "bench-ingest-token"
BATCH = 1000  # the ingest API's limit per call
BASELINE_IDS = 1000
RSS_LIMIT_MB = 150.0
CYCLE_LIMIT_S = 1.0
# interval 1s at 3000/m gives the same 50 ids a cycle as the defaults (5s at 600/m), 5x as often
INTERVAL_S = 1.0
RATE_LIMIT = "3000/m"
CYCLE_SIZES = (50, 1000)  # the default per-cycle limit, and a 20x heavier one
# what a cycle's answers look like: most requests still moving, some finished, a few unknown
ANSWERS = (
    ("processed", 20),
    ("sent", 20),
    ("delivered", 25),
    ("read", 25),
    ("un_delivered", 5),
    (None, 5),  # 404: not indexed yet
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=100_000, help="pending ids (default 100000)")
    parser.add_argument(
        "--cycles", type=int, default=20, help="bookkeeping cycles timed per size (default 20)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--no-postgres", action="store_true", help="SQLite only: no PostgreSQL comparison"
    )
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows even when piped
    if args.ids < BATCH:
        parser.error(f"--ids must be at least {BATCH}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-d7-ledger-"))
    try:
        return run(args.ids, args.cycles, workdir, postgresql=not args.no_postgres)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(total: int, cycles: int, workdir: Path, *, postgresql: bool = True) -> int:
    began = time.monotonic()
    results: list[tuple[bool, str]] = []
    with D7Simulator(auto=False, index_delay=0, seed=1) as sim:
        print(f"D7 ledger benchmark: {total} ids; simulator {sim.url}; work dir {workdir}")
        started = time.perf_counter()
        ids = [sim.send(1) for _ in range(total)]
        print(f"simulator: {total} requests created in {time.perf_counter() - started:.1f} s")

        exporter = Exporter(workdir, sim)
        try:
            exporter.wait_until_polled()
            time.sleep(1.0)  # let the first cycle's garbage go before measuring
            rss_idle = exporter.rss_mb()

            batches = [ids[i : i + BATCH] for i in range(0, total, BATCH)]
            calls = [exporter.hand_in(batches[0])]
            small_copy = exporter.snapshot(workdir / "ledger-1k.db")
            cycle_small = exporter.cycle_durations(seconds=5)

            started = time.perf_counter()
            calls += [exporter.hand_in(batch) for batch in batches[1:]]
            ingest_s = time.perf_counter() - started
            rss_full_after_ingest = exporter.rss_mb()
            cycle_full = exporter.cycle_durations(seconds=5)
            exporter.scrape()
            rss_full = max(rss_full_after_ingest, exporter.rss_mb())
            peak = exporter.peak_mb()
            pending = exporter.pending()
            full_copy = exporter.snapshot(workdir / "ledger-full.db")
        finally:
            exporter.stop()
        sizes = exporter.file_sizes()

    rate = (total - BATCH) / ingest_s
    print()
    print(
        f"ingest: {total} ids in {len(calls)} calls of {BATCH}; after the first: "
        f"{ingest_s:.2f} s, {rate:,.0f} ids/s; per call median {ms(statistics.median(calls))}, "
        f"max {ms(max(calls))}"
    )
    print(
        f"exporter RSS: idle, empty ledger {rss_idle:.1f} MB (baseline); with {pending} pending "
        f"{rss_full:.1f} MB (x{rss_full / rss_idle:.2f}, +{rss_full - rss_idle:.1f} MB); "
        f"peak (VmHWM) over the run {peak:.1f} MB"
    )
    print(
        f"ledger file after a clean stop: {mb(sizes[0])} (+ WAL {mb(sizes[1])}); "
        f"{sizes[0] / total:.0f} bytes per id"
    )
    print(
        f"poll cycle as the exporter reports it (whatsapp_exporter_poll_duration_seconds, "
        f"{default_cycle()} ids incl. HTTP to the simulator): with {BASELINE_IDS} ids "
        f"{summary(cycle_small)}; with {total} ids {summary(cycle_full)}"
        f"{ratio(cycle_full, cycle_small)}"
    )
    results.append(
        (
            rss_full < RSS_LIMIT_MB and peak < RSS_LIMIT_MB,
            f"memory: RSS {rss_full:.1f} MB, peak {peak:.1f} MB with {pending} pending ids "
            f"(target < {RSS_LIMIT_MB:.0f} MB)",
        )
    )

    print()
    print(f"bookkeeping per cycle, in-process on copies of the exporter's file ({cycles} cycles):")
    sqlite_cycles = bookkeeping_report(
        "SQLite", SQLiteCopies(small_copy), SQLiteCopies(full_copy), total, cycles, results
    )
    if postgresql:
        compare_postgresql(total, cycles, workdir, sqlite_cycles, results)

    print()
    for passed, line in results:
        print(f"{'PASS' if passed else 'FAIL'} {line}")
    print(f"(benchmark took {time.monotonic() - began:.0f} s)")
    return 0 if all(passed for passed, _ in results) else 1


# --- the exporter as a process ----------------------------------------------------------------


class Exporter:
    """`python -m exporter` with one D7 account on the simulator; logs go to a file."""

    def __init__(self, workdir: Path, sim: D7Simulator):
        self.storage = workdir / "ledger.db"
        config = workdir / "config.yaml"
        config.write_text(
            f"""d7:
  - account: {ACCOUNT}
    base_url: {sim.base_url}
    token: {sim.token}
    ingest_token: {INGEST_TOKEN}
    interval: {INTERVAL_S}s
    retry_first: 1s
    rate_limit: {RATE_LIMIT}
"""
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "exporter.log"
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    f"--storage.path={self.storage}",
                ],
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.http = httpx.Client(timeout=30)

    def stop(self) -> None:
        """SIGTERM, as an operator would: the ledger is checkpointed and closed."""
        self.http.close()
        stop_process(self.process, 30)

    def _alive(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"the exporter exited:\n{self.log.read_text()[-3000:]}")

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        self._alive()
        text = self.http.get(f"{self.url}/metrics").text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def _sample(self, name: str, **labels: str) -> float | None:
        wanted = set(labels.items())
        found = [v for (n, ls), v in self.scrape().items() if n == name and wanted <= ls]
        return found[0] if found else None

    def wait_until_polled(self, timeout: float = 30) -> None:
        """Listening, and the first cycle (on an empty ledger: the token check) has succeeded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            try:
                if self._sample("whatsapp_exporter_up", account=ACCOUNT, endpoint="report") == 1:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the exporter did not poll within {timeout}s:\n{self.log.read_text()}")

    def hand_in(self, request_ids: list[str]) -> float:
        started = time.perf_counter()
        answer = self.http.post(
            f"{self.url}/api/v1/requests",
            json={"account": ACCOUNT, "request_ids": request_ids},
            headers={"Authorization": f"Bearer {INGEST_TOKEN}"},
        )
        took = time.perf_counter() - started
        if answer.status_code != 202:
            raise SystemExit(f"ingest refused: {answer.status_code} {answer.text}")
        return took

    def pending(self) -> int:
        return int(self._sample("whatsapp_tracked_requests", account=ACCOUNT, state="pending") or 0)

    def cycle_durations(self, seconds: float) -> list[float]:
        """The report cycle's duration gauge, sampled at each change for `seconds`."""
        seen: list[float] = []
        last = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self._sample(
                "whatsapp_exporter_poll_duration_seconds", account=ACCOUNT, endpoint="report"
            )
            if value is not None and value != last:
                seen.append(value)
                last = value
            time.sleep(INTERVAL_S / 4)
        return seen or [float("nan")]

    def _status(self, key: str) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise SystemExit(f"no {key} in /proc/{self.process.pid}/status")

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_mb(self) -> float:
        return self._status("VmHWM")

    def snapshot(self, target: Path) -> Path:
        """A consistent copy of the live ledger, through SQLite's backup API."""
        source = sqlite3.connect(f"file:{self.storage}?mode=ro", uri=True)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            copy.close()
            source.close()
        return target

    def file_sizes(self) -> tuple[int, int]:
        wal = Path(f"{self.storage}-wal")
        return self.storage.stat().st_size, wal.stat().st_size if wal.exists() else 0


# --- bookkeeping, in-process ------------------------------------------------------------------


def bookkeeping_report(
    backend: str,
    small: Copies,
    full: Copies,
    total: int,
    cycles: int,
    results: list[tuple[bool, str]],
) -> dict[int, list[float]]:
    """Prints opening, cycles of each size and an idle cycle at 1,000 ids and at `total`;
    returns the full ledger's cycle times by size."""
    opened = {label: copies.opening() for label, copies in ((BASELINE_IDS, small), (total, full))}
    print(
        f"  opening the ledger (loading totals): {BASELINE_IDS} ids {ms(opened[BASELINE_IDS])}; "
        f"{total} ids {ms(opened[total])} (x{opened[total] / opened[BASELINE_IDS]:.1f})"
    )
    worst = {}
    for size in CYCLE_SIZES:
        at_small = bookkeeping(small, size, cycles)
        at_full = bookkeeping(full, size, cycles)
        for what in ("due", "record", "cycle"):
            print(
                f"  {size:>5} ids a cycle, {what:>6}: {BASELINE_IDS} ids "
                f"{summary(at_small[what])}; {total} ids {summary(at_full[what])}"
                f"{ratio(at_full[what], at_small[what])}"
            )
        if size == CYCLE_SIZES[0]:
            idle_small, idle_full = idle(small, cycles), idle(full, cycles)
            print(
                f"  idle cycle (nothing due: due + expire_old): {BASELINE_IDS} ids "
                f"{summary(idle_small)}; {total} ids {summary(idle_full)}"
                f"{ratio(idle_full, idle_small)}"
            )
        worst[size] = at_full["cycle"]
        results.append(
            (
                max(at_full["cycle"]) < CYCLE_LIMIT_S,
                f"bookkeeping on {backend}: slowest cycle of {size} ids with {total} in the "
                f"ledger {ms(max(at_full['cycle']))} (target < {CYCLE_LIMIT_S:.0f} s)",
            )
        )
    return worst


def bookkeeping(copies: Copies, size: int, cycles: int) -> dict[str, list[float]]:
    """`cycles` poll cycles (due + record), each on a fresh copy, so every cycle starts from
    the same ledger and a small one never runs out of due ids."""
    schedule = account_schedule()
    rng = random.Random(size)
    statuses = [status for status, weight in ANSWERS for _ in range(weight)]
    times: dict[str, list[float]] = {"due": [], "record": [], "cycle": []}
    for _ in range(cycles):
        with copies.fresh() as ledger:
            started = time.perf_counter()
            due = ledger.due(ACCOUNT, size).result()
            chose = time.perf_counter()
            ledger.record(
                ACCOUNT, [answer(d, rng.choice(statuses)) for d in due], schedule
            ).result()
            done = time.perf_counter()
        if len(due) < size:
            raise SystemExit(f"only {len(due)} of {size} ids were due in {copies}")
        times["due"].append(chose - started)
        times["record"].append(done - chose)
        times["cycle"].append(done - started)
    return times


def account_schedule() -> Schedule:
    """The benchmark account's schedule, as the exporter builds it from the config."""
    return Account(
        account=ACCOUNT, base_url="http://sim", token="t", ingest_token="i", retry_first=1.0
    ).schedule()


def answer(due: Due, status: str | None) -> tuple[Due, list[MessageUpdate] | None, str | None]:
    if status is None:
        return due, None, "not_found"
    update = MessageUpdate(
        msg_id=f"msg-{due.request_id}",
        status=status,
        conversation_type="marketing",
        message_type="TEMPLATE",
    )
    return due, [update], None


def idle(copies: Copies, cycles: int) -> list[float]:
    """A cycle with nothing due: one `due` that finds nothing, then `expire_old`."""
    schedule = account_schedule()
    times = []
    with copies.original(clock=lambda: 0.0) as ledger:  # at time 0 nothing is due yet
        for _ in range(cycles):
            started = time.perf_counter()
            if ledger.due(ACCOUNT, CYCLE_SIZES[0]).result():
                raise SystemExit("ids were due at time 0")
            ledger.expire_old(ACCOUNT, schedule).result()
            times.append(time.perf_counter() - started)
    return times


# --- the ledger on each backend ---------------------------------------------------------------


class Copies:
    """One ledger, opened as it is (`original`) or as a fresh copy to change (`fresh`)."""

    location: str  # a SQLite path or a PostgreSQL URL, as open_ledger takes it

    def original(self, clock: Callable[[], float] = time.time) -> contextlib.closing[Ledger]:
        return contextlib.closing(open_d7_ledger(self.location, clock=clock))

    def fresh(self) -> contextlib.AbstractContextManager[Ledger]:
        raise NotImplementedError

    def opening(self) -> float:
        started = time.perf_counter()
        with self.original():
            return time.perf_counter() - started


class SQLiteCopies(Copies):
    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)

    def __str__(self) -> str:
        return self.location

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Ledger]:
        copy = self.path.with_name(f"{self.path.stem}-work.db")
        shutil.copyfile(self.path, copy)
        try:
            with SQLiteCopies(copy).original() as ledger:
                yield ledger
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)


class PostgresCopies(Copies):
    def __init__(self, server: postgres.Server, database: str):
        self.server = server
        self.database = database
        self.location = server.url(database)

    def __str__(self) -> str:
        return f"database {self.database}"

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Ledger]:
        copy = f"{self.database}_work"
        self.server.admin(
            f"CREATE DATABASE {copy} TEMPLATE {self.database} OWNER {postgres.USER}"
            " STRATEGY FILE_COPY"
        )
        try:
            with PostgresCopies(self.server, copy).original() as ledger:
                yield ledger
        finally:
            self.server.drop_database(copy)


def compare_postgresql(
    total: int,
    cycles: int,
    workdir: Path,
    sqlite_cycles: dict[int, list[float]],
    results: list[tuple[bool, str]],
) -> None:
    print()
    started = time.perf_counter()
    with postgres.running(durable=True) as server:
        version = server.admin("SHOW server_version")[0][0]
        print(
            f"PostgreSQL {version} against SQLite, in-process through the Ledger API (server "
            f"started in {time.perf_counter() - started:.1f} s; fsync and synchronous_commit on):"
        )
        database = server.create_database()
        url = server.url(database)

        def copy_at_baseline() -> None:  # a template database may have no session open
            server.admin(
                f"CREATE DATABASE {database}_small TEMPLATE {database} OWNER {postgres.USER}"
                " STRATEGY FILE_COPY"
            )

        ingested = {
            "SQLite": ingest(
                lambda: Ledger(workdir / "ingest.db", vocabulary=VOCABULARY), total, lambda: None
            ),
            "PostgreSQL": ingest(lambda: open_d7_ledger(url), total, copy_at_baseline),
        }
        for backend, (rate, calls) in ingested.items():
            print(
                f"  ingest, {backend:>10}: {total} ids by Ledger.add, {BATCH} a call; after the "
                f"first: {rate:,.0f} ids/s; per call median {ms(statistics.median(calls))}, "
                f"max {ms(max(calls))}"
            )
        sqlite_rate, pg_rate = ingested["SQLite"][0], ingested["PostgreSQL"][0]
        print(f"  ingest, PostgreSQL / SQLite: x{pg_rate / sqlite_rate:.2f}")
        print(f"bookkeeping per cycle on PostgreSQL, in-process on copies ({cycles} cycles):")
        pg_cycles = bookkeeping_report(
            "PostgreSQL",
            PostgresCopies(server, f"{database}_small"),
            PostgresCopies(server, database),
            total,
            cycles,
            results,
        )
    for size in CYCLE_SIZES:
        print(
            f"  {size:>5} ids a cycle with {total} ids, PostgreSQL / SQLite median: "
            f"x{statistics.median(pg_cycles[size]) / statistics.median(sqlite_cycles[size]):.2f}"
        )


def ingest(
    open_ledger_: Callable[[], Ledger], total: int, at_baseline: Callable[[], None]
) -> tuple[float, list[float]]:
    """`total` new ids into an empty ledger; returns ids/s after the first call and each call's
    time. After the first call the ledger is closed, `at_baseline` runs, and it is opened again."""
    schedule = account_schedule()
    ids = [f"bench-{index:07d}" for index in range(total)]
    calls = []
    ledger = open_ledger_()
    try:
        for start in range(0, total, BATCH):
            began = time.perf_counter()
            ledger.add(ACCOUNT, ids[start : start + BATCH], schedule).result()
            calls.append(time.perf_counter() - began)
            if start == 0:
                ledger.close()
                at_baseline()
                ledger = open_ledger_()
    finally:
        ledger.close()
    return (total - BATCH) / sum(calls[1:]), calls


# --- printing ---------------------------------------------------------------------------------


def default_cycle() -> int:
    requests, per = RATE_LIMIT.split("/")
    return -(-int(requests) * int(INTERVAL_S) // {"s": 1, "m": 60, "h": 3600}[per])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def summary(times: list[float]) -> str:
    return f"median {ms(statistics.median(times))}, max {ms(max(times))}"


def ratio(full: list[float], small: list[float]) -> str:
    return f" (x{statistics.median(full) / statistics.median(small):.2f} the baseline's median)"


if __name__ == "__main__":
    raise SystemExit(main())
