"""ensure_user / disable_user / delete_user / password rotation on a real redis-server."""
from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
import redis
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError

from xml_pipeline.errors import ConfigError
from xml_pipeline_operator.tenancy import acl, functions, ownership
from xml_pipeline_operator.tenancy.acl import Change

from .conftest import Org


def _login(org: Org, password: str) -> redis.Redis:
    return redis.Redis.from_url(org.server.url, username=org.username, password=password, socket_timeout=5)


def test_rules_shape() -> None:
    rules = acl.acl_rules("xp:team-a.orders:")
    assert rules[:5] == ["resetkeys", "~xp:team-a.orders:*", "resetchannels", "&xp:team-a.orders:*", "-@all"]
    granted = {r[1:] for r in rules[5:]}
    assert all(r.startswith("+") for r in rules[5:])
    assert not granted & acl.FORBIDDEN_COMMANDS
    assert "client|setinfo" not in granted  # only where the server knows it
    assert "scan" not in granted and "keys" not in granted  # the library lists through its index


@pytest.mark.parametrize("prefix", ["xp:*", "xp:a", "xp:[ab]:", "", "xp:buffer:", "x p:"])
def test_unsafe_prefix_refused(prefix: str) -> None:
    with pytest.raises(ConfigError) as err:
        acl.acl_rules(prefix)
    assert err.value.field == "backend.redis.prefix"


def test_ensure_user_is_idempotent(admin: redis.Redis) -> None:
    name, pw = "xp.t.idem", secrets.token_urlsafe(16)
    try:
        assert acl.ensure_user(admin, name, pw, "xp:t.idem:") is Change.CREATED
        before = acl.get_user(admin, name)
        assert acl.ensure_user(admin, name, pw, "xp:t.idem:") is Change.UNCHANGED
        assert acl.get_user(admin, name) == before
        assert before == acl.desired_user(name, "xp:t.idem:", [pw], acl.server_profile(admin))
        # A different prefix or a disabled flag is a real change, applied in place.
        assert acl.ensure_user(admin, name, pw, "xp:t.idem2:") is Change.UPDATED
        assert acl.get_user(admin, name).key_patterns == {"~xp:t.idem2:*"}  # type: ignore[union-attr]
        # Drift made by hand (an extra command, an extra password) is corrected.
        admin.execute_command("ACL", "SETUSER", name, "+flushall", ">intruder")
        assert acl.ensure_user(admin, name, pw, "xp:t.idem2:") is Change.UPDATED
        user = acl.get_user(admin, name)
        assert user is not None and "+flushall" not in user.command_rules
        assert user.password_hashes == {acl.password_hash(pw)}
    finally:
        acl.delete_user(admin, name)


def test_ensure_user_writes_nothing_when_unchanged(admin: redis.Redis) -> None:
    name, pw = "xp.t.quiet", secrets.token_urlsafe(16)
    profile = acl.server_profile(admin)  # learnt once per server, as the operator does
    acl.ensure_user(admin, name, pw, "xp:t.quiet:", profile=profile)
    try:
        # ACL LOG is silent, but commandstats counts every ACL SETUSER the server ran.
        def setuser_calls() -> int:
            stats = admin.info("commandstats")
            return int(stats.get("cmdstat_acl|setuser", {}).get("calls", 0))
        before = setuser_calls()
        for _ in range(3):
            assert acl.ensure_user(admin, name, pw, "xp:t.quiet:", profile=profile) is Change.UNCHANGED
        assert setuser_calls() == before
    finally:
        acl.delete_user(admin, name)


def test_disable_keeps_data_and_drops_connections(make_org: Callable[..., Org], admin: redis.Redis) -> None:
    a = make_org("dis")
    with a.client() as ra:
        ra.set(f"{a.prefix}chain:x", "u")
        assert acl.disable_user(admin, a.username)
        # The authenticated connection was killed; reconnecting cannot log in any more.
        with pytest.raises((AuthenticationError, ConnectionError)):
            ra.get(f"{a.prefix}chain:x")
    assert admin.get(f"{a.prefix}chain:x") == b"u"
    user = acl.get_user(admin, a.username)
    assert user is not None and not user.enabled
    assert acl.disable_user(admin, a.username)  # idempotent
    assert not acl.disable_user(admin, "xp.t.nobody")


def test_delete_user(make_org: Callable[..., Org], admin: redis.Redis) -> None:
    a = make_org("del")
    with a.client() as ra:
        assert ra.ping()
        assert acl.delete_user(admin, a.username)
        with pytest.raises((AuthenticationError, ConnectionError)):
            ra.ping()
    assert not acl.user_exists(admin, a.username)
    assert not acl.delete_user(admin, a.username)


def test_user_cannot_scan_even_its_own_prefix(make_org: Callable[..., Org]) -> None:
    s = make_org("noscan")
    with s.client() as rs:
        assert rs.set(f"{s.prefix}x", 1)
        with pytest.raises(NoPermissionError):
            list(rs.scan_iter(match=f"{s.prefix}*"))


def test_operator_runs_with_a_least_privilege_admin(shared_redis, admin: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    """ADMIN_COMMANDS is enough for the operator's whole job: provision, rotate, sample, recover, clean up."""
    from xml_pipeline_operator.tenancy.cleanup import cleanup_prefix
    from xml_pipeline_operator.tenancy.recovery import DesiredUser, UserRecovery
    from xml_pipeline_operator.tenancy.usage import UsageSampler

    available = acl.server_commands(admin)
    granted = [c for c in acl.ADMIN_COMMANDS if c != "client|setinfo" or c in available]
    op_pw = secrets.token_urlsafe(16)
    admin.execute_command("ACL", "SETUSER", "xp-operator-test", "on", f">{op_pw}", "~*", "resetchannels",
                          "-@all", *(f"+{c}" for c in granted))
    op = redis.Redis.from_url(shared_redis.url, username="xp-operator-test", password=op_pw, client_name="op")
    try:
        name, pw, prefix = "xp-lp.org", secrets.token_urlsafe(16), "xp:lp.org:"
        assert acl.ensure_user(op, name, pw, prefix) is Change.CREATED
        with redis.Redis.from_url(shared_redis.url, username=name, password=pw) as tenant:
            tenant.rpush(f"{prefix}buffer:{{t}}", b"x")
        sampler = UsageSampler(op)
        sampler.set_tenants({"lp/org": prefix})
        assert sampler.run_round()["lp/org"].threads == 1
        assert not UserRecovery(op).check([DesiredUser(name, prefix, pw)]).changed
        # The function library: checked, and loaded again once lost.
        admin.execute_command("FUNCTION", "DELETE", functions.library().name)
        assert functions.ensure_library(op) is functions.LibraryState.LOADED
        # Prefix ownership: claimed (a WATCH transaction), retained, released.
        me = ownership.Owner("lp", "org", "uid-1")
        assert ownership.claim(op, prefix, me) is None
        assert ownership.mark_retained(op, prefix, me) and ownership.release(op, prefix, me)
        op.set("{xp-operator}:cleanup:probe", "1")
        assert op.delete("{xp-operator}:cleanup:probe") == 1
        assert acl.disable_user(op, name)
        assert cleanup_prefix(op, prefix).deleted == 1
        assert acl.delete_user(op, name)
    finally:
        op.close()
        admin.execute_command("ACL", "DELUSER", "xp-operator-test")
