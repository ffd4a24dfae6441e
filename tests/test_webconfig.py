"""The web config file: a table of invalid files with their exact errors, real TLS handshakes
against a loopback server, basic auth with real bcrypt, certificate reload and the watcher."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import shutil
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exporter.webconfig import (
    _CIPHER_SUITES,
    BasicAuth,
    Reload,
    WebConfig,
    WebConfigError,
    WebConfigWatcher,
    load_web_config,
    parse_basic_authorization,
)

# --- a small PKI, made once: two CAs, two server certificates, clients of each CA -------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(name: str, key, issuer_name: str | None = None, issuer_key=None, *, ca: bool = False):
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
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
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem/.key (CN server-1), server2.pem/.key (CN server-2), client.pem/.key
    (signed by ca), other-ca.pem and stranger.pem/.key (signed by other-ca), other.key (matches
    nothing), encrypted.key, not-pem.txt."""
    out = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca, other_ca = _cert("test-ca", ca_key, ca=True), _cert("other-ca", other_ca_key, ca=True)
    files = {"ca.pem": _pem(ca), "other-ca.pem": _pem(other_ca)}
    for name, cn, issuer, issuer_key in (
        ("server", "server-1", "test-ca", ca_key),
        ("server2", "server-2", "test-ca", ca_key),
        ("client", "client-1", "test-ca", ca_key),
        ("stranger", "stranger", "other-ca", other_ca_key),
    ):
        key = _key()
        files[f"{name}.pem"] = _pem(_cert(cn, key, issuer, issuer_key))
        files[f"{name}.key"] = _key_pem(key)
    files["other.key"] = _key_pem(_key())
    files["encrypted.key"] = _key_pem(_key(), b"hunter2")
    files["not-pem.txt"] = b"hello\n"
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


@pytest.fixture
def web(tmp_path, pki) -> Path:
    """A directory holding the PKI, where tests write web.yml with relative paths."""
    for file in pki.iterdir():
        shutil.copy(file, tmp_path / file.name)
    return tmp_path


def write(directory: Path, text: str, name: str = "web.yml") -> Path:
    """Replace the file (a new inode, as editors and config managers do)."""
    path = directory / name
    temporary = directory / f".{name}.tmp"
    temporary.write_text(text)
    os.replace(temporary, path)
    return path


def replace_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


TLS = "tls_server_config: {cert_file: server.pem, key_file: server.key}\n"


@pytest.fixture(scope="module")
def hashed() -> str:
    return bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


# --- invalid files: every error with its path, exactly --------------------------------------

TLS_KEYS = (
    "cert, cert_file, cipher_suites, client_auth_type, client_ca, client_ca_file, "
    "curve_preferences, key, key_file, max_version, min_version, prefer_server_cipher_suites"
)
BCRYPT_HELP = (
    "is not a bcrypt hash ($2a$, $2b$ or $2y$); make one with htpasswd -nBC 10 \"\" | tr -d ':\\n'"
)

INVALID = {
    "unknown-top-level-key": (
        "tls_server_configs: {}\nrate_limit: {interval: 1s, burst: 5}\n",
        [
            "rate_limit: is not supported by this exporter; limit rates in a proxy in front of it",
            "tls_server_configs: unknown key (allowed: basic_auth_users, http_server_config, "
            "tls_server_config)",
        ],
    ),
    "unknown-nested-key": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, min_versoin: TLS13}\n"
        "http_server_config: {http3: true}\n",
        [
            "http_server_config.http3: unknown key (allowed: headers, http2)",
            f"tls_server_config.min_versoin: unknown key (allowed: {TLS_KEYS})",
        ],
    ),
    "cert-without-key": (
        "tls_server_config: {cert_file: server.pem}\n",
        ["tls_server_config.key_file: is required with cert_file"],
    ),
    "key-without-cert": (
        "tls_server_config: {key_file: server.key}\n",
        ["tls_server_config.cert_file: is required with key_file"],
    ),
    "tls-settings-without-a-certificate": (
        "tls_server_config: {min_version: TLS13}\n",
        ["tls_server_config: cert_file and key_file are required to serve TLS"],
    ),
    "unreadable-files": (
        "tls_server_config: {cert_file: missing.pem, key_file: /nonexistent/server.key,\n"
        "  client_auth_type: RequireAndVerifyClientCert, client_ca_file: missing-ca.pem}\n",
        [
            "tls_server_config.cert_file: cannot read {dir}/missing.pem: No such file or directory",
            "tls_server_config.client_ca_file: cannot read {dir}/missing-ca.pem: No such file or "
            "directory",
            "tls_server_config.key_file: cannot read /nonexistent/server.key: No such file or "
            "directory",
        ],
    ),
    "key-not-matching-cert": (
        "tls_server_config: {cert_file: server.pem, key_file: other.key}\n",
        [
            "tls_server_config.key_file: {dir}/other.key does not match the certificate in "
            "{dir}/server.pem"
        ],
    ),
    "not-pem-and-encrypted": (
        "tls_server_config: {cert_file: not-pem.txt, key_file: encrypted.key,\n"
        "  client_auth_type: VerifyClientCertIfGiven, client_ca_file: server.key}\n",
        [
            "tls_server_config.cert_file: {dir}/not-pem.txt holds no PEM certificate",
            "tls_server_config.client_ca_file: {dir}/server.key holds no PEM certificate",
            "tls_server_config.key_file: {dir}/encrypted.key is encrypted; give the key "
            "unencrypted",
        ],
    ),
    "bad-client-auth-type": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, "
        "client_auth_type: RequireCert}\n",
        [
            "tls_server_config.client_auth_type: 'RequireCert' is not one of NoClientCert, "
            "RequestClientCert, RequireAnyClientCert, VerifyClientCertIfGiven, "
            "RequireAndVerifyClientCert"
        ],
    ),
    "verify-without-client-ca": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, "
        "client_auth_type: RequireAndVerifyClientCert}\n",
        [
            "tls_server_config.client_ca_file: is required with client_auth_type "
            "RequireAndVerifyClientCert"
        ],
    ),
    "require-any-without-client-ca": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, "
        "client_auth_type: RequireAnyClientCert}\n",
        [
            "tls_server_config.client_ca_file: is required with client_auth_type "
            "RequireAnyClientCert (Python's ssl verifies every client certificate it asks for)"
        ],
    ),
    "client-ca-without-client-auth": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, "
        "client_ca_file: ca.pem}\n",
        [
            "tls_server_config.client_auth_type: is NoClientCert, so client_ca_file is never "
            "used; say RequireAndVerifyClientCert to require client certificates"
        ],
    ),
    "bad-versions": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, min_version: TLS14,\n"
        "  max_version: 1.3}\n",
        [
            "tls_server_config.max_version: 1.3 is not one of TLS10, TLS11, TLS12, TLS13",
            "tls_server_config.min_version: 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13",
        ],
    ),
    "max-version-below-min-version": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, min_version: TLS13,\n"
        "  max_version: TLS12}\n",
        ["tls_server_config.max_version: TLS12 is below min_version TLS13"],
    ),
    "ciphers-and-curves": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key,\n"
        "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_RSA_WITH_RC4_128_SHA],\n"
        "  curve_preferences: [X25519, CurveP255]}\n",
        [
            "tls_server_config.cipher_suites[1]: 'TLS_RSA_WITH_RC4_128_SHA' is not a cipher "
            "suite Go allows, like TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "tls_server_config.curve_preferences[1]: 'CurveP255' is not one of CurveP256, "
            "CurveP384, CurveP521, X25519",
        ],
    ),
    "only-tls13-ciphers-below-tls13": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, max_version: TLS12,\n"
        "  cipher_suites: [TLS_AES_128_GCM_SHA256]}\n",
        [
            "tls_server_config.cipher_suites: names only TLS 1.3 suites, so max_version TLS12 "
            "leaves no cipher"
        ],
    ),
    "inline-and-file-both": (
        "tls_server_config: {cert_file: server.pem, key_file: server.key, cert: x,\n"
        "  client_allowed_sans: [a]}\n",
        [
            "tls_server_config.cert: give either cert or cert_file, not both",
            "tls_server_config.client_allowed_sans: is not supported by this exporter; give the "
            "clients certificates from a CA of their own and name it in client_ca_file",
        ],
    ),
    "not-a-bcrypt-hash": (
        "basic_auth_users:\n  alice: plaintext-password\n  bob: '$2b$10$short'\n"
        "  'carol:x': '{hash}'\n  dave: 12\n  erin: '{hash}'\n",
        [
            f"basic_auth_users.alice: {BCRYPT_HELP}",
            f"basic_auth_users.bob: {BCRYPT_HELP}",
            "basic_auth_users.carol:x: a user name cannot contain ':' (basic auth splits there)",
            f"basic_auth_users.dave: {BCRYPT_HELP}",
        ],
    ),
    "forbidden-header": (
        "http_server_config:\n  headers:\n    Server: nginx\n    X-Frame-Options: allow-from\n"
        "    X-Content-Type-Options: nosniff\n    Content-Security-Policy: default-src 'self'\n",
        [
            "http_server_config.headers.Server: cannot be set here (allowed: "
            "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, "
            "X-Frame-Options, X-XSS-Protection)",
            "http_server_config.headers.X-Frame-Options: must be deny or sameorigin, not "
            "'allow-from'",
        ],
    ),
    "wrong-types": (
        "tls_server_config: [cert.pem]\nbasic_auth_users: [alice]\nhttp_server_config:\n"
        "  http2: maybe\n  headers: {X-XSS-Protection: [1]}\n",
        [
            "basic_auth_users: must be a mapping of keys",
            "http_server_config.headers.X-XSS-Protection: must be a string (quote it)",
            "http_server_config.http2: must be true or false",
            "tls_server_config: must be a mapping of keys",
        ],
    ),
    "every-section-at-once": (
        "tls_server_config: {cert_file: missing.pem, key_file: server.key, min_version: TLS9}\n"
        "basic_auth_users: {alice: nope}\nhttp_server_config: {headers: {Server: x}}\n",
        [
            f"basic_auth_users.alice: {BCRYPT_HELP}",
            "http_server_config.headers.Server: cannot be set here (allowed: "
            "Content-Security-Policy, Strict-Transport-Security, X-Content-Type-Options, "
            "X-Frame-Options, X-XSS-Protection)",
            "tls_server_config.cert_file: cannot read {dir}/missing.pem: No such file or directory",
            "tls_server_config.min_version: 'TLS9' is not one of TLS10, TLS11, TLS12, TLS13",
        ],
    ),
    "duplicate-key": (
        "basic_auth_users: {}\nbasic_auth_users: {}\n",
        ["{dir}/web.yml:2:1: duplicate key 'basic_auth_users'"],
    ),
    "top-level-list": (
        "- tls_server_config\n",
        ["{dir}/web.yml: the top level must be a mapping of keys, not a list or value"],
    ),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_web_config_reports_every_error_with_its_path(name, web, hashed):
    text, expected = INVALID[name]
    path = write(web, text.replace("{hash}", hashed))
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    assert caught.value.errors == [line.replace("{dir}", str(web)) for line in expected]


def test_a_bad_hash_is_never_shown(web, hashed):
    path = write(web, "basic_auth_users: {alice: plaintext-password, bob: '$2b$10$short'}\n")
    with pytest.raises(WebConfigError) as caught:
        load_web_config(path)
    assert "plaintext-password" not in str(caught.value)
    assert "$2b$10$short" not in str(caught.value)


def test_a_missing_web_config_file_is_one_error(tmp_path):
    with pytest.raises(WebConfigError) as caught:
        load_web_config(tmp_path / "absent.yml")
    assert caught.value.errors == [
        f"{tmp_path}/absent.yml: cannot read the web config file: No such file or directory"
    ]


# --- valid files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}\n",
        "# nothing\n",
        "tls_server_config:\n",
        "tls_server_config: {cert_file: '', key_file: }\n",
        "basic_auth_users: {}\n",
    ],
)
def test_an_empty_web_config_means_plain_http_and_no_auth(web, text):
    config = load_web_config(write(web, text))
    assert config == WebConfig()
    assert config.ssl_context() is None
    assert not BasicAuth(config.basic_auth_users).required
    assert config.notes == ()


def test_a_full_web_config_loads_with_paths_relative_to_its_directory(
    web, hashed, tmp_path_factory, monkeypatch
):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    path = write(
        web,
        f"""
tls_server_config:
  cert_file: server.pem
  key_file: {web}/server.key
  client_auth_type: RequireClientCert   # exporter-toolkit's old name for RequireAnyClientCert
  client_ca_file: ca.pem
  min_version: TLS12
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  curve_preferences: [X25519]
  prefer_server_cipher_suites: false
http_server_config:
  http2: false
  headers:
    Strict-Transport-Security: max-age=31536000
    X-Frame-Options: deny
    X-XSS-Protection: ""
basic_auth_users:
  prometheus: '{hashed}'
""",
    )
    config = load_web_config(os.path.relpath(path))
    assert config.tls is not None
    # joined to the file's directory as given, as exporter-toolkit does: relative to the cwd
    assert config.tls.cert_file == Path(os.path.relpath(web / "server.pem"))
    assert config.tls.key_file == web / "server.key"
    assert config.tls.client_ca_file == Path(os.path.relpath(web / "ca.pem"))
    assert config.tls.client_auth_type == "RequireAnyClientCert"
    assert dict(config.headers) == {
        "Strict-Transport-Security": "max-age=31536000",
        "X-Frame-Options": "deny",
    }
    assert dict(config.basic_auth_users) == {"prometheus": hashed}
    assert hashed not in repr(config)
    assert config.notes == (
        "tls_server_config.curve_preferences: ignored; Python's ssl cannot set a list of "
        "curves, so OpenSSL's defaults are used",
    )
    context = config.ssl_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3
    tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
    assert tls12 == ["ECDHE-ECDSA-AES128-GCM-SHA256"]


def test_inline_pem_is_accepted_as_in_exporter_toolkit(web):
    cert = (web / "server.pem").read_text()
    key = (web / "server.key").read_text()
    ca = (web / "ca.pem").read_text()

    def block(text: str) -> str:
        return "|\n" + "".join(f"    {line}\n" for line in text.splitlines())

    path = write(
        web,
        f"tls_server_config:\n  cert: {block(cert)}  key: {block(key)}"
        f"  client_ca: {block(ca)}  client_auth_type: RequireAndVerifyClientCert\n",
    )
    config = load_web_config(path)
    assert key not in repr(config)
    context = config.ssl_context()
    assert context is not None
    assert len(context.get_ca_certs()) == 1


# --- real TLS handshakes --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_server(context: ssl.SSLContext) -> AsyncIterator[int]:
    """Answers one line per connection on 127.0.0.1; refused handshakes are expected here."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            line = await reader.readline()
            writer.write(b"ok " + line)
            await writer.drain()
        writer.close()

    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def talk(port: int, client: ssl.SSLContext) -> str:
    """The served certificate's CN when the exchange works, 'refused' when TLS says no."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost"),
            5,
        )
        writer.write(b"ping\n")
        answer = await asyncio.wait_for(reader.readline(), 5)
        peer = writer.get_extra_info("peercert")
        writer.close()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return "refused"
    if answer != b"ok ping\n":
        return "refused"
    return dict(pair[0] for pair in peer["subject"])["commonName"]


def client_context(pki: Path, cert: str | None = None, **versions) -> ssl.SSLContext:
    client = ssl.create_default_context(cafile=pki / "ca.pem")
    if cert:
        client.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    for name, version in versions.items():
        setattr(client, name, version)
    return client


def tls_config(web: Path, extra: str = "") -> WebConfig:
    text = "tls_server_config: {cert_file: server.pem, key_file: server.key" + extra + "}\n"
    return load_web_config(write(web, text))


def handshakes(context: ssl.SSLContext, *clients: ssl.SSLContext) -> list[str]:
    async def scenario() -> list[str]:
        async with tls_server(context) as port:
            return [await talk(port, client) for client in clients]

    return asyncio.run(scenario())


def server_context(config: WebConfig) -> ssl.SSLContext:
    context = config.ssl_context()
    assert context is not None
    return context


def test_tls_serves_the_certificate_to_tls12_and_tls13_clients(web, pki):
    context = server_context(tls_config(web))
    tls12 = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert handshakes(context, client_context(pki), tls12) == ["server-1", "server-1"]


def test_min_version_tls13_refuses_a_tls12_only_client(web, pki):
    context = server_context(tls_config(web, ", min_version: TLS13"))
    tls12 = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert handshakes(context, tls12, client_context(pki)) == ["refused", "server-1"]


def test_max_version_tls12_refuses_a_tls13_only_client(web, pki):
    context = server_context(tls_config(web, ", max_version: TLS12"))
    tls13 = client_context(pki, minimum_version=ssl.TLSVersion.TLSv1_3)
    assert handshakes(context, tls13, client_context(pki)) == ["refused", "server-1"]


def test_require_and_verify_client_cert(web, pki):
    extra = ", client_auth_type: RequireAndVerifyClientCert, client_ca_file: ca.pem"
    context = server_context(tls_config(web, extra))
    assert handshakes(
        context,
        client_context(pki),
        client_context(pki, "client"),
        client_context(pki, "stranger"),
        client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2),
        client_context(pki, "client", maximum_version=ssl.TLSVersion.TLSv1_2),
    ) == ["refused", "server-1", "refused", "refused", "server-1"]


def test_verify_client_cert_if_given(web, pki):
    extra = ", client_auth_type: VerifyClientCertIfGiven, client_ca_file: ca.pem"
    context = server_context(tls_config(web, extra))
    assert handshakes(
        context,
        client_context(pki),
        client_context(pki, "client"),
        client_context(pki, "stranger"),
    ) == ["server-1", "server-1", "refused"]


def test_request_client_cert_lets_any_client_in_as_go_does(web, pki):
    extra = ", client_auth_type: RequestClientCert, client_ca_file: ca.pem"
    context = server_context(tls_config(web, extra))
    assert handshakes(context, client_context(pki), client_context(pki, "stranger")) == [
        "server-1",
        "server-1",
    ]


def test_require_any_client_cert_verifies_against_the_ca_here(web, pki):
    extra = ", client_auth_type: RequireAnyClientCert, client_ca_file: ca.pem"
    context = server_context(tls_config(web, extra))
    assert handshakes(
        context, client_context(pki), client_context(pki, "client"), client_context(pki, "stranger")
    ) == ["refused", "server-1", "refused"]


def test_cipher_suites_are_honoured_for_tls12(web, pki):
    context = server_context(
        tls_config(web, ", cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]")
    )

    def tls12_client(cipher: str) -> ssl.SSLContext:
        client = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
        client.set_ciphers(cipher)
        return client

    assert handshakes(
        context,
        tls12_client("ECDHE-ECDSA-AES128-GCM-SHA256"),
        tls12_client("ECDHE-ECDSA-AES256-GCM-SHA384"),
        client_context(pki),
    ) == ["refused", "server-1", "server-1"]


def test_a_list_of_only_tls13_suites_leaves_tls12_out_as_in_go(web, pki):
    context = server_context(tls_config(web, ", cipher_suites: [TLS_AES_256_GCM_SHA384]"))
    tls12 = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert handshakes(context, tls12, client_context(pki)) == ["refused", "server-1"]


def test_every_go_cipher_suite_name_maps_to_one_openssl_knows(web):
    for go_name, openssl_name in _CIPHER_SUITES.items():
        config = tls_config(web, f", cipher_suites: [{go_name}]")
        context = server_context(config)
        names = [c["name"] for c in context.get_ciphers() if c["protocol"] != "TLSv1.3"]
        if openssl_name is None:
            assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        else:
            assert names == [openssl_name], go_name


# --- certificate reload ---------------------------------------------------------------------


def test_a_renewed_certificate_is_served_to_new_connections(web, pki):
    watcher = WebConfigWatcher(write(web, TLS))
    context = server_context(watcher.config)
    client = client_context(pki)

    async def scenario() -> list[str]:
        async with tls_server(context) as port:
            seen = [await talk(port, client)]
            # a renewal that has written the certificate but not yet the key: keep serving
            replace_bytes(web / "server.pem", (pki / "server2.pem").read_bytes())
            broken = watcher.maybe_reload(0.0)
            assert broken is not None and broken.config is None
            assert broken.errors == (
                f"tls_server_config.key_file: {web}/server.key does not match the certificate "
                f"in {web}/server.pem",
            )
            seen.append(await talk(port, client))
            replace_bytes(web / "server.key", (pki / "server2.key").read_bytes())
            renewed = watcher.maybe_reload(1.0)
            assert renewed is not None and renewed.config is not None
            assert renewed.config.update_ssl_context(context) == ()
            seen.append(await talk(port, client))
            return seen

    assert asyncio.run(scenario()) == ["server-1", "server-1", "server-2"]


def test_update_ssl_context_applies_versions_and_client_auth_in_place(web, pki):
    context = server_context(tls_config(web))
    tightened = tls_config(
        web,
        ", min_version: TLS13, client_auth_type: RequireAndVerifyClientCert, "
        "client_ca_file: ca.pem",
    )
    assert tightened.update_ssl_context(context) == ()
    assert handshakes(
        context,
        client_context(pki),
        client_context(pki, "client"),
        client_context(pki, "client", maximum_version=ssl.TLSVersion.TLSv1_2),
    ) == ["refused", "server-1", "refused"]


def test_update_ssl_context_says_what_takes_a_restart(web):
    verified = ", client_auth_type: RequireAndVerifyClientCert, client_ca_file: "
    context = server_context(tls_config(web, verified + "ca.pem"))
    assert tls_config(web, verified + "other-ca.pem").update_ssl_context(context) == (
        "tls_server_config.client_ca_file: a CA was removed; it stays trusted until a restart",
    )
    plain = load_web_config(write(web, "{}"))
    assert plain.update_ssl_context(context) == (
        "tls_server_config: TLS was switched off; it stays on until a restart",
    )
    assert tls_config(web).update_ssl_context(None) == (
        "tls_server_config: TLS was switched on; it takes a restart",
    )
    assert plain.update_ssl_context(None) == ()


# --- basic auth -----------------------------------------------------------------------------


def basic(user: str | bytes, password: str | bytes) -> str:
    raw = (user.encode() if isinstance(user, str) else user) + b":"
    raw += password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(raw).decode()


@pytest.fixture
def bcrypt_calls(monkeypatch) -> list[tuple[bytes, str]]:
    """Each real bcrypt check made: (hash checked against, thread it ran in)."""
    calls: list[tuple[bytes, str]] = []
    real = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        calls.append((hashed, threading.current_thread().name))
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    return calls


def checks(auth: BasicAuth, *headers: str | None) -> list[bool]:
    async def scenario() -> list[bool]:
        return [await auth.check(header) for header in headers]

    return asyncio.run(scenario())


def test_basic_auth_right_wrong_missing_and_unknown_user(hashed, bcrypt_calls):
    auth = BasicAuth({"prometheus": hashed})
    assert auth.required
    assert checks(
        auth,
        basic("prometheus", "s3cret"),
        basic("prometheus", "wrong"),
        None,
        basic("nobody", "s3cret"),
    ) == [True, False, False, False]
    # the unknown user paid a bcrypt too, at the configured cost, and all of it off the loop
    assert len(bcrypt_calls) == 3
    assert bcrypt_calls[2][0].startswith(b"$2b$04$")
    assert all(thread != threading.main_thread().name for _, thread in bcrypt_calls)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Basic",
        "Basic ",
        "Bearer abc",
        "Basic !!!not-base64!!!",
        "Basic cHJvbWV0aGV1cw",  # "prometheus", base64 without its padding
        "Basic " + base64.b64encode(b"prometheus-no-colon").decode(),
        basic(b"\xffprometheus", "s3cret"),
        basic("prometheus", b"s3cret\xff"),
        "Basic ÿÿÿÿ",
    ],
)
def test_a_malformed_header_is_not_authenticated_and_costs_nothing(hashed, bcrypt_calls, header):
    assert checks(BasicAuth({"prometheus": hashed}), header) == [False]
    assert bcrypt_calls == []


def test_parse_basic_authorization():
    assert parse_basic_authorization(basic("a", "b:c")) == ("a", b"b:c")
    assert parse_basic_authorization("basic " + base64.b64encode(b":").decode()) == ("", b"")
    assert parse_basic_authorization("Digest x") is None


def test_a_success_is_cached_and_a_failure_is_not(hashed, bcrypt_calls):
    auth = BasicAuth({"prometheus": hashed})
    right, wrong = basic("prometheus", "s3cret"), basic("prometheus", "wrong")
    assert checks(auth, right, right, right) == [True, True, True]
    assert len(bcrypt_calls) == 1
    assert checks(auth, wrong, wrong, right) == [False, False, True]
    assert len(bcrypt_calls) == 3


def test_concurrent_checks_pay_bcrypt_once(hashed, bcrypt_calls):
    auth = BasicAuth({"prometheus": hashed})

    async def scenario() -> list[bool]:
        return await asyncio.gather(*(auth.check(basic("prometheus", "s3cret")) for _ in range(8)))

    assert asyncio.run(scenario()) == [True] * 8
    assert len(bcrypt_calls) == 1


def test_the_cache_is_bounded_and_forgets_the_least_recent(bcrypt_calls):
    users = {name: bcrypt.hashpw(name.encode(), bcrypt.gensalt(4)).decode() for name in "abc"}
    auth = BasicAuth(users, cache_size=2)
    assert checks(auth, *(basic(u, u) for u in "abca")) == [True] * 4
    # a was evicted by c, so its second check paid again; b is now the oldest
    assert len(bcrypt_calls) == 4
    assert checks(auth, basic("c", "c"), basic("a", "a"), basic("b", "b")) == [True] * 3
    assert len(bcrypt_calls) == 5


def test_each_basic_auth_has_its_own_cache(hashed, bcrypt_calls):
    right = basic("prometheus", "s3cret")
    assert checks(BasicAuth({"prometheus": hashed}), right) == [True]
    assert checks(BasicAuth({"prometheus": hashed}), right) == [True]
    assert len(bcrypt_calls) == 2


def test_a_changed_hash_is_not_served_from_the_cache(bcrypt_calls):
    old = bcrypt.hashpw(b"old", bcrypt.gensalt(4)).decode()
    auth = BasicAuth({"prometheus": old})
    assert checks(auth, basic("prometheus", "old")) == [True]
    new_auth = BasicAuth({"prometheus": bcrypt.hashpw(b"new", bcrypt.gensalt(4)).decode()})
    assert checks(new_auth, basic("prometheus", "old"), basic("prometheus", "new")) == [False, True]


def test_2a_and_2y_hashes_and_long_passwords_work_as_in_go(bcrypt_calls):
    hashed = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()
    for prefix in ("$2a$", "$2y$", "$2b$"):
        auth = BasicAuth({"u": prefix + hashed[4:]})
        # bcrypt reads 72 bytes; Go ignores the rest rather than refusing the password
        assert checks(auth, basic("u", "x" * 72), basic("u", "x" * 80), basic("u", "x" * 71)) == [
            True,
            True,
            False,
        ]


def test_a_hash_with_unused_salt_bits_set_works_as_in_go(web):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    loose = hashed[:28] + alphabet[alphabet.index(hashed[28]) | 0x5] + hashed[29:]
    config = load_web_config(write(web, f"basic_auth_users: {{u: '{loose}'}}\n"))
    assert checks(BasicAuth(config.basic_auth_users), basic("u", "pw")) == [True]


def test_no_users_means_no_auth(bcrypt_calls):
    auth = BasicAuth({})
    assert not auth.required
    assert checks(auth, None, "garbage") == [True, True]
    assert bcrypt_calls == []


def test_a_default_cost_hash_takes_bcrypt_time_once_only():
    """The point of the cache, measured: cost 10 is tens of milliseconds, a cached check is not."""
    auth = BasicAuth({"prometheus": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode()})
    header = basic("prometheus", "s3cret")

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await auth.check(header)
        middle = loop.time()
        for _ in range(100):
            assert await auth.check(header)
        return middle - start, (loop.time() - middle) / 100

    first, cached = asyncio.run(scenario())
    assert first > 0.01
    assert cached < first / 20


# --- the watcher ----------------------------------------------------------------------------


def test_the_watcher_looks_at_most_once_per_interval(web, hashed):
    path = write(web, "{}")
    watcher = WebConfigWatcher(path, interval=1.0)
    assert watcher.maybe_reload(100.0) is None  # the first look finds the file as loaded
    write(web, f"basic_auth_users: {{prometheus: '{hashed}'}}\n")
    assert watcher.maybe_reload(100.5) is None  # too soon to look
    reload = watcher.maybe_reload(101.0)
    assert reload == Reload(watcher.config)
    assert dict(watcher.config.basic_auth_users) == {"prometheus": hashed}
    assert watcher.maybe_reload(102.0) is None  # nothing changed since


def test_an_invalid_change_keeps_the_old_config_until_a_valid_one(web, hashed):
    path = write(web, TLS + f"basic_auth_users: {{prometheus: '{hashed}'}}\n")
    watcher = WebConfigWatcher(path)
    before = watcher.config
    write(web, "tls_server_config: {cert_file: server.pem}\nbasic_auth_users: {prometheus: x}\n")
    reload = watcher.maybe_reload(1.0)
    assert reload is not None and reload.config is None
    assert reload.errors == (
        f"basic_auth_users.prometheus: {BCRYPT_HELP}",
        "tls_server_config.key_file: is required with cert_file",
    )
    assert watcher.config is before  # TLS and auth stay on
    assert watcher.maybe_reload(2.0) is None  # the same broken file is reported once
    write(web, TLS.replace("}", ", min_version: TLS13}"))
    reload = watcher.maybe_reload(3.0)
    assert reload is not None and reload.config is watcher.config
    assert watcher.config.tls is not None and watcher.config.tls.min_version == "TLS13"
    assert watcher.config.basic_auth_users == {}


def test_the_watcher_notices_a_file_the_config_names_appearing(web):
    path = write(web, TLS)
    watcher = WebConfigWatcher(path)
    write(web, "tls_server_config: {cert_file: later.pem, key_file: server.key}\n")
    reload = watcher.maybe_reload(1.0)
    assert reload is not None and reload.errors == (
        f"tls_server_config.cert_file: cannot read {web}/later.pem: No such file or directory",
    )
    assert watcher.maybe_reload(2.0) is None
    shutil.copy(web / "server.pem", web / "later.pem")
    reload = watcher.maybe_reload(3.0)
    assert reload is not None and reload.config is not None
    assert reload.config.tls is not None and reload.config.tls.cert_file == web / "later.pem"


def test_force_reloads_now(web):
    watcher = WebConfigWatcher(write(web, "{}"))
    assert watcher.maybe_reload(0.0) is None
    reload = watcher.maybe_reload(0.1, force=True)
    assert reload is not None and reload.config == WebConfig()


def test_the_watcher_refuses_to_start_on_an_invalid_file(web):
    with pytest.raises(WebConfigError) as caught:
        WebConfigWatcher(write(web, "basic_auth_users: {a: b}\n"))
    assert caught.value.errors == [f"basic_auth_users.a: {BCRYPT_HELP}"]
