"""Retry-After as an HTTP date is read on the server's clock (its `Date` header), not on the Pi's, which may be
hours off until NTP syncs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from agent.sync.delivery import MAX_RETRY_AFTER_S, retry_after


def answer(**headers: str) -> httpx.Response:
    return httpx.Response(429, headers=headers)


def http_date(when: datetime) -> str:
    return format_datetime(when, usegmt=True)


@pytest.mark.parametrize("our_clock_off_by_h", [-3.0, 0.0, 3.0])
def test_a_date_is_measured_from_the_answers_date_whatever_our_clock_says(our_clock_off_by_h: float) -> None:
    # The server's clock, as its Date header tells; ours (datetime.now) is `our_clock_off_by_h` away from it.
    server_now = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=our_clock_off_by_h)
    got = retry_after(
        answer(**{"Date": http_date(server_now), "Retry-After": http_date(server_now + timedelta(seconds=30))})
    )
    assert got == 30.0


def test_without_a_readable_date_header_our_clock_is_the_reference() -> None:
    soon = http_date(datetime.now(UTC) + timedelta(seconds=120))
    for date in (None, "yesterday-ish", "Wed, 21 Oct 2015 07:28:00 -0000"):  # the last is naive: no zone to trust
        headers = {"Retry-After": soon} if date is None else {"Retry-After": soon, "Date": date}
        got = retry_after(answer(**headers))
        assert got is not None
        assert 110.0 <= got <= 120.0


def test_a_date_in_the_past_or_far_ahead_of_the_servers_is_bounded() -> None:
    server_now = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
    past = answer(**{"Date": http_date(server_now), "Retry-After": http_date(server_now - timedelta(minutes=5))})
    assert retry_after(past) == 0.0
    ahead = answer(**{"Date": http_date(server_now), "Retry-After": http_date(server_now + timedelta(days=9))})
    assert retry_after(ahead) == MAX_RETRY_AFTER_S
