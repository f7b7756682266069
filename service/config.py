"""Server settings from flags and PRIVSCORE_* environment variables, validated once at start.

A flag wins over its environment variable, which wins over the default. Every path the server
writes to lives under the data directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.files import private_dir
from service.security.limits import CallLimits

ENV_PREFIX = "PRIVSCORE_"
DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_DATA_DIR = Path("var")
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_AUDIT_CHECKPOINT_SECONDS = 10.0
_PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = _PACKAGE_DIR / "model" / "default_artifact"
DEFAULT_MODEL_PUBLIC_KEY = _PACKAGE_DIR / "model" / "trusted_keys" / "model-team.pub"
DEFAULT_POLICY = _PACKAGE_DIR / "decisions" / "default_policy.toml"
DEFAULT_AUTHZ_POLICY = _PACKAGE_DIR / "security" / "default_authz.toml"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting, never a secret."""


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


@dataclass(frozen=True)
class ServerSettings:
    bind: str
    port: int
    data_dir: Path
    grace_seconds: float
    log_format: str
    log_level: str
    reflection: bool
    keyring: Path
    kek_file: Path
    model_dir: Path
    model_public_key: Path
    policy: Path
    audit_checkpoint_seconds: float
    audit_fsync: bool
    audit_origin: str | None
    insecure: bool
    tls_cert: Path
    tls_key: Path
    tls_ca: Path
    authz_policy: Path
    limits: CallLimits

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def address(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{host}:{self.port}"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the serve flags; each help text names its environment variable."""

    def arg(flag: str, help_text: str, **kwargs: object) -> None:
        parser.add_argument(flag, help=f"{help_text} (env {_env_name(flag)})", **kwargs)  # type: ignore[arg-type]

    arg("--bind", f"IP address to listen on, default {DEFAULT_BIND}")
    arg("--port", f"TCP port, 0 picks a free one, default {DEFAULT_PORT}")
    arg("--grace-seconds", f"shutdown drain period, default {DEFAULT_GRACE_SECONDS:g}")
    arg(
        "--log-format",
        "auto (console on a terminal, else JSON), json or console",
        choices=LOG_FORMATS,
    )
    arg("--log-level", "minimum log level, default info", choices=LOG_LEVELS)
    arg("--reflection", "serve gRPC reflection: on or off, default on", choices=("on", "off"))
    arg("--model-dir", "signed model artifact directory, default the bundled model")
    arg("--model-public-key", "model team's trusted Ed25519 public key, default the bundled one")
    arg("--policy", "decision policy file (TOML), default the bundled policy")
    arg(
        "--audit-checkpoint-seconds",
        f"sign an audit checkpoint at least this often while decisions arrive, default "
        f"{DEFAULT_AUDIT_CHECKPOINT_SECONDS:g} (and every 1000 records, and at shutdown)",
    )
    arg(
        "--audit-fsync",
        "on, or off for benchmarks only: off prices durability, and decisions are then lost "
        "on a crash",
        choices=("on", "off"),
    )
    arg(
        "--audit-origin",
        "the audit log's origin, the name its checkpoints carry for witnesses, e.g. "
        "lender.example/privscore; default a unique one made when the log is first opened "
        "(kept in DATA_DIR/audit/identity.json)",
    )
    arg(
        "--insecure",
        "serve plaintext gRPC (loopback only; every call is then unauthenticated)",
        action="store_const",
        const="on",
    )
    arg("--tls-cert", "server certificate (PEM), default DATA_DIR/certs/server.pem")
    arg("--tls-key", "server private key (PEM), default DATA_DIR/certs/server.key")
    arg("--tls-ca", "CA that signs client certificates (PEM), default DATA_DIR/certs/ca.pem")
    arg("--authz-policy", "authorisation policy (TOML), default the bundled one")
    defaults = CallLimits()
    arg(
        "--default-deadline-seconds",
        f"deadline for calls that carry none, default {defaults.default_deadline_seconds:g}",
    )
    arg(
        "--max-deadline-seconds",
        f"longer deadlines are cut to this, default {defaults.max_deadline_seconds:g}",
    )
    arg(
        "--max-in-flight-per-caller",
        f"concurrent calls per identity, default {defaults.max_in_flight_per_identity}",
    )
    arg(
        "--calls-per-second-per-caller",
        f"sustained call rate per identity, default {defaults.calls_per_second_per_identity:g}",
    )
    arg("--burst-per-caller", f"rate burst per identity, default {defaults.burst_per_identity}")
    arg(
        "--max-alert-subscribers",
        f"concurrent WatchAlerts streams, default {defaults.max_alert_subscribers}",
    )
    arg(
        "--max-alert-subscribers-per-caller",
        "concurrent WatchAlerts streams per identity, default a quarter of "
        f"--max-alert-subscribers, at least 1 (so {defaults.max_alert_subscribers_per_identity} "
        f"of {defaults.max_alert_subscribers}), at most all of them",
    )
    add_data_dir_argument(parser)
    add_key_arguments(parser)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help=f"directory for everything the server writes, default ./{DEFAULT_DATA_DIR} "
        f"(env {_env_name('--data-dir')})",
    )


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keyring",
        help="server keyring file, default DATA_DIR/keys/keyring.json "
        f"(env {_env_name('--keyring')})",
    )
    parser.add_argument(
        "--kek-file",
        help="file holding the base64 key-encryption key, default DATA_DIR/keys/kek "
        f"(env {_env_name('--kek-file')}; env PRIVSCORE_KEK, the key itself, wins over both)",
    )


def data_dir_from(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Path:
    """The data directory from flag, environment or default, created if missing."""
    value = getattr(args, "data_dir", None) or environ.get(_env_name("--data-dir"))
    return _parse_data_dir(value or str(DEFAULT_DATA_DIR))


def key_paths_from(
    args: argparse.Namespace, data_dir: Path, environ: Mapping[str, str] = os.environ
) -> tuple[Path, Path]:
    """(keyring, KEK file) from flags, environment, or their places under the data directory."""
    layout = DataLayout(data_dir)
    keyring = getattr(args, "keyring", None) or environ.get(_env_name("--keyring"))
    kek_file = getattr(args, "kek_file", None) or environ.get(_env_name("--kek-file"))
    return (
        Path(keyring).expanduser() if keyring else layout.keyring,
        Path(kek_file).expanduser() if kek_file else layout.dev_kek,
    )


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ServerSettings:
    """Resolve flag > environment > default and validate; raises ConfigError naming the setting."""

    def pick(flag: str, default: str) -> str:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            value = environ.get(_env_name(flag), default)
        return str(value)

    data_dir = data_dir_from(args, environ)
    keyring, kek_file = key_paths_from(args, data_dir, environ)
    insecure = _parse_choice("--insecure", pick("--insecure", "off"), ("on", "off")) == "on"
    certs = DataLayout(data_dir).certs_dir
    defaults = CallLimits()

    def tls_file(flag: str, default: Path) -> Path:
        path = Path(pick(flag, str(default))).expanduser()
        if not insecure and not path.is_file():
            raise ConfigError(f"{flag} must name an existing file (run `privscore certs init`)")
        return path

    def number(flag: str, default: float, low: float, high: float) -> float:
        return _parse_float(flag, pick(flag, str(default)), low, high)

    max_alert_subscribers = _parse_int(
        "--max-alert-subscribers",
        pick("--max-alert-subscribers", str(defaults.max_alert_subscribers)),
        1,
        100_000,
    )
    settings = ServerSettings(
        bind=_parse_bind(pick("--bind", DEFAULT_BIND)),
        port=_parse_int("--port", pick("--port", str(DEFAULT_PORT)), 0, 65535),
        data_dir=data_dir,
        grace_seconds=_parse_float(
            "--grace-seconds", pick("--grace-seconds", str(DEFAULT_GRACE_SECONDS)), 0.0, 600.0
        ),
        log_format=_parse_choice("--log-format", pick("--log-format", "auto"), LOG_FORMATS),
        log_level=_parse_choice("--log-level", pick("--log-level", "info"), LOG_LEVELS),
        reflection=_parse_choice("--reflection", pick("--reflection", "on"), ("on", "off")) == "on",
        keyring=keyring,
        kek_file=kek_file,
        model_dir=_existing("--model-dir", pick("--model-dir", str(DEFAULT_MODEL_DIR)), dir=True),
        model_public_key=_existing(
            "--model-public-key", pick("--model-public-key", str(DEFAULT_MODEL_PUBLIC_KEY))
        ),
        policy=_existing("--policy", pick("--policy", str(DEFAULT_POLICY))),
        audit_checkpoint_seconds=_parse_float(
            "--audit-checkpoint-seconds",
            pick("--audit-checkpoint-seconds", str(DEFAULT_AUDIT_CHECKPOINT_SECONDS)),
            0.05,
            3600.0,
        ),
        audit_fsync=_parse_choice("--audit-fsync", pick("--audit-fsync", "on"), ("on", "off"))
        == "on",
        audit_origin=_parse_origin(pick("--audit-origin", "")),
        insecure=insecure,
        tls_cert=tls_file("--tls-cert", certs / "server.pem"),
        tls_key=tls_file("--tls-key", certs / "server.key"),
        tls_ca=tls_file("--tls-ca", certs / "ca.pem"),
        authz_policy=_existing("--authz-policy", pick("--authz-policy", str(DEFAULT_AUTHZ_POLICY))),
        limits=CallLimits(
            default_deadline_seconds=number(
                "--default-deadline-seconds", defaults.default_deadline_seconds, 0.01, 3600
            ),
            max_deadline_seconds=number(
                "--max-deadline-seconds", defaults.max_deadline_seconds, 0.01, 86400
            ),
            max_in_flight_per_identity=_parse_int(
                "--max-in-flight-per-caller",
                pick("--max-in-flight-per-caller", str(defaults.max_in_flight_per_identity)),
                1,
                100_000,
            ),
            calls_per_second_per_identity=number(
                "--calls-per-second-per-caller", defaults.calls_per_second_per_identity, 0.01, 1e7
            ),
            burst_per_identity=_parse_int(
                "--burst-per-caller",
                pick("--burst-per-caller", str(defaults.burst_per_identity)),
                1,
                10_000_000,
            ),
            max_alert_subscribers=max_alert_subscribers,
            max_alert_subscribers_per_identity=_parse_int(
                "--max-alert-subscribers-per-caller",
                pick("--max-alert-subscribers-per-caller", str(max(1, max_alert_subscribers // 4))),
                1,
                max_alert_subscribers,
            ),
        ),
    )
    if settings.insecure and not ipaddress.ip_address(settings.bind).is_loopback:
        raise ConfigError("--insecure is allowed only with a loopback --bind")
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


def _parse_int(flag: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{flag} must be between {low} and {high}")
    return value


def _parse_float(flag: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag} must be a number") from None
    if not low <= value <= high:  # also rejects NaN
        raise ConfigError(f"{flag} must be between {low:g} and {high:g}")
    return value


def _parse_choice(flag: str, text: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise ConfigError(f"{flag} must be one of {', '.join(choices)}")
    return text


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
