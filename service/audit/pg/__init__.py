"""The audit log in PostgreSQL (issue 13): the backend several replicas share.

`PgAuditLog` appends (group commit: one transaction per batch under the locked state row),
signs checkpoints (one replica at a time) and checks the whole log at open; `prove_decision`
and `consistency_proof` answer from the decision index and the tiles without a pass over the
log; `export_log` writes the database log as a file-log directory for `privscore audit verify`;
`review.DatabaseLog` is the database log as the review commands read it (`audit ...
--database-url`); `load.load_file_log` moves a file log in (`privscore db import`).
Records, tree and checkpoints are byte for byte the file log's (service/audit/storage.py,
merkle.py, checkpoint.py); the tables are schema 1 (service/db/migrations/0001_initial.sql).

The one place the audit room uses another of ours: service.db, for the schema check and the
advisory lock numbers. psycopg is loaded when a database is first used, so importing this
package needs neither it nor a database.
"""

from service.audit.pg.export import ExportReport, export_log
from service.audit.pg.log import PgAuditLog, Within
from service.audit.pg.lookup import consistency_proof, prove_decision
from service.audit.pg.tables import establish_identity, latest_checkpoint, read_identity

__all__ = [
    "ExportReport",
    "PgAuditLog",
    "Within",
    "consistency_proof",
    "establish_identity",
    "export_log",
    "latest_checkpoint",
    "prove_decision",
    "read_identity",
]
