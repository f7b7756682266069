"""DiscoveryService over a real socket: a caller learns the sealing keys, schema and versions
from the server, follows a key rotation, and with a pinned key refuses a server that names
another."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest

from privscore.v1 import discovery_service_pb2 as pb
from privscore.v1 import discovery_service_pb2_grpc
from service.client.sdk import (
    DiscoveryRefused,
    PrivscoreClient,
    certificate_identity,
    sealing_key,
)
from service.config import DataLayout
from service.privacy.admin import init_keys
from service.privacy.pseudonym import Pseudonymiser
from service.privacy.sealing import SEALING_FORMAT, load_public_keyset
from service.security.certs import CertPaths
from tests.conftest import ServerProcess, applicants, privscore_cli, served_manifest


def info(server: ServerProcess, cert_name: str = "dev") -> pb.GetServerInfoResponse:
    with server.channel(cert_name) as channel:
        stub = discovery_service_pb2_grpc.DiscoveryServiceStub(channel)
        response: pb.GetServerInfoResponse = stub.GetServerInfo(
            pb.GetServerInfoRequest(), timeout=10
        )
        return response


def discovered_client(
    server: ServerProcess, channel: grpc.Channel, pinned: Path | None = None
) -> PrivscoreClient:
    """What a caller with only its own secrets builds: nothing of the server's read."""
    layout = DataLayout(server.data_dir)
    certificate = CertPaths(layout.certs_dir).client_cert("dev").read_bytes()
    return PrivscoreClient.discovered(
        channel,
        Pseudonymiser.from_file(layout.pseudonym_key),
        identity=certificate_identity(certificate),
        pinned=load_public_keyset(pinned) if pinned else None,
    )


def test_the_server_names_its_keys_schema_and_versions(shared_server: ServerProcess) -> None:
    found = info(shared_server)
    published = load_public_keyset(DataLayout(shared_server.data_dir).public_keyset)
    (primary,) = [k for k in found.sealing_keys if k.status == pb.SEALING_KEY_STATUS_PRIMARY]
    assert primary.key_id == published.key_id
    assert primary.public_key == published.public_key.public_bytes_raw()
    assert primary.created_at.seconds > 0
    assert found.sealing_format == SEALING_FORMAT
    manifest = served_manifest()
    assert found.schema_version == manifest.schema_version
    assert found.model_version == manifest.model_version
    assert [f.name for f in found.features] == [s.name for s in manifest.schema.model_features]
    for feature, spec in zip(found.features, manifest.schema.model_features, strict=True):
        assert (feature.kind == pb.FEATURE_KIND_NUMERIC) == spec.is_numeric
        assert list(feature.categories) == list(spec.categories or ())
        if spec.max is not None:
            assert feature.HasField("max") and feature.max == spec.max
    with shared_server.channel() as channel:
        scored = discovered_client(shared_server, channel).score("t", "disc-1", applicants()[0])
    assert scored.metadata.model_version == found.model_version
    assert scored.metadata.policy_version == found.policy_version
    assert len(found.model_manifest_sha256) == 64


def test_every_caller_role_may_ask_and_nothing_else_is_granted_by_it(
    shared_server: ServerProcess,
) -> None:
    auditor = info(shared_server, "auditor")
    assert auditor.sealing_keys
    with shared_server.channel("auditor") as channel, pytest.raises(grpc.RpcError) as refused:
        discovered_client(shared_server, channel).score("t", "disc-2", applicants()[0])
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_pinned_key_the_server_does_not_list_is_refused_before_any_call(
    shared_server: ServerProcess, tmp_path: Path
) -> None:
    other = DataLayout(tmp_path / "other")
    init_keys(other, other.keyring, other.dev_kek)  # a keyring the server has never seen
    with shared_server.channel() as channel:
        with pytest.raises(DiscoveryRefused, match="pinned key"):
            discovered_client(shared_server, channel, pinned=other.public_keyset)
        pinned = DataLayout(shared_server.data_dir).public_keyset
        assert discovered_client(shared_server, channel, pinned=pinned).score(
            "t", "disc-3", applicants()[1]
        )
    cli = privscore_cli(
        shared_server.data_dir,
        "score",
        "--target",
        shared_server.target,
        "--tenant",
        "t",
        "--customer-id",
        "disc-4",
        "--features",
        str(_applicant_file(tmp_path)),
        "--pin-key",
        str(other.public_keyset),
    )
    assert cli.returncode == 2 and "pinned key" in cli.stderr and "Traceback" not in cli.stderr


def _applicant_file(tmp_path: Path) -> Path:
    path = tmp_path / "applicant.json"
    path.write_text(json.dumps(applicants()[2]))
    return path


def test_a_rotation_shows_at_the_next_call_and_discovered_callers_follow(
    tmp_path: Path,
) -> None:
    server = ServerProcess(tmp_path / "var")
    try:
        before = info(server)
        done = privscore_cli(server.data_dir, "keys", "rotate", "--data-dir", str(server.data_dir))
        assert done.returncode == 0, done.stderr
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("keys.reloaded", 10)
        after = info(server)
        statuses = {k.key_id: k.status for k in after.sealing_keys}
        (old,) = [k.key_id for k in before.sealing_keys]
        assert statuses[old] == pb.SEALING_KEY_STATUS_ACTIVE
        (new,) = [k for k, s in statuses.items() if s == pb.SEALING_KEY_STATUS_PRIMARY]
        assert new != old and after.sealing_keys[0].key_id == new  # primary first
        with server.channel() as channel:
            client = discovered_client(server, channel)
            assert sealing_key(after).key_id == new
            assert client.score("t", "disc-5", applicants()[3]).score.score > 0
        cli = privscore_cli(
            server.data_dir,
            "score",
            "--target",
            server.target,
            "--tenant",
            "t",
            "--customer-id",
            "disc-6",
            "--features",
            str(_applicant_file(tmp_path)),
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["score"]["score"] > 0
    finally:
        assert server.terminate() == 0
