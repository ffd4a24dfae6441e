"""The web config file (`--web.config.file`): TLS, basic auth and response headers.

The format is Prometheus exporter-toolkit's, so the file written for the Go exporters beside this
one works here unchanged. Where Python's `ssl` cannot do what Go does, this module either does
the nearest safe thing and says so below, or refuses the key with a reason; it never ignores a
key that would leave the operator believing they are more protected than they are.

- Relative paths are relative to the web config file's directory, as exporter-toolkit joins them.
- Files are read once, at load: a missing file, a key that does not match its certificate or a
  CA file with no certificate is an error with its path. The bytes that were checked are the
  bytes served, even if a renewal rewrites the files a moment later.
- `cipher_suites` is honoured: Go's names map to OpenSSL's, for TLS 1.0-1.2 (TLS 1.3 suites are
  not configurable in Go either; a list of only TLS 1.3 suites leaves TLS 1.2 no cipher in Go,
  and here raises the minimum to TLS 1.3, the same outcome).
- `curve_preferences` is checked and then ignored with a note in `WebConfig.notes`: Python 3.11
  cannot set a list of curves, so OpenSSL's defaults are used.
- `prefer_server_cipher_suites` is accepted and ignored: Go ignores it too since Go 1.18.
- `http2` is accepted and ignored: aiohttp serves HTTP/1.1 only.
- `client_auth_type`: Python's `ssl` verifies every client certificate it asks for, so:
  `RequestClientCert` asks for none (Go asks and never checks it, and nothing here reads it: the
  outcome for every client is the same, whereas asking would refuse certificates Go accepts);
  `RequireAnyClientCert` needs `client_ca_file` and is verified against it, stricter than Go;
  `VerifyClientCertIfGiven` and `RequireAndVerifyClientCert` are exactly Go's.
- Inline PEM (`cert`, `key`, `client_ca`) works as in exporter-toolkit.
- Refused, each with a reason: `rate_limit` and `client_allowed_sans`.
- Stricter than Go: TLS settings without a certificate are an error (Go serves plain HTTP).
- Reloading changes the running `SSLContext` in place (`WebConfig.update_ssl_context`). OpenSSL
  can add a client CA but not remove one, and keeps one certificate per key type: removing a CA,
  switching TLS on or off, or changing the key type (RSA to ECDSA) takes a restart; the first two
  are reported as notes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import re
import ssl
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any

import bcrypt
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    ValidationError,
    ValidationInfo,
)

from exporter.config import ConfigError, _describe, _natural, _UniqueKeyLoader, format_path

log = logging.getLogger(__name__)

Loc = tuple[Any, ...]
Stamp = tuple[int, int, int, int]  # mtime_ns, size, inode, device: what says a file changed


class WebConfigError(ConfigError):
    """Every problem found in one web config file, each prefixed with its path in the file."""


# --- the file's shape -------------------------------------------------------------------------

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,  # see the module docstring
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_CLIENT_AUTH_ALIASES = {"": "NoClientCert", "RequireClientCert": "RequireAnyClientCert"}
_NEEDS_CA = ("RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

# Go's names (crypto/tls CipherSuites()) -> OpenSSL's; None for TLS 1.3 suites, always on.
_CIPHER_SUITES: dict[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
_CURVES = ("CurveP256", "CurveP384", "CurveP521", "X25519")

# exporter-toolkit allows only these, and only these values where it lists some
_HEADERS: dict[str, tuple[str, ...]] = {
    "Content-Security-Policy": (),
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
}

_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")

_NOT_SUPPORTED = {
    ("rate_limit",): "is not supported by this exporter; limit rates in a proxy in front of it",
    ("tls_server_config", "client_allowed_sans"): "is not supported by this exporter; give "
    "the clients certificates from a CA of their own and name it in client_ca_file",
}


def _one_of(choices: Mapping[str, Any], aliases: Mapping[str, str] | None = None):
    def check(value: Any) -> str:
        value = (aliases or {}).get(value, value) if isinstance(value, str) else value
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value

    return BeforeValidator(check)


def _file_path(value: Any, info: ValidationInfo) -> Any:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("must be the path of a file")
    return (info.context or {}).get("base", Path()) / value


def _cipher_suite(value: Any) -> Any:
    if value not in _CIPHER_SUITES:
        raise ValueError(
            f"{value!r} is not a cipher suite Go allows, like TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        )
    return value


def _bcrypt_hash(value: Any) -> Any:
    # never show the value: a hash in a log is an offline guessing target
    if not isinstance(value, str) or not _BCRYPT.match(value):
        raise ValueError(
            "is not a bcrypt hash ($2a$, $2b$ or $2y$); make one with "
            "htpasswd -nBC 10 \"\" | tr -d ':\\n'"
        )
    # the salt's 22nd character carries 4 unused bits: Go ignores them, pyca's bcrypt refuses
    # a hash where they are set, so clear them
    last = _BCRYPT_ALPHABET.index(value[28])
    return value[:28] + _BCRYPT_ALPHABET[last & ~0xF] + value[29:]


def _user_name(value: Any) -> Any:
    if isinstance(value, str) and ":" in value:
        raise ValueError("a user name cannot contain ':' (basic auth splits there)")
    return value


FilePath = Annotated[Path | None, BeforeValidator(_file_path)]
TLSVersionName = Annotated[str, _one_of(_TLS_VERSIONS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSServerConfig(_Strict):
    """`tls_server_config`, paths resolved against the web config file's directory."""

    cert_file: FilePath = None
    key_file: FilePath = None
    cert: str | None = None
    key: SecretStr | None = None
    client_ca: str | None = None
    client_auth_type: Annotated[str, _one_of(_CLIENT_AUTH, _CLIENT_AUTH_ALIASES)] = "NoClientCert"
    client_ca_file: FilePath = None
    min_version: TLSVersionName = "TLS12"
    max_version: TLSVersionName = "TLS13"
    cipher_suites: tuple[Annotated[str, BeforeValidator(_cipher_suite)], ...] = ()
    curve_preferences: tuple[Annotated[str, _one_of(dict.fromkeys(_CURVES))], ...] = ()
    prefer_server_cipher_suites: bool = True  # ignored, as by Go since 1.18


class HTTPServerConfig(_Strict):
    http2: bool = True  # ignored: aiohttp serves HTTP/1.1
    headers: dict[str, str | None] | None = None


class _WebConfigFile(_Strict):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig | None = None
    basic_auth_users: (
        dict[
            Annotated[str, BeforeValidator(_user_name)],
            Annotated[str, BeforeValidator(_bcrypt_hash)],
        ]
        | None
    ) = None


# --- the loaded config ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pem:
    """The certificate, key and client CAs as read at load: what was checked is what is served."""

    cert: bytes
    key: bytes = field(repr=False)
    client_ca: str | None = None


@dataclass(frozen=True)
class WebConfig:
    """A loaded web config; `tls` is None when the exporter serves plain HTTP."""

    tls: TLSServerConfig | None = None
    basic_auth_users: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    notes: tuple[str, ...] = ()  # what is accepted but not done; worth a log line at load
    _pem: _Pem | None = field(default=None, repr=False, compare=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server context for `socket`/aiohttp, or None for plain HTTP."""
        if self.tls is None or self._pem is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _apply(context, self.tls, self._pem)
        return context

    def update_ssl_context(self, context: ssl.SSLContext | None) -> tuple[str, ...]:
        """Put this config's certificate, versions, ciphers and client CAs into the context the
        server already listens with, so new connections get them without a restart. Returns
        what could not change in place, for the caller to log."""
        if context is None:
            if self.tls is None:
                return ()
            return ("tls_server_config: TLS was switched on; it takes a restart",)
        if self.tls is None or self._pem is None:
            return ("tls_server_config: TLS was switched off; it stays on until a restart",)
        trusted = set(context.get_ca_certs(binary_form=True))
        _apply(context, self.tls, self._pem)
        wanted = {ssl.PEM_cert_to_DER_cert(pem) for pem in _pem_blocks(self._pem.client_ca or "")}
        if context.verify_mode != ssl.CERT_NONE and trusted - wanted:
            return (
                "tls_server_config.client_ca_file: a CA was removed; it stays trusted until "
                "a restart",
            )
        return ()


def _pem_blocks(text: str) -> list[str]:
    return re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)


@functools.cache
def _python_ciphers() -> str:
    """Python's own choice of TLS 1.2 ciphers, to go back to when cipher_suites is dropped."""
    fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return ":".join(c["name"] for c in fresh.get_ciphers() if c["protocol"] != "TLSv1.3")


def _apply(context: ssl.SSLContext, tls: TLSServerConfig, pem: _Pem) -> None:
    with _pem_paths(pem.cert, pem.key) as (cert_path, key_path):
        context.load_cert_chain(cert_path, key_path, password=b"")
    minimum, maximum = _TLS_VERSIONS[tls.min_version], _TLS_VERSIONS[tls.max_version]
    ciphers = [_CIPHER_SUITES[name] for name in tls.cipher_suites]
    up_to_tls12 = [name for name in ciphers if name]
    if ciphers and not up_to_tls12:
        minimum = max(minimum, ssl.TLSVersion.TLSv1_3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS10/TLS11: asked for by name
        context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
        context.minimum_version = minimum
        context.maximum_version = maximum
    context.set_ciphers(":".join(up_to_tls12) if up_to_tls12 else _python_ciphers())
    context.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
    if pem.client_ca and context.verify_mode != ssl.CERT_NONE:
        context.load_verify_locations(cadata=pem.client_ca)


@contextlib.contextmanager
def _pem_paths(*blobs: bytes) -> Iterator[list[str]]:
    """OpenSSL loads a certificate chain only from a path: hand it the bytes through memory files
    (a private temporary directory where there are none), never by re-reading the originals."""
    with contextlib.ExitStack() as stack:
        paths = []
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            for blob in blobs:
                fd = os.memfd_create("web-config-pem", os.MFD_CLOEXEC)
                stack.callback(os.close, fd)
                with open(fd, "wb", closefd=False) as out:
                    out.write(blob)
                paths.append(f"/proc/self/fd/{fd}")
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            for index, blob in enumerate(blobs):
                path = directory / f"{index}.pem"
                path.write_bytes(blob)
                paths.append(str(path))
        yield paths


# --- loading ----------------------------------------------------------------------------------

_MAX_FILE = 1 << 20  # a PEM file or web config larger than this is a wrong path


class _Files:
    """Reads files and remembers what each was when read, so a watcher compares against exactly
    the versions that were loaded, not ones stat'ed a moment later."""

    def __init__(self) -> None:
        self.stamps: dict[Path, Stamp | None] = {}

    def read(self, path: Path) -> bytes:
        self.stamps[path] = None
        with open(path, "rb") as handle:
            self.stamps[path] = _stamp(os.fstat(handle.fileno()))
            data = handle.read(_MAX_FILE + 1)
        if len(data) > _MAX_FILE:
            raise OSError(0, f"larger than {_MAX_FILE >> 20}MiB")
        return data


def _stamp(stat: os.stat_result) -> Stamp:
    return stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev


def _stamp_of(path: Path) -> Stamp | None:
    try:
        return _stamp(os.stat(path))
    except OSError:
        return None


@dataclass(frozen=True)
class _Attempt:
    config: WebConfig | None
    errors: tuple[str, ...]
    stamps: Mapping[Path, Stamp | None]


def load_web_config(path: str | Path) -> WebConfig:
    """The web config at `path`, or WebConfigError listing every problem with its path."""
    attempt = _load(Path(path))
    if attempt.config is None:
        raise WebConfigError(list(attempt.errors))
    return attempt.config


def _load(path: Path) -> _Attempt:
    files = _Files()
    try:
        text = files.read(path).decode("utf-8")
    except OSError as exc:
        problem = f"{path}: cannot read the web config file: {exc.strerror or exc}"
        return _Attempt(None, (problem,), files.stamps)
    except UnicodeDecodeError:
        return _Attempt(None, (f"{path}: the web config file is not UTF-8 text",), files.stamps)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        return _Attempt(None, (f"{where}: {exc.problem or exc.context}",), files.stamps)
    except yaml.YAMLError as exc:
        return _Attempt(None, (f"{path}: not valid YAML: {exc}",), files.stamps)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problem = f"{path}: the top level must be a mapping of keys, not a list or value"
        return _Attempt(None, (problem,), files.stamps)

    found: list[tuple[Loc, str]] = []
    parsed = None
    try:
        parsed = _WebConfigFile.model_validate(data, context={"base": path.parent})
    except ValidationError as exc:
        found += [_explain(error) for error in exc.errors(include_url=False)]
    pem = None
    tls = data.get("tls_server_config")
    if isinstance(tls, dict) and tls:
        problems, pem = _check_tls(tls, path.parent, files)
        found += problems
    http = data.get("http_server_config")
    headers = http.get("headers") if isinstance(http, dict) else None
    if isinstance(headers, dict):
        found += _header_problems(headers)
    errors = sorted(dict.fromkeys(f"{format_path(loc)}: {msg}" for loc, msg in found), key=_natural)
    if errors or parsed is None:
        return _Attempt(None, tuple(errors), files.stamps)
    return _Attempt(_build(parsed, pem), (), files.stamps)


def _explain(error: Mapping[str, Any]) -> tuple[Loc, str]:
    loc, message = _describe(error, _WebConfigFile)
    if error["type"] == "extra_forbidden" and loc in _NOT_SUPPORTED:
        message = _NOT_SUPPORTED[loc]
    elif error["type"] == "bool_parsing":
        message = "must be true or false"
    return loc, message


def _build(parsed: _WebConfigFile, pem: _Pem | None) -> WebConfig:
    tls = parsed.tls_server_config if pem is not None else None
    notes = []
    if tls is not None and tls.curve_preferences:
        notes.append(
            "tls_server_config.curve_preferences: ignored; Python's ssl cannot set a list of "
            "curves, so OpenSSL's defaults are used"
        )
    if tls is not None and tls.min_version in ("TLS10", "TLS11"):
        notes.append(
            f"tls_server_config.min_version: {tls.min_version} works only where OpenSSL allows "
            "it; OpenSSL 3 refuses TLS 1.0 and 1.1 at its default security level"
        )
    http = parsed.http_server_config
    headers = {k: v for k, v in ((http and http.headers) or {}).items() if v}
    return WebConfig(
        tls=tls,
        basic_auth_users=MappingProxyType(dict(parsed.basic_auth_users or {})),
        headers=MappingProxyType(headers),
        notes=tuple(notes),
        _pem=pem,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _check_tls(
    raw: Mapping[str, Any], base: Path, files: _Files
) -> tuple[list[tuple[Loc, str]], _Pem | None]:
    """What pydantic cannot see field by field: pairs, the CA each client_auth_type needs, and
    the files themselves. Runs on the raw mapping, so it reports alongside field errors."""
    here = "tls_server_config"
    found: list[tuple[Loc, str]] = []
    material: dict[str, tuple[Loc, str, bytes] | None] = {}
    for name in ("cert", "key", "client_ca"):
        inline, path = _text(raw.get(name)), _text(raw.get(f"{name}_file"))
        material[name] = None
        if inline and path:
            found.append(((here, name), f"give either {name} or {name}_file, not both"))
        elif path:
            file = base / path
            try:
                material[name] = ((here, f"{name}_file"), str(file), files.read(file))
            except OSError as exc:
                found.append(((here, f"{name}_file"), f"cannot read {file}: {exc.strerror or exc}"))
        elif inline:
            material[name] = ((here, name), f"the inline {name}", inline.encode())
    given = {
        name: next((k for k in (f"{name}_file", name) if _text(raw.get(k))), None)
        for name in material
    }
    if given["cert"] and not given["key"]:
        found.append(((here, "key_file"), f"is required with {given['cert']}"))
    if given["key"] and not given["cert"]:
        found.append(((here, "cert_file"), f"is required with {given['key']}"))
    if not given["cert"] and not given["key"] and any(v not in (None, "") for v in raw.values()):
        found.append(((here,), "cert_file and key_file are required to serve TLS"))

    auth = raw.get("client_auth_type", "")
    auth = _CLIENT_AUTH_ALIASES.get(auth, auth) if isinstance(auth, str) else auth
    if auth in _NEEDS_CA and not given["client_ca"]:
        why = " (Python's ssl verifies every client certificate it asks for)"
        found.append(
            (
                (here, "client_ca_file"),
                f"is required with client_auth_type {auth}"
                + (why if auth == "RequireAnyClientCert" else ""),
            )
        )
    if auth == "NoClientCert" and given["client_ca"]:
        found.append(
            (
                (here, "client_auth_type"),
                "is NoClientCert, so client_ca_file is never used; "
                "say RequireAndVerifyClientCert to require client certificates",
            )
        )
    found += _version_problems(raw)

    found += _check_pem(material)
    cert, key, ca = (material[name] for name in ("cert", "key", "client_ca"))
    if found or cert is None or key is None:
        return found, None
    blocks = _pem_blocks(ca[2].decode("ascii", "replace")) if ca else []
    return found, _Pem(cert[2], key[2], "\n".join(blocks) or None)


def _version_problems(raw: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    low, high = raw.get("min_version", "TLS12"), raw.get("max_version", "TLS13")
    if low in _TLS_VERSIONS and high in _TLS_VERSIONS and _TLS_VERSIONS[high] < _TLS_VERSIONS[low]:
        found.append((("tls_server_config", "max_version"), f"{high} is below min_version {low}"))
    suites = raw.get("cipher_suites")
    if (
        isinstance(suites, list)
        and suites
        and all(name in _CIPHER_SUITES and _CIPHER_SUITES[name] is None for name in suites)
        and high in _TLS_VERSIONS
        and _TLS_VERSIONS[high] < ssl.TLSVersion.TLSv1_3
    ):
        found.append(
            (
                ("tls_server_config", "cipher_suites"),
                f"names only TLS 1.3 suites, so max_version {high} leaves no cipher",
            )
        )
    return found


def _check_pem(material: Mapping[str, tuple[Loc, str, bytes] | None]) -> list[tuple[Loc, str]]:
    """Each PEM on its own, then the key against the certificate, as OpenSSL will load them."""
    found: list[tuple[Loc, str]] = []
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for name in ("cert", "client_ca"):
        item = material[name]
        if item is None:
            continue
        loc, label, data = item
        blocks = _pem_blocks(data.decode("ascii", "replace"))
        if not blocks:
            found.append((loc, f"{label} holds no PEM certificate"))
            continue
        try:
            probe.load_verify_locations(cadata="\n".join(blocks))
        except ssl.SSLError as exc:
            found.append((loc, f"{label} holds a certificate OpenSSL cannot read: {_reason(exc)}"))
    key = material["key"]
    if key is not None:
        loc, label, data = key
        if b"ENCRYPTED" in data:
            found.append((loc, f"{label} is encrypted; give the key unencrypted"))
        elif not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data):
            found.append((loc, f"{label} holds no PEM private key"))
    cert = material["cert"]
    if found or cert is None or key is None:
        return found
    try:
        with _pem_paths(cert[2], key[2]) as (cert_path, key_path):
            probe.load_cert_chain(cert_path, key_path, password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            found.append((key[0], f"{key[1]} does not match the certificate in {cert[1]}"))
        else:
            found.append((key[0], f"cannot load {key[1]} with {cert[1]}: {_reason(exc)}"))
    return found


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc).replace("_", " ").lower()


def _header_problems(headers: Mapping[Any, Any]) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    where = ("http_server_config", "headers")
    for name, value in headers.items():
        if name not in _HEADERS:
            allowed = ", ".join(sorted(_HEADERS))
            found.append(((*where, name), f"cannot be set here (allowed: {allowed})"))
        elif _HEADERS[name] and value and value not in _HEADERS[name]:
            choices = " or ".join(_HEADERS[name])
            found.append(((*where, name), f"must be {choices}, not {value!r}"))
    return found


# --- basic auth -------------------------------------------------------------------------------

# exporter-toolkit's stand-in hash (of "fakepassword"), with the cost set per config so that an
# unknown user costs what a known one does
_DUMMY_SALT_AND_HASH = "QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi"


def parse_basic_authorization(header: str | None) -> tuple[str, bytes] | None:
    """User and password from an `Authorization: Basic ...` header; None for anything else."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
        user, colon, password = decoded.partition(b":")
        password.decode("utf-8")
        return (user.decode("utf-8"), password) if colon else None
    except (binascii.Error, ValueError):  # bad base64, non-ASCII token, non-UTF-8 credentials
        return None


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        # bcrypt reads 72 bytes; Go's bcrypt ignores the rest, pyca's refuses: do as Go does
        return bcrypt.checkpw(password[:72], hashed)
    except ValueError:
        return False


class BasicAuth:
    """Checks `Authorization` headers against the bcrypt hashes of `basic_auth_users`.

    bcrypt runs in a thread, one at a time as in exporter-toolkit, so a flood of wrong passwords
    costs one core and never the event loop. A success is remembered (an HMAC of user, password
    and hash, never the password) so a scrape every 15 s pays bcrypt once, not every time.
    An unknown user costs a bcrypt of a stand-in hash, so timing does not tell which users exist.
    Make one per event loop; on a reload, make a new one from the new users.
    """

    def __init__(self, users: Mapping[str, str], *, cache_size: int = 1024):
        self._users = dict(users)
        cost = max((int(hashed[4:6]) for hashed in self._users.values()), default=10)
        self._stand_in = f"$2b${cost:02d}${_DUMMY_SALT_AND_HASH}".encode()
        self._key = os.urandom(32)
        self._verified: OrderedDict[str, bytes] = OrderedDict()  # user -> digest, oldest first
        self._cache_size = cache_size
        self._one_at_a_time = asyncio.Lock()

    @property
    def required(self) -> bool:
        """False when no users are configured: every request is let through."""
        return bool(self._users)

    async def check(self, authorization: str | None) -> bool:
        """True when the `Authorization` header names a user with their password, or when no
        users are configured; anything malformed is simply False."""
        if not self._users:
            return True
        credentials = parse_basic_authorization(authorization)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self._users.get(user)
        digest = self._digest(user, password, hashed or "")
        if hashed is not None and self._remembered(user, digest):
            return True
        async with self._one_at_a_time:
            if hashed is not None and self._remembered(user, digest):
                return True  # verified by a request that held the lock before this one
            target = hashed.encode() if hashed is not None else self._stand_in
            matches = await asyncio.to_thread(_bcrypt_matches, password, target)
        if not matches or hashed is None:
            return False
        self._verified[user] = digest
        self._verified.move_to_end(user)
        while len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return True

    def _digest(self, user: str, password: bytes, hashed: str) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (user.encode(), password, hashed.encode()):
            mac.update(len(part).to_bytes(8, "big") + part)
        return mac.digest()

    def _remembered(self, user: str, digest: bytes) -> bool:
        known = self._verified.get(user)
        if known is None or not hmac.compare_digest(known, digest):
            return False
        self._verified.move_to_end(user)
        return True


# --- watching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reload:
    """What a changed web config gave: the new config, or the errors that kept the old one."""

    config: WebConfig | None
    errors: tuple[str, ...] = ()


class WebConfigWatcher:
    """Re-reads the web config when it or a file it names changes, as exporter-toolkit re-reads
    on every request; an invalid change keeps the old config, so TLS and auth never drop.

    The caller drives it (`maybe_reload(time.monotonic())`, e.g. per request): the files are
    stat'ed at most once per `interval` seconds, a few microseconds on the loop; a reload reads
    a few KB and loads one certificate. A broken change is reported once, then again only when
    the files change once more.
    """

    def __init__(self, path: str | Path, *, interval: float = 1.0):
        self._path = Path(path)
        self._interval = interval
        attempt = _load(self._path)
        if attempt.config is None:
            raise WebConfigError(list(attempt.errors))
        self._config = attempt.config
        self._stamps = attempt.stamps
        self._checked_at: float | None = None

    @property
    def config(self) -> WebConfig:
        """The newest config that loaded."""
        return self._config

    def maybe_reload(self, now: float, *, force: bool = False) -> Reload | None:
        """None when nothing changed (or it is too soon to look); else what the reload gave."""
        if not force and self._checked_at is not None and now - self._checked_at < self._interval:
            return None
        self._checked_at = now
        if not force and all(_stamp_of(p) == seen for p, seen in self._stamps.items()):
            return None
        attempt = _load(self._path)
        self._stamps = attempt.stamps
        if attempt.config is None:
            return Reload(None, attempt.errors)
        self._config = attempt.config
        return Reload(attempt.config)


class WebGuard:
    """The running web config as the web server asks for it: one TLS context for the life of
    the listeners, and per request the basic auth and headers of the newest valid file."""

    def __init__(self, watcher: WebConfigWatcher, clock: Callable[[], float] = time.monotonic):
        self._watcher = watcher
        self._clock = clock
        self._context = watcher.config.ssl_context()
        self._ingest_context = _without_client_certs(watcher.config.ssl_context())
        self._auth = BasicAuth(watcher.config.basic_auth_users)
        _log_notes(watcher.config.notes)

    def tls(self) -> ssl.SSLContext | None:
        return self._context

    def ingest_tls(self) -> ssl.SSLContext | None:
        """The ingest listener's: the same certificate, never a client certificate asked for,
        since D7's callbacks cannot present one (the routes carry their own token)."""
        return self._ingest_context

    @property
    def headers(self) -> Mapping[str, str]:
        return self._watcher.config.headers

    def current(self) -> WebGuard:
        """Looks at the files (at most once a second) and takes a valid change."""
        reload = self._watcher.maybe_reload(self._clock())
        if reload is None:
            return self
        if reload.config is None:
            for error in reload.errors:
                log.error(
                    "the web config changed but is invalid; the previous one stays in force",
                    extra={"fields": {"error": error}},
                )
            return self
        self._auth = BasicAuth(reload.config.basic_auth_users)
        _log_notes((*reload.config.notes, *reload.config.update_ssl_context(self._context)))
        reload.config.update_ssl_context(self._ingest_context)
        _without_client_certs(self._ingest_context)
        log.info("web config reloaded")
        return self

    async def allowed(self, authorization: str | None) -> bool:
        return await self._auth.check(authorization)


def _without_client_certs(context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if context is not None:
        context.verify_mode = ssl.CERT_NONE
    return context


def _log_notes(notes: Iterable[str]) -> None:
    for note in notes:
        log.warning("web config", extra={"fields": {"note": note}})
