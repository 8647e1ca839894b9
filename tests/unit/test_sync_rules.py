"""The outbox's pure rules: the circuit breaker and how an HTTP answer is judged."""

from __future__ import annotations

import httpx
import pytest

from agent.sync.breaker import BreakerState, CircuitBreaker
from agent.sync.delivery import Permanent, Transient, Unauthorized, judge, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_five_failures_and_probes_once_after_sixty_seconds() -> None:
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)
    for _ in range(4):
        breaker.failure()
        assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now += 59.9
    assert not breaker.allow()
    assert breaker.wait_s() == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one
    breaker.failure()
    assert breaker.state is BreakerState.OPEN  # a failed probe opens it again at once
    clock.now += 60
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()


def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker(clock=Clock())
    for _ in range(4):
        breaker.failure()
    breaker.success()
    for _ in range(4):
        breaker.failure()
    assert breaker.state is BreakerState.CLOSED


def answer(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=body, headers=headers)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    with pytest.raises(Transient):
        judge(answer(status))


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 422])
def test_other_client_errors_are_permanent_with_the_reason(status: int) -> None:
    with pytest.raises(Permanent, match=f"HTTP {status}: no such session") as info:
        judge(answer(status, b'{"error": "not_found", "detail": "no such session"}'))
    assert info.value.status == status


def test_401_asks_for_new_credentials() -> None:
    with pytest.raises(Unauthorized):
        judge(answer(401, b'{"error": "expired"}'))


def test_a_success_with_garbage_is_transient_because_the_call_may_have_acted() -> None:
    with pytest.raises(Transient, match="unreadable body"):
        judge(answer(200, b'{"results": [tru'))
    assert judge(answer(200, b'{"ok": true}')) == {"ok": True}


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after(answer(429, headers={"Retry-After": "7"})) == 7.0
    assert retry_after(answer(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after(answer(429, headers={"Retry-After": "soon"})) is None
    assert retry_after(answer(429)) is None
