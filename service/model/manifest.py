"""Model artifact: manifest format, canonical bytes, Ed25519 signature and integrity checks.

A model directory holds the ONNX file, `manifest.json` and `manifest.sig` (plus a model card,
plots and, for the model team's parity check only, the scikit-learn pipeline). The signature
covers the manifest's canonical bytes (UTF-8 JSON, sorted keys, no whitespace) of the parsed
document: reformatting the file keeps it valid, changing or adding any value does not. The
manifest pins the ONNX file by SHA-256, so one signature covers the model too.

`manifest.sig` is JSON: {"algorithm": "Ed25519", "key_id": <16 hex of SHA-256 of the raw public
key>, "signature": <base64 of the 64-byte signature>}. Public keys are PEM
(SubjectPublicKeyInfo) or 64 hex characters of the raw key.

The optional `drift_reference` section (manifests written before it existed load with
`drift_reference=None`) is the development sample's distribution, which the server's drift
monitor (`service.monitoring.drift`) compares served decisions with; see `DriftReference`.

The server calls `load_verified_manifest` at load and refuses to serve when it raises.
Standard library and `cryptography` only: serving must not need numpy or scikit-learn.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import os
import re
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.model.schema import (
    FeatureSchema,
    FeatureValue,
    SchemaError,
    canonical_json,
    check_value,
)

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
FORMAT_VERSION = 1
SIGNATURE_ALGORITHM = "Ed25519"
KEY_ID_HEX = 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Artifact files are plain names inside the directory: no paths, no traversal.
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ArtifactFailure(StrEnum):
    """Stable causes for refusing an artifact (for logs and health details)."""

    MISSING_FILE = "MISSING_FILE"
    UNSIGNED = "UNSIGNED"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    HASH_MISMATCH = "HASH_MISMATCH"
    MALFORMED = "MALFORMED"


class ArtifactError(Exception):
    """The model artifact must not be served; `reason` says why, the message says where."""

    def __init__(self, reason: ArtifactFailure, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ScorecardScaling:
    """Maps P(bad) to points: `base_score` at `base_odds` (good:bad), +PDO when odds double."""

    base_score: float = 600.0
    base_odds: float = 50.0
    points_to_double_odds: float = 20.0

    def __post_init__(self) -> None:
        values = (self.base_score, self.base_odds, self.points_to_double_odds)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            raise ValueError("scorecard scaling values must be finite numbers")
        if self.base_odds <= 0 or self.points_to_double_odds <= 0:
            raise ValueError("base_odds and points_to_double_odds must be positive")

    @property
    def factor(self) -> float:
        return self.points_to_double_odds / math.log(2.0)

    @property
    def offset(self) -> float:
        return self.base_score - self.factor * math.log(self.base_odds)

    def score(self, probability_bad: float, *, epsilon: float = 1e-9) -> float:
        """Score = offset + factor * ln(good:bad odds); P is clipped so 0 and 1 stay finite."""
        p = min(max(probability_bad, epsilon), 1.0 - epsilon)
        return self.offset + self.factor * math.log((1.0 - p) / p)

    def to_dict(self) -> dict[str, float]:
        return {
            "base_score": self.base_score,
            "base_odds": self.base_odds,
            "points_to_double_odds": self.points_to_double_odds,
        }


@dataclass(frozen=True)
class OnnxInput:
    name: str
    type: str  # "tensor(float)" for numeric features, "tensor(string)" for categorical
    shape: tuple[int | None, ...] = (None, 1)


@dataclass(frozen=True)
class OnnxModelInfo:
    """The ONNX file and how to call it: one [N, 1] input per model feature, in schema order."""

    file: str
    sha256: str
    opset: int
    ml_opset: int
    inputs: tuple[OnnxInput, ...]
    label_output: str
    probability_output: str  # float [N, 2]
    bad_class_index: int = 1  # column of probability_output holding P(bad)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "opset": self.opset,
            "ml_opset": self.ml_opset,
            "inputs": [
                {"name": item.name, "type": item.type, "shape": list(item.shape)}
                for item in self.inputs
            ],
            "label_output": self.label_output,
            "probability_output": self.probability_output,
            "bad_class_index": self.bad_class_index,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OnnxModelInfo:
        return cls(
            file=data["file"],
            sha256=data["sha256"],
            opset=int(data["opset"]),
            ml_opset=int(data["ml_opset"]),
            inputs=tuple(
                OnnxInput(item["name"], item["type"], tuple(item["shape"]))
                for item in data["inputs"]
            ),
            label_output=data["label_output"],
            probability_output=data["probability_output"],
            bad_class_index=int(data["bad_class_index"]),
        )


@dataclass(frozen=True)
class DatasetInfo:
    file: str  # the file name only, for humans; the hash identifies the content
    sha256: str
    rows: int


NUMERIC_BINS = "numeric"
CATEGORICAL_BINS = "categorical"


@dataclass(frozen=True)
class NumericBins:
    """Counts of a number in bins split at `edges` (strictly increasing): bin i holds the values
    v with edges[i-1] < v <= edges[i], the first bin v <= edges[0], the last v > edges[-1]; so
    there is one more count than edges (no edges: one bin)."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not all(_is_number(e) and math.isfinite(e) for e in self.edges):
            raise ValueError("bin edges must be finite numbers")
        if any(a >= b for a, b in itertools.pairwise(self.edges)):
            raise ValueError("bin edges must be strictly increasing")
        _check_counts(self.counts, len(self.edges) + 1)

    def index(self, value: float) -> int:
        """The bin of `value` (the rule in the class docstring)."""
        return bisect_left(self.edges, value)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": NUMERIC_BINS, "edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NumericBins:
        if data.get("kind", NUMERIC_BINS) != NUMERIC_BINS:
            raise ValueError("expected numeric bins")
        return cls(tuple(data["edges"]), tuple(data["counts"]))


@dataclass(frozen=True)
class CategoricalBins:
    """Counts per category, one bin per schema category in schema order."""

    categories: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(c, str) for c in self.categories):
            raise ValueError("categories must be strings")
        _check_counts(self.counts, len(self.categories))

    def index(self, value: str) -> int:
        """The bin of `value`; ValueError for a value that is not a category."""
        return self.categories.index(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": CATEGORICAL_BINS,
            "categories": list(self.categories),
            "counts": list(self.counts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoricalBins:
        if data.get("kind") != CATEGORICAL_BINS:
            raise ValueError("expected categorical bins")
        return cls(tuple(data["categories"]), tuple(data["counts"]))


Bins = NumericBins | CategoricalBins


@dataclass(frozen=True)
class DriftReference:
    """The training distribution the served one is compared with: the manifest's optional
    `drift_reference` section, computed by the model pipeline on the DEVELOPMENT sample (the
    rows the model was fitted on, not the holdout). Counts only, never a row.

        {"rows": <development rows>,
         "features": {<model feature>: {"kind": "numeric", "edges": [e1, ..., ek],
                                        "counts": [c0, ..., ck]}
                                     | {"kind": "categorical", "categories": [...],
                                        "counts": [...]}},
         "score": {"edges": [...], "counts": [...]}}

    Numeric features and the score: interior edges at the training deciles, where the j-th
    decile is the smallest training value with at least j/10 of the rows at or below it;
    repeated edges and an edge equal to the maximum are dropped, so every training bin is
    non-empty and a feature with few distinct values has fewer bins. Binning: `NumericBins`.
    Categorical features: one bin per schema category, in schema order (a category absent
    from training has count 0). Score: the served score (`ScorecardScaling.score` of the ONNX
    model's P(bad), rounded as the server rounds) of each development row. Every feature's
    counts, and the score's, sum to `rows`.
    """

    rows: int
    features: Mapping[str, Bins]  # every model feature (in schema order once in a Manifest)
    score: NumericBins

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "features": {name: bins.to_dict() for name, bins in self.features.items()},
            "score": {"edges": list(self.score.edges), "counts": list(self.score.counts)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        if not isinstance(data, Mapping) or not isinstance(data["features"], Mapping):
            raise TypeError("drift_reference must be an object with a features object")
        features: dict[str, Bins] = {}
        for name, bins in data["features"].items():
            if not isinstance(bins, Mapping):
                raise TypeError(f"drift_reference.features.{name} must be an object")
            kind = bins.get("kind")
            if kind == NUMERIC_BINS:
                features[name] = NumericBins.from_dict(bins)
            elif kind == CATEGORICAL_BINS:
                features[name] = CategoricalBins.from_dict(bins)
            else:
                raise ValueError(f"drift_reference.features.{name}: unknown kind")
        score = data["score"]
        if not isinstance(score, Mapping):
            raise TypeError("drift_reference.score must be an object")
        return cls(int(data["rows"]), features, NumericBins.from_dict(score))

    def in_schema_order(self, schema: FeatureSchema) -> DriftReference:
        """The same reference with its features in schema order (the signature covers sorted
        keys, so the order of the JSON object carries no meaning)."""
        order = {spec.name: i for i, spec in enumerate(schema.model_features)}
        ordered = sorted(self.features.items(), key=lambda item: order.get(item[0], len(order)))
        return DriftReference(self.rows, dict(ordered), self.score)

    def check(self, schema: FeatureSchema) -> None:
        """ValueError unless it covers exactly the schema's model features, each binned the way
        its kind says, with counts summing to `rows`."""
        if isinstance(self.rows, bool) or self.rows <= 0:
            raise ValueError("drift_reference.rows must be a positive integer")
        features = schema.model_features
        if set(self.features) != {spec.name for spec in features}:
            raise ValueError("drift_reference.features must name exactly the model features")
        for spec in features:
            bins = self.features[spec.name]
            if spec.is_numeric != isinstance(bins, NumericBins):
                raise ValueError(f"drift_reference.features.{spec.name} has the wrong kind")
            if isinstance(bins, CategoricalBins) and bins.categories != spec.categories:
                raise ValueError(
                    f"drift_reference.features.{spec.name} must list the schema's categories"
                )
            if sum(bins.counts) != self.rows:
                raise ValueError(f"drift_reference.features.{spec.name} counts must sum to rows")
        if sum(self.score.counts) != self.rows:
            raise ValueError("drift_reference.score counts must sum to rows")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_counts(counts: Sequence[int], expected: int) -> None:
    if len(counts) != expected:
        raise ValueError(f"expected {expected} bin counts, found {len(counts)}")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError("bin counts must be non-negative integers")


@dataclass(frozen=True)
class Manifest:
    """Everything the server needs besides the ONNX file, and what the model team attests."""

    model_version: str
    created_at: str  # UTC ISO 8601
    schema: FeatureSchema
    training_data: DatasetInfo
    onnx: OnnxModelInfo
    scaling: ScorecardScaling
    # Favourable value per model feature, for reason codes: see `reference_method`.
    reference_values: Mapping[str, FeatureValue]
    reference_method: str
    # {"champion": family, "families": {family: {"cv_auc_mean", ...}}, "calibration", "fairness"}
    metrics: Mapping[str, Any]
    training: Mapping[str, Any] = field(default_factory=dict)
    # Files only the model team's `verify` reads (e.g. the scikit-learn pipeline), with hashes.
    verification: Mapping[str, Any] = field(default_factory=dict)
    # The development sample's distribution for drift monitoring; None in older manifests.
    drift_reference: DriftReference | None = None
    format_version: int = FORMAT_VERSION

    @property
    def schema_version(self) -> str:
        return self.schema.version

    @property
    def champion(self) -> str:
        return str(self.metrics["champion"])

    @property
    def reason_codes(self) -> dict[str, tuple[str, str]]:
        """Model feature -> (reason code, reason text)."""
        return {f.name: (f.reason_code, f.reason_text) for f in self.schema.model_features}

    def onnx_path(self, artifact_dir: str | Path) -> Path:
        return Path(artifact_dir) / self.onnx.file

    def to_dict(self) -> dict[str, Any]:
        document = {
            "format_version": self.format_version,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "schema_version": self.schema_version,
            "schema": self.schema.to_dict(),
            "training_data": {
                "file": self.training_data.file,
                "sha256": self.training_data.sha256,
                "rows": self.training_data.rows,
            },
            "onnx": self.onnx.to_dict(),
            "scorecard": self.scaling.to_dict(),
            "reference_values": dict(self.reference_values),
            "reference_method": self.reference_method,
            "metrics": dict(self.metrics),
            "training": dict(self.training),
            "verification": dict(self.verification),
        }
        if self.drift_reference is not None:  # absent, not null: older manifests stay as signed
            document["drift_reference"] = self.drift_reference.to_dict()
        return document

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse and cross-check a manifest document; raises ArtifactError(MALFORMED)."""
        try:
            manifest = cls._from_dict(data)
            manifest._check()
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            detail = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise ArtifactError(ArtifactFailure.MALFORMED, f"manifest: {detail}") from None
        return manifest

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise TypeError("the manifest must be a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported format_version (this code reads {FORMAT_VERSION})")
        schema = FeatureSchema.from_dict(data["schema"])
        if data["schema_version"] != schema.version:
            raise ValueError("schema_version does not match the embedded schema")
        dataset = data["training_data"]
        drift = data.get("drift_reference")
        return cls(
            format_version=data["format_version"],
            model_version=data["model_version"],
            created_at=data["created_at"],
            schema=schema,
            training_data=DatasetInfo(dataset["file"], dataset["sha256"], int(dataset["rows"])),
            onnx=OnnxModelInfo.from_dict(data["onnx"]),
            scaling=ScorecardScaling(**data["scorecard"]),
            reference_values=dict(data["reference_values"]),
            reference_method=data["reference_method"],
            metrics=dict(data["metrics"]),
            training=dict(data.get("training", {})),
            verification=dict(data.get("verification", {})),
            drift_reference=(
                None if drift is None else DriftReference.from_dict(drift).in_schema_order(schema)
            ),
        )

    def _check(self) -> None:
        for name, text in (("model_version", self.model_version), ("created_at", self.created_at)):
            if not isinstance(text, str) or not text:
                raise ValueError(f"{name} must be a non-empty string")
        if not _FILE_NAME.fullmatch(self.onnx.file):
            raise ValueError("onnx.file must be a plain file name inside the artifact directory")
        for name, digest in (
            ("onnx", self.onnx.sha256),
            ("training_data", self.training_data.sha256),
        ):
            if not _SHA256_HEX.fullmatch(digest):
                raise ValueError(f"{name}.sha256 must be 64 lowercase hex characters")
        features = self.schema.model_features
        if [item.name for item in self.onnx.inputs] != [f.name for f in features]:
            raise ValueError("onnx.inputs must be the schema's model features, in order")
        for item, spec in zip(self.onnx.inputs, features, strict=True):
            expected = "tensor(float)" if spec.is_numeric else "tensor(string)"
            if item.type != expected:
                raise ValueError(f"onnx input {spec.name} must be {expected}")
        if self.onnx.bad_class_index not in (0, 1):
            raise ValueError("onnx.bad_class_index must be 0 or 1")
        if set(self.reference_values) != {f.name for f in features}:
            raise ValueError("reference_values must name exactly the model features")
        for spec in features:
            problem = check_value(spec, self.reference_values[spec.name])
            if problem is not None:
                raise ValueError(f"reference value of {spec.name} {problem.description}")
        if "champion" not in self.metrics:
            raise ValueError("metrics must name the champion")
        if self.drift_reference is not None:
            self.drift_reference.check(self.schema)


def canonical_bytes(document: Mapping[str, Any]) -> bytes:
    """The bytes the signature covers: canonical JSON of the parsed manifest document."""
    return canonical_json(document)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or a file holding 64 hex characters."""
    data = Path(path).read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(binascii.unhexlify(data.strip()))
    except (ValueError, binascii.Error, TypeError) as error:
        raise ValueError(f"{path}: not an Ed25519 public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def signature_document(
    document: Mapping[str, Any], private_key: Ed25519PrivateKey
) -> dict[str, str]:
    """The content of `manifest.sig` for a manifest document (model team side)."""
    signature = private_key.sign(canonical_bytes(document))
    return {
        "algorithm": SIGNATURE_ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def read_manifest_document(artifact_dir: str | Path) -> dict[str, Any]:
    """The parsed, NOT verified manifest.json (for tooling that signs or describes it)."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            ArtifactFailure.MISSING_FILE, f"{MANIFEST_FILE} not found in {artifact_dir}"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(
            ArtifactFailure.MALFORMED, f"{MANIFEST_FILE} is not JSON: {error}"
        ) from None
    if not isinstance(document, dict):
        raise ArtifactError(ArtifactFailure.MALFORMED, f"{MANIFEST_FILE} must hold a JSON object")
    return document


def verify_signature(
    artifact_dir: str | Path, document: Mapping[str, Any], trusted_public_key: Ed25519PublicKey
) -> None:
    """Raise ArtifactError unless `manifest.sig` is the trusted key's signature of `document`."""
    path = Path(artifact_dir) / SIGNATURE_FILE
    if not path.is_file():
        raise ArtifactError(
            ArtifactFailure.UNSIGNED, f"{SIGNATURE_FILE} not found in {artifact_dir}"
        )
    try:
        envelope = json.loads(path.read_text(encoding="utf-8"))
        algorithm, signer, encoded = (
            envelope["algorithm"],
            envelope["key_id"],
            envelope["signature"],
        )
        signature = base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ArtifactError(
            ArtifactFailure.BAD_SIGNATURE, f"{SIGNATURE_FILE} is malformed"
        ) from None
    if algorithm != SIGNATURE_ALGORITHM:
        raise ArtifactError(ArtifactFailure.BAD_SIGNATURE, f"unsupported algorithm {algorithm!r}")
    trusted_id = key_id(trusted_public_key)
    if signer != trusted_id:
        raise ArtifactError(
            ArtifactFailure.BAD_SIGNATURE,
            f"signed by key {signer!r}, but the trusted key is {trusted_id!r}",
        )
    try:
        trusted_public_key.verify(signature, canonical_bytes(document))
    except InvalidSignature:
        raise ArtifactError(
            ArtifactFailure.BAD_SIGNATURE, "signature does not match the manifest content"
        ) from None


def check_file_hash(artifact_dir: str | Path, file_name: str, expected_sha256: str) -> Path:
    """The file's path, after checking it exists inside the directory with the expected hash."""
    if not _FILE_NAME.fullmatch(file_name):
        raise ArtifactError(ArtifactFailure.MALFORMED, f"{file_name!r} is not a plain file name")
    path = Path(artifact_dir) / file_name
    if not path.is_file():
        raise ArtifactError(
            ArtifactFailure.MISSING_FILE, f"{file_name} not found in {artifact_dir}"
        )
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise ArtifactError(
            ArtifactFailure.HASH_MISMATCH,
            f"{file_name} SHA-256 is {actual[:16]}..., the manifest says {expected_sha256[:16]}...",
        )
    return path


def read_verified_onnx(artifact_dir: str | Path, manifest: Manifest) -> bytes:
    """The ONNX file's bytes, hashed as read. Give these bytes (not the path) to onnxruntime,
    so the file cannot be swapped between the hash check and the load."""
    path = Path(artifact_dir) / manifest.onnx.file
    try:
        data = path.read_bytes()
    except OSError:
        raise ArtifactError(
            ArtifactFailure.MISSING_FILE, f"{manifest.onnx.file} not readable in {artifact_dir}"
        ) from None
    if hashlib.sha256(data).hexdigest() != manifest.onnx.sha256:
        raise ArtifactError(
            ArtifactFailure.HASH_MISMATCH, f"{manifest.onnx.file} changed since it was verified"
        )
    return data


def load_verified_manifest(
    artifact_dir: str | Path, trusted_public_key: Ed25519PublicKey | str | os.PathLike[str]
) -> Manifest:
    """The manifest, once its signature and the ONNX file's SHA-256 are both verified.

    `trusted_public_key` is a key or a path to one. Raises ArtifactError (reason MISSING_FILE,
    UNSIGNED, BAD_SIGNATURE, HASH_MISMATCH or MALFORMED) on any failure.
    """
    if not isinstance(trusted_public_key, Ed25519PublicKey):
        try:
            trusted_public_key = load_public_key(trusted_public_key)
        except (OSError, ValueError) as error:
            raise ArtifactError(
                ArtifactFailure.MISSING_FILE, f"trusted public key: {error}"
            ) from None
    document = read_manifest_document(artifact_dir)
    verify_signature(artifact_dir, document, trusted_public_key)
    # Parse only signed content: nothing unverified reaches the schema or the paths below.
    manifest = Manifest.from_dict(document)
    check_file_hash(artifact_dir, manifest.onnx.file, manifest.onnx.sha256)
    return manifest


def load_unverified_manifest(artifact_dir: str | Path) -> Manifest:
    """Parse a manifest WITHOUT checking its signature: for tooling and reports, never serving."""
    return Manifest.from_dict(read_manifest_document(artifact_dir))


__all__ = [
    "MANIFEST_FILE",
    "SIGNATURE_FILE",
    "ArtifactError",
    "ArtifactFailure",
    "Bins",
    "CategoricalBins",
    "DatasetInfo",
    "DriftReference",
    "Manifest",
    "NumericBins",
    "OnnxInput",
    "OnnxModelInfo",
    "SchemaError",
    "ScorecardScaling",
    "canonical_bytes",
    "check_file_hash",
    "file_sha256",
    "key_id",
    "load_public_key",
    "load_unverified_manifest",
    "load_verified_manifest",
    "read_manifest_document",
    "read_verified_onnx",
    "signature_document",
    "verify_signature",
]
