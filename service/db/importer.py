"""`privscore db import`: move an embedded deployment (the file audit log and the SQLite
decision store under a data directory) into a migrated PostgreSQL database, server stopped.

    privscore db migrate --database-url URL
    privscore db import  --database-url URL [--data-dir DIR] [--keyring FILE] [--kek-file FILE]

In order, stopping at the first refusal with nothing of that part written:

 1. The keyring (with its KEK, as `serve` loads it) gives the audit signing key, the record
    MAC key and the store's state key. The audit directory is locked as its writer locks it:
    a running server holds that lock, so the import refuses to run beside one.
 2. The file log must pass `audit verify` (every checkpoint under the server's key, every
    record's MAC) and every store row its authentication (the store opened as `store verify`
    opens it, so an older store is migrated as a start would): damage is not moved, it is
    reported (the log's first bad sequence, the number of rows).
 3. The database must be at this code's schema and hold neither an audit log nor store rows.
    The one exception: if it already holds this very log (same identity, size and root, from
    an earlier run whose store part failed), the log part is skipped.
 4. The log, in one transaction: written as `PgAuditLog` writes it, then checked with
    `PgAuditLog.open`'s full check in that transaction (service/audit/pg/load.py); it commits
    only if that passes and the root is the one `audit verify` computed.
 5. The store, in one transaction: every row authenticated and copied unchanged, the alert
    counter set, each table read back and compared by count and digest
    (service/decisions/pg_import.py).

Exit 0 when both parts are in the database, 1 when refused or failed, 2 for wrong settings or
keys. Output: one JSON object of ids and counts; nothing printed holds a record, an amount or
the password (database failures are named by class and SQLSTATE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.db.settings import ConnectionKwargs, connection_kwargs, database_settings_from
from service.settings import ConfigError

if TYPE_CHECKING:
    from service.audit import LogIdentity, VerifierKey, VerifyReport
    from service.config import DataLayout
    from service.decisions.store import DecisionStore
    from service.privacy.keyring import Keyring

COMMAND = "privscore db import"


class ImportRefused(Exception):
    """The import stops: the message says why and what, if anything, was committed."""


def run(args: argparse.Namespace) -> int:
    from service.config import DataLayout, data_dir_from, key_paths_from
    from service.privacy.keyring import Keyring, KeyringError, load_kek

    try:
        kwargs = connection_kwargs(database_settings_from(args))
        if kwargs is None:
            raise ConfigError("no database: set --database-url or PRIVSCORE_DATABASE_URL")
        data_dir = data_dir_from(args)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
    except (ConfigError, KeyringError) as error:
        print(f"{COMMAND}: {error}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_import(kwargs, DataLayout(data_dir), keyring))
    except ImportRefused as error:
        print(f"{COMMAND}: {kwargs.scrub(str(error))}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


async def _import(kwargs: ConnectionKwargs, layout: DataLayout, keyring: Keyring) -> dict[str, Any]:
    from service.audit import AuditError, Signer, read_identity, verify_log
    from service.audit.log import log_directory_locked
    from service.decisions.store import DecisionStore, StoreError
    from service.privacy.digest import derive_audit_mac_key, derive_state_key

    audit_dir = layout.audit_dir
    secret = keyring.server_secret()
    try:
        identity = read_identity(audit_dir) if audit_dir.is_dir() else None
        if identity is None:
            raise ImportRefused(f"no audit log in {audit_dir}: nothing to import")
        verifier = Signer(identity.key_name, keyring.audit_signing_key()[1]).verifier
        mac_key = derive_audit_mac_key(secret)
        with log_directory_locked(audit_dir):
            verified = verify_log(audit_dir, verifier, identity.origin, mac_key=mac_key)
            if not verified.ok:
                where = verified.first_bad_sequence
                raise ImportRefused(
                    f"the audit log in {audit_dir} does not verify (first bad sequence "
                    f"{where}: {verified.reason}); nothing was imported (`privscore audit "
                    "verify` reports it)"
                )
            store: DecisionStore | None = None
            if layout.decision_store.exists():
                store = DecisionStore(layout.decision_store, derive_state_key(secret))
            try:
                # Before anything is written: the store part would stop at such a row after the
                # log part committed.
                tampered = store.tampered_rows() if store is not None else []
                if tampered:
                    raise ImportRefused(
                        f"{len(tampered)} decision store rows fail their authentication; "
                        "nothing was imported (`privscore store verify` names them)"
                    )
                return await _into_database(
                    kwargs, audit_dir, identity, verifier, mac_key, verified, store
                )
            finally:
                if store is not None:
                    store.close()
    except (AuditError, StoreError, OSError) as error:
        raise ImportRefused(str(error)) from None


async def _into_database(
    kwargs: ConnectionKwargs,
    audit_dir: Path,
    identity: LogIdentity,
    verifier: VerifierKey,
    mac_key: bytes,
    verified: VerifyReport,
    store: DecisionStore | None,
) -> dict[str, Any]:
    import psycopg

    from service.audit import AuditError
    from service.audit.pg.load import held_log, load_file_log
    from service.audit.pg.tables import describe
    from service.db.connect import DatabaseUnavailable, connect_async
    from service.db.schema import SchemaError, check_schema_async
    from service.decisions.pg_import import held_rows, load_store
    from service.decisions.store import StoreError

    where = kwargs.describe()
    try:
        conn = await connect_async(kwargs)
    except DatabaseUnavailable as error:
        raise ImportRefused(str(error)) from None
    part = "checking the database"
    try:
        await check_schema_async(conn)
        held, rows = await held_log(conn), await held_rows(conn)
        same = (held.identity, held.size, held.root) == (
            identity,
            verified.size,
            verified.root_hash,
        )
        if not (held.empty or same):
            raise ImportRefused(
                f"{where} already holds an audit log ({held.size} records"
                + (f", origin {held.identity.origin}" if held.identity else "")
                + "): import into a new database"
            )
        if any(rows.values()):
            raise ImportRefused(
                f"{where} already holds decision store rows"
                + (" (and this audit log: imported before)" if same else "")
                + ": import into a new database"
            )
        log: dict[str, Any] = {"origin": identity.origin, "records": verified.size}
        if same:
            log["imported"] = "already in the database (an earlier import); left as it is"
        else:
            part = "importing the audit log (rolled back: nothing of it was kept)"
            async with conn.transaction():
                loaded = await load_file_log(
                    conn, audit_dir, identity=identity, verifier=verifier, mac_key=mac_key
                )
                if (loaded.records, loaded.root) != (verified.size, verified.root_hash):
                    raise ImportRefused(
                        f"the log written holds {loaded.records} records, `audit verify` "
                        f"read {verified.size}, or their roots differ; rolled back"
                    )
            log |= {
                "imported": "committed",
                "checkpoints": loaded.checkpoints,
                "indexed_decisions": loaded.indexed,
                "torn_tail_bytes": loaded.torn_tail_bytes,
            }
        part = (
            "importing the decision store (rolled back: no row was kept; the audit log is "
            "committed, and `privscore db import` run again imports the store alone)"
        )
        async with conn.transaction():
            loaded_rows = await load_store(conn, store)
        return {
            "database": where,
            "audit_log": log,
            "store": {
                **loaded_rows.counts,
                "last_alert_sequence": loaded_rows.last_alert_sequence,
            },
        }
    except ImportRefused:
        raise
    except (SchemaError, DatabaseUnavailable) as error:
        raise ImportRefused(f"{where}: {part}: {error}") from None
    except psycopg.Error as error:
        raise ImportRefused(f"{where}: {part}: {describe(error)}") from None
    except (AuditError, StoreError) as error:  # named by sequence, table or file
        raise ImportRefused(f"{where}: {part}: {error}") from None
    finally:
        await conn.close()
