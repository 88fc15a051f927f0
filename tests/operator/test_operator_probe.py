"""probe_redis against real redis-server processes: what the operator tells users about an external
Redis before their pods find out."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_server import RedisServer, free_port

from xml_pipeline_operator.probe import probe_redis


@pytest.fixture(scope="module")
def guarded() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret-pw").start()
    client = server.client()
    client.execute_command("ACL", "SETUSER", "app", "on", ">app-pw", "~*", "+ping")
    client.execute_command("ACL", "SETUSER", "mute", "on", ">mute-pw", "~*", "-@all")
    client.close()
    yield server
    server.cleanup()


def test_the_right_credentials_reach_it(guarded: RedisServer) -> None:
    assert probe_redis(guarded.url, None, "s3cret-pw").ok
    result = probe_redis(guarded.url, "app", "app-pw")
    assert result.outcome == "Reachable" and " ms" in result.detail


@pytest.mark.parametrize("username, password", [(None, "wrong"), (None, None), ("app", "wrong"), ("nobody", "app-pw"),
                                                ("mute", "mute-pw")])  # logs in, may not even PING
def test_refused_credentials_are_auth_failures_without_the_password(guarded: RedisServer, username: str | None,
                                                                    password: str | None) -> None:
    result = probe_redis(guarded.url, username, password)
    assert result.outcome == "AuthFailed", result
    assert "wrong" not in result.detail and "-pw" not in result.detail


def test_nobody_listening_is_unreachable_quickly() -> None:
    result = probe_redis(f"redis://127.0.0.1:{free_port()}/0", None, "pw", timeout=1.0)
    assert result.outcome == "Unreachable" and "ConnectionError" in result.detail
