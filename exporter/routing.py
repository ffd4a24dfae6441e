"""Requests and answers as plain data, so a provider can serve routes (D7's ingest API and
webhook) without knowing the HTTP server behind them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # names in any case (a case-insensitive mapping)
    body: bytes
    query: str = ""  # the raw query string, without its "?" (Meta's subscription handshake)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """`path` is matched exactly, or (with `prefix`) as a prefix followed by at least one
    character, which the handler reads from `request.path`."""

    method: str
    path: str
    handler: Handler
    prefix: bool = False
    # told when the HTTP layer refuses a request before the handler sees it ("too_large": a
    # body over the limit), so a provider can count what it never received
    refused: Callable[[Request, str], None] | None = None

    def matches(self, path: str) -> bool:
        if self.prefix:
            return path.startswith(self.path) and len(path) > len(self.path)
        return path == self.path


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


def json_response(status: int, payload: object) -> Response:
    return Response(status, json.dumps(payload).encode() + b"\n", "application/json")
