"""The database log for the review commands (`privscore audit ... --database-url`): the
`LogSource` of service/audit/review.py over PostgreSQL.

Each command takes the simplest route that is correct:

- `prove` asks the decision index and the tiles (`prove_decision`: a few point reads, however
  long the log), which check what they read against the signed checkpoint. The index cannot
  show that a decision is absent (a row can be deleted, a decision id that is not a canonical
  UUID is not indexed), so a NOT_FOUND is confirmed by reading the whole log, as `audit prove`
  does on a reviewer's copy of a file log. Damage the lookup finds (an index row pointing at
  another record, edited tiles) is reported, not worked around: in the database they are
  written in the record's own transaction, so a disagreement is tampering, never a crash.
- `verify`, `show`, `export` (to stdout) and `replay` read every record anyway, so they run
  the file-log tools on an export (`export_log`, one REPEATABLE READ snapshot) in a private
  temporary directory (0700, under TMPDIR), removed when the command ends: the database is then
  judged by exactly the verifier and reader a file log is, with the same report, rather than by
  a second implementation of them. The copy costs disk the size of the log for as long as the
  command runs.
- `export --out DIR` is `export_log` into DIR.

Errors name the database by `ConnectionKwargs.describe` and database failures by class and
SQLSTATE (`describe`), never by a message that could quote a row or the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from service.audit.checkpoint import VerifierKey
from service.audit.errors import AuditError, NotProvable
from service.audit.export import ExportReport
from service.audit.pg.export import export_log
from service.audit.pg.lookup import prove_decision
from service.audit.pg.tables import IDENTITY, describe, read_identity
from service.audit.review import Proved
from service.audit.verify import prove_record

if TYPE_CHECKING:
    import psycopg

    from service.db.settings import ConnectionKwargs

_T = TypeVar("_T")


class DatabaseLog:
    """The audit log in the database `kwargs` names (module doc)."""

    def __init__(self, kwargs: ConnectionKwargs) -> None:
        self._kwargs = kwargs

    def __repr__(self) -> str:
        return f"DatabaseLog({self._kwargs.describe()})"

    @property
    def kwargs(self) -> ConnectionKwargs:
        """How to reach the database, for tools that read more of it than the log (the
        subject keys a format-3 record is opened with)."""
        return self._kwargs

    def origin(self) -> str:
        """The origin in `audit_log_identity`; AuditError when the database holds no log."""

        async def read(conn: psycopg.AsyncConnection[Any]) -> str:
            identity = await read_identity(conn)
            if identity is None:
                raise AuditError(
                    f"{IDENTITY} has no row: {self._kwargs.describe()} holds no audit log"
                )
            return identity.origin

        return self._run(read)

    @contextlib.contextmanager
    def directory(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="privscore-audit-") as temporary:
            path = Path(temporary) / "log"
            self.export(path)
            yield path

    def prove(
        self,
        decision_id: str,
        verifier: VerifierKey,
        origin: str,
        on_fallback: Callable[[str], None],
    ) -> Proved:
        async def lookup(conn: psycopg.AsyncConnection[Any]) -> Proved:
            return await prove_decision(conn, decision_id, verifier, origin)

        try:
            return self._run(lookup)
        except NotProvable as error:
            if error.why != "NOT_FOUND":
                raise
        on_fallback("the database's decision index does not hold it")
        with self.directory() as directory:
            return prove_record(
                directory,
                verifier,
                origin,
                equals={"decision_id": decision_id},
                confirm_not_found=True,
                on_fallback=on_fallback,
            )

    def export(self, out: Path) -> ExportReport:
        from service.db.connect import connect
        from service.db.schema import check_schema

        with self._errors(), connect(self._kwargs) as conn:
            check_schema(conn)
            return export_log(conn, out)

    def _run(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]) -> _T:
        """`work` on a connection of its own, after the schema check."""
        from service.db.connect import connect_async
        from service.db.schema import check_schema_async

        async def main() -> _T:
            conn = await connect_async(self._kwargs)
            try:
                await check_schema_async(conn)
                return await work(conn)
            finally:
                await conn.close()

        with self._errors():
            return asyncio.run(main())

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Database failures as AuditError, naming the database, never the password."""
        import psycopg

        from service.db.connect import DatabaseUnavailable
        from service.db.schema import SchemaError

        try:
            yield
        except DatabaseUnavailable as error:  # it names the database, scrubbed
            raise AuditError(self._kwargs.scrub(str(error))) from None
        except SchemaError as error:
            where = self._kwargs.describe()
            raise AuditError(f"{where}: {self._kwargs.scrub(str(error))}") from None
        except psycopg.Error as error:
            raise AuditError(f"{self._kwargs.describe()}: {describe(error)}") from None
