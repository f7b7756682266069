"""Where the review commands (`privscore audit verify|prove|show|export|replay`) read a log: a
file-log directory (`FileLog`, here) or the database log (`DatabaseLog`,
service/audit/pg/review.py). Each command has one code path, written against `LogSource`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service.audit.checkpoint import Checkpoint, VerifierKey
from service.audit.export import ExportReport, copy_log
from service.audit.storage import StoredRecord
from service.audit.verify import prove_record

Proved = tuple[Checkpoint, StoredRecord, list[bytes]]


class LogSource(Protocol):
    def origin(self) -> str | None:
        """The log's own origin where the log says it (the database's identity row); None
        when the command's default applies (for a file log, the data directory's
        identity.json, read when the parser is built)."""

    def directory(self) -> contextlib.AbstractContextManager[Path]:
        """The log as a file-log directory for the offline tools, while the context lasts."""

    def prove(
        self,
        decision_id: str,
        verifier: VerifierKey,
        origin: str,
        on_fallback: Callable[[str], None],
    ) -> Proved:
        """The decision's record and its inclusion proof against the latest checkpoint;
        NotProvable when there is none (yet). `on_fallback` is told why a lookup reads the
        whole log."""

    def export(self, out: Path) -> ExportReport:
        """The log written to `out` (new or empty) as a file-log directory."""


@dataclass(frozen=True)
class FileLog:
    """A file-log directory: the embedded server's `var/audit`, or a reviewer's copy."""

    path: Path

    def origin(self) -> str | None:
        return None

    @contextlib.contextmanager
    def directory(self) -> Iterator[Path]:
        yield self.path

    def prove(
        self,
        decision_id: str,
        verifier: VerifierKey,
        origin: str,
        on_fallback: Callable[[str], None],
    ) -> Proved:
        return prove_record(
            self.path,
            verifier,
            origin,
            equals={"decision_id": decision_id},
            confirm_not_found=True,  # a reviewer's copy: its index is not proof of absence
            on_fallback=on_fallback,
        )

    def export(self, out: Path) -> ExportReport:
        return copy_log(self.path, out)
