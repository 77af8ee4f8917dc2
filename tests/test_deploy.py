"""The cluster deployment files (deploy/, docs/deployment.md) against the code they deploy.

Kubernetes manifests are parsed (and rendered by `kubectl kustomize` when kubectl is there),
their settings and commands checked against `parking.settings.Settings` and the CLI's parser.
The database roles script runs on a PostgreSQL of the test's own: the owner migrates, the
services' login runs without DDL.
The bridged Mosquitto configurations run: a central and an edge broker of the test's own on
free loopback ports carry a gate's capture to `$share/lanes/...` subscribers and a command
back. EMQX is not installed: its configuration is parsed (HOCON) and its ACL generated from a
provisioned Mosquitto ACL and checked rule by rule.
"""

import asyncio
import contextlib
import importlib.util
import ipaddress
import os
import re
import shutil
import string
import subprocess
import tempfile
import time
import types
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis
import yaml
from pydantic import SecretStr
from pyhocon import ConfigFactory

from gate_controller.protocol import GateAddress, Topics
from parking.cli import build_parser
from parking.gates import provision
from parking.health import router as health_router
from parking.infra import Endpoints
from parking.migrate import migrate
from parking.runtime import ProviderEndpoint, running
from parking.settings import Settings
from tests.conftest import MQTT_URL, REDIS_URL
from tests.faults import free_port
from tests.test_broker_security import (
    Broker,
    Client,
    _wait_for_listener,
    forged,
    logged_in,
    stop_process,
)
from tests.test_fault_infra import PG_BIN, own_postgres

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
MOSQUITTO = DEPLOY / "mqtt" / "mosquitto"
EMQX = DEPLOY / "mqtt" / "emqx"
GUIDE = REPO / "docs" / "deployment.md"
# The server URLs carry passwords; the SecretStr settings are secrets by type.
SECRET_URLS = {"database_url", "database_read_url", "redis_url", "mqtt_url"}
TIMEOUT_S = 5.0  # stopping a broker
NEGATIVE_WAIT_S = 1.0


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _resources() -> list[dict[str, Any]]:
    """Every Kubernetes object of the base and the Secret template."""
    return [
        doc
        for path in sorted(KUBERNETES.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in _documents(path)
    ]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _resources() if doc["kind"] == kind}


def _pod_specs() -> dict[str, dict[str, Any]]:
    workloads = {**_by_kind("StatefulSet"), **_by_kind("Job")}
    return {name: doc["spec"]["template"]["spec"] for name, doc in workloads.items()}


def _secret_fields() -> set[str]:
    def is_secret(annotation: Any) -> bool:
        return annotation is SecretStr or SecretStr in typing.get_args(annotation)

    typed = {name for name, f in Settings.model_fields.items() if is_secret(f.annotation)}
    return typed | SECRET_URLS


def _env_name(field: str) -> str:
    return f"PARKING_{field.upper()}"


def test_every_yaml_file_parses_into_kubernetes_objects() -> None:
    files = _yaml_files()
    assert len(files) >= 8, files
    for path in files:
        documents = _documents(path)
        assert documents, path
        for doc in documents:
            assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: {doc}"
    kustomization = _documents(KUBERNETES / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
    assert "secret.template.yaml" not in kustomization["resources"]


def test_the_base_renders_with_kustomize() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    kinds = sorted(f"{doc['kind']}/{doc['metadata']['name']}" for doc in objects)
    assert kinds == [
        "ConfigMap/parking-settings",
        "Job/parking-migrate",
        "Namespace/parking",
        "PodDisruptionBudget/parking-api",
        "PodDisruptionBudget/parking-lanes",
        "PodDisruptionBudget/parking-worker",
        "PriorityClass/parking-deferred",
        "PriorityClass/parking-lanes",
        "Service/parking-api",
        "Service/parking-lanes",
        "Service/parking-worker",
        "StatefulSet/parking-api",
        "StatefulSet/parking-lanes",
        "StatefulSet/parking-worker",
    ]
    for doc in objects:
        if doc["kind"] not in ("Namespace", "PriorityClass"):  # cluster-scoped
            assert doc["metadata"]["namespace"] == "parking", doc["metadata"]
        if doc["kind"] in ("StatefulSet", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] == "registry.example.city/parking:0.1.0"


def test_selectors_probes_and_references_fit_together() -> None:
    deployments = _by_kind("StatefulSet")
    labels = {
        name: doc["spec"]["template"]["metadata"]["labels"] for name, doc in deployments.items()
    }
    for name, doc in deployments.items():
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels[name].items(), name
        assert doc["spec"]["serviceName"] in _by_kind("Service"), name
    for selecting in [*_by_kind("Service").values(), *_by_kind("PodDisruptionBudget").values()]:
        selector = selecting["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        matched = [name for name, pod in labels.items() if selector.items() <= pod.items()]
        assert len(matched) == 1, (selecting["metadata"]["name"], matched)

    assert deployments["parking-api"]["spec"]["replicas"] == 3
    assert deployments["parking-worker"]["spec"]["replicas"] == 2
    settings = _by_kind("ConfigMap")["parking-settings"]["data"]
    secrets = _by_kind("Secret")
    [api] = _pod_specs()["parking-api"]["containers"]
    health_paths = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    assert api["readinessProbe"]["httpGet"]["path"] in health_paths
    [port] = api["ports"]
    assert port["name"] == api["readinessProbe"]["httpGet"]["port"]
    assert str(port["containerPort"]) == settings["PARKING_API_PORT"]
    assert settings["PARKING_API_HOST"] == "0.0.0.0"
    service = _by_kind("Service")["parking-api"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]

    [lanes] = _pod_specs()["parking-lanes"]["containers"]
    assert {"name": "PARKING_MQTT_SHARED_GROUP", "value": "lanes"} in lanes["env"]
    for name, spec in _pod_specs().items():
        for container in spec["containers"]:
            assert container["resources"]["requests"].keys() == {"cpu", "memory"}, name
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in _by_kind("ConfigMap"), name
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, name
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in secrets, name


def _quantity(value: str | int) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores, bytes)."""
    text = str(value)
    for suffix, factor in (("m", 1e-3), ("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def test_lanes_come_first_on_a_node_short_of_cpu_or_memory() -> None:
    """The lanes' pods are placed before and evicted after the API's and the worker's (a higher
    priority class), and are Guaranteed: every container's requests equal its limits, so no
    other pod's burst (the public API under abuse) is given a lane's CPU. The others ask less
    CPU than a lane and may not preempt it."""
    classes = {name: doc for name, doc in _by_kind("PriorityClass").items()}
    specs = _pod_specs()
    lanes_class = classes[specs["parking-lanes"]["priorityClassName"]]
    for role in ("parking-api", "parking-worker"):
        other = classes[specs[role]["priorityClassName"]]
        assert lanes_class["value"] > other["value"], role
        assert other.get("preemptionPolicy") == "Never", role
        assert not other.get("globalDefault", False), role
    assert not lanes_class.get("globalDefault", False)
    for container in specs["parking-lanes"]["containers"]:
        resources = container["resources"]
        assert resources["limits"].keys() == resources["requests"].keys() == {"cpu", "memory"}
        for kind in ("cpu", "memory"):
            assert _quantity(resources["limits"][kind]) == _quantity(resources["requests"][kind])
        # Whole cores: the static CPU manager gives a Guaranteed pod cores of its own.
        assert _quantity(resources["requests"]["cpu"]).is_integer()
    [lane] = specs["parking-lanes"]["containers"]
    [api] = specs["parking-api"]["containers"]
    assert _quantity(api["resources"]["requests"]["cpu"]) < _quantity(
        lane["resources"]["requests"]["cpu"]
    )


def test_the_manifests_name_the_proxies_whose_forwarded_for_is_believed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind the ingress every client would share its address (the whole city 30 sign-in
    codes an hour): the API believes X-Forwarded-For from the ingress's network, and only
    from a private one (never from everyone)."""
    value = _by_kind("ConfigMap")["parking-settings"]["data"]["PARKING_TRUSTED_PROXIES"]
    monkeypatch.setenv("PARKING_TRUSTED_PROXIES", value)
    networks = [ipaddress.ip_network(n) for n in Settings(_env_file=None).trusted_proxies]  # type: ignore[call-arg]
    assert networks and all(network.is_private for network in networks), networks
    [api] = _pod_specs()["parking-api"]["containers"]
    assert {"configMapRef": {"name": "parking-settings"}} in api["envFrom"]


def test_every_parking_variable_named_in_deploy_and_the_guide_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    named: dict[str, set[Path]] = {}
    for path in [*sorted(p for p in DEPLOY.rglob("*") if p.is_file()), GUIDE]:
        for name in re.findall(r"PARKING_[A-Z0-9_]*[A-Z0-9]", path.read_text(encoding="utf-8")):
            named.setdefault(name, set()).add(path.relative_to(REPO))
    unknown = {
        name: sorted(map(str, paths))
        for name, paths in named.items()
        if name.removeprefix("PARKING_").lower() not in fields
    }
    assert not unknown, unknown
    assert len(named) >= 15, sorted(named)


def test_every_secret_setting_is_in_the_secret_template_and_none_in_the_configmap() -> None:
    template = _by_kind("Secret")["parking-secrets"]["stringData"]
    # The broker URL is per pod (parking-mqtt-<role>, test_every_replica_logs_in_as_itself).
    wanted = {_env_name(field) for field in _secret_fields() - {"mqtt_url"}}
    assert wanted <= template.keys(), wanted - template.keys()
    assert "PARKING_MQTT_URL" not in template
    for secret in _by_kind("Secret").values():
        assert all(value == "" for value in secret["stringData"].values()), "no values"
    configmap = _by_kind("ConfigMap")["parking-settings"]["data"]
    assert not wanted & configmap.keys()
    assert all(value != "" for value in configmap.values()), "unset means the default, not ''"


def test_every_command_in_the_manifests_is_a_parking_command() -> None:
    parser = build_parser()
    commands = {}
    for name, spec in _pod_specs().items():
        [container] = spec["containers"]
        assert "command" not in container, "the image's entrypoint is `parking`"
        commands[name] = parser.parse_args(container["args"])
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["parking"]' in dockerfile
    default = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert default is not None
    parser.parse_args(yaml.safe_load(default.group(1)))

    api = commands["parking-api"]
    assert (api.command, api.no_lanes, api.no_worker) == ("serve", True, True)
    assert commands["parking-lanes"].command == "lanes"
    assert commands["parking-worker"].command == "worker"
    assert commands["parking-migrate"].command == "migrate"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--no-such-option"])  # the parse can fail


# Each role's StatefulSet, by role as `parking gates provision` names its logins.
ROLE_WORKLOADS = {"lanes": "parking-lanes", "worker": "parking-worker", "api": "parking-api"}


def test_every_replica_logs_in_to_the_broker_as_itself() -> None:
    """The broker takes the client id from the username, so two processes under one login keep
    replacing each other: every pod reads a login of its own, named by its pod name, from its
    role's Secret, and the central ACL has that login with its role's rights."""
    assert set(ROLE_WORKLOADS) == set(provision.ROLES)
    assert not _by_kind("Deployment"), "a Deployment's surge pod would share a login"
    secrets = _by_kind("Secret")
    central = (MOSQUITTO / "central-acl").read_text(encoding="utf-8")
    for role, name in ROLE_WORKLOADS.items():
        workload = _by_kind("StatefulSet")[name]
        replicas = workload["spec"]["replicas"]
        spec = workload["spec"]["template"]["spec"]
        [container] = spec["containers"]
        env = [variable["name"] for variable in container["env"]]
        values = {variable["name"]: variable for variable in container["env"]}
        assert values["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        # Kubernetes expands $(POD_NAME) only from a variable defined before it.
        assert env.index("POD_NAME") < env.index("PARKING_MQTT_URL_FILE"), name
        assert "PARKING_MQTT_URL" not in env and "PARKING_MQTT_CLIENT_ID" not in env
        [mount] = container["volumeMounts"]
        assert mount["readOnly"] is True
        assert values["PARKING_MQTT_URL_FILE"]["value"] == f"{mount['mountPath']}/$(POD_NAME)"
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == f"parking-mqtt-{role}", "only its role's logins"
        assert volume["secret"]["defaultMode"] & 0o007 == 0, "not readable by others"
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"]
        logins = secrets[f"parking-mqtt-{role}"]["stringData"]
        assert set(logins) == {f"{name}-{ordinal}" for ordinal in range(replicas)}, name
        for number in range(1, replicas + 1):
            user = provision.instance_username(role, number)
            wanted = provision.acl_text([provision.Account(user, "-", None, role)], Topics(""))
            assert _user_block(central, user) == _user_block(wanted, user), user
            assert _user_block(central, user), user
    bridge = _user_block(central, "bridge-west")
    region_rule = re.compile(r"topic (read|write) parking/v1/lot-w\d/\+/\w+")
    assert bridge and all(region_rule.fullmatch(rule) for rule in bridge), bridge
    for listener in re.finditer(r"^#?listener .*(?:\n(?!#?listener).*)*", _central_conf(), re.M):
        assert re.search(r"^#?use_username_as_clientid true$", listener.group(0), re.M), listener
    assert re.search(rf"^max_packet_size {provision.MAX_PACKET_BYTES}$", _central_conf(), re.M)


def test_a_pod_reads_its_broker_login_from_its_own_file(tmp_path: Path) -> None:
    login = tmp_path / "parking-lanes-0"
    login.write_text("mqtt://lanes-1:secret@mqtt-central:1883\n", encoding="utf-8")
    settings = Settings(_env_file=None, mqtt_url_file=login)  # type: ignore[call-arg]
    assert settings.mqtt_url == "mqtt://lanes-1:secret@mqtt-central:1883"
    # A pod beyond the provisioned logins does not start (rather than share one).
    with pytest.raises(ValueError, match="no broker login of its own"):
        Settings(_env_file=None, mqtt_url_file=tmp_path / "parking-lanes-3")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="not both"):
        Settings(  # type: ignore[call-arg]
            _env_file=None, mqtt_url_file=login, mqtt_url="mqtt://lanes-2:x@mqtt-central:1883"
        )


def _central_conf() -> str:
    return (MOSQUITTO / "central.conf").read_text(encoding="utf-8")


def _user_block(acl: str, user: str) -> list[str]:
    """The `topic` lines of one user's block in a Mosquitto ACL."""
    lines: list[str] = []
    current = None
    for line in acl.splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            current = words[1]
        elif words[:1] == ["topic"] and current == user:
            lines.append(" ".join(words))
    return lines


@pytest.mark.slow
async def test_the_database_files_work_on_postgresql_15(
    settings: Settings, provider: ProviderEndpoint
) -> None:
    """deploy/postgresql/ on a PostgreSQL of the test's own: roles.sql, then the migrate Job's
    work as parking_owner and an API process as parking_svc, as the guide's startup order has
    them; then the settings files."""
    async with own_postgres() as server:
        psql = await asyncio.create_subprocess_exec(
            str(PG_BIN / "psql"),
            *("-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres", "-d", "postgres"),
            *("-v", "ON_ERROR_STOP=1", "-v", "owner_password=o", "-v", "svc_password=s"),
            *("-v", "replicator_password=r", "-f", str(DEPLOY / "postgresql" / "roles.sql")),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await psql.communicate()
        assert psql.returncode == 0, output.decode(errors="replace")
        base = f"127.0.0.1:{server.port}/parking"
        service_url = f"postgresql://parking_svc@{base}"
        endpoints = Endpoints(service_url, REDIS_URL, MQTT_URL)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with running(settings, endpoints, provider):
                pass  # before the migrations: the service may not create the schema itself

        owner = await asyncpg.connect(f"postgresql://parking_owner@{base}")
        try:
            assert len(await migrate(owner)) >= 11
        finally:
            await owner.close()

        async with (
            running(settings, endpoints, provider, lanes=False, outbox_worker=False) as runtime,
            runtime.pool.acquire() as conn,
        ):
            assert await conn.fetchval("SELECT current_user") == "parking_svc"
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CREATE TABLE not_allowed (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("UPDATE ledger_entries SET amount_fen = 0")

        # The primary's and the standbys' settings are settings PostgreSQL 15 knows, with
        # values it accepts (`postgres -C` reads the configuration and fails on either).
        conf = server.data / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as out:
            for name in ("primary.conf", "replica.conf"):
                out.write((DEPLOY / "postgresql" / name).read_text(encoding="utf-8"))
        shown = {}
        for setting in (
            "max_connections",
            "synchronous_standby_names",
            "hot_standby_feedback",
            "autovacuum_naptime",
        ):
            check = await asyncio.create_subprocess_exec(
                *server.as_postgres,
                *(str(PG_BIN / "postgres"), "-D", str(server.data), "-C", setting),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await check.communicate()
            assert check.returncode == 0, output.decode(errors="replace")
            shown[setting] = output.decode().strip()
        assert shown == {
            "max_connections": "300",
            "synchronous_standby_names": "ANY 1 (replica1, replica2)",
            "hot_standby_feedback": "on",
            "autovacuum_naptime": "10",  # seconds
        }


def test_the_redis_primary_and_replica_files_run_and_replicate() -> None:
    """deploy/redis/ with two real redis-servers on loopback ports of the test's own (lines
    added at the end override the address, the port and the primary's address)."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    primary_port, replica_port = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="deploy-redis-"))
    overrides = {
        # No 5 s wait for more replicas before the first sync.
        "redis.conf": f"bind 127.0.0.1\nport {primary_port}\nrepl-diskless-sync-delay 0\n",
        "replica.conf": (
            f"bind 127.0.0.1\nport {replica_port}\nreplicaof 127.0.0.1 {primary_port}\n"
        ),
    }
    processes = []
    try:
        for name, extra in overrides.items():
            conf = folder / name
            text = (DEPLOY / "redis" / name).read_text(encoding="utf-8")
            conf.write_text(f"{text}dir {folder}\n{extra}", encoding="utf-8")
            log = folder / f"{name}.log"
            with log.open("wb") as log_file:
                processes.append(
                    subprocess.Popen([executable, str(conf)], stdout=log_file, stderr=log_file)
                )
        primary = redis.Redis(port=primary_port, password="change-me", socket_timeout=TIMEOUT_S)
        replica = redis.Redis(port=replica_port, password="change-me", socket_timeout=TIMEOUT_S)
        deadline = time.monotonic() + 10.0
        while True:
            with contextlib.suppress(redis.ConnectionError):
                primary.set("deploy-check", "replicated")
                if replica.get("deploy-check") == b"replicated":
                    break
            assert time.monotonic() < deadline, [
                (folder / f"{name}.log").read_text(errors="replace") for name in overrides
            ]
            time.sleep(0.1)  # the replica's first sync
        assert primary.config_get("save") == {"save": ""}
        assert primary.config_get("appendonly") == {"appendonly": "no"}
        with pytest.raises(redis.ReadOnlyError):
            replica.set("deploy-check", "written on the replica")
        primary.close()
        replica.close()
    finally:
        for process in processes:
            stop_process(process)
        shutil.rmtree(folder, ignore_errors=True)


# EMQX


def _converter() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        "acl_from_mosquitto", EMQX / "acl_from_mosquitto.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_emqx_configuration_parses_and_sets_what_the_guide_relies_on() -> None:
    conf = ConfigFactory.parse_file(str(EMQX / "emqx.conf"))
    assert conf["mqtt"]["shared_subscription_strategy"] == "hash_topic"
    limit = re.fullmatch(r"(\d+)MB", conf["mqtt"]["max_packet_size"])
    assert limit is not None
    assert int(limit.group(1)) * 1024 * 1024 > Settings().max_capture_bytes
    assert conf["authorization"]["no_match"] == "deny"
    assert conf["authorization"]["deny_action"] == "ignore"
    [source] = conf["authorization"]["sources"]
    assert (source["type"], Path(source["path"]).name) == ("file", "acl.conf")
    [authn] = conf["authentication"]
    assert (authn["backend"], authn["user_id_type"]) == ("built_in_database", "username")
    assert conf["cluster"]["discovery_strategy"] == "dns"


def test_on_emqx_the_client_id_is_the_username_as_on_mosquitto() -> None:
    """Mosquitto's use_username_as_clientid, on EMQX: without it any login could disconnect a
    lane process or a gate by connecting under its client id. No listener or zone of the file
    may turn it back off."""
    conf = ConfigFactory.parse_file(str(EMQX / "emqx.conf"))
    assert conf["mqtt"]["use_username_as_clientid"] is True
    mosquitto = (MOSQUITTO / "central.conf").read_text(encoding="utf-8").splitlines()
    assert "use_username_as_clientid true" in mosquitto
    for name, zone in conf.get("zones", {}).items():
        assert zone.get("mqtt", {}).get("use_username_as_clientid", True) is True, name
    for kind, listeners in conf["listeners"].items():
        for name, listener in listeners.items():
            assert "zone" not in listener or listener["zone"] in conf.get("zones", {}), (kind, name)


def test_the_emqx_acl_is_the_provisioned_acl_rule_by_rule() -> None:
    converter = _converter()
    gates = [GateAddress("lot-1", "in1"), GateAddress("lot-1", "out1")]
    accounts = provision.plan_accounts(gates, {})
    mosquitto_acl = provision.acl_text(accounts, Topics(""))
    emqx_acl = converter.emqx_acl(converter.parse(mosquitto_acl))

    rule = re.compile(
        r'\{allow, \{username, "([^"]+)"\}, (publish|subscribe), \[("[^"]+"(?:, "[^"]+")*)\]\}\.'
    )
    granted: dict[tuple[str, str], list[str]] = {}
    lines = [line for line in emqx_acl.splitlines() if line and not line.startswith("%%")]
    assert lines[-1] == "{deny, all}."
    for line in lines[:-1]:
        match = rule.fullmatch(line)
        assert match is not None, line
        granted[(match.group(1), match.group(2))] = re.findall(r'"([^"]+)"', match.group(3))
    expected: dict[tuple[str, str], list[str]] = {}
    for account in accounts:
        block = _user_block(mosquitto_acl, account.username)
        for action, access in (("publish", "write"), ("subscribe", "read")):
            topics = [rule.split()[2] for rule in block if rule.split()[1] == access]
            if topics:  # workers and API processes only publish (commands)
                expected[(account.username, action)] = topics
    assert granted == expected
    assert {user for user, _ in granted} == {account.username for account in accounts}
    with pytest.raises(converter.AclError):
        converter.parse("user gate-a\npattern read parking/v1/%u/#\n")


# Bridged Mosquitto


@contextlib.contextmanager
def mosquitto(name: str, config: str, folder: Path) -> Iterator[None]:
    """A mosquitto of the test's own with `config`, stopped afterwards."""
    executable = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if executable is None:
        pytest.skip("mosquitto is not installed")
    port_line = re.search(r"^listener (\d+) 127\.0\.0\.1$", config, re.MULTILINE)
    assert port_line is not None
    conf = folder / f"{name}.conf"
    conf.write_text(config, encoding="utf-8")
    log = folder / f"{name}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [executable, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        _wait_for_listener(int(port_line.group(1)), process, log)
        yield
    finally:
        stop_process(process)
        print(f"--- {name} ---\n{log.read_text(errors='replace')[-3000:]}")


def _render(template: Path, port: int, **values: str) -> str:
    """The deploy file with its ${...} values filled (every one must be) and its listener on a
    loopback port of the test's own."""
    text = string.Template(template.read_text(encoding="utf-8")).substitute(values)
    rendered, count = re.subn(
        r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.MULTILINE
    )
    assert count == 1, template
    return rendered


def _broker_folder(root: Path, name: str, *, writable: bool) -> Path:
    """Started as root, mosquitto reads its files (and writes its data) as the mosquitto user."""
    folder = root / name
    folder.mkdir(mode=0o750)
    if os.geteuid() == 0:
        shutil.chown(folder, group="mosquitto")
        if writable:
            shutil.chown(folder, user="mosquitto")
    return folder


def _broker_file(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o640)
    if os.geteuid() == 0:
        shutil.chown(path, group="mosquitto")


def test_bridged_brokers_carry_captures_to_shared_lane_workers_and_commands_back() -> None:
    gate_w = GateAddress("lot-w1", "out1")  # a car park of region "west" (central-acl)
    gate_e = GateAddress("lot-e1", "out1")  # another region's, wrongly on this edge broker
    topics = Topics("")
    root = Path(tempfile.mkdtemp(prefix="deploy-bridge-"))
    root.chmod(0o711)
    try:
        central_port, edge_port = free_port(), free_port()
        central_conf, passwords = _central_files(root, central_port)
        edge = provision.provision(
            [gate_w, gate_e],
            root / "edge-config",
            broker_group="mosquitto" if os.geteuid() == 0 else None,
        )
        gate_passwords = {account.username: account.password for account in edge.accounts}
        edge_conf = _render(
            MOSQUITTO / "edge.conf",
            edge_port,
            CONFIG_DIR=str(root / "edge-config"),
            DATA_DIR=str(_broker_folder(root, "edge-data", writable=True)),
            CENTRAL_ADDRESS=f"127.0.0.1:{central_port}",
            BRIDGE_USER="bridge-west",
            BRIDGE_PASSWORD=passwords["bridge-west"],
        )
        central = Broker(central_port, passwords, topics)
        edge_broker = Broker(edge_port, gate_passwords, topics)
        with (
            mosquitto("central", central_conf, root),
            mosquitto("edge", edge_conf, root),
            logged_in(central, "lanes-1") as lane_1,
            logged_in(central, "lanes-2") as lane_2,
            logged_in(edge_broker, provision.gate_username(gate_w)) as gate,
            logged_in(edge_broker, provision.gate_username(gate_e)) as misplaced_gate,
        ):
            lanes = (lane_1, lane_2)
            for lane in lanes:
                lane.subscribe(f"$share/lanes/{topics.all_gates('capture')}")
            gate.subscribe(topics.topic(gate_w, "command"))
            capture_topic = topics.topic(gate_w, "capture")

            # Until the bridge is up: the first capture that reaches a lane worker.
            deadline = time.monotonic() + 20.0
            while not any(_received(lane, capture_topic) for lane in lanes):
                assert time.monotonic() < deadline, "no capture came through the bridge"
                gate.publish(capture_topic, b"probe")
                for lane in lanes:
                    lane.gets_any(lambda m: m.topic == capture_topic, 0.5)

            sent = [f"capture-{n}".encode() for n in range(6)]
            misplaced_gate.publish(topics.topic(gate_e, "capture"), b"forged-region")
            for payload in sent:
                gate.publish(capture_topic, payload)
            delivered = _delivered(lanes, capture_topic, sent)
            assert sorted(delivered) == sorted(sent), "each capture to exactly one worker"
            time.sleep(NEGATIVE_WAIT_S)  # a forged or duplicate delivery would have come by now
            assert sorted(_delivered(lanes, capture_topic, sent)) == sorted(sent)
            assert all(any(m.payload in sent for m in lane.received) for lane in lanes)
            assert not any(m.payload == b"forged-region" for lane in lanes for m in lane.received)

            command = b'{"action": "open"}'
            lane_1.publish(topics.topic(gate_w, "command"), command)
            assert gate.gets(topics.topic(gate_w, "command"), command)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _central_files(root: Path, port: int) -> tuple[str, dict[str, str]]:
    """The central broker's deploy files in `root`, a password for every user of its ACL:
    the rendered central.conf and the passwords."""
    acl = (MOSQUITTO / "central-acl").read_text(encoding="utf-8")
    users = re.findall(r"^user (\S+)$", acl, re.MULTILINE)
    passwords = {user: uuid.uuid4().hex for user in users}
    config = _broker_folder(root, "central-config", writable=False)
    _broker_file(
        config / "password_file",
        provision.password_file_text(
            [provision.Account(user, password, None) for user, password in passwords.items()]
        ),
    )
    _broker_file(config / "acl_file", acl)
    conf = _render(
        MOSQUITTO / "central.conf",
        port,
        CONFIG_DIR=str(config),
        DATA_DIR=str(_broker_folder(root, "central-data", writable=True)),
    )
    return conf, passwords


@contextlib.contextmanager
def central_broker() -> Iterator[Broker]:
    """The central broker as deployed (central.conf, central-acl) on a port of the test's own."""
    root = Path(tempfile.mkdtemp(prefix="deploy-central-"))
    root.chmod(0o711)
    try:
        port = free_port()
        conf, passwords = _central_files(root, port)
        with mosquitto("central", conf, root):
            yield Broker(port, passwords, Topics(""))
    finally:
        shutil.rmtree(root, ignore_errors=True)


GATE_W = GateAddress("lot-w1", "out1")


def test_on_the_central_broker_each_process_kind_has_only_its_own_rights() -> None:
    """The API and the charge workers may send commands and nothing else: no gate config (the
    offline whitelist), no ack, no captures read; a lane process cannot forge a capture; an
    edge bridge cannot send commands to its own region's gates."""
    with (
        central_broker() as broker,
        logged_in(broker, "lanes-1") as lanes,
        logged_in(broker, "api-1") as api,
        logged_in(broker, "worker-1") as worker,
        logged_in(broker, "bridge-west") as bridge,
    ):
        lanes.subscribe(broker.topics.all_gates("capture"))
        bridge.subscribe(broker.topic(GATE_W, "command"))
        bridge.subscribe(broker.topic(GATE_W, "config"))
        bridge.subscribe(broker.topic(GATE_W, "ack"))
        for reader in (api, worker):
            reader.subscribe(broker.topics.all_gates("capture"))
        api.publish(broker.topic(GATE_W, "config"), b"forged", retain=True)
        api.publish(broker.topic(GATE_W, "ack"), b"forged")
        worker.publish(broker.topic(GATE_W, "config"), b"forged", retain=True)
        lanes.publish(broker.topic(GATE_W, "capture"), b"forged")
        bridge.publish(broker.topic(GATE_W, "command"), b"forged")
        api.publish(broker.topic(GATE_W, "command"), b"from-api")
        worker.publish(broker.topic(GATE_W, "command"), b"from-worker")
        bridge.publish(broker.topic(GATE_W, "capture"), b"genuine")
        assert bridge.gets(broker.topic(GATE_W, "command"), b"from-api")
        assert bridge.gets(broker.topic(GATE_W, "command"), b"from-worker")
        assert lanes.gets(broker.topic(GATE_W, "capture"), b"genuine")
        # The allowed messages came after the forged ones, over the same connections.
        assert not bridge.gets_any(forged, NEGATIVE_WAIT_S)
        assert not lanes.gets_any(forged, 0)
        assert not api.gets_any(lambda m: True, 0)
        assert not worker.gets_any(lambda m: True, 0)


def test_on_the_central_broker_no_login_can_take_another_clients_id() -> None:
    """Every server process used to share the `lanes` login and pick its own client id: any of
    them, or any holder of that password, could knock a lane process or a region's bridge off
    by connecting under its id. The client id is now the username."""
    with (
        central_broker() as broker,
        logged_in(broker, "lanes-1", client_id="lanes-1") as victim,
        logged_in(broker, "bridge-west", client_id="bridge-west") as bridge,
    ):
        victim.subscribe(broker.topics.all_gates("capture"))
        bridge.subscribe(broker.topic(GATE_W, "command"))
        for impostor, taken in (("api-1", "lanes-1"), ("lanes-2", "bridge-west")):
            with logged_in(broker, impostor, client_id=taken) as intruder:
                intruder.publish(broker.topic(GATE_W, "command"), b"from-" + impostor.encode())
                assert bridge.gets(broker.topic(GATE_W, "command"), b"from-" + impostor.encode())
        bridge.publish(broker.topic(GATE_W, "capture"), b"still-there")
        assert victim.gets(broker.topic(GATE_W, "capture"), b"still-there")
        assert victim.disconnects == bridge.disconnects == 0


def test_the_central_broker_refuses_an_oversized_packet() -> None:
    with (
        central_broker() as broker,
        logged_in(broker, "lanes-1") as lanes,
        logged_in(broker, "bridge-west") as big,
        logged_in(broker, "lanes-2") as other,
    ):
        lanes.subscribe(broker.topics.all_gates("capture"))
        big._paho.publish(broker.topic(GATE_W, "capture"), b"x" * (2 * 1024 * 1024), qos=1)
        assert big._wait(lambda: big.disconnects > 0, TIMEOUT_S)
        assert other.disconnects == 0
        with logged_in(broker, "bridge-west") as bridge:
            bridge.publish(broker.topic(GATE_W, "capture"), b"small")
            assert lanes.gets(broker.topic(GATE_W, "capture"), b"small")
        assert not lanes.gets_any(lambda m: len(m.payload) > 1024 * 1024, 0)


@contextlib.contextmanager
def edge_broker(gates: list[GateAddress]) -> Iterator[Broker]:
    """edge.conf as an edge host renders it, with the gates' provisioned logins; its bridge
    points at a central broker that is not there (the gates' side is what is tried)."""
    root = Path(tempfile.mkdtemp(prefix="deploy-edge-"))
    root.chmod(0o711)
    try:
        port = free_port()
        _, passwords = _central_files(root, free_port())
        edge = provision.provision(
            gates,
            root / "edge-config",
            broker_group="mosquitto" if os.geteuid() == 0 else None,
        )
        conf = _render(
            MOSQUITTO / "edge.conf",
            port,
            CONFIG_DIR=str(root / "edge-config"),
            DATA_DIR=str(_broker_folder(root, "edge-data", writable=True)),
            CENTRAL_ADDRESS=f"127.0.0.1:{free_port()}",
            BRIDGE_USER="bridge-west",
            BRIDGE_PASSWORD=passwords["bridge-west"],
        )
        with mosquitto("edge", conf, root):
            yield Broker(port, {a.username: a.password for a in edge.accounts}, Topics(""))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_on_the_edge_broker_no_gate_can_take_another_gates_client_id() -> None:
    """The gates log in at the edge broker with ids anyone can guess (gate-<lot>-<gate>): one
    gate's login could knock another gate off by connecting under its id."""
    gate_in = GateAddress("lot-w1", "in1")
    with edge_broker([GATE_W, gate_in]) as broker:
        victim_id = provision.gate_username(gate_in)
        with logged_in(broker, victim_id, client_id=victim_id) as victim:
            with logged_in(broker, provision.gate_username(GATE_W), client_id=victim_id):
                time.sleep(NEGATIVE_WAIT_S)  # a takeover disconnects at once
            assert victim.disconnects == 0, "one gate's login knocked another off"


def test_the_edge_broker_refuses_an_oversized_packet() -> None:
    with edge_broker([GATE_W]) as broker, logged_in(broker, provision.gate_username(GATE_W)) as big:
        big._paho.publish(broker.topic(GATE_W, "capture"), b"x" * (2 * 1024 * 1024), qos=1)
        assert big._wait(lambda: big.disconnects > 0, TIMEOUT_S)


def _delivered(lanes: tuple[Client, ...], topic: str, payloads: list[bytes]) -> list[bytes]:
    """The payloads among `payloads` the lane workers got, once each has come or time is up."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        delivered = [
            m.payload
            for lane in lanes
            for m in list(lane.received)
            if m.topic == topic and m.payload in payloads
        ]
        if set(delivered) >= set(payloads) or time.monotonic() > deadline:
            return delivered
        time.sleep(0.05)  # polling what the clients' network threads received


def _received(client: Client, topic: str) -> bool:
    return any(message.topic == topic for message in client.received)
