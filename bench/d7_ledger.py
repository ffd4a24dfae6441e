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

    python bench/d7_ledger.py            # 100,000 ids
    python bench/d7_ledger.py --ids 20000
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from exporter.providers.d7 import Account
from exporter.providers.d7.ledger import Due, Ledger, MessageUpdate, Schedule
from exporter.simulator import D7Simulator

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
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows even when piped
    if args.ids < BATCH:
        parser.error(f"--ids must be at least {BATCH}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-d7-ledger-"))
    try:
        return run(args.ids, args.cycles, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(total: int, cycles: int, workdir: Path) -> int:
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
    opened = {}
    for label, path in ((BASELINE_IDS, small_copy), (total, full_copy)):
        started = time.perf_counter()
        Ledger(path).close()
        opened[label] = time.perf_counter() - started
    print(
        f"  opening the ledger (loading totals): {BASELINE_IDS} ids {ms(opened[BASELINE_IDS])}; "
        f"{total} ids {ms(opened[total])} (x{opened[total] / opened[BASELINE_IDS]:.1f})"
    )
    for size in CYCLE_SIZES:
        small = bookkeeping(small_copy, size, cycles)
        full = bookkeeping(full_copy, size, cycles)
        for what in ("due", "record", "cycle"):
            print(
                f"  {size:>5} ids a cycle, {what:>6}: {BASELINE_IDS} ids {summary(small[what])}; "
                f"{total} ids {summary(full[what])}{ratio(full[what], small[what])}"
            )
        idle_small, idle_full = idle(small_copy, cycles), idle(full_copy, cycles)
        if size == CYCLE_SIZES[0]:
            print(
                f"  idle cycle (nothing due: due + expire_old): {BASELINE_IDS} ids "
                f"{summary(idle_small)}; {total} ids {summary(idle_full)}"
                f"{ratio(idle_full, idle_small)}"
            )
        worst = max(full["cycle"])
        results.append(
            (
                worst < CYCLE_LIMIT_S,
                f"bookkeeping: slowest cycle of {size} ids with {total} in the ledger "
                f"{ms(worst)} (target < {CYCLE_LIMIT_S:.0f} s)",
            )
        )

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
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

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


def bookkeeping(path: Path, size: int, cycles: int) -> dict[str, list[float]]:
    """`cycles` poll cycles (due + record), each on a fresh copy of `path`, so every cycle
    starts from the same ledger and a small one never runs out of due ids."""
    schedule = account_schedule()
    rng = random.Random(size)
    statuses = [status for status, weight in ANSWERS for _ in range(weight)]
    times: dict[str, list[float]] = {"due": [], "record": [], "cycle": []}
    copy = path.with_name(f"{path.stem}-work.db")
    for _ in range(cycles):
        shutil.copyfile(path, copy)
        ledger = Ledger(copy)
        try:
            started = time.perf_counter()
            due = ledger.due(ACCOUNT, size)
            chose = time.perf_counter()
            ledger.record(ACCOUNT, [answer(d, rng.choice(statuses)) for d in due], schedule)
            done = time.perf_counter()
        finally:
            ledger.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
        if len(due) < size:
            raise SystemExit(f"only {len(due)} of {size} ids were due in {path}")
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


def idle(path: Path, cycles: int) -> list[float]:
    """A cycle with nothing due: one `due` that finds nothing, then `expire_old`."""
    ledger = Ledger(path, clock=lambda: 0.0)  # at time 0 nothing is due yet
    schedule = account_schedule()
    times = []
    try:
        for _ in range(cycles):
            started = time.perf_counter()
            if ledger.due(ACCOUNT, CYCLE_SIZES[0]):
                raise SystemExit("ids were due at time 0")
            ledger.expire_old(ACCOUNT, schedule)
            times.append(time.perf_counter() - started)
    finally:
        ledger.close()
    return times


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
