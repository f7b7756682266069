"""`privscore audit ...`: review an audit log directory offline, without the server.

    audit verify      [--against CHECKPOINT]        recompute the tree, check every checkpoint
    audit prove       --decision ID                 inclusion proof against the latest checkpoint
    audit verify-proof FILE                         check such a proof (no log needed)
    audit consistency --old CHECKPOINT --new CHECKPOINT
    audit checkpoint  [--out FILE]                  export the latest signed checkpoint
    audit show        [--decision ID] [--subject PSEUDONYM] [--since ISO] [--until ISO]
    audit export      [--out DIR]                   every record, one envelope per line; or
                                                    the log as a file-log directory in DIR

Output is JSON with hashes in base64 (show and export: one stored envelope per line; checkpoint:
the signed note). Exit 0 on success, 1 when verification fails or nothing is found, 2 for wrong
flags or settings.

Where the log is: `--audit-dir`, else (where the caller wires a `DatabaseOption`, as the
`privscore` command line does) the database log when a database is configured, else the
injected default directory. verify, prove, consistency, checkpoint, show and export read either
(service/audit/review.py).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from service.audit.checkpoint import Checkpoint, VerifierKey, parse_checkpoint
from service.audit.errors import AuditError, NotProvable
from service.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from service.audit.review import FileLog, LogSource
from service.audit.storage import StoredRecord
from service.audit.verify import (
    consistency_proof,
    find_records,
    iter_records,
    latest_checkpoint,
    parse_time,
    verify_log,
)

Command = Callable[[argparse.Namespace], int]
_T = TypeVar("_T")


class _Failed(Exception):
    """A command's expected failure: its message goes to stderr and the exit code is 1."""


class UsageError(Exception):
    """Wrong flags or settings: the message goes to stderr and the exit code is 2."""


@dataclass(frozen=True)
class DatabaseOption:
    """How the commands that read a log (verify, prove, show, export) reach a database log.

    `add_arguments` declares the database flags on such a command's parser (built with
    allow_abbrev=False, so no abbreviation can take a secret as a flag's value); `source`
    returns the database's log, or None to read a directory: when no database is configured,
    or when `audit_dir_given` (an explicit --audit-dir beats a database named by the
    environment; with one named by a flag as well it raises UsageError)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    source: Callable[..., LogSource | None]  # (args, *, audit_dir_given: bool)


def log_source(args: argparse.Namespace) -> LogSource:
    """The log a command reads: --audit-dir if given; else the database, if one is configured
    and the command takes one; else the default directory."""
    audit_dir = getattr(args, "audit_dir", None)
    database: DatabaseOption | None = getattr(args, "database", None)
    if database is not None:
        found = database.source(args, audit_dir_given=audit_dir is not None)
        if found is not None:
            return found
    directory = audit_dir or getattr(args, "default_audit_dir", None)
    if directory is None:
        raise UsageError("the following argument is required: --audit-dir")
    return FileLog(Path(directory))


def _origin(args: argparse.Namespace, source: LogSource | None = None) -> str:
    """--origin, else the log's own (the database's identity row), else the default."""
    origin = args.origin or (source.origin() if source is not None else None)
    origin = origin or args.default_origin
    if origin is None:
        raise UsageError("the following argument is required: --origin")
    return str(origin)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise _Failed(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise _Failed(f"{what} is not base64") from None


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _print_records(records: Iterable[StoredRecord]) -> None:
    for stored in records:
        sys.stdout.write(stored.envelope.decode("utf-8") + "\n")


def _verifier(args: argparse.Namespace) -> VerifierKey:
    """`--verifier-key`: the signed-note verifier key (`name+id+key`), or a file holding it."""
    text = args.verifier_key
    if "+" not in text:
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise _Failed(f"cannot read verifier key {args.verifier_key}: {error}") from None
    return VerifierKey.parse(text)


def _read_text(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise _Failed(f"cannot read {path}: {error}") from None


def _checkpoint_file(
    args: argparse.Namespace, path: str, source: LogSource | None = None
) -> Checkpoint:
    return parse_checkpoint(_read_text(path), _verifier(args), _origin(args, source))


def _cmd_verify(args: argparse.Namespace) -> int:
    source = log_source(args)
    origin, verifier = _origin(args, source), _verifier(args)
    # An exported checkpoint is checked under the key in charge at its size, by verify_log.
    against = _read_text(args.against) if args.against else None
    mac_key = None if args.mac_key is None or args.no_mac else args.mac_key()
    with source.directory() as directory:
        report = verify_log(directory, verifier, origin, against=against, mac_key=mac_key)
    _print_json(
        {
            "ok": report.ok,
            "size": report.size,
            "root_hash": _b64(report.root_hash),
            "checkpoints": report.checkpoints,
            "proven_size": report.proven_size,
            "first_bad_sequence": report.first_bad_sequence,
            "reason": report.reason,
            "problems": list(report.problems),
            "torn_tail_bytes": report.torn_tail_bytes,
            "mac_checked": report.mac_checked,
            "unauthenticated_records": report.unauthenticated_records,
            "keys": [{"from_size": first, "verifier_key": key} for first, key in report.keys],
        }
    )
    return 0 if report.ok else 1


def _cmd_prove(args: argparse.Namespace) -> int:
    source = log_source(args)
    origin, verifier = _origin(args, source), _verifier(args)
    try:
        checkpoint, found, proof = source.prove(
            args.decision,
            verifier,
            origin,
            on_fallback=lambda reason: print(
                f"privscore audit prove: {reason}; reading the whole log", file=sys.stderr
            ),
        )
    except NotProvable as error:
        raise _Failed(str(error)) from None
    _print_json(
        {
            "sequence": found.sequence,
            "leaf": found.envelope.decode("utf-8"),
            "leaf_hash": _b64(found.leaf_hash),
            "tree_size": checkpoint.size,
            "inclusion_proof": [_b64(node) for node in proof],
            "checkpoint": checkpoint.text,
        }
    )
    return 0


def _field(document: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = document.get(name)
    if type(value) is not kind:  # `is`, so that True is not taken for a sequence number
        raise _Failed(f"not a proof printed by `audit prove`: bad or missing {name!r}")
    return value


def _cmd_verify_proof(args: argparse.Namespace) -> int:
    try:
        document = json.loads(_read_text(args.file))
    except ValueError:
        raise _Failed("not a proof printed by `audit prove`: not JSON") from None
    if not isinstance(document, dict):
        raise _Failed("not a proof printed by `audit prove`")
    sequence = _field(document, "sequence", int)
    leaf = _field(document, "leaf", str).encode("utf-8")
    checkpoint = parse_checkpoint(
        _field(document, "checkpoint", str), _verifier(args), _origin(args)
    )
    if _field(document, "tree_size", int) != checkpoint.size:
        raise _Failed("the proof's tree size is not its checkpoint's")
    if _unb64(_field(document, "leaf_hash", str), "leaf_hash") != leaf_hash(leaf):
        raise _Failed("leaf_hash is not the hash of the leaf")
    try:
        envelope = json.loads(leaf)
    except ValueError:
        raise _Failed("the leaf is not a record envelope") from None
    if not isinstance(envelope, dict) or envelope.get("seq") != sequence:
        raise _Failed("the leaf's own sequence is not the one the proof claims")
    proof = [_unb64(node, "a proof node") for node in _field(document, "inclusion_proof", list)]
    verify_inclusion(leaf, sequence, checkpoint.size, proof, checkpoint.root_hash)
    _print_json({"ok": True, "sequence": sequence, "tree_size": checkpoint.size})
    return 0


def _cmd_consistency(args: argparse.Namespace) -> int:
    source = log_source(args)
    old, new = _checkpoint_file(args, args.old, source), _checkpoint_file(args, args.new, source)
    with source.directory() as directory:
        proof = consistency_proof(directory, old.size, new.size)
    verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
    _print_json(
        {
            "ok": True,
            "old_size": old.size,
            "new_size": new.size,
            "consistency_proof": [_b64(node) for node in proof],
        }
    )
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    source = log_source(args)
    with source.directory() as directory:
        checkpoint = latest_checkpoint(directory, _verifier(args), _origin(args, source))
    if checkpoint is None:
        raise _Failed("the log has no checkpoint yet")
    if args.out:
        Path(args.out).write_text(checkpoint.text, encoding="utf-8")
    else:
        sys.stdout.write(checkpoint.text)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    equals = {
        field: value
        for field, value in (("decision_id", args.decision), ("subject", args.subject))
        if value is not None
    }
    with log_source(args).directory() as directory:
        _print_records(find_records(directory, equals=equals, since=args.since, until=args.until))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    source = log_source(args)
    if args.out is None:
        with source.directory() as directory:
            _print_records(iter_records(directory))
        return 0
    report = source.export(Path(args.out))
    _print_json(
        {
            "directory": str(report.directory),
            "records": report.records,
            "checkpoints": report.checkpoints,
            "segments": report.segments,
            "bytes": report.bytes,
        }
    )
    return 0


def _guarded(command: Command, name: str) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UsageError as error:
            print(f"privscore audit {name}: {error}", file=sys.stderr)
            return 2
        except (_Failed, AuditError, OSError) as error:
            print(f"privscore audit {name}: {error}", file=sys.stderr)
            return 1

    return run


def _iso_time(text: str) -> datetime:
    parsed = parse_time(text)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}")
    return parsed


def add_audit_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    default_audit_dir: str | None = None,
    default_verifier_key: str | None = None,
    default_origin: str | None = None,
    mac_key: Callable[[], bytes] | None = None,
    database: DatabaseOption | None = None,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Register `audit ...` under `subparsers`; each command sets `run(args) -> exit code`.

    Defaults injected here (e.g. from the server's data directory) make the flags optional;
    `mac_key`, where the caller can load the server's secret, makes `verify` check every
    record's MAC; `database` lets verify, prove, show and export read a database log, whose
    identity row then gives the default origin. Returns the `audit` subcommands, for commands
    that need more than this room (they may call `log_source` with `database` set on their
    arguments).
    """
    audit = subparsers.add_parser("audit", help="verify, prove and read the audit log offline")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    def command(
        name: str,
        run: Command,
        help_text: str,
        *,
        log: bool = True,
        key: bool = True,
        reads_database: bool = False,
    ) -> argparse.ArgumentParser:
        option = database if reads_database else None
        # No abbreviations where a database password file flag exists (DatabaseOption).
        parser = commands.add_parser(name, help=help_text, allow_abbrev=option is None)
        if log:
            parser.add_argument(
                "--audit-dir",
                required=default_audit_dir is None and option is None,
                help="directory of the audit log"
                + (", instead of the database" if option is not None else ""),
            )
        if key:
            parser.add_argument(
                "--verifier-key",
                default=default_verifier_key,
                required=default_verifier_key is None,
                metavar="VKEY",
                help="the log's signed-note verifier key (name+id+key), or a file holding it",
            )
            parser.add_argument(
                "--origin",
                required=default_origin is None and option is None,
                help="the log's origin line, e.g. privscore.audit/<instance>"
                + ("; default the database log's own" if option is not None else ""),
            )
        if option is not None:
            option.add_arguments(parser)
        parser.set_defaults(
            run=_guarded(run, name),
            default_audit_dir=default_audit_dir,
            default_origin=default_origin,
            database=option,
        )
        return parser

    verify = command(
        "verify",
        _cmd_verify,
        "recompute the tree and check every checkpoint",
        reads_database=True,
    )
    verify.add_argument("--against", metavar="FILE", help="an exported checkpoint kept elsewhere")
    verify.set_defaults(mac_key=mac_key, no_mac=False)
    if mac_key is not None:
        verify.add_argument(
            "--no-mac",
            action="store_true",
            help="do not check records against the server's MAC key (a reviewer without it)",
        )

    prove = command("prove", _cmd_prove, "print a decision's inclusion proof", reads_database=True)
    prove.add_argument("--decision", required=True, metavar="ID", help="the record's decision_id")

    verify_proof = command(
        "verify-proof", _cmd_verify_proof, "check a proof from `audit prove`", log=False
    )
    verify_proof.add_argument("file", metavar="FILE", help="the printed proof ('-': stdin)")

    consistency = command(
        "consistency",
        _cmd_consistency,
        "prove and check one checkpoint extends another",
        reads_database=True,
    )
    consistency.add_argument("--old", required=True, metavar="CHECKPOINT")
    consistency.add_argument("--new", required=True, metavar="CHECKPOINT")

    checkpoint = command(
        "checkpoint", _cmd_checkpoint, "export the latest signed checkpoint", reads_database=True
    )
    checkpoint.add_argument("--out", metavar="FILE", help="write here instead of stdout")

    show = command("show", _cmd_show, "print matching records", key=False, reads_database=True)
    show.add_argument("--decision", metavar="ID", help="decision_id equals")
    show.add_argument(
        "--subject",
        metavar="PSEUDONYM",
        help="subject equals (records before format 3 name it in clear; with --open, format-3 "
        "records too, through the subject's keys)",
    )
    show.add_argument("--since", type=_iso_time, metavar="ISO", help="time at or after")
    show.add_argument("--until", type=_iso_time, metavar="ISO", help="time before")

    export = command(
        "export",
        _cmd_export,
        "print every record as JSON lines, or write the log to a directory (--out)",
        key=False,
        reads_database=True,
    )
    export.add_argument(
        "--out",
        metavar="DIR",
        help="write the log as a file-log directory (segments, checkpoints.log, identity.json; "
        "new or empty, owner-only) that `audit verify --audit-dir DIR` checks offline",
    )
    return commands
