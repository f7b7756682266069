"""Drift: PSI per feature and for the score against the manifest's training bins, the k rule
that keeps any applicant's rare bin out of every report, and the training distribution in the
bundled artifact (plus the model team's command that writes it)."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY
from service.model.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    ArtifactError,
    ArtifactFailure,
    CategoricalBins,
    Manifest,
    NumericBins,
    load_verified_manifest,
    read_manifest_document,
)
from service.monitoring import (
    PSI_ACT,
    PSI_WATCH,
    DriftMonitor,
    DriftReference,
    DriftReport,
    DriftStatus,
    psi,
)
from service.monitoring.drift import bin_labels

REPO_ROOT = Path(__file__).resolve().parents[2]
GERMAN_DATA = REPO_ROOT / "model_export" / "data" / "german_credit.csv"
K = 10

# x: 50 / 30 / 20 of 100 training rows; c: 40 / 40 / 20; score: 30 / 40 / 30.
REFERENCE = DriftReference(
    rows=100,
    features={
        "x": NumericBins((10.0, 20.0), (50, 30, 20)),
        "c": CategoricalBins(("a", "b", "c"), (40, 40, 20)),
    },
    score=NumericBins((500, 600), (30, 40, 30)),
)
X_VALUES = (5.0, 15.0, 25.0)  # one value inside each x bin
C_VALUES = ("a", "b", "c")
SCORES = (450, 550, 650)


def feed(monitor: DriftMonitor, x_bins: Sequence[int], c: str = "a", score: int = 550) -> None:
    """One decision per entry of `x_bins`, its x in that bin."""
    for index in x_bins:
        monitor.observe({"x": X_VALUES[index], "c": c, "extra": "ignored"}, score)


def spread(counts: Sequence[int]) -> list[int]:
    return [index for index, count in enumerate(counts) for _ in range(count)]


def monitor(window: int = 1000, min_count: int = K) -> DriftMonitor:
    return DriftMonitor(REFERENCE, window=window, min_count=min_count)


# PSI


def test_psi_matches_a_hand_computation():
    # (0.5-0.4)ln(0.5/0.4) + (0.3-0.4)ln(0.3/0.4) + 0 = 0.1 ln 1.25 + 0.1 ln(4/3)
    expected = 0.1 * math.log(1.25) + 0.1 * math.log(4 / 3)
    assert psi([0.5, 0.3, 0.2], [0.4, 0.4, 0.2]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.0510826, abs=1e-7)
    # An empty share counts as 1e-4.
    empty = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + 0.5 * math.log(1.0 / 0.5)
    assert psi([0.0, 1.0], [0.5, 0.5]) == pytest.approx(empty, rel=1e-12)


def test_the_monitor_reports_the_hand_computed_psi_with_labelled_bins():
    drift = monitor()
    feed(drift, spread([40, 40, 20]))  # served 0.4 / 0.4 / 0.2 against 0.5 / 0.3 / 0.2
    x = drift.report().window.features["x"]
    assert x.decisions == 100
    assert x.psi == pytest.approx(0.1 * math.log(1.25) + 0.1 * math.log(4 / 3), rel=1e-12)
    assert x.status is DriftStatus.OK
    assert [(b.label, b.count, b.served, b.training) for b in x.bins] == [
        ("<= 10", 40, 0.4, 0.5),
        ("(10, 20]", 40, 0.4, 0.3),
        ("> 20", 20, 0.2, 0.2),
    ]


def test_the_training_distribution_itself_is_ok_with_psi_zero():
    drift = monitor()
    x, c, scores = spread([50, 30, 20]), spread([40, 40, 20]), spread([30, 40, 30])
    for row in zip(x, c, scores, strict=True):
        drift.observe({"x": X_VALUES[row[0]], "c": C_VALUES[row[1]]}, SCORES[row[2]])
    report = drift.report()
    for name, feature in [*report.window.features.items(), ("score", report.window.score)]:
        assert feature.status is DriftStatus.OK, name
        assert feature.psi == pytest.approx(0.0, abs=1e-12), name
        assert [b.served for b in feature.bins] == pytest.approx([b.training for b in feature.bins])
    assert report.since_start == report.window


@pytest.mark.parametrize(
    ("counts", "status"),
    [([50, 30, 20], DriftStatus.OK), ([30, 40, 30], DriftStatus.WATCH), ([10, 30, 60], "act")],
)
def test_a_shifted_distribution_crosses_watch_then_act(counts, status):
    drift = monitor()
    feed(drift, spread(counts))
    x = drift.report().window.features["x"]
    assert x.psi is not None and x.status == status
    served = [count / 100 for count in counts]
    assert x.psi == pytest.approx(psi(served, [0.5, 0.3, 0.2]))
    assert (x.psi >= PSI_WATCH) == (status != DriftStatus.OK)
    assert (x.psi >= PSI_ACT) == (status == DriftStatus.ACT)


def test_the_score_is_binned_by_its_training_deciles():
    drift = monitor()
    for points in [450] * 10 + [500] * 10 + [501] * 30 + [600] * 20 + [601] * 30:
        drift.observe({"x": 5.0, "c": "a"}, points)
    score = drift.report().window.score
    assert [(b.label, b.count) for b in score.bins] == [
        ("<= 500", 20),
        ("(500, 600]", 50),
        ("> 600", 30),
    ]
    assert score.psi == pytest.approx(psi([0.2, 0.5, 0.3], [0.3, 0.4, 0.3]))


# The k rule


def test_fewer_than_k_decisions_report_nothing_but_their_number():
    drift = monitor()
    feed(drift, [0] * (K - 1))
    report = drift.report()
    for window in report.windows.values():
        assert window.decisions == K - 1
        for feature in [*window.features.values(), window.score]:
            assert (feature.status, feature.psi, feature.bins) == ("insufficient", None, ())


def test_rare_bins_are_pooled_and_never_reported_alone():
    drift = monitor()
    feed(drift, spread([60, 34, 6]))  # "> 20" has 6 < k: pooled, then too few: merged
    x = drift.report().window.features["x"]
    assert [(b.label, b.members, b.count) for b in x.bins] == [
        ("<= 10 + other bins (each < 10)", ("<= 10", "> 20"), 66),
        ("(10, 20]", ("(10, 20]",), 34),
    ]
    assert x.bins[0].training == pytest.approx(0.7)
    assert x.psi == pytest.approx(psi([0.66, 0.34], [0.7, 0.3]))  # on the same buckets

    # Categories "b" and "c" each below k but together >= k: one pooled bucket of their own.
    drift = monitor()
    for c, count in (("a", 80), ("b", 9), ("c", 6)):
        for _ in range(count):
            drift.observe({"x": 5.0, "c": c}, 550)
    c_drift = drift.report().window.features["c"]
    assert [(b.label, b.members, b.count) for b in c_drift.bins] == [
        ("a", ("a",), 80),
        ("other bins (each < 10)", ("b", "c"), 15),
    ]
    assert c_drift.bins[1].training == pytest.approx(0.6)


@pytest.mark.parametrize("others", [4, 6])  # rare bins pooled then merged (8 + 1 < k), or not
def test_one_applicant_in_one_rare_bin_or_another_gives_the_same_reports(others):
    """The inference attack: an observer who knows every other decision compares the reports
    of two worlds that differ only in which rare bin one applicant fell in, for x, c and the
    score at once."""

    def world(target: int) -> DriftReport:
        drift = monitor(window=200)
        feed(drift, [0] * 88, c="a", score=550)
        feed(drift, [1] * others, c="b", score=450)
        feed(drift, [2] * others, c="c", score=650)
        score = SCORES[0] if target == 1 else SCORES[2]  # 450 with the "b"s, 650 with the "c"s
        drift.observe({"x": X_VALUES[target], "c": C_VALUES[target]}, score)
        return drift.report()

    first, second = world(1), world(2)
    assert first == second
    rare = {"(10, 20]", "> 20", "b", "c", "<= 500", "> 600"}
    for window in first.windows.values():
        for feature in [*window.features.values(), window.score]:
            assert feature.psi is not None
            assert all(b.count >= K for b in feature.bins)
            assert not {b.label for b in feature.bins} & rare


@settings(max_examples=60, deadline=None)
@given(
    common=st.lists(st.integers(K, 40), min_size=1, max_size=3),
    rare=st.lists(st.integers(0, K - 2), min_size=2, max_size=4),
    moves=st.data(),
)
def test_moving_one_applicant_between_rare_bins_changes_no_report(common, rare, moves):
    """Property: whatever the counts, two worlds that differ only in which of two rare bins
    (each below k in both worlds) one applicant fell in give identical reports: counts,
    shares, labels, PSI and status, in both windows."""
    edges = tuple(float(edge) for edge in range(1, len(common) + len(rare)))
    bins = len(edges) + 1
    reference = DriftReference(
        rows=10 * bins,
        features={"x": NumericBins(edges, (10,) * bins)},
        score=NumericBins((), (10 * bins,)),
    )
    counts = common + rare  # common bins first, then the rare ones
    src = moves.draw(st.sampled_from(range(len(common), bins)), label="from")
    dst = moves.draw(st.sampled_from([b for b in range(len(common), bins) if b != src]))

    def world(target_bin: int) -> DriftReport:
        drift = DriftMonitor(reference, window=1000, min_count=K)
        for index, count in enumerate(counts):
            for _ in range(count):
                drift.observe({"x": float(index + 1)}, 500)
        drift.observe({"x": float(target_bin + 1)}, 500)  # bin i holds the value i + 1
        return drift.report()

    first, second = world(src), world(dst)
    assert first == second
    x = first.window.features["x"]
    assert all(b.count >= K for b in x.bins)
    labels = bin_labels(reference.features["x"])
    assert not {b.label for b in x.bins} & {labels[i] for i in range(len(common), bins)}


def test_the_attack_on_the_bundled_reference_fails_for_every_pair_of_rare_bins():
    """Against the real reference: k - 1 applicants share a rare purpose; one more applicant
    fell in one rare purpose or another, and nothing in the report tells which."""
    manifest = load_verified_manifest(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)
    reference = manifest.drift_reference
    assert reference is not None
    base = dict(manifest.reference_values)
    categories = manifest.schema.feature("purpose").categories or ()
    common, rare = categories[0], categories[-3:]

    def world(target: str) -> DriftReport:
        drift = DriftMonitor(reference, window=500, min_count=K)
        for _ in range(100):
            drift.observe({**base, "purpose": common}, 550)
        for _ in range(K - 2):
            drift.observe({**base, "purpose": rare[0]}, 550)
        drift.observe({**base, "purpose": target}, 550)
        return drift.report()

    reports = [world(target) for target in rare]
    assert reports[0] == reports[1] == reports[2]
    purpose = reports[0].window.features["purpose"]
    assert purpose.psi is not None
    assert not {b.label for b in purpose.bins} & set(rare)


def test_a_single_crowded_bin_still_reaches_act():
    # Every score in one bin: the k rule leaves one bucket, whose PSI would be 0; the lower
    # bound still flags it, and it does not depend on where the few others fell.
    reports = []
    for stray in (450, 650):
        drift = monitor()
        feed(drift, [0] * 95, score=550)
        for _ in range(3):
            drift.observe({"x": 5.0, "c": "a"}, stray)
        reports.append(drift.report())
    assert reports[0] == reports[1]
    score = reports[0].window.score
    assert [b.count for b in score.bins] == [98]
    # Bound: the others held at most k - 1 = 9 of 98 decisions.
    assert score.psi == pytest.approx(psi([89 / 98, 9 / 98], [0.4, 0.6]))
    assert score.status is DriftStatus.ACT


# Windows


def test_the_window_forgets_old_decisions_and_since_start_keeps_them():
    drift = monitor(window=30)
    feed(drift, [0] * 30)
    feed(drift, [2] * 20)
    report = drift.report()
    assert (report.window.decisions, report.since_start.decisions) == (30, 50)
    window = {b.label: b.count for b in report.window.features["x"].bins}
    assert window == {"<= 10": 10, "> 20 + other bins (each < 10)": 20}  # merged into largest
    since = {b.label: b.count for b in report.since_start.features["x"].bins}
    assert since == {"<= 10 + other bins (each < 10)": 30, "> 20": 20}
    feed(drift, [2] * 10)
    (only,) = drift.report().window.features["x"].bins  # "<= 10" has left the window
    assert (only.label, only.count) == ("> 20 + other bins (each < 10)", 30)
    assert only.members == ("<= 10", "(10, 20]", "> 20")


def test_the_window_ring_and_counters_agree_after_many_wraps():
    drift = monitor(window=37)
    sequence = [(i * 7) % 3 for i in range(1000)]
    feed(drift, sequence)
    report = drift.report()
    recent = sequence[-37:]
    window = {b.members: b.count for b in report.window.features["x"].bins}
    assert sum(window.values()) == 37
    if all(recent.count(i) >= K for i in range(3)):
        assert window == {
            ("<= 10",): recent.count(0),
            ("(10, 20]",): recent.count(1),
            ("> 20",): recent.count(2),
        }
    since = {b.members: b.count for b in report.since_start.features["x"].bins}
    assert since == {
        (label,): sequence.count(i) for i, label in enumerate(["<= 10", "(10, 20]", "> 20"])
    }


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="min_count"):
        DriftMonitor(REFERENCE, window=100, min_count=9)
    with pytest.raises(ValueError, match="window"):
        DriftMonitor(REFERENCE, window=9, min_count=10)


@pytest.mark.parametrize(
    "row",
    [{"x": 5.0}, {"x": "5", "c": "a"}, {"x": math.nan, "c": "a"}, {"x": 5.0, "c": "zz"}],
)
def test_a_row_that_cannot_be_binned_counts_nothing_and_quotes_nothing(row):
    drift = monitor()
    feed(drift, [0] * 20)
    before = drift.report()
    with pytest.raises(ValueError) as caught:
        drift.observe(row, 550)
    assert "zz" not in str(caught.value) and "'5'" not in str(caught.value)
    assert drift.report() == before


def test_observe_and_report_from_several_threads():
    drift = monitor(window=500)
    done = threading.Event()
    reports: list[DriftReport] = []

    def scrape() -> None:
        while not done.is_set():
            reports.append(drift.report())

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=feed, args=(drift, [i % 3] * 400)) for i in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    scraper.join()
    final = drift.report()
    assert final.since_start.decisions == 2400 and final.window.decisions == 500
    assert sum(b.count for b in final.since_start.features["x"].bins) == 2400
    assert sum(b.count for b in final.window.features["c"].bins) == 500
    for report in reports:  # every snapshot is consistent: its counts sum to its decisions
        for window in report.windows.values():
            for feature in window.features.values():
                assert not feature.bins or sum(b.count for b in feature.bins) == window.decisions


# The reference in the bundled artifact


def test_the_bundled_manifest_carries_the_development_distribution():
    manifest = load_verified_manifest(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)
    reference = manifest.drift_reference
    assert reference is not None
    assert reference.rows == manifest.training["development_rows"] == 750
    assert list(reference.features) == [spec.name for spec in manifest.schema.model_features]
    for spec in manifest.schema.model_features:
        bins = reference.features[spec.name]
        assert sum(bins.counts) == reference.rows, spec.name
        if spec.is_numeric:
            assert isinstance(bins, NumericBins) and 1 <= len(bins.edges) <= 9
            assert all(count > 0 for count in bins.counts), spec.name  # no empty training bin
        else:
            assert isinstance(bins, CategoricalBins) and bins.categories == spec.categories
    assert sum(reference.score.counts) == reference.rows
    assert len(reference.score.edges) == 9
    assert all(isinstance(edge, int) for edge in reference.score.edges)  # scores are integers
    assert all(60 <= count <= 90 for count in reference.score.counts)  # deciles, with ties
    credit_amount = reference.features["credit_amount"]
    assert isinstance(credit_amount, NumericBins) and len(credit_amount.counts) == 10

    drift = DriftMonitor(reference, window=100, min_count=K)
    for _ in range(20):
        drift.observe(manifest.reference_values, 600)
    window = drift.report().window
    assert set(window.features) == set(reference.features)
    assert window.score.status is DriftStatus.ACT  # every score in one bin


def test_a_manifest_without_the_section_still_loads():
    document = read_manifest_document(DEFAULT_MODEL_DIR)
    del document["drift_reference"]
    manifest = Manifest.from_dict(document)
    assert manifest.drift_reference is None
    assert "drift_reference" not in manifest.to_dict()
    assert manifest.to_dict() == document  # an older manifest writes back exactly as it was


def test_the_section_round_trips_and_a_wrong_one_is_malformed():
    document = read_manifest_document(DEFAULT_MODEL_DIR)
    assert Manifest.from_dict(document).to_dict() == document
    shuffled = json.loads(json.dumps(document, sort_keys=True))  # object order is not signed
    reference = Manifest.from_dict(shuffled).drift_reference
    assert reference is not None and list(reference.features) == list(
        document["drift_reference"]["features"]
    )
    for spoil in (
        lambda d: d["features"]["credit_amount"]["counts"].append(0),
        lambda d: d["features"]["credit_amount"]["edges"].reverse(),
        lambda d: d["features"]["purpose"]["categories"].reverse(),
        lambda d: d["features"].pop("purpose"),
        lambda d: d["score"]["counts"].__setitem__(0, -1),
        lambda d: d.__setitem__("rows", 751),
        lambda d: d["features"]["duration_in_month"].__setitem__("kind", "categorical"),
    ):
        spoiled = json.loads(json.dumps(document))
        spoil(spoiled["drift_reference"])
        with pytest.raises(ArtifactError) as caught:
            Manifest.from_dict(spoiled)
        assert caught.value.reason is ArtifactFailure.MALFORMED


def test_the_drift_reference_command_rewrites_the_section_and_unsigns(tmp_path: Path, capsys):
    pytest.importorskip("sklearn", reason="the train extra is not installed")
    from model_export.cli import main
    from model_export.sign import generate_keypair

    artifact = tmp_path / "artifact"
    shutil.copytree(DEFAULT_MODEL_DIR, artifact)
    committed = read_manifest_document(DEFAULT_MODEL_DIR)
    older = dict(committed)
    del older["drift_reference"]
    (artifact / MANIFEST_FILE).write_text(json.dumps(older, indent=2))
    (artifact / "model_card.md").write_text("stale")

    assert main(["drift-reference", str(artifact), "--data", str(GERMAN_DATA)]) == 0
    assert "unsigned" in capsys.readouterr().out
    assert not (artifact / SIGNATURE_FILE).exists()
    assert read_manifest_document(artifact) == committed  # the same section, nothing else
    assert (artifact / MANIFEST_FILE).read_bytes() == (
        DEFAULT_MODEL_DIR / MANIFEST_FILE
    ).read_bytes()
    assert (artifact / "model_card.md").read_bytes() == (
        DEFAULT_MODEL_DIR / "model_card.md"
    ).read_bytes()
    assert (artifact / "model.onnx").read_bytes() == (DEFAULT_MODEL_DIR / "model.onnx").read_bytes()

    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert main(["sign", str(artifact), "--key", str(tmp_path / "k.key")]) == 0
    verify = ["verify", str(artifact), "--data", str(GERMAN_DATA), "--public-key"]
    assert main([*verify, str(tmp_path / "k.pub")]) == 0

    other = tmp_path / "other.csv"  # not the training data: refused, nothing written
    lines = GERMAN_DATA.read_text().splitlines(keepends=True)
    other.write_text("".join(lines[:-1]))
    assert main(["drift-reference", str(artifact), "--data", str(other)]) == 1
    assert "not the data set the model was trained on" in capsys.readouterr().err
    assert (artifact / SIGNATURE_FILE).exists()
