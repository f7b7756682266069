"""`privscore-model`: the model team's command line.

    privscore-model train --data CSV --label COLUMN --bad VALUE --out DIR
                          [--exclude COL ...] [--schema FILE] [--seed N] [--no-lda-search]
    privscore-model verify DIR --data CSV [--public-key FILE]
    privscore-model sign DIR --key KEYFILE
    privscore-model drift-reference DIR --data CSV
    privscore-model keygen --out PRIVATE --public-out PUBLIC
    privscore-model infer-schema --data CSV --label COLUMN --bad VALUE --out FILE
    privscore-model report --outcomes FILE --out DIR [--definition D] [--bootstrap N] [--seed S]

Exit status: 0 success, 1 a check or step failed (message on stderr), 2 bad usage. `report`
also exits 1 when it wrote a report with no verdict (AUC undefined: one outcome class only).
"""

from __future__ import annotations

import os

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before onnxruntime is first imported

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from model_export.dataset import DataError
from service.model.manifest import ArtifactError, ScorecardScaling
from service.model.schema import SchemaError

DEFAULT_SEED = 42


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except (ArtifactError, SchemaError, DataError, ValueError, OSError) as error:
        print(f"privscore-model {args.command}: error: {error}", file=sys.stderr)
        return 1
    return code


def _train(args: argparse.Namespace) -> int:
    # Imported here: scikit-learn and skl2onnx load slowly and only train needs all of them.
    from model_export.progress import Progress
    from model_export.train import TrainingError, TrainOptions, train

    options = TrainOptions(
        data=args.data,
        label=args.label,
        bad_value=args.bad,
        out=args.out,
        exclude=tuple(args.exclude),
        sensitive=tuple(args.sensitive),
        schema_path=args.schema,
        seed=args.seed,
        folds=args.folds,
        repeats=args.cv_repeats,
        holdout=args.holdout,
        families=tuple(args.families.split(",")),
        approval_cutoff=args.approval_cutoff,
        jobs=args.jobs,
        citation=args.citation,
        scaling=ScorecardScaling(args.base_score, args.base_odds, args.pdo),
        lda_search=not args.no_lda_search,
    )
    try:
        manifest = train(options, Progress(enabled=not args.quiet))
    except TrainingError as error:
        print(f"privscore-model train: {error}", file=sys.stderr)
        return 1
    families = manifest.metrics["families"]
    for family, values in families.items():
        marker = "*" if family == manifest.champion else " "
        print(
            f"{marker} {family:<20} cv_auc {values['cv_auc_mean']:.4f} +/- "
            f"{values['cv_auc_std']:.4f}  holdout auc {values['holdout_auc']:.4f} "
            f"ks {values['holdout_ks']:.4f} brier {values['holdout_brier']:.4f}"
        )
    lda = manifest.metrics.get("lda")
    if lda is None:
        print("LDA search: not run (--no-lda-search)")
    else:
        print(f"LDA search ({lda['candidates']} candidates): {lda['statement']}")
        print(f"shipped: {lda['shipped']}")
    print(f"{manifest.model_version} -> {args.out} (unsigned)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from model_export.verify import DEFAULT_PUBLIC_KEY, verify_artifact

    report = verify_artifact(
        args.artifact, args.data, args.public_key or DEFAULT_PUBLIC_KEY, args.tolerance
    )
    print(f"signature and hashes: {'ok' if report.signature_ok else 'FAILED'}")
    if report.max_abs_diff is not None:
        print(
            f"parity: {'ok' if report.parity_ok else 'FAILED'} - max |onnxruntime - "
            f"scikit-learn| = {report.max_abs_diff:.3g} over {report.rows} rows "
            f"(tolerance {args.tolerance:g})"
        )
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"privscore-model verify: FAILED: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def _sign(args: argparse.Namespace) -> int:
    from model_export.sign import sign_artifact

    signer = sign_artifact(args.artifact, args.key)
    print(f"signed {args.artifact}/manifest.json with key {signer}")
    return 0


def _drift_reference(args: argparse.Namespace) -> int:
    from model_export.drift_reference import add_drift_reference

    reference = add_drift_reference(args.artifact, args.data)
    bins = sum(len(b.counts) for b in reference.features.values())
    print(
        f"wrote drift_reference to {args.artifact}/manifest.json ({reference.rows} development "
        f"rows, {len(reference.features)} features in {bins} bins, score in "
        f"{len(reference.score.counts)} bins); unsigned: run `privscore-model sign`"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from model_export.sign import generate_keypair

    identifier = generate_keypair(args.out, args.public_out)
    print(f"key {identifier}: private {args.out} (keep secret), public {args.public_out}")
    return 0


def _infer_schema(args: argparse.Namespace) -> int:
    from model_export.dataset import read_csv
    from model_export.schema_infer import apply_flags, infer_schema, schema_name_for

    schema = infer_schema(
        read_csv(args.data), label=args.label, bad_value=args.bad, name=schema_name_for(args.data)
    )
    schema = apply_flags(schema, exclude=args.exclude, sensitive=args.sensitive)
    schema.dump(args.out)
    print(f"wrote {args.out} ({schema.version}); review ranges and categories before use")
    return 0


def _report(args: argparse.Namespace) -> int:
    from model_export.report import ReportOptions, run_report

    # Options not given keep ReportOptions' defaults: one place states them.
    given = {
        name: getattr(args, name)
        for name in ("bootstrap", "seed", "min_group_size")
        if getattr(args, name) is not None
    }
    report = run_report(
        ReportOptions(
            outcomes=args.outcomes,
            out=args.out,
            definition=args.definition,
            champion_version=args.champion_version,
            challenger_version=args.challenger_version,
            **given,
        )
    )
    document = report.document
    for role in ("champion", "challenger"):
        metrics = document[role]
        auc = "undefined" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
        print(
            f"{role:<10} {metrics['model_version']}: auc {auc} brier {metrics['brier']:.4f} "
            f"approval {metrics['approval_rate']:.1%} on {document['counts']['compared']} decisions"
        )
    print(document["comparison"]["verdict_text"])
    print(f"wrote {', '.join(str(path) for path in report.paths)}")
    if not report.comparable:
        print("privscore-model report: no verdict: AUC is undefined", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privscore-model", description="Train, export, sign and verify privscore models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train the model families and write an artifact")
    _data_arguments(train)
    train.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    train.add_argument("--schema", type=Path, help="schema JSON (default: inferred from the CSV)")
    train.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for every random step")
    train.add_argument("--folds", type=int, default=5, help="CV folds (default 5)")
    train.add_argument("--cv-repeats", type=int, default=3, help="CV repeats (default 3)")
    train.add_argument("--holdout", type=float, default=0.25, help="holdout fraction")
    train.add_argument(
        "--families",
        default="logistic_regression,random_forest,gradient_boosting",
        help="comma-separated model families to compare",
    )
    train.add_argument(
        "--approval-cutoff",
        type=float,
        help="fairness report: approve when P(bad) < this (default: the development bad rate)",
    )
    train.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="parallel CV workers (results do not depend on it)",
    )
    train.add_argument("--citation", default="", help="data source citation for the model card")
    train.add_argument("--base-score", type=float, default=600.0, help="points at base odds")
    train.add_argument("--base-odds", type=float, default=50.0, help="good:bad odds at base score")
    train.add_argument("--pdo", type=float, default=20.0, help="points to double the odds")
    train.add_argument(
        "--no-lda-search",
        action="store_true",
        help="skip the search for a less discriminatory alternative (on by default: every "
        "shipped model should carry its answer; skip it only for quick iterations)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress on stderr")
    train.set_defaults(run=_train)

    verify = commands.add_parser("verify", help="check signature, hashes and ONNX parity")
    verify.add_argument("artifact", type=Path, metavar="DIR")
    verify.add_argument("--data", type=Path, required=True, help="CSV to check parity on")
    verify.add_argument("--public-key", type=Path, help="trusted key (default: the bundled one)")
    verify.add_argument("--tolerance", type=float, default=1e-5, help="max |P difference|")
    verify.set_defaults(run=_verify)

    sign = commands.add_parser("sign", help="sign an artifact's manifest with an Ed25519 key")
    sign.add_argument("artifact", type=Path, metavar="DIR")
    sign.add_argument("--key", type=Path, required=True, help="private key (PEM)")
    sign.set_defaults(run=_sign)

    drift = commands.add_parser(
        "drift-reference",
        help="add or refresh the manifest's training distribution (no retraining; unsigns)",
    )
    drift.add_argument("artifact", type=Path, metavar="DIR")
    drift.add_argument("--data", type=Path, required=True, help="the training data (CSV)")
    drift.set_defaults(run=_drift_reference)

    keygen = commands.add_parser("keygen", help="generate an Ed25519 key pair (PEM)")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to create")
    keygen.add_argument("--public-out", type=Path, required=True, help="public key file")
    keygen.set_defaults(run=_keygen)

    infer = commands.add_parser("infer-schema", help="write the schema inferred from a CSV")
    _data_arguments(infer)
    infer.add_argument("--out", type=Path, required=True, help="schema JSON to write")
    infer.set_defaults(run=_infer_schema)

    report = commands.add_parser(
        "report", help="compare champion and challenger on the same decisions' outcomes"
    )
    report.add_argument(
        "--outcomes", type=Path, required=True, help="`privscore audit outcomes` file (JSONL)"
    )
    report.add_argument("--out", type=Path, required=True, help="directory for report.*")
    report.add_argument("--definition", help="outcome definition (default: the file's only one)")
    report.add_argument("--bootstrap", type=int, help="bootstrap replicates (default 1000)")
    report.add_argument("--seed", type=int, help="bootstrap seed (default 42)")
    report.add_argument(
        "--min-group-size",
        type=int,
        help="age groups with fewer decisions are listed, not compared (default 30)",
    )
    report.add_argument(
        "--champion-version", help="compare this champion (default: the pair with most decisions)"
    )
    report.add_argument("--challenger-version", help="compare this challenger")
    report.set_defaults(run=_report)
    return parser


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="training data (CSV, header)")
    parser.add_argument("--label", required=True, help="label column")
    parser.add_argument("--bad", required=True, help="label value of the bad (default) class")
    parser.add_argument(
        "--exclude",
        action="extend",
        nargs="+",
        default=[],
        metavar="COL",
        help="exclude features from the model (adds to the schema's exclusions)",
    )
    parser.add_argument(
        "--sensitive",
        action="extend",
        nargs="+",
        default=[],
        metavar="COL",
        help="mark features sensitive: they get a fairness report",
    )


if __name__ == "__main__":
    sys.exit(main())
