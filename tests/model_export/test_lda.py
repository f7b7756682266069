"""The LDA search (issue 18): the rule on tables, reweighing, proxy ranking, the space's bound,
and what `privscore-model train` leaves behind when a candidate meets the rule and when none
does (the table pinned in the signed manifest, the card with the frontier and the statement).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_export import lda
from model_export.cli import main
from model_export.dataset import feature_matrix, labels, read_csv
from model_export.drift_reference import development_split
from model_export.families import FAMILIES, GRADIENT_BOOSTING, RANDOM_FOREST
from model_export.lda import (
    AUC_TOLERANCE,
    Attribute,
    Candidate,
    Scored,
    SearchInputs,
    candidate_space,
    rank_proxies,
    reweighing_weights,
    run_search,
    select,
    space_bound,
)
from model_export.schema_infer import apply_flags, infer_schema
from service.model.manifest import MANIFEST_FILE, load_verified_manifest
from service.model.schema import FeatureSchema, FeatureSpec

from .conftest import FAST_TRAIN, GERMAN_SCHEMA, KeyPair


def table(*rows: tuple[str, float, float | None]) -> list[Scored]:
    return [Scored(name, auc, ratio) for name, auc, ratio in rows]


# The rule -------------------------------------------------------------------------------


def test_the_rule_picks_the_highest_ratio_among_candidates_within_the_band():
    selection = select(
        table(
            ("best", 0.790, 0.60),
            ("mid", 0.785, 0.70),
            ("close", 0.782, 0.85),
            ("fairest-but-worse", 0.779, 0.99),  # 0.011 below the best: outside the band
        )
    )
    assert selection.best == "best" and selection.best_cv_auc == 0.790
    assert selection.eligible == ("best", "mid", "close")
    assert selection.chosen == "close" and selection.chosen_ratio == 0.85
    assert selection.meets_rule
    assert selection.statement.startswith("close meets the rule")


def test_a_gap_of_exactly_the_tolerance_is_within_the_band():
    assert AUC_TOLERANCE < 0.79 - 0.78  # what binary floating point alone would conclude
    selection = select(table(("best", 0.79, 0.5), ("edge", 0.78, 0.9), ("out", 0.779999, 1.0)))
    assert selection.eligible == ("best", "edge")
    assert selection.chosen == "edge"


def test_ties_go_to_the_higher_auc_then_to_the_earlier_candidate():
    tied = select(table(("a", 0.780, 0.9), ("b", 0.785, 0.9), ("c", 0.789, 0.5)))
    assert tied.chosen == "b"
    same = select(table(("first", 0.785, 0.9), ("second", 0.785, 0.9)))
    assert same.chosen == "first" and same.best == "first"


def test_the_rule_says_plainly_when_no_candidate_meets_four_fifths():
    selection = select(table(("best", 0.790, 0.57), ("better", 0.788, 0.73), ("far", 0.760, 0.95)))
    assert selection.chosen == "better"  # still the least discriminatory within the band
    assert not selection.meets_rule
    assert selection.statement.startswith("No candidate meets the rule")
    assert "0.730" in selection.statement and "four-fifths" in selection.statement
    exactly = select(table(("best", 0.790, 0.57), ("edge", 0.785, 0.80)))
    assert exactly.meets_rule and exactly.chosen == "edge"


def test_without_a_measured_attribute_nothing_is_chosen():
    selection = select(table(("a", 0.79, None), ("b", 0.78, None)))
    assert selection.chosen is None and not selection.meets_rule
    assert selection.statement.startswith("No candidate meets the rule")
    with pytest.raises(ValueError):
        select([])


# Reweighing and proxies -----------------------------------------------------------------


def test_reweighing_makes_label_independent_of_group_and_keeps_sizes():
    rng = np.random.default_rng(5)
    groups = rng.choice(np.array(["x", "y", "z"], dtype=object), 900, p=[0.6, 0.3, 0.1])
    bad_rate = np.select([groups == "x", groups == "y"], [0.2, 0.45], 0.6)
    y = (rng.random(900) < bad_rate).astype(np.int64)
    weights = reweighing_weights(groups, y)
    assert weights.sum() == pytest.approx(len(y))
    for group in ("x", "y", "z"):
        members = groups == group
        assert weights[members].sum() == pytest.approx(members.sum())
        weighted_bad = weights[members & (y == 1)].sum() / weights[members].sum()
        assert weighted_bad == pytest.approx(y.mean())
    # Groups sharing the overall bad rate already: every weight is one.
    balanced = np.array(["a", "a", "b", "b"] * 25, dtype=object)
    assert np.allclose(reweighing_weights(balanced, np.array([0, 1] * 50)), 1.0)


def test_proxy_ranking_finds_a_planted_proxy():
    rng = np.random.default_rng(3)
    rows = 800
    group = rng.choice(np.array(["f", "m"], dtype=object), rows)
    planted = np.where(rng.random(rows) < 0.8, np.where(group == "f", "p", "q"), "r")
    shifted = rng.normal(0.0, 1.0, rows) + np.where(group == "f", 0.6, 0.0)  # a weaker one
    noise_cat = rng.choice([f"c{i}" for i in range(12)], rows)  # many categories, no link
    noise_num = rng.normal(0.0, 1.0, rows)
    age = rng.integers(18, 70, rows).astype(float)
    schema = FeatureSchema(
        "proxies",
        "label",
        "bad",
        (
            FeatureSpec("noise_cat", "categorical", categories=tuple(sorted(set(noise_cat)))),
            FeatureSpec("noise_num", "numeric"),
            FeatureSpec("shifted", "numeric"),
            FeatureSpec("planted", "categorical", categories=("p", "q", "r")),
            FeatureSpec("age", "numeric", sensitive=True),
        ),
    )
    x = np.empty((rows, 5), dtype=object)
    for j, column in enumerate((noise_cat, noise_num, shifted, planted, age)):
        x[:, j] = column
    sizes = {"f": int((group == "f").sum()), "m": int((group == "m").sum())}
    attribute = Attribute("sex", group, ("f", "m"), sizes, None)
    ranked = rank_proxies(schema, x, attribute)
    assert [name for name, _ in ranked[:2]] == ["planted", "shifted"]
    assert "age" not in dict(ranked)  # a sensitive input is not a proxy: it is the attribute
    strengths = dict(ranked)
    assert strengths["planted"] > 0.6
    assert strengths["noise_cat"] < 0.1 and strengths["noise_num"] < 0.1


# The space ------------------------------------------------------------------------------


def test_the_space_is_documented_bounded_and_without_duplicates():
    schema = FeatureSchema.load(GERMAN_SCHEMA)
    proxies = {
        "personal_status_and_sex": [("telephone", 0.06), ("duration_in_month", 0.05)],
        "age_in_years": [("housing", 0.29), ("present_employment_since", 0.18)],
    }
    space = candidate_space(schema, FAMILIES, proxies)
    assert len(space) <= space_bound(len(FAMILIES), len(proxies))
    # Per family: itself, regularised, without age, and per attribute reweighed, without one
    # and two proxies, without two reweighed; the forest alone also monotone.
    assert len(space) == len(FAMILIES) * (3 + 4 * len(proxies)) + 1
    assert len({c.name for c in space}) == len({c.key() for c in space}) == len(space)
    assert [c.name for c in space if c.is_plain] == list(FAMILIES)
    assert {c.family for c in space if c.monotone} == {RANDOM_FOREST}
    assert {c.family for c in space if c.params} == set(FAMILIES)  # one regularised each
    for candidate in space:
        if candidate.drop:
            assert "age_in_years" in candidate.drop  # every subset drops the sensitive input
            assert candidate.schema(schema).model_features  # something left to train on
    assert next(c for c in space if c.name == f"{GRADIENT_BOOSTING}/no-proxies-2:age_in_years")
    # Repeats collapse (one proxy ranked: dropping "two" drops the same one) ...
    g = FeatureSpec("g", "numeric", sensitive=True, excluded=True)
    two = FeatureSchema(
        "two", "y", "bad", (FeatureSpec("a", "numeric"), FeatureSpec("b", "numeric"), g)
    )
    names = [c.name for c in candidate_space(two, ("logistic_regression",), {"g": [("a", 0.5)]})]
    assert "logistic_regression/no-proxies-1:g" in names
    assert "logistic_regression/no-proxies-2:g" not in names
    # ... and a candidate left without features is skipped.
    one = FeatureSchema("one", "y", "bad", (FeatureSpec("a", "numeric"), g))
    names = [c.name for c in candidate_space(one, ("logistic_regression",), {"g": [("a", 0.5)]})]
    assert not any("no-proxies" in name for name in names) and len(names) == 3


# End to end -----------------------------------------------------------------------------


def write_proxy_lender(path: Path, *, zip_effect: float, agree: float, seed: int = 11) -> Path:
    """600 applicants; `zip_area` agrees with the excluded `group` for `agree` of them and
    moves risk by `zip_effect` (log-odds), income and loans carry the rest of the risk."""
    rng = np.random.default_rng(seed)
    rows = 600
    group = rng.choice(["a", "b"], rows)
    home = np.where(group == "a", "north", "south")
    zip_area = np.where(rng.random(rows) < agree, home, rng.choice(["north", "south"], rows))
    income = np.round(rng.lognormal(8.0, 0.4, rows), 2)
    loans = rng.integers(0, 5, rows)
    logit = -0.9 - (np.log(income) - 8.0) / 0.4 + 0.35 * loans + zip_effect * (zip_area == "south")
    bad = rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["income", "open_loans", "zip_area", "group", "outcome"])
        for i in range(rows):
            outcome = "default" if bad[i] else "repaid"
            writer.writerow([f"{income[i]:.2f}", loans[i], zip_area[i], group[i], outcome])
    return path


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--label", "outcome", "--bad", "default",
            "--out", str(out), "--exclude", "group", "--sensitive", "group",
            "--families", "logistic_regression", *FAST_TRAIN]  # fmt: skip


def test_a_candidate_that_meets_the_rule_ships_and_the_signature_covers_the_table(
    tmp_path: Path, test_key: KeyPair, capsys
):
    # A weak risk effect through a strong proxy: dropping the proxy costs little accuracy.
    data = write_proxy_lender(tmp_path / "proxy_lender.csv", zip_effect=0.4, agree=0.9)
    out = tmp_path / "artifact"
    assert main(train_args(data, out)) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / MANIFEST_FILE).read_text())
    lda = document["metrics"]["lda"]
    assert lda["meets_rule"] and lda["shipped"] == lda["chosen"] == document["metrics"]["champion"]
    assert f"shipped: {lda['chosen']}" in printed and "meets the rule" in printed
    shipped = document["training"]["lda_search"]["shipped_candidate"]
    assert shipped["name"] == lda["chosen"]
    # The choice is the proxy-free candidate: its schema excludes the proxy, its ONNX lacks it.
    assert shipped["dropped_features"] == ["zip_area"]
    excluded = [f["name"] for f in document["schema"]["features"] if f["excluded"]]
    assert set(excluded) == {"zip_area", "group"}
    assert "zip_area" not in [item["name"] for item in document["onnx"]["inputs"]]
    assert lda["chosen"] in document["metrics"]["families"]  # cross-validated and held out

    table_doc = json.loads((out / "lda.json").read_text())
    chosen = next(row for row in table_doc["candidates"] if row["name"] == lda["chosen"])
    assert chosen["ratio"] >= 0.8 and chosen["eligible"]
    assert chosen["attributes"]["group"]["groups"][0]["n"] >= table_doc["method"]["min_group_size"]
    card = (out / "model_card.md").read_text()
    assert "## Less discriminatory alternative (LDA) search" in card
    assert lda["statement"] in card and "![LDA frontier" in card
    assert f"**{lda['chosen']}** (chosen)" in card
    assert "dropped by the LDA search" in card and "callers must stop sending" in card
    assert (out / "lda_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Refreshing the drift reference re-renders the same card, search table included.
    assert main(["drift-reference", str(out), "--data", str(data)]) == 0
    assert (out / "model_card.md").read_text() == card

    assert main(["sign", str(out), "--key", str(test_key.private)]) == 0
    verify = ["verify", str(out), "--data", str(data), "--public-key", str(test_key.public)]
    assert main(verify) == 0
    assert load_verified_manifest(out, test_key.public).verification["lda_search"]["file"] == (
        "lda.json"
    )
    (out / "lda.json").write_text((out / "lda.json").read_text().replace("0.", "0.9", 1))
    assert main(["sign", str(out), "--key", str(test_key.private)]) == 1  # table edited


def test_a_reweighed_choice_ships_with_its_weights_and_the_card_warns(tmp_path: Path):
    # A proxy that agrees more with the group and carries more risk: dropping it costs too
    # much accuracy, reweighing does not.
    data = write_proxy_lender(tmp_path / "proxy_lender.csv", zip_effect=0.5, agree=0.95)
    out = tmp_path / "artifact"
    assert main(train_args(data, out)) == 0
    document = json.loads((out / MANIFEST_FILE).read_text())
    assert document["metrics"]["lda"]["meets_rule"]
    shipped = document["training"]["lda_search"]["shipped_candidate"]
    assert shipped["reweighed_by"] == "group" and shipped["dropped_features"] == []
    weights = {(cell["group"], cell["bad"]): cell for cell in shipped["weights"]}
    assert set(weights) == {("a", False), ("a", True), ("b", False), ("b", True)}
    rows = sum(cell["rows"] for cell in weights.values())
    total = sum(cell["rows"] * cell["weight"] for cell in weights.values())
    assert total == pytest.approx(rows, rel=1e-5)  # the weights keep the sample's size
    assert "zip_area" in [item["name"] for item in document["onnx"]["inputs"]]
    assert "group` group x label (reweighing" in (out / "model_card.md").read_text()


def test_when_no_candidate_meets_the_rule_the_champion_ships_and_everyone_is_told(
    tmp_path: Path, capsys
):
    # A strong risk effect through the proxy: every accurate model keeps the disparity.
    data = write_proxy_lender(tmp_path / "proxy_lender.csv", zip_effect=0.9, agree=0.9)
    out = tmp_path / "artifact"
    assert main(train_args(data, out)) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / MANIFEST_FILE).read_text())
    lda = document["metrics"]["lda"]
    assert not lda["meets_rule"] and lda["chosen"] is not None
    assert lda["shipped"] == document["metrics"]["champion"] == "logistic_regression"
    assert document["metrics"]["selection"] == "highest cv_auc_mean"
    assert document["training"]["lda_search"]["shipped_candidate"] is None
    assert "No candidate meets the rule" in printed and "shipped: logistic_regression" in printed
    card = (out / "model_card.md").read_text()
    assert lda["statement"] in card
    assert "the four-fifths rule is NOT met by any candidate" in card
    # The shipped model's ratio in the search beside its holdout ratio in the fairness section.
    searched = json.loads((out / "lda.json").read_text())["candidates"]
    here = next(row for row in searched if row["name"] == "logistic_regression")
    there = document["metrics"]["fairness"]["attributes"]["group"]["approval_rate_ratio"]
    assert f"`group` {here['ratio']:.3f} here, {there:.3f} there" in card
    assert "![LDA frontier" in card and (out / "lda_frontier.png").exists()


def test_no_lda_search_says_so_in_the_card(tmp_path: Path, capsys):
    data = write_proxy_lender(tmp_path / "proxy_lender.csv", zip_effect=0.4, agree=0.9)
    out = tmp_path / "artifact"
    assert main([*train_args(data, out), "--no-lda-search"]) == 0
    assert "LDA search: not run" in capsys.readouterr().out
    document = json.loads((out / MANIFEST_FILE).read_text())
    assert "lda" not in document["metrics"] and "lda_search" not in document["verification"]
    assert document["training"]["lda_search"] == {"enabled": False}
    assert not (out / "lda.json").exists() and not (out / "lda_frontier.png").exists()
    assert "**Not run for this model** (`--no-lda-search`)" in (out / "model_card.md").read_text()


def test_the_search_is_deterministic_and_its_cost_bounded(tmp_path: Path, monkeypatch):
    """The same document whatever the worker count; exactly one calibrated fit per candidate
    and fold (with the space's bound above, that bounds the runtime); and a CPU budget far
    above what it needs, as a guard against an accidental blow-up, not a benchmark."""
    data = write_proxy_lender(tmp_path / "proxy_lender.csv", zip_effect=0.4, agree=0.9)
    table_ = read_csv(data)
    schema = apply_flags(
        infer_schema(table_, label="outcome", bad_value="default", name="proxy-lender"),
        exclude=("group",),
        sensitive=("group",),
    )
    y = labels(schema, table_)
    dev, _ = development_split(y, 0.25, 42)
    inputs = SearchInputs(
        schema=schema, table=table_, x=feature_matrix(schema, table_), y=y, dev=dev,
        cutoff=float(y[dev].mean()), cutoff_rule="test", families=("logistic_regression",),
        seed=42, folds=3, jobs=1, bootstrap=200,
    )  # fmt: skip
    fits: list[str] = []
    real_fit = lda.fit_candidate

    def counted(candidate: Candidate, *args: Any, **kwargs: Any) -> Any:
        fits.append(candidate.name)
        return real_fit(candidate, *args, **kwargs)

    monkeypatch.setattr(lda, "fit_candidate", counted)
    started = time.process_time()
    first = run_search(inputs)
    cpu = time.process_time() - started
    assert len(fits) == len(first.candidates) * inputs.folds
    assert sorted(set(fits)) == sorted(c.name for c in first.candidates)
    assert cpu < 60, f"the search took {cpu:.0f} CPU seconds on 600 rows"
    monkeypatch.undo()
    again = run_search(replace(inputs, jobs=2))
    assert again.document == first.document
