"""`privscore serve --workers N`: N server processes on one port, supervised by this process.

One Python process scores on about one core (the interpreter lock); N worker processes use N.
They share the listening port through SO_REUSEPORT, which gRPC core sets on its listening
sockets by default wherever the kernel supports it (the server option `grpc.so_reuseport`, on
unless set to 0): each worker binds the same address, and the kernel spreads new connections
across them. A connection stays with the worker that accepted it, so one client channel talks
to one worker; spreading needs several channels or several clients. service/server.py therefore
sets no option of its own (checked: two grpc.aio servers bind one port; with
`grpc.so_reuseport` at 0 the second fails to bind). Linux balances the connections; BSD
systems hand them all to one of the sockets, so this is for Linux.

The workers share the database (`--database-url`): the embedded store and file log belong to
one process, so `settings_from` refuses more than one worker without it.

The supervisor opens nothing the server opens (keys, model, database, audit log); it starts the
workers, restarts one that exits when it was not asked to, gives up when a worker keeps failing
at start-up (RestartPolicy), forwards SIGHUP (the server reloads its keyring), and on SIGTERM or
SIGINT stops them all within the grace period. Each worker is
`python -m service.cli serve` with the flags this command was given, less `--workers`, in this
environment with PRIVSCORE_WORKERS=1 and two variables of the supervisor's own (the worker's
index, for its log lines, and the supervisor's pid): neither is a setting. A worker calls
`join_supervisor` first thing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import io
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from service.config import ConfigError, ServerSettings, server_settings

WORKER_INDEX_ENV = "PRIVSCORE_WORKER_INDEX"
SUPERVISOR_PID_ENV = "PRIVSCORE_SUPERVISOR_PID"
# After the grace period the server still flushes and closes the audit log and the store.
STOP_MARGIN_SECONDS = 10.0
# A SIGKILLed process is gone at once unless the kernel holds it (uninterruptible I/O).
KILL_WAIT_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Exits that count as a clean stop once the supervisor asked for one: the server's own graceful
# exit, or the stop signal itself ending a worker too early in its start to have a handler
# (and so nothing to drain). SIGINT reaches the workers too when a terminal's Ctrl-C does.
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT})

log = structlog.get_logger("privscore.workers")


@dataclass(frozen=True)
class RestartPolicy:
    """When a worker that exited unasked starts again, and when the supervisor stops trying.

    A worker that exits before it has lived `settled_seconds` most likely failed at start-up
    (a wrong key, a database schema this version does not know): starting it again fails
    again, so after `give_up_after` such exits in a row the supervisor stops every worker and
    exits non-zero, where a process that looked alive while restarting forever would hide the
    fault from whatever watches it. The wait before a restart doubles from `first_backoff` up to
    `max_backoff`; both it and the count start over once a worker has lived `settled_seconds`.
    """

    first_backoff: float = 0.5
    max_backoff: float = 8.0
    settled_seconds: float = 10.0
    give_up_after: int = 5


def check_shareable(settings: ServerSettings) -> None:
    """Refuse what cannot be shared by several workers (raises ConfigError)."""
    if settings.workers > 1 and settings.port == 0:
        raise ConfigError(
            "--port 0 cannot be shared by --workers: each worker would pick a different free "
            "port; give a port number"
        )


def worker_command(args: argparse.Namespace) -> list[str]:
    """`privscore serve` as this process was asked to run it, less `--workers`.

    Built from the parsed flags rather than from sys.argv: the namespace is what was given,
    whoever called `main`, and each flag goes out as `--flag=value`, so a value that begins
    with a dash reads back the same. Settings given in the environment are not repeated: the
    workers inherit it."""
    flags = []
    for item in server_settings():
        given = getattr(args, item.dest, None)
        if given is None or item.dest == "workers":
            continue
        flags.append(item.flag if item.switch else f"{item.flag}={given}")
    return [sys.executable, "-m", "service.cli", "serve", *flags]


def worker_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The workers' environment: this one, with one worker each (a flag would win over it, and
    `worker_command` passes none)."""
    workers_env = next(item.env for item in server_settings() if item.dest == "workers")
    return {**environ, workers_env: "1"}


def serve_workers(settings: ServerSettings, args: argparse.Namespace) -> int:
    """Run `settings.workers` workers until SIGTERM or SIGINT; the exit status (0: all stopped
    cleanly)."""
    whole_lines()
    supervisor = Supervisor(
        settings.workers,
        worker_command(args),
        worker_environment(),
        stop_timeout=settings.grace_seconds + STOP_MARGIN_SECONDS,
    )
    return asyncio.run(supervisor.run())


def whole_lines() -> None:
    """Write each line to stdout in one write: the supervisor and its workers share it, and a
    line written in pieces can be cut by another process's line. Unbuffered stdout
    (PYTHONUNBUFFERED, set in many container images) writes a log line and its newline apart;
    line-buffered, a line goes out at once (a pipe keeps a write of up to PIPE_BUF whole)."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(write_through=False, line_buffering=True)


def join_supervisor(environ: Mapping[str, str] = os.environ) -> None:
    """In a worker (WORKER_INDEX_ENV set), before anything else: write whole log lines, name
    the worker in each, let SIGHUP wait for the server's handler, and stop when the supervisor
    dies.

    The supervisor starts workers with SIGHUP blocked, so a reload forwarded while a worker is
    still starting cannot kill it (the default action of SIGHUP); from here on it is ignored
    until the server installs its handler once ready. A reload asked for before the server
    reads its keyring is moot; one between that read and the handler is lost, as a single
    server, which SIGHUP kills outright at that point, loses it too.

    A worker whose supervisor was SIGKILLed would otherwise keep serving on the shared port
    beside the next supervisor's workers, with whatever keys and settings it started with; the
    kernel sends it SIGTERM instead (Linux), and the check of the parent's pid covers a
    supervisor that died before this call."""
    index = environ.get(WORKER_INDEX_ENV)
    if index is None:
        return
    whole_lines()
    structlog.contextvars.bind_contextvars(worker=int(index))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    supervisor_pid = environ.get(SUPERVISOR_PID_ENV)
    if supervisor_pid is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("worker.parent_death_signal_unset", errno=ctypes.get_errno())
    if os.getppid() != int(supervisor_pid):
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_status(code: int) -> dict[str, Any]:
    """A return code as a log field: exit code, or the signal that ended the process."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-code).name}
        return {"signal": -code}
    return {"exit_code": code}


class Supervisor:
    """`count` copies of `command` in `env`, kept running until `run` is asked to stop."""

    def __init__(
        self,
        count: int,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        stop_timeout: float,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.count = count
        self.command = list(command)
        self.env = dict(env)
        self.stop_timeout = stop_timeout
        self.policy = policy or RestartPolicy()
        self._running: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = asyncio.Event()
        self._gave_up = False
        self._unclean = False

    async def run(self) -> int:
        """Start the workers, keep them running until SIGTERM or SIGINT (or until one keeps
        failing at start-up), then stop them all; 0 when every worker stopped cleanly."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        log.info("workers.starting", workers=self.count)
        slots = [asyncio.create_task(self._keep(index)) for index in range(self.count)]
        try:
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait([stopping, *slots], return_when=asyncio.FIRST_COMPLETED)
            for slot in slots:
                if slot.done() and slot.exception() is not None:
                    log.error("workers.supervisor_failed", error=repr(slot.exception()))
                    self._unclean = True
            self._stopping.set()
            await self._stop_all(slots)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        failed = self._gave_up or self._unclean
        log.info("workers.stopped", exit_code=1 if failed else 0)
        return 1 if failed else 0

    def _request_stop(self, signum: int) -> None:
        if not self._stopping.is_set():
            log.info("workers.stopping", signal=signal.Signals(signum).name)
        self._stopping.set()

    def _forward(self, signum: int) -> None:
        name = signal.Signals(signum).name
        for index, process in list(self._running.items()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            log.info("worker.signalled", worker=index, pid=process.pid, signal=name)

    async def _keep(self, index: int) -> None:
        """Worker `index` until the supervisor stops: started, and started again after an exit
        nobody asked for, or the supervisor gives up (RestartPolicy)."""
        policy = self.policy
        loop = asyncio.get_running_loop()
        backoff = policy.first_backoff
        early_exits = 0
        while not self._stopping.is_set():
            started = loop.time()
            ended = await self._run_once(index)
            if self._stopping.is_set():
                return
            if loop.time() - started >= policy.settled_seconds:
                backoff, early_exits = policy.first_backoff, 0
            else:
                early_exits += 1
            if early_exits >= policy.give_up_after:
                log.error(
                    "workers.giving_up",
                    worker=index,
                    **ended,
                    early_exits=early_exits,
                    detail="the worker keeps exiting soon after its start, so it cannot start "
                    "(its own output says why); stopping every worker",
                )
                self._gave_up = True
                self._stopping.set()
                return
            log.warning("worker.exited", worker=index, **ended, restart_in_seconds=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, policy.max_backoff)

    async def _run_once(self, index: int) -> dict[str, Any]:
        """Start worker `index` and wait for it to end; how it ended, as log fields."""
        env = {**self.env, WORKER_INDEX_ENV: str(index), SUPERVISOR_PID_ENV: str(os.getpid())}
        # Blocked here, SIGHUP starts blocked in the worker too (join_supervisor). A SIGHUP to
        # the supervisor meanwhile waits until unblocked, or reaches another of its threads.
        # Unblocked after, not restored: two workers may be starting at once, and the
        # supervisor itself never keeps SIGHUP blocked.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process = await asyncio.create_subprocess_exec(*self.command, env=env)
        except OSError as error:
            log.error("worker.start_failed", worker=index, error=error.strerror)
            return {"exit_code": None}
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        self._running[index] = process
        if self._stopping.is_set():  # the stop began while this worker was being started
            process.terminate()
        log.info("worker.started", worker=index, pid=process.pid)
        try:
            code = await process.wait()
        finally:
            del self._running[index]
        ended = {"pid": process.pid, **_exit_status(code)}
        if self._stopping.is_set():
            if code not in _STOPPED:
                self._unclean = True
            log.info("worker.stopped", worker=index, **ended)
        return ended

    async def _stop_all(self, slots: list[asyncio.Task[None]]) -> None:
        """SIGTERM to every worker; SIGKILL to those still running after the stop timeout."""
        for index, process in list(self._running.items()):
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            log.info("worker.signalled", worker=index, pid=process.pid, signal="SIGTERM")
        _, pending = await asyncio.wait(slots, timeout=self.stop_timeout)
        if not pending:
            return
        self._unclean = True
        for index, process in list(self._running.items()):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            log.error("worker.killed", worker=index, pid=process.pid, signal="SIGKILL")
        _, pending = await asyncio.wait(pending, timeout=KILL_WAIT_SECONDS)
        for slot in pending:
            slot.cancel()
