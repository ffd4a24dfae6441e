"""A D7 account's config: how its ids are followed, and the tokens it polls and ingests with."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, field_validator, model_validator

from exporter.config import AccountBase, Duration, SecretFile
from exporter.tracking import Schedule


class Account(AccountBase):
    SECRETS = ("token", "ingest_token")

    base_url: str = "https://api.d7networks.com"
    token: SecretStr | None = None
    token_file: SecretFile = None
    ingest_token: SecretStr | None = None  # what the sending app and D7's webhook present
    ingest_token_file: SecretFile = None
    # for a D7 callback that cannot send headers: /webhooks/d7/{account}/{webhook_secret}
    webhook_secret: SecretStr | None = None
    webhook_secret_file: SecretFile = None
    # the docs say v2; every official SDK calls /whatsapp/v1/report/{request_id}
    report_path: str = "/whatsapp/v2/report/{request_id}"
    interval: Duration | None = 5.0  # how often due ids are picked, not how often each is asked
    retry_first: Duration = 30.0  # an id's first poll after it came in, and its first back-off
    retry_max: Duration = 1800.0  # back-off doubles up to this
    not_found_grace: Duration = 600.0  # 404 for a fresh id is retried this long, then expired
    final_after: Duration = 86400.0  # a delivered message is followed this long for `read`
    expire_after: Duration = 259200.0  # an id not final by then is expired
    keep_finished: Duration = 604800.0  # finished ids are remembered (and not counted again)
    concurrency: int = Field(8, ge=1, le=64)

    @field_validator("report_path")
    @classmethod
    def _report_path(cls, path: str) -> str:
        if "{request_id}" not in path or not path.startswith("/"):
            raise ValueError(f"{path!r} must start with / and contain {{request_id}}")
        return path

    @model_validator(mode="after")
    def _webhook_secret(self) -> Account:
        if self.webhook_secret is not None and self.webhook_secret_file is not None:
            raise ValueError("give either webhook_secret or webhook_secret_file, not both")
        secret = self.webhook_secret or self.webhook_secret_file
        if secret is not None:
            text = secret.get_secret_value()
            if len(text) < 16 or not re.fullmatch(r"[A-Za-z0-9._~-]+", text):
                raise ValueError(
                    "webhook_secret: at least 16 characters of A-Z a-z 0-9 . _ ~ - (it is a URL "
                    "path segment; e.g. the output of `openssl rand -hex 16`)"
                )
            object.__setattr__(self, "webhook_secret", secret)
        return self

    def schedule(self) -> Schedule:
        return Schedule(
            first=self.retry_first,
            max=self.retry_max,
            not_found_grace=self.not_found_grace,
            final_after=self.final_after,
            expire_after=self.expire_after,
            keep_finished=self.keep_finished,
        )
