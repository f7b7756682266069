"""Server settings from flags and PRIVSCORE_* environment variables, validated once at start.

Each setting is declared once, as a field of ServerSettings (or of CallLimits, its `limits`)
with its flag, help, default and parser (service/settings.py); the flags, the variables,
`--help` and the resolution derive from it. A flag wins over its environment variable, which
wins over the default. Every path the server writes to lives under the data directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from service.db.settings import DatabaseSettings
from service.files import private_dir
from service.monitoring.settings import MonitoringSettings
from service.retention import RetentionSettings
from service.security.limits import CallLimits
from service.settings import (
    SETTING,
    Resolved,
    Setting,
    choice,
    integer,
    number,
    on_off,
    setting,
)
from service.settings import ConfigError as ConfigError  # re-exported: callers catch it here

DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_DATA_DIR = Path("var")
_PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = _PACKAGE_DIR / "model" / "default_artifact"
DEFAULT_MODEL_PUBLIC_KEY = _PACKAGE_DIR / "model" / "trusted_keys" / "model-team.pub"
DEFAULT_POLICY = _PACKAGE_DIR / "decisions" / "default_policy.toml"
DEFAULT_AUTHZ_POLICY = _PACKAGE_DIR / "security" / "default_authz.toml"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
AUDIT_OPEN_CHECKS = ("full", "latest")


@dataclass(frozen=True)
class DataLayout:
    """Where everything lives under the data directory; server and client commands agree."""

    root: Path

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def keyring(self) -> Path:
        return self.keys_dir / "keyring.json"

    @property
    def dev_kek(self) -> Path:
        """Dev only: production passes the KEK in PRIVSCORE_KEK or a mounted secret file."""
        return self.keys_dir / "kek"

    @property
    def public_keyset(self) -> Path:
        """The server's public field keys, for callers to seal to."""
        return self.keys_dir / "public-keys.json"

    @property
    def audit_public_key(self) -> Path:
        """The audit checkpoint verification key (PEM), for reviewers."""
        return self.keys_dir / "audit-signing.pub"

    @property
    def audit_verifier_key(self) -> Path:
        """The same key as a signed-note verifier key (`<origin>+<key id>+<key>`), for
        reviewers and transparency witnesses; the server writes it when it opens the log."""
        return self.keys_dir / "audit-signing.vkey"

    @property
    def decision_store(self) -> Path:
        return self.root / "decisions.sqlite3"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def certs_dir(self) -> Path:
        """Dev CA, server and client certificates from `privscore certs init`."""
        return self.root / "certs"

    @property
    def client_dir(self) -> Path:
        """The dev caller's own secrets; the server never reads here."""
        return self.root / "client"

    @property
    def pseudonym_key(self) -> Path:
        return self.client_dir / "pseudonym.key"


# -- settings: each declared once (service.settings), resolved in declaration order ----------


def _file(flag: str, text: str, _: Resolved) -> Path:
    return _existing(flag, text)


def _directory(flag: str, text: str, _: Resolved) -> Path:
    return _existing(flag, text, dir=True)


def _path(flag: str, text: str, _: Resolved) -> Path:
    return Path(text).expanduser()


def _tls_file(flag: str, text: str, resolved: Resolved) -> Path:
    path = Path(text).expanduser()
    if not resolved["insecure"] and not path.is_file():
        raise ConfigError(f"{flag} must name an existing file (run `privscore certs init`)")
    return path


def _under_data_dir(place: Callable[[DataLayout], Path]) -> Callable[[Resolved], str]:
    return lambda resolved: str(place(DataLayout(resolved["data_dir"])))


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path = setting(
        "--data-dir",
        "directory for everything the server writes",
        lambda flag, text, _: _parse_data_dir(text),
        str(DEFAULT_DATA_DIR),
        default_doc=f"./{DEFAULT_DATA_DIR}",
    )
    keyring: Path = setting(
        "--keyring",
        "server keyring file",
        _path,
        _under_data_dir(lambda layout: layout.keyring),
        default_doc="DATA_DIR/keys/keyring.json",
    )
    kek_file: Path = setting(
        "--kek-file",
        "file holding the base64 key-encryption key (env PRIVSCORE_KEK, the key itself, wins)",
        _path,
        _under_data_dir(lambda layout: layout.dev_kek),
        default_doc="DATA_DIR/keys/kek",
    )
    bind: str = setting(
        "--bind", "IP address to listen on", lambda flag, text, _: _parse_bind(text), DEFAULT_BIND
    )
    port: int = setting(
        "--port", "TCP port, 0 picks a free one", integer(0, 65535), str(DEFAULT_PORT)
    )
    grace_seconds: float = setting(
        "--grace-seconds", "shutdown drain period", number(0.0, 600.0), "10"
    )
    log_format: str = setting(
        "--log-format",
        "auto (console on a terminal, else JSON), json or console",
        choice(LOG_FORMATS),
        "auto",
        choices=LOG_FORMATS,
    )
    log_level: str = setting(
        "--log-level", "minimum log level", choice(LOG_LEVELS), "info", choices=LOG_LEVELS
    )
    reflection: bool = setting(
        "--reflection", "serve gRPC reflection: on or off", on_off, "on", choices=("on", "off")
    )
    model_dir: Path = setting(
        "--model-dir",
        "signed model artifact directory",
        _directory,
        str(DEFAULT_MODEL_DIR),
        default_doc="the bundled model",
    )
    model_public_key: Path = setting(
        "--model-public-key",
        "model team's trusted Ed25519 public key",
        _file,
        str(DEFAULT_MODEL_PUBLIC_KEY),
        default_doc="the bundled key",
    )
    policy: Path = setting(
        "--policy",
        "decision policy file (TOML)",
        _file,
        str(DEFAULT_POLICY),
        default_doc="the bundled policy",
    )
    audit_checkpoint_seconds: float = setting(
        "--audit-checkpoint-seconds",
        "sign an audit checkpoint at least this often while decisions arrive (and every 1000 "
        "records, and at shutdown)",
        number(0.05, 3600.0),
        "10",
    )
    audit_fsync: bool = setting(
        "--audit-fsync",
        "on, or off for benchmarks only: off prices durability, and decisions are then lost "
        "on a crash",
        on_off,
        "on",
        choices=("on", "off"),
    )
    audit_origin: str | None = setting(
        "--audit-origin",
        "the audit log's origin, the name its checkpoints carry for witnesses, e.g. "
        "lender.example/privscore; kept in DATA_DIR/audit/identity.json once the log exists",
        lambda flag, text, _: _parse_origin(text),
        "",
        default_doc="a unique one made when the log is first opened",
    )
    audit_open_check: str = setting(
        "--audit-open-check",
        "what of the PostgreSQL audit log is checked before serving: full (every record "
        "rehashed against the latest checkpoint) or latest (that checkpoint, the records after "
        "it, the state and the tiles; the full pass right after, in the background, the log "
        "failing closed if it finds damage); the file log is always checked in full",
        choice(AUDIT_OPEN_CHECKS),
        "full",
        choices=AUDIT_OPEN_CHECKS,
    )
    insecure: bool = setting(
        "--insecure",
        "serve plaintext gRPC (loopback only; every call is then unauthenticated)",
        on_off,
        "off",
        switch=True,
    )
    tls_cert: Path = setting(
        "--tls-cert",
        "server certificate (PEM)",
        _tls_file,
        _under_data_dir(lambda layout: layout.certs_dir / "server.pem"),
        default_doc="DATA_DIR/certs/server.pem",
    )
    tls_key: Path = setting(
        "--tls-key",
        "server private key (PEM)",
        _tls_file,
        _under_data_dir(lambda layout: layout.certs_dir / "server.key"),
        default_doc="DATA_DIR/certs/server.key",
    )
    tls_ca: Path = setting(
        "--tls-ca",
        "CA that signs client certificates (PEM)",
        _tls_file,
        _under_data_dir(lambda layout: layout.certs_dir / "ca.pem"),
        default_doc="DATA_DIR/certs/ca.pem",
    )
    authz_policy: Path = setting(
        "--authz-policy",
        "authorisation policy (TOML)",
        _file,
        str(DEFAULT_AUTHZ_POLICY),
        default_doc="the bundled one",
    )
    challenger_dir: Path | None = setting(
        "--challenger-dir",
        "a signed model artifact to run in shadow beside the champion from the start (verified "
        "like it; its scores are recorded as shadow, never answered); ModelService changes it "
        "while serving",
        lambda flag, text, resolved: _directory(flag, text, resolved) if text else None,
        "",
        default_doc="unset: no challenger",
        value=None,
    )
    # A group: how long subjects' personal data stays readable in the audit log.
    retention: RetentionSettings = field(
        default_factory=RetentionSettings, metadata={SETTING: RetentionSettings}
    )
    # A group: CallLimits' own fields are settings too, resolved here in their order.
    limits: CallLimits = field(default_factory=CallLimits, metadata={SETTING: CallLimits})
    # A group: where PostgreSQL is (service/db/settings.py); unset, the embedded store and log.
    database: DatabaseSettings = field(
        default_factory=DatabaseSettings, metadata={SETTING: DatabaseSettings}
    )
    database_pool_size: int = setting(
        "--database-pool-size",
        "connections each server process keeps to PostgreSQL (the audit writer, the checkpoint "
        "signer, the alert listener and lookups share them)",
        integer(4, 200),
        "8",
        value=8,
    )
    # A group: metrics and the drift report (service/monitoring/settings.py).
    monitoring: MonitoringSettings = field(
        default_factory=MonitoringSettings, metadata={SETTING: MonitoringSettings}
    )
    workers: int = setting(
        "--workers",
        "server processes sharing the port (SO_REUSEPORT), supervised by this one; more than "
        "one needs --database-url",
        integer(1, 64),
        "1",
        value=1,
    )

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def address(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{host}:{self.port}"


def _settings_of(kind: type[Any]) -> list[tuple[str, Setting | type[Any]]]:
    return [(f.name, f.metadata[SETTING]) for f in fields(kind) if SETTING in f.metadata]


def server_settings() -> list[Setting]:
    """Every serve setting, in resolution order (CallLimits' in place of `limits`)."""
    found: list[Setting] = []
    for _, declared in _settings_of(ServerSettings):
        if isinstance(declared, Setting):
            found.append(declared)
        else:
            found.extend(item for _, item in _settings_of(declared) if isinstance(item, Setting))
    return found


def _declared(dest: str) -> Setting:
    return next(item for item in server_settings() if item.dest == dest)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the serve flags; each help text names its environment variable and default."""
    for item in server_settings():
        item.add_to(parser)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    _declared("data_dir").add_to(parser)


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    _declared("keyring").add_to(parser)
    _declared("kek_file").add_to(parser)


def data_dir_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Path:
    """The data directory from flag, environment or default, created if missing."""
    path: Path = _declared("data_dir").resolve(args, environ, {})
    return path


def key_paths_from(
    args: argparse.Namespace, data_dir: Path, environ: Mapping[str, str] = os.environ
) -> tuple[Path, Path]:
    """(keyring, KEK file) from flags, environment, or their places under the data directory."""
    resolved = {"data_dir": data_dir}
    return (
        _declared("keyring").resolve(args, environ, resolved),
        _declared("kek_file").resolve(args, environ, resolved),
    )


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ServerSettings:
    """Resolve flag > environment > default and validate, in declaration order; raises
    ConfigError naming the setting."""
    resolved: dict[str, Any] = {}
    for name, declared in _settings_of(ServerSettings):
        if isinstance(declared, Setting):
            resolved[name] = declared.resolve(args, environ, resolved)
            continue
        group: dict[str, Any] = {}
        for inner, item in _settings_of(declared):
            assert isinstance(item, Setting)
            group[inner] = item.resolve(args, environ, {**resolved, **group})
        resolved[name] = declared(**group)
    settings = ServerSettings(**resolved)
    if settings.insecure and not ipaddress.ip_address(settings.bind).is_loopback:
        raise ConfigError("--insecure is allowed only with a loopback --bind")
    if settings.monitoring.drift_window < settings.monitoring.drift_min_count:
        raise ConfigError("--drift-window must be at least --drift-min-count")
    if settings.workers > 1 and settings.database.database_url is None:
        raise ConfigError(
            "--workers above 1 needs --database-url: the embedded store and file log belong to "
            "one process (the log is held under an exclusive lock, SQLite has one writer and "
            "the alert stream is numbered in memory), so a second worker could not start"
        )
    return settings


def _parse_origin(text: str) -> str | None:
    if not text:
        return None
    if len(text) > 255 or any(c.isspace() or c == "+" or ord(c) < 0x20 for c in text):
        raise ConfigError("--audit-origin must be one word of at most 255 characters, no '+'")
    return text


def _existing(flag: str, text: str, *, dir: bool = False) -> Path:
    path = Path(text).expanduser()
    if not (path.is_dir() if dir else path.is_file()):
        raise ConfigError(f"{flag} must name an existing {'directory' if dir else 'file'}")
    return path.resolve()


def _parse_bind(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(f"--bind must be an IP address literal such as {DEFAULT_BIND}") from None


def _parse_data_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not text:
        raise ConfigError("--data-dir must not be empty")
    try:
        private_dir(path)  # 0700 if created here; an existing directory is the operator's
    except OSError as error:
        raise ConfigError(f"--data-dir cannot be created: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("--data-dir is not writable")
    return path.resolve()
