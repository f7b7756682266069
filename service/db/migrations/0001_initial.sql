-- privscore schema 1: the tables the PostgreSQL audit log and decision store stand on.
-- The design and its reasons: service/db/migrations/__init__.py.
-- Never edit this file once shipped: each database records the SHA-256 of the migrations it
-- ran, and privscore refuses one whose migration differs from the file it ships. Change the
-- schema in a new file, 0002_<what>.sql.

-- The audit log ---------------------------------------------------------------------------

CREATE TABLE audit_log_identity (
    id smallint PRIMARY KEY CHECK (id = 0),
    origin text NOT NULL,  -- the checkpoints' origin line, fixed once the log exists
    key_name text NOT NULL,  -- the name the log's checkpoint key signs under
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE audit_log_identity IS
    'One row once the log is first opened: which log this is (identity.json of the file log).';

CREATE TABLE audit_log_state (
    id smallint PRIMARY KEY CHECK (id = 0),
    size bigint NOT NULL CHECK (size >= 0),  -- records in the log: the next sequence number
    chain bytea NOT NULL CHECK (octet_length(chain) = 32),  -- chain value of record size - 1
    root bytea NOT NULL CHECK (octet_length(root) = 32),  -- RFC 9162 root of records 0..size-1
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE audit_log_state IS
    'The one sequencing row: an appender locks it (SELECT ... FOR UPDATE) in the transaction '
    'that numbers, stores and integrates a batch, and updates it before commit.';
-- The empty log: the genesis chain (32 zero bytes) and the RFC 9162 root of no leaves.
INSERT INTO audit_log_state (id, size, chain, root)
VALUES (0, 0, decode(repeat('00', 32), 'hex'), sha256(''::bytea));

CREATE TABLE audit_entries (
    sequence bigint PRIMARY KEY CHECK (sequence >= 0),
    -- The envelope exactly as the file log frames it: {"chain","mac","record","seq"} in
    -- canonical JSON. These bytes are the Merkle leaf.
    envelope bytea NOT NULL CHECK (octet_length(envelope) BETWEEN 1 AND 16777215)
);
COMMENT ON TABLE audit_entries IS
    'Every record by its sequence number (dense from 0), as its exact envelope bytes.';

CREATE TABLE audit_decisions (
    decision_id uuid PRIMARY KEY,
    sequence bigint NOT NULL UNIQUE REFERENCES audit_entries (sequence)
);
COMMENT ON TABLE audit_decisions IS
    'Index from a record''s decision_id to its sequence, written with the entry. A hint: a '
    'lookup checks that the record it points at names the decision.';

CREATE TABLE audit_tiles (
    level smallint NOT NULL CHECK (level BETWEEN 0 AND 7),
    tile_index bigint NOT NULL CHECK (tile_index >= 0),
    -- Up to 256 hashes of 32 bytes: tlog-tiles tile (level, tile_index), partial until full.
    nodes bytea NOT NULL
        CHECK (octet_length(nodes) BETWEEN 32 AND 8192 AND mod(octet_length(nodes), 32) = 0),
    PRIMARY KEY (level, tile_index)
);
-- Hashes do not compress: store them out of line without trying.
ALTER TABLE audit_tiles ALTER COLUMN nodes SET STORAGE EXTERNAL;
COMMENT ON TABLE audit_tiles IS
    'The Merkle tree as C2SP tlog-tiles of height 8: level 0 holds leaf hashes, level L the '
    'roots of complete subtrees of 256^L leaves. A partial tile is rewritten until full.';

CREATE TABLE audit_checkpoints (
    id bigint PRIMARY KEY CHECK (id >= 0),  -- the order written, from 0
    tree_size bigint NOT NULL CHECK (tree_size >= 0),
    note bytea NOT NULL CHECK (octet_length(note) BETWEEN 1 AND 262144),  -- the signed note
    signed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_checkpoints_by_size ON audit_checkpoints (tree_size);
COMMENT ON TABLE audit_checkpoints IS
    'Every signed checkpoint (C2SP signed note), as checkpoints.log keeps them; written by one '
    'replica at a time under the checkpoint advisory lock.';

-- The decision store: service/decisions/store.py schema 3, column for column ---------------

CREATE TABLE limit_decisions (
    tenant text COLLATE "C" NOT NULL,
    request_id text COLLATE "C" NOT NULL,
    pseudonym text COLLATE "C" NOT NULL,
    fingerprint text COLLATE "C" NOT NULL,
    decided_at timestamptz NOT NULL,  -- bound into the seal as decided_at_us
    action text COLLATE "C" NOT NULL,
    sealed bytea NOT NULL,  -- AES-GCM: the response (limits, rule, reasons)
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX limit_decisions_by_subject ON limit_decisions (tenant, pseudonym, decided_at);
COMMENT ON TABLE limit_decisions IS
    'Limit decisions by request id; sealed under the state key with every plain column bound.';

CREATE TABLE events (
    tenant text COLLATE "C" NOT NULL,
    pseudonym text COLLATE "C" NOT NULL,
    event_id text COLLATE "C" NOT NULL,
    occurred_at timestamptz NOT NULL,  -- bound into the seal as occurred_at_us
    sealed bytea NOT NULL,  -- AES-GCM: kind, currency, amounts, outcome, days past due
    PRIMARY KEY (tenant, pseudonym, event_id)
);
CREATE INDEX events_by_time ON events (tenant, pseudonym, occurred_at);
COMMENT ON TABLE events IS
    'Behaviour events by customer and event id; sealed with every plain column bound.';

CREATE TABLE alerts (
    sequence bigint PRIMARY KEY CHECK (sequence > 0),
    raised_at timestamptz NOT NULL,  -- bound into the seal as raised_at_us
    sealed bytea NOT NULL  -- AES-GCM: the serialized Alert (without its sequence)
);
COMMENT ON TABLE alerts IS
    'The alert stream, numbered from 1 in commit order (see alerts_sequencing).';

CREATE TABLE alerts_sequencing (
    id smallint PRIMARY KEY CHECK (id = 0),
    last_sequence bigint NOT NULL CHECK (last_sequence >= 0)
);
INSERT INTO alerts_sequencing (id, last_sequence) VALUES (0, 0);
COMMENT ON TABLE alerts_sequencing IS
    'The last alert sequence given: locked (FOR UPDATE) by the transaction that numbers alerts, '
    'so numbers follow commit order and a subscriber resuming after N misses none.';
