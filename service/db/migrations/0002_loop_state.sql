-- privscore schema 2: the closed loop's state (issue 17), service/decisions/store.py schema 4's
-- three new tables column for column, times as timestamptz bound into the seal as `*_at_us`
-- (service/db/migrations/__init__.py, "Schema 2", says why each is shaped as it is).
-- Never edit this file once shipped (0001_initial.sql says why).

CREATE TABLE scores (
    tenant text COLLATE "C" NOT NULL,
    pseudonym text COLLATE "C" NOT NULL,
    decision_id text COLLATE "C" NOT NULL,
    scored_at timestamptz NOT NULL,  -- bound into the seal as scored_at_us
    sealed bytea NOT NULL,  -- AES-GCM: score, grade, decision, model version
    PRIMARY KEY (tenant, pseudonym)
);
COMMENT ON TABLE scores IS
    'Each subject''s latest Score decision, what AdjustLimit decides on; written in the batch '
    'transaction of its audit record, a later scored_at replacing an earlier one only.';

CREATE TABLE alert_states (
    alert_sequence bigint PRIMARY KEY CHECK (alert_sequence > 0),  -- the alert as raised
    tenant text COLLATE "C" NOT NULL,
    pseudonym text COLLATE "C" NOT NULL,
    severity text COLLATE "C" NOT NULL,
    state text COLLATE "C" NOT NULL CHECK (state IN ('OPEN', 'ACKNOWLEDGED', 'RESOLVED')),
    changed_at timestamptz NOT NULL,  -- bound into the seal as changed_at_us
    sealed bytea NOT NULL  -- AES-GCM: the last change's reason code
);
CREATE INDEX alert_states_by_subject ON alert_states (tenant, pseudonym, state);
COMMENT ON TABLE alert_states IS
    'Where each raised alert stands, by subject: written with the alert, changed (row locked) in '
    'the transaction that appends the change to the alerts stream; deleted by erasure.';

CREATE TABLE subject_keys (
    tenant text COLLATE "C" NOT NULL,
    pseudonym text COLLATE "C" NOT NULL,
    period text COLLATE "C" NOT NULL CHECK (period ~ '^[0-9]{4}-[0-9]{2}$'),  -- YYYY-MM
    key_id text COLLATE "C" NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,  -- bound into the seal as created_at_us
    sealed bytea NOT NULL,  -- AES-GCM: the subject's key for the period
    PRIMARY KEY (tenant, pseudonym, period)
);
CREATE INDEX subject_keys_by_period ON subject_keys (period);
COMMENT ON TABLE subject_keys IS
    'One random key per subject per calendar month, sealed under the state key: the personal '
    'fields of that month''s audit records are sealed under it. Made on first use and committed '
    'before any record is sealed under it; destroyed by erasure and retention expiry.';

CREATE TABLE store_fills (
    name text COLLATE "C" PRIMARY KEY  -- the fill still to do
);
COMMENT ON TABLE store_fills IS
    'Fills a migration leaves to the servers, since they open sealed rows and SQL holds no state '
    'key: one row per fill still to do, deleted by the first server to start in the transaction '
    'that does the fill (its row lock keeps replicas starting together from doing it twice).';
-- Alerts raised under schema 1 have no state row yet; a new database has no alert to fill.
INSERT INTO store_fills (name) SELECT 'alert_states' WHERE EXISTS (SELECT FROM alerts);
