"""Two replicas on one PostgreSQL database: the leader is killed with -9 mid-poll and the follower
takes over within the lease; every D7 id ends counted exactly once per status, against the
simulator's truth; polled values never appear from two replicas at once."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from simulators import D7Simulator, KaleyraSimulator
from tests.conftest import parse_exposition, value, wait_for
from tests.postgres import PASSWORD, postgres_server_fixture  # noqa: F401 - the server

LEASE = 3.0  # the smallest the CLI takes: takeover within a few seconds
TOKEN = "ingest-secret"
NUMBER = "+12025550100"
IDS = 1000


@dataclass
class Replica:
    name: str
    process: subprocess.Popen
    log: Path
    port: int = 0
    scrapes: list[tuple[float, bool, bool]] = field(default_factory=list)  # (time, leads, polled)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def series(self):
        return parse_exposition(httpx.get(f"{self.url}/metrics", timeout=2).text)


def start(name: str, directory: Path, config: Path, url: str, password_file: Path) -> Replica:
    log = directory / f"{name}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            f"--config.file={config}",
            "--web.listen-address=127.0.0.1:0",
            f"--storage.path={directory / name}",
            f"--storage.url={url}",
            f"--storage.password-file={password_file}",
            f"--cluster.lease={LEASE:g}s",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    replica = Replica(name, process, log)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{name} exited: {log.read_text()[-2000:]}")
        found = re.search(r"msg=listening .*?\bport=(\d+)", log.read_text())
        if found:
            replica.port = int(found[1])
        return bool(found)

    wait_for(listening, 20, f"{name} to listen")
    return replica


def leads(replica: Replica) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return value(replica.series(), "whatsapp_exporter_leader") == 1
    return False


def watch(replicas: list[Replica], stop: threading.Event) -> None:
    """Every 100 ms, who leads and who shows polled values (Kaleyra's or D7's counters)."""
    while not stop.is_set():
        for replica in replicas:
            if replica.process.poll() is not None:  # a dead replica shows nothing
                replica.scrapes.append((time.monotonic(), False, False))
                continue
            with contextlib.suppress(httpx.HTTPError):
                series = replica.series()
                polled = any(
                    name.startswith(("whatsapp_client_", "whatsapp_messages_total"))
                    for name, _ in series
                )
                leader = value(series, "whatsapp_exporter_leader") == 1
                replica.scrapes.append((time.monotonic(), leader, polled))
        stop.wait(0.1)


def test_the_leader_dies_and_the_follower_carries_on_counting_every_status_once(
    postgres_server,
    tmp_path,
):
    database = postgres_server.create_database()
    url = postgres_server.url(database, password=None)
    password_file = tmp_path / "pg-password"
    password_file.write_text(PASSWORD + "\n")
    replicas: list[Replica] = []
    stop = threading.Event()
    with (
        D7Simulator(auto=False, index_delay=0) as d7,
        KaleyraSimulator(numbers=[NUMBER], tick=0.2) as kaleyra,
    ):
        config = tmp_path / "config.yaml"
        config.write_text(
            f"""
d7:
  - account: prod
    base_url: {d7.base_url}
    token: demo-token
    ingest_token: {TOKEN}
    interval: 0.5s
    retry_first: 0.5s
    retry_max: 1s
    rate_limit: 100000/m
    concurrency: 16
kaleyra:
  - {{account: main, base_url: "{kaleyra.base_url}", numbers: ["{NUMBER}"], interval: 1s}}
"""
        )
        try:
            first = start("a", tmp_path, config, url, password_file)
            replicas.append(first)
            wait_for(lambda: leads(first), 20, "the first replica to lead")
            second = start("b", tmp_path, config, url, password_file)
            replicas.append(second)
            watcher = threading.Thread(target=watch, args=(replicas, stop), daemon=True)
            watcher.start()
            assert not leads(second)

            # 1,000 ids, half handed to each replica: every replica takes ingest
            ids = [d7.send(conversation_type="utility", message_type="TEXT") for _ in range(IDS)]
            for replica, part in ((first, ids[: IDS // 2]), (second, ids[IDS // 2 :])):
                answer = httpx.post(
                    f"{replica.url}/api/v1/requests",
                    json={"account": "prod", "request_ids": part},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=10,
                )
                assert answer.status_code == 202, answer.text
            for request_id in ids:
                d7.advance(request_id, "sent")

            def sent_counted(replica: Replica) -> float:
                with contextlib.suppress(httpx.HTTPError):
                    found = value(replica.series(), "whatsapp_messages_total", status="sent")
                    return found or 0
                return 0

            wait_for(lambda: sent_counted(first) >= IDS / 4, 30, "the leader to poll")
            first.process.send_signal(signal.SIGKILL)  # mid-poll: ids are still being asked
            killed = time.monotonic()
            first.process.wait(10)
            wait_for(lambda: leads(second), LEASE * 4, "the follower to take over")
            took = time.monotonic() - killed

            # every id handed in before the kill is followed to the end by the new leader: each
            # is seen as sent once (a poll sees the status a message has when asked)
            wait_for(lambda: sent_counted(second) == IDS, 60, "every id to be seen as sent")

            # the truth: final statuses at the simulator
            truth = {"read": ids[:500], "un_delivered": ids[500:800], "rejected": ids[800:]}
            for status, part in truth.items():
                for request_id in part:
                    d7.advance(request_id, status)

            def done() -> float:
                found = value(second.series(), "whatsapp_tracked_requests", state="done")
                return found or 0

            wait_for(lambda: done() == IDS, 60, "every id to be final")
            series = second.series()
        finally:
            stop.set()
            for replica in replicas:
                if replica.process.poll() is None:
                    replica.process.send_signal(signal.SIGTERM)
                    replica.process.wait(15)
    postgres_server.drop_database(database)

    # takeover within the lease: the lock is released when the dead leader's socket closes;
    # the follower retries every lease/3 and waits lease/3 more before it polls
    print(f"takeover after kill -9: {took:.2f}s (lease {LEASE:g}s)")
    assert took <= LEASE + 2, f"the follower took {took:.1f}s to lead (lease {LEASE}s)"
    counts = {
        status: value(series, "whatsapp_messages_total", status=status)
        for status in ("sent", "delivered", "read", "un_delivered", "rejected")
    }
    assert counts == {
        "sent": IDS,
        "delivered": len(truth["read"]),  # read implies delivered
        "read": len(truth["read"]),
        "un_delivered": len(truth["un_delivered"]),
        "rejected": len(truth["rejected"]),
    }, counts
    # never two replicas with polled values at once (scrapes less than 100 ms apart)
    timeline = sorted(
        (at, replica.name, polled) for replica in replicas for at, _, polled in replica.scrapes
    )
    showing: dict[str, bool] = {}
    for at, name, polled in timeline:
        showing[name] = polled
        assert sum(showing.values()) <= 1, f"two replicas showed polled values at {at:.2f}"
    assert any(polled for _, _, polled in second.scrapes)
    assert not any(polled for at, _, polled in second.scrapes if at < killed)
    assert any(leader for _, leader, _ in first.scrapes)
    for replica in replicas:
        assert "Traceback" not in replica.log.read_text()
