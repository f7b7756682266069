"""The deployment files: manifests valid against the Kubernetes schemas, both variants (embedded
and PostgreSQL) wired as the server reads its settings, pods locked down, image non-root.

Offline: no cluster. The probes' shell commands run here against a real gRPC health server."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.cli import build_parser
from service.config import server_settings
from service.db.settings import DATABASE_PASSWORD_ENV, DatabaseSettings, connection_kwargs
from service.privacy.keyring import KEK_ENV
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
EMBEDDED = K8S / "embedded"  # kubectl apply -f deploy/k8s/embedded/
POSTGRES = K8S / "postgres"  # kubectl apply -f deploy/k8s/postgres/
SETUP = K8S / "postgres-setup"  # the Secret template and the one-off import Job
MONITORING = K8S / "monitoring"  # the Prometheus Operator's ServiceMonitor, for either variant
KUBERNETES_VERSION = "1.31"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
WORKLOADS = ("StatefulSet", "Deployment", "Job")
SETTINGS = {item.env: item for item in server_settings()}
# Variables the server reads without a flag: secrets must never be a flag's value.
SECRET_VARIABLES = {DATABASE_PASSWORD_ENV, KEK_ENV}
# Each variant: its directory and its one workload.
VARIANTS = [(EMBEDDED, "StatefulSet"), (POSTGRES, "Deployment")]
PROBE_CERT_FILES = {"ca.pem", "client-probe.pem", "client-probe.key"}  # --cert-name probe
METRICS_PORT = 9464

Object = dict[str, Any]


def documents(path: Path) -> list[Object]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects(directory: Path) -> list[Object]:
    """What `kubectl apply -f DIRECTORY/` applies: its YAML files, not its subdirectories."""
    return [d for path in sorted(directory.glob("*.yaml")) for d in documents(path)]


def one(found: list[Object], kind: str) -> Object:
    (match,) = [d for d in found if d["kind"] == kind]
    return match


def pod_of(workload: Object) -> Object:
    pod: Object = workload["spec"]["template"]["spec"]
    return pod


def all_containers(pod: Object) -> list[Object]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: Object) -> dict[str, Object]:
    return {item["name"]: item for item in container.get("env", [])}


def server_container(workload: Object) -> Object:
    (container,) = pod_of(workload)["containers"]
    assert isinstance(container, dict)
    return container


def named_port(container: Object, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    assert isinstance(port, int)
    return port


def grpc_port(container: Object) -> int:
    return named_port(container, "grpc")


def service_ports(service: Object) -> dict[str, Object]:
    return {port["name"]: port for port in service["spec"]["ports"]}


def ingress_ports(policy: Object) -> list[tuple[list[int], list[Object]]]:
    """Each ingress rule of a NetworkPolicy as (its ports, its sources)."""
    return [
        ([p["port"] for p in rule["ports"]], rule["from"]) for rule in policy["spec"]["ingress"]
    ]


def flag_value(container: Object, flag: str) -> str:
    (value,) = [a.partition("=")[2] for a in container["args"] if a.partition("=")[0] == flag]
    assert isinstance(value, str)
    return value


def image_data_dir() -> PurePosixPath:
    """The data directory the image sets (PRIVSCORE_DATA_DIR); the manifests do not change it."""
    match = re.search(r"PRIVSCORE_DATA_DIR=(\S+)", (DEPLOY / "Dockerfile").read_text())
    assert match
    return PurePosixPath(match.group(1))


def mount_of(container: Object, path: PurePosixPath) -> Object:
    """The volume mount holding `path` (the deepest one)."""
    holding = [
        m for m in container["volumeMounts"] if path.is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert holding, f"{path} is on no volume of {container['name']}"
    return max(holding, key=lambda m: len(m["mountPath"]))


def volume_of(pod: Object, mount: Object) -> Object:
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert isinstance(volume, dict)
    return volume


def secret_template() -> Object:
    return one(objects(SETUP), "Secret")


def all_workloads() -> list[Object]:
    return [d for path in MANIFESTS for d in documents(path) if d["kind"] in WORKLOADS]


# -- every manifest -------------------------------------------------------------------------


# Custom resources kubernetes-validate has no schema for (it raises SchemaNotFoundError): the
# fields privscore uses of each, as their CustomResourceDefinition names them. A field not
# listed here fails, as --strict fails a misspelt one; a listed type that does not match fails.
Shape = dict[str, "Shape"] | list["Shape"] | type | tuple[type, ...]
DURATION = re.compile(r"^(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?$")  # Prometheus', whole seconds
LABEL_SELECTOR: Shape = {"matchLabels": dict, "matchExpressions": list}
SERVICE_MONITOR: Shape = {  # monitoring.coreos.com/v1 ServiceMonitor, the fields we use and kin
    "selector": LABEL_SELECTOR,
    "namespaceSelector": {"any": bool, "matchNames": list},
    "jobLabel": str,
    "targetLabels": list,
    "podTargetLabels": list,
    "sampleLimit": int,
    "endpoints": [
        {
            "port": str,
            "targetPort": (int, str),
            "path": str,
            "scheme": str,
            "interval": str,
            "scrapeTimeout": str,
            "honorLabels": bool,
            "honorTimestamps": bool,
            "relabelings": list,
            "metricRelabelings": list,
            "params": dict,
        }
    ],
}
CUSTOM_RESOURCES: dict[tuple[str, str], Shape] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}


def check_shape(value: Any, shape: Shape, where: str) -> None:
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{where} is not an object"
        unknown = value.keys() - shape.keys()
        assert not unknown, f"{where}: unknown fields {sorted(unknown)}"
        for key, item in value.items():
            check_shape(item, shape[key], f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{where} is not a list"
        for index, item in enumerate(value):
            check_shape(item, shape[0], f"{where}[{index}]")
    else:
        assert isinstance(value, shape), f"{where} is not {shape}"


def duration_seconds(text: str) -> int:
    match = DURATION.match(text)
    assert match and text, f"{text!r} is not a duration in whole seconds"
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def validate_custom_resource(document: Object) -> None:
    """Its metadata against the Kubernetes ObjectMeta schema (carried by a ConfigMap), its spec
    against the shape above."""
    shape = CUSTOM_RESOURCES[(document["apiVersion"], document["kind"])]
    assert document.keys() == {"apiVersion", "kind", "metadata", "spec"}
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document["metadata"]}
    kubernetes_validate.validate(carrier, KUBERNETES_VERSION, strict=True)
    check_shape(document["spec"], shape, document["kind"])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    found = documents(path)
    assert found
    for document in found:
        if (document["apiVersion"], document["kind"]) in CUSTOM_RESOURCES:
            validate_custom_resource(document)
        else:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_custom_resource_check_catches_a_misspelt_field() -> None:
    (monitor,) = documents(MONITORING / "servicemonitor.yaml")
    (endpoint,) = monitor["spec"]["endpoints"]
    misspelt = {
        **monitor,
        "spec": {**monitor["spec"], "endpoints": [{**endpoint, "intervall": "1m"}]},
    }
    with pytest.raises(AssertionError, match="intervall"):
        validate_custom_resource(misspelt)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("workload", all_workloads(), ids=lambda w: w["kind"])
def test_every_pod_runs_locked_down(workload: Object) -> None:
    pod = pod_of(workload)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    for container in all_containers(pod):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert not context.get("privileged")
        assert "--insecure" not in container.get("args", [])
        assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
        assert "memory" in container["resources"]["limits"]
        for mount in container.get("volumeMounts", []):
            assert mount["name"] not in secret_volumes or mount["readOnly"] is True


@pytest.mark.parametrize("workload", all_workloads(), ids=lambda w: w["kind"])
def test_every_command_and_variable_is_one_the_server_declares(workload: Object) -> None:
    """Each container runs a real privscore command; `serve` gets only declared flags; every
    PRIVSCORE_* variable is a declared setting's (or a secret's without a flag) and its value
    parses as the server parses it."""
    parser = build_parser()
    flags = {item.flag for item in SETTINGS.values()}
    for container in all_containers(pod_of(workload)):
        args = container["args"]
        assert "command" not in container  # the image's entry point: privscore
        parser.parse_args(args)  # argparse exits on an unknown command or flag
        if args[0] == "serve":
            assert {a.partition("=")[0] for a in args[1:]} <= flags
        for name, item in env_of(container).items():
            if not name.startswith("PRIVSCORE_"):
                continue
            assert name in SETTINGS or name in SECRET_VARIABLES, f"{name} is no setting"
            if "value" in item and name in SETTINGS:
                SETTINGS[name].parse(SETTINGS[name].flag, item["value"], {})
        workers = env_of(container).get("PRIVSCORE_WORKERS", {}).get("value", "1")
        if int(workers) > 1:  # more than one worker needs the database, as the server checks
            assert "PRIVSCORE_DATABASE_URL" in env_of(container)


@pytest.mark.parametrize("workload", all_workloads(), ids=lambda w: w["kind"])
def test_secrets_come_from_secrets_and_never_from_arguments(workload: Object) -> None:
    """The database URL from a secretKeyRef, the password from a mounted Secret's file (or a
    secretKeyRef), the KEK from a Secret; none of them in arguments, which `ps` shows."""
    pod = pod_of(workload)
    template = secret_template()
    for container in all_containers(pod):
        words = [*container.get("command", []), *container["args"]]
        for word in words:
            assert not word.startswith(("--database-url", "--database-password", "--kek")), word
            assert "postgres://" not in word and "postgresql://" not in word
        env = env_of(container)
        for item in env.values():
            assert "://" not in item.get("value", "")
        for name in ("PRIVSCORE_DATABASE_URL", DATABASE_PASSWORD_ENV, KEK_ENV):
            if name in env:
                assert "value" not in env[name]
                ref = env[name]["valueFrom"]["secretKeyRef"]
                if ref["name"] == template["metadata"]["name"]:
                    assert ref["key"] in template["stringData"]
        if "PRIVSCORE_DATABASE_URL" not in env:
            continue
        if DATABASE_PASSWORD_ENV in env:
            continue
        password = PurePosixPath(env["PRIVSCORE_DATABASE_PASSWORD_FILE"]["value"])
        mount = mount_of(container, password)
        volume = volume_of(pod, mount)
        assert mount["readOnly"] is True
        assert volume["secret"]["secretName"] == template["metadata"]["name"]
        assert str(password.relative_to(mount["mountPath"])) in template["stringData"]
        assert volume["secret"]["defaultMode"] & 0o007 == 0  # not for every user of the pod


# -- the two variants -----------------------------------------------------------------------


@pytest.mark.parametrize(("directory", "kind"), VARIANTS, ids=lambda v: getattr(v, "name", v))
def test_each_variant_is_one_workload_behind_its_service(directory: Path, kind: str) -> None:
    found = objects(directory)
    assert [d["kind"] for d in found if d["kind"] in WORKLOADS] == [kind]
    assert not [d for d in found if d["kind"] == "Secret"]  # templates live in postgres-setup
    workload = one(found, kind)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = one(found, "Service")
    assert service["spec"]["selector"] == selector
    container = server_container(workload)
    ports = service_ports(service)
    assert ports.keys() == {"grpc", "metrics"}
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"]["port"] == grpc_port(container)
    policy = one(found, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    callers = [
        sources for opened, sources in ingress_ports(policy) if grpc_port(container) in opened
    ]
    assert callers == [[{"podSelector": {"matchLabels": {"privscore.dev/caller": "true"}}}]]


# -- metrics: a port of their own, for the scraper only ----------------------------------------


@pytest.mark.parametrize(("directory", "kind"), VARIANTS, ids=lambda v: getattr(v, "name", v))
def test_each_variant_serves_metrics_on_a_named_port_for_the_scraper_only(
    directory: Path, kind: str
) -> None:
    """`--metrics-port` on every interface of the pod, a `metrics` container port and the same
    in the prometheus.io annotations and the Service; the NetworkPolicy opens that port to the
    scraper alone, and the callers' rule does not include it."""
    found = objects(directory)
    workload = one(found, kind)
    container = server_container(workload)
    port = named_port(container, "metrics")
    assert port == METRICS_PORT == int(flag_value(container, "--metrics-port"))
    assert port != grpc_port(container)
    # Each flag parses as the server's setting (--metrics-bind: an IP literal, 0.0.0.0 so the
    # scraper reaches it from outside the pod; the default is loopback).
    for flag in ("--metrics-port", "--metrics-bind"):
        (item,) = [s for s in SETTINGS.values() if s.flag == flag]
        assert item.parse(flag, flag_value(container, flag), {}) is not None
    assert flag_value(container, "--metrics-bind") == "0.0.0.0"
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    service_port = service_ports(one(found, "Service"))["metrics"]
    assert service_port["targetPort"] == "metrics" and service_port["port"] == port
    assert service_port.get("appProtocol") == "http"  # plain HTTP: no TLS on this port
    policy = one(found, "NetworkPolicy")
    rules = ingress_ports(policy)
    assert all(port not in opened or opened == [port] for opened, _ in rules)  # alone in its rule
    (scraper,) = [sources for opened, sources in rules if opened == [port]]
    assert scraper == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    assert sorted(p for opened, _ in rules for p in opened) == sorted([grpc_port(container), port])


def test_the_service_monitor_scrapes_the_metrics_port_of_either_variant() -> None:
    """Applied on its own (the operator's CRD may be absent, so it is in neither variant's
    directory); it selects the Service of whichever variant runs, by the port's name."""
    found = objects(MONITORING)
    assert [d["kind"] for d in found] == ["ServiceMonitor"]
    (monitor,) = found
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert "namespaceSelector" not in spec  # its own namespace: the one the variant runs in
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["scheme"] == "http"
    for directory, kind in VARIANTS:
        service = one(objects(directory), "Service")
        assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert "metrics" in service_ports(service)
        annotations = one(objects(directory), kind)["spec"]["template"]["metadata"]["annotations"]
        assert endpoint["path"] == annotations["prometheus.io/path"]
    seconds = {key: duration_seconds(endpoint[key]) for key in ("interval", "scrapeTimeout")}
    assert seconds["scrapeTimeout"] < seconds["interval"]
    # Scrapes that span many decisions (service/monitoring/drift.py: the drift report's
    # counts between two scrapes are the decisions made between them).
    assert seconds["interval"] >= 60


def test_the_embedded_statefulset_stays_one_replica_probed_over_tls() -> None:
    found = objects(EMBEDDED)
    statefulset = one(found, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1  # one writer of the store and the audit log
    assert not [d for d in found if d["kind"] in ("HorizontalPodAutoscaler", "Deployment")]
    assert not [
        d
        for d in (d for path in MANIFESTS for d in documents(path))
        if d["kind"] == "HorizontalPodAutoscaler"
        and d["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    ]
    container = server_container(statefulset)
    assert container["readinessProbe"]["exec"]["command"][:2] == ["privscore", "health"]
    assert "PRIVSCORE_DATABASE_URL" not in env_of(container)
    assert one(found, "NetworkPolicy")["spec"]["egress"] == []  # it reaches nothing


def test_the_postgres_deployment_runs_replicas_and_rolls_without_a_gap() -> None:
    deployment = one(objects(POSTGRES), "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1
    pod = pod_of(deployment)
    grace = pod["terminationGracePeriodSeconds"]
    server_grace = next(
        float(a.partition("=")[2])
        for a in server_container(deployment)["args"]
        if a.startswith("--grace-seconds=")
    )
    assert server_grace + 5 < grace  # the preStop pause and the drain fit before SIGKILL


def test_the_disruption_budget_covers_the_deployment_pods_and_lets_one_go() -> None:
    found = objects(POSTGRES)
    deployment = one(found, "Deployment")
    budget = one(found, "PodDisruptionBudget")
    minimum = one(found, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert (
        budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )
    spec = budget["spec"]
    if "maxUnavailable" in spec:
        assert 1 <= spec["maxUnavailable"] < minimum
    else:
        assert 1 <= spec["minAvailable"] < minimum  # a drain can still move one replica


def test_the_autoscaler_scales_the_deployment_on_cpu_from_two() -> None:
    found = objects(POSTGRES)
    deployment = one(found, "Deployment")
    autoscaler = one(found, "HorizontalPodAutoscaler")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    low, high = autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]
    assert 2 <= low <= deployment["spec"]["replicas"] <= high
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    for container in pod_of(deployment)["containers"]:  # utilisation is of the CPU request
        assert container["resources"]["requests"]["cpu"]


def test_the_postgres_pods_share_keys_origin_and_the_database_and_keep_no_state() -> None:
    deployment = one(objects(POSTGRES), "Deployment")
    statefulset = one(objects(EMBEDDED), "StatefulSet")
    pod = pod_of(deployment)
    container = server_container(deployment)
    env = env_of(container)
    # One origin for every replica: a literal value, not one taken from each pod.
    origin = env["PRIVSCORE_AUDIT_ORIGIN"]
    assert set(origin) == {"name", "value"}
    # The keyring and KEK from the same Secrets as the embedded variant, read-only.
    keyring = PurePosixPath(
        next(a.partition("=")[2] for a in container["args"] if a.startswith("--keyring="))
    )
    keyring_volume = volume_of(pod, mount_of(container, keyring))
    assert mount_of(container, keyring)["readOnly"] is True
    embedded_pod = pod_of(statefulset)
    embedded_server = server_container(statefulset)
    assert keyring_volume == volume_of(embedded_pod, mount_of(embedded_server, keyring))
    assert env[KEK_ENV] == env_of(embedded_server)[KEK_ENV]
    # The data directory holds only local files: the store and the log are in the database.
    assert "emptyDir" in volume_of(pod, mount_of(container, image_data_dir()))
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert "volumeClaimTemplates" not in deployment["spec"]
    # Migrations run before the server, against the same database.
    (migrate,) = pod["initContainers"]
    assert migrate["args"] == ["db", "migrate"]
    assert env_of(migrate)["PRIVSCORE_DATABASE_URL"] == env["PRIVSCORE_DATABASE_URL"]
    assert migrate["image"] == container["image"]


def test_the_postgres_network_policy_reaches_the_database_and_dns_only() -> None:
    egress = one(objects(POSTGRES), "NetworkPolicy")["spec"]["egress"]
    allowed = {(p["port"], p["protocol"]) for rule in egress for p in rule["ports"]}
    assert allowed == {(5432, "TCP"), (53, "UDP"), (53, "TCP")}
    assert all(rule["ports"] for rule in egress)  # no rule opens every port


def test_the_secret_template_holds_placeholders_and_a_url_the_server_accepts() -> None:
    template = secret_template()
    assert "data" not in template  # stringData only: readable placeholders
    assert all("REPLACE_ME" in value for value in template["stringData"].values())
    url = template["stringData"]["url"]
    kwargs = connection_kwargs(DatabaseSettings(database_url=url), environ={})
    assert kwargs is not None and kwargs.password is None  # the password has its own key
    assert kwargs["sslmode"] == "verify-full"
    # The CA it names is the template's ca.crt where the deployment mounts the Secret.
    deployment = one(objects(POSTGRES), "Deployment")
    container = server_container(deployment)
    root_cert = PurePosixPath(kwargs["sslrootcert"])
    mount = mount_of(container, root_cert)
    assert volume_of(pod_of(deployment), mount)["secret"]["secretName"] == "privscore-database"
    assert str(root_cert.relative_to(mount["mountPath"])) in template["stringData"]


def test_the_import_job_moves_the_embedded_volume_with_the_readme_checks() -> None:
    job = one(objects(SETUP), "Job")
    statefulset = one(objects(EMBEDDED), "StatefulSet")
    service = one(objects(POSTGRES), "Service")
    pod = pod_of(job)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    name = statefulset["metadata"]["name"]
    (data,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert data["persistentVolumeClaim"]["claimName"] == f"{claim['metadata']['name']}-{name}-0"
    # Not selected by the Service: calls must never reach this pod.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= labels.items()
    steps = [c["args"] for c in all_containers(pod)]
    assert steps == [
        ["audit", "verify"],
        ["store", "verify"],
        ["db", "migrate"],
        ["db", "import"],
        ["audit", "verify"],
    ]
    *before, last = all_containers(pod)
    assert "PRIVSCORE_DATABASE_URL" not in env_of(before[0])  # the file log
    assert "PRIVSCORE_DATABASE_URL" in env_of(last)  # the database log
    for container in before[:2] + before[3:] + [last]:  # every step that needs the keyring
        keyring = PurePosixPath(env_of(container)["PRIVSCORE_KEYRING"]["value"])
        mount = mount_of(container, keyring)
        assert volume_of(pod, mount) == volume_of(
            pod_of(statefulset), mount_of(server_container(statefulset), keyring)
        )
        assert env_of(container)[KEK_ENV] == env_of(server_container(statefulset))[KEK_ENV]
        assert "persistentVolumeClaim" in volume_of(pod, mount_of(container, image_data_dir()))


# -- probes: gRPC health over mutual TLS, run here against a real health server --------------


@pytest.mark.parametrize(("directory", "kind"), VARIANTS, ids=lambda v: getattr(v, "name", v))
def test_probes_ask_grpc_health_of_the_whole_server_on_its_port(directory: Path, kind: str) -> None:
    """Native gRPC probes speak no TLS and the server has one port, TLS only: each probe runs
    `privscore health` on the serving port with the role-less probe certificate."""
    workload = one(objects(directory), kind)
    container = server_container(workload)
    probes = [
        container[p] for p in ("readinessProbe", "livenessProbe", "startupProbe") if p in container
    ]
    assert {"readinessProbe", "livenessProbe"} <= container.keys()
    for probe in probes:
        calls = health_calls(probe["exec"]["command"])
        assert calls
        for call in calls:
            args = build_parser().parse_args(call)
            assert args.command == "health"
            assert args.target == f"127.0.0.1:{grpc_port(container)}"
            assert args.service == ""  # the whole server's status
            assert args.cert_name == "probe"
            assert not args.insecure
    # The probe certificate where `--cert-name probe` looks: DATA_DIR/certs.
    certs = image_data_dir() / "certs"
    mount = mount_of(container, certs / "ca.pem")
    assert PurePosixPath(mount["mountPath"]) == certs and mount["readOnly"] is True
    items = volume_of(pod_of(workload), mount)["secret"]["items"]
    assert {item["path"] for item in items} == PROBE_CERT_FILES
    if kind == "Deployment":
        assert "startupProbe" in container


def health_calls(command: list[str]) -> list[list[str]]:
    """The `privscore ...` argument lists a probe command runs, directly or in `sh -c`."""
    if command[0] == "privscore":
        return [command[1:]]
    assert command[:2] == ["sh", "-c"]
    words = shlex.split(command[2])
    calls: list[list[str]] = []
    current: list[str] | None = None
    for word in [*words, "|"]:
        if word in ("|", "&&", "||", ";"):
            if current is not None:
                calls.append(current)
            current = None
        elif current is None and word == "privscore":
            current = []
        elif current is not None:
            current.append(word)
    return calls


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[health.HealthServicer, str]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def probe_passes(command: list[str], target: str, workdir: Path) -> bool:
    """Run a probe's command as the kubelet would, with `privscore` on PATH pointed at `target`
    in plaintext: the real `privscore health` and the real shell pipeline, without the TLS."""
    real = Path(sys.executable).parent / "privscore"
    shim = workdir / "bin" / "privscore"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(
        f'#!/bin/sh\n[ "$1" = health ] || exit 99\n'
        f"exec {shlex.quote(str(real))} health --target {target} --insecure\n"
    )
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, timeout=60)
    assert done.returncode != 99
    return done.returncode == 0


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_readiness_follows_serving_and_liveness_survives_a_database_outage(
    health_server: tuple[health.HealthServicer, str], tmp_path: Path
) -> None:
    """SERVING: ready and alive. NOT_SERVING (the database down): out of the Service but not
    restarted, so every replica resumes by itself. No answer: restarted."""
    servicer, target = health_server
    container = server_container(one(objects(POSTGRES), "Deployment"))
    commands = {
        name: container[name]["exec"]["command"]
        for name in ("readinessProbe", "livenessProbe", "startupProbe")
    }
    status = health_pb2.HealthCheckResponse
    expected = {
        status.SERVING: {"readinessProbe": True, "livenessProbe": True, "startupProbe": True},
        status.NOT_SERVING: {"readinessProbe": False, "livenessProbe": True, "startupProbe": True},
    }
    for serving, outcomes in expected.items():
        servicer.set("", serving)
        for name, command in commands.items():
            assert probe_passes(command, target, tmp_path) is outcomes[name], (serving, name)
    with socket.socket() as bound:  # bound, never listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{bound.getsockname()[1]}"
        for name, command in commands.items():
            assert probe_passes(command, closed, tmp_path) is False, name


# -- the image ------------------------------------------------------------------------------


def test_the_image_runs_as_a_numeric_non_root_user_without_training_extras() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("FROM ", 1)[1]
    users = [line.split()[1] for line in final_stage.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert "ORT_DISABLE_TELEMETRY=1" in final_stage
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert installs
    for line in installs:  # serving only: the PostgreSQL driver and tracing, never train or dev
        extras = {e.strip() for group in re.findall(r"\[([^]]*)\]", line) for e in group.split(",")}
        assert extras <= {"postgres", "tracing"}
