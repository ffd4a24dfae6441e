"""The web surface as an operator deploys it (issue #9): real exporter processes serving TLS,
client certificates, basic auth and headers, the lifecycle flag and the ingest listener; and
clients that flood, smuggle, stall a body or stall their headers.

Four processes, each started once for the module (a config that does not change between tests
is not worth a second start): `plain` (HTTP, ingest listener, no lifecycle), `lifecycle` (the
same with --web.enable-lifecycle), `secure` (TLS, basic auth, headers, ingest listener) and
`mtls` (TLS requiring client certificates from the test's CA); the flood tests start their own.
Every listener binds port 0 and the test reads the port from the "listening" log line, so no
port is ever guessed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import resource
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from exporter.web import BODY_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS
from tests.conftest import parse_exposition, value, wait_for
from tests.test_webconfig import _key, _key_pem, _pem

pytestmark = pytest.mark.processes  # every test runs `python -m exporter`

TOKEN = "ingest-secret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BEARER_LINE = f"Authorization: Bearer {TOKEN}\r\n".encode()
USER, PASSWORD = "prometheus", "s3cret-scrape"
AUTH = (USER, PASSWORD)

# a target that fails with `connect` (fine: these tests are about the web side), and a D7
# account so that the ingest API is served
CONFIG = """\
kaleyra: [{account: k, base_url: 'http://127.0.0.1:9', numbers: ['+12025550100']}]
d7:
  - {account: prod, base_url: 'http://127.0.0.1:9', token: t, ingest_token: ingest-secret}
"""

FILES_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # what a soft limit may be raised to

HEADERS = "http_server_config: {headers: {X-Frame-Options: deny, X-Content-Type-Options: nosniff}}"


# --- a PKI made here: a CA, a server certificate for 127.0.0.1, clients of this CA and another --


def _issue(name: str, key, issuer=None, issuer_key=None, *, ca: bool = False) -> x509.Certificate:
    """A certificate; the server's names 127.0.0.1 and localhost, as a scrape config dials."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(
            issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(directory: Path) -> Path:
    """ca.pem, server.pem/.key, client.pem/.key (signed by ca) and stranger.pem/.key (signed
    by a CA the exporter does not trust)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = _key(), _key()
    ca, other = _issue("test-ca", ca_key, ca=True), _issue("other-ca", other_key, ca=True)
    (directory / "ca.pem").write_bytes(_pem(ca))
    for name, issuer, issuer_key in (
        ("server", ca, ca_key),
        ("client", ca, ca_key),
        ("stranger", other, other_key),
    ):
        key = _key()
        (directory / f"{name}.pem").write_bytes(_pem(_issue(name, key, issuer, issuer_key)))
        (directory / f"{name}.key").write_bytes(_key_pem(key))
    return directory


def secure_web_config(directory: Path, user: str = USER, password: str = PASSWORD) -> Path:
    """A PKI in `directory` and web.yml beside it: TLS, one bcrypt user (cost 4) and headers."""
    make_pki(directory)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    path = directory / "web.yml"
    path.write_text(
        "tls_server_config: {cert_file: server.pem, key_file: server.key}\n"
        f"basic_auth_users: {{{user}: '{hashed}'}}\n{HEADERS}\n"
    )
    return path


def tls_client(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    """Trusts the test CA only; presents `cert` when given."""
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    if cert:
        context.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return context


# --- real exporter processes ------------------------------------------------------------------


@dataclass
class Process:
    popen: subprocess.Popen
    directory: Path
    port: int
    ingest_port: int | None
    scheme: str = "http"

    @property
    def config(self) -> Path:
        return self.directory / "config.yaml"

    def log(self) -> str:
        return (self.directory / "exporter.log").read_text()

    def url(self, path: str = "", *, ingest: bool = False) -> str:
        port = self.ingest_port if ingest else self.port
        return f"{self.scheme}://127.0.0.1:{port}{path}"


def launch(
    directory: Path, *flags: str, config: str = CONFIG, nofile: int | None = None
) -> Process:
    """`python -m exporter` on loopback port 0 (and ingest port 0 when asked), its log in a file;
    returns once it listens, with the ports it logged. `nofile`: its soft limit of open files."""

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(config)
    log = directory / "exporter.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                f"--config.file={directory / 'config.yaml'}",
                "--web.listen-address=127.0.0.1:0",
                f"--storage.path={directory / 'data'}",
                *flags,
            ],
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if nofile is not None:  # at once: the limit counts from the next descriptor it opens
        resource.prlimit(popen.pid, resource.RLIMIT_NOFILE, (nofile, FILES_HARD))

    def listening() -> re.Match | None:
        if popen.poll() is not None:
            raise AssertionError(f"the exporter exited ({popen.returncode}): {log.read_text()}")
        return re.search(r"msg=listening\b.*", log.read_text())

    line = wait_for(listening, 20, "the exporter to listen")[0]
    ingest = re.search(r"\bingest_port=(\d+)", line)
    scheme = "https" if any(f.startswith("--web.config.file") for f in flags) else "http"
    return Process(
        popen,
        directory,
        int(re.search(r"\bport=(\d+)", line)[1]),
        int(ingest[1]) if ingest else None,
        scheme,
    )


def finish(process: Process) -> None:
    """SIGTERM; then the log must hold no traceback, whatever the tests sent it."""
    process.popen.send_signal(signal.SIGTERM)
    try:
        process.popen.wait(15)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait(5)
        raise AssertionError("the exporter did not stop within 15s of SIGTERM") from None
    log = process.log()
    assert process.popen.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """The PKI, web.yml (TLS, basic auth, headers), tls.yml (TLS alone) and mtls.yml (client
    certificates)."""
    directory = secure_web_config(tmp_path_factory.mktemp("pki")).parent
    (directory / "tls.yml").write_text(
        "tls_server_config: {cert_file: server.pem, key_file: server.key}\n"
    )
    (directory / "mtls.yml").write_text(
        "tls_server_config: {cert_file: server.pem, key_file: server.key,\n"
        "  client_auth_type: RequireAndVerifyClientCert, client_ca_file: ca.pem}\n"
    )
    return directory


def _process(tmp_path_factory, name: str, *flags: str) -> Iterator[Process]:
    process = launch(tmp_path_factory.mktemp(name), *flags)
    try:
        yield process
    finally:
        finish(process)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Iterator[Process]:
    yield from _process(tmp_path_factory, "plain", "--web.ingest-address=127.0.0.1:0")


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory) -> Iterator[Process]:
    yield from _process(tmp_path_factory, "lifecycle", "--web.enable-lifecycle")


@pytest.fixture(scope="module")
def secure(tmp_path_factory, pki) -> Iterator[Process]:
    yield from _process(
        tmp_path_factory,
        "secure",
        f"--web.config.file={pki / 'web.yml'}",
        "--web.ingest-address=127.0.0.1:0",
    )


@pytest.fixture(scope="module")
def mtls(tmp_path_factory, pki) -> Iterator[Process]:
    yield from _process(tmp_path_factory, "mtls", f"--web.config.file={pki / 'mtls.yml'}")


# --- raw connections --------------------------------------------------------------------------


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST /api/v1/requests HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


# a well-formed ingest request that fails validation (422): the route ran, nothing is stored
EMPTY_INGEST = _post(b"Content-Length: 2\r\nConnection: close\r\n" + BEARER_LINE, b"{}")


async def exchange(port: int, data: bytes, idle: float = 0.5) -> tuple[bytes, bool]:
    """Sends `data` on a fresh connection; returns all that came back until the server closed
    (True) or was silent for `idle` seconds (False)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), idle):
            received += chunk
        return received, True
    except TimeoutError:
        return received, False
    except ConnectionResetError:
        return received, True
    finally:
        writer.close()


def statuses(received: bytes) -> list[int]:
    """The status of every response in a byte stream (HTTP/1.0 too: aiohttp's 400s are)."""
    return [int(code) for code in re.findall(rb"(?m)^HTTP/1\.[01] (\d{3}) ", received)]


def reload_successful(process: Process) -> float | None:
    series = parse_exposition(httpx.get(process.url("/metrics"), timeout=5).text)
    return value(series, "whatsapp_exporter_config_last_reload_successful")


# --- 1, 2: TLS and client certificates --------------------------------------------------------


def test_tls_scrape_verifies_against_the_test_ca_and_fails_without_it(secure, pki):
    with httpx.Client(verify=tls_client(pki), auth=AUTH, timeout=5) as client:
        response = client.get(secure.url("/metrics"))
    assert response.status_code == 200
    assert "whatsapp_exporter_build_info" in response.text
    # the system's roots do not know the test CA: a verification error, not a silent fallback
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(secure.url("/metrics"), auth=AUTH, timeout=5)
    # plain HTTP on the TLS port is never answered in plain text
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{secure.port}/metrics", auth=AUTH, timeout=5)


def test_client_certificates_are_required_and_verified(mtls, pki):
    url = mtls.url("/metrics")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        contexts = {cert: tls_client(pki, cert) for cert in ("client", None, "stranger")}
        for context in contexts.values():
            context.maximum_version = version
        assert httpx.get(url, verify=contexts["client"], timeout=5).status_code == 200
        # no certificate, or one from a CA the exporter was not told to trust: no response
        # (asyncio closes without sending OpenSSL's alert, so the client sees only an EOF)
        for cert in (None, "stranger"):
            with pytest.raises(httpx.TransportError):
                httpx.get(url, verify=contexts[cert], timeout=5)
    assert httpx.get(url, verify=tls_client(pki, "client"), timeout=5).status_code == 200


# --- 3: basic auth and headers ----------------------------------------------------------------


def test_basic_auth_guards_every_page_and_headers_are_on_every_answer(secure, pki):
    refused = {
        "missing": None,
        "wrong password": (USER, "wrong"),
        "unknown user": ("mallory", PASSWORD),
        "empty password": (USER, ""),
    }
    with httpx.Client(verify=tls_client(pki), timeout=5) as client:
        for path in ("/metrics", "/", "/-/healthy"):
            good = client.get(secure.url(path), auth=AUTH)
            assert good.status_code == 200, path
            assert good.headers["X-Frame-Options"] == "deny"
            assert good.headers["X-Content-Type-Options"] == "nosniff"
            for name, auth in refused.items():
                bad = client.get(secure.url(path), auth=auth)
                assert bad.status_code == 401, (path, name)
                assert bad.headers["WWW-Authenticate"].startswith("Basic "), (path, name)
                assert bad.headers["X-Frame-Options"] == "deny", (path, name)
                assert "whatsapp_" not in bad.text and "<table>" not in bad.text
        # a Bearer header is no basic auth: the main port asks for credentials even here
        ingest = client.post(
            secure.url("/api/v1/requests"),
            json={"account": "prod", "request_ids": ["m-1"]},
            headers=BEARER,
        )
        assert ingest.status_code == 401 and "Basic" in ingest.headers["WWW-Authenticate"]


# --- 4: lifecycle ------------------------------------------------------------------------------


def test_reload_endpoint_is_refused_without_the_flag_but_sighup_reloads(plain):
    response = httpx.post(plain.url("/-/reload"), timeout=5)
    assert response.status_code == 403
    assert "--web.enable-lifecycle" in response.text
    assert reload_successful(plain) == 1
    # a broken config and SIGHUP: the reload runs, fails and says so; a fixed one, it succeeds
    try:
        plain.config.write_text(CONFIG + "bogus: 1\n")
        plain.popen.send_signal(signal.SIGHUP)
        wait_for(lambda: reload_successful(plain) == 0, 10, "the failed reload")
        assert "reload failed" in plain.log()
    finally:
        plain.config.write_text(CONFIG)
    plain.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: reload_successful(plain) == 1, 10, "the successful reload")
    assert "config reloaded" in plain.log()


def test_reload_endpoint_and_sighup_reload_with_the_flag(lifecycle):
    response = httpx.post(lifecycle.url("/-/reload"), timeout=10)
    assert (response.status_code, response.text) == (200, "Reloaded.\n")
    assert lifecycle.log().count("config reloaded") == 1
    assert httpx.get(lifecycle.url("/-/reload"), timeout=5).headers["Allow"] == "POST"
    lifecycle.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: lifecycle.log().count("config reloaded") == 2, 10, "the SIGHUP reload")
    assert reload_successful(lifecycle) == 1


# --- 5: the ingest listener -------------------------------------------------------------------


def test_the_ingest_port_serves_only_the_ingest_api(plain):
    with httpx.Client(timeout=5) as client:
        for method, path in (("GET", "/metrics"), ("GET", "/"), ("POST", "/-/reload")):
            answer = client.request(method, plain.url(path, ingest=True))
            assert answer.status_code == 404, (method, path)
            assert "only the ingest API" in answer.text
            assert "whatsapp_" not in answer.text
        url = plain.url("/api/v1/requests", ingest=True)
        body = {"account": "prod", "request_ids": ["ingest-port-1", "ingest-port-2"]}
        assert client.post(url, json=body).status_code == 401
        accepted = client.post(url, json=body, headers=BEARER)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["received"] == 2

        # the main port still serves everything, and shows what the ingest port took in
        def pending() -> bool:
            series = parse_exposition(client.get(plain.url("/metrics")).text)
            count = value(series, "whatsapp_tracked_requests", account="prod", state="pending")
            return count is not None and count >= 2

        wait_for(pending, 5, "the ingested ids on the main port's /metrics")


def test_the_ingest_port_asks_for_no_basic_auth_but_for_the_bearer_token(secure, pki):
    url = secure.url("/api/v1/requests", ingest=True)
    body = {"account": "prod", "request_ids": ["tls-ingest-1"]}
    with httpx.Client(verify=tls_client(pki), timeout=5) as client:
        missing = client.post(url, json=body)
        assert missing.status_code == 401
        assert "WWW-Authenticate" not in missing.headers
        assert "Bearer" in missing.json()["error"]
        assert client.post(url, json=body, auth=AUTH).status_code == 401  # basic is not bearer
        accepted = client.post(url, json=body, headers=BEARER)
        assert accepted.status_code == 202, accepted.text
        assert accepted.headers["X-Frame-Options"] == "deny"
        # nothing else on that port, and no credentials asked for: it is simply not there
        assert client.get(secure.url("/metrics", ingest=True)).status_code == 404
        assert client.get(secure.url("/metrics"), auth=AUTH).status_code == 200


# --- 6: many connections at once ---------------------------------------------------------------


def test_500_concurrent_connections_are_all_answered_within_10s(plain):
    """One in five asks for /metrics, the rest for /-/healthy; all are open before any asks."""
    count = 500

    async def burst() -> list[bytes | BaseException]:
        connected = asyncio.Barrier(count)

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", plain.port)
            try:
                await connected.wait()  # all 500 are open before the first request is sent
                writer.write(_get("/metrics" if i % 5 == 0 else "/-/healthy"))
                return await reader.read()
            finally:
                writer.close()

        async with asyncio.timeout(10):
            return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)

    began = time.monotonic()
    answers = asyncio.run(burst())
    took = time.monotonic() - began
    ok = sum(1 for a in answers if isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200 "))
    failures = {
        repr(a)[:80] for a in answers if not isinstance(a, bytes) or a[:12] != b"HTTP/1.1 200"
    }
    assert ok == count, f"{ok}/{count} answered 200 in {took:.1f}s; others: {failures}"
    assert httpx.get(plain.url("/-/healthy"), timeout=5).status_code == 200


# --- 7: request smuggling and malformed framing ------------------------------------------------

# answered "Healthy." if ever parsed (and the connection closed at once)
HIDDEN = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


FRAMING = {
    "te-gzip-chunked": (
        # a valid framing (chunked is last); the project answers every chunked body 411
        _post(
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN),
        ),
        {411},
    ),
    "cl-with-underscore": (
        # Python's int() reads 1_0 as 10: a parser that did would see the hidden request
        _post(b"Content-Length: 1_0\r\n", b"x" + HIDDEN),
        {400},
    ),
    "two-different-content-lengths": (
        _post(b"Content-Length: 1\r\nContent-Length: %d\r\n" % (1 + len(HIDDEN)), b"x" + HIDDEN),
        {400},
    ),
    "content-length-and-chunked": (
        _post(
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % (5 + len(HIDDEN)),
            b"0\r\n\r\n" + HIDDEN,
        ),
        {400},
    ),
    "chunked-not-last": (
        _post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n" + HIDDEN),
        {400},
    ),
    "content-length-with-sign": (_post(b"Content-Length: +1\r\n", b"x" + HIDDEN), {400}),
    "space-before-colon": (
        _post(b"Transfer-Encoding : chunked\r\nContent-Length: 1\r\n", b"x" + HIDDEN),
        {400},
    ),
}


@pytest.mark.parametrize("case", FRAMING)
def test_malformed_framing_gets_one_error_and_no_hidden_request(plain, case):
    """Both listeners; the hidden request must never be answered, whatever the framing said."""
    data, expected = FRAMING[case]

    async def both() -> list[tuple[bytes, bool]]:
        return await asyncio.gather(exchange(plain.port, data), exchange(plain.ingest_port, data))

    for received, closed in asyncio.run(both()):
        assert len(statuses(received)) == 1, received
        assert statuses(received)[0] in expected, received
        assert b"Healthy." not in received
        if statuses(received)[0] == 400:
            assert closed, "a framing error must close the connection"


def test_the_framing_check_would_see_a_hidden_request(plain):
    """The control: a request pipelined after a well-framed body is answered, so one status
    line above really means the hidden request was never parsed."""
    data = _post(b"Content-Length: 2\r\n" + BEARER_LINE, b"{}") + HIDDEN
    received, _ = asyncio.run(exchange(plain.ingest_port, data))
    assert statuses(received) == [422, 404]  # the ingest port has no /-/healthy
    received, _ = asyncio.run(exchange(plain.port, data))
    assert statuses(received) == [422, 200] and b"Healthy." in received


# --- 8, 9: stalled bodies and stalled headers --------------------------------------------------


def test_a_stalled_body_gets_408_after_the_body_timeout_and_others_are_served(plain):
    """10 of 1000 declared bytes on the ingest port, then nothing: a client that would hold a
    handler for ever is answered 408 after BODY_TIMEOUT, and nobody else waits meanwhile."""

    async def scenario() -> tuple[bytes, float, list[int]]:
        reader, writer = await asyncio.open_connection("127.0.0.1", plain.ingest_port)
        writer.write(
            b"POST /api/v1/requests HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + BEARER_LINE
            + b"Content-Length: 1000\r\n\r\n"
            b'{"account"'
        )
        await writer.drain()
        began = time.monotonic()
        stalled = asyncio.ensure_future(reader.readuntil(b"}"))
        # meanwhile: other clients on both listeners, answered at once
        others = []
        for _ in range(3):
            await asyncio.sleep(1)
            assert not stalled.done()
            async with asyncio.timeout(2):
                main, _ = await exchange(plain.port, _get("/-/healthy"))
                ingest, _ = await exchange(plain.ingest_port, EMPTY_INGEST)
            others += statuses(main) + statuses(ingest)
        async with asyncio.timeout(BODY_TIMEOUT + 3):
            answer = await stalled
        took = time.monotonic() - began
        writer.close()
        return answer, took, others

    answer, took, others = asyncio.run(scenario())
    assert others == [200, 422] * 3
    assert statuses(answer) == [408], answer
    assert b"did not arrive within" in answer
    assert BODY_TIMEOUT - 0.5 <= took <= BODY_TIMEOUT + 3, took


def test_clients_stalling_their_headers_do_not_block_others(plain):
    """Slowloris: 50 connections per listener that never finish their headers. Others are
    served meanwhile, and the stalled ones are neither answered nor dropped early (the header
    timeout, HEADER_TIMEOUT, is not waited for here)."""
    assert HEADER_TIMEOUT > 5

    async def scenario() -> tuple[list[int], list[bool], list[int]]:
        stalled = []
        for port in (plain.port, plain.ingest_port) * 50:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /api/v1/requests HTTP/1.1\r\nHost: x\r\n")
            stalled.append((reader, writer))
        await asyncio.sleep(0.5)
        async with asyncio.timeout(3):
            served = []
            for path in ("/-/healthy", "/metrics", "/"):
                served += statuses((await exchange(plain.port, _get(path)))[0])
            served += statuses((await exchange(plain.ingest_port, EMPTY_INGEST))[0])
        silent = []
        for reader, _ in stalled:
            try:
                await asyncio.wait_for(reader.read(1), 0.01)
                silent.append(False)
            except TimeoutError:
                silent.append(True)
        # one of them finishes its headers: it is still served
        reader, writer = stalled[0]
        writer.write(b"Content-Length: 2\r\nConnection: close\r\n" + BEARER_LINE + b"\r\n{}")
        async with asyncio.timeout(3):
            finished = statuses(await reader.read())
        for _, writer in stalled:
            writer.close()
        return served, silent, finished

    served, silent, finished = asyncio.run(scenario())
    assert served == [200, 200, 200, 422]
    assert all(silent), f"{silent.count(False)} stalled connections were answered or closed"
    assert finished == [422]


# --- past MAX_CONNECTIONS --------------------------------------------------------------------


async def flood(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` idle connections; this process may need more descriptors than its soft limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count + 256, FILES_HARD), FILES_HARD))
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


@pytest.mark.parametrize(
    "nofile",
    [
        pytest.param(min(8192, FILES_HARD), id="enough-files"),
        pytest.param(1024, id="soft-limit-1024"),
    ],
)
def test_past_max_connections_the_flooded_listener_says_503_and_the_other_serves(tmp_path, nofile):
    """A flood from the internet on the ingest port: that port refuses the excess at once with
    503, and Prometheus' port goes on serving."""
    process = launch(tmp_path, "--web.ingest-address=127.0.0.1:0", nofile=nofile)
    try:

        async def scenario() -> tuple[list[int], list[int]]:
            held = await flood(process.ingest_port, MAX_CONNECTIONS + 5)
            try:
                await asyncio.sleep(0.3)
                refused, _ = await exchange(process.ingest_port, _get("/-/healthy"), idle=1)
                served, _ = await exchange(process.port, _get("/-/healthy"), idle=1)
                return statuses(refused), statuses(served)
            finally:
                for _, writer in held:
                    writer.close()

        refused, served = asyncio.run(scenario())
        assert refused == [503], "the flooded port did not answer 503 (no answer: [])"
        assert served == [200], "the other port did not serve (no answer: [])"
        assert "out of system resource" not in process.log()
    finally:
        finish(process)


def test_tls_connections_that_never_handshake_count_towards_max_connections(tmp_path, pki):
    process = launch(tmp_path, f"--web.config.file={pki / 'tls.yml'}", nofile=min(8192, FILES_HARD))
    try:

        async def scenario() -> bytes:
            held = await flood(process.port, MAX_CONNECTIONS + 5)  # TCP only, no ClientHello
            try:
                await asyncio.sleep(0.3)
                async with asyncio.timeout(3):
                    reader, writer = await asyncio.open_connection(
                        "127.0.0.1", process.port, ssl=tls_client(pki)
                    )
                    writer.write(_get("/-/healthy"))
                    answer = await reader.read()
                    writer.close()
                    return answer
            finally:
                for _, writer in held:
                    writer.close()

        assert statuses(asyncio.run(scenario())) == [503]
    finally:
        finish(process)


# --- 10: an invalid web config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "tls_server_config: {cert_file: server.pem, key_file: server.key}\n"
            "tls_server_configs: {}\n",
            "tls_server_configs: unknown key (allowed: basic_auth_users, http_server_config, "
            "tls_server_config)",
        ),
        (
            "tls_server_config: {cert_file: missing.pem, key_file: server.key}\n",
            "tls_server_config.cert_file: cannot read {dir}/missing.pem: No such file or directory",
        ),
    ],
    ids=["unknown-key", "missing-cert-file"],
)
def test_an_invalid_web_config_is_exit_2_with_the_errors_path(tmp_path, pki, text, error):
    for name in ("server.pem", "server.key"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    (tmp_path / "config.yaml").write_text(CONFIG)
    (tmp_path / "web.yml").write_text(text)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            f"--config.file={tmp_path / 'config.yaml'}",
            f"--web.config.file={tmp_path / 'web.yml'}",
            "--web.listen-address=127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path / 'web.yml'}: invalid web config, 1 error(s):" in result.stderr
    assert error.format(dir=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stderr
