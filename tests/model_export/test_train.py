"""Training end to end: an inferred schema on synthetic data, and reproducing the default."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from model_export.cli import main
from service.model.manifest import MANIFEST_FILE, SIGNATURE_FILE, load_verified_manifest

from .conftest import DEFAULT_ARTIFACT, FAST_TRAIN, GERMAN_DATA, GERMAN_SCHEMA, KeyPair


def assert_same_numbers(actual: Any, expected: Any, path: str = "metrics") -> None:
    """Equal structure; numbers equal to the 6 decimals the manifest keeps."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_numbers(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_numbers(a, e, f"{path}[{index}]")
    elif isinstance(expected, float) and not isinstance(expected, bool):
        assert math.isclose(actual, expected, rel_tol=0, abs_tol=1e-6), path
    else:
        assert actual == expected, path


def test_inferred_schema_trains_signs_and_verifies_end_to_end(
    synthetic_csv: Path, tmp_path: Path, test_key: KeyPair, capsys
):
    out = tmp_path / "artifact"
    args = [
        "train",
        "--data",
        str(synthetic_csv),
        "--label",
        "outcome",
        "--bad",
        "default",
        "--out",
        str(out),
        "--exclude",
        "gender",
        "--sensitive",
        "age",
        "--seed",
        "3",
    ]
    assert main([*args, *FAST_TRAIN]) == 0
    assert "(unsigned)" in capsys.readouterr().out
    assert not (out / SIGNATURE_FILE).exists()
    data = ["--data", str(synthetic_csv), "--public-key", str(test_key.public)]
    assert main(["verify", str(out), *data]) == 1  # unsigned: refused

    assert main(["sign", str(out), "--key", str(test_key.private)]) == 0
    assert main(["verify", str(out), *data]) == 0

    manifest = load_verified_manifest(out, test_key.public)
    assert manifest.schema.name == "small-lender"
    assert [s.name for s in manifest.schema.excluded_features] == ["gender"]
    assert "gender" not in [item.name for item in manifest.onnx.inputs]
    assert "monthly_income_eur" in [item.name for item in manifest.onnx.inputs]
    assert manifest.champion in manifest.metrics["families"]
    # The label depends on the features, so every family must beat chance clearly.
    for values in manifest.metrics["families"].values():
        assert values["cv_auc_mean"] > 0.6 and 0.0 < values["holdout_brier"] < 0.25
    fairness = manifest.metrics["fairness"]["attributes"]
    assert set(fairness) == {"age"}  # only what was marked sensitive
    assert fairness["age"]["split"] == float(int(fairness["age"]["split"]))  # median of ages
    for name in ("model_card.md", "roc.png", "calibration.png", "pipeline.joblib"):
        assert (out / name).stat().st_size > 0


def test_same_data_and_seed_give_the_same_metrics(synthetic_csv: Path, tmp_path: Path):
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = [
            "train",
            "--data",
            str(synthetic_csv),
            "--label",
            "outcome",
            "--bad",
            "default",
            "--out",
            str(out),
            "--families",
            "logistic_regression,random_forest",
            "--no-lda-search",  # the search's own determinism: test_lda.py
        ]
        jobs = ["--jobs", "2" if run == "b" else "1"]  # worker count must not matter
        assert main([*args, *FAST_TRAIN, *jobs]) == 0
        runs.append(json.loads((out / MANIFEST_FILE).read_text()))
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert runs[0]["reference_values"] == runs[1]["reference_values"]


def test_train_refuses_a_schema_that_disagrees_with_the_label(tmp_path: Path, capsys):
    args = ["train", "--data", str(GERMAN_DATA), "--label", "creditability", "--bad", "good",
            "--schema", str(GERMAN_SCHEMA), "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 1
    assert "disagree with the schema file" in capsys.readouterr().err


def test_retraining_the_default_reproduces_the_committed_metrics(tmp_path: Path):
    committed = load_verified_manifest(DEFAULT_ARTIFACT, DEFAULT_ARTIFACT.parent / "trusted_keys"
                                       / "model-team.pub")  # fmt: skip
    seed = str(committed.training["seed"])
    # Trained as the committed artifact was: with the LDA search only if its record says so.
    searched = bool((committed.training.get("lda_search") or {}).get("enabled"))
    out = tmp_path / "retrained"
    args = [
        "train",
        "--data",
        str(GERMAN_DATA),
        "--label",
        "creditability",
        "--bad",
        "bad",
        "--schema",
        str(GERMAN_SCHEMA),
        "--out",
        str(out),
        "--seed",
        seed,
        "--quiet",
        *([] if searched else ["--no-lda-search"]),
    ]
    assert main(args) == 0
    retrained = json.loads((out / MANIFEST_FILE).read_text())
    assert retrained["schema_version"] == committed.schema_version
    assert retrained["training_data"]["sha256"] == committed.training_data.sha256
    assert_same_numbers(retrained["metrics"], dict(committed.metrics))
    assert_same_numbers(retrained["reference_values"], dict(committed.reference_values))
    # `train` and `privscore-model drift-reference` (which wrote the committed section) agree.
    assert committed.drift_reference is not None
    assert retrained["drift_reference"] == committed.drift_reference.to_dict()
    assert retrained["verification"]["parity_max_abs_diff"] <= 1e-5
    if searched:  # the search's whole table is reproduced too
        lda_table = json.loads((out / "lda.json").read_text())
        assert_same_numbers(lda_table, json.loads((DEFAULT_ARTIFACT / "lda.json").read_text()))


@pytest.mark.parametrize("flag", [["--folds", "1"], ["--families", "svm"]])
def test_bad_training_options_fail_cleanly(synthetic_csv: Path, tmp_path: Path, flag, capsys):
    args = ["train", "--data", str(synthetic_csv), "--label", "outcome", "--bad", "default",
            "--out", str(tmp_path / "x"), "--quiet", *flag]  # fmt: skip
    assert main(args) == 1
    assert "error" in capsys.readouterr().err
