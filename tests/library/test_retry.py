"""The one outage backoff (message_bus.retry.Backoff) every Redis loop waits with."""
from __future__ import annotations

import logging

import pytest

from xml_pipeline.message_bus.retry import Backoff


def test_backoff_doubles_from_a_fifth_of_a_second_to_five_and_resets() -> None:
    b = Backoff()
    assert [b.next() for _ in range(8)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    b.reset()
    assert b.next() == pytest.approx(0.2)


def test_retrying_logs_the_words_operators_grep_for_and_returns_the_wait(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("xp.test.retry")
    b = Backoff()
    with caplog.at_level(logging.WARNING, logger="xp.test.retry"):
        first = b.retrying(log, "ingress xp:ingress", "ConnectionError")
        second = b.retrying(log, "ingress xp:ingress", "ConnectionError")
    assert (first, second) == pytest.approx((0.2, 0.4))
    assert [r.getMessage() for r in caplog.records] == [
        "ingress xp:ingress: Redis unavailable (ConnectionError); retrying in 0.2 s",
        "ingress xp:ingress: Redis unavailable (ConnectionError); retrying in 0.4 s",
    ]


def test_cluster_replies_that_mean_not_now_are_waited_out_and_others_are_not() -> None:
    from redis.exceptions import ClusterDownError, ResponseError, TryAgainError

    from xml_pipeline.message_bus.retry import transient_reply

    # What a blocked XREADGROUP gets when its stream's slot moves to another node mid-read.
    assert transient_reply(ResponseError("UNBLOCKED the stream key no longer exists"))
    assert transient_reply(TryAgainError("Multiple keys request during rehashing of slot"))
    assert transient_reply(ClusterDownError("The cluster is down"))
    assert not transient_reply(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert not transient_reply(ResponseError("NOPERM this user has no permissions to access one of the keys"))
