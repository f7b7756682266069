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

ENV_PREFIX = "PRIVSCORE_"
DEFAULT_BIND = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_DATA_DIR = Path("var")
DEFAULT_GRACE_SECONDS = 10.0
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting, never a secret."""


@dataclass(frozen=True)
class ServerSettings:
    bind: str
    port: int
    data_dir: Path
    grace_seconds: float
    log_format: str
    log_level: str
    reflection: bool

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
    arg("--data-dir", f"directory for everything the server writes, default ./{DEFAULT_DATA_DIR}")
    arg("--grace-seconds", f"shutdown drain period, default {DEFAULT_GRACE_SECONDS:g}")
    arg(
        "--log-format",
        "auto (console on a terminal, else JSON), json or console",
        choices=LOG_FORMATS,
    )
    arg("--log-level", "minimum log level, default info", choices=LOG_LEVELS)
    arg("--reflection", "serve gRPC reflection: on or off, default on", choices=("on", "off"))


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ServerSettings:
    """Resolve flag > environment > default and validate; raises ConfigError naming the setting."""

    def pick(flag: str, default: str) -> str:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            value = environ.get(_env_name(flag), default)
        return str(value)

    settings = ServerSettings(
        bind=_parse_bind(pick("--bind", DEFAULT_BIND)),
        port=_parse_int("--port", pick("--port", str(DEFAULT_PORT)), 0, 65535),
        data_dir=_parse_data_dir(pick("--data-dir", str(DEFAULT_DATA_DIR))),
        grace_seconds=_parse_float(
            "--grace-seconds", pick("--grace-seconds", str(DEFAULT_GRACE_SECONDS)), 0.0, 600.0
        ),
        log_format=_parse_choice("--log-format", pick("--log-format", "auto"), LOG_FORMATS),
        log_level=_parse_choice("--log-level", pick("--log-level", "info"), LOG_LEVELS),
        reflection=_parse_choice("--reflection", pick("--reflection", "on"), ("on", "off")) == "on",
    )
    return settings


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
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--data-dir cannot be created: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("--data-dir is not writable")
    return path.resolve()
