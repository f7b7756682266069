"""WatchAlerts subscriber slots: one identity cannot take every slot, an open stream costs its
holder none of its unary in-flight allowance, and a slot comes back however its stream ends.

The attacks run over a real server socket with two identities holding the monitor role:
`monitor` (A) and `dev` (B).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from privscore.v1 import alert_service_pb2 as pb
from privscore.v1 import common_pb2
from privscore.v1.alert_service_pb2_grpc import AlertServiceStub
from service.config import ConfigError, add_server_arguments, settings_from
from service.decisions.alert_stream import AlertStream
from service.errors import OutOfRange, ResourceExhausted
from service.security.certs import client_identity
from service.security.limits import CallLimits, IdentityLimiter
from tests.conftest import ServerProcess
from tests.test_alerts import cny, event
from tests.test_security import refusals
from tests.test_server import error_reason

WATCH_ALERTS = "/privscore.v1.AlertService/WatchAlerts"
A, B = "monitor", "dev"  # two identities with the monitor role in the default policy
PER_CALLER_REFUSAL = "TOO_MANY_SUBSCRIBERS_PER_CALLER"
STREAM_TIMEOUT_S = 60.0  # every stream ends by itself, whatever a failing test leaves open
RELEASE_TIMEOUT_S = 10.0
# Whom the stand-alone stream's alerts are about (an alert without a subject is an erased one,
# which the stream passes over).
SUBJECT = common_pb2.SubjectRef(tenant="t", pseudonym="0" * 64)


def raise_alert(
    server: ServerProcess, channel: grpc.Channel, customer: str, cert_name: str = A
) -> int:
    """Store one alert, so a stream replaying from sequence 0 has something to send at once
    (the channel presents `cert_name`, whose identity the event's figures are sealed for)."""
    response = server.client(channel, cert_name).evaluate_event(
        "t",
        customer,
        event(0, missed_payment=pb.MissedPayment(amount_due=cny(1000), days_past_due=5)),
        timeout=10,
    )
    return response.alerts[0].sequence


def subscribe(channel: grpc.Channel) -> Any:
    """An admitted WatchAlerts stream replaying from sequence 0; raises the grpc.RpcError that
    refused it. An admitted stream yields the stored alert at once, so admission is known
    without a race (the stream object is itself an RpcError: tell them apart by this raise)."""
    stream = AlertServiceStub(channel).WatchAlerts(
        pb.WatchAlertsRequest(after_sequence=0), timeout=STREAM_TIMEOUT_S
    )
    next(iter(stream))
    return stream


def subscribe_until_admitted(channel: grpc.Channel) -> Any:
    """A stream as soon as a slot is free again: the server frees it once it sees the end."""
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while True:
        try:
            return subscribe(channel)
        except grpc.RpcError as error:
            assert error_reason(error) == PER_CALLER_REFUSAL, error
            assert time.monotonic() < deadline, "the slot did not come back"
        time.sleep(0.05)


def fill_slots(channel: grpc.Channel, attempts: int) -> tuple[list[Any], grpc.RpcError | None]:
    """Open streams until one is refused or `attempts` are open: (the open ones, the refusal)."""
    held: list[Any] = []
    for _ in range(attempts):
        try:
            held.append(subscribe(channel))
        except grpc.RpcError as error:
            return held, error
    return held, None


# -- over a real server --------------------------------------------------------------------


def test_one_identity_cannot_take_every_subscriber_slot(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "var", "--max-alert-subscribers", "8")  # 2 per caller
    try:
        with server.channel(A) as a_channel, server.channel(B) as b_channel:
            raise_alert(server, b_channel, "subscribers-1", B)
            # A tries to take every slot there is, and one more.
            a_streams, refusal = fill_slots(a_channel, 8 + 1)
            assert len(a_streams) == 2  # the default: a quarter of the slots
            assert refusal is not None
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(refusal) == PER_CALLER_REFUSAL
            # B is not locked out: it gets its own share.
            b_streams, b_refusal = fill_slots(b_channel, 2)
            assert len(b_streams) == 2 and b_refusal is None
            for stream in a_streams + b_streams:
                stream.cancel()
    finally:
        assert server.terminate() == 0
    (record,) = [r for r in refusals(tmp_path / "var") if r["rpc"] == WATCH_ALERTS]
    assert record["caller"] == client_identity(A)
    assert record["code"] == "RESOURCE_EXHAUSTED" and record["reason"] == PER_CALLER_REFUSAL


def test_a_slot_comes_back_when_its_stream_is_cancelled_or_its_client_disconnects(
    tmp_path: Path,
) -> None:
    server = ServerProcess(
        tmp_path / "var", "--max-alert-subscribers", "8", "--max-alert-subscribers-per-caller", "2"
    )
    try:
        with server.channel(B) as b_channel:
            raise_alert(server, b_channel, "subscribers-2", B)
        a_channel = server.channel(A)
        try:
            held, refusal = fill_slots(a_channel, 3)
            assert len(held) == 2
            assert refusal is not None and error_reason(refusal) == PER_CALLER_REFUSAL
            held[0].cancel()  # the client cancels one stream: its slot comes back
            held[0] = subscribe_until_admitted(a_channel)
            with pytest.raises(grpc.RpcError) as again:
                subscribe(a_channel)
            assert error_reason(again.value) == PER_CALLER_REFUSAL
        finally:
            a_channel.close()  # the client goes away with both streams open
        with server.channel(A) as reconnected:
            first = subscribe_until_admitted(reconnected)
            second = subscribe_until_admitted(reconnected)
            first.cancel()
            second.cancel()
    finally:
        assert server.terminate() == 0


def test_open_streams_leave_the_callers_unary_allowance_whole(tmp_path: Path) -> None:
    in_flight, rounds = 2, 20
    server = ServerProcess(
        tmp_path / "var",
        "--max-in-flight-per-caller",
        str(in_flight),
        "--max-alert-subscribers",
        "8",  # 2 per caller by default
    )
    try:
        with server.channel(A) as a_channel:
            raise_alert(server, a_channel, "subscribers-3")
            streams, refusal = fill_slots(a_channel, 2)  # A's whole share of the slots
            assert len(streams) == 2 and refusal is None
            client = server.client(a_channel, A)
            barrier = threading.Barrier(in_flight, timeout=10)

            def evaluate(worker: int) -> list[str]:
                outcomes = []
                for n in range(rounds):
                    barrier.wait()  # the calls of a round go out together
                    try:
                        client.evaluate_event(
                            "t",
                            f"allowance-{worker}",
                            event(n, purchase=pb.Purchase(amount=cny(100))),
                            timeout=10,
                        )
                        outcomes.append("OK")
                    except grpc.RpcError as error:
                        outcomes.append(error_reason(error))
                return outcomes

            with ThreadPoolExecutor(in_flight) as pool:
                results = list(pool.map(evaluate, range(in_flight)))
            assert results == [["OK"] * rounds] * in_flight
            for stream in streams:
                stream.cancel()
    finally:
        assert server.terminate() == 0


# -- the pieces, without a server ------------------------------------------------------------


def test_alert_stream_caps_each_identity_and_frees_slots_however_a_subscription_ends() -> None:
    async def scenario() -> None:
        stored = [
            pb.Alert(sequence=5, rule="r", subject=SUBJECT)
        ]  # alerts 1-4 are no longer retained

        async def fetch_after(cursor: int, limit: int) -> list[pb.Alert]:
            return [a for a in stored if a.sequence > cursor][:limit]

        async def settle() -> None:  # let started subscriptions run up to their first wait
            for _ in range(5):
                await asyncio.sleep(0)

        def next_of(subscription: AsyncIterator[pb.Alert]) -> asyncio.Task[pb.Alert]:
            async def step() -> pb.Alert:
                return await anext(subscription)

            return asyncio.create_task(step())

        stream = AlertStream(
            fetch_after, last_sequence=5, max_subscribers=3, max_subscribers_per_identity=2
        )
        a1, a2 = stream.subscribe("a", 0, None), stream.subscribe("a", 0, None)
        a1_next, a2_next = next_of(a1), next_of(a2)
        await settle()
        assert stream.subscribers("a") == 2
        stream.publish([pb.Alert(sequence=6, rule="r", subject=SUBJECT)])
        assert (await a1_next).sequence == (await a2_next).sequence == 6  # both at their yield
        with pytest.raises(ResourceExhausted) as per_caller:
            await anext(stream.subscribe("a", 0, None))
        assert per_caller.value.reason == PER_CALLER_REFUSAL
        b = stream.subscribe("b", 0, None)
        b_next = next_of(b)
        await settle()
        with pytest.raises(ResourceExhausted) as overall:
            await anext(stream.subscribe("c", 0, None))
        assert overall.value.reason == "TOO_MANY_SUBSCRIBERS"
        assert stream.subscribers() == 3

        a1_next = next_of(a1)
        await settle()
        a1_next.cancel()  # cancelled while waiting for alerts
        with pytest.raises(asyncio.CancelledError):
            await a1_next
        assert stream.subscribers("a") == 1
        await a2.aclose()  # closed at its yield
        assert stream.subscribers("a") == 0 and stream.subscribers() == 1

        with pytest.raises(OutOfRange):  # ends with an error after it was admitted
            await anext(stream.subscribe("a", 0, 1))
        assert stream.subscribers("a") == 0

        stream.close()  # ends cleanly at shutdown
        with pytest.raises(StopAsyncIteration):
            await b_next
        assert stream.subscribers() == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_stream_pays_the_callers_rate_but_holds_no_in_flight_slot() -> None:
    limiter = IdentityLimiter(
        CallLimits(
            max_in_flight_per_identity=1, calls_per_second_per_identity=0.01, burst_per_identity=3
        )
    )
    limiter.take_rate("a")  # a stream's admission
    with limiter.admit("a"):  # the one unary slot is still free
        with pytest.raises(ResourceExhausted) as busy, limiter.admit("a"):
            pass
        assert busy.value.reason == "TOO_MANY_IN_FLIGHT"
    with pytest.raises(ResourceExhausted) as limited:
        limiter.take_rate("a")
    assert limited.value.reason == "RATE_LIMITED"


def limits_from(tmp_path: Path, args: list[str], env: dict[str, str]) -> CallLimits:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    parsed = parser.parse_args([*args, "--insecure", "--data-dir", str(tmp_path)])
    return settings_from(parsed, env).limits


@pytest.mark.parametrize(
    ("args", "env", "per_caller"),
    [
        ([], {}, 16),
        (["--max-alert-subscribers", "8"], {}, 2),
        (["--max-alert-subscribers", "3"], {}, 1),
        ([], {"PRIVSCORE_MAX_ALERT_SUBSCRIBERS_PER_CALLER": "5"}, 5),
        (
            ["--max-alert-subscribers-per-caller", "4"],
            {"PRIVSCORE_MAX_ALERT_SUBSCRIBERS_PER_CALLER": "5"},
            4,
        ),
    ],
)
def test_per_caller_subscriber_setting_defaults_to_a_quarter_of_all(
    tmp_path: Path, args: list[str], env: dict[str, str], per_caller: int
) -> None:
    assert limits_from(tmp_path, args, env).max_alert_subscribers_per_identity == per_caller


def test_per_caller_subscribers_cannot_exceed_all_subscribers(tmp_path: Path) -> None:
    args = ["--max-alert-subscribers", "4", "--max-alert-subscribers-per-caller", "5"]
    with pytest.raises(ConfigError, match="--max-alert-subscribers-per-caller must be between"):
        limits_from(tmp_path, args, {})
