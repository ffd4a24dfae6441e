"""Which replica polls what: shards of the configured accounts, and one leader per shard
(docs/architecture.md, "Replicas").

Replicas on one PostgreSQL database elect a leader per shard with a session advisory lock, held on
a connection of its own: PostgreSQL releases it when that connection dies, so a leader killed
with -9 hands over as soon as its socket closes, with no consensus of our own. Only the leader
polls its shard's accounts and shows their values; every replica serves ingest and webhooks.

Overlap is prevented on both sides of the lease. The leader confirms its session every
`lease / 3` and steps down as soon as it cannot within `lease / 3`; a new leader waits that long
again after taking the lock before it polls, so a leader cut off from the database (whose session
the server already dropped) has stopped before the next one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOCK_NAMESPACE = 0x57415858  # "WAXX": the high half of every lock key, so ours never collide


class ShardError(ValueError):
    pass


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, provider: str, account: str) -> bool:
        """A stable hash, the same in every replica and every release: sha256, never hash()."""
        if self.count == 1:
            return True
        digest = hashlib.sha256(f"{provider}\0{account}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    @property
    def lock_key(self) -> int:
        """One advisory lock per (shard, shard count): a replica configured for another split
        never shares a leader with this one."""
        low = (self.count << 16 | self.index) & 0xFFFFFFFF
        return (LOCK_NAMESPACE << 32 | low) - (1 << 63)  # a signed bigint, as PostgreSQL takes

    @classmethod
    def parse(cls, text: str, hostname: str | None = None) -> Shard:
        """`I/N`, or `auto/N`: I is the ordinal of a StatefulSet pod's name (`exporter-3`)
        modulo N, so 2N pods make N shards of two replicas each."""
        match = re.fullmatch(r"\s*(auto|\d+)\s*/\s*(\d+)\s*", text)
        if not match or int(match[2]) < 1:
            raise ShardError(f"--cluster.shard {text!r}: expected I/N or auto/N, N >= 1")
        count = int(match[2])
        if match[1] == "auto":
            name = hostname if hostname is not None else socket.gethostname()
            ordinal = re.search(r"-(\d+)$", name)
            if not ordinal:
                raise ShardError(
                    f"--cluster.shard auto/{count}: the hostname {name!r} does not end in -<n> "
                    "(a StatefulSet pod's ordinal); give I/N"
                )
            return cls(int(ordinal[1]) % count, count)
        index = int(match[1])
        if index >= count:
            raise ShardError(f"--cluster.shard {text!r}: I must be below N")
        return cls(index, count)


Connect = Callable[[], Awaitable["LockSession"]]


class LockSession:
    """One PostgreSQL session that holds (or tries for) the shard's advisory lock."""

    def __init__(self, connection):
        self._connection = connection

    @classmethod
    async def open(cls, url: str, password: str | None, timeout: float) -> LockSession:
        import psycopg  # noqa: PLC0415 - only replicas that share a database need it

        connection = await psycopg.AsyncConnection.connect(
            url,
            **({"password": password} if password else {}),
            autocommit=True,
            connect_timeout=max(1, round(timeout)),
            # the server notices a vanished leader host within ~10 s, not the kernel's 2 hours
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            application_name="whatsapp-exporter-leader",
        )
        for setting in ("tcp_keepalives_idle = 5", "tcp_keepalives_interval = 2"):
            with contextlib.suppress(psycopg.Error):
                await connection.execute(f"SET {setting}")
        return cls(connection)

    async def try_lock(self, key: int) -> bool:
        cursor = await self._connection.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def confirm(self, key: int) -> bool:
        """Still connected, and the lock still ours (pg_locks, this very session)."""
        cursor = await self._connection.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND pid = pg_backend_pid() AND objid = %s AND classid = %s",
            (key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF),
        )
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._connection.close()


class Election:
    """Runs for the life of the exporter: becomes leader when it can, steps down when it must,
    and says so through `on_change` (on the event loop)."""

    def __init__(
        self,
        shard: Shard,
        connect: Connect,
        *,
        lease: float = 15.0,
        on_change: Callable[[bool], Awaitable[None]],
    ):
        self.shard = shard
        self.leader = False
        self._connect = connect
        self._step = lease / 3
        self._on_change = on_change

    async def run(self) -> None:
        while True:
            session = None
            try:
                session = await asyncio.wait_for(self._connect(), self._step * 2)
                await self._campaign(session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is unreachable or the session broke
                log.warning(
                    "leader election: the database cannot be reached; retrying",
                    extra={"fields": {"shard": str(self.shard), "error": _one_line(exc)}},
                )
            finally:
                await self._set(False)
                if session is not None:
                    await session.close()
            await asyncio.sleep(self._step)

    async def _campaign(self, session: LockSession) -> None:
        key = self.shard.lock_key
        while not await asyncio.wait_for(session.try_lock(key), self._step):
            await asyncio.sleep(self._step)
        # a leader cut off from the database confirms its session every step and steps down
        # when it cannot: waiting as long again means it has stopped before this one starts
        await asyncio.sleep(self._step)
        if not await asyncio.wait_for(session.confirm(key), self._step):
            return
        await self._set(True)
        while True:
            await asyncio.sleep(self._step)
            if not await asyncio.wait_for(session.confirm(key), self._step):
                log.warning("leader election: lost the lock", extra={"fields": self._fields()})
                return

    async def _set(self, leader: bool) -> None:
        if leader == self.leader:
            return
        self.leader = leader
        log.info(
            "leader election: leading" if leader else "leader election: following",
            extra={"fields": self._fields()},
        )
        await self._on_change(leader)

    def _fields(self) -> dict[str, str]:
        return {"shard": str(self.shard)}


def _one_line(exc: BaseException) -> str:
    """psycopg errors run to several lines and may quote the connection string: keep the first
    line, never a password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(
        r"(password=)\S+", r"\1<secret>", re.sub(r"://[^@/\s]*@", "://<credentials>@", text)
    )
