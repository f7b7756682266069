"""Retention expiry (issue 17): on its schedule the server destroys the subject keys of every
month past the retention period, audits that it did, and forgets the store rows of decisions
that old; the log still verifies, and this month's keys are kept."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

from service.api.ledger import new_key
from service.api.privacy import RETENTION_EXPIRE, expiry_period
from service.audit import iter_records
from service.config import DataLayout
from service.decisions.store import DecisionStore
from service.privacy.digest import derive_state_key
from tests.conftest import ServerProcess, applicants, init_dev_keys, privscore_cli
from tests.test_audit_sealed_amounts import server_secret

OLD = ("t", "a" * 64, "2020-01")


def store_of(data_dir: Path) -> DecisionStore:
    return DecisionStore(
        DataLayout(data_dir).decision_store, derive_state_key(server_secret(data_dir))
    )


def test_expiry_destroys_old_keys_on_its_schedule_and_is_audited(tmp_path: Path) -> None:
    init_dev_keys(tmp_path)
    store = store_of(tmp_path)
    try:
        [(old_key_id, _)] = store.subject_keys([OLD], new_key)
    finally:
        store.close()
    server = ServerProcess(tmp_path, "--retention-days", "30", "--retention-interval-s", "1")
    try:
        expired = server.wait_for("retention.expired", 30)
        assert expired["keys"] == 1
        with server.channel() as channel:
            client = server.client(channel)
            scored = client.score("t", "kept-customer", applicants()[0])
        time.sleep(2.5)  # further runs find nothing more to expire
    finally:
        assert server.terminate() == 0
    store = store_of(tmp_path)
    try:
        assert store.key_by_id(old_key_id) is None
        kept = store.subject_key_ids("t", client.subject("t", "kept-customer").pseudonym)
        assert len(kept) == 1 and store.key_by_id(kept[0]) is not None
    finally:
        store.close()
    records = [s.record for s in iter_records(DataLayout(tmp_path).audit_dir)]
    expiries = [r for r in records if r["rpc"] == RETENTION_EXPIRE]
    assert len(expiries) == 1, "one record per run that destroyed keys, none for idle runs"
    (expiry,) = expiries
    assert expiry["expired"]["keys"] == 1 and expiry["expired"]["retention_days"] == 30
    assert expiry["expired"]["before_period"] == expiry_period(time_of(expiry["time"]), 30)
    assert "subject" not in expiry and "subject_key" not in expiry  # names no one
    assert any(r.get("decision_id") == scored.metadata.decision_id for r in records)
    verified = privscore_cli(tmp_path, "audit", "verify")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stdout


def time_of(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
