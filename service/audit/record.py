"""What the decision records hold, where more than one room reads it: the builder
(service/api/runtime.py), replay, and the metrics that count durable records. The schema of
every record kind is docs/audit-record.schema.json."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# 2 holds no float, so a record's canonical JSON is RFC 8785's; records without `format` are
# format 1 (a float probability of default). 3 names the subject only by the id of the key its
# personal fields are sealed under (`subject_key`): the pseudonym, the encrypted inputs, their
# digest and the amounts are in `sealed`, under a key per subject and month that erasure and
# retention expiry destroy (service/api/runtime.py).
RECORD_FORMAT = 3
# The record field naming the subject key (format 3).
SUBJECT_KEY = "subject_key"
# A Score record's probability of default since format 2: parts per billion, an integer.
PD_PPB = "probability_of_default_ppb"
PPB = 1_000_000_000


def recorded_probability(outputs: Mapping[str, Any], missing: float) -> float:
    """A Score record's probability of default, from either format; `missing` if it has none
    (an all-default score omits it)."""
    if PD_PPB in outputs:
        return float(outputs[PD_PPB]) / PPB
    return float(outputs.get("probability_of_default", missing))
