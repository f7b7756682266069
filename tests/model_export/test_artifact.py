"""The committed default artifact: signature, integrity, tamper detection, raw-feature ONNX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model_export.cli import main
from model_export.sign import sign_artifact
from service.model.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ArtifactError,
    ArtifactFailure,
    Manifest,
    ScorecardScaling,
    load_verified_manifest,
)
from service.model.schema import FeatureSchema

from .conftest import DEFAULT_ARTIFACT, GERMAN_DATA, GERMAN_SCHEMA, REPO_ROOT, TRUSTED_KEY, KeyPair


def verify_exit_code(artifact: Path, key: Path = TRUSTED_KEY) -> int:
    return main(["verify", str(artifact), "--data", str(GERMAN_DATA), "--public-key", str(key)])


def assert_refused(artifact: Path, reason: ArtifactFailure, key: Path = TRUSTED_KEY) -> None:
    with pytest.raises(ArtifactError) as caught:
        load_verified_manifest(artifact, key)
    assert caught.value.reason == reason
    assert verify_exit_code(artifact, key) == 1


def test_default_artifact_verifies_against_the_bundled_key():
    manifest = load_verified_manifest(DEFAULT_ARTIFACT, TRUSTED_KEY)
    assert manifest.schema == FeatureSchema.load(GERMAN_SCHEMA)
    assert manifest.model_version.startswith("german-credit-")
    assert manifest.onnx.opset == 18 and manifest.onnx.bad_class_index == 1
    families = manifest.metrics["families"]
    assert {"logistic_regression", "random_forest"} <= set(families)
    for values in families.values():
        assert set(values) >= {
            "cv_auc_mean", "cv_auc_std", "holdout_auc", "holdout_ks", "holdout_brier",
        }  # fmt: skip
    champion = families[manifest.champion]
    assert champion["cv_auc_mean"] == max(v["cv_auc_mean"] for v in families.values())
    assert 0.78 <= champion["cv_auc_mean"] < 0.85  # the bar; far above means leakage
    age = manifest.metrics["fairness"]["attributes"]["age_in_years"]
    assert [group["group"] for group in age["groups"]] == ["<25", ">=25"]
    assert 0.0 < age["approval_rate_ratio"] <= 1.0
    assert (DEFAULT_ARTIFACT / "roc.png").stat().st_size > 0
    card = (DEFAULT_ARTIFACT / "model_card.md").read_text()
    assert "doi.org/10.24432/C5NC77" in card and "personal_status_and_sex" in card


def test_verify_cli_passes_on_the_default_artifact(capsys):
    assert main(["verify", str(DEFAULT_ARTIFACT), "--data", str(GERMAN_DATA)]) == 0
    out = capsys.readouterr().out
    assert "signature and hashes: ok" in out and "parity: ok" in out and "over 1000 rows" in out


def test_verify_runs_as_a_module_with_a_real_exit_code(default_copy: Path):
    command = [sys.executable, "-m", "model_export", "verify", "--data", str(GERMAN_DATA)]
    assert subprocess.run([*command, str(DEFAULT_ARTIFACT)], cwd=REPO_ROOT).returncode == 0
    (default_copy / SIGNATURE_FILE).unlink()
    failed = subprocess.run(
        [*command, str(default_copy)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert failed.returncode == 1 and "UNSIGNED" in failed.stderr


def test_one_flipped_byte_in_the_onnx_file_is_refused(default_copy: Path):
    model = default_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    assert_refused(default_copy, ArtifactFailure.HASH_MISMATCH)


def test_an_edited_manifest_is_refused(default_copy: Path):
    path = default_copy / MANIFEST_FILE
    document = json.loads(path.read_text())
    document["scorecard"]["base_score"] = 650.0
    path.write_text(json.dumps(document, indent=2))
    assert_refused(default_copy, ArtifactFailure.BAD_SIGNATURE)


def test_an_added_manifest_key_is_refused(default_copy: Path):
    path = default_copy / MANIFEST_FILE
    document = json.loads(path.read_text())
    document["metrics"]["note"] = "harmless?"
    path.write_text(json.dumps(document))
    assert_refused(default_copy, ArtifactFailure.BAD_SIGNATURE)


def test_reformatting_the_manifest_keeps_the_signature_valid(default_copy: Path):
    path = default_copy / MANIFEST_FILE
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None, sort_keys=True))
    assert load_verified_manifest(default_copy, TRUSTED_KEY).model_version


def test_an_unsigned_artifact_is_refused(default_copy: Path):
    (default_copy / SIGNATURE_FILE).unlink()
    assert_refused(default_copy, ArtifactFailure.UNSIGNED)


def test_a_missing_onnx_file_is_refused(default_copy: Path):
    (default_copy / "model.onnx").unlink()
    assert_refused(default_copy, ArtifactFailure.MISSING_FILE)


def test_the_wrong_public_key_is_refused(other_key: KeyPair):
    assert_refused(DEFAULT_ARTIFACT, ArtifactFailure.BAD_SIGNATURE, key=other_key.public)


def test_resigning_with_an_untrusted_key_is_refused(default_copy: Path, other_key: KeyPair):
    sign_artifact(default_copy, other_key.private)
    assert load_verified_manifest(default_copy, other_key.public)  # valid for its own key
    assert_refused(default_copy, ArtifactFailure.BAD_SIGNATURE)


def test_a_tampered_pipeline_fails_verify_but_not_serving(default_copy: Path, capsys):
    (default_copy / "pipeline.joblib").write_bytes(b"not the pickle that was signed")
    assert load_verified_manifest(default_copy, TRUSTED_KEY)  # the server never reads it
    assert verify_exit_code(default_copy) == 1
    assert "HASH_MISMATCH" in capsys.readouterr().err


def test_onnx_takes_raw_features_and_matches_sklearn_per_applicant():
    import joblib
    import onnxruntime

    from model_export.dataset import feature_matrix, read_csv

    manifest = load_verified_manifest(DEFAULT_ARTIFACT, TRUSTED_KEY)
    session = onnxruntime.InferenceSession(
        str(manifest.onnx_path(DEFAULT_ARTIFACT)), providers=["CPUExecutionProvider"]
    )
    inputs = {item.name: item.type for item in session.get_inputs()}
    model_features = manifest.schema.model_features
    assert list(inputs) == [spec.name for spec in model_features]
    assert not {spec.name for spec in manifest.schema.excluded_features} & set(inputs)
    for spec in model_features:
        assert inputs[spec.name] == ("tensor(float)" if spec.is_numeric else "tensor(string)")
    assert [o.name for o in session.get_outputs()] == [
        manifest.onnx.label_output, manifest.onnx.probability_output,
    ]  # fmt: skip

    # Score applicants one at a time, as the server does: a dict of raw values, no encoding.
    pipeline = joblib.load(DEFAULT_ARTIFACT / "pipeline.joblib")
    matrix = feature_matrix(manifest.schema, read_csv(GERMAN_DATA))
    expected = pipeline.predict_proba(matrix[:40])[:, 1]
    for row, want in zip(matrix[:40], expected, strict=True):
        feeds = {
            spec.name: np.array([[value]], dtype=np.float32 if spec.is_numeric else object)
            for spec, value in zip(model_features, row, strict=True)
        }
        (probabilities,) = session.run([manifest.onnx.probability_output], feeds)
        assert probabilities.shape == (1, 2)
        assert probabilities[0].sum() == pytest.approx(1.0, abs=1e-6)
        assert abs(float(probabilities[0, manifest.onnx.bad_class_index]) - want) <= 1e-5


def test_reference_values_cover_the_model_features_and_reason_codes_are_unique():
    manifest = load_verified_manifest(DEFAULT_ARTIFACT, TRUSTED_KEY)
    assert set(manifest.reference_values) == {s.name for s in manifest.schema.model_features}
    codes = [code for code, _ in manifest.reason_codes.values()]
    assert len(set(codes)) == len(codes)


def test_scorecard_scaling_hits_its_anchor_points():
    scaling = ScorecardScaling(base_score=600, base_odds=50, points_to_double_odds=20)
    assert scaling.score(1 / 51) == pytest.approx(600.0)  # odds 50:1
    assert scaling.score(1 / 101) == pytest.approx(620.0)  # odds 100:1
    assert scaling.score(0.0) > scaling.score(0.5) > scaling.score(1.0)


def test_a_manifest_whose_inputs_disagree_with_its_schema_is_malformed():
    document = json.loads((DEFAULT_ARTIFACT / MANIFEST_FILE).read_text())
    document["onnx"]["inputs"] = document["onnx"]["inputs"][1:]
    with pytest.raises(ArtifactError) as caught:
        Manifest.from_dict(document)
    assert caught.value.reason == ArtifactFailure.MALFORMED
