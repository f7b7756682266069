"""`privscore`: the one command line of the service (serve, and probes of a running server)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from service.audit.cli import DatabaseOption, UsageError, add_audit_commands, log_source
from service.config import (
    DEFAULT_DATA_DIR,
    DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_PUBLIC_KEY,
    DEFAULT_POLICY,
    ConfigError,
    DataLayout,
    add_data_dir_argument,
    add_key_arguments,
    add_server_arguments,
    data_dir_from,
    key_paths_from,
    settings_from,
)

DEFAULT_TARGET = "127.0.0.1:50051"
# Where `privscore monitor` looks by default: a server run with --metrics-port 9464 (the port
# deploy/k8s gives the metrics too).
DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """The caller's channel: mutual TLS with the named dev certificate, unless --insecure."""
    from service.client.channel import open_channel

    target = args.target or os.environ.get("PRIVSCORE_TARGET", DEFAULT_TARGET)
    return open_channel(target, data_dir_from(args), _cert_name(args), insecure=args.insecure)


def _cert_name(args: argparse.Namespace) -> str:
    return str(args.cert_name or os.environ.get("PRIVSCORE_CERT_NAME", "dev"))


def add_caller_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", help=f"server address, default {DEFAULT_TARGET} (env PRIVSCORE_TARGET)"
    )
    parser.add_argument(
        "--cert-name",
        help="client certificate under DATA_DIR/certs, default dev (env PRIVSCORE_CERT_NAME)",
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext (server --insecure)")
    add_data_dir_argument(parser)


def _cmd_serve(args: argparse.Namespace) -> int:
    """One server; or, with --workers above 1, a supervisor of that many (service.workers),
    which hands each worker the flags parsed here rather than sys.argv: `main` may be given
    its own argv."""
    from service.logs import configure_logging
    from service.workers import check_shareable, join_supervisor, serve_workers

    join_supervisor()
    try:
        settings = settings_from(args)
        check_shareable(settings)
    except ConfigError as error:
        print(f"privscore serve: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        return serve_workers(settings, args)
    # Imported only here: a supervisor never loads the server, its model runtime among it.
    from service.server import StartupError, serve

    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        print(f"privscore serve: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from service.security.certs import init_certs

    try:
        created = init_certs(DataLayout(data_dir_from(args)).certs_dir)
    except ConfigError as error:
        print(f"privscore certs: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"created {what}" for what in created) or "certificates already in place")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from service.client.probe import health_status

    try:
        with _channel(args) as channel:
            status = health_status(channel, args.service)
    except grpc.RpcError as error:
        print(f"privscore health: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _cmd_monitor(args: argparse.Namespace) -> int:
    from service.monitoring.monitor import MonitorError, fetch, parse, plot, table

    try:
        snapshot = parse(fetch(args.metrics_url))
        print(table(snapshot))
        if args.png is not None:
            plot(snapshot, args.window, args.png)
            print(f"wrote {args.png}")
    except MonitorError as error:
        print(f"privscore monitor: {error}", file=sys.stderr)
        return 1
    return 0


def _cmd_services(args: argparse.Namespace) -> int:
    from service.client.probe import list_services

    try:
        with _channel(args) as channel:
            names = list_services(channel)
    except grpc.RpcError as error:
        print(f"privscore services: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from service.privacy.admin import init_keys, publish
    from service.privacy.keyring import Keyring, KeyringError, load_kek

    try:
        data_dir = data_dir_from(args)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        layout = DataLayout(data_dir)
        if args.keys_command == "init":
            created = init_keys(layout, keyring_path, kek_file)
            print("\n".join(f"created {what}" for what in created) or "keys already in place")
            return 0
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
        if args.keys_command == "list":
            print(json.dumps(keyring.listing(), indent=2))
            return 0
        if args.keys_command == "rewrap":
            keyring.rewrap(load_kek(Path(args.new_kek_file), environ={}))
            print(
                f"keyring re-wrapped under the KEK in {args.new_kek_file}; give the server "
                "that KEK before its next start or SIGHUP"
            )
            return 0
        if args.keys_command == "rotate":
            entry = keyring.rotate()
            print(f"new primary {entry.purpose} key {entry.key_id}")
        else:
            entry = keyring.retire(args.key_id)
            print(f"retired {entry.purpose} key {entry.key_id}")
        publish(keyring, layout)
        return 0
    except (ConfigError, KeyringError) as error:
        print(f"privscore keys: {error}", file=sys.stderr)
        return 2


def _client(args: argparse.Namespace, channel: grpc.Channel) -> Any:
    """The SDK client: the server's sealing key and schema version from DiscoveryService
    (or, with --pin-key, the caller's own copy of the key, which the server must list); the
    pseudonym key and the certificate's identity from the data directory."""
    from service.client.sdk import PrivscoreClient, certificate_identity
    from service.privacy.pseudonym import Pseudonymiser
    from service.privacy.sealing import load_public_keyset
    from service.security.certs import CertPaths

    layout = DataLayout(data_dir_from(args))
    certificate = CertPaths(layout.certs_dir).client_cert(_cert_name(args))
    # Data keys are sealed for the identity of the certificate the channel presents.
    identity = certificate_identity(certificate.read_bytes()) if certificate.exists() else None
    pinned = load_public_keyset(Path(args.pin_key)) if args.pin_key else None
    return PrivscoreClient.discovered(
        channel, Pseudonymiser.from_file(layout.pseudonym_key), identity=identity, pinned=pinned
    )


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _print_message(message: Any) -> None:
    from google.protobuf import json_format

    print(
        json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            indent=2,
        )
    )


def _run_client(args: argparse.Namespace) -> int:
    """Shared error handling of the client commands: gRPC status and bad input files."""
    from google.protobuf import json_format

    from service.client.sdk import DiscoveryRefused

    try:
        with _channel(args) as channel:
            args.client_call(args, _client(args, channel))
    except grpc.RpcError as error:
        from service.client.errors import refusal

        head, *rest = refusal(error).lines()
        print("\n".join([f"privscore {args.command}: {head}", *rest]), file=sys.stderr)
        return 1
    except (OSError, ValueError, json_format.ParseError, DiscoveryRefused) as error:
        print(f"privscore {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def _call_score(args: argparse.Namespace, client: Any) -> None:
    features = _read_json(args.features)
    _print_message(
        client.score(args.tenant, args.customer_id, features, offer_currency=args.offer_currency)
    )


def _call_limit(args: argparse.Namespace, client: Any) -> None:
    from privscore.v1 import common_pb2, limit_service_pb2

    def money(minor_units: int) -> common_pb2.Money:
        return common_pb2.Money(currency_code=args.currency, minor_units=minor_units)

    account = limit_service_pb2.AccountState(
        current_limit=money(args.current_limit),
        balance=money(args.balance),
        on_time_repayments_in_row=args.on_time_repayments,
        days_past_due=args.days_past_due,
        account_age_days=args.account_age_days,
    )
    # The account's figures are sealed by the SDK; with neither --latest-score nor --features
    # the server decides on the customer's latest score as it recorded it.
    features = _read_json(args.features) if args.features else None
    _print_message(
        client.adjust_limit(
            args.tenant,
            args.customer_id,
            account,
            latest_score=args.latest_score,
            features=features,
            request_id=args.request_id,
        )
    )


def _call_event(args: argparse.Namespace, client: Any) -> None:
    """The event file holds the figures in clear (as BehaviourEvent's JSON); the SDK seals
    them into sealed_figures and clears them before the request leaves this process."""
    from google.protobuf import json_format

    from privscore.v1 import alert_service_pb2

    event = json_format.ParseDict(_read_json(args.event), alert_service_pb2.BehaviourEvent())
    _print_message(client.evaluate_event(args.tenant, args.customer_id, event))


def _call_model(args: argparse.Namespace, client: Any) -> None:
    """The models serving, or one change of them (ModelService)."""
    if args.model_command == "status":
        _print_message(client.get_models())
        return
    _print_message(
        client.change_models(
            args.model_command,
            model_dir=str(Path(args.model_dir).resolve()) if args.model_command == "load" else "",
            model_version=getattr(args, "model_version", "") or "",
            request_id=args.request_id or None,
        )
    )


def _call_outcome(args: argparse.Namespace, client: Any) -> None:
    """What happened after a Score decision (OutcomeService), by its decision id."""
    import datetime as dt

    from privscore.v1 import outcome_service_pb2

    observed = dt.datetime.fromisoformat(args.observed_at.replace("Z", "+00:00"))
    if observed.tzinfo is None:
        raise ValueError("--observed-at needs a time zone, e.g. 2027-11-30T00:00:00Z")
    _print_message(
        client.record_outcome(
            args.decision_id,
            outcome_service_pb2.Outcome.Value(f"OUTCOME_{args.outcome}"),
            observed,
            args.definition,
            request_id=args.request_id or None,
        )
    )


def _call_alert(args: argparse.Namespace, client: Any) -> None:
    from privscore.v1 import alert_service_pb2

    state = {
        "ack": alert_service_pb2.ALERT_STATE_ACKNOWLEDGED,
        "resolve": alert_service_pb2.ALERT_STATE_RESOLVED,
    }[args.alert_command]
    _print_message(
        client.update_alert_state(
            args.alert, state, args.reason, request_id=args.request_id or None
        )
    )


def _call_explain(args: argparse.Namespace, client: Any) -> None:
    """Every language's explanation as the customer reads it, or the whole reply as JSON."""
    response = client.explain_decision(args.decision_id)
    if args.json:
        _print_message(response)
        return
    texts = [f"[{e.language}]\n{e.text.rstrip()}" for e in response.explanations]
    print("\n\n".join(texts))


def _call_subject(args: argparse.Namespace, client: Any) -> None:
    subject = {"customer_id": args.customer_id, "pseudonym": args.pseudonym}
    if args.subject_command == "erase":
        _print_message(client.erase_subject(args.tenant, **subject))
        return
    document = client.export_subject(args.tenant, **subject)
    text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    if args.out is None:
        print(text, end="")
        return
    from service.files import write_private

    # A subject's whole record: owner-only, like everything privscore writes.
    write_private(Path(args.out), text.encode("utf-8"))
    print(f"wrote {args.out}", file=sys.stderr)


def _call_watch(args: argparse.Namespace, client: Any) -> None:
    from google.protobuf import json_format

    from privscore.v1 import alert_service_pb2

    severity = alert_service_pb2.Severity.Value(f"SEVERITY_{args.min_severity}")
    for alert in client.watch_alerts(severity, args.after):
        print(
            json_format.MessageToJson(alert, preserving_proto_field_name=True, indent=None),
            flush=True,
        )


def _cmd_audit_replay(args: argparse.Namespace) -> int:
    from service.api.replay import NotReplayable, replay
    from service.audit import AuditError, find_records
    from service.decisions.policy import PolicyError, load_policy
    from service.errors import ServiceError
    from service.model.manifest import ArtifactError
    from service.model.scorer import Scorer
    from service.privacy.digest import derive_input_digest_key, derive_record_key
    from service.privacy.keyring import Keyring, KeyringError, load_kek
    from service.privacy.sealing import FeatureOpener

    try:
        data_dir = data_dir_from(args)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
        scorer = Scorer(
            Path(args.model_dir or DEFAULT_MODEL_DIR),
            Path(args.model_public_key or DEFAULT_MODEL_PUBLIC_KEY),
        )
        policy = load_policy(Path(args.policy or DEFAULT_POLICY))
        args.default_audit_dir = str(DataLayout(data_dir).audit_dir)
        source = log_source(args)
    except (
        ConfigError,
        KeyringError,
        ArtifactError,
        PolicyError,
        ServiceError,
        UsageError,
    ) as error:
        print(f"privscore audit replay: {error}", file=sys.stderr)
        return 2
    secret = keyring.server_secret()
    try:
        with source.directory() as directory:
            found = next(find_records(directory, equals={"decision_id": args.decision}), None)
        if found is None:
            print(
                f"privscore audit replay: no record for decision {args.decision}", file=sys.stderr
            )
            return 1
        with _subject_keys(data_dir, secret, source) as keys:
            report = replay(
                found.record,
                scorer,
                FeatureOpener(keyring),
                policy,
                derive_input_digest_key(secret),
                derive_record_key(secret),
                keys.key,
            )
    except (AuditError, OSError) as error:
        print(f"privscore audit replay: the log cannot be read: {error}", file=sys.stderr)
        return 1
    except NotReplayable as error:
        print(
            f"privscore audit replay: decision {args.decision} cannot be replayed: {error}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps({"sequence": found.sequence, **report.to_json()}, indent=2))
    return 0 if report.matches else 1


def _cmd_audit_outcomes(args: argparse.Namespace) -> int:
    """`privscore audit outcomes`: the Score decisions with outcomes, for `privscore-model
    report` (service/api/outcome_export.py), written owner-only."""
    from service.api.outcome_export import AgeReader, outcome_lines
    from service.audit import AuditError
    from service.model.manifest import ArtifactError
    from service.model.scorer import Scorer
    from service.privacy.digest import derive_record_key
    from service.privacy.keyring import Keyring, KeyringError, load_kek
    from service.privacy.sealing import FeatureOpener

    try:
        data_dir = data_dir_from(args)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
        scorer = Scorer(
            Path(args.model_dir or DEFAULT_MODEL_DIR),
            Path(args.model_public_key or DEFAULT_MODEL_PUBLIC_KEY),
        )
        args.default_audit_dir = str(DataLayout(data_dir).audit_dir)
        source = log_source(args)
    except (ConfigError, KeyringError, ArtifactError, UsageError) as error:
        print(f"privscore audit outcomes: {error}", file=sys.stderr)
        return 2
    secret = keyring.server_secret()
    try:
        with (
            source.directory() as directory,
            _subject_keys(data_dir, secret, source) as keys,
        ):
            ages = AgeReader(scorer, FeatureOpener(keyring), derive_record_key(secret), keys.key)
            lines = [
                json.dumps(line, ensure_ascii=False, sort_keys=True)
                for line in outcome_lines(Path(directory), ages, args.definition)
            ]
    except (AuditError, OSError) as error:
        print(f"privscore audit outcomes: the log cannot be read: {error}", file=sys.stderr)
        return 1
    from service.files import write_private

    write_private(Path(args.out), ("\n".join(lines) + "\n").encode("utf-8"))
    print(f"wrote {len(lines) - 1} decisions with outcomes to {args.out}", file=sys.stderr)
    return 0


@dataclasses.dataclass(frozen=True)
class _SubjectKeys:
    """How the offline tools find subject keys: by key id (to open a format-3 record's personal
    fields; None once destroyed) and a pseudonym's key ids (how format-3 records name it)."""

    key: Callable[[str], bytes | None]
    key_ids_of: Callable[[str], list[str]]


@contextlib.contextmanager
def _subject_keys(data_dir: Path, secret: bytes, source: Any = None) -> Iterator[_SubjectKeys]:
    """The subject keys, over one connection: from the database when the log read is one
    (`source`), else from the embedded store under `data_dir` (the server may be running:
    SQLite serves readers beside it); none at all with no store there."""
    from service.audit.pg.review import DatabaseLog
    from service.decisions.store import DecisionStore
    from service.privacy.digest import derive_state_key

    state_key = derive_state_key(secret)
    if isinstance(source, DatabaseLog):
        from service.db.connect import connect
        from service.decisions.pg_store import key_ids_of_pseudonym, subject_key_by_id

        with connect(source.kwargs) as conn:
            yield _SubjectKeys(
                lambda key_id: subject_key_by_id(conn, state_key, key_id),
                lambda pseudonym: key_ids_of_pseudonym(conn, state_key, pseudonym),
            )
        return
    path = DataLayout(data_dir).decision_store
    if not path.exists():
        yield _SubjectKeys(lambda key_id: None, lambda pseudonym: [])
        return
    store = DecisionStore(path, state_key)
    try:

        def key(key_id: str) -> bytes | None:
            found = store.key_by_id(key_id)
            return None if found is None else found[1]

        yield _SubjectKeys(key, store.key_ids_of_pseudonym)
    finally:
        store.close()


def _audit_show_opening(show: Any) -> Any:
    """`audit show --open`: with the keyring and KEK (as replay loads them), print each record
    with its sealed fields opened as `opened`; without --open, the plain `audit show`."""

    def run(args: argparse.Namespace) -> int:
        # Without --audit-dir or a database, the log under --data-dir, as the server writes it.
        root = args.data_dir or os.environ.get("PRIVSCORE_DATA_DIR") or DEFAULT_DATA_DIR
        args.default_audit_dir = str(DataLayout(Path(root)).audit_dir)
        if not args.open:
            return int(show(args))
        return _cmd_audit_show_open(args)

    return run


def _cmd_audit_show_open(args: argparse.Namespace) -> int:
    from service.audit import AuditError, find_records
    from service.privacy.digest import derive_record_key
    from service.privacy.keyring import Keyring, KeyringError, load_kek
    from service.privacy.record_seal import SEALED, RecordSealError, open_personal

    try:
        data_dir = data_dir_from(args)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
    except (ConfigError, KeyringError) as error:
        print(f"privscore audit show: {error}", file=sys.stderr)
        return 2
    secret = keyring.server_secret()
    key = derive_record_key(secret)
    equals = {"decision_id": args.decision} if args.decision is not None else {}
    unopened = 0
    try:
        source = log_source(args)
    except UsageError as error:
        print(f"privscore audit show: {error}", file=sys.stderr)
        return 2
    try:
        # A subject is named in clear by records before format 3, and by its keys' ids since.
        with (
            source.directory() as directory,
            _subject_keys(data_dir, secret, source) as keys,
        ):
            subject_keys = set(keys.key_ids_of(args.subject)) if args.subject else set()
            for stored in find_records(
                directory, equals=equals, since=args.since, until=args.until
            ):
                record: dict[str, Any] = dict(stored.record)
                if args.subject and not (
                    record.get("subject") == args.subject
                    or record.get("subject_key") in subject_keys
                ):
                    continue
                if SEALED in record:
                    try:
                        record["opened"] = open_personal(
                            record, record_key=key, subject_key=keys.key
                        )
                    except RecordSealError as error:
                        print(
                            f"privscore audit show: record {stored.sequence}: {error}",
                            file=sys.stderr,
                        )
                        unopened += 1
                print(json.dumps({"record": record, "seq": stored.sequence}, ensure_ascii=False))
    except (AuditError, OSError) as error:
        print(f"privscore audit show: {error}", file=sys.stderr)
        return 1
    return 1 if unopened else 0


def _cmd_audit_rotate_key(args: argparse.Namespace) -> int:
    """Hand the audit log to a new signing key, with the server stopped.

    In three durable steps, each safe to crash after and to re-run: the new key is saved in the
    keyring (not yet in use); the log gets a rotation record signed by the old and the new key
    and a checkpoint signed by both; the keyring makes the new key primary and retires the old.
    """
    import datetime as dt

    from service.audit import (
        ROTATE_KEY_RPC,
        AuditError,
        AuditLog,
        Signer,
        find_records,
        read_identity,
    )
    from service.files import write_private
    from service.privacy.admin import publish
    from service.privacy.digest import derive_audit_mac_key
    from service.privacy.keyring import Keyring, KeyringError, load_kek

    try:
        data_dir = data_dir_from(args)
        layout = DataLayout(data_dir)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
        identity = read_identity(layout.audit_dir)
        if identity is None:
            raise AuditError(f"no audit log in {layout.audit_dir}: nothing to rotate")
        old_id, old_key = keyring.audit_signing_key()
        new_id, new_key = keyring.pending_audit_key() or keyring.add_audit_key()
        old = Signer(identity.key_name, old_key)
        new = Signer(identity.key_name, new_key)
        rotations = find_records(layout.audit_dir, equals={"rpc": ROTATE_KEY_RPC})
        done = any(r.record.get("new_key") == new.verifier.text for r in rotations)
        mac_key = derive_audit_mac_key(keyring.server_secret())
        # Opening checks the log under the key that signs it now, as the server does.
        audit_log = AuditLog(
            layout.audit_dir, signer=new if done else old, mac_key=mac_key, origin=identity.origin
        )
        try:
            if not done:
                now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
                sequence = audit_log.rotate_key_sync(new, now).sequence
        finally:
            audit_log.close_sync()
        keyring.promote_audit_key(new_id)
        publish(keyring, layout)
        write_private(layout.audit_verifier_key, (new.verifier.text + "\n").encode())
    except (ConfigError, KeyringError, AuditError, OSError) as error:
        print(f"privscore audit rotate-key: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "old_key_id": old_id,
                "new_key_id": new_id,
                "old_verifier_key": old.verifier.text,
                "new_verifier_key": new.verifier.text,
                "rotation_record": None if done else sequence,
            },
            indent=2,
        )
    )
    return 0


def _cmd_store_verify(args: argparse.Namespace) -> int:
    """Cross-check the decision store against the audit log (service.api.reconcile): every
    stored limit decision, event and alert has its audit record and every such record its row,
    and every row authenticates. Exit 0 when they agree, 1 when they do not."""
    from service.api.reconcile import LoggedDecisions, ReconcileError, compare
    from service.audit import AuditError
    from service.decisions.policy import PolicyError, load_policy
    from service.decisions.store import DecisionStore, StoreError
    from service.privacy.digest import derive_state_key
    from service.privacy.keyring import Keyring, KeyringError, load_kek

    try:
        data_dir = data_dir_from(args)
        layout = DataLayout(data_dir)
        keyring_path, kek_file = key_paths_from(args, data_dir)
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
        retention = load_policy(Path(args.policy or DEFAULT_POLICY)).alerts.retention_days
        store = DecisionStore(layout.decision_store, derive_state_key(keyring.server_secret()))
    except (ConfigError, KeyringError, PolicyError, StoreError) as error:
        print(f"privscore store verify: {error}", file=sys.stderr)
        return 2
    try:
        tampered = store.tampered_rows()
        if tampered and args.delete_tampered:
            store.delete_rows(tampered)
        # With tampered rows left in place, the comparison would stop at the first of them.
        report = (
            None
            if tampered and not args.delete_tampered
            else compare(LoggedDecisions.from_log(layout.audit_dir), store, retention)
        )
    except (AuditError, ReconcileError, OSError) as error:
        print(f"privscore store verify: {error}", file=sys.stderr)
        return 1
    finally:
        store.close()
    summary = report.summary() if report is not None else {}
    ok = (
        not tampered
        and report is not None
        and not (report.missing or report.unlogged or report.decided_twice)
    )
    print(
        json.dumps(
            {
                "ok": ok,
                "tampered_rows": [{"table": t, "rowid": r} for t, r in tampered],
                "tampered_rows_deleted": bool(tampered and args.delete_tampered),
                **summary,
            },
            indent=2,
        )
    )
    return 0 if ok else 1


def _cmd_db(args: argparse.Namespace) -> int:
    if args.db_command == "import":
        from service.db.importer import run as run_import

        return run_import(args)
    from service.db.commands import run

    return run(args)


def _database_log(args: argparse.Namespace, *, audit_dir_given: bool) -> Any:
    """The database log for the audit commands (service/audit/pg/review.py), when
    --database-url or PRIVSCORE_DATABASE_URL names one, with the password from its usual
    sources (service/db/settings.py); None to read a directory instead."""
    from service.db.settings import connection_kwargs, database_settings_from

    if audit_dir_given:
        if getattr(args, "database_url", None) is not None:
            raise UsageError("give --audit-dir or --database-url, not both")
        return None  # an explicit directory beats a database named in the environment
    try:
        kwargs = connection_kwargs(database_settings_from(args))
    except ConfigError as error:
        raise UsageError(str(error)) from None
    if kwargs is None:
        return None
    from service.audit.pg.review import DatabaseLog

    return DatabaseLog(kwargs)


def _database_option() -> DatabaseOption:
    from service.db.settings import add_database_arguments

    return DatabaseOption(add_database_arguments, _database_log)


def _local_log_origin(layout: DataLayout) -> str | None:
    """The origin of the log under the data directory, if there is one to read."""
    from service.audit import AuditError, read_identity

    try:
        identity = read_identity(layout.audit_dir)
    except (AuditError, OSError):
        return None
    return identity.origin if identity else None


def _local_audit_mac_key(layout: DataLayout) -> bytes:
    """The record MAC key of the server whose keyring is under the data directory (or
    PRIVSCORE_KEYRING), opened with its KEK: what `audit verify` needs to check every record."""
    from service.audit import AuditError
    from service.privacy.digest import derive_audit_mac_key
    from service.privacy.keyring import Keyring, KeyringError, load_kek

    keyring_path, kek_file = key_paths_from(argparse.Namespace(), layout.root)
    try:
        keyring = Keyring.load(keyring_path, load_kek(kek_file))
    except (KeyringError, ConfigError, OSError) as error:
        raise AuditError(
            f"cannot load the server's keyring to check the records' MACs ({error}); "
            "a reviewer without the server's secret passes --no-mac"
        ) from None
    return derive_audit_mac_key(keyring.server_secret())


def build_parser(data_dir: Path | None = None) -> argparse.ArgumentParser:
    """The command line; `data_dir` (the --data-dir given, if any) is where the reviewers'
    commands find the log, its key and origin by default, ahead of PRIVSCORE_DATA_DIR."""
    parser = argparse.ArgumentParser(prog="privscore", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", allow_abbrev=False, help="run the gRPC server until SIGTERM/SIGINT"
    )
    add_server_arguments(serve)
    serve.set_defaults(run=_cmd_serve)

    keys = commands.add_parser("keys", help="manage the server's keyring (no key material shown)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    key_commands.add_parser("init", help="create the dev KEK, keyring and caller key if missing")
    key_commands.add_parser("list", help="list key ids, purposes, states and fingerprints")
    key_commands.add_parser(
        "rotate", help="make a new primary field key; the old one still decrypts until retired"
    )
    rewrap = key_commands.add_parser(
        "rewrap", help="wrap every key under a new KEK (rotate the KEK, not the keys)"
    )
    rewrap.add_argument(
        "--new-kek-file", required=True, help="file holding the new base64 KEK (32 bytes)"
    )
    retire = key_commands.add_parser("retire", help="stop a non-primary key from decrypting")
    retire.add_argument("key_id")
    for sub in key_commands.choices.values():
        add_data_dir_argument(sub)
        add_key_arguments(sub)
    keys.set_defaults(run=_cmd_keys)

    # Reviewers' commands read the log offline; defaults follow --data-dir, PRIVSCORE_DATA_DIR
    # or ./var.
    layout = DataLayout(data_dir or Path(os.environ.get("PRIVSCORE_DATA_DIR") or DEFAULT_DATA_DIR))
    audit_commands = add_audit_commands(
        commands,
        default_audit_dir=str(layout.audit_dir),
        default_verifier_key=str(layout.audit_verifier_key),
        default_origin=_local_log_origin(layout),
        mac_key=lambda: _local_audit_mac_key(layout),
        database=_database_option(),
    )
    replay = audit_commands.add_parser(
        "replay",
        allow_abbrev=False,
        help="re-run a recorded decision (needs the keyring and KEK) and compare",
    )
    replay.add_argument("--decision", required=True, metavar="ID", help="the decision id")
    add_data_dir_argument(replay)
    add_key_arguments(replay)
    replay.add_argument("--model-dir", help="the recorded model, default the bundled model")
    replay.add_argument("--model-public-key", help="the model team's key, default bundled")
    replay.add_argument("--policy", help="the recorded policy file, default the bundled one")
    _database_option().add_arguments(replay)
    replay.set_defaults(run=_cmd_audit_replay, database=_database_option())
    outcomes = audit_commands.add_parser(
        "outcomes",
        allow_abbrev=False,
        help="the Score decisions with outcomes, champion and shadow, for privscore-model "
        "report (needs the keyring and KEK: the age group is read from the inputs)",
    )
    outcomes.add_argument("--out", required=True, help="JSON lines file, written owner-only")
    outcomes.add_argument(
        "--definition", help="only outcomes under this definition, e.g. DPD90_WITHIN_12M"
    )
    add_data_dir_argument(outcomes)
    add_key_arguments(outcomes)
    outcomes.add_argument("--model-dir", help="the model whose schema opens the inputs")
    outcomes.add_argument("--model-public-key", help="the model team's key, default bundled")
    _database_option().add_arguments(outcomes)
    outcomes.set_defaults(run=_cmd_audit_outcomes, database=_database_option())
    rotate_key = audit_commands.add_parser(
        "rotate-key",
        help="hand the log to a new signing key, recorded in the log and signed by both keys "
        "(stop the server first)",
    )
    add_data_dir_argument(rotate_key)
    add_key_arguments(rotate_key)
    rotate_key.set_defaults(run=_cmd_audit_rotate_key)
    show = audit_commands.choices["show"]
    show.add_argument(
        "--open",
        action="store_true",
        help="open the records' sealed amounts (needs the keyring and KEK, as replay)",
    )
    add_data_dir_argument(show)
    add_key_arguments(show)
    # Without --audit-dir or a database, the log under --data-dir (or PRIVSCORE_DATA_DIR, or
    # ./var).
    show.set_defaults(run=_audit_show_opening(show.get_default("run")))
    for name, sub in audit_commands.choices.items():
        if name not in ("show", "replay", "outcomes", "rotate-key"):  # declared with their keys
            add_data_dir_argument(sub)

    store = commands.add_parser("store", help="check the decision store against the audit log")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    store_verify = store_commands.add_parser(
        "verify",
        help="every stored limit decision, event and alert has its audit record and vice "
        "versa, and every row authenticates",
    )
    store_verify.add_argument(
        "--delete-tampered",
        action="store_true",
        help="delete rows that fail their authentication (server stopped); its next start "
        "rebuilds those the audit log records",
    )
    store_verify.add_argument("--policy", help="the decision policy, default the bundled one")
    add_data_dir_argument(store_verify)
    add_key_arguments(store_verify)
    store_verify.set_defaults(run=_cmd_store_verify)

    # PostgreSQL (issue 13). No abbreviations: `--database-password SECRET` must not pass for
    # `--database-password-file`, or a secret would show in `ps`.
    from service.db.settings import add_database_arguments

    db = commands.add_parser(
        "db", help="PostgreSQL: apply schema migrations, show the version, import a deployment"
    )
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser(
        "migrate",
        allow_abbrev=False,
        help="apply pending migrations (safe to run on several replicas at once)",
    )
    db_commands.add_parser(
        "status", allow_abbrev=False, help="the database's schema version and migrations"
    )
    db_import = db_commands.add_parser(
        "import",
        allow_abbrev=False,
        help="move the embedded audit log and decision store under --data-dir into an empty, "
        "migrated database (stop the server first; needs the keyring and KEK)",
    )
    add_data_dir_argument(db_import)
    add_key_arguments(db_import)
    for sub in db_commands.choices.values():
        add_database_arguments(sub)
    db.set_defaults(run=_cmd_db)

    certs = commands.add_parser("certs", help="dev certificates for mutual TLS")
    cert_commands = certs.add_subparsers(dest="certs_command", required=True)
    certs_init = cert_commands.add_parser(
        "init", help="create the dev CA, server and role client certificates if missing"
    )
    add_data_dir_argument(certs_init)
    certs.set_defaults(run=_cmd_certs)

    health = commands.add_parser("health", help="print a running server's health status")
    add_caller_arguments(health)
    health.add_argument("--service", default="", help="service name; empty for the whole server")
    health.set_defaults(run=_cmd_health)

    monitor = commands.add_parser(
        "monitor",
        help="print a running server's drift report (PSI per feature) from its metrics",
    )
    monitor.add_argument(
        "--metrics-url",
        default=os.environ.get("PRIVSCORE_METRICS_URL", DEFAULT_METRICS_URL),
        help=f"the server's metrics endpoint (env PRIVSCORE_METRICS_URL; default "
        f"{DEFAULT_METRICS_URL})",
    )
    monitor.add_argument(
        "--png", type=Path, help="also draw served vs training shares per feature to this PNG"
    )
    monitor.add_argument(
        "--window",
        choices=("window", "since_start"),
        default="window",
        help="which window the PNG draws (the table shows both)",
    )
    monitor.set_defaults(run=_cmd_monitor)

    services = commands.add_parser("services", help="list a running server's services")
    add_caller_arguments(services)
    services.set_defaults(run=_cmd_services)

    def client_command(
        name: str, help_text: str, call: Any, subject: bool = True, parent: Any = commands
    ) -> Any:
        sub = parent.add_parser(name, help=help_text)
        add_caller_arguments(sub)
        sub.add_argument(
            "--pin-key",
            metavar="KEYSET",
            help="the server's public keyset file (DATA_DIR/keys/public-keys.json, as `keys` "
            "writes it): seal to its primary key, and refuse a server that does not list it; "
            "by default the key the server names (DiscoveryService)",
        )
        if subject:
            sub.add_argument("--tenant", required=True, help="your tenant, e.g. baitiao-cn")
            sub.add_argument(
                "--customer-id",
                required=True,
                help="raw customer id; pseudonymised before it leaves this process",
            )
        sub.set_defaults(run=_run_client, client_call=call)
        return sub

    score = client_command("score", "score one applicant", _call_score)
    score.add_argument("--features", required=True, help="JSON file: feature name -> value")
    score.add_argument(
        "--offer-currency",
        default="",
        help="ISO 4217 code: an approved applicant gets the policy's initial limit in it",
    )
    limit = client_command("limit", "decide a customer's credit limit", _call_limit)
    limit.add_argument("--currency", default="CNY", help="ISO 4217 code, default CNY")
    limit.add_argument("--current-limit", type=int, required=True, help="minor units")
    limit.add_argument("--balance", type=int, required=True, help="minor units owed")
    limit.add_argument("--on-time-repayments", type=int, default=0)
    limit.add_argument("--days-past-due", type=int, default=0)
    limit.add_argument("--account-age-days", type=int, default=0)
    limit.add_argument("--request-id", help="idempotency key, default a fresh one")
    source = limit.add_mutually_exclusive_group()
    source.add_argument(
        "--latest-score",
        type=int,
        help="a score you state (only roles allowed to state scores); by default the "
        "customer's latest score as privscore recorded it",
    )
    source.add_argument("--features", help="JSON file of features to score in the same call")
    event = client_command("event", "evaluate one behaviour event", _call_event)
    event.add_argument(
        "--event",
        required=True,
        help="JSON file: a BehaviourEvent with its figures in clear (sealed before sending)",
    )
    alert = commands.add_parser("alert", help="acknowledge or resolve an alert")
    alert_commands = alert.add_subparsers(dest="alert_command", required=True)
    for verb, help_text in (
        ("ack", "acknowledge an alert: someone is handling it (it still acts on the limit)"),
        ("resolve", "resolve an alert: it no longer freezes or holds the limit"),
    ):
        change = client_command(verb, help_text, _call_alert, False, alert_commands)
        change.add_argument(
            "--alert", type=int, required=True, metavar="SEQ", help="the alert's sequence"
        )
        change.add_argument(
            "--reason",
            required=True,
            metavar="CODE",
            help="upper-snake-case reason code, e.g. CUSTOMER_CONTACTED (no free text)",
        )
        change.add_argument("--request-id", help="default a fresh one")
    explain = client_command(
        "explain", "explain a decision in every language", _call_explain, subject=False
    )
    explain.add_argument("--decision-id", required=True, help="the decision's id")
    explain.add_argument("--json", action="store_true", help="the whole reply as JSON")
    subject_command = commands.add_parser(
        "subject", help="a subject's rights: export everything kept, or erase it"
    )
    subject_commands = subject_command.add_subparsers(dest="subject_command", required=True)
    for verb, help_text in (
        ("export", "everything privscore keeps about a subject, as JSON"),
        ("erase", "erase a subject's events, alerts, limits and recorded scores"),
    ):
        rights = client_command(verb, help_text, _call_subject, False, subject_commands)
        rights.add_argument("--tenant", required=True, help="the subject's tenant")
        who = rights.add_mutually_exclusive_group(required=True)
        who.add_argument("--pseudonym", help="the subject's pseudonym (64 hex characters)")
        who.add_argument(
            "--customer-id", help="raw customer id; pseudonymised before it leaves this process"
        )
        if verb == "export":
            rights.add_argument(
                "--out", metavar="FILE", help="write the document here (owner-only), not stdout"
            )
    model = commands.add_parser(
        "model", help="the models serving: a challenger in shadow, promotion and rollback"
    )
    model_commands = model.add_subparsers(dest="model_command", required=True)
    for verb, help_text in (
        ("status", "the champion, the challenger and the previous champion"),
        ("load", "verify a signed artifact on the server and run it in shadow"),
        ("promote", "make the challenger the champion (the champion is kept for rollback)"),
        ("rollback", "bring back the champion the last promotion replaced"),
        ("unload", "stop the shadow"),
    ):
        change = client_command(verb, help_text, _call_model, False, model_commands)
        if verb != "status":
            change.add_argument("--request-id", help="default a fresh one")
        if verb == "load":
            change.add_argument(
                "--model-dir", required=True, help="the artifact directory, on the server"
            )
        if verb == "promote":
            change.add_argument(
                "--model-version", required=True, help="the challenger's, as status shows it"
            )
    outcome = client_command(
        "outcome", "record what happened after a Score decision", _call_outcome, subject=False
    )
    outcome.add_argument("--decision-id", required=True, help="the Score decision's id")
    outcome.add_argument("--outcome", required=True, choices=("BAD", "GOOD", "INDETERMINATE"))
    outcome.add_argument("--observed-at", required=True, help="when, e.g. 2027-11-30T00:00:00Z")
    outcome.add_argument(
        "--definition", required=True, help="the outcome definition, e.g. DPD90_WITHIN_12M"
    )
    outcome.add_argument("--request-id", help="default a fresh one")
    watch = client_command("watch", "stream alerts as JSON lines", _call_watch, subject=False)
    watch.add_argument(
        "--min-severity",
        default="UNSPECIFIED",
        choices=("UNSPECIFIED", "LOW", "MEDIUM", "HIGH", "CRITICAL"),
    )
    watch.add_argument("--after", type=int, help="resume after this alert sequence")
    return parser


def main(argv: list[str] | None = None) -> int:
    # --data-dir first, alone: the audit commands' defaults (log, verifier key, origin, MAC
    # key) are found under it, and they are set when the parser is built.
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--data-dir")
    found, _ = early.parse_known_args(sys.argv[1:] if argv is None else argv)
    data_dir = Path(found.data_dir).expanduser() if found.data_dir else None
    args = build_parser(data_dir).parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
