"""Settings are declared once (service/settings.py): flags, environment variables, `--help`,
defaults, validation and the README's table all follow from that one declaration."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from service.config import ConfigError, add_server_arguments, server_settings, settings_from
from service.security.limits import CallLimits
from tests.conftest import REPO_ROOT


def resolve(argv: list[str], env: dict[str, str], data_dir: Path):
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return settings_from(parser.parse_args(["--data-dir", str(data_dir), *argv]), env)


def test_every_setting_has_one_flag_and_one_variable() -> None:
    declared = server_settings()
    flags = [s.flag for s in declared]
    assert len(flags) == len(set(flags))
    assert all(s.env == "PRIVSCORE_" + s.dest.upper() for s in declared)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for item in declared:
        assert item.flag in help_text and item.env in help_text


def test_the_limits_defaults_are_the_declared_ones(tmp_path: Path) -> None:
    """CallLimits built without settings (tests, tools) equals the limits `serve` resolves
    with nothing given: its field defaults and its declared defaults agree."""
    assert resolve(["--insecure"], {}, tmp_path).limits == CallLimits()


def test_a_flag_wins_over_its_variable_which_wins_over_the_default(tmp_path: Path) -> None:
    base = resolve(["--insecure"], {}, tmp_path)
    assert base.port == 50051 and base.limits.burst_per_identity == 4000
    env = {"PRIVSCORE_PORT": "6000", "PRIVSCORE_BURST_PER_CALLER": "7"}
    from_env = resolve(["--insecure"], env, tmp_path)
    assert from_env.port == 6000 and from_env.limits.burst_per_identity == 7
    flagged = resolve(["--insecure", "--port", "7000", "--burst-per-caller", "9"], env, tmp_path)
    assert flagged.port == 7000 and flagged.limits.burst_per_identity == 9


def test_defaults_may_follow_earlier_settings(tmp_path: Path) -> None:
    settings = resolve(["--insecure", "--max-alert-subscribers", "40"], {}, tmp_path)
    assert settings.keyring == tmp_path / "keys" / "keyring.json"
    assert settings.limits.max_alert_subscribers_per_identity == 10
    with pytest.raises(ConfigError, match="--tls-cert must name an existing file"):
        resolve([], {}, tmp_path)  # without --insecure the TLS files must exist


def test_the_readme_table_lists_exactly_the_declared_settings() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(--[a-z-]+)`(?: / `--[a-z-]+`)? \| `(PRIVSCORE_[A-Z_]+)", readme, re.M)
    pairs = re.findall(
        r"^\| `(--[a-z-]+)` / `(--[a-z-]+)` \| `(PRIVSCORE_[A-Z_]+)` / `(PRIVSCORE_[A-Z_]+)`",
        readme,
        re.M,
    )
    documented = {flag: env for flag, env in rows}
    for first, second, first_env, second_env in pairs:
        documented |= {first: first_env, second: second_env}
    declared = {s.flag: s.env for s in server_settings()}
    # --insecure is documented with its value (PRIVSCORE_INSECURE=on).
    documented.setdefault("--insecure", "PRIVSCORE_INSECURE")
    assert documented == declared
