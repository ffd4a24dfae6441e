"""The deployment files under deploy/: the Kubernetes kustomization and the systemd unit.

No cluster and no init system run here. The manifests are parsed and held to their invariants,
built by kustomize (kubectl's) and validated against the Kubernetes API schemas that
kubernetes-validate ships (offline); their PrometheusRule must be what generate.py makes of the
bundled rule files, and promtool must accept its groups. The unit goes through `systemd-analyze
verify` and `security --offline`, and the exporter runs as the unit's MemoryDenyWriteExecute=
would run it (the kernel's PR_SET_MDWE, which systemd uses itself where the kernel has it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import bcrypt
import httpx
import pytest
import yaml

from exporter.cli import parse_args
from exporter.cluster import Shard
from exporter.config import parse_config, parse_duration
from exporter.providers import ACCOUNT_MODELS
from exporter.web import DEFAULT_PORT, parse_listen_address
from tests.conftest import ROOT, free_port, require_tool, wait_for

DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
README = DEPLOY / "README.md"
UNIT = DEPLOY / "systemd" / "whatsapp-exporter.service"
GENERATE = KUBE / "generate.py"
RULE_FILES = (ROOT / "prometheus" / "rules.yml", ROOT / "prometheus" / "alerts.yml")

UID = 10467  # the Dockerfile's USER
CONFIG_PATH = "/etc/whatsapp-exporter/config.yaml"
STATE_DIR = "/var/lib/whatsapp-exporter"
INGEST_PORT = 10468
SECRET = "whatsapp-exporter"
JOB = "whatsapp"  # what the bundled rules select (job="whatsapp")
OLDEST_KUBERNETES = "1.25.0"  # deploy/README.md's promise


# ---- loading -------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def objects(kustomization) -> list[dict[str, Any]]:
    return [doc for name in kustomization["resources"] for doc in load_docs(KUBE / name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


@pytest.fixture(scope="module")
def statefulset(objects) -> dict[str, Any]:
    return one(objects, "StatefulSet")


@pytest.fixture(scope="module")
def pod(statefulset) -> dict[str, Any]:
    return statefulset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict[str, Any]:
    (found,) = pod["containers"]
    return found


def flags(args: list[str]) -> dict[str, str]:
    """`--name=value` arguments as a dict (every argument must have that form)."""
    found = {}
    for arg in args:
        match = re.fullmatch(r"(--[a-z.-]+)(?:=(.*))?", arg)
        assert match, f"{arg!r}: expected --flag or --flag=value"
        assert match[1] not in found, f"{match[1]} is given twice"
        found[match[1]] = match[2] if match[2] is not None else ""
    return found


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is used here"
    return selector["matchLabels"].items() <= labels.items()


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return found


# ---- the kustomization -----------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_nothing_else(kustomization, objects) -> None:
    listed = set(kustomization["resources"])
    generated = {f for g in kustomization["configMapGenerator"] for f in g["files"]}
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed | generated == on_disk, "a manifest is not applied, or a listed one is missing"
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "StatefulSet",
            "Service",
            "Service",
            "Service",
            "PodDisruptionBudget",
            "PodMonitor",
            "PrometheusRule",
        ]
    )
    assert not [o for o in objects if o["kind"] == "Secret"], "secrets are referenced, never here"
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["name"] == kustomization["namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objects:
        assert "namespace" not in o["metadata"], "kustomization.yaml sets the namespace"
        assert o["metadata"]["labels"]["app.kubernetes.io/name"] == "whatsapp-exporter"


@pytest.mark.processes
def test_kustomize_builds_it_offline(kustomization) -> None:
    """kubectl's kustomize: the ConfigMap gets its hash suffix and the StatefulSet follows it."""
    kubectl = require_tool("kubectl", "kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {o["metadata"].get("namespace") for o in built if o["kind"] != "Namespace"} == {
        kustomization["namespace"]
    }
    config_map = one(built, "ConfigMap")
    assert re.fullmatch(r"whatsapp-exporter-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    assert config_map["data"]["config.yaml"] == (KUBE / "config.yaml").read_text(encoding="utf-8")
    spec = one(built, "StatefulSet")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (image,) = kustomization["images"]
    assert spec["containers"][0]["image"] == f"{image['newName']}:{image['newTag']}"


def test_builtin_kinds_validate_against_the_kubernetes_schemas(objects) -> None:
    """Strict (unknown fields are errors) against the oldest supported and the newest API."""
    try:
        import kubernetes_validate  # noqa: PLC0415 - a test-only dependency
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed: it ships the Kubernetes API schemas this test "
            "validates against offline; add it to the dev extra (pip install kubernetes-validate)",
            pytrace=False,
        )
    crds = {"PodMonitor", "PrometheusRule"}  # monitoring.coreos.com: no schema ships for them
    for version in (OLDEST_KUBERNETES, kubernetes_validate.latest_version()):
        for o in objects:
            if o["kind"] in crds:
                continue
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(map(str, exc.path))
                pytest.fail(f"{o['kind']} {o['metadata']['name']} ({version}) {where}: {exc}")
    # strict really is strict: a misspelt field is refused
    typo = json.loads(json.dumps(one(objects, "StatefulSet")))
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, OLDEST_KUBERNETES, strict=True)


# ---- the StatefulSet ---------------------------------------------------------------------------


def test_two_replicas_on_different_nodes_one_shard(objects, statefulset, pod, container) -> None:
    spec = statefulset["spec"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert matches(spec["selector"], labels)
    headless = one(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"

    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert matches(term["labelSelector"], labels)

    pdb = one(objects, "PodDisruptionBudget")["spec"]
    assert matches(pdb["selector"], labels)
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == spec["replicas"] - 1

    # auto/N: every pod's ordinal gives it a shard, and with N=1 both compete for shard 0
    shard = flags(container["args"])["--cluster.shard"]
    name = statefulset["metadata"]["name"]
    shards = [Shard.parse(shard, hostname=f"{name}-{i}") for i in range(spec["replicas"])]
    assert {str(s) for s in shards} == {"0/1"}


def test_pod_runs_as_the_images_non_root_user_with_nothing_extra(pod, container) -> None:
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == pod_security["runAsGroup"] == UID
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security.get("runAsUser", UID) == UID
    assert security.get("privileged", False) is False
    assert pod["automountServiceAccountToken"] is False
    assert f"USER {UID}:{UID}" in (ROOT / "Dockerfile").read_text(encoding="utf-8")

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]

    # a read-only root: whatever the exporter writes is a volume
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in mounts.values()} == set(volumes)
    state = flags(container["args"])["--storage.path"]
    assert state == STATE_DIR
    assert "emptyDir" in volumes[mounts[state]["name"]], "state is in PostgreSQL: an emptyDir"
    assert not mounts[state].get("readOnly")
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_probes_ask_the_right_paths_on_the_main_port(container) -> None:
    args = flags(container["args"])
    _, main_port, _ = parse_listen_address(args["--web.listen-address"])
    assert main_port == DEFAULT_PORT
    for probe, path in (("livenessProbe", "/-/healthy"), ("readinessProbe", "/-/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(container, get["port"]) == main_port, probe
        assert get.get("scheme", "HTTP") == "HTTP"
    _, ingest_port, _ = parse_listen_address(args["--web.ingest-address"])
    assert ingest_port == INGEST_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": main_port,
        "ingest": ingest_port,
    }


KNOWN_FLAGS = {
    "--config.file",
    "--web.listen-address",
    "--web.ingest-address",
    "--web.config.file",
    "--web.enable-lifecycle",
    "--storage.path",
    "--storage.url",
    "--storage.password-file",
    "--cluster.shard",
    "--cluster.lease",
    "--log.level",
    "--log.format",
}


def test_container_args_are_the_exporters_flags(container) -> None:
    args = flags(container["args"])
    assert set(args) <= KNOWN_FLAGS, set(args) - KNOWN_FLAGS
    assert args["--config.file"] == CONFIG_PATH
    url = urlsplit(args["--storage.url"])
    assert url.scheme == "postgresql"
    assert url.password is None, "the password comes from the Secret, never the URL"
    assert url.username and url.hostname and url.port == 5432 and url.path.strip("/")
    assert parse_duration(args["--cluster.lease"]) >= 3
    assert "command" not in container, "the image's entrypoint is whatsapp-exporter"


def test_container_args_parse_with_the_exporters_cli(container) -> None:
    parsed = parse_args(container["args"])
    args = flags(container["args"])
    assert parsed.config_file == CONFIG_PATH
    assert parsed.storage_path == STATE_DIR
    assert parsed.listen_address == args["--web.listen-address"]
    assert parsed.ingest_address == args["--web.ingest-address"]
    assert parsed.storage_url == args["--storage.url"]
    assert parsed.storage_password_file == args["--storage.password-file"]
    assert (parsed.shard, parsed.lease) == ("auto/1", args["--cluster.lease"])


# ---- the config and the Secret -----------------------------------------------------------------


def secret_keys_documented() -> dict[str, str]:
    """deploy/README.md's table of the Secret's keys: key -> how it reaches the exporter."""
    text = README.read_text(encoding="utf-8")
    table = text.split("| key | what | reaches the exporter as |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.strip().splitlines()[1:] if line.startswith("|")]
    found = {}
    for row in rows:
        key, _, how = (cell.strip() for cell in row.strip("|").split("|"))
        found[key.strip("`")] = how
    return found


def test_every_secret_reference_is_a_documented_key(objects, pod, container) -> None:
    documented = secret_keys_documented()
    referenced: dict[str, str] = {}  # key -> "env NAME" or "file PATH"
    for env in container.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == SECRET and not ref.get("optional")
            referenced[ref["key"]] = f"env {env['name']}"
        else:
            assert "value" not in env or not re.search(r"(?i)token|secret|pass", env["name"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == SECRET
            assert not volume["secret"].get("optional")
            assert volume["secret"]["defaultMode"] == 0o440
            for item in volume["secret"]["items"]:
                referenced[item["key"]] = f"file {mounts[volume['name']]}/{item['path']}"
    assert set(referenced) == set(documented), "deploy/README.md's table and the manifests differ"
    for key, how in referenced.items():
        kind, where = how.split(" ", 1)
        assert (f"`{where}`" in documented[key]) and (
            kind == "file" or "environment variable" in documented[key]
        ), f"{key}: the README says {documented[key]!r}, the StatefulSet {how!r}"
    text = "\n".join(p.read_text(encoding="utf-8") for p in KUBE.glob("*.yaml"))
    assert "stringData" not in text
    assert not re.search(r"postgres(ql)?://[^@\s/]*:[^@\s/]*@", text), "a password in a URL"


def walk(data: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, scalar) of a loaded YAML document."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from walk(v, str(k))
    elif isinstance(data, list):
        for v in data:
            yield from walk(v, key)
    else:
        yield key, data


def test_config_loads_with_the_secrets_the_statefulset_provides(pod, container, tmp_path) -> None:
    """Every `*_file` in config.yaml is a file from the Secret and every ${VAR} an env var from
    it; with stand-ins for them the config loads with the exporter's own loader."""
    text = (KUBE / "config.yaml").read_text(encoding="utf-8")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    files = {
        f"{mounts[v['name']]}/{item['path']}"
        for v in pod["volumes"]
        if "secret" in v
        for item in v["secret"]["items"]
    }
    data = list(walk(yaml.safe_load(text)))
    wanted = {value for key, value in data if key.endswith("_file") and value}
    wanted.add(flags(container["args"])["--storage.password-file"])
    assert wanted and wanted <= files, wanted - files
    env = {e["name"] for e in container.get("env", [])}
    variables = {
        name
        for _, value in data
        if isinstance(value, str)
        for name in re.findall(r"\$\{(\w+)\}", value)
    }
    assert variables and variables <= env, variables - env

    (secret_dir,) = {mounts[v["name"]] for v in pod["volumes"] if "secret" in v}
    for path in files:
        (tmp_path / Path(path).name).write_text("stand-in-secret-0123456789\n", encoding="utf-8")
    config = parse_config(
        text.replace(secret_dir, str(tmp_path)),
        ACCOUNT_MODELS,
        env=dict.fromkeys(variables, "stand-in-token-0123456789abcdef"),
    )
    assert config.accounts()
    # and the config the image reads is the one mounted from the ConfigMap
    (config_mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert f"{config_mount['mountPath']}/config.yaml" == CONFIG_PATH


# ---- Services and scraping ---------------------------------------------------------------------


def test_services_expose_the_metrics_and_the_ingest_port_apart(objects, statefulset) -> None:
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    services = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Service"}
    for name, spec in services.items():
        assert spec["selector"].items() <= labels.items(), name
        for port in spec["ports"]:
            assert port_number(container, port["targetPort"]) == port["port"], name
    ports = {name: {p["port"] for p in spec["ports"]} for name, spec in services.items()}
    assert ports == {
        "whatsapp-exporter-headless": {DEFAULT_PORT},
        "whatsapp-exporter": {DEFAULT_PORT},
        "whatsapp-exporter-ingest": {INGEST_PORT},  # the only one for the internet
    }
    assert services["whatsapp-exporter-headless"]["clusterIP"] == "None"
    assert services["whatsapp-exporter"].get("type", "ClusterIP") == "ClusterIP"


def test_podmonitor_scrapes_every_replica_as_the_rules_job(objects, statefulset) -> None:
    monitor = one(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "podMetricsEndpoints"}  # same namespace, every pod
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert matches(spec["selector"], labels)
    (endpoint,) = spec["podMetricsEndpoints"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert port_number(container, endpoint["port"]) == DEFAULT_PORT
    assert endpoint["path"] == "/metrics"
    assert parse_duration(endpoint["scrapeTimeout"]) < parse_duration(endpoint["interval"])
    assert {"action": "replace", "targetLabel": "job", "replacement": JOB} in endpoint[
        "relabelings"
    ]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    rules = "\n".join(p.read_text(encoding="utf-8") for p in RULE_FILES)
    assert f'job="{JOB}"' in rules
    assert not re.search(r'job="(?!whatsapp")', rules), "the rules select another job too"


# ---- the PrometheusRule ------------------------------------------------------------------------


@pytest.mark.processes
def test_prometheusrule_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr + "\nrun: python deploy/kubernetes/generate.py"


@pytest.mark.processes
def test_prometheusrule_groups_are_the_bundled_rule_files(objects, tmp_path) -> None:
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    bundled = [g for path in RULE_FILES for g in load_docs(path)[0]["groups"]]
    assert rule["spec"] == {"groups": bundled}
    names = [g["name"] for g in bundled]
    assert len(names) == len(set(names)), "the operator needs unique group names"

    promtool = require_tool("promtool", "prometheus")
    spec = tmp_path / "spec.yml"
    spec.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generate_keeps_comments_and_falls_back_to_data(tmp_path, monkeypatch) -> None:
    """The text of the rule files is kept when it can be; any other layout still makes the same
    groups."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("deploy_generate", GENERATE)
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)

    block = tmp_path / "block.yml"
    block.write_text(
        textwrap.dedent(
            """\
            # header
            groups:
              - name: a
                rules:
                  # why this rule
                  - record: x:y
                    expr: |
                      sum(up)

                        / 2
            """
        ),
        encoding="utf-8",
    )
    flow = tmp_path / "flow.yml"
    flow.write_text('{"groups": [{"name": "b", "rules": [{"alert": "B", "expr": "up"}]}]}')
    empty = tmp_path / "empty.yml"
    empty.write_text("groups: []\n", encoding="utf-8")

    monkeypatch.setattr(generate, "SOURCES", (block, empty))
    kept = generate.render()
    assert "# why this rule" in kept
    assert yaml.safe_load(kept)["spec"]["groups"][0]["rules"][0]["expr"] == "sum(up)\n\n  / 2\n"

    monkeypatch.setattr(generate, "SOURCES", (block, flow))
    both = yaml.safe_load(generate.render())["spec"]["groups"]
    assert [g["name"] for g in both] == ["a", "b"]

    monkeypatch.setattr(generate, "SOURCES", (block, block))
    with pytest.raises(SystemExit, match="named twice"):
        generate.render()


# ---- systemd -----------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)], continuation lines joined, comments dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return unit_directives(UNIT.read_text(encoding="utf-8"))


def service(unit, key: str) -> list[str]:
    return [value for k, value in unit["Service"] if k == key]


def test_unit_runs_the_exporter_with_its_directories(unit) -> None:
    (exec_start,) = service(unit, "ExecStart")
    binary, *args = shlex.split(exec_start)
    assert binary.endswith("/bin/whatsapp-exporter")
    parsed = parse_args(args)
    assert parsed.config_file == CONFIG_PATH
    assert parsed.storage_path == STATE_DIR
    assert parse_listen_address(parsed.listen_address)[1] == DEFAULT_PORT
    assert service(unit, "Type") in (["exec"], ["simple"])
    assert service(unit, "DynamicUser") == ["yes"] or service(unit, "User")
    assert service(unit, "StateDirectory") == [Path(STATE_DIR).name]
    assert service(unit, "ConfigurationDirectory") == [Path(CONFIG_PATH).parent.name]
    assert service(unit, "Restart") == ["on-failure"]
    assert service(unit, "RestartPreventExitStatus") == ["2"]  # a bad config: no restart loop
    assert service(unit, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert service(unit, "LoadCredential") == ["secret:/etc/whatsapp-exporter/credentials"]
    assert service(unit, "EnvironmentFile") == ["-/etc/whatsapp-exporter/env"]  # optional
    assert dict(unit["Install"]) == {"WantedBy": "multi-user.target"}


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
}


def test_unit_hardening(unit) -> None:
    for key, value in HARDENING.items():
        assert service(unit, key) == [value], key
    assert service(unit, "SystemCallFilter")[0] == "@system-service"
    assert "ProcSubset" not in dict(unit["Service"]), "process_* metrics read /proc/stat"
    # the filter denies setrlimit, so the unit sets the open-files limit itself
    assert "@resources" in " ".join(service(unit, "SystemCallFilter"))
    assert int(service(unit, "LimitNOFILE")[0]) >= 8192


def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary at this checkout's installed one: verify checks that the
    binary exists. Nothing else changes."""
    installed = Path(sys.executable).parent / "whatsapp-exporter"
    assert installed.exists(), f"{installed}: `pip install -e .` makes it"
    text = UNIT.read_text(encoding="utf-8")
    assert text.count("/opt/whatsapp-exporter/bin/whatsapp-exporter") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/whatsapp-exporter/bin/whatsapp-exporter", str(installed)))
    return copy


@pytest.mark.processes
def test_systemd_analyze_verify(tmp_path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "verify", str(verifiable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify only warns (exit 0) about an unknown key: any output at all is a finding
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.processes
def test_systemd_analyze_security_offline(tmp_path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    unit_file = verifiable_unit(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=15", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert score, result.stdout[-500:]
    assert float(score[1]) <= 1.5, f"exposure {score[1]} {score[2]}: was 1.2 OK"
    report = subprocess.run(
        [analyze, "security", "--offline=yes", "--json=short", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    unset = {
        item["name"]
        for item in json.loads(report.stdout)
        if item["set"] is False and float(item["exposure"] or 0) > 0
    }
    # what a network service needs: its sockets, the host's network and root directory
    allowed = {
        "RestrictAddressFamilies=~AF_UNIX",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "PrivateNetwork=",
        "IPAddressDeny=",
        "RootDirectory=/RootImage=",
        "ProcSubset=",
        "DeviceAllow=",
    }
    assert unset <= allowed, unset - allowed


# ---- MemoryDenyWriteExecute: the exporter as the unit runs it ---------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# Sets the kernel's memory-deny-write-execute on itself, then execs argv[1:]: the flag survives
# execve, so the program runs as under systemd's MemoryDenyWriteExecute=yes.
LAUNCHER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def require_mdwe() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
        pytest.fail(
            f"the kernel ({os.uname().release}) has no PR_SET_MDWE (Linux >= 6.3), so "
            "MemoryDenyWriteExecute= cannot be checked here; it is enforced by systemd's seccomp "
            "filter on older kernels",
            pytrace=False,
        )


@contextlib.contextmanager
def exporter_under_mdwe(argv: list[str], cwd: Path) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "exporter", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        process.stdout.close()


@pytest.mark.processes
def test_python_and_the_exporter_run_under_memory_deny_write_execute(tmp_path) -> None:
    require_mdwe()
    # the control: under the launcher, a writable and executable mapping is refused
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCHER,
            sys.executable,
            "-c",
            "import mmap; mmap.mmap(-1, 4096, prot=7)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr

    # the exporter: config, bcrypt basic auth, aiohttp, httpx, pydantic, SQLite WAL ledger
    token = "ingest-token-0123456789abcdef"
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            f"""\
            kaleyra: [{{account: k, base_url: "http://127.0.0.1:9", numbers: ["+12025550100"]}}]
            d7:
              - account: prod
                base_url: http://127.0.0.1:9
                token: d7-token-0123456789
                ingest_token: {token}
            """
        ),
        encoding="utf-8",
    )
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    (tmp_path / "web.yml").write_text(f"basic_auth_users: {{prometheus: '{hashed}'}}\n")
    port, ingest = free_port(), free_port()
    argv = [
        f"--config.file={tmp_path / 'config.yaml'}",
        f"--web.config.file={tmp_path / 'web.yml'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.ingest-address=127.0.0.1:{ingest}",
        f"--storage.path={tmp_path / 'state'}",
    ]
    with exporter_under_mdwe(argv, tmp_path) as process:
        url, auth = f"http://127.0.0.1:{port}", ("prometheus", "pw")

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the exporter exited: {process.stdout.read()}")
            try:
                return httpx.get(f"{url}/-/ready", auth=auth, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 20, "the exporter under MDWE to be ready")
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 401
        metrics = httpx.get(f"{url}/metrics", auth=auth, timeout=5)
        assert metrics.status_code == 200 and "whatsapp_exporter_up" in metrics.text
        handed_in = httpx.post(
            f"http://127.0.0.1:{ingest}/api/v1/requests",
            json={"account": "prod", "request_ids": ["f44e3f43-6d4e-4e46-becd-21993f3dcb8e"]},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert handed_in.status_code == 202, handed_in.text
        assert process.poll() is None
