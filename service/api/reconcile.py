"""The decision store against the audit log; the log is the source of truth.

Servicers append a decision's audit record (fsynced) before they store its row, and the record
holds everything the row does (the amounts sealed). So the two can disagree only one way
honestly: a crash between the append and the store's commit leaves a record without its row.
Every other disagreement is damage:

- a record without its row (the crash above, or a deleted row) is repaired by rebuilding the
  row from the record, so a retried request replays its decision instead of deciding twice
  and a deleted limit decision cannot let its request id decide again;
- a row without its record means the log lost acknowledged records (cut short) or the row was
  not written by this server: nothing repairs that, and the server refuses to start.

Events leave the store by design once they fall out of the alert rules' retention window (a
later event of the same customer drops them), so only records still inside it are expected as
rows. Compared by keys only (tenant + request id, tenant + pseudonym + event id, and the
decision id an alert carries); every stored row is authenticated on the way, so an edited row
raises `StoreTampered` here too.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privscore.v1 import alert_service_pb2, limit_service_pb2
from service.api.alerts import EVALUATE_EVENT_METHOD, UPDATE_ALERT_STATE_METHOD
from service.api.limits import ADJUST_LIMIT_METHOD
from service.api.privacy import ERASE_SUBJECT_METHOD
from service.audit import StoredRecord, records_containing
from service.audit.record import SUBJECT_KEY
from service.audit.verify import parse_time
from service.decisions.alert_rules import Event
from service.decisions.store import DecisionStore
from service.privacy.record_seal import open_personal

# The audit record of a reconciliation at start: what was rebuilt, or why the start was refused.
STORE_RECONCILE = "privscore.store/Reconcile"
_ACTION_PREFIX = "LIMIT_ACTION_"
_RPCS = (
    ADJUST_LIMIT_METHOD,
    EVALUATE_EVENT_METHOD,
    UPDATE_ALERT_STATE_METHOD,
    ERASE_SUBJECT_METHOD,
)
_NEEDLES = tuple(b'"rpc":"' + rpc.encode() + b'"' for rpc in _RPCS)
# How a format-3 record's subject is held until the store names it: by its key's id.
_BY_KEY = "key:"


class ReconcileError(Exception):
    """A record a row should be rebuilt from does not hold what the row needs."""


# What the comparison keeps of each record: its sequence and keys, not the record (a log holds
# millions); restoring reads the few records it needs again.
@dataclass(frozen=True)
class _LimitRow:
    sequence: int
    key: tuple[str, str]
    subject: str  # `_subject_ref`


@dataclass(frozen=True)
class _EventRecord:
    sequence: int
    decision_id: str
    key: tuple[str, str, str]
    occurred_at: dt.datetime
    raises_alerts: bool


@dataclass
class Reconciliation:
    """What the log holds that the store lacks (to rebuild), and what the store holds that the
    log does not (unrepairable), by kind: limit decisions, events, alerts."""

    missing_limit_decisions: list[_LimitRow] = field(default_factory=list)
    missing_events: list[_EventRecord] = field(default_factory=list)
    missing_alerts: list[_EventRecord] = field(default_factory=list)
    # Alert state changes the log holds and the stream does not (sequences of their records).
    missing_alert_changes: list[int] = field(default_factory=list)
    # Erasures the log holds whose subject keys the store still has (a crash between the
    # erasure's record and its deletions): (record sequence, key ids still there).
    unfinished_erasures: list[tuple[int, list[str]]] = field(default_factory=list)
    unlogged_limit_decisions: list[tuple[str, str]] = field(default_factory=list)
    unlogged_events: list[tuple[str, str, str]] = field(default_factory=list)
    unlogged_alerts: list[int] = field(default_factory=list)  # alert stream sequences
    # Request ids with more than one limit decision in the log: a row deleted under a running
    # server lets its request id decide again. History cannot be undone; it is reported.
    decided_twice: list[tuple[str, str]] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return (
            len(self.missing_limit_decisions)
            + len(self.missing_events)
            + len(self.missing_alerts)
            + len(self.missing_alert_changes)
            + len(self.unfinished_erasures)
        )

    @property
    def unlogged(self) -> int:
        return (
            len(self.unlogged_limit_decisions)
            + len(self.unlogged_events)
            + len(self.unlogged_alerts)
        )

    def summary(self) -> dict[str, Any]:
        """Counts and keys (pseudonymous ids, never an amount), for logs and `store verify`."""
        return {
            "missing_in_store": {
                "limit_decisions": [list(row.key) for row in self.missing_limit_decisions],
                "events": [list(row.key) for row in self.missing_events],
                "alerts_of_decisions": [row.decision_id for row in self.missing_alerts],
                "alert_changes": len(self.missing_alert_changes),
                "erasures_unfinished": len(self.unfinished_erasures),
            },
            "missing_in_log": {
                "limit_decisions": [list(key) for key in self.unlogged_limit_decisions],
                "events": [list(key) for key in self.unlogged_events],
                "alert_sequences": self.unlogged_alerts,
            },
            "request_ids_decided_twice": [list(key) for key in self.decided_twice],
        }


def _decisions(audit_dir: Path) -> Iterator[StoredRecord]:
    """The log's limit and event decisions (not refusals), in log order."""
    for stored in records_containing(audit_dir, _NEEDLES):
        if _is_decision(stored.record):
            yield stored


def _is_decision(record: dict[str, Any]) -> bool:
    return record.get("rpc") in _RPCS and record.get("outcome") != "refused"


def _subject_ref(record: dict[str, Any]) -> str:
    """The record's subject: its pseudonym (formats 1-2), or its key's id (format 3), which
    `Subjects` turns into the pseudonym while the key exists."""
    key_id = record.get(SUBJECT_KEY)
    return f"{_BY_KEY}{key_id}" if key_id is not None else str(record.get("subject"))


class Subjects:
    """Names format-3 records' subjects from the store's subject keys. A record whose key is
    destroyed belongs to an erased subject (or a period past retention): the store is right
    not to hold its rows, and nothing is rebuilt from it."""

    def __init__(self, store: DecisionStore) -> None:
        # (tenant, pseudonym) by key id: every key row, opened once for the whole pass.
        self.by_key = store.subjects_of_keys()

    def pseudonym(self, ref: str) -> str | None:
        if not ref.startswith(_BY_KEY):
            return ref
        found = self.by_key.get(ref.removeprefix(_BY_KEY))
        return None if found is None else found[1]


class LoggedDecisions:
    """What the log holds of limit and event decisions, gathered from one pass over its
    envelopes: the server feeds it the pass that opens (and checks) the log, so start-up reads
    the log once; `store verify` runs a pass of its own (`from_log`)."""

    def __init__(self) -> None:
        self.limits: dict[tuple[str, str], _LimitRow] = {}
        self.decided_twice: set[tuple[str, str]] = set()
        self.events: dict[tuple[str, str], list[_EventRecord]] = defaultdict(list)
        self.event_keys: set[tuple[str, str, str]] = set()
        self.decision_ids: set[str] = set()
        # (record sequence, decision id, `_subject_ref`)
        self.alert_changes: list[tuple[int, str, str]] = []
        self.erasures: list[tuple[int, list[str]]] = []  # (record sequence, key ids)

    @classmethod
    def from_log(cls, audit_dir: Path) -> LoggedDecisions:
        gathered = cls()
        for stored in _decisions(audit_dir):
            gathered.add(stored)
        return gathered

    def see(self, sequence: int, envelope: bytes) -> None:
        """One stored envelope of the log, in order: parsed only if it may be a decision."""
        if any(needle in envelope for needle in _NEEDLES):
            stored = StoredRecord(sequence, json.loads(envelope)["record"], envelope)
            if _is_decision(stored.record):
                self.add(stored)

    def add(self, stored: StoredRecord) -> None:
        record = stored.record
        tenant, subject = str(record.get("tenant")), _subject_ref(record)
        self.decision_ids.add(str(record.get("decision_id")))
        if record["rpc"] == UPDATE_ALERT_STATE_METHOD:
            self.alert_changes.append(
                (stored.sequence, str(record.get("decision_id")), _subject_ref(record))
            )
            return
        if record["rpc"] == ERASE_SUBJECT_METHOD:
            erased = record.get("erased") or {}
            self.erasures.append((stored.sequence, [str(k) for k in erased.get("key_ids", [])]))
            return
        if record["rpc"] == ADJUST_LIMIT_METHOD:
            key = (tenant, str(record.get("request_id")))
            if key in self.limits:
                self.decided_twice.add(key)
            self.limits.setdefault(key, _LimitRow(stored.sequence, key, subject))
            return
        outputs = record.get("outputs") or {}
        if outputs.get("duplicate"):
            return  # a duplicate event changed nothing in the store
        event_id = str((record.get("event") or {}).get("event_id"))
        entry = _EventRecord(
            stored.sequence,
            str(record.get("decision_id")),
            (tenant, subject, event_id),
            _event_time(stored),
            bool(outputs.get("alerts")),
        )
        self.events[(tenant, subject)].append(entry)
        self.event_keys.add(entry.key)


def _event_time(stored: StoredRecord) -> dt.datetime:
    event = stored.record.get("event")
    moment = parse_time(event.get("occurred_at")) if isinstance(event, dict) else None
    if moment is None:
        raise ReconcileError(f"record {stored.sequence} has no event time")
    return moment


def _expected_events(
    events: dict[tuple[str, str], list[_EventRecord]], retention: dt.timedelta
) -> Iterator[_EventRecord]:
    """The events the store should still hold: each customer's event survives until an event
    stored after it lies more than the retention window later (the store's forget rule)."""
    for history in events.values():
        latest_after: dt.datetime | None = None
        for event in reversed(history):
            if latest_after is None or event.occurred_at >= latest_after - retention:
                yield event
            if latest_after is None or event.occurred_at > latest_after:
                latest_after = event.occurred_at


def compare(logged: LoggedDecisions, store: DecisionStore, retention_days: int) -> Reconciliation:
    """Compare the store with what the log holds (reads the store; changes nothing)."""
    subjects = Subjects(store)
    # Records of subjects whose keys are destroyed expect no rows (erased or expired).
    logged_limits = {
        key: row
        for key, row in logged.limits.items()
        if subjects.pseudonym(row.subject) is not None
    }
    events: dict[tuple[str, str], list[_EventRecord]] = defaultdict(list)
    for (tenant, ref), history in logged.events.items():
        pseudonym = subjects.pseudonym(ref)
        if pseudonym is not None:
            events[(tenant, pseudonym)] += [
                dataclasses.replace(e, key=(tenant, pseudonym, e.key[2])) for e in history
            ]
    for history in events.values():
        history.sort(key=lambda e: e.sequence)
    event_keys = {e.key for history in events.values() for e in history}
    report = Reconciliation(decided_twice=sorted(logged.decided_twice))
    stored_limits = set(store.limit_decision_keys())
    report.missing_limit_decisions = [
        row for key, row in logged_limits.items() if key not in stored_limits
    ]
    report.unlogged_limit_decisions = sorted(stored_limits - logged.limits.keys())

    stored_events = set(store.event_keys())
    expected = list(_expected_events(events, dt.timedelta(days=retention_days)))
    report.missing_events = [event for event in expected if event.key not in stored_events]
    report.unlogged_events = sorted(stored_events - event_keys)

    alert_decisions: set[str] = set()
    for sequence, blob in store.alert_rows():
        if not blob:
            continue  # erased in place
        decision_id = alert_service_pb2.Alert.FromString(blob).metadata.decision_id
        alert_decisions.add(decision_id)
        if decision_id not in logged.decision_ids:
            report.unlogged_alerts.append(sequence)
    report.missing_alert_changes = [
        sequence
        for sequence, decision_id, ref in logged.alert_changes
        if decision_id not in alert_decisions and subjects.pseudonym(ref) is not None
    ]
    keys_left = subjects.by_key
    report.unfinished_erasures = [
        (sequence, [key for key in key_ids if key in keys_left])
        for sequence, key_ids in logged.erasures
        if any(key in keys_left for key in key_ids)
    ]
    report.missing_alerts = [
        event
        for history in events.values()
        for event in history
        if event.raises_alerts and event.decision_id not in alert_decisions
    ]
    return report


def restore(
    report: Reconciliation,
    audit_dir: Path,
    store: DecisionStore,
    record_key: bytes,
    retention_days: int,
) -> int:
    """Rebuild every row the log holds and the store lacks, from the records' sealed fields;
    returns how many rows were written."""
    wanted = {row.sequence for row in report.missing_limit_decisions}
    wanted |= {event.sequence for event in (*report.missing_events, *report.missing_alerts)}
    wanted |= set(report.missing_alert_changes)
    records = {r.sequence: r for r in _decisions(audit_dir) if r.sequence in wanted}
    subjects = Subjects(store)

    def _opened(record_key: bytes, stored: StoredRecord) -> dict[str, Any]:
        def subject_key(key_id: str) -> bytes | None:
            found = store.key_by_id(key_id)
            return None if found is None else found[1]

        try:
            return open_personal(stored.record, record_key=record_key, subject_key=subject_key)
        except ValueError as error:
            raise ReconcileError(f"record {stored.sequence}: {error}") from None

    def _alerts(record_key: bytes, stored: StoredRecord) -> list[bytes]:
        """The alerts an event decision raised, as stored: with the record's audit sequence."""
        blobs = []
        for encoded in _opened(record_key, stored)["alerts"]:
            alert = alert_service_pb2.Alert.FromString(base64.b64decode(encoded))
            alert.metadata.audit_sequence = stored.sequence
            blobs.append(alert.SerializeToString())
        return blobs

    written = 0
    for limit in report.missing_limit_decisions:
        stored = records[limit.sequence]
        sealed = _opened(record_key, stored)
        response = limit_service_pb2.AdjustLimitResponse.FromString(
            base64.b64decode(sealed["response"])
        )
        response.metadata.audit_sequence = stored.sequence
        action = str((stored.record.get("outputs") or {}).get("action", ""))
        store.record_limit_decision(
            tenant=limit.key[0],
            pseudonym=str(subjects.pseudonym(limit.subject)),
            request_id=limit.key[1],
            fingerprint=str(sealed["fingerprint"]),
            decided_at=_decided_at(stored),
            action=action.removeprefix(_ACTION_PREFIX),
            response=response.SerializeToString(),
        )
        written += 1
    alerts_missing = {event.sequence for event in report.missing_alerts}
    for event in report.missing_events:
        stored = records[event.sequence]
        alerts = _alerts(record_key, stored) if event.sequence in alerts_missing else []
        alerts_missing.discard(event.sequence)
        tenant, pseudonym, event_id = event.key
        details = _opened(record_key, stored)["details"]
        store.record_event(
            tenant,
            pseudonym,
            Event(event_id=event_id, occurred_at=event.occurred_at, **details),
            alerts,
            _decided_at(stored),
            event.occurred_at - dt.timedelta(days=retention_days),
        )
        written += 1 + len(alerts)
    for sequence in sorted(alerts_missing):
        stored = records[sequence]
        written += len(store.record_alerts(_alerts(record_key, stored), _decided_at(stored)))
    for sequence in report.missing_alert_changes:  # in log order: a resolution after its ack
        stored = records[sequence]
        update = alert_service_pb2.Alert.FromString(
            base64.b64decode(_opened(record_key, stored)["update"])
        )
        update.metadata.audit_sequence = stored.sequence
        state = alert_service_pb2.AlertState.Name(update.state).removeprefix("ALERT_STATE_")
        store.record_alert_update(
            update.alert_sequence, state, _decided_at(stored), update.SerializeToString()
        )
        written += 1
    # Last: an erasure the log records takes whatever was rebuilt for its subject too.
    # (An erasure finished here destroys its keys; a later one of the same subject then finds
    # nothing left to delete.)
    for _, key_ids in report.unfinished_erasures:
        for tenant, pseudonym in sorted(
            {subjects.by_key[k] for k in key_ids if k in subjects.by_key}
        ):
            written += sum(store.erase_subject(tenant, pseudonym).values())
    return written


def _decided_at(stored: StoredRecord) -> dt.datetime:
    moment = parse_time(stored.record.get("time"))
    if moment is None:
        raise ReconcileError(f"record {stored.sequence} has no time")
    return moment
