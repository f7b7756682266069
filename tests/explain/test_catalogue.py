"""The explanation catalogue: every reason code privscore can emit has a text in every language,
no protected or immutable feature is actionable, and a bad catalogue is refused by name."""

from __future__ import annotations

import ast
import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from service.decisions import alert_rules
from service.decisions.alert_rules import Event
from service.decisions.limits import Account, decide_limit
from service.decisions.policy import DecisionPolicy, OverdueBucket
from service.decisions.rows import OpenAlert
from service.explain.catalogue import (
    DEFAULT_CATALOGUE,
    Catalogue,
    CatalogueError,
    load_catalogue,
)
from service.model.schema import FeatureSchema
from tests.conftest import REPO_ROOT, served_manifest

# Whatever the schema says, these are never something a customer should be told to change:
# protected characteristics and their proxies, and history that cannot be changed now.
PROTECTED_OR_IMMUTABLE = {
    "age_in_years",
    "personal_status_and_sex",
    "foreign_worker",
    "number_of_people_being_liable_to_provide_maintenance_for",
    "credit_history",
    "present_employment_since",
    "present_residence_since",
}

# -- the reason codes privscore can emit, found in its sources --------------------------------

_CODE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
_CODE_PART = re.compile(r"[A-Z0-9_]*")


def _code(node: ast.expr) -> str | None:
    """A reason code written in the source: an upper-snake string, or an f-string whose
    literal parts are upper-snake (a code carrying a number, returned with `{}` for each
    value, e.g. `OVERDUE_{}_DAYS`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if _CODE.fullmatch(node.value) else None
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                if not _CODE_PART.fullmatch(value.value):
                    return None
                parts.append(value.value)
            else:
                parts.append("{}")
        code = "".join(parts)
        return code if re.search("[A-Z]", code) else None
    return None


def _is_text(node: ast.expr) -> bool:
    """A sentence: a string with a space in it, or an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return " " in node.value
    return isinstance(node, ast.JoinedStr)


def _codes_in(path: Path) -> Iterator[str]:
    """Codes written as privscore writes reasons: `(code, text)` pairs (the rules' reasons)
    and `code=` keywords (`Reason(code=..., text=...)`)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Tuple) and len(node.elts) == 2 and _is_text(node.elts[1]):
            code = _code(node.elts[0])
            if code is not None:
                yield code
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "code" and (code := _code(keyword.value)) is not None:
                    yield code


def source_codes() -> set[str]:
    """Every reason code written in the server's sources (the explanation room aside, which
    only reads codes)."""
    service = REPO_ROOT / "service"
    return {
        code
        for path in sorted(service.rglob("*.py"))
        if service / "explain" not in path.parents
        for code in _codes_in(path)
    }


def feature_codes() -> set[str]:
    """The served model's feature reason codes: a feature that lowered the score is a reason."""
    return {spec.reason_code for spec in served_manifest().schema.model_features}


def _pattern_shape(code: str) -> str:
    """A catalogue pattern (`OVERDUE_{days}_DAYS`) in the scan's shape (`OVERDUE_{}_DAYS`)."""
    return re.sub(r"\{[^}]*\}", "{}", code)


def test_the_bundled_catalogue_loads_and_fits_the_served_schema(catalogue: Catalogue) -> None:
    assert catalogue.version
    assert catalogue.languages == ("zh-CN", "en")
    catalogue.check_schema(served_manifest().schema)


def test_every_reason_code_privscore_can_emit_has_both_languages(catalogue: Catalogue) -> None:
    written = source_codes()
    exact = {code for code in written if "{}" not in code} | feature_codes()
    missing = sorted(code for code in exact if not catalogue.has_reason(code))
    assert not missing, f"reason codes without catalogue texts: {missing}"
    patterns = {_pattern_shape(p.code) for p in catalogue.reason_patterns}
    unmatched = sorted(code for code in written if "{}" in code and code not in patterns)
    assert not unmatched, f"codes carrying a number without a catalogue pattern: {unmatched}"
    for code in sorted(exact):
        for language in ("zh-CN", "en"):
            assert catalogue.reason(code, language).strip(), (code, language)
    # The Chinese text is Chinese, the English one is not.
    for code in sorted(exact):
        assert re.search("[\u4e00-\u9fff]", catalogue.reason(code, "zh-CN")), code
        assert not re.search("[\u4e00-\u9fff]", catalogue.reason(code, "en")), code


def test_the_scan_sees_the_announced_codes() -> None:
    """The codes the limit and alert rules are known to write are found by the scan, so the
    scan does read the rules (a scan that found nothing would pass the test above)."""
    found = source_codes()
    announced = {
        "PAST_DUE_FREEZE", "PAST_DUE", "SCORE_DETERIORATED", "BALANCE_FLOOR",
        "ON_TIME_RUN_TOO_SHORT", "SCORE_TOO_LOW_FOR_INCREASE", "ACCOUNT_TOO_NEW",
        "INCREASE_COOLDOWN", "GRADE_CEILING", "ON_TIME_REPAYMENTS", "OPEN_CRITICAL_ALERT",
        "OPEN_HIGH_ALERT", "PURCHASE_VELOCITY", "SPENDING_SPIKE", "UTILISATION_JUMP",
        "REPEATED_FAILED_REPAYMENTS", "OVERDUE_{}_DAYS",
    }  # fmt: skip
    assert announced <= found


def test_the_scan_would_see_a_new_code(tmp_path: Path, catalogue: Catalogue) -> None:
    """A rule that starts writing a code in any of the ways privscore writes reasons is seen,
    so the test above fails until the catalogue explains it."""
    rule = tmp_path / "rule.py"
    rule.write_text(
        "def reasons(days):\n"
        "    first = ('BRAND_NEW_CODE', 'Something new happened')\n"
        "    second = (f'LATE_{days}_WEEKS', f'Late by {days} weeks')\n"
        "    third = Reason(code='ANOTHER_CODE', text='Another thing')\n"
        "    not_a_reason = ('SCHEMA_VERSION', 'v1')\n"
        "    return first, second, third, not_a_reason\n",
        encoding="utf-8",
    )
    found = set(_codes_in(rule))
    assert found == {"BRAND_NEW_CODE", "LATE_{}_WEEKS", "ANOTHER_CODE"}
    assert not any(catalogue.has_reason(code) for code in ("BRAND_NEW_CODE", "ANOTHER_CODE"))
    assert "LATE_{}_WEEKS" not in {_pattern_shape(p.code) for p in catalogue.reason_patterns}


def _limit_codes(policy: DecisionPolicy) -> set[str]:
    """The codes the limit rules give over a grid of accounts, scores and alerts."""
    limits = policy.limits
    now = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    codes: set[str] = set()
    for days_past_due in (0, 1, limits.freeze_days_past_due):
        for score in (limits.decrease_below_score - 1, limits.increase_min_score):
            for on_time in (0, limits.increase_min_on_time_repayments):
                for age in (0, limits.increase_min_account_age_days):
                    for last in (None, now - dt.timedelta(days=1)):
                        for current, balance in ((100_000, 0), (100_000, 100_000), (10**12, 0)):
                            for alerts in ((), ("HIGH",), ("CRITICAL",)):
                                decision = decide_limit(
                                    limits,
                                    Account("CNY", current, balance, on_time, days_past_due, age),
                                    score,
                                    "A",
                                    last,
                                    now,
                                    [OpenAlert(i, s, "OPEN") for i, s in enumerate(alerts)],
                                )
                                codes.update(code for code, _ in decision.reasons)
    return codes


def _alert_codes(policy: DecisionPolicy) -> set[str]:
    """The codes the alert rules give on events made to set each rule off."""
    rules = policy.alerts
    at = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC)
    minute = dt.timedelta(minutes=1)
    codes: set[str] = set()

    def run(event: Event, history: list[Event]) -> None:
        for alert in alert_rules.evaluate(rules, event, history):
            codes.update(code for code, _ in alert.reasons)

    for bucket in rules.overdue_buckets:
        run(Event("m", at, alert_rules.MISSED_PAYMENT, days_past_due=bucket.min_days_past_due), [])
    burst = [
        Event(f"p{i}", at - i * minute, alert_rules.PURCHASE, "CNY", 100)
        for i in range(rules.velocity_max_purchases + 1)
    ]
    run(burst[0], burst[1:])
    usual = [
        Event(f"u{i}", at - dt.timedelta(days=i + 1), alert_rules.PURCHASE, "CNY", 100)
        for i in range(rules.spike_min_history)
    ]
    spike = round(100 * rules.spike_multiplier) + 1
    run(Event("s", at, alert_rules.PURCHASE, "CNY", spike), usual)
    failures = [
        Event(f"f{i}", at - i * minute, alert_rules.REPAYMENT, "CNY", 100, succeeded=False)
        for i in range(rules.failed_min_failures)
    ]
    run(failures[0], failures[1:])
    limit = Event("l", at - 2 * minute, alert_rules.LIMIT_CHANGE, "CNY", 10_000, balance_after=0)
    run(Event("j", at, alert_rules.PURCHASE, "CNY", 10_000, balance_after=10_000), [limit])
    return codes


def test_every_code_the_rules_give_is_scanned_and_explained(
    catalogue: Catalogue, policy: DecisionPolicy
) -> None:
    """Running the rules checks the scan from the other side: whatever they give is a code
    the scan found (or a number in one of its patterns), and the catalogue explains it."""
    given = _limit_codes(policy) | _alert_codes(policy)
    expected_limit = {"PAST_DUE_FREEZE", "OPEN_CRITICAL_ALERT", "OPEN_HIGH_ALERT", "GRADE_CEILING"}
    assert expected_limit <= given  # the grid does reach the rules
    assert {"PURCHASE_VELOCITY", "SPENDING_SPIKE", "UTILISATION_JUMP"} <= given
    assert "REPEATED_FAILED_REPAYMENTS" in given
    scanned = source_codes()
    shapes = [
        re.compile("".join("[0-9]+" if p == "{}" else re.escape(p) for p in re.split("({})", s)))
        for s in scanned
        if "{}" in s
    ]
    for code in sorted(given):
        assert code in scanned or any(s.fullmatch(code) for s in shapes), code
        for language in catalogue.languages:
            assert catalogue.reason(code, language), (code, language)


def test_a_policy_s_own_overdue_bucket_is_explained_with_its_number(
    catalogue: Catalogue, policy: DecisionPolicy
) -> None:
    """Overdue codes carry the bucket the policy sets: any bucket gets a text with its days."""
    days = 45
    outcome = policy.alerts.overdue_buckets[0].outcome
    alerts = replace(policy.alerts, overdue_buckets=(OverdueBucket(days, outcome),))
    at = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    (alert,) = alert_rules.evaluate(
        alerts, Event("m", at, alert_rules.MISSED_PAYMENT, days_past_due=days), []
    )
    ((code, _),) = alert.reasons
    for language in ("zh-CN", "en"):
        assert str(days) in catalogue.reason(code, language)


def test_no_protected_or_immutable_feature_is_actionable(catalogue: Catalogue) -> None:
    schema = served_manifest().schema
    sensitive = {spec.name for spec in schema.features if spec.sensitive or spec.excluded}
    assert sensitive <= PROTECTED_OR_IMMUTABLE  # the list above knows the schema's own marks
    assert not catalogue.actionable & PROTECTED_OR_IMMUTABLE
    for name in PROTECTED_OR_IMMUTABLE:
        assert catalogue.features[name].change in ("protected", "immutable"), name
    for name in sensitive:
        assert catalogue.features[name].change == "protected", name
    # The loan's own terms and the customer's money are actionable: the catalogue is not empty.
    assert {"duration_in_month", "credit_amount", "savings_account_and_bonds"} <= (
        catalogue.actionable
    )


def test_every_category_of_an_actionable_feature_has_words(catalogue: Catalogue) -> None:
    for spec in served_manifest().schema.model_features:
        entry = catalogue.features[spec.name]
        if not entry.actionable or spec.categories is None:
            continue
        assert set(entry.categories) == set(spec.categories), spec.name
        for category in spec.categories:
            for language in catalogue.languages:
                assert catalogue.features[spec.name].categories[category][language].strip()


# -- refusing a bad catalogue -----------------------------------------------------------------

BUNDLED = DEFAULT_CATALOGUE.read_text(encoding="utf-8")


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    assert BUNDLED.count(old) == 1, old
    path = tmp_path / "catalogue.toml"
    path.write_text(BUNDLED.replace(old, new), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param(
            'en = "The length of the loan you asked for lowered your score."\n',
            "",
            "reasons.DURATION has no 'en' text",
            id="reason-without-english",
        ),
        pytest.param(
            'zh-CN = "您有一笔还款已逾期。"\n',
            "",
            "reasons.PAST_DUE has no 'zh-CN' text",
            id="reason-without-chinese",
        ),
        pytest.param(
            'zh-CN = "您有一笔还款已逾期{days}天或以上。"\n',
            "",
            "reason_patterns.OVERDUE_DAYS has no 'zh-CN' text",
            id="pattern-without-chinese",
        ),
        pytest.param(
            'en = "Your credit limit has been raised."\n',
            "",
            "outcomes.limit.INCREASE has no 'en' text",
            id="outcome-without-english",
        ),
        pytest.param(
            'zh-CN = "少于100德国马克"\n',
            "",
            "categories.... < 100 DM has no 'zh-CN' text",
            id="category-without-chinese",
        ),
        pytest.param(
            'en = "A payment is {days} or more days overdue."',
            'en = "A payment is {weeks} or more weeks overdue."',
            "reason_patterns.OVERDUE_DAYS.en uses placeholders ['weeks']",
            id="unknown-placeholder",
        ),
        pytest.param(
            'en = "A repayment is overdue."',
            'en = "A repayment is overdue."\nfr = "Un remboursement est en retard."',
            "reasons.PAST_DUE: unknown keys ['fr']",
            id="language-not-declared",
        ),
        pytest.param(
            'languages = ["zh-CN", "en"]',
            'languages = ["zh-CN", "en", "fr"]',
            "has no 'fr' text",
            id="declared-language-missing",
        ),
        pytest.param(
            '[reasons.PAST_DUE]\nzh-CN = "您有一笔还款已逾期。"',
            '[reasons.past_due]\nzh-CN = "您有一笔还款已逾期。"',
            "reasons.past_due: a code is",
            id="lower-case-code",
        ),
        pytest.param(
            '[features.credit_history]\nchange = "immutable"',
            '[features.credit_history]\nchange = "immutable"\nlower.en = "x"\nlower.zh-CN = "x"',
            "features.credit_history is immutable: only actionable features",
            id="immutable-with-change-texts",
        ),
        pytest.param(
            '[features.age_in_years]\nchange = "protected"',
            '[features.age_in_years]\nchange = "maybe"',
            "features.age_in_years.change must be one of",
            id="unknown-change-kind",
        ),
    ],
)
def test_the_catalogue_refuses_an_entry_naming_it(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(CatalogueError) as refused:
        load_catalogue(_edited(tmp_path, old, new))
    assert message in str(refused.value)
    assert str(tmp_path / "catalogue.toml") in str(refused.value)


def test_the_catalogue_refuses_invalid_toml_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="not valid TOML"):
        load_catalogue(_edited(tmp_path, "version = ", "version "))
    with pytest.raises(CatalogueError, match="does not exist"):
        load_catalogue(tmp_path / "absent.toml")


def test_a_protected_feature_marked_actionable_does_not_fit_the_schema(tmp_path: Path) -> None:
    path = _edited(
        tmp_path,
        '[features.age_in_years]\nchange = "protected"',
        '[features.age_in_years]\nchange = "actionable"\n'
        'higher.zh-CN = "年龄{value}岁"\nhigher.en = "An age of {value}"',
    )
    catalogue = load_catalogue(path)  # well-formed on its own ...
    with pytest.raises(CatalogueError, match=r"features\.age_in_years is sensitive or excluded"):
        catalogue.check_schema(served_manifest().schema)  # ... but not for this schema


def test_a_new_feature_without_texts_does_not_fit(catalogue: Catalogue) -> None:
    document = json.loads(json.dumps(served_manifest().schema.to_dict()))
    del document["version"]
    document["features"].append(
        {"name": "monthly_income", "kind": "numeric", "min": 0, "max": 10**7,
         "reason_code": "MONTHLY_INCOME"}
    )  # fmt: skip
    schema = FeatureSchema.from_dict(document)
    with pytest.raises(CatalogueError) as refused:
        catalogue.check_schema(schema)
    assert "reasons.MONTHLY_INCOME (feature monthly_income) is missing" in str(refused.value)
    assert "features.monthly_income is missing" in str(refused.value)


def test_an_actionable_categorical_feature_needs_words_for_every_category(tmp_path: Path) -> None:
    path = _edited(
        tmp_path,
        '[features.other_installment_plans.categories.stores]\nzh-CN = "在商店有分期付款"\n'
        'en = "An instalment plan with a store"\n',
        "",
    )
    with pytest.raises(CatalogueError, match=r"other_installment_plans\.categories has no words"):
        load_catalogue(path).check_schema(served_manifest().schema)


def test_asking_for_a_text_the_catalogue_lacks_names_it(catalogue: Catalogue) -> None:
    with pytest.raises(CatalogueError, match="no reason NOT_A_CODE"):
        catalogue.reason("NOT_A_CODE", "en")
    with pytest.raises(CatalogueError, match="no language 'fr'"):
        catalogue.reason("DURATION", "fr")
    with pytest.raises(CatalogueError, match=r"no outcome score\.INCREASE"):
        catalogue.outcome("score", "INCREASE", "en")
    with pytest.raises(CatalogueError, match="age_in_years is not actionable"):
        catalogue.change_text("en", "age_in_years", 30.0, 40.0)
    with pytest.raises(CatalogueError, match="credit_amount may not move higher"):
        catalogue.change_text("en", "credit_amount", 3000.0, 2000.0)


def test_dates_are_written_per_language_in_utc(catalogue: Catalogue) -> None:
    beijing = dt.timezone(dt.timedelta(hours=8))
    when = dt.datetime(2026, 12, 3, 1, 5, tzinfo=beijing)  # 2 December, 17:05 UTC
    assert catalogue.date("en", when) == "2 December 2026, 17:05 UTC"
    assert catalogue.date("zh-CN", when) == "2026年12月2日 17:05（UTC时间）"  # noqa: RUF001
    with pytest.raises(ValueError, match="timezone-aware"):
        catalogue.date("en", dt.datetime(2026, 12, 2))  # naive: refused
