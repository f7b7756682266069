"""The decision store's rows, one definition for both backends: their plain columns, how a
row is sealed and opened, and the errors a row that does not authenticate raises.

A row's amounts and other personal figures rest sealed with AES-256-GCM under the state key;
its plain columns (what queries select on) are the seal's associated data
(`associated_data`, one function for the writer and the reader), so a row whose columns or
blob were edited, or which was copied under another key, fails to open and raises
StoreTampered. The SQLite store (service/decisions/store.py) and the PostgreSQL store
(service/decisions/pg_store.py) write and read the very same rows, which is why
`privscore db import` can copy the sealed blobs unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, TypeVar, get_type_hints

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privscore.client.encoding import length_prefixed
from service.decisions.alert_rules import Event

ROW_LABEL = b"privscore.v1/store-row/v3\x00"
ROW_LABEL_V2 = b"privscore.v1/store-row\x00"  # read by the v2 -> v3 migration only
_NONCE_BYTES = 12
_TAG_BYTES = 16
LIMIT_DECISIONS = "limit_decisions"
EVENTS = "events"
ALERTS = "alerts"
SCORES = "scores"
ALERT_STATES = "alert_states"
SUBJECT_KEYS = "subject_keys"

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def to_us(moment: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return (moment - _EPOCH) // _MICROSECOND


def from_us(micros: int) -> dt.datetime:
    return _EPOCH + micros * _MICROSECOND


@dataclass(frozen=True)
class StoredLimitDecision:
    fingerprint: str
    response: bytes


class StoreError(RuntimeError):
    """The store file is of another schema version, or a row does not open with the key."""


class StoreTampered(StoreError):
    """A row does not authenticate: edited, copied under another key, or another state key.

    The message names the table and the fault, never a value from the row. `table` lets the
    caller map it (DATA_LOSS) and audit it.
    """

    def __init__(self, table: str, problem: str) -> None:
        super().__init__(f"decision store table {table}: {problem}")
        self.table = table
        self.problem = problem


class StateChanged(StoreError):
    """What a decision was made on changed before it could commit (another replica decided for
    the same customer meanwhile): decide again on what is stored now."""


class AlreadyStored(StateChanged):
    """The request or event the decision is for was stored meanwhile: read it and replay."""


DOES_NOT_OPEN = (
    "a row does not authenticate: its plain columns or sealed data were edited, "
    "it was copied under another key, or the state key is wrong"
)


# The plain columns of each table, in associated-data order. The same tuple is written to the
# columns and bound into the seal, and read back from the columns to open it.
class LimitRow(NamedTuple):
    tenant: str
    request_id: str
    pseudonym: str
    fingerprint: str
    decided_at_us: int
    action: str


class EventRow(NamedTuple):
    tenant: str
    pseudonym: str
    event_id: str
    occurred_at_us: int


class AlertRow(NamedTuple):
    sequence: int
    raised_at_us: int


class ScoreRow(NamedTuple):
    """A subject's latest Score decision, what AdjustLimit decides on (sealed: `RecordedScore`)."""

    tenant: str
    pseudonym: str
    decision_id: str
    scored_at_us: int


class AlertStateRow(NamedTuple):
    """Where one raised alert stands, by subject, so that a limit decision finds the subject's
    unresolved alerts without opening every alert. Its seal holds nothing: every column is
    plain for the queries, and authenticated as the seal's associated data."""

    alert_sequence: int
    tenant: str
    pseudonym: str
    severity: str
    state: str
    changed_at_us: int


class SubjectKeyRow(NamedTuple):
    """One subject's key for one calendar month (sealed: the key itself): the personal fields
    of that month's audit records are sealed under it, and destroying it (erasure, retention
    expiry) makes them unreadable while the log still verifies."""

    tenant: str
    pseudonym: str
    period: str
    key_id: str
    created_at_us: int


AnyRow = LimitRow | EventRow | AlertRow | ScoreRow | AlertStateRow | SubjectKeyRow
Row = TypeVar("Row", LimitRow, EventRow, AlertRow, ScoreRow, AlertStateRow, SubjectKeyRow)


def _table(name: str, kind: type[tuple[object, ...]]) -> tuple[str, tuple[type, ...]]:
    hints = get_type_hints(kind)
    return name, tuple(hints[column] for column in kind._fields)  # type: ignore[attr-defined]


TABLES: dict[type[tuple[object, ...]], tuple[str, tuple[type, ...]]] = {
    LimitRow: _table(LIMIT_DECISIONS, LimitRow),
    EventRow: _table(EVENTS, EventRow),
    AlertRow: _table(ALERTS, AlertRow),
    ScoreRow: _table(SCORES, ScoreRow),
    AlertStateRow: _table(ALERT_STATES, AlertStateRow),
    SubjectKeyRow: _table(SUBJECT_KEYS, SubjectKeyRow),
}


def table_columns(table: str) -> tuple[tuple[str, type], ...]:
    """The columns of store table `table` in order, with their Python types: the plain columns
    (times as `*_at_us` microseconds, ints), then `sealed` (bytes). KeyError for another name."""
    for kind, (name, types) in TABLES.items():
        if name == table:
            names: tuple[str, ...] = kind._fields  # type: ignore[attr-defined]
            return (*zip(names, types, strict=True), ("sealed", bytes))
    raise KeyError(table)


def associated_data(row: AnyRow) -> bytes:
    """The table's name and each plain column (integers in decimal), length-prefixed."""
    table, _ = TABLES[type(row)]
    return length_prefixed(ROW_LABEL, table, *(str(value) for value in row))


def columns(kind: type[AnyRow]) -> str:
    return ", ".join(kind._fields)


def typed(kind: type[Row], values: Sequence[object]) -> Row:
    """The row as read, refused if a column holds another type than the schema's (SQLite keeps
    e.g. a blob written into a TEXT column as a blob)."""
    table, types = TABLES[kind]
    for column, value, expected in zip(kind._fields, values, types, strict=True):
        if type(value) is not expected:
            raise StoreTampered(table, f"a row's {column} column holds a value of the wrong type")
    return kind._make(values)


def table_of(name: str) -> type[AnyRow]:
    """The row type of table `name`; StoreError for another name."""
    for kind, (table, _) in TABLES.items():
        if table == name:
            return kind  # type: ignore[return-value]
    raise StoreError(f"no table {name}")


class RowSealer:
    """Seals and opens rows under the state key: the one writer and reader of every row."""

    def __init__(self, state_key: bytes) -> None:
        self._aead = AESGCM(state_key)

    def seal(self, row: AnyRow, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated_data(row))

    def open(self, row: AnyRow, sealed: object) -> bytes:
        """The row's plaintext, or StoreTampered naming its table."""
        return self.decrypt(TABLES[type(row)][0], sealed, associated_data(row))

    def decrypt(self, table: str, sealed: object, associated: bytes) -> bytes:
        if type(sealed) is not bytes or len(sealed) < _NONCE_BYTES + _TAG_BYTES:
            raise StoreTampered(table, "a row's sealed column is not a sealed value")
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
        except InvalidTag:
            raise StoreTampered(table, DOES_NOT_OPEN) from None


@dataclass(frozen=True)
class RecordedScore:
    """The subject's latest Score decision as privscore recorded it."""

    decision_id: str
    scored_at: dt.datetime
    score: int
    grade: str
    decision: str
    model_version: str

    def sealed(self) -> bytes:
        return json.dumps(
            {
                "score": self.score,
                "grade": self.grade,
                "decision": self.decision,
                "model_version": self.model_version,
            }
        ).encode("utf-8")

    def row(self, tenant: str, pseudonym: str) -> ScoreRow:
        return ScoreRow(tenant, pseudonym, self.decision_id, to_us(self.scored_at))

    @classmethod
    def opened(cls, row: ScoreRow, plaintext: bytes) -> RecordedScore:
        return cls(
            decision_id=row.decision_id,
            scored_at=from_us(row.scored_at_us),
            **json.loads(plaintext),
        )


@dataclass(frozen=True)
class OpenAlert:
    """An alert of the subject not yet resolved: it acts on the limit by its severity."""

    alert_sequence: int
    severity: str  # LOW .. CRITICAL
    state: str  # OPEN or ACKNOWLEDGED


def event_details(event: Event) -> bytes:
    """What an event row seals: everything of the event but its key and time columns."""
    details = asdict(event)
    del details["event_id"], details["occurred_at"]
    return json.dumps(details).encode("utf-8")


def event_of(row: EventRow, plaintext: bytes) -> Event:
    """The event an opened row holds."""
    return Event(
        event_id=row.event_id, occurred_at=from_us(row.occurred_at_us), **json.loads(plaintext)
    )
