"""D7 Networks: the status of sent WhatsApp requests, by request id.

Nothing in D7's API lists request ids, so this provider can only follow ids it is given; the
tracking store that takes them in is built on top of this module.
"""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr, field_validator

from exporter.config import AccountBase, Defaults, RateLimit, SecretFile
from exporter.providers.base import Endpoint, Provider


class Account(AccountBase):
    SECRETS = ("token",)

    base_url: str = "https://api.d7networks.com"
    token: SecretStr | None = None
    token_file: SecretFile = None
    # the docs say v2; every official SDK calls /whatsapp/v1/report/{request_id}
    report_path: str = "/whatsapp/v2/report/{request_id}"

    @field_validator("report_path")
    @classmethod
    def _report_path(cls, path: str) -> str:
        if "{request_id}" not in path or not path.startswith("/"):
            raise ValueError(f"{path!r} must start with / and contain {{request_id}}")
        return path


def provider_error(body: Any) -> str | None:
    """`{"detail": {"code": ..., "message": ...}}`, or FastAPI's 422 list of problems."""
    if not isinstance(body, dict) or "detail" not in body:
        return None
    detail = body["detail"]
    if isinstance(detail, dict):
        return f"{detail.get('code', 'error')}: {detail.get('message', '')}".rstrip(": ")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        where = ".".join(str(p) for p in first.get("loc", []))
        return f"{where}: {first.get('msg', 'invalid')}"
    return str(detail)[:200]


def headers(account: Account) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {account.token.get_secret_value()}",
        "Accept": "application/json",
    }


def endpoints(account: Account, defaults: Defaults) -> list[Endpoint]:
    return []


PROVIDER = Provider(
    name="d7",
    account_model=Account,
    default_rate_limit=RateLimit(requests=600, period=60.0),
    headers=headers,
    endpoints=endpoints,
    provider_error=provider_error,
)
