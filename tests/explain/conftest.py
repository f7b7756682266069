"""The served model, policy and catalogue, loaded once for the explanation room's tests."""

from __future__ import annotations

import pytest

from service.config import DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY, DEFAULT_POLICY
from service.decisions.policy import DecisionPolicy, load_policy
from service.explain.catalogue import Catalogue, default_catalogue
from service.model.scorer import Row, Scorer
from tests.conftest import applicants


@pytest.fixture(scope="session")
def scorer() -> Scorer:
    """The bundled artifact, verified as the server verifies it."""
    return Scorer(DEFAULT_MODEL_DIR, DEFAULT_MODEL_PUBLIC_KEY)


@pytest.fixture(scope="session")
def policy() -> DecisionPolicy:
    return load_policy(DEFAULT_POLICY)


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return default_catalogue()


@pytest.fixture(scope="session")
def rows() -> list[Row]:
    """German-credit applicants as `open_row` returns them: numbers as floats."""
    return [
        {name: value if isinstance(value, str) else float(value) for name, value in row.items()}
        for row in applicants()
    ]
