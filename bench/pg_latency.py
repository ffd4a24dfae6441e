"""Benchmark: two exporter replicas on a PostgreSQL 100 ms away, against the same with none.

The issue's target: with PostgreSQL 100 ms away (another zone), /metrics answers with a p99 under
250 ms on every replica, while the leader's D7 report cycles run and ingest calls and webhooks
arrive at both replicas.

What runs, each in its own process, all on 127.0.0.1:

- PostgreSQL, Debian's server started as the tests start it (tests/postgres.py), with its durable
  defaults (fsync and synchronous_commit on);
- a TCP delay proxy in front of it (`--role proxy`, in this file): every chunk read from either
  side is written to the other 50 ms later, in order, per direction; SIGUSR1 switches the delay
  on, SIGUSR2 off;
- the D7 simulator (`--role d7sim`, in this file: simulators.D7Simulator, its messages moving on
  by themselves, processed -> sent -> delivered -> read), holding the requests handed in;
- two exporter replicas, `--storage.url` through the proxy, default lease: the first to start
  leads and polls the simulator (default cycle: 50 ids every 5 s, `retry_first: 1s` so the
  backlog is due at once).

Each condition (no delay, the baseline; then 50 ms per direction) runs on a fresh database: both
replicas start, 2,000 ids are handed in (half to each), the leader is elected, then the delay is
switched on (or not), and for the window this process, on fixed schedules whatever the answers
do, scrapes /metrics on every replica every 100 ms (every 5th with gzip), hands 10 new ids in to
each replica every 500 ms (`POST /api/v1/requests`) and posts one webhook event to each every
200 ms (`POST /webhooks/d7/{account}`). It reports, per replica, /metrics and ingest and webhook
answer times (p50/p99; an answer not come within the timeout counts as the timeout), and the
report cycles the leader completed (whatsapp_exporter_last_success_timestamp_seconds and
whatsapp_exporter_poll_errors_total of the report endpoint, as /metrics showed them).

    python bench/pg_latency.py             # 40 s windows, about 2.5 minutes
    python bench/pg_latency.py --quick     # 15 s windows, a smoke run
    python bench/pg_latency.py --seconds 60 --delay 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.postgres, as a script

from callbacks import ms, pct
from scale import Contention, cpu_seconds, free_port, py_spy, short_frame, stop_process

from tests import postgres

SCRIPT = Path(__file__).resolve()
ACCOUNT = "prod"
INGEST_TOKEN = "bench-ingest-token"
BACKLOG = 2000  # ids handed in before each window, half to each replica
HAND_IN = 1000  # ids per call, the ingest API's limit
SCRAPE_EVERY = 0.1
GZIP_EVERY = 5
INGEST_EVERY = 0.5
INGEST_IDS = 10
WEBHOOK_EVERY = 0.2
SCRAPE_TIMEOUT = 15.0
CALL_TIMEOUT = 20.0
LIFETIME = 600.0  # no child of this benchmark outlives this, nor its parent
P99_TARGET = 0.250

LAST_SUCCESS = re.compile(
    rb'^whatsapp_exporter_last_success_timestamp_seconds\{[^}]*endpoint="report"[^}]*\} (\S+)',
    re.M,
)
ERRORS = re.compile(
    rb'^whatsapp_exporter_poll_errors_total\{[^}]*endpoint="report"[^}]*\} (\S+)', re.M
)
DURATION = re.compile(
    rb'^whatsapp_exporter_poll_duration_seconds\{[^}]*endpoint="report"[^}]*\} (\S+)', re.M
)
LEADER = re.compile(rb"^whatsapp_exporter_leader\{[^}]*\} (\S+)", re.M)


def main(argv: list[str] | None = None) -> int:
    global INGEST_EVERY, WEBHOOK_EVERY  # the schedules' flags
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--role", choices=("bench", "proxy", "d7sim"), default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--quick", action="store_true", help="15 s windows: a smoke run")
    parser.add_argument("--seconds", type=float, default=None, help="window (default 40 s)")
    parser.add_argument(
        "--delay", type=float, default=0.05, help="seconds per direction (default 0.05)"
    )
    parser.add_argument(
        "--dump",
        action="store_true",
        help="py-spy dump of each replica's main thread halfway through the delayed window",
    )
    parser.add_argument(
        "--ingest-every",
        type=float,
        default=INGEST_EVERY,
        help=f"seconds between hand-ins of {INGEST_IDS} ids, per replica (default {INGEST_EVERY})",
    )
    parser.add_argument(
        "--webhook-every",
        type=float,
        default=WEBHOOK_EVERY,
        help=f"seconds between webhook events, per replica (default {WEBHOOK_EVERY})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "proxy":
        return asyncio.run(proxy(int(args.rest[0]), float(args.rest[1]), int(args.rest[2])))
    if args.role == "d7sim":
        return d7sim(int(args.rest[0]))
    sys.stdout.reconfigure(line_buffering=True)
    INGEST_EVERY, WEBHOOK_EVERY = args.ingest_every, args.webhook_every
    if postgres.binaries() is None:
        print(
            "FAIL PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql, or scripts/install-test-tools"
        )
        return 1
    seconds = args.seconds or (15.0 if args.quick else 40.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pg-latency-"))
    try:
        return asyncio.run(run(workdir, seconds, args.delay, dump=args.dump))
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --- the benchmark ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    at: float  # when it was due (time.time())
    seconds: float  # the answer's time, or the timeout
    status: str  # the HTTP status, or what went wrong


@dataclass
class Seen:
    """What one replica's plain scrapes showed: (when, leader, last success, errors, duration)."""

    rows: list[tuple[float, float | None, float | None, float | None, float | None]] = field(
        default_factory=list
    )

    def add(self, at: float, body: bytes) -> None:
        def first(pattern: re.Pattern[bytes]) -> float | None:
            found = pattern.findall(body)
            return sum(float(v) for v in found) if found else None

        self.rows.append((at, first(LEADER), first(LAST_SUCCESS), first(ERRORS), first(DURATION)))


@dataclass
class ReplicaRun:
    name: str
    scrapes: list[Call] = field(default_factory=list)
    ingest: list[Call] = field(default_factory=list)
    webhooks: list[Call] = field(default_factory=list)
    seen: Seen = field(default_factory=Seen)


async def run(workdir: Path, seconds: float, delay: float, *, dump: bool = False) -> int:
    began = time.monotonic()
    contention = Contention()
    print(
        f"PostgreSQL latency benchmark: 2 replicas, {seconds:g} s windows, no delay (baseline) "
        f"then {delay * 1000:g} ms per direction; per replica {INGEST_IDS} ids handed in every "
        f"{INGEST_EVERY:g} s and a webhook every {WEBHOOK_EVERY:g} s; {os.cpu_count()} cores; "
        f"work dir {workdir}"
    )
    started = time.perf_counter()
    with postgres.running(durable=True) as server:
        version = server.admin("SHOW server_version")[0][0]
        print(f"PostgreSQL {version} started in {time.perf_counter() - started:.1f} s")
        password_file = workdir / "pg-password"
        password_file.write_text(postgres.PASSWORD + "\n")
        proxy_child = Child(
            "proxy", [str(server.port), str(delay), str(os.getpid())], workdir / "proxy.log"
        )
        sim = Child("d7sim", [str(os.getpid())], workdir / "d7sim.log")
        try:
            proxy_port = int(proxy_child.line())
            sim_info = json.loads(sim.line())
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
            ) as session:
                runs = {}
                for label, delayed in (("no delay", False), (f"{delay * 1000:g} ms", True)):
                    database = server.create_database()
                    url = f"postgresql://{postgres.USER}@127.0.0.1:{proxy_port}/{database}"
                    runs[label] = await condition(
                        label,
                        delayed,
                        session,
                        workdir,
                        url,
                        password_file,
                        proxy_child,
                        sim,
                        sim_info,
                        seconds,
                        dump=dump,
                    )
        finally:
            sim.stop()
            proxy_child.stop()
        pg_cpu = postgres_cpu(server)

    results: list[tuple[bool, str]] = []
    base, slow = runs.values()
    print()
    print("summary (per replica: p50 / p99; x = the delayed one / the baseline's):")
    for (name, b), s in zip(base.items(), slow.values(), strict=True):
        for what in ("scrapes", "ingest", "webhooks"):
            bt, st = times(getattr(b, what)), times(getattr(s, what))
            print(
                f"  replica {name} {what:>8}: no delay {ms(pct(bt, 50))} / {ms(pct(bt, 99))}; "
                f"delayed {ms(pct(st, 50))} / {ms(pct(st, 99))} "
                f"(x{pct(st, 50) / pct(bt, 50):.1f} / x{pct(st, 99) / pct(bt, 99):.1f})"
            )
        p99 = pct(times(s.scrapes), 99)
        results.append(
            (
                p99 <= P99_TARGET,
                f"/metrics p99 on replica {name} with PostgreSQL {2 * delay * 1000:g} ms away: "
                f"{ms(p99)} (target <= {ms(P99_TARGET)}; {ms(pct(times(b.scrapes), 99))} with "
                "no delay)",
            )
        )
    print(f"  {contention.report()} (PostgreSQL's own share: {pg_cpu:.1f} s)")
    print()
    for passed, line in results:
        print(f"{'PASS' if passed else 'FAIL'} {line}")
    print(f"(benchmark took {time.monotonic() - began:.0f} s)")
    return 0 if all(passed for passed, _ in results) else 1


async def condition(
    label: str,
    delayed: bool,
    session: aiohttp.ClientSession,
    workdir: Path,
    url: str,
    password_file: Path,
    proxy_child: Child,
    sim: Child,
    sim_info: dict,
    seconds: float,
    *,
    dump: bool = False,
) -> dict[str, ReplicaRun]:
    began = time.monotonic()
    print()
    print(f"== {label}: a fresh database, two replicas")
    backlog = sim.make(BACKLOG)
    # new ids for the window: ingest and webhooks, per replica
    ingest_ids = {r: sim.make(int(seconds / INGEST_EVERY + 2) * INGEST_IDS) for r in ("a", "b")}
    webhook_ids = {r: sim.make(int(seconds / WEBHOOK_EVERY + 2)) for r in ("a", "b")}
    config = workdir / f"config-{int(delayed)}.yaml"
    config.write_text(
        f"""d7:
  - account: {ACCOUNT}
    base_url: {sim_info["base_url"]}
    token: {sim_info["token"]}
    ingest_token: {INGEST_TOKEN}
    retry_first: 1s
"""
    )
    replicas: dict[str, Replica] = {}
    try:
        for name in ("a", "b"):
            replicas[name] = Replica(f"{name}{int(delayed)}", workdir, config, url, password_file)
            await replicas[name].wait_ready(session)
        for name, part in zip(
            replicas, (backlog[: BACKLOG // 2], backlog[BACKLOG // 2 :]), strict=True
        ):
            for start in range(0, len(part), HAND_IN):
                status, _ = await hand_in(session, replicas[name], part[start : start + HAND_IN])
                if status != "202":
                    raise SystemExit(f"the backlog's hand-in to {name} was refused: {status}")
        leader = await wait_leader(session, replicas)
        print(
            f"  {BACKLOG} ids handed in; replica {leader} leads; "
            f"pids {', '.join(f'{n} {r.pid}' for n, r in replicas.items())}"
        )
        if delayed:
            proxy_child.signal(signal.SIGUSR1)
            await asyncio.sleep(0.5)
        start_at = time.time() + 0.5
        runs = {name: ReplicaRun(name) for name in replicas}
        cpu = {name: cpu_seconds(r.pid) for name, r in replicas.items()}
        if dump and delayed:
            asyncio.get_running_loop().call_later(
                seconds / 2 + 0.5, lambda: asyncio.ensure_future(dumps(replicas))
            )
        await asyncio.gather(
            *(
                task
                for name, replica in replicas.items()
                for task in (
                    paced(
                        SCRAPE_EVERY,
                        start_at,
                        seconds,
                        runs[name].scrapes,
                        lambda i, r=replica, n=name: scrape(
                            session, r, i % GZIP_EVERY == GZIP_EVERY - 1, runs[n].seen
                        ),
                    ),
                    paced(
                        INGEST_EVERY,
                        start_at,
                        seconds,
                        runs[name].ingest,
                        lambda i, r=replica, n=name: hand_in(
                            session,
                            r,
                            ingest_ids[n][i * INGEST_IDS : (i + 1) * INGEST_IDS],
                            CALL_TIMEOUT,
                        ),
                    ),
                    paced(
                        WEBHOOK_EVERY,
                        start_at,
                        seconds,
                        runs[name].webhooks,
                        lambda i, r=replica, n=name: webhook(session, r, webhook_ids[n][i]),
                    ),
                )
            )
        )
        cpu = {name: cpu_seconds(r.pid) - cpu[name] for name, r in replicas.items()}
        if delayed:
            proxy_child.signal(signal.SIGUSR2)  # the replicas stop quickly
        end_at = start_at + seconds
        answered = time.time()
    finally:
        stop_all(list(replicas.values()))
    for name, r in runs.items():
        print(
            f"  replica {name}: /metrics {summary(r.scrapes)}; ingest {summary(r.ingest)}; "
            f"webhooks {summary(r.webhooks)}; {leadership(r.seen)}; CPU "
            f"{100 * cpu[name] / (answered - start_at):.0f}% of a core"
        )
    print(f"  report cycles: {cycles(runs, start_at, end_at)}")
    print(f"  (the condition took {time.monotonic() - began:.0f} s)")
    return runs


async def dumps(replicas: dict[str, Replica]) -> None:
    """What each replica's threads are doing right now, by py-spy: per thread its innermost
    frame and the innermost one in the exporter's code (the main thread runs the event loop)."""
    spy = py_spy()
    if spy is None:
        return
    for name, replica in replicas.items():
        done = await asyncio.create_subprocess_exec(
            spy, "dump", "--pid", str(replica.pid), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = await done.communicate()
        print(f"  py-spy dump of replica {name}, halfway through the window:")
        for section in re.split(r"\n(?=Thread \d+)", out.decode(errors="replace"))[1:]:
            head, *frames = [line.strip() for line in section.splitlines() if line.strip()]
            found = re.match(r'Thread \d+ \((\w+)\): "(.*)"', head)
            ours = next((f for f in frames if "exporter/" in f), None)
            where = short_frame(frames[0]) if frames else "?"
            if ours and ours != frames[0]:
                where += f" <- {short_frame(ours)}"
            print(f"      {found[2] if found else head} ({found[1] if found else '?'}): {where}")


def postgres_cpu(server: postgres.Server) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster's own, its exited backends'
    (reaped by it) and its live children's."""
    try:
        pid = int((server.directory / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")

    def fields(of: int | str) -> list[str]:
        stat = Path(f"/proc/{of}/stat").read_text()
        return stat[stat.rfind(")") + 2 :].split()

    tick = os.sysconf("SC_CLK_TCK")
    own = fields(pid)
    total = sum(int(v) for v in own[11:15]) / tick
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                child = fields(entry.name)
                if int(child[1]) == pid:
                    total += (int(child[11]) + int(child[12])) / tick
    return total


# --- calls on a schedule ----------------------------------------------------------------------


async def paced(every: float, start_at: float, seconds: float, into: list[Call], make) -> None:
    """A call every `every` seconds from `start_at` for `seconds`, each when due whatever the
    ones before it are doing: a stalled replica shows as the wait of a call arriving at a
    random moment, not as one long call."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    origin, tasks, index = time.monotonic(), [], 0
    while index * every < seconds:
        await asyncio.sleep(max(0.0, origin + index * every - time.monotonic()))
        tasks.append(asyncio.create_task(timed(time.time(), make(index))))
        index += 1
    into.extend(await asyncio.gather(*tasks))


async def timed(at: float, call) -> Call:
    started = time.perf_counter()
    status, timeout = await call
    return Call(at, timeout if status == "timeout" else time.perf_counter() - started, status)


async def scrape(
    session: aiohttp.ClientSession, replica: Replica, gzip: bool, seen: Seen
) -> tuple[str, float]:
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    try:
        async with session.get(
            replica.metrics_url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT),
        ) as answer:
            body = await answer.read()
            if answer.status == 200 and not gzip:
                seen.add(time.time(), body)
            return str(answer.status), SCRAPE_TIMEOUT
    except TimeoutError:
        return "timeout", SCRAPE_TIMEOUT
    except aiohttp.ClientError as exc:
        return type(exc).__name__, SCRAPE_TIMEOUT


async def post(
    session: aiohttp.ClientSession, url: str, payload: object, timeout: float
) -> tuple[str, float]:
    try:
        async with session.post(
            url,
            json=payload,
            headers={"Authorization": f"Bearer {INGEST_TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as answer:
            await answer.read()
            return str(answer.status), timeout
    except TimeoutError:
        return "timeout", timeout
    except aiohttp.ClientError as exc:
        return type(exc).__name__, timeout


async def hand_in(
    session: aiohttp.ClientSession, replica: Replica, ids: list[str], timeout: float = 60.0
) -> tuple[str, float]:
    payload = {"account": ACCOUNT, "request_ids": ids}
    return await post(session, f"{replica.url}/api/v1/requests", payload, timeout)


async def webhook(
    session: aiohttp.ClientSession, replica: Replica, request_id: str
) -> tuple[str, float]:
    now = time.time()
    event = {
        "event_type": "DELIVERY_EVENTS",
        "timestamp": int(now * 1000),
        "request_id": request_id,
        "msg_id": f"{request_id[:-4]}beef",
        "conversation_type": "utility",
        "message_type": "TEXT",
        "recipient": "+491700000000",
        "originator": "+15550100100",
        "status": "sent",
    }
    return await post(session, f"{replica.url}/webhooks/d7/{ACCOUNT}", event, CALL_TIMEOUT)


async def wait_leader(
    session: aiohttp.ClientSession, replicas: dict[str, Replica], timeout: float = 30.0
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, replica in replicas.items():
            replica.alive()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    replica.metrics_url,
                    headers={"Accept-Encoding": "identity"},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as answer:
                    found = LEADER.findall(await answer.read())
                    if found and float(found[0]) == 1:
                        return name
        await asyncio.sleep(0.2)
    raise SystemExit(f"no replica led within {timeout:g} s")


# --- what the calls say -----------------------------------------------------------------------


def times(calls: list[Call]) -> list[float]:
    return [c.seconds for c in calls]


def summary(calls: list[Call]) -> str:
    if not calls:
        return "none"
    t = times(calls)
    statuses = Counter(c.status for c in calls)
    ok = {k: v for k, v in statuses.items() if k in ("200", "202")}
    other = {k: v for k, v in statuses.items() if k not in ok}
    return f"{len(calls)} p50 {ms(pct(t, 50))} p99 {ms(pct(t, 99))} max {ms(max(t))}" + (
        f" (not answered 2xx: {other})" if other else ""
    )


def leadership(seen: Seen) -> str:
    leading = [row[1] for row in seen.rows if row[1] is not None]
    changes = sum(a != b for a, b in itertools.pairwise(leading))
    state = "leader" if leading and leading[-1] == 1 else "follower"
    return f"{state} at the end, {changes} leadership change(s) seen"


def cycles(runs: dict[str, ReplicaRun], start_at: float, end_at: float) -> str:
    """Report cycles the leaders finished in the window: last-success times (unix times) inside
    it, and new errors; with the cycle durations /metrics showed after its first scrape."""
    successes, errors, durations = set(), 0.0, []
    for r in runs.values():
        rows = [row for row in r.seen.rows if row[1] == 1]
        for _, _, last, _, _ in rows:
            if last is not None and start_at <= last <= end_at:
                successes.add(last)
        counts = [row[3] for row in rows if row[3] is not None]
        if counts:
            errors += counts[-1] - counts[0]
        previous = rows[0][4] if rows else None  # the cycle before the window
        for _, _, _, _, duration in rows:
            if duration is not None and duration != previous:
                durations.append(duration)
            previous = duration if duration is not None else previous
    shown = ", ".join(f"{d:.2f}" for d in durations[-8:]) or "none"
    return (
        f"{len(successes)} succeeded, {errors:.0f} failed in {end_at - start_at:.0f} s; "
        f"their durations (whatsapp_exporter_poll_duration_seconds, newest 8): {shown} s"
    )


# --- the processes ----------------------------------------------------------------------------


class Child:
    """A role of this file in its own process; talks over stdin/stdout lines."""

    def __init__(self, role: str, args: list[str], log: Path):
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), f"--role={role}", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def line(self) -> str:
        assert self.process.stdout is not None
        found = self.process.stdout.readline()
        if not found:
            raise SystemExit(f"{self.log.stem} exited:\n{self.log.read_text()[-3000:]}")
        return found.strip()

    def make(self, count: int) -> list[str]:
        """New requests at the simulator: their ids."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"make {count}\n")
        self.process.stdin.flush()
        return json.loads(self.line())

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> None:
        stop_process(self.process, 10)


class Replica:
    """`python -m exporter` with --storage.url: one of the replicas sharing the database."""

    def __init__(self, name: str, workdir: Path, config: Path, url: str, password_file: Path):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"{self.url}/metrics"
        self.log = workdir / f"replica-{name}.log"
        with self.log.open("w") as stderr:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "exporter",
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    f"--storage.path={workdir / ('storage-' + name)}",
                    f"--storage.url={url}",
                    f"--storage.password-file={password_file}",
                ],
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.pid = self.process.pid

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"replica {self.name} exited:\n{self.log.read_text()[-3000:]}")

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    self.metrics_url, timeout=aiohttp.ClientTimeout(total=2)
                ) as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise SystemExit(f"replica {self.name} did not answer within {timeout:g} s")


def stop_all(replicas: list[Replica], grace: float = 10.0) -> None:
    """SIGTERM to every replica at once; -9 for any still running after `grace` (its database
    is this condition's alone)."""
    for replica in replicas:
        if replica.process.poll() is None:
            replica.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for replica in replicas:
        try:
            replica.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"  replica {replica.name} did not stop within {grace:g} s of SIGTERM: killed")
            replica.process.kill()
            replica.process.wait()
        log = replica.log.read_text()
        if "Traceback" in log:
            print(f"  replica {replica.name} logged a traceback:\n{log[-3000:]}")


# --- the delay proxy --------------------------------------------------------------------------


async def proxy(target: int, delay: float, parent: int) -> int:
    """127.0.0.1:<any> -> 127.0.0.1:<target>; each chunk is held `delay` seconds (while the
    delay is on) and written in order. Prints its port; stops on SIGTERM, when its parent
    is gone, or after LIFETIME."""
    loop = asyncio.get_running_loop()
    state = {"delay": 0.0}
    loop.add_signal_handler(signal.SIGUSR1, lambda: state.update(delay=delay))
    loop.add_signal_handler(signal.SIGUSR2, lambda: state.update(delay=0.0))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    connections: set[asyncio.Task] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)  # bounded

        async def forward() -> None:
            while True:
                due, data = await held.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(forward())
        try:
            while data := await reader.read(65536):
                await held.put((loop.time() + state["delay"], data))
        except OSError:
            pass
        finally:
            await held.put((0.0, b""))
            with contextlib.suppress(OSError):
                await sender
            writer.close()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        task = asyncio.current_task()
        connections.add(task)
        try:
            await asyncio.gather(
                pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True
            )
        except asyncio.CancelledError:  # stopping: asyncio would print a cancelled handler's
            pass  # traceback, since start_server asks each connection's task for its exception
        finally:
            connections.discard(task)

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    deadline = time.monotonic() + LIFETIME
    while not stop.is_set() and time.monotonic() < deadline and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    server.close()
    for task in list(connections):
        task.cancel()
    return 0


# --- the D7 simulator -------------------------------------------------------------------------


def d7sim(parent: int) -> int:
    """simulators.D7Simulator, its messages moving on by themselves; `make N` on stdin creates
    N one-message requests and answers their ids as a JSON line. Stops at EOF, when its parent
    is gone, or after LIFETIME."""
    import threading  # noqa: PLC0415

    from simulators import D7Simulator  # noqa: PLC0415

    with D7Simulator(auto=True, tick=0.5, index_delay=0, seed=1) as sim:
        print(json.dumps({"base_url": sim.base_url, "token": sim.token}), flush=True)
        done = threading.Event()

        def watchdog() -> None:
            deadline = time.monotonic() + LIFETIME
            while not done.wait(1.0):
                if os.getppid() != parent or time.monotonic() > deadline:
                    os._exit(0)

        threading.Thread(target=watchdog, daemon=True).start()
        for line in sys.stdin:
            command, _, count = line.partition(" ")
            if command == "make":
                kinds = ("marketing", "utility", "service")
                ids = [
                    sim.send(1, conversation_type=kinds[i % 3], message_type="TEMPLATE")
                    for i in range(int(count))
                ]
                print(json.dumps(ids), flush=True)
        done.set()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
