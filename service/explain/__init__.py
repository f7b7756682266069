"""The explanation room: a decision told to the customer in every language of the catalogue.

The PrivacyService servicer calls only what is exported here: the catalogue (texts, versioned,
validated once), counterfactuals computed with the served model, and the rendering of
`Explanation` messages. Nothing here touches the network, the audit log or the store.
"""

from service.explain.catalogue import (
    Catalogue,
    CatalogueError,
    default_catalogue,
    load_catalogue,
)
from service.explain.counterfactual import Counterfactual, Probabilities, counterfactuals
from service.explain.render import (
    ExplainedDecision,
    explain_decision_response,
    explanation,
    explanations,
    score_range,
)

__all__ = [
    "Catalogue",
    "CatalogueError",
    "Counterfactual",
    "ExplainedDecision",
    "Probabilities",
    "counterfactuals",
    "default_catalogue",
    "explain_decision_response",
    "explanation",
    "explanations",
    "load_catalogue",
    "score_range",
]
