"""A shared Redis restarted without an ACL file forgets its users; recovery re-creates them and the
organisms' backends recover by themselves (same objects, no restart)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from xml_pipeline.errors import BackendUnavailable
from xml_pipeline_operator.tenancy import acl
from xml_pipeline_operator.tenancy.recovery import DesiredUser, UserRecovery

from .conftest import ADMIN_PASSWORD, Org
from .test_library_restricted import backend_for
from redis_server import RedisServer


@pytest.fixture
def restartable() -> Iterator[RedisServer]:
    server = RedisServer(password=ADMIN_PASSWORD).start()
    yield server
    server.cleanup()


def test_restart_loses_users_and_recovery_brings_them_back(
        restartable: RedisServer, make_org: Callable[..., Org]) -> None:
    orgs = [make_org(f"rec{i}", server=restartable) for i in range(3)]
    desired = [DesiredUser(o.username, o.prefix, o.password) for o in orgs]
    admin = restartable.client()
    recovery = UserRecovery(admin)
    first = recovery.check(desired)
    assert not first.restarted and not first.changed  # all in place: nothing to do

    backends = [backend_for(o, retries=1) for o in orgs]
    for i, b in enumerate(backends):
        b.buffer_append("t-1", f"before-{i}".encode())

    restartable.restart()  # no ACL file, no persistence: users and data are gone
    assert not any(acl.user_exists(admin, o.username) for o in orgs)
    # The pods' backends cannot log in meanwhile: a clear error, no hang, no crash.
    with pytest.raises(BackendUnavailable, match="credentials|WRONGPASS|invalid username"):
        backends[0].buffer_append("t-1", b"during")
    assert not backends[1].ping()

    report = recovery.check(desired)
    assert report.restarted
    assert sorted(report.recreated) == sorted(o.username for o in orgs)
    assert report.functions_reloaded  # the function library the users FCALL went with the restart too
    assert all(acl.user_exists(admin, o.username) for o in orgs)

    # The same backend objects work again: they reconnect and re-AUTH on their own.
    for i, b in enumerate(backends):
        assert b.ping()
        assert b.buffer_append("t-1", f"after-{i}".encode()) == 0
        assert b.buffer_get_thread("t-1") == [f"after-{i}".encode()]
        b.close()
    # And the users are still confined to their own prefixes.
    with orgs[0].client() as r0:
        with pytest.raises(redis.exceptions.NoPermissionError):
            r0.get(f"{orgs[1].prefix}buffer:{{t-1}}")
    assert not recovery.check(desired).changed
    admin.close()


def test_missing_user_recreated_without_restart(restartable: RedisServer, make_org: Callable[..., Org]) -> None:
    a, b = make_org("gone", server=restartable), make_org("kept", server=restartable)
    admin = restartable.client()
    recovery = UserRecovery(admin)
    desired = [DesiredUser(o.username, o.prefix, o.password) for o in (a, b)]
    recovery.check(desired)
    acl.delete_user(admin, a.username)  # e.g. deleted by hand
    admin.execute_command("ACL", "SETUSER", b.username, "+flushall")  # drift: not detected without restart
    report = recovery.check(desired)
    assert not report.restarted and report.recreated == (a.username,) and report.repaired == ()
    assert acl.user_exists(admin, a.username)
    admin.close()


def test_stale_acl_file_repaired_after_restart(restartable: RedisServer, make_org: Callable[..., Org]) -> None:
    """After a restart every user is compared, so one that came back with old rules is repaired."""
    a = make_org("stale", server=restartable)
    admin = restartable.client()
    recovery = UserRecovery(admin)
    desired = [DesiredUser(a.username, a.prefix, a.password)]
    recovery.check(desired)
    restartable.restart()
    admin.execute_command("ACL", "SETUSER", a.username, "on", f">{a.password}", "~*", "+@all")  # stale, too wide
    report = recovery.check(desired)
    assert report.restarted and report.repaired == (a.username,)
    user = acl.get_user(admin, a.username)
    assert user is not None and user.key_patterns == {f"~{a.prefix}*"}
    admin.close()


def test_users_persist_where_the_server_has_an_acl_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    aclfile = tmp_path / "users.acl"
    aclfile.write_text("")
    server = RedisServer(extra_args=("--aclfile", str(aclfile))).start()
    try:
        admin = server.client()
        assert acl.ensure_user(admin, "xp-f.org", "pw-" + "x" * 20, "xp:f.org:") is acl.Change.CREATED
        assert acl.save_acl(admin)
        server.restart()
        assert acl.user_exists(admin, "xp-f.org")
        admin.close()
    finally:
        server.cleanup()
    plain = RedisServer().start()
    try:
        assert not acl.save_acl(plain.client())  # no ACL file: says so instead of failing
    finally:
        plain.cleanup()
