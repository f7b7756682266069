"""Progress lines on stderr: a counter redrawn in place on a terminal, plain lines in logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.started = time.monotonic()
        self.interactive = enabled and self.stream.isatty()

    def log(self, message: str) -> None:
        if self.enabled:
            self.stream.write(f"[{time.monotonic() - self.started:6.1f}s] {message}\n")
            self.stream.flush()

    def tick(self, label: str, done: int, total: int, detail: str = "") -> None:
        """Report `done` of `total`; logs (non-terminals) get only the final line."""
        if not self.enabled:
            return
        line = f"[{time.monotonic() - self.started:6.1f}s] {label} {done}/{total} {detail}".rstrip()
        if self.interactive:
            self.stream.write("\r\033[K" + line + ("\n" if done >= total else ""))
            self.stream.flush()
        elif done >= total:
            self.log(f"{label} {done}/{total} {detail}".rstrip())
