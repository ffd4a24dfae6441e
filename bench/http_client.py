"""CPU per provider request: the exporter's client (aiohttp, behind `Api.call`) against httpx.

Why the exporter polls with aiohttp: at 1,000 Kaleyra numbers most of the polls' CPU was httpx
building requests, parsing URLs and checking its pool. Both clients here fetch the same 11 KB
Kaleyra answers from bench/scale.py's fake provider (50 ms latency, its own process), 4 requests
in flight, read the whole body and parse its JSON; only this process's CPU is counted. The
baseline is httpx configured as the exporter configured it until this change.

    python bench/http_client.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from exporter.providers.base import Api, Client
from exporter.ratelimit import RequestBudget

NUMBERS = 100
IN_FLIGHT = 4
HEADERS = {"User-Agent": "bench", "Authorization": "Bearer x"}


def path(index: int) -> str:
    return f"/v1/wamonitor/stats/+1{index // 10:05d}{index % 10:04d}"


async def with_httpx(base_url: str, requests: int) -> float:
    async with httpx.AsyncClient(
        base_url=base_url,
        headers=HEADERS,
        timeout=10,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT),
    ) as client:

        async def one(index: int) -> None:
            response = await client.send(client.build_request("GET", path(index)), stream=True)
            try:
                chunks = [chunk async for chunk in response.aiter_bytes()]
            finally:
                await response.aclose()
            assert response.status_code == 200, response.status_code
            json.loads(b"".join(chunks))

        return await _timed(one, requests)


async def with_api(base_url: str, requests: int) -> float:
    client = Client(base_url, headers=HEADERS, timeout=10, connections=IN_FLIGHT)
    api = Api(client, RequestBudget(10**9, 1.0), lambda body: None, IN_FLIGHT, deadline=10)
    try:

        async def one(index: int) -> None:
            body = await api.call("GET", path(index))
            assert isinstance(body, dict), type(body)

        return await _timed(one, requests)
    finally:
        await client.close()


async def _timed(one, requests: int) -> float:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def gated(index: int) -> None:
        async with gate:
            await one(index)

    await asyncio.gather(*(gated(i) for i in range(IN_FLIGHT)))  # connections up, imports done
    started = time.process_time()
    await asyncio.gather(*(gated(i % NUMBERS) for i in range(requests)))
    return (time.process_time() - started) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    scale = Path(__file__).resolve().parent / "scale.py"
    fake = subprocess.Popen(
        [sys.executable, str(scale), "--serve", "fake", "0.05", str(NUMBERS), "0", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None
        base_url = f"http://127.0.0.1:{int(fake.stdout.readline())}"
        runs: dict[str, list[float]] = {"httpx (baseline)": [], "exporter (aiohttp)": []}
        for _ in range(2):  # interleaved, so a noisy moment hits both
            runs["httpx (baseline)"].append(asyncio.run(with_httpx(base_url, args.requests)))
            runs["exporter (aiohttp)"].append(asyncio.run(with_api(base_url, args.requests)))
    finally:
        fake.terminate()
        fake.wait()
    best = {name: min(times) for name, times in runs.items()}
    print(
        f"{args.requests} requests x 2 each, {IN_FLIGHT} in flight, 50 ms latency, CPU per request:"
    )
    for name, cpu in best.items():
        each = ", ".join(f"{t * 1e3:.3f}" for t in runs[name])
        print(f"  {name:20} {cpu * 1e3:6.3f} ms  (runs: {each})")
    ratio = best["exporter (aiohttp)"] / best["httpx (baseline)"]
    passed = ratio < 1
    print(
        f"{'PASS' if passed else 'FAIL'} the exporter's CPU per request is x{ratio:.2f} of httpx's "
        "(target < x1: the reason the exporter is not on httpx)"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
