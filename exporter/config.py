"""The configuration file: parsed once into typed, frozen objects, with every error and its path.

Provider account models live in their provider modules and are handed in by the caller, so this
module never imports a provider (imports flow providers -> config, never back).
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """Every problem found in one config file, each prefixed with its path in the file."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


# --- scalar types ---------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """`30s`, `5m`, `1h30m`, `24h`, `2d`, `500ms`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 30s, 5m or 24h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration like 30s, 5m or 24h")
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError("must be a duration like 30s, 5m or 24h")
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*(s|m|h)\s*$")


class RateLimit(BaseModel):
    """At most `requests` in any window of `period` seconds (`60/m`, `10/s`, `1000/h`, `30/5m`)."""

    model_config = ConfigDict(frozen=True)
    requests: int
    period: float

    def __str__(self) -> str:
        return f"{self.requests}/{self.period:g}s"


def parse_rate_limit(value: Any) -> Any:
    if isinstance(value, RateLimit | dict):
        return value
    match = _RATE.match(value) if isinstance(value, str) else None
    if not match or int(match[1]) < 1:
        raise ValueError(f"{value!r} is not a rate like 60/m, 10/s or 1000/h")
    period = int(match[2] or 1) * _UNIT_SECONDS[match[3]]
    return RateLimit(requests=int(match[1]), period=period)


Rate = Annotated[RateLimit, BeforeValidator(parse_rate_limit), PlainSerializer(str)]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1 << 10, "KiB": 1 << 10, "MB": 1 << 20, "MiB": 1 << 20}
_SIZE_UNITS |= {"GB": 1 << 30, "GiB": 1 << 30}


def parse_size(value: Any) -> int:
    """`4MiB`, `512KB`, `16MB` or a number of bytes; KB/MB/GB are powers of 1024, as in
    Prometheus' `body_size_limit`."""
    if isinstance(value, bool):
        raise ValueError("must be a size like 4MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"{value!r} is not a size like 512KiB, 4MiB or 16MB")
        size = int(float(match[1]) * _SIZE_UNITS[match[2]])
    if size < 1024:
        raise ValueError("must be at least 1KiB")
    return size


ByteSize = Annotated[int, BeforeValidator(parse_size)]


def read_secret_file(path: Any) -> Any:
    """`*_file` keys hold a path; the model keeps the file's content, as a secret."""
    if path is None or isinstance(path, SecretStr):
        return path
    if not isinstance(path, str) or not path:
        raise ValueError("must be the path of a file")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return SecretStr(text)


SecretFile = Annotated[SecretStr | None, BeforeValidator(read_secret_file)]


# --- HTTP headers an operator configures (a proxy's or provider's own auth) ---------------------

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP header name (RFC 9110 token)
_HEADER_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?$")


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, Sequence) else "an object"


def header_names(names: Iterable[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        if not _TOKEN.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name")
        first = seen.setdefault(name.lower(), name)
        if first != name:
            raise ValueError(f"{first!r} and {name!r} are the same header")


def _header_value(value: SecretStr) -> SecretStr:
    """Checked at load because the HTTP client rejects a bad value only when it sends it."""
    text = value.get_secret_value().strip()
    if not text:
        raise ValueError("the value is empty")
    if not _HEADER_VALUE.match(text):
        raise ValueError("the value must be printable ASCII on one line")
    return SecretStr(text)


def _text(value: Any) -> Any:
    """YAML reads an unquoted `12345` or `yes` as a number or boolean: ask for quotes, not guess."""
    if value is None:
        raise ValueError("is empty")
    if not isinstance(value, str | SecretStr):
        raise ValueError(f"must be text, not {json_kind(value)}: put it in quotes")
    return value


def _header_file(path: Any) -> Any:
    if path is None:
        raise ValueError("must be the path of a file")
    return read_secret_file(_text(path))


HeaderValue = Annotated[SecretStr, BeforeValidator(_text), AfterValidator(_header_value)]
# a path in the config; once loaded, the stripped content of that file (a secret)
HeaderFile = Annotated[SecretStr, BeforeValidator(_header_file), AfterValidator(_header_value)]


def secret_problems(
    data: Mapping[str, Any], names: tuple[str, ...], *, required: bool = True
) -> list[str]:
    """Each secret is given exactly once: inline (`token`) or as a file (`token_file`); an
    optional one at most once."""
    problems = []
    for name in names:
        inline, path = data.get(name), data.get(f"{name}_file")
        if inline is not None and path is not None:
            problems.append(f"give either {name} or {name}_file, not both")
        elif inline is None and path is None:
            if required:
                problems.append(f"{name} or {name}_file is required")
        elif inline is not None and not str(
            inline.get_secret_value() if isinstance(inline, SecretStr) else inline
        ):
            problems.append(f"{name} is empty")
    return problems


# --- models -----------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(Strict):
    interval: Duration = 60.0
    timeout: Duration = 10.0
    stale_after: int = Field(3, ge=1)


class Schedule(Strict):
    """An endpoint's own poll interval; None inherits the account's."""

    interval: Duration | None = None


class ClientTLS(Strict):
    """How an account's HTTPS connections are verified and authenticated (json_exporter's
    `http_client_config.tls_config`). Files are read at load, so a bad one fails the config."""

    ca_file: str | None = None  # trust this CA (a provider behind a private CA, a proxy's)
    cert_file: str | None = None  # a client certificate, for a provider that asks for one
    key_file: str | None = None
    insecure_skip_verify: bool = False  # never in production: any certificate is accepted

    @model_validator(mode="after")
    def _usable(self) -> ClientTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together")
        self.context()  # raises ValueError saying which file is wrong
        return self

    def context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca_file {self.ca_file}: {_why(exc)}") from None
        if self.cert_file and self.key_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"cert_file {self.cert_file} / key_file {self.key_file}: {_why(exc)}"
                ) from None
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")


class AccountBase(Strict):
    """What every provider account has; provider modules subclass it with their own keys.

    `SECRETS` names the secret keys: each is given as `name` or `name_file`, and after load the
    secret is in `name` either way. `OPTIONAL_SECRETS` likewise, but they may be left out.
    """

    SECRETS: ClassVar[tuple[str, ...]] = ()
    OPTIONAL_SECRETS: ClassVar[tuple[str, ...]] = ()

    account: str
    base_url: str
    interval: Duration | None = None
    timeout: Duration | None = None
    rate_limit: Rate | None = None
    concurrency: int = Field(4, ge=1, le=64)  # requests in flight at once, within rate_limit
    body_size_limit: ByteSize = 4 << 20  # an answer over this fails its poll as too_large
    proxy_url: str | None = None  # an HTTP(S) forward proxy for this account's requests
    tls: ClientTLS = ClientTLS()

    def secret_values(self) -> list[str]:
        """Every secret of this account as text, to scrub from whatever a provider echoes."""
        found: list[str] = []
        for value in self.__dict__.values():
            items = value.values() if isinstance(value, Mapping) else (value,)
            found += [v.get_secret_value() for v in items if isinstance(v, SecretStr)]
        return [v for v in found if v]

    @field_validator("account")
    @classmethod
    def _account_label(cls, value: str) -> str:
        if not _ACCOUNT.match(value):
            raise ValueError(
                f"{value!r} must be 1-63 letters, digits or _.:- (it becomes a label value)"
            )
        return value

    @field_validator("proxy_url")
    @classmethod
    def _proxy(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"{value!r} must be an http:// or https:// proxy URL (host[:port])")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_of_each_secret(self) -> AccountBase:
        problems = all_secret_problems(self.__dict__, type(self))
        if problems:
            raise ValueError("; ".join(problems))
        for name in (*self.SECRETS, *self.OPTIONAL_SECRETS):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(self, f"{name}_file"))
        return self


def all_secret_problems(data: Mapping[str, Any], model: type[AccountBase]) -> list[str]:
    return secret_problems(data, model.SECRETS) + secret_problems(
        data, model.OPTIONAL_SECRETS, required=False
    )


class Config(Strict):
    """Defaults plus one list of accounts per provider; built per registry by `config_model`."""

    defaults: Defaults = Defaults()

    def accounts(self) -> list[tuple[str, AccountBase]]:
        return [
            (provider, account)
            for provider in type(self).model_fields
            if provider != "defaults"
            for account in getattr(self, provider)
        ]


def config_model(account_models: Mapping[str, type[AccountBase]]) -> type[Config]:
    """The top-level model: allowed provider keys are exactly the registry's."""
    fields: dict[str, Any] = {name: (list[model], []) for name, model in account_models.items()}
    return create_model("WhatsAppExporterConfig", __base__=Config, **fields)


def redacted(config: Config) -> str:
    """The running config as YAML for /config: every secret (inline or read from a file) shown
    as `<secret>`, defaults filled in."""

    def hide(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "<secret>"
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [hide(v) for v in value]
        return value

    return yaml.safe_dump(hide(config.model_dump()), sort_keys=False, allow_unicode=True)


# --- loading ----------------------------------------------------------------------------------

_ENV = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)\})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; an operator's typo deserves an error."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r}",
                    problem_mark=mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _expand_env(data: Any, env: Mapping[str, str], loc: tuple, errors: list[str]) -> Any:
    if isinstance(data, dict):
        return {k: _expand_env(v, env, (*loc, k), errors) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, env, (*loc, i), errors) for i, v in enumerate(data)]
    if not isinstance(data, str):
        return data

    def replace(match: re.Match) -> str:
        if match[1] == "$":
            return "$"
        if match[2] not in env:
            errors.append(f"{format_path(loc)}: environment variable {match[2]} is not set")
            return ""
        return env[match[2]]

    return _ENV.sub(replace, data)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "is required",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
    "list_type": "must be a list",
    "string_type": "must be a string (quote it)",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "bool_type": "must be true or false",
}


def _describe(error: Mapping[str, Any], model: type[BaseModel]) -> tuple[tuple, str]:
    loc = tuple(part for part in error["loc"] if not _is_union_tag(part))
    kind = error["type"]
    message = _MESSAGES.get(kind) or error["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        if allowed:
            message += f" (allowed: {', '.join(allowed)})"
    return loc, message


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member or validator name ("function-before[...]") to locations
    return isinstance(part, str) and ("[" in part or part in {"float", "int", "str"})


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _inner_model(field.annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def parse_config(
    text: str,
    account_models: Mapping[str, type[AccountBase]],
    *,
    env: Mapping[str, str] | None = None,
    source: str = "config",
) -> Config:
    """YAML text to a Config, or ConfigError listing every problem with its path."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([f"{where}: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{source}: the top level must be a mapping of keys, not a list or value"]
        )

    errors: list[str] = []
    data = _expand_env(data, os.environ if env is None else env, (), errors)
    model = config_model(account_models)
    found: list[tuple[tuple, str]] = []
    config = None
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        found = [_describe(e, model) for e in exc.errors(include_url=False)]
        found += _raw_secret_problems(data, account_models)
    if config is not None:
        found += _duplicate_accounts(config)
        if not config.accounts():  # it would start, poll nothing and never be ready
            names = ", ".join(account_models)
            found.append(((), f"no accounts configured: add at least one under {names}"))
    errors += [f"{format_path(loc)}: {message}" for loc, message in found]
    if errors:
        raise ConfigError(sorted(dict.fromkeys(errors), key=_natural))
    return config


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _raw_secret_problems(
    data: Mapping[str, Any], account_models: Mapping[str, type[AccountBase]]
) -> list[tuple[tuple, str]]:
    """Pydantic skips model checks once a field failed; secrets are checked on the raw data too,
    so a missing token shows up in the same run as a typo next to it."""
    found = []
    for provider, model in account_models.items():
        accounts = data.get(provider)
        for index, raw in enumerate(accounts if isinstance(accounts, list) else []):
            if isinstance(raw, dict):
                problems = all_secret_problems(raw, model)
                if problems:
                    found.append(((provider, index), "; ".join(problems)))
    return found


def _duplicate_accounts(config: Config) -> list[tuple[tuple, str]]:
    seen: dict[tuple[str, str], int] = {}
    found = []
    for provider in type(config).model_fields:
        if provider == "defaults":
            continue
        for index, account in enumerate(getattr(config, provider)):
            first = seen.setdefault((provider, account.account), index)
            if first != index:
                found.append(
                    (
                        (provider, index, "account"),
                        f"{account.account!r} is already the name of {provider}[{first}]",
                    )
                )
    return found


def load_config(path: str | Path, account_models: Mapping[str, type[AccountBase]]) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the config file is not UTF-8 text"]) from None
    return parse_config(text, account_models, source=str(path))
