"""The library's RedisBackend works with an organism's restricted ACL user (the permission set is
sufficient, not only strict), and every command it issues is one the ACL grants."""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.errors import ThreadFullError
from xml_pipeline.memory import BackendConfig, get_context_buffer
from xml_pipeline.contract import BACKEND_COMMANDS, EVAL_COMMANDS
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message_bus.thread_registry import get_registry
from xml_pipeline_operator.tenancy import acl, functions

from .conftest import Org

SIGNING_KEY = secrets.token_hex(16)


def backend_for(org: Org, **kw: object) -> RedisBackend:
    cfg = BackendConfig(backend_type="redis", redis_url=org.server.url, redis_prefix=org.prefix,
                        redis_username=org.username, redis_password=org.password, redis_ttl=120,
                        signing_key=SIGNING_KEY, **kw)  # type: ignore[arg-type]
    return RedisBackend(cfg)


def exercise(b: RedisBackend) -> None:
    """Every operation of the SharedBackend protocol, plus ContextBuffer and ThreadRegistry on top."""
    assert b.ping()
    assert b.buffer_append("t-1", b"s0") == 0
    assert b.buffer_append("t-1", b"s1", append_id="a1") == 1
    assert b.buffer_append("t-1", b"s1", append_id="a1") == 1  # a retried append is stored once
    with pytest.raises(ThreadFullError):
        b.buffer_append("t-1", b"s2", max_slots=2)
    assert b.buffer_get_thread("t-1") == [b"s0", b"s1"]
    assert b.buffer_get_slot("t-1", 1) == b"s1"
    assert b.buffer_thread_len("t-1") == 2
    assert b.buffer_thread_exists("t-1")
    assert b.buffer_list_threads() == ["t-1"]
    b.registry_set("console.greeter", "t-1")
    assert b.registry_get_or_create("console.greeter", "t-2") == "t-1"
    assert b.registry_get_uuid("console.greeter") == "t-1"
    assert b.registry_get_chain("t-1") == "console.greeter"
    assert b.registry_list_all() == {"t-1": "console.greeter"}
    b.temp_put("p-1", b"payload")
    assert b.temp_get("p-1") == b"payload"
    assert b.temp_delete("p-1") == 1
    info = b.info()
    assert info["buffer_threads"] == 1 and info["registry_entries"] == 1 and info["server_version"]
    assert b.registry_delete("t-1")
    assert b.buffer_delete_thread("t-1")
    b.buffer_append("t-3", b"x")
    b.registry_set("a.b", "t-3")
    assert b.buffer_clear() == 1 and b.registry_clear() == 1
    # The layers above the backend.
    buf = get_context_buffer(backend=b)
    slot = buf.append("t-4", "<hello/>", "console", "greeter")
    assert slot.metadata.slot_index == 0 and buf.get_thread("t-4")
    reg = get_registry(backend=b)
    assert reg.is_shared


def test_library_runs_with_restricted_user(make_org: Callable[..., Org], admin: redis.Redis) -> None:
    from .test_pods_restricted import acl_denials

    a, b = make_org("lib-a"), make_org("lib-b")
    with backend_for(b) as bb:
        bb.buffer_append("t-1", b"b's slot")
    with backend_for(a) as ba:
        exercise(ba)
        assert ba.script_mechanism == "fcall"  # the tenant has no EVAL: every script ran as FCALL
    # B's thread is still there and A's buffer_clear/registry_clear touched none of B's keys.
    assert admin.llen(f"{b.prefix}buffer:{{t-1}}") == 1
    assert acl_denials(admin, a.username) == []  # not a single command was refused


def test_restricted_backend_cannot_reach_other_prefix(make_org: Callable[..., Org]) -> None:
    """A backend configured with A's credentials but B's prefix (a misconfigured pod) gets nowhere."""
    a, b = make_org("mis-a"), make_org("mis-b")
    wrong = Org(a.server, a.username, a.password, b.prefix)
    with backend_for(wrong, retries=0) as w:
        with pytest.raises(Exception, match="(?i)no permissions|NOPERM|can't access"):
            w.buffer_append("t-1", b"x")
        with pytest.raises(Exception, match="(?i)no permissions|NOPERM|can't access"):
            w.buffer_get_thread("t-1")


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


def test_every_command_the_library_issues_is_granted(private_redis: RedisServer) -> None:
    """Run the whole workload as an unrestricted user on a private server and read the server's own
    command statistics (which count the commands Lua scripts call too): each one must be granted."""
    admin = private_redis.client()
    functions.ensure_library(admin)  # as the operator does on a shared Redis
    admin.config_resetstat()
    cfg = BackendConfig(backend_type="redis", redis_url=private_redis.url, redis_prefix="xp:t.stats:",
                        redis_ttl=120, signing_key=SIGNING_KEY)
    with RedisBackend(cfg) as b:
        exercise(b)
        assert b.script_mechanism == "fcall"
    used = {name.removeprefix("cmdstat_").lower() for name in admin.info("commandstats")}
    used -= {"config|resetstat", "info", "hello", "auth"}  # the test's own calls
    assert "fcall" in used and not used & {"eval", "evalsha", "script|load"}
    granted = set(acl.granted_commands(acl.server_commands(admin)))
    assert used <= granted, f"the library issues commands the ACL does not grant: {sorted(used - granted)}"
    # The library's own declaration agrees (INFO is granted for its `server` section only).
    assert BACKEND_COMMANDS <= granted
    admin.close()


def test_without_the_function_library_scripts_run_with_evalsha(private_redis: RedisServer) -> None:
    """A plain Redis (dedicated, or external without the library): EVALSHA, EVAL on NOSCRIPT, no FCALL
    beyond the one probe. Loading the library switches a new backend to FCALL; flushing it sends a
    running backend back to EVALSHA by itself."""
    admin = private_redis.client()
    admin.execute_command("FUNCTION", "FLUSH")
    admin.config_resetstat()
    cfg = BackendConfig(backend_type="redis", redis_url=private_redis.url, redis_prefix="xp:t.plain:",
                        redis_ttl=120, signing_key=SIGNING_KEY)
    with RedisBackend(cfg) as b:
        exercise(b)
        assert b.script_mechanism == "eval"
        b.client.script_flush()  # the EVAL fallback path too
        b.buffer_append("t-9", b"x")
        stats = admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] > 10 and stats["cmdstat_eval"]["calls"] >= 1
        assert "cmdstat_fcall" not in stats and stats["cmdstat_fcall_ro"]["calls"] == 1  # the probe
        assert set(EVAL_COMMANDS) <= {n.removeprefix("cmdstat_") for n in stats}
        functions.ensure_library(admin)
        with RedisBackend(cfg) as b2:
            assert b2.buffer_append("t-10", b"y") == 0 and b2.script_mechanism == "fcall"
            admin.script_flush()  # nothing cached either: FCALL fails, EVALSHA gets NOSCRIPT, EVAL runs it
            admin.execute_command("FUNCTION", "FLUSH")
            assert b2.buffer_append("t-10", b"z") == 1 and b2.script_mechanism == "eval"
            assert b2.registry_get_or_create("a.b", "t-10") == "t-10"  # variadic-free, fixed heads
            assert b2.buffer_list_threads()  # a variadic script (index_live) after the switch
    admin.close()


def test_cli_clear_with_the_organisms_own_user(make_org: Callable[..., Org], admin: redis.Redis) -> None:
    """`xml-pipeline backend clear` with a restricted user (no SCAN): threads, registry and the fixed
    streams go through the index and by name; temp data is left to its TTL, and the CLI says so."""
    import json
    import os
    import subprocess
    import sys

    org = make_org("cli")
    with backend_for(org) as b:
        b.buffer_append("t-1", b"x")
        b.registry_set("console.greeter", "t-1")
        b.temp_put("tmp-1", b"y")
        b.client.xadd(b.key("ingress"), {"m": "x"})
    env = dict(os.environ, XP_BACKEND_TYPE="redis", XP_REDIS_URL=org.server.url, XP_REDIS_USERNAME=org.username,
               XP_REDIS_PASSWORD=org.password, XP_SIGNING_KEY=SIGNING_KEY)
    env.pop("XP_CONFIG", None)
    r = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", "backend", "clear", "--prefix", org.prefix,
                        "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed"] == {"threads": 1, "registry_entries": 1, "stream_and_temp_keys": 1}
    assert out["temp_keys_swept"] is False and "left to expire" in r.stderr and "Traceback" not in r.stderr
    left = sorted(k.decode() for k in admin.scan_iter(match=f"{org.prefix}*"))
    assert left == [f"{org.prefix}tmp:{{tmp-1}}"] and admin.ttl(left[0]) > 0
