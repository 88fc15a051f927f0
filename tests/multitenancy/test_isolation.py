"""With organism A's credentials, B's keys and every server-wide command are out of reach (NOPERM)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from redis.exceptions import NoPermissionError

from xml_pipeline.memory import redis_scripts as scripts
from xml_pipeline.memory.redis_functions import library
from xml_pipeline_operator.tenancy import acl, functions

from .conftest import Org
from .test_pods_restricted import acl_denials


@pytest.fixture
def pair(make_org: Callable[..., Org], admin: redis.Redis) -> tuple[Org, Org]:
    a, b = make_org("a"), make_org("b")
    admin.set(f"{b.prefix}chain:console.greeter", "uuid-b")
    admin.rpush(f"{b.prefix}buffer:{{t1}}", b"slot0", b"slot1")
    admin.xadd(f"{b.prefix}tasks", {"task": "x"})
    admin.xgroup_create(f"{b.prefix}tasks", "workers", id="0")
    return a, b


# -- B's keys --------------------------------------------------------------------------------------

CROSS_TENANT: dict[str, Callable[[redis.Redis, str], object]] = {
    "GET": lambda r, p: r.get(f"{p}chain:console.greeter"),
    "SET": lambda r, p: r.set(f"{p}chain:console.greeter", "mine"),
    "MGET (B + another)": lambda r, p: r.mget(f"{p}chain:console.greeter", "xp:t.nobody:x"),
    "LRANGE": lambda r, p: r.lrange(f"{p}buffer:{{t1}}", 0, -1),
    "RPUSH": lambda r, p: r.rpush(f"{p}buffer:{{t1}}", b"forged"),
    "EXISTS": lambda r, p: r.exists(f"{p}buffer:{{t1}}"),
    "TYPE": lambda r, p: r.type(f"{p}buffer:{{t1}}"),
    "TTL": lambda r, p: r.ttl(f"{p}buffer:{{t1}}"),
    "EXPIRE": lambda r, p: r.expire(f"{p}buffer:{{t1}}", 1),
    "DEL": lambda r, p: r.delete(f"{p}buffer:{{t1}}"),
    "UNLINK": lambda r, p: r.unlink(f"{p}buffer:{{t1}}"),
    "XADD": lambda r, p: r.xadd(f"{p}tasks", {"task": "forged"}),
    "XREADGROUP": lambda r, p: r.xreadgroup("workers", "spy", {f"{p}tasks": ">"}, count=1),
    "XAUTOCLAIM": lambda r, p: r.xautoclaim(f"{p}tasks", "workers", "spy", 0),
    "XGROUP CREATE": lambda r, p: r.xgroup_create(f"{p}tasks", "spies", id="0"),
    "WATCH": lambda r, p: r.execute_command("WATCH", f"{p}chain:console.greeter"),
    "FCALL with B's keys in KEYS": lambda r, p: r.execute_command(
        "FCALL", library().function(scripts.APPEND), 4, f"{p}buffer:{{t1}}", f"{p}op:{{t1}}", f"{p}uuid:{{t1}}",
        f"{p}meta:index", b"forged", "aid", 0, 0, p),
    "FCALL deleting B's thread": lambda r, p: r.execute_command(
        "FCALL", library().function(scripts.DELETE_THREAD), 3, f"{p}buffer:{{t1}}", f"{p}op:{{t1}}",
        f"{p}meta:index", "t1"),
    "PUBLISH to B's channel": lambda r, p: r.publish(f"{p}events", "x"),
}


# A script refused by ACL is a plain error, not NOPERM; each server words it its own way.
SCRIPT_REFUSALS = (
    "can't access at least one of the keys",  # Redis: "The user executing the script can't access ..."
    "ACL failure in script: No permissions to access a key",  # Valkey
)


def field(entry: dict[str, object], name: str) -> str:
    value = entry.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.parametrize("op", sorted(CROSS_TENANT))
def test_a_cannot_touch_b(pair: tuple[Org, Org], admin: redis.Redis, op: str) -> None:
    a, b = pair
    with a.client() as ra:
        with pytest.raises(redis.ResponseError) as err:
            CROSS_TENANT[op](ra, b.prefix)
    # NOPERM (redis-py's NoPermissionError), or the wording of a script refused by ACL (Redis's or Valkey's)...
    assert isinstance(err.value, NoPermissionError) or any(w in str(err.value) for w in SCRIPT_REFUSALS), err.value
    # ... and the server logged it as A's user refused one of B's keys (or channels), from inside the script
    # where the script named it.
    refusals = [(field(e, "reason"), field(e, "context"), field(e, "object"))
                for e in acl_denials(admin, a.username)]
    assert any(reason in ("key", "channel") and obj.startswith(b.prefix)
               and (context == "lua" or "inside the script" not in op)
               for reason, context, obj in refusals), refusals
    # B's data is intact.
    assert admin.get(f"{b.prefix}chain:console.greeter") == b"uuid-b"
    assert admin.lrange(f"{b.prefix}buffer:{{t1}}", 0, -1) == [b"slot0", b"slot1"]
    assert admin.xlen(f"{b.prefix}tasks") == 1


def test_a_cannot_subscribe_to_b(pair: tuple[Org, Org]) -> None:
    a, b = pair
    with a.client() as ra:
        ps = ra.pubsub()
        with pytest.raises(NoPermissionError):
            ps.subscribe(f"{b.prefix}events")
            ps.get_message(timeout=1)
        ps.close()


def test_a_works_in_its_own_prefix(pair: tuple[Org, Org]) -> None:
    a, _ = pair
    with a.client() as ra:
        assert ra.set(f"{a.prefix}chain:x", "u1")
        assert ra.execute_command("FCALL", library().function(scripts.APPEND), 4, f"{a.prefix}buffer:{{t}}",
                                  f"{a.prefix}op:{{t}}", f"{a.prefix}uuid:{{t}}", f"{a.prefix}meta:index",
                                  "s", "aid", 0, 0, a.prefix, -1) == 0
        ra.unlink(f"{a.prefix}op:{{t}}", f"{a.prefix}meta:index")
        assert ra.publish(f"{a.prefix}events", "hello") == 0
        assert ra.unlink(f"{a.prefix}chain:x", f"{a.prefix}buffer:{{t}}") == 2


def test_scanning_b_is_refused(pair: tuple[Org, Org], admin: redis.Redis) -> None:
    """SCAN is not filtered by key patterns (redis/redis#8152), so it is not granted at all: A can
    learn neither B's key names nor B's thread ids (B's index is a key under B's prefix)."""
    from xml_pipeline.memory.config import BackendConfig
    from xml_pipeline.memory.redis_backend import RedisBackend

    a, b = pair
    with RedisBackend(BackendConfig(backend_type="redis", redis_url=b.server.url, redis_prefix=b.prefix,
                                    redis_username=b.username, redis_password=b.password,
                                    signing_key="k" * 32)) as backend_of_b:
        backend_of_b.buffer_append("t-of-b", b"slot")  # B's index now exists
        assert backend_of_b.buffer_list_threads() == ["t-of-b"]
    assert admin.exists(f"{b.prefix}meta:index")
    with a.client() as ra:
        for call in (lambda: ra.scan(0, match=f"{b.prefix}*"), lambda: ra.scan(0),
                     lambda: ra.scan(0, match=f"{a.prefix}*"),
                     lambda: ra.sscan(f"{b.prefix}meta:index", 0),
                     lambda: ra.smembers(f"{b.prefix}meta:index")):
            with pytest.raises(NoPermissionError):
                call()


# -- server-wide commands ----------------------------------------------------------------------------

#: Each forbidden command with arguments of the right arity (Redis checks arity before the ACL, so a
#: wrong arity would give a misleading error instead of NOPERM). `{own}` is a key of A's prefix.
FORBIDDEN_CALLS: dict[str, tuple[str, ...]] = {
    "flushall": ("FLUSHALL",), "flushdb": ("FLUSHDB",), "keys": ("KEYS", "*"),
    "randomkey": ("RANDOMKEY",), "dbsize": ("DBSIZE",), "swapdb": ("SWAPDB", "0", "1"),
    "scan": ("SCAN", "0"), "select": ("SELECT", "1"), "move": ("MOVE", "{own}", "1"),
    "migrate": ("MIGRATE", "127.0.0.1", "1", "{own}", "0", "100"),
    "config": ("CONFIG", "GET", "requirepass"), "debug": ("DEBUG", "SLEEP", "0"),
    "acl": ("ACL", "LIST"), "shutdown": ("SHUTDOWN", "NOSAVE"), "module": ("MODULE", "LIST"),
    "monitor": ("MONITOR",), "replicaof": ("REPLICAOF", "NO", "ONE"), "slaveof": ("SLAVEOF", "NO", "ONE"),
    "sync": ("SYNC",), "psync": ("PSYNC", "?", "-1"), "save": ("SAVE",), "bgsave": ("BGSAVE",),
    "bgrewriteaof": ("BGREWRITEAOF",), "lastsave": ("LASTSAVE",), "failover": ("FAILOVER", "ABORT"),
    "cluster": ("CLUSTER", "INFO"), "latency": ("LATENCY", "LATEST"), "slowlog": ("SLOWLOG", "GET"),
    "memory": ("MEMORY", "USAGE", "{own}"), "object": ("OBJECT", "ENCODING", "{own}"), "info": ("INFO",),
    "pubsub": ("PUBSUB", "CHANNELS"), "function": ("FUNCTION", "LIST"),
    "eval": ("EVAL", "return 1", "0"), "eval_ro": ("EVAL_RO", "return 1", "0"),
    "evalsha": ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
    "evalsha_ro": ("EVALSHA_RO", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"),
    "script|load": ("SCRIPT", "LOAD", "return 1"), "script|exists": ("SCRIPT", "EXISTS", "e0e1f9fa"),
    "script|debug": ("SCRIPT", "DEBUG", "NO"),
    "script|flush": ("SCRIPT", "FLUSH"), "script|kill": ("SCRIPT", "KILL"),
    "client|kill": ("CLIENT", "KILL", "ID", "999999"), "client|list": ("CLIENT", "LIST"),
    "client|pause": ("CLIENT", "PAUSE", "1"), "client|no-evict": ("CLIENT", "NO-EVICT", "off"),
    "client|tracking": ("CLIENT", "TRACKING", "off"), "client|info": ("CLIENT", "INFO"),
    "client|reply": ("CLIENT", "REPLY", "ON"),
}


def test_every_forbidden_command_is_exercised() -> None:
    assert set(FORBIDDEN_CALLS) == acl.FORBIDDEN_COMMANDS
    assert not acl.FORBIDDEN_COMMANDS & set(acl.ORGANISM_COMMANDS)


@pytest.mark.parametrize("command", sorted(FORBIDDEN_CALLS))
def test_server_wide_commands_refused(make_org: Callable[..., Org], admin: redis.Redis, command: str) -> None:
    a = make_org("a")
    own = f"{a.prefix}k"
    admin.set(own, "v")
    args = [own if x == "{own}" else x for x in FORBIDDEN_CALLS[command]]
    with a.client(socket_timeout=2) as ra:
        with pytest.raises(NoPermissionError):
            ra.execute_command(*args)
    assert admin.get(own) == b"v"  # nothing was flushed


def test_refusals_are_recorded_in_the_acl_log(pair: tuple[Org, Org], admin: redis.Redis) -> None:
    """ACL LOG names the user and the refused key: the audit trail an operator of the shared Redis has
    (and what the pod tests check stays empty)."""
    from .test_pods_restricted import acl_denials

    a, b = pair
    with a.client() as ra:
        with pytest.raises(NoPermissionError):
            ra.get(f"{b.prefix}chain:console.greeter")
    denials = acl_denials(admin, a.username)
    assert denials and any(f"{b.prefix}chain:console.greeter" in str(d.get("object")) for d in denials)


def test_a_function_building_b_keys_from_its_arguments_is_refused(pair: tuple[Org, Org], admin: redis.Redis) -> None:
    """Keys a function builds from ARGV (the prefix argument) are checked like declared ones."""
    a, b = pair
    with a.client() as ra:
        ra.set(f"{a.prefix}uuid:{{u1}}", "console.greeter")
        with pytest.raises(redis.ResponseError, match="(?i)no permissions|NOPERM|can't access"):
            ra.execute_command("FCALL", library().function(scripts.REGISTRY_DELETE), 2, f"{a.prefix}uuid:{{u1}}",
                               f"{a.prefix}meta:index", "u1", b.prefix)
    assert admin.get(f"{b.prefix}chain:console.greeter") == b"uuid-b"


LOOP = "local i = 0 while true do i = i + 1 end"


def test_a_tenant_cannot_run_lua_of_its_own(make_org: Callable[..., Org], admin: redis.Redis) -> None:
    """No script a tenant writes ever runs: EVAL, SCRIPT LOAD and FUNCTION LOAD/DELETE/FLUSH are NOPERM
    (a looping script that has written cannot be killed; only SHUTDOWN NOSAVE would end it). The
    library's functions stay loaded and callable."""
    a = make_org("lua")
    own = f"{a.prefix}k"
    calls: list[tuple[str | int, ...]] = [
        ("EVAL", f"redis.call('SET', KEYS[1], 'x') {LOOP}", 1, own),
        ("EVAL_RO", LOOP, 0),
        ("SCRIPT", "LOAD", LOOP),
        ("FUNCTION", "LOAD", f"#!lua name=mine\nredis.register_function('spin', function() {LOOP} end)"),
        ("FUNCTION", "LOAD", "REPLACE", library().text),  # not even the library's own text
        ("FUNCTION", "DELETE", library().name),
        ("FUNCTION", "FLUSH"),
        ("FUNCTION", "KILL"),
    ]
    with a.client(socket_timeout=2) as ra:
        for call in calls:
            with pytest.raises(NoPermissionError):
                ra.execute_command(*call)
        assert ra.execute_command("FCALL_RO", library().version_function, 0) == library().version.encode()
    assert admin.get(own) is None and functions.library_loaded(admin)
