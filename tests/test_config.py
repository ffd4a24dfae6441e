"""Config validation: a table of invalid files with their exact messages, and the good paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import ConfigError, load_config, parse_config, parse_duration
from exporter.providers import ACCOUNT_MODELS, PROVIDERS
from simulators import KITS
from tests.conftest import example_config

TESTDATA = Path(__file__).parent / "testdata" / "config"

INVALID = {
    "invalid-yaml.yml": [
        "invalid-yaml.yml:4:1: expected ',' or ']', but got '<stream end>'",
    ],
    "invalid-duplicate-key.yml": [
        "invalid-duplicate-key.yml:2:1: duplicate key 'defaults'",
    ],
    "invalid-top-level.yml": [
        "invalid-top-level.yml: the top level must be a mapping of keys, not a list or value",
    ],
    "invalid-unknown-keys.yml": [
        "defaults.intervall: unknown key (allowed: interval, stale_after, timeout)",
        f"whatsapp: unknown key (allowed: {', '.join(sorted([*PROVIDERS, 'defaults']))})",
        "whatsgate[0].balance.lookback: unknown key (allowed: interval)",
    ],
    "invalid-types.yml": [
        "defaults: must be a mapping of keys",
        "kaleyra[0].numbers: must be a list",
        "whatsgate: must be a list",
    ],
    "invalid-values.yml": [
        "betatel[0].timezone: 'Mars/Olympus_Mons' is not an IANA timezone like UTC or "
        "Europe/Berlin",
        "betatel[0].windows[1]: Input should be 'today', 'lastm', 'last5m', 'last10m', "
        "'last30m', 'lasth', 'last12h', 'last24h', 'lastmonth', 'hourly', 'daily', 'weekly', "
        "'monthly' or 'yearly'",
        "d7[0].report_path: '/whatsapp/v2/report' must start with / and contain {request_id}",
        "defaults.interval: '5x' is not a duration like 30s, 5m or 24h",
        "defaults.stale_after: Input should be greater than or equal to 1",
        "defaults.timeout: '-1s' is not a duration like 30s, 5m or 24h",
        "kaleyra[0].numbers[0]: '12025550100' is not an E.164 number like +12025550100: it "
        "must start with + and the country code",
        "whatsgate[0].account: 'has space' must be 1-63 letters, digits or _.:- (it becomes a "
        "label value)",
        "whatsgate[0].base_url: 'ftp://acme.whatsgate.net' must be an http:// or https:// URL",
        "whatsgate[0].devices: lists a device twice",
        "whatsgate[0].failed_numbers.lookback: 'soon' is not a duration like 30s, 5m or 24h",
        "whatsgate[0].rate_limit: '60/q' is not a rate like 60/m, 10/s or 1000/h",
    ],
    "invalid-secrets.yml": [
        "betatel[0]: account_id or account_id_file is required",
        "whatsgate[0]: token or token_file is required",
        "whatsgate[1].token_file: cannot read /run/secrets/token: No such file or directory",
        "whatsgate[1]: give either token or token_file, not both",
        "whatsgate[2].token: environment variable WHATSAPP_EXPORTER_TEST_UNSET is not set",
        "whatsgate[2]: token is empty",
        "whatsgate[3].devices[0]: must be a string (quote it)",
        "whatsgate[3].token_file: cannot read /nonexistent/token: No such file or directory",
    ],
    "invalid-duplicate-account.yml": [
        "whatsgate[1].account: 'acme' is already the name of whatsgate[0]",
    ],
}


def test_every_invalid_file_is_in_the_table():
    assert sorted(p.name for p in TESTDATA.glob("invalid-*.yml")) == sorted(INVALID)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_config_reports_every_error_with_its_path(name, monkeypatch):
    monkeypatch.chdir(TESTDATA)
    monkeypatch.delenv("WHATSAPP_EXPORTER_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(name, ACCOUNT_MODELS)
    assert caught.value.errors == INVALID[name]


@pytest.mark.processes
def test_config_check_prints_all_errors_and_exits_2_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file=invalid-values.yml"],
        cwd=TESTDATA,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == "invalid-values.yml: invalid config, 12 error(s):"
    assert [line.strip() for line in result.stderr.splitlines()[1:]] == INVALID[
        "invalid-values.yml"
    ]


@pytest.mark.processes
def test_config_check_accepts_a_good_file(tmp_path):
    (tmp_path / "token").write_text("s3cret\n")
    (tmp_path / "config.yaml").write_text(
        "whatsgate:\n"
        "  - account: acme\n"
        "    base_url: https://acme.whatsgate.net/api\n"
        f"    token_file: {tmp_path / 'token'}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", "--config.file=config.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "config.yaml: OK, 1 account(s)\n")


@pytest.mark.processes
def test_missing_config_file_is_a_message_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "exporter", f"--config.file={tmp_path / 'nope.yaml'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot read the config file: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_example_config_is_valid_and_documents_every_key(tmp_path):
    text, env = example_config(tmp_path)
    config = parse_config(text, ACCOUNT_MODELS, env=env)
    assert [(p, a.account) for p, a in config.accounts()] == [
        (name, kit.example.account) for name, kit in KITS.items()
    ]
    # every key a model accepts appears in the example, so none is undocumented
    for provider, model in ACCOUNT_MODELS.items():
        keys = {k for k in model.model_fields if not k.endswith("_file")}
        account = text.split(f"\n{provider}:\n", 1)[1].split("\n\n", 1)[0]
        for key in keys:
            assert f" {key}:" in account, f"config.example.yaml does not show {provider}.{key}"


def test_env_and_file_secrets_and_dollar_escape(tmp_path):
    (tmp_path / "key").write_text("  from-file \n")
    config = parse_config(
        "betatel:\n"
        "  - account: eu\n"
        "    api_key: ${KEY}\n"
        f"    account_id_file: {tmp_path / 'key'}\n"
        "    currency: $$EUR\n",
        ACCOUNT_MODELS,
        env={"KEY": "from-env"},
    )
    account = config.betatel[0]
    assert account.api_key.get_secret_value() == "from-env"
    assert account.account_id.get_secret_value() == "from-file"
    assert account.currency == "$EUR"


def test_secrets_never_appear_in_errors_or_reprs(tmp_path):
    (tmp_path / "token").write_text("topsecret-file")
    config = parse_config(
        f"d7:\n  - {{account: p, token_file: {tmp_path / 'token'}, ingest_token: topsecret-in}}\n"
        "whatsgate:\n  - {account: a, base_url: 'https://a.whatsgate.net/api', token: topsecret}\n",
        ACCOUNT_MODELS,
    )
    assert "topsecret" not in repr(config) and "topsecret" not in str(config.model_dump())
    with pytest.raises(ConfigError) as caught:
        parse_config(
            "whatsgate:\n  - {account: a, base_url: x, token: topsecret, rate_limit: nope}\n",
            ACCOUNT_MODELS,
        )
    assert "topsecret" not in "\n".join(caught.value.errors)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("24h", 86400), ("2d", 172800), ("500ms", 0.5),
     (45, 45), ("1.5s", 1.5)],
)  # fmt: skip
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_defaults_apply_to_accounts():
    config = parse_config(
        "whatsgate:\n  - {account: a, base_url: 'https://a.whatsgate.net/api', token: t}\n",
        ACCOUNT_MODELS,
    )
    account = config.whatsgate[0]
    assert (config.defaults.interval, config.defaults.timeout, config.defaults.stale_after) == (
        60,
        10,
        3,
    )
    assert account.rate_limit is None  # the provider's default budget applies: 60/m
    assert (account.balance.interval, account.failed_numbers.lookback) == (300, 86400)
