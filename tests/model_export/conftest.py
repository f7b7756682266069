"""Fixtures for the model pipeline tests: a synthetic data set, throwaway keys, artifact copies."""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before any test imports onnxruntime

import csv
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ARTIFACT = REPO_ROOT / "service" / "model" / "default_artifact"
TRUSTED_KEY = REPO_ROOT / "service" / "model" / "trusted_keys" / "model-team.pub"
GERMAN_DATA = REPO_ROOT / "model_export" / "data" / "german_credit.csv"
GERMAN_SCHEMA = REPO_ROOT / "model_export" / "data" / "german_credit.schema.json"
FAST_TRAIN = ["--folds", "3", "--cv-repeats", "1", "--jobs", "1", "--quiet"]


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


def make_keypair(directory: Path, name: str) -> KeyPair:
    from model_export.sign import generate_keypair

    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.pub")
    generate_keypair(pair.private, pair.public)
    return pair


@pytest.fixture(scope="session")
def test_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "test")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("other-keys"), "other")


@pytest.fixture
def default_copy(tmp_path: Path) -> Path:
    """A private copy of the committed, signed default artifact, safe to tamper with."""
    target = tmp_path / "artifact"
    shutil.copytree(DEFAULT_ARTIFACT, target)
    return target


@pytest.fixture(scope="session")
def synthetic_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small lending data set unlike German credit: decimals, a header with spaces, a
    sensitive attribute to exclude, and a label that depends on the features."""
    rng = np.random.default_rng(7)
    rows = 400
    income = np.round(rng.lognormal(8.0, 0.4, rows), 2)
    age = rng.integers(18, 70, rows)
    region = rng.choice(["north", "south", "east"], rows)
    employment = rng.choice(["permanent", "temporary", "self-employed"], rows)
    gender = rng.choice(["f", "m"], rows)
    loans = rng.integers(0, 5, rows)
    logit = (
        -0.6
        - 0.9 * (np.log(income) - 8.0) / 0.4
        + 0.5 * loans
        - 0.03 * (age - 40)
        + np.where(employment == "temporary", 0.8, 0.0)
    )
    bad = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))
    path = tmp_path_factory.mktemp("synthetic") / "small_lender.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["Monthly Income (EUR)", "age", "region", "employment", "gender",
                  "open_loans", "outcome"]  # fmt: skip
        writer.writerow(header)
        for i in range(rows):
            assert math.isfinite(income[i])
            writer.writerow(
                [f"{income[i]:.2f}", age[i], region[i], employment[i], gender[i], loans[i],
                 "default" if bad[i] else "repaid"]
            )  # fmt: skip
    return path
