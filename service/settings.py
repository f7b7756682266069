"""How a setting is declared: once, as a dataclass field carrying its flag, help, default and
parser. The flag, its PRIVSCORE_* environment variable, `--help`, resolution (flag, then
environment, then default) and validation all derive from that one declaration.

Settings resolve in declaration order, so a default or a check may depend on settings declared
before it (`resolved`). Parsers raise ConfigError naming the flag, never echoing the value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any

ENV_PREFIX = "PRIVSCORE_"
SETTING = "privscore.setting"  # the field metadata key
Resolved = Mapping[str, Any]
Parser = Callable[[str, str, Resolved], Any]  # (flag, text, settings resolved so far) -> value


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting, never a secret."""


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


@dataclass(frozen=True)
class Setting:
    flag: str
    help: str
    parse: Parser
    default: str | Callable[[Resolved], str]  # as text, parsed like a given value
    default_doc: str  # how --help and the README name the default
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value: "on" when given

    @property
    def env(self) -> str:
        return env_name(self.flag)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        help_text = f"{self.help}; default {self.default_doc} (env {self.env})"
        if self.switch:
            parser.add_argument(self.flag, help=help_text, action="store_const", const="on")
        else:
            parser.add_argument(self.flag, help=help_text, choices=self.choices)

    def resolve(
        self, args: argparse.Namespace, environ: Mapping[str, str], resolved: Resolved
    ) -> Any:
        """Flag, else environment variable, else default; parsed and checked."""
        text = getattr(args, self.dest, None)
        if text is None:
            text = environ.get(self.env)
        if text is None:
            text = self.default(resolved) if callable(self.default) else self.default
        return self.parse(self.flag, str(text), resolved)


def setting(
    flag: str,
    help: str,
    parse: Parser,
    default: str | Callable[[Resolved], str],
    *,
    default_doc: str | None = None,
    choices: tuple[str, ...] | None = None,
    switch: bool = False,
    value: Any = MISSING,
) -> Any:
    """Declare a setting as a dataclass field. `value` is the field's own default, for a
    dataclass also built without settings (it must be what `default` resolves to)."""
    if default_doc is None and callable(default):
        raise ValueError(f"{flag}: a computed default needs default_doc")
    doc = default_doc if default_doc is not None else str(default)
    declared = Setting(flag, help, parse, default, doc, choices, switch)
    return field(default=value, metadata={SETTING: declared})


def integer(low: int, high: int | Callable[[Resolved], int]) -> Parser:
    def parse(flag: str, text: str, resolved: Resolved) -> int:
        try:
            number = int(text)
        except ValueError:
            raise ConfigError(f"{flag} must be an integer") from None
        top = high(resolved) if callable(high) else high
        if not low <= number <= top:
            raise ConfigError(f"{flag} must be between {low} and {top}")
        return number

    return parse


def number(low: float, high: float) -> Parser:
    def parse(flag: str, text: str, _: Resolved) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{flag} must be a number") from None
        if not low <= value <= high:  # also rejects NaN
            raise ConfigError(f"{flag} must be between {low:g} and {high:g}")
        return value

    return parse


def choice(choices: tuple[str, ...]) -> Parser:
    def parse(flag: str, text: str, _: Resolved) -> str:
        if text not in choices:
            raise ConfigError(f"{flag} must be one of {', '.join(choices)}")
        return text

    return parse


def on_off(flag: str, text: str, resolved: Resolved) -> bool:
    return bool(choice(("on", "off"))(flag, text, resolved) == "on")
