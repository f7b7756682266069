"""The deployment files: manifests valid against the Kubernetes schemas, image non-root."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES_VERSION = "1.31"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes_objects(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_pod_runs_locked_down_and_probes_over_tls() -> None:
    (statefulset,) = yaml.safe_load_all((DEPLOY / "k8s" / "statefulset.yaml").read_text())
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "--insecure" not in container["args"]
    assert container["readinessProbe"]["exec"]["command"][:2] == ["privscore", "health"]
    assert statefulset["spec"]["replicas"] == 1  # one writer of the store and the audit log


def test_the_image_runs_as_a_numeric_non_root_user_without_training_extras() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("FROM ", 1)[1]
    users = [line.split()[1] for line in final_stage.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert "ORT_DISABLE_TELEMETRY=1" in final_stage
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert installs and all("[" not in line for line in installs)  # no extras: serving only
