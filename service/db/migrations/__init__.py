"""The PostgreSQL schema, as numbered migrations (`NNNN_<name>.sql`, applied in order by
`service.db.schema.migrate`). This docstring is the design of schema 1 (0001_initial.sql).

The audit log
-------------
The file log's guarantees carry over only if the database keeps the same bytes and the same
order. The design follows the SQL drivers of Tessera (transparency-dev/tessera: MySQL, and the
SQLite design notes) and Trillian (MySQL/PostgreSQL storage):

- **One sequencing row, locked by the batch** (Tessera's MySQL driver starts the transaction
  that sequences and integrates a batch by taking a write lock on its single state row;
  Trillian's sequencer, one at a time under a lease, does the same work). An appender
  opens one transaction per batch (group commit: a batch of every record its process has
  queued, not one transaction per record), `SELECT ... FROM audit_log_state FOR UPDATE`, numbers
  the batch `size, size + 1, ...`, seals each envelope on the row's `chain` (the chain value of
  the record before: the envelope's MAC and chain need it, so the numbering and sealing happen
  under the lock), inserts the entries, their `audit_decisions` index rows and the changed tiles,
  updates `size`, `chain`, `root`, and commits. The row lock serialises appenders on every
  replica, so sequence numbers are dense, follow commit order and are never reused: a rolled
  back batch leaves `size` as it was. No PostgreSQL SEQUENCE is used, because a sequence value
  taken in one transaction can commit after a larger one and leaves gaps on rollback.
- **Integrated in the same transaction** (as Tessera's MySQL driver does; its POSIX and GCP
  drivers integrate later, which needs a second "integrated up to" coordinate). `size`, `root`,
  the tiles and the entries therefore always agree. The checkpoint signer nevertheless does
  not sign the `root` it reads: it re-reads the records since the latest checkpoint (chain and
  MAC) and signs the root it computes itself, so a row planted in the tables is never signed
  (service/audit/pg).
- **Entries by sequence, as exact bytes** (Trillian's `SequencedLeafData` keyed by
  sequence; Tessera's entry bundles). `audit_entries.envelope` holds the envelope byte for byte
  as the file log frames it (`service/audit/storage.py`): it is the Merkle leaf, and an export
  in the file format is these bytes framed. Reading one record is a point lookup.
- **Stored tree levels as tiles** (Tessera's `Subtree` table: one row per tile, rewritten until
  full, then immutable; C2SP tlog-tiles, height 8). Tile (L, i) holds the hashes at tree level
  8L of nodes i*256 .. i*256+w-1: level 0 the leaf hashes, level 1 roots of complete subtrees of
  256 leaves, and so on to level 7 (2^63 leaves fit). An inclusion or consistency proof reads at
  most two tiles per level: lookups stay logarithmic however long the log grows, and opening
  the log reads one row, not the records.
- **An index from decision id to sequence** (Trillian looks leaves up by identity hash;
  Tessera's MySQL driver has an optional dedup index). It is not authenticated: a lookup must
  check that the record it points at names the decision, and treat a missing row as "not
  indexed", never as proof of absence.
- **Checkpoints kept as signed notes** (Tessera's `Checkpoint` table holds only the latest;
  here every note is kept, as `checkpoints.log` keeps them, so `audit verify --against` and
  consistency proofs between any two checkpoints still work). One replica signs at a time, under
  the advisory lock `CHECKPOINT_LOCK` (service.db.schema), and numbers its row MAX(id) + 1
  while holding it.
- **Identity** (`audit_log_identity`): the origin and key name `identity.json` holds, written
  once when the log is first opened.

The decision store
------------------
`limit_decisions`, `events` and `alerts` mirror service/decisions/store.py schema 3 column for
column, with the times as timestamptz (microsecond precision, the same instants as SQLite's
`*_at_us` integers). A row's seal stays bound to its plain columns by the same associated data
(`_associated_data`: the table name and each column in order, integers in decimal), computed
with `decided_at_us = to_us(decided_at)` and likewise for the other times, so a row copied
between the two backends opens unchanged. Text keys use the "C" collation: byte order, as
SQLite sorts them, and cheaper comparisons.

One table has no SQLite counterpart: `alerts_sequencing`. SQLite numbers alerts MAX + 1 under
its single writer lock; across replicas, the number must be taken from a row locked until commit
so that alert N + 1 never becomes visible before alert N (a subscriber resuming "after N" would
skip it otherwise).

Lock order, for the backends: a transaction that appends to the audit log and writes the store
locks `audit_log_state` first, then `alerts_sequencing`, then inserts; never the other way round.

Not here yet: the backends that use these tables (issue 13), LISTEN/NOTIFY channels (no
schema), and any retention or partitioning of `audit_entries`.

Schema 2 (0002_loop_state.sql): the closed loop's state
--------------------------------------------------------
`scores`, `alert_states` and `subject_keys` mirror service/decisions/store.py schema 4 as
schema 1 mirrors schema 3: the same plain columns, times as timestamptz, the same seals. Their
keys are what the queries look up, so each query is an index lookup: a subject's latest score by
(tenant, pseudonym); a subject's alert states by (tenant, pseudonym, state), and one by its
alert's sequence when it changes; a subject key by (tenant, pseudonym, period), by its id (which
must name one key: UNIQUE), and by period for retention expiry.

The backends' writes keep schema 1's lock order: an alert state change locks `audit_log_state`
(the log's batch), then `alerts_sequencing` (its number in the stream), then its `alert_states`
row (`SELECT ... FOR UPDATE`, to re-check the state it was decided on).

One part of the migration cannot be SQL: alerts raised under schema 1 need their state rows, and
an alert's subject and severity are inside its seal, which SQL cannot open. `store_fills` holds
that work as a row, present only if there were alerts to fill; the first server to start does the
fill and deletes the row in one transaction, under the row's lock (`fill_alert_states` in
service/decisions/pg_store.py), so replicas starting together fill once, and a server that dies
midway leaves it to the next.
"""
