"""The explanation catalogue: every text a customer reads about a decision, in every language.

Texts live in a versioned TOML file (`catalogue.toml` beside this module), not in code, so
they can be reviewed and translated without touching the rules, and each explanation names the
catalogue version it was told from. The file is validated once, completely, when loaded: a
text missing in one language, a placeholder a text may not use, a format that does not format
or an unknown key is a `CatalogueError` naming the entry, so a bad catalogue stops the server
at start rather than failing one customer's explanation later.

`Catalogue.check_schema` holds the catalogue to a served model's schema: every model feature's
reason code has texts, every feature is classified (actionable or not, and why), a sensitive or
excluded feature is never actionable, and actionable features have what a counterfactual needs.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from service.model.schema import CATEGORICAL, FeatureSchema, FeatureValue

DEFAULT_CATALOGUE: Final = Path(__file__).with_name("catalogue.toml")

SCORE: Final = "score"
LIMIT: Final = "limit"
DecisionKind: TypeAlias = Literal["score", "limit"]
# The outcomes each kind of decision can have (ScoringService's CreditDecision and
# LimitService's limit actions); the catalogue must have texts for exactly these.
OUTCOMES: Final[Mapping[str, tuple[str, ...]]] = {
    SCORE: ("APPROVE", "REVIEW", "DECLINE"),
    LIMIT: ("HOLD", "INCREASE", "DECREASE", "FREEZE"),
}
SCORE_DECISIONS: Final = OUTCOMES[SCORE]

ACTIONABLE: Final = "actionable"
# What kind of attribute a feature is; only ACTIONABLE ones are ever suggested for change.
CHANGE_KINDS: Final = (ACTIONABLE, "protected", "immutable", "not_advised")
LOWER: Final = "lower"
HIGHER: Final = "higher"
DIRECTIONS: Final = (LOWER, HIGHER)

Texts: TypeAlias = Mapping[str, str]  # language -> text

_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
_CODE = re.compile(r"[A-Z0-9_]{1,64}")
_PATTERN_CODE = re.compile(r"[A-Z0-9_{}a-z]{1,64}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}")
_MONTHS = 12

# The placeholders each kind of text may use, and sample values that must format.
_DATE_SAMPLE: Final[Mapping[str, object]] = {
    "year": 2026, "month": 12, "day": 2, "hour": 9, "minute": 5, "month_name": "M",
}  # fmt: skip
_LAYOUT: Final[Mapping[str, Mapping[str, object]]] = {
    "score": {"score": 1, "score_min": 0, "score_max": 2},
    "reasons": {},
    "counterfactuals": {},
    "counterfactual": {"change": "c", "score": 1, "reaches": "r"},
    "decided": {"date": "d", "model_version": "m"},
}
_CONTEST_SAMPLE: Final[Mapping[str, object]] = {"decision_id": "d"}
_NUMERIC_SAMPLE: Final[Mapping[str, object]] = {"value": "1", "current": "2"}
_CATEGORY_SAMPLE: Final[Mapping[str, object]] = {"category": "c", "current": "d"}


class CatalogueError(ValueError):
    """The catalogue is invalid, or asked for a text it does not have; the message names the
    entry."""


@dataclass(frozen=True)
class FeatureEntry:
    """What the catalogue says about one schema feature: what kind of attribute it is and,
    when actionable, how to word a suggested change."""

    name: str
    change: str  # one of CHANGE_KINDS
    # Numeric actionable features: a text per direction the value may move in.
    moves: Mapping[str, Texts]  # LOWER/HIGHER -> texts
    # Categorical actionable features: categories a customer may move to, the change's
    # template and each category in words.
    targets: tuple[str, ...]
    template: Texts | None
    categories: Mapping[str, Texts]

    @property
    def actionable(self) -> bool:
        return self.change == ACTIONABLE

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions a numeric value may be suggested to move in, in DIRECTIONS order."""
        return tuple(d for d in DIRECTIONS if d in self.moves)


@dataclass(frozen=True)
class ReasonPattern:
    """Reason codes that carry a number from the decision policy, e.g. `OVERDUE_{days}_DAYS`:
    one entry covers every value the policy may set, so a policy edit needs no new texts."""

    name: str
    code: str
    regex: re.Pattern[str]
    texts: Texts

    def match(self, code: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(code)
        return found.groupdict() if found else None


@dataclass(frozen=True)
class Catalogue:
    version: str
    languages: tuple[str, ...]
    date_formats: Texts
    month_names: Mapping[str, tuple[str, ...]]
    layout: Mapping[str, Texts]
    reaches: Mapping[str, Texts]  # score decision -> texts
    contest_texts: Texts
    outcomes: Mapping[str, Mapping[str, Texts]]  # kind -> outcome code -> texts
    reasons: Mapping[str, Texts]  # code -> texts
    reason_patterns: tuple[ReasonPattern, ...]
    features: Mapping[str, FeatureEntry]

    @functools.cached_property
    def actionable(self) -> frozenset[str]:
        """Names of the features a counterfactual may change."""
        return frozenset(name for name, entry in self.features.items() if entry.actionable)

    def _language(self, language: str) -> str:
        if language not in self.languages:
            raise CatalogueError(f"catalogue {self.version} has no language {language!r}")
        return language

    def outcome(self, kind: str, code: str, language: str) -> str:
        try:
            texts = self.outcomes[kind][code]
        except KeyError:
            raise CatalogueError(f"catalogue has no outcome {kind}.{code}") from None
        return texts[self._language(language)]

    def has_reason(self, code: str) -> bool:
        return code in self.reasons or any(p.match(code) is not None for p in self.reason_patterns)

    def reason(self, code: str, language: str) -> str:
        """The reason's text; raises CatalogueError for a code the catalogue does not know."""
        language = self._language(language)
        if code in self.reasons:
            return self.reasons[code][language]
        for pattern in self.reason_patterns:
            values = pattern.match(code)
            if values is not None:
                return pattern.texts[language].format(**values)
        raise CatalogueError(f"catalogue has no reason {code}")

    def contest(self, language: str, decision_id: str) -> str:
        return self.contest_texts[self._language(language)].format(decision_id=decision_id)

    def date(self, language: str, when: dt.datetime) -> str:
        """`when` (an aware datetime), in UTC, as the language writes dates."""
        if when.tzinfo is None:
            raise ValueError("decision times must be timezone-aware")
        utc = when.astimezone(dt.UTC)
        language = self._language(language)
        return self.date_formats[language].format(
            year=utc.year,
            month=utc.month,
            day=utc.day,
            hour=utc.hour,
            minute=utc.minute,
            month_name=self.month_names[language][utc.month - 1],
        )

    def line(self, name: str, language: str, **values: object) -> str:
        """One layout text (`score`, `reasons`, `counterfactuals`, `counterfactual`,
        `decided`) filled with `values`."""
        if name not in self.layout:
            raise CatalogueError(f"catalogue has no layout.{name}")
        return self.layout[name][self._language(language)].format(**values)

    def reach(self, decision: str, language: str) -> str:
        if decision not in self.reaches:
            raise CatalogueError(f"catalogue has no reaches.{decision}")
        return self.reaches[decision][self._language(language)]

    def change_text(
        self, language: str, feature: str, value: FeatureValue, current: FeatureValue
    ) -> str:
        """A suggested change of one actionable feature from `current` to `value`, in words."""
        language = self._language(language)
        entry = self.features.get(feature)
        if entry is None or not entry.actionable:
            raise CatalogueError(f"feature {feature} is not actionable in the catalogue")
        if isinstance(value, str) or isinstance(current, str):
            if entry.template is None:
                raise CatalogueError(f"features.{feature} has no template for categories")
            words = {c: texts[language] for c, texts in entry.categories.items()}
            if str(value) not in words or str(current) not in words:
                raise CatalogueError(f"features.{feature} has no words for that category")
            return entry.template[language].format(
                category=words[str(value)], current=words[str(current)]
            )
        direction = LOWER if value < current else HIGHER
        if direction not in entry.moves:
            raise CatalogueError(f"features.{feature} may not move {direction}")
        return entry.moves[direction][language].format(
            value=number_text(value), current=number_text(current)
        )

    def check_schema(self, schema: FeatureSchema) -> None:
        """CatalogueError listing everything that keeps this catalogue from explaining the
        schema's model: reason codes without texts, features it does not classify, sensitive
        or excluded features marked actionable, actionable features it cannot word."""
        problems: list[str] = []
        for spec in schema.model_features:
            if not self.has_reason(spec.reason_code):
                problems.append(f"reasons.{spec.reason_code} (feature {spec.name}) is missing")
        for spec in schema.features:
            entry = self.features.get(spec.name)
            if entry is None:
                problems.append(f"features.{spec.name} is missing")
                continue
            if (spec.sensitive or spec.excluded) and entry.change != "protected":
                problems.append(
                    f"features.{spec.name} is sensitive or excluded in the schema: "
                    "its change must be 'protected'"
                )
            if entry.actionable:
                problems.extend(_check_actionable(entry, spec.kind, spec.categories))
        # Entries for features this schema lacks are allowed: one catalogue explains the
        # champion and a challenger on a newer schema (a feature from a new data source).
        if problems:
            raise CatalogueError(
                f"catalogue {self.version} does not fit schema {schema.version}: "
                + "; ".join(problems)
            )


def number_text(value: float) -> str:
    """A number as a customer reads it: whole numbers without a decimal point."""
    number = float(value)
    if number.is_integer():
        return str(int(number))
    return f"{number:.2f}".rstrip("0").rstrip(".")


def _check_actionable(
    entry: FeatureEntry, kind: str, categories: Sequence[str] | None
) -> list[str]:
    where = f"features.{entry.name}"
    if kind == CATEGORICAL:
        problems = []
        if entry.moves:
            problems.append(
                f"{where} is categorical: give targets and a template, not lower/higher"
            )
        if entry.template is None or not entry.targets:
            problems.append(
                f"{where} is actionable and categorical: it needs targets and a template"
            )
        known = set(categories or ())
        problems.extend(
            f"{where}.targets names {t!r}, not a category of the feature"
            for t in entry.targets
            if t not in known
        )
        problems.extend(
            f"{where}.categories has no words for {c!r}"
            for c in categories or ()
            if c not in entry.categories
        )
        problems.extend(
            f"{where}.categories names {c!r}, not a category of the feature"
            for c in entry.categories
            if c not in known
        )
        return problems
    if entry.targets or entry.template is not None or entry.categories:
        return [f"{where} is numeric: give lower/higher texts, not targets or categories"]
    if not entry.moves:
        return [f"{where} is actionable and numeric: it needs a lower or higher text"]
    return []


# -- loading -----------------------------------------------------------------------------------


class _Reader:
    """Typed access to one table of the document, naming the entry in every error."""

    def __init__(self, table: object, where: str, languages: tuple[str, ...]) -> None:
        if not isinstance(table, dict):
            raise CatalogueError(f"{where} must be a table")
        self.table: dict[str, Any] = table
        self.where = where
        self.languages = languages

    def only(self, allowed: Iterable[str]) -> None:
        unknown = sorted(set(self.table) - set(allowed))
        if unknown:
            raise CatalogueError(f"{self.where}: unknown keys {unknown}")

    def sub(self, key: str) -> _Reader:
        if key not in self.table:
            raise CatalogueError(f"{self.where}.{key} is missing")
        return _Reader(self.table[key], f"{self.where}.{key}", self.languages)

    def texts(self, sample: Mapping[str, object], *, extra: Iterable[str] = ()) -> Texts:
        """This table as one text per language, each formatting with `sample`'s names only.
        `extra` keys are allowed beside the languages (and not read here)."""
        self.only([*self.languages, *extra])
        result = {}
        for language in self.languages:
            if language not in self.table:
                raise CatalogueError(f"{self.where} has no {language!r} text")
            result[language] = _text(self.table[language], f"{self.where}.{language}", sample)
        return result


def _text(value: object, where: str, sample: Mapping[str, object]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CatalogueError(f"{where} must be a non-empty string")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as error:
        raise CatalogueError(f"{where} is not a valid template: {error}") from None
    unknown = sorted(names - set(sample))
    if unknown:
        allowed = ", ".join("{" + n + "}" for n in sample) or "none"
        raise CatalogueError(f"{where} uses placeholders {unknown}; allowed: {allowed}")
    try:
        value.format(**sample)
    except (ValueError, IndexError, KeyError) as error:
        raise CatalogueError(f"{where} does not format: {error}") from None
    return value


def parse_catalogue(document: Mapping[str, Any]) -> Catalogue:
    """Validate a parsed catalogue document completely; CatalogueError names the entry."""
    languages = document.get("languages")
    if (
        not isinstance(languages, list)
        or not languages
        or not all(isinstance(x, str) and _LANGUAGE.fullmatch(x) for x in languages)
        or len(set(languages)) != len(languages)
    ):
        raise CatalogueError("languages must be a non-empty list of distinct BCP 47 tags")
    root = _Reader(dict(document), "catalogue", tuple(languages))
    root.only(
        [
            "version", "languages", "format", "layout", "reaches", "contest", "outcomes",
            "reasons", "reason_patterns", "features",
        ]
    )  # fmt: skip
    version = root.table.get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise CatalogueError("version must be a string of 1-64 letters, digits, '.', '_', '-'")

    formats = root.sub("format")
    formats.only(["date", "month_names"])
    date_formats = formats.sub("date").texts(_DATE_SAMPLE)
    months = formats.sub("month_names")
    months.only(root.languages)
    month_names = {}
    for language in root.languages:
        names = months.table.get(language)
        where = f"{months.where}.{language}"
        if not isinstance(names, list) or len(names) != _MONTHS:
            raise CatalogueError(f"{where} must list the twelve months, January first")
        month_names[language] = tuple(_text(n, where, {}) for n in names)

    layout_table = root.sub("layout")
    layout_table.only(_LAYOUT)
    layout = {name: layout_table.sub(name).texts(sample) for name, sample in _LAYOUT.items()}
    reaches_table = root.sub("reaches")
    reaches_table.only(SCORE_DECISIONS)
    reaches = {d: reaches_table.sub(d).texts({}) for d in SCORE_DECISIONS}
    contest = root.sub("contest").texts(_CONTEST_SAMPLE)

    outcomes_table = root.sub("outcomes")
    outcomes_table.only(OUTCOMES)
    outcomes = {}
    for kind, codes in OUTCOMES.items():
        table = outcomes_table.sub(kind)
        table.only(codes)
        outcomes[kind] = {code: table.sub(code).texts({}) for code in codes}

    reasons_table = root.sub("reasons")
    reasons = {}
    for code in reasons_table.table:
        if not _CODE.fullmatch(code):
            raise CatalogueError(f"reasons.{code}: a code is 1-64 of A-Z, 0-9 and _")
        reasons[code] = reasons_table.sub(code).texts({})
    patterns = _reason_patterns(
        root.sub("reason_patterns")
        if "reason_patterns" in root.table
        else _Reader({}, "catalogue.reason_patterns", root.languages)
    )
    for code in reasons:
        for pattern in patterns:
            if pattern.match(code) is not None:
                raise CatalogueError(
                    f"reasons.{code} is also matched by reason_patterns.{pattern.name}"
                )

    features_table = root.sub("features")
    features = {name: _feature(features_table.sub(name), name) for name in features_table.table}
    return Catalogue(
        version=version,
        languages=root.languages,
        date_formats=date_formats,
        month_names=month_names,
        layout=layout,
        reaches=reaches,
        contest_texts=contest,
        outcomes=outcomes,
        reasons=reasons,
        reason_patterns=patterns,
        features=features,
    )


def _reason_patterns(table: _Reader) -> tuple[ReasonPattern, ...]:
    patterns = []
    for name in table.table:
        entry = table.sub(name)
        code = entry.table.get("code")
        if not isinstance(code, str) or not _PATTERN_CODE.fullmatch(code):
            raise CatalogueError(f"{entry.where}.code must be an upper-snake code with {{name}}s")
        try:
            parts = list(string.Formatter().parse(code))
        except ValueError as error:
            raise CatalogueError(f"{entry.where}.code is not a valid template: {error}") from None
        regex, names = "", []
        for literal, field, spec, conversion in parts:
            if not _CODE.fullmatch(literal) and literal:
                raise CatalogueError(f"{entry.where}.code must be upper-snake around placeholders")
            regex += re.escape(literal)
            if field is not None:
                if not field.isidentifier() or spec or conversion or field in names:
                    raise CatalogueError(f"{entry.where}.code: bad placeholder {{{field}}}")
                names.append(field)
                regex += f"(?P<{field}>[0-9]+)"
        if not names:
            raise CatalogueError(f"{entry.where}.code has no placeholder: list it in reasons")
        texts = entry.texts(dict.fromkeys(names, "1"), extra=["code"])
        patterns.append(ReasonPattern(name, code, re.compile(regex), texts))
    return tuple(patterns)


def _feature(entry: _Reader, name: str) -> FeatureEntry:
    entry.only(["change", "targets", "template", "categories", *DIRECTIONS])
    change = entry.table.get("change")
    if change not in CHANGE_KINDS:
        raise CatalogueError(f"{entry.where}.change must be one of {', '.join(CHANGE_KINDS)}")
    moves: dict[str, Texts] = {
        d: entry.sub(d).texts(_NUMERIC_SAMPLE) for d in DIRECTIONS if d in entry.table
    }
    targets = entry.table.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise CatalogueError(f"{entry.where}.targets must be a list of categories")
    if len(set(targets)) != len(targets):
        raise CatalogueError(f"{entry.where}.targets must not repeat a category")
    template = entry.sub("template").texts(_CATEGORY_SAMPLE) if "template" in entry.table else None
    categories = {}
    if "categories" in entry.table:
        table = entry.sub("categories")
        categories = {c: table.sub(c).texts({}) for c in table.table}
    if change != ACTIONABLE and (moves or targets or template or categories):
        raise CatalogueError(
            f"{entry.where} is {change}: only actionable features have change texts"
        )
    return FeatureEntry(name, change, moves, tuple(targets), template, categories)


def load_catalogue(path: Path = DEFAULT_CATALOGUE) -> Catalogue:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogueError(f"catalogue file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise CatalogueError(f"catalogue file {path} is not valid TOML: {error}") from None
    try:
        return parse_catalogue(document)
    except CatalogueError as error:
        raise CatalogueError(f"{path}: {error}") from None


@functools.cache
def default_catalogue() -> Catalogue:
    """The bundled catalogue, loaded and validated once per process."""
    return load_catalogue()
