"""The client ACL user of an organism on a real redis-server: the client API works with exactly its
rights, and everything else is refused (NOPERM), including writes through the function library."""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from xml_pipeline.client import CLIENT_COMMANDS, OrganismClient
from xml_pipeline.errors import BackendError
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_functions import library
from xml_pipeline.memory.redis_scripts import APPEND
from xml_pipeline_operator.tenancy import acl, client_acl

from .conftest import Org

KEY = secrets.token_hex(16)


def test_client_commands_are_a_subset_of_the_organisms_and_never_scripts_or_deletes() -> None:
    assert set(CLIENT_COMMANDS) <= set(acl.ORGANISM_COMMANDS)
    assert not set(CLIENT_COMMANDS) & client_acl.NEVER
    assert not set(CLIENT_COMMANDS) & acl.FORBIDDEN_COMMANDS


def test_client_username_never_collides_with_an_organism_user() -> None:
    # Organism names may contain dots: "a.client" must not be anyone's client user.
    assert client_acl.client_username("ns", "a") != acl.username_for("ns", "a")
    assert not client_acl.client_username("ns", "a").startswith("xp-")


@pytest.fixture
def org_and_client(make_org: Callable[..., Org], admin: redis.Redis) -> Iterator[tuple[Org, Org]]:
    org = make_org("cli")
    client = Org(org.server, client_acl.client_username("t", org.prefix.strip(":").replace(":", ".")),
                 secrets.token_urlsafe(24), org.prefix)
    assert client_acl.ensure_client_user(admin, client.username, client.password, org.prefix) is acl.Change.CREATED
    yield org, client
    admin.execute_command("ACL", "DELUSER", client.username)


def _config(who: Org) -> BackendConfig:
    return BackendConfig(backend_type="redis", redis_url=who.server.url, redis_prefix=who.prefix, redis_ttl=600,
                         redis_username=who.username, redis_password=who.password, signing_key=KEY)


def test_ensure_client_user_is_idempotent_and_follows_the_password(org_and_client: tuple[Org, Org],
                                                                    admin: redis.Redis) -> None:
    org, client = org_and_client
    assert client_acl.ensure_client_user(admin, client.username, client.password, org.prefix) is acl.Change.UNCHANGED
    new = secrets.token_urlsafe(24)
    old_hash = acl.password_hash(client.password)
    assert client_acl.ensure_client_user(admin, client.username, new, org.prefix,
                                         also_accept_hashes=[old_hash]) is acl.Change.UPDATED
    for password in (client.password, new):  # both accepted while a rotation runs
        c = redis.Redis.from_url(client.server.url, username=client.username, password=password)
        assert c.ping()
        c.close()
    assert client_acl.ensure_client_user(admin, client.username, new, org.prefix) is acl.Change.UPDATED
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(client.server.url, username=client.username, password=client.password).ping()


def test_client_reads_what_the_organism_wrote_and_nothing_else(org_and_client: tuple[Org, Org],
                                                               make_org: Callable[..., Org]) -> None:
    org, client = org_and_client
    other = make_org("other")
    with RedisBackend(_config(org)) as backend:
        buffer = ContextBuffer(backend)
        buffer.append("t-1", "<hello/>", "greeter", "console")
        backend.registry_set("root.greeter", "t-1")
        backend.temp_put("secret-payload", b"x")
        backend.client.xadd(backend.key("tasks"), {"a": "1"})
        backend.client.xadd(backend.key("egress"), {"in_reply_to": "m", "xml": "<x/>"})
        backend.client.xadd(backend.key("ingress"), {"xml": "<from-another-client/>"})
    with RedisBackend(_config(other)) as ob:
        ContextBuffer(ob).append("t-9", "<theirs/>", "a", "b")

    with OrganismClient(_config(client)) as c:
        slots = c.read_thread("t-1")
        assert [s.payload for s in slots] == ["<hello/>"]
        assert c.thread_of("root.greeter") == "t-1" and c.chain_of("t-1") == "root.greeter"
        assert c.threads() == ["t-1"]
        assert c.read_thread("t-9") == []  # other tenant's thread: a different prefix, never its keys

    raw = client.client()
    p = org.prefix
    allowed = [
        ("XADD", f"{p}ingress", "*", "xml", "<m/>"),
        ("XREVRANGE", f"{p}egress", "+", "-", "COUNT", "1"),
        ("LRANGE", f"{p}buffer:{{t-1}}", 0, -1),
        ("GET", f"{p}chain:root.greeter"),
        ("SSCAN", f"{p}meta:index", 0),
    ]
    for cmd in allowed:
        raw.execute_command(*cmd)
    lib = library()
    denied = [
        ("XRANGE", f"{p}ingress", "-", "+"),                 # other clients' messages
        ("XADD", f"{p}egress", "*", "a", "1"),               # forging answers
        ("RPUSH", f"{p}buffer:{{t-1}}", "forged"),           # writing the context
        ("DEL", f"{p}buffer:{{t-1}}"),
        ("EXPIRE", f"{p}buffer:{{t-1}}", 1),
        ("SET", f"{p}chain:root.greeter", "t-2"),
        ("GET", f"{p}tmp:{{secret-payload}}"),               # temporary worker data
        ("XRANGE", f"{p}tasks", "-", "+"),                   # task streams
        ("XREADGROUP", "GROUP", "pump", "c", "STREAMS", f"{p}ingress", ">"),
        ("HGET", f"{p}op:{{t-1}}", "x"),
        ("XRANGE", f"{p}dlq", "-", "+"),
        ("LRANGE", f"{other.prefix}buffer:{{t-9}}", 0, -1),  # another tenant
        ("FCALL", lib.function(APPEND), 4, f"{p}buffer:{{t-1}}", f"{p}op:{{t-1}}", f"{p}meta:index",
         f"{p}uuid:{{t-1}}", "blob", 0, 0, p, "id"),
        ("FCALL_RO", lib.version_function, 0),
        ("EVAL", "return 1", 0),
        ("SCAN", 0), ("KEYS", "*"), ("FLUSHALL",), ("PUBLISH", f"{p}x", "m"),
    ]
    for cmd in denied:
        with pytest.raises(redis.exceptions.NoPermissionError):
            raw.execute_command(*cmd)
    raw.close()


def test_fcall_ro_refuses_write_functions_on_the_real_server(admin: redis.Redis,
                                                             make_org: Callable[..., Org]) -> None:
    """Why FCALL_RO alone would be a read-only guarantee: Redis refuses it for a function without the
    no-writes flag (every script of our library but the version probe)."""
    org = make_org("ro")
    lib = library()
    with pytest.raises(redis.ResponseError, match="write flag"):
        org.client().execute_command("FCALL_RO", lib.function(APPEND), 4, f"{org.prefix}buffer:{{t}}",
                                     f"{org.prefix}op:{{t}}", f"{org.prefix}meta:index", f"{org.prefix}uuid:{{t}}",
                                     "blob", 0, 0, org.prefix, "id")


def test_client_send_is_refused_a_write_elsewhere_with_a_clear_error(org_and_client: tuple[Org, Org]) -> None:
    org, client = org_and_client
    with RedisBackend(_config(client)) as backend:
        with pytest.raises(BackendError, match="NOPERM|permission"):
            ContextBuffer(backend).append("t-1", "<forged/>", "x", "y")


def test_dedicated_redis_start_script_makes_the_client_user(tmp_path: Path) -> None:
    """The dedicated Redis's real start script (shell, here-document, `user` line), run by sh with a real
    redis-server: the client user logs in with the binding's password and has exactly the client rights."""
    import os
    import subprocess
    import time

    from redis_server import free_port, server_binary
    from xml_pipeline_operator.desired import redis as desired_redis
    from xml_pipeline_operator.model import parse_organism
    from xml_pipeline_operator.settings import OperatorSettings

    org = parse_organism({"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism",
                          "metadata": {"name": "shop", "namespace": "team", "uid": "u"},
                          "spec": {"config": {"listeners": [{"name": "g", "handler": "m:f"}]}}}, OperatorSettings())
    port = free_port()
    args = " ".join(desired_redis.redis_args(org))
    script = desired_redis.start_script(org)
    assert args in script
    script = script.replace(args, f"--port {port} --dir {tmp_path} --save ''").replace(
        "exec redis-server", f"exec {server_binary().path}")
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": "admin-pw-" + "a" * 20, "REDISCLI_AUTH": "x",
           "XP_CLIENT_PASSWORD": "client-pw-" + "b" * 20}
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = redis.Redis(port=port, username="xpc-team.shop", password=env["XP_CLIENT_PASSWORD"], socket_timeout=5)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert client.xadd(f"{org.redis.prefix}ingress", {"xml": "<m/>"})
        assert client.lrange(f"{org.redis.prefix}buffer:{{t}}", 0, -1) == []
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.xrange(f"{org.redis.prefix}ingress")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set(f"{org.redis.prefix}chain:x", "y")
        # The secrets are not in the server's environment (the script unsets them before exec).
        admin = redis.Redis(port=port, password=env["REDIS_PASSWORD"], socket_timeout=5)
        assert admin.ping()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"client-pw-" not in environ and b"admin-pw-" not in environ
    finally:
        proc.terminate()
        proc.wait(timeout=10)
