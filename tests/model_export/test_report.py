"""`privscore-model report`: champion and challenger compared on the same decisions' outcomes.

Outcome files are synthetic and seeded: a latent risk drives who goes bad, and each model's PD
sees that risk through its own amount of noise, so which model is better is known in advance.
"""

from __future__ import annotations

import json
import math
import os
import stat
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model_export.cli import main
from model_export.outcomes import OutcomesFormatError, read_outcomes
from model_export.report import (
    JSON_FILE,
    MARKDOWN_FILE,
    PNG_FILE,
    ReportError,
    ReportOptions,
    paired_bootstrap,
    run_report,
    weighted_auc,
)

from .conftest import REPO_ROOT

DEFINITION = "DPD90_WITHIN_12M"
HEADER = {"format": "privscore-outcomes/1", "exported_at": "2026-03-01T00:00:00Z"}
AGES = ("under_25", "25_34", "35_49", "50_plus")


def assessment(version: str, pd: float, decision: str | None = None) -> dict[str, Any]:
    if decision is None:
        decision = "APPROVE" if pd < 0.25 else "REVIEW" if pd < 0.4 else "DECLINE"
    score = round(600 - 20 * math.log2(max(pd, 1e-9) / max(1 - pd, 1e-9) * 50))
    return {"model_version": version, "pd": pd, "score": score, "decision": decision}


def line(
    number: int,
    outcome: str,
    champion: dict[str, Any],
    challenger: dict[str, Any] | None,
    age_group: str | None = "35_49",
    definition: str = DEFINITION,
) -> dict[str, Any]:
    return {
        "decision_id": f"dec-{number:06d}",
        "time": f"2025-01-{1 + number % 28:02d}T10:00:00Z",
        "definition": definition,
        "outcome": outcome,
        "observed_at": "2026-02-01T00:00:00Z",
        "champion": champion,
        "challenger": challenger,
        "age_group": age_group,
    }


def write_lines(path: Path, lines: Sequence[dict[str, Any]], header: bool = True) -> Path:
    documents = [HEADER, *lines] if header else list(lines)
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return path


def synthetic(
    n: int,
    seed: int,
    *,
    champion_noise: float,
    challenger_noise: float | None,
    indeterminate: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Decisions whose bad outcome follows a latent risk; each model's PD is that risk plus
    its own noise (None: the challenger is the champion itself, PD for PD)."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    bad = rng.random(n) < 1 / (1 + np.exp(-(-1.8 + 1.4 * risk)))
    champion_pd = 1 / (1 + np.exp(-(-1.8 + 1.4 * risk + rng.normal(0, champion_noise, n))))
    if challenger_noise is None:
        challenger_pd = champion_pd
    else:
        challenger_pd = 1 / (1 + np.exp(-(-1.8 + 1.4 * risk + rng.normal(0, challenger_noise, n))))
    ages = rng.choice(AGES, size=n, p=[0.15, 0.3, 0.35, 0.2])
    undetermined = rng.random(n) < indeterminate
    for i in range(n):
        outcome = "INDETERMINATE" if undetermined[i] else "BAD" if bad[i] else "GOOD"
        yield line(
            i,
            outcome,
            assessment("champ-1", round(float(champion_pd[i]), 9)),
            assessment("chall-1", round(float(challenger_pd[i]), 9)),
            str(ages[i]),
        )


def report(tmp_path: Path, lines: Sequence[dict[str, Any]], **options: Any) -> dict[str, Any]:
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    result = run_report(ReportOptions(outcomes=source, out=tmp_path / "report", **options))
    return result.document


def delong(bad: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """DeLong, DeLong and Clarke-Pearson (1988): the AUC difference (second minus first) and
    its standard error for two correlated ROC curves; an independent check of the bootstrap."""
    positives, negatives = first[bad == 1], first[bad == 0]
    components = []
    for scores in (first, second):
        pos, neg = scores[bad == 1], scores[bad == 0]
        kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        components.append((kernel.mean(axis=1), kernel.mean(axis=0), kernel.mean()))
    v10 = np.array([components[0][0], components[1][0]])
    v01 = np.array([components[0][1], components[1][1]])
    covariance = np.cov(v10) / len(positives) + np.cov(v01) / len(negatives)
    contrast = np.array([-1.0, 1.0])
    return components[1][2] - components[0][2], float(np.sqrt(contrast @ covariance @ contrast))


def test_a_clearly_better_challenger_wins_with_an_interval_excluding_zero(tmp_path: Path):
    document = report(tmp_path, list(synthetic(1500, 11, champion_noise=1.6, challenger_noise=0.2)))
    comparison = document["comparison"]
    assert comparison["verdict"] == "challenger_better"
    assert comparison["verdict_text"].startswith("The challenger's AUC is higher")
    low, high = comparison["auc_difference_ci"]
    assert 0 < low < comparison["auc_difference"] < high
    assert document["challenger"]["auc"] > document["champion"]["auc"] + 0.05
    assert comparison["replicates"] == comparison["replicates_used"] == 1000
    assert comparison["brier_difference"] < 0  # the sharper PD is also the more accurate
    markdown = (tmp_path / "report" / MARKDOWN_FILE).read_text()
    assert comparison["verdict_text"] in markdown and "Selection bias" in markdown


def test_a_worse_challenger_loses(tmp_path: Path):
    document = report(tmp_path, list(synthetic(1500, 12, champion_noise=0.2, challenger_noise=1.6)))
    assert document["comparison"]["verdict"] == "champion_better"
    assert document["comparison"]["auc_difference_ci"][1] < 0


def test_the_same_model_shows_no_difference(tmp_path: Path):
    document = report(tmp_path, list(synthetic(800, 13, champion_noise=0.8, challenger_noise=None)))
    comparison = document["comparison"]
    assert comparison["verdict"] == "no_significant_difference"
    assert comparison["auc_difference"] == 0 and comparison["auc_difference_ci"] == [0, 0]
    assert document["champion"]["auc"] == document["challenger"]["auc"]


def test_equally_good_models_show_no_significant_difference(tmp_path: Path):
    document = report(tmp_path, list(synthetic(800, 14, champion_noise=0.8, challenger_noise=0.8)))
    comparison = document["comparison"]
    assert comparison["verdict"] == "no_significant_difference"
    low, high = comparison["auc_difference_ci"]
    assert low < 0 < high
    assert "No significant difference in AUC" in comparison["verdict_text"]


def test_the_bootstrap_interval_agrees_with_delong(tmp_path: Path):
    lines = list(synthetic(1200, 15, champion_noise=1.0, challenger_noise=0.6))
    document = report(tmp_path, lines, bootstrap=2000)
    bad = np.array([d["outcome"] == "BAD" for d in lines], dtype=np.int64)
    first = np.array([d["champion"]["pd"] for d in lines])
    second = np.array([d["challenger"]["pd"] for d in lines])
    difference, error = delong(bad, first, second)
    comparison = document["comparison"]
    assert comparison["auc_difference"] == pytest.approx(difference, abs=1e-6)
    low, high = comparison["auc_difference_ci"]
    assert low == pytest.approx(difference - 1.96 * error, abs=0.25 * 1.96 * error)
    assert high == pytest.approx(difference + 1.96 * error, abs=0.25 * 1.96 * error)


def test_tiny_file_matches_hand_computed_auc_ks_and_brier(tmp_path: Path):
    # Pairs (bad, good): 0.35 > 0.10 yes, 0.35 > 0.40 no, 0.80 above both: AUC 3/4.
    # KS: at a cutoff of 0.8 half the bads and no good are caught; at 0.35 all bads and half
    # the goods: 0.5 either way. Brier: (0.1^2 + 0.4^2 + 0.65^2 + 0.2^2) / 4.
    champion = [(0.10, "GOOD"), (0.40, "GOOD"), (0.35, "BAD"), (0.80, "BAD")]
    challenger = [0.2, 0.2, 0.6, 0.2]  # ties: bad 0.6 beats both; bad 0.2 ties both: 3/4
    lines = [
        line(i, outcome, assessment("a", pd), assessment("b", other))
        for i, ((pd, outcome), other) in enumerate(zip(champion, challenger, strict=True))
    ]
    document = report(tmp_path, lines, min_group_size=1)
    bad = [1 if outcome == "BAD" else 0 for _, outcome in champion]
    assert document["champion"]["auc"] == 0.75
    assert document["champion"]["auc"] == pytest.approx(
        roc_auc_score(bad, [pd for pd, _ in champion])
    )
    assert document["champion"]["ks"] == 0.5
    assert document["champion"]["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert document["challenger"]["auc"] == 0.75 == roc_auc_score(bad, challenger)
    assert document["challenger"]["brier"] == pytest.approx((0.04 + 0.04 + 0.16 + 0.64) / 4)
    assert document["comparison"]["auc_difference"] == 0
    # Caveat for the size of the sample, and approvals (pd < 0.25 approves here).
    assert any(c.startswith("Small sample: only 2") for c in document["caveats"])
    assert document["champion"]["approval_rate"] == 0.25
    assert document["champion"]["bad_rate_among_approved"] == 0
    assert document["challenger"]["bad_rate_among_approved"] == pytest.approx(1 / 3, abs=1e-6)


def test_weighted_auc_matches_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(3)
    pd = np.round(rng.random(300), 1)  # many ties
    bad = (rng.random(300) < pd).astype(np.int64)
    weights = rng.integers(0, 4, size=(5, 300)).astype(np.float64)
    found = weighted_auc(pd, bad, np.vstack([np.ones(300), weights]))
    assert found[0] == pytest.approx(roc_auc_score(bad, pd))
    for row, value in zip(weights, found[1:], strict=True):
        assert value == pytest.approx(roc_auc_score(bad, pd, sample_weight=row))
    only_goods = np.where(bad == 1, 0.0, 1.0)[None, :]
    assert np.isnan(weighted_auc(pd, bad, only_goods)[0])


def test_the_bootstrap_is_seeded_and_independent_of_block_size(monkeypatch):
    rng = np.random.default_rng(4)
    bad = (rng.random(500) < 0.3).astype(np.int64)
    first, second = rng.random(500), rng.random(500)
    one = paired_bootstrap(bad, first, second, 300, seed=9)
    monkeypatch.setattr("model_export.report._BLOCK", 500 * 7)  # blocks of 7 replicates
    again = paired_bootstrap(bad, first, second, 300, seed=9)
    assert np.array_equal(one.challenger_auc, again.challenger_auc)
    assert np.array_equal(one.brier_difference, again.brier_difference)
    other = paired_bootstrap(bad, first, second, 300, seed=10)
    assert not np.array_equal(one.champion_auc, other.champion_auc)


def test_same_input_and_seed_give_the_same_files(tmp_path: Path):
    lines = list(synthetic(400, 16, champion_noise=1.0, challenger_noise=0.5))
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    outputs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_report(ReportOptions(outcomes=source, out=tmp_path / name, seed=seed))
        outputs.append({f: (tmp_path / name / f).read_bytes() for f in (JSON_FILE, PNG_FILE)})
    assert outputs[0] == outputs[1]
    assert outputs[0][JSON_FILE] != outputs[2][JSON_FILE]


def test_calibration_deciles_sum_to_the_counts(tmp_path: Path):
    document = report(tmp_path, list(synthetic(1003, 17, champion_noise=0.7, challenger_noise=0.5)))
    counts = document["counts"]
    for role in ("champion", "challenger"):
        table = document[role]["calibration"]
        assert [row["bin"] for row in table] == list(range(1, 11))
        assert sum(row["n"] for row in table) == counts["compared"]
        bads = sum(round(row["n"] * row["observed_bad_rate"]) for row in table)
        assert bads == counts["bad"]
        means = [row["mean_predicted"] for row in table]
        assert means == sorted(means)
        decisions = document[role]["decisions"]
        assert sum(decisions.values()) == counts["compared"]


def test_age_group_ratio_leaves_out_small_groups_and_unknown_ages(tmp_path: Path):
    lines = []
    # (group, decisions, approved): under_25 is under the minimum size; None is unknown.
    plan: list[tuple[str | None, int, int]] = [
        ("25_34", 40, 30), ("35_49", 50, 40), ("50_plus", 40, 20), ("under_25", 5, 0), (None, 3, 3),
    ]  # fmt: skip
    number = 0
    for group, size, approved in plan:
        for k in range(size):
            decision = "APPROVE" if k < approved else "DECLINE"
            outcome = "BAD" if k % 4 == 0 else "GOOD"
            champion = assessment("a", 0.1 if decision == "APPROVE" else 0.6, decision)
            lines.append(line(number, outcome, champion, assessment("b", 0.2, "APPROVE"), group))
            number += 1
    document = report(tmp_path, lines, min_group_size=30)
    ages = document["champion"]["age_groups"]
    assert [g["group"] for g in ages["groups"]] == ["25_34", "35_49", "50_plus"]
    assert [g["approval_rate"] for g in ages["groups"]] == [0.75, 0.8, 0.5]
    assert ages["excluded_small_groups"] == [{"group": "under_25", "n": 5}]
    assert ages["unknown"] == 3
    assert (ages["lowest_group"], ages["highest_group"]) == ("50_plus", "35_49")
    assert ages["approval_rate_ratio"] == 0.625 and ages["four_fifths_rule_met"] is False
    challenger = document["challenger"]["age_groups"]  # approves everyone
    assert challenger["approval_rate_ratio"] == 1.0 and challenger["four_fifths_rule_met"]
    markdown = (tmp_path / "report" / MARKDOWN_FILE).read_text()
    assert "| under_25 | 5 | under 30: not compared" in markdown
    assert "Ratio 50_plus / 35_49: 0.625 (fails the four-fifths rule)" in markdown
    # Raised above every group: no ratio, said plainly.
    document = report(tmp_path, lines, min_group_size=60)
    assert document["champion"]["age_groups"]["approval_rate_ratio"] is None
    assert "fewer than two age groups" in document["champion"]["age_groups"]["ratio_undefined"]


def test_indeterminate_and_unpaired_decisions_are_counted_and_left_out(tmp_path: Path):
    lines = list(synthetic(600, 18, champion_noise=0.8, challenger_noise=0.6, indeterminate=0.1))
    for extra in range(5):  # no challenger in shadow
        lines.append(line(10_000 + extra, "BAD", assessment("champ-1", 0.5), None))
    for extra in range(4):  # after a promotion: another pair
        lines.append(
            line(20_000 + extra, "GOOD", assessment("chall-1", 0.1), assessment("c3", 0.1))
        )
    for extra in range(3):  # another definition
        lines.append(
            line(
                30_000 + extra,
                "GOOD",
                assessment("champ-1", 0.1),
                assessment("chall-1", 0.1),
                definition="DPD30_WITHIN_6M",
            )
        )
    indeterminate = sum(d["outcome"] == "INDETERMINATE" for d in lines)
    assert indeterminate > 0
    document = report(tmp_path, lines, definition=DEFINITION)
    counts = document["counts"]
    assert counts["indeterminate"] == indeterminate
    assert counts["without_challenger"] == 5
    assert counts["other_model_pairs"] == 4
    assert counts["other_definitions"] == 3
    assert counts["compared"] == 600 - indeterminate == counts["bad"] + counts["good"]
    assert counts["records"] == sum(
        v for k, v in counts.items() if k not in {"records", "bad", "good"}
    )
    assert document["model_pairs"] == [
        {"champion": "champ-1", "challenger": "chall-1", "decisions": 600},
        {"champion": "chall-1", "challenger": "c3", "decisions": 4},
    ]
    assert any(f"{indeterminate} decisions with an INDETERMINATE" in c for c in document["caveats"])
    # The other pair can be asked for by name.
    other = report(tmp_path, lines, definition=DEFINITION, champion_version="chall-1")
    assert other["counts"]["compared"] == 4 and other["challenger"]["model_version"] == "c3"
    # Two definitions and none chosen: refused, naming them.
    source = write_lines(tmp_path / "two.jsonl", lines, header=False)
    with pytest.raises(ReportError, match=r"several definitions.*DPD30_WITHIN_6M.*--definition"):
        run_report(ReportOptions(outcomes=source, out=tmp_path / "x"))


def test_no_decision_with_a_challenger_is_a_clear_error(tmp_path: Path, capsys):
    lines = [line(i, "BAD" if i % 2 else "GOOD", assessment("a", 0.3), None) for i in range(6)]
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    with pytest.raises(ReportError, match=r"none of the 6 decisions .* has a challenger"):
        run_report(ReportOptions(outcomes=source, out=tmp_path / "report"))
    assert main(["report", "--outcomes", str(source), "--out", str(tmp_path / "report")]) == 1
    assert "has a challenger" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_one_outcome_class_says_auc_is_undefined_and_still_reports(tmp_path: Path, capsys):
    lines = [
        line(i, "GOOD", assessment("a", 0.1 + i / 100), assessment("b", 0.2)) for i in range(12)
    ]
    lines.append(line(99, "INDETERMINATE", assessment("a", 0.5), assessment("b", 0.5)))
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    out = tmp_path / "report"
    assert main(["report", "--outcomes", str(source), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "AUC is undefined" in captured.out and "no verdict" in captured.err
    document = json.loads((out / JSON_FILE).read_text())
    assert document["champion"]["auc"] is None and document["champion"]["ks"] is None
    assert document["comparison"]["verdict"] == "undefined"
    assert "every compared decision has a GOOD outcome" in document["comparison"]["verdict_text"]
    assert document["champion"]["brier"] > 0 and (out / PNG_FILE).stat().st_size > 0
    assert "| AUC | undefined | undefined |" in (out / MARKDOWN_FILE).read_text()
    # Every outcome INDETERMINATE: nothing at all to compare.
    only = write_lines(tmp_path / "only.jsonl", lines[-1:])
    with pytest.raises(ReportError, match="INDETERMINATE"):
        run_report(ReportOptions(outcomes=only, out=tmp_path / "other"))


GOOD_LINE = line(1, "BAD", assessment("a", 0.3), assessment("b", 0.4), "25_34")


def _changed(**changes: Any) -> str:
    document = json.loads(json.dumps(GOOD_LINE))
    for key, value in changes.items():
        target = document
        *parents, last = key.split("__")
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return json.dumps(document)


_DELETE = object()
SECRET = "applicant-7731-secret"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        (f'{{"decision_id": "{SECRET}", ', "not valid JSON"),
        (f'["{SECRET}"]', "not a JSON object"),
        (_changed(decision_id=12345), "decision_id is missing"),
        (_changed(outcome=SECRET), "outcome is not one of"),
        (_changed(time=SECRET), "time is not an RFC 3339 time"),
        (_changed(time="2025-01-01T10:00:00"), "time has no UTC offset"),
        (_changed(champion__pd=1.5), "champion.pd is outside"),
        (_changed(champion__pd="0.3"), "champion.pd is not a number"),
        (_changed(challenger__pd=True), "challenger.pd is not a number"),
        (_changed(challenger__decision=SECRET), "challenger.decision is not one of"),
        (_changed(champion__model_version=None), "champion.model_version is missing"),
        (_changed(champion__score=1.5), "champion.score is not an integer"),
        (_changed(challenger=_DELETE), "no challenger field"),
        (_changed(age_group=SECRET), "age_group is not one of"),
        (json.dumps({"format": "privscore-outcomes/2"}), "a header of another format"),
        (json.dumps(HEADER), "a header after the first line"),
        (json.dumps(GOOD_LINE), "the decision and definition of line 2 again"),
    ],
)
def test_a_malformed_line_is_named_by_number_never_by_value(
    tmp_path: Path, bad_line: str, message: str
):
    source = tmp_path / "outcomes.jsonl"
    source.write_text(
        "\n".join([json.dumps(HEADER), json.dumps(GOOD_LINE), "", bad_line.replace("\n", "")])
        + "\n"
    )
    with pytest.raises(OutcomesFormatError) as caught:
        read_outcomes(source)
    assert str(caught.value).startswith(f"line 4: {message}")
    assert SECRET not in str(caught.value) and "dec-" not in str(caught.value)
    assert main(["report", "--outcomes", str(source), "--out", str(tmp_path / "r")]) == 1


def test_a_file_that_is_not_utf8_is_refused_by_line(tmp_path: Path):
    source = tmp_path / "outcomes.jsonl"
    source.write_bytes(json.dumps(HEADER).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(OutcomesFormatError, match=r"^line 2: not UTF-8"):
        read_outcomes(source)


def test_files_are_owner_only_whatever_the_umask(tmp_path: Path):
    lines = list(synthetic(200, 19, champion_noise=1.0, challenger_noise=0.5))
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    out = tmp_path / "new" / "report"
    previous = os.umask(0)
    try:
        result = run_report(ReportOptions(outcomes=source, out=out))
        run_report(ReportOptions(outcomes=source, out=out))  # replaces, still owner-only
    finally:
        os.umask(previous)
    assert {path.name for path in out.iterdir()} == {JSON_FILE, MARKDOWN_FILE, PNG_FILE}
    for path in result.paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    for directory in (out, out.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_report_runs_as_a_module_end_to_end(tmp_path: Path):
    lines = list(synthetic(1000, 20, champion_noise=1.6, challenger_noise=0.2, indeterminate=0.05))
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "model_export", "report", "--outcomes", str(source)]
    done = subprocess.run(
        [*command, "--out", str(out), "--bootstrap", "500", "--seed", "3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "The challenger's AUC is higher and the interval excludes 0" in done.stdout
    document = json.loads((out / JSON_FILE).read_text())
    assert document["format"] == "privscore-outcome-report/1"
    assert document["definition"] == DEFINITION
    assert document["comparison"]["replicates"] == 500 and document["comparison"]["seed"] == 3
    assert (out / PNG_FILE).read_bytes().startswith(b"\x89PNG")
    ages = [g["group"] for g in document["champion"]["age_groups"]["groups"]]
    assert ages == list(AGES)
    days = statistics.median(
        (np.datetime64(d["observed_at"][:-1]) - np.datetime64(d["time"][:-1]))
        / np.timedelta64(1, "D")
        for d in lines
        if d["outcome"] != "INDETERMINATE"
    )
    assert document["period"]["days_to_outcome_median"] == pytest.approx(days)


def test_too_few_bootstrap_replicates_are_refused(tmp_path: Path, capsys):
    lines = list(synthetic(100, 21, champion_noise=1.0, challenger_noise=0.5))
    source = write_lines(tmp_path / "outcomes.jsonl", lines)
    arguments = ["report", "--outcomes", str(source), "--out", str(tmp_path / "report")]
    assert main([*arguments, "--bootstrap", "10"]) == 1
    assert "--bootstrap must be at least" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
