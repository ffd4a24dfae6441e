"""Outbound HTTP per account: a private CA, a client certificate, skipping verification, and a
forward proxy, against a simulator that speaks HTTPS over real loopback connections."""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from exporter.config import ClientTLS, ConfigError, parse_config
from exporter.providers import ACCOUNT_MODELS
from exporter.providers.base import Api, Client, PollError, env_proxy
from exporter.ratelimit import RequestBudget
from simulators import KaleyraSimulator
from tests.conftest import run_exporter, value, values, wait_for
from tests.test_webconfig import pki  # noqa: F401 - the fixture: a CA, server and client certs

NUMBER = "+12025550100"


def server_context(pki, *, client_certs: bool = False) -> ssl.SSLContext:  # noqa: F811
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    if client_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki / "ca.pem")
    return context


def account(base_url: str, extra: str = "") -> str:
    return (
        f"kaleyra:\n  - {{account: k, base_url: '{base_url}', numbers: ['{NUMBER}'],"
        f" rate_limit: 100/s{extra}}}\n"
    )


def up(running) -> float | None:
    return value(running.scrape(), "whatsapp_exporter_up", provider="kaleyra")


def reason(running, name: str) -> float | None:
    return value(running.scrape(), "whatsapp_exporter_poll_errors_total", reason=name)


@pytest.mark.parametrize(
    ("client_certs", "tls", "expected_up"),
    [
        (False, "", 0),  # our test CA is nobody's: verification fails
        (False, ", tls: {{ca_file: '{pki}/ca.pem'}}", 1),
        (False, ", tls: {{insecure_skip_verify: true}}", 1),
        (True, ", tls: {{ca_file: '{pki}/ca.pem'}}", 0),  # the server wants a certificate
        (
            True,
            ", tls: {{ca_file: '{pki}/ca.pem', cert_file: '{pki}/client.pem',"
            " key_file: '{pki}/client.key'}}",
            1,
        ),
    ],
)
def test_https_providers_with_a_private_ca_and_client_certificates(
    pki,  # noqa: F811
    client_certs,
    tls,
    expected_up,
):
    context = server_context(pki, client_certs=client_certs)
    with KaleyraSimulator(numbers=[NUMBER], tls=context) as sim:
        base_url = sim.base_url.replace("127.0.0.1", "localhost")  # the certificate's name
        with run_exporter(account(base_url, tls.format(pki=pki))) as running:
            wait_for(lambda: up(running) is not None, 10, "the first poll")
            assert up(running) == expected_up
            if not expected_up:
                assert reason(running, "connect") >= 1


class _Proxy(ThreadingHTTPServer):
    """A forward proxy for plain HTTP targets: what httpx sends through `proxy_url`."""

    daemon_threads = True

    def __init__(self):
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Proxy

    def do_GET(self):
        self.server.seen.append(self.path)
        target = urlsplit(self.path)  # absolute-form, as a proxy receives it
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "proxy-connection"}
        connection.request("GET", target.path or "/", headers=headers)
        answer = connection.getresponse()
        body = answer.read()
        self.send_response(answer.status)
        for name, text in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, text)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_requests_go_through_the_accounts_proxy():
    proxy = _Proxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with KaleyraSimulator(numbers=[NUMBER]) as sim:
            proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
            with run_exporter(account(sim.base_url, f", proxy_url: '{proxy_url}'")) as running:
                wait_for(lambda: up(running) == 1, 10, "a poll through the proxy")
        assert any(path.startswith(f"{sim.base_url}/v1/wamonitor/stats/") for path in proxy.seen)
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_bad_outbound_settings_are_config_errors_with_their_path(tmp_path):
    text = account(
        "https://x",
        f", proxy_url: 'socks5://p:1080', tls: {{ca_file: '{tmp_path}/missing.pem'}}",
    ) + account("https://y", f", tls: {{cert_file: '{tmp_path}/c.pem'}}").replace(
        "kaleyra:\n", ""
    ).replace("account: k", "account: k2")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, ACCOUNT_MODELS)
    errors = caught.value.errors
    assert any(e.startswith("kaleyra[0].proxy_url: 'socks5://p:1080' must be") for e in errors)
    assert any(e.startswith(f"kaleyra[0].tls: ca_file {tmp_path}/missing.pem:") for e in errors)
    assert "kaleyra[1].tls: give cert_file and key_file together" in errors


def test_tls_failures_say_what_tls_said(pki):  # noqa: F811
    """The connect reason's detail is the TLS library's words, not a client library's wrapping."""

    async def poll(sim, tls: ClientTLS) -> PollError:
        base_url = sim.base_url.replace("127.0.0.1", "localhost")
        client = Client(base_url, tls=tls.context())
        try:
            with pytest.raises(PollError) as caught:
                await Api(client, RequestBudget(10, 1.0), lambda body: None).call(
                    "GET", f"/v1/wamonitor/stats/{NUMBER}"
                )
            return caught.value
        finally:
            await client.close()

    with KaleyraSimulator(numbers=[NUMBER], tls=server_context(pki)) as sim:
        unknown = asyncio.run(poll(sim, ClientTLS()))
    assert unknown.reason == "connect"
    assert unknown.detail.startswith("TLS: certificate verify failed: "), unknown.detail


def test_the_environments_proxy_applies_unless_no_proxy_names_the_host(monkeypatch):
    """What the README promises for accounts without proxy_url: HTTPS_PROXY/HTTP_PROXY/NO_PROXY,
    as curl reads them."""
    proxy = _Proxy()
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setenv("NO_PROXY", "localhost")
        with KaleyraSimulator(numbers=[NUMBER]) as sim:
            direct = sim.base_url.replace("127.0.0.1", "localhost")
            text = account(sim.base_url) + account(direct).replace("kaleyra:\n", "").replace(
                "account: k", "account: direct"
            )
            with run_exporter(text) as running:
                wait_for(
                    lambda: (
                        [v for _, v in values(running.scrape(), "whatsapp_exporter_up")]
                        == [1.0, 1.0]
                    ),
                    10,
                    "both accounts polled",
                )
        assert any(path.startswith(f"{sim.base_url}/") for path in proxy.seen)
        assert not any(path.startswith(f"{direct}/") for path in proxy.seen)
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_an_environment_proxy_that_is_not_http_is_a_connect_error_not_a_bypass(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
    assert env_proxy("https://api.example.com") == (
        None,
        "the environment's proxy for https URLs is socks5, not http(s)",
    )
    client = Client("https://api.example.com")
    with pytest.raises(PollError) as caught:
        client.request("GET", "/x")
    assert caught.value.reason == "connect"
