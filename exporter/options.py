"""How the exporter runs, from its flags: one frozen object, parsed and checked once by the CLI."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exporter.cluster import Shard

if TYPE_CHECKING:
    import ssl

    from exporter.web import Security

DEFAULT_STORAGE = "data"
EVERY_ACCOUNT = Shard(0, 1)


@dataclass(frozen=True)
class Guard:
    """The web config as the listeners use it (exporter.webconfig's WebGuard): re-read each
    time, since the file may change under a running process."""

    security: Callable[[], Security]
    tls: Callable[[], ssl.SSLContext | None]
    ingest_tls: Callable[[], ssl.SSLContext | None]  # never client certificates


@dataclass(frozen=True)
class Options:
    listen_address: str  # --web.listen-address
    ingest_address: str | None = None  # --web.ingest-address
    guard: Guard | None = None  # --web.config.file; None: plain HTTP, no auth
    lifecycle: bool = False  # --web.enable-lifecycle
    storage_path: str = DEFAULT_STORAGE  # --storage.path
    storage_url: str | None = None  # --storage.url
    storage_password: str | None = field(default=None, repr=False)  # --storage.password-file
    shard: Shard = EVERY_ACCOUNT  # --cluster.shard
    lease: float = 15.0  # --cluster.lease, seconds
    # a programming error in a provider raises instead of counting as a failed poll (tests)
    strict: bool = False
    # the exporter is the whole process (the command line, not a test or the demo's thread):
    # it may tune the process's garbage collector
    own_process: bool = False
