"""What the Redis Cluster mode adds to the contract: the key layout per slot, the registry's
authority and read repair, racing get_or_create callers, the index spread over buckets, FCALL of
the function library on every master, WAIT, and the commands a tenant's ACL user must be granted."""
from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from redis_cluster import LocalCluster, LocalSentinel

from xml_pipeline import contract
from xml_pipeline.memory import BackendConfig, ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_cluster import RedisClusterBackend
from xml_pipeline.memory.redis_functions import library

pytestmark = pytest.mark.cluster

SIGNING_KEY = "cluster-tests-signing-key-0123456789"


@pytest.fixture
def backend(shared_cluster: LocalCluster) -> Iterator[RedisClusterBackend]:
    b = _make(shared_cluster.url)
    yield b
    b.buffer_clear()
    b.registry_clear()
    b.close()


def _make(url: str, **config: Any) -> Any:
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=url, redis_prefix=f"cb{secrets.token_hex(4)}:",
                                      redis_ttl=600, signing_key=SIGNING_KEY, **config))


def test_a_cluster_url_gives_the_cluster_backend_and_one_slot_per_thread(backend: RedisClusterBackend,
                                                                         shared_cluster: LocalCluster) -> None:
    assert isinstance(backend, RedisClusterBackend) and not backend.pipe_capable()
    assert backend.new_direct_connection() is None  # one server's; a worker gets one per master (test_cluster_pipe.py)
    backend.buffer_append("t1", b"x")
    backend.registry_set("a.chain", "t1")
    p = backend.prefix
    admin = shared_cluster.client()
    slots = {admin.keyslot(k) for k in (f"{p}buffer:{{t1}}", f"{p}op:{{t1}}", f"{p}uuid:{{t1}}")}
    assert len(slots) == 1
    assert admin.get(f"{p}chain:{{a.chain}}") == b"t1" and admin.get(f"{p}chain:a.chain") is None
    assert admin.exists(f"{p}meta:index") == 0  # the standalone index is not used here
    bucket = backend.keys.bucket("t:t1")
    assert bucket.startswith(f"{p}meta:index:{{") and admin.sismember(bucket, "t:t1")
    info = backend.info()
    assert (info["mode"], info["masters"], info["buffer_threads"], info["registry_entries"]) == ("cluster", 3, 1, 1)


def test_the_index_spreads_over_the_masters(backend: RedisClusterBackend, shared_cluster: LocalCluster) -> None:
    for i in range(64):
        backend.buffer_append(f"spread-{i}", b"x")
    admin = shared_cluster.client()
    owners = {shared_cluster.owner_of(admin.keyslot(b)).port for b in backend.keys.buckets()
              if admin.exists(b)}
    assert len(owners) == 3  # 16 buckets hashed over the slot space: every master holds some
    assert backend.buffer_list_threads() == sorted(f"spread-{i}" for i in range(64))


def test_racing_get_or_create_callers_all_get_the_first_uuid(backend: RedisClusterBackend) -> None:
    for round_ in range(5):
        chain = f"race.{round_}"
        got: list[str] = []
        barrier = threading.Barrier(8)

        def call(i: int) -> None:
            barrier.wait()
            got.append(backend.registry_get_or_create(chain, f"u{round_}-{i}"))

        workers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        winner = got[0]
        assert got == [winner] * 8
        assert backend.registry_get_uuid(chain) == winner and backend.registry_get_chain(winner) == chain
        losers = [f"u{round_}-{i}" for i in range(8) if f"u{round_}-{i}" != winner]
        assert all(backend.registry_get_chain(u) is None for u in losers)
    assert len(backend.registry_list_all()) == 5


def test_a_half_done_remapping_is_repaired_on_read(backend: RedisClusterBackend, shared_cluster: LocalCluster) -> None:
    """registry_set writes the chain key (the authority) first: a writer that stopped before
    removing the stale reverse entry leaves uuid:{old} -> chain, which readers do not believe."""
    backend.registry_set("c.moved", "old")
    admin = shared_cluster.client()
    # The state a registry_set("c.moved", "new") leaves when it stops right after its first step.
    admin.set(backend.keys.chain("c.moved"), "new")
    assert backend.registry_get_uuid("c.moved") == "new"
    assert backend.registry_get_chain("old") is None  # not confirmed by the chain key
    assert admin.get(backend.keys.uuid("old")) is None  # and removed on the way
    # get_or_create writes the winner's missing reverse entry (its creator stopped before it).
    assert backend.registry_get_or_create("c.moved", "other") == "new"
    assert backend.registry_get_chain("new") == "c.moved"
    assert backend.registry_list_all() == {"new": "c.moved"}


def test_a_deleted_thread_recreated_meanwhile_stays_listed(backend: RedisClusterBackend) -> None:
    backend.buffer_append("again", b"x")
    assert backend.buffer_delete_thread("again") is True
    backend.buffer_append("again", b"y")
    assert backend.buffer_list_threads() == ["again"] and backend.buffer_get_thread("again") == [b"y"]


def test_the_function_library_is_used_where_every_master_has_it(shared_cluster: LocalCluster) -> None:
    lib = library()
    for m in shared_cluster.masters():
        m.client().execute_command("FUNCTION", "LOAD", "REPLACE", lib.text)
    b = _make(shared_cluster.url)
    try:
        buffer = ContextBuffer(b)
        slot = buffer.append("f-thread", {"n": 1}, "a", "b")
        b.registry_set("f.chain", "f-thread")
        assert b.script_mechanism == "fcall"
        assert b.registry_get_or_create("f.chain", "x") == "f-thread"
        assert buffer.get_thread_slots("f-thread") == [slot]
    finally:
        b.buffer_clear()
        b.registry_clear()
        b.close()
        for m in shared_cluster.masters():
            m.client().execute_command("FUNCTION", "DELETE", lib.name)


def _commands(nodes: list[Any]) -> set[str]:
    seen: set[str] = set()
    for n in nodes:
        for name, stats in n.client().info("commandstats").items():
            if int(stats["calls"]) - int(stats.get("rejected_calls", 0)) > 0:
                seen.add(name.removeprefix("cmdstat_"))
    return seen


def test_the_commands_sent_are_the_contract(shared_cluster: LocalCluster) -> None:
    """A tenant's ACL user on a cluster needs LIBRARY_COMMANDS plus CLUSTER_COMMANDS: nothing else is
    sent by a cluster backend (the operator grants exactly these on every node)."""
    nodes = shared_cluster.masters()  # replicas count the replication stream (REPLCONF, PEXPIREAT)
    for n in nodes:
        n.client().config_resetstat()
    b = _make(shared_cluster.url, redis_wait_replicas=1)
    try:
        buffer = ContextBuffer(b)
        for i in range(3):
            buffer.append(f"cmd-{i}", {"n": i}, "a", "b")
        b.registry_set("cmd.c", "cmd-0")
        b.registry_get_or_create("cmd.d", "cmd-1")
        b.registry_get_chain("cmd-0")
        b.registry_delete("cmd-1")
        b.temp_put_many([("k1", b"1"), ("k2", b"2")])
        b.temp_get_many(["k1", "k2"])
        b.temp_take("k1", "k2")
        b.buffer_list_threads()
        b.registry_list_all()
        b.info()
        b.ping()
        b.buffer_delete_thread("cmd-2")
        b.buffer_clear()
        b.registry_clear()
    finally:
        b.close()
    # The test's own admin clients (a plain redis-py client says HELLO), and the replicas'
    # acknowledgements to their masters.
    sent = _commands(nodes) - {"config|resetstat", "info", "hello", "replconf"}
    allowed = contract.LIBRARY_COMMANDS | contract.EVAL_COMMANDS | contract.CLUSTER_COMMANDS
    assert sent <= allowed, sent - allowed
    assert {"cluster|slots", "pexpire", "wait"} <= sent


def test_wait_replicas_on_sentinel_and_on_the_cluster(shared_cluster: LocalCluster,
                                                       shared_sentinel: LocalSentinel) -> None:
    for url in (shared_cluster.url, shared_sentinel.url):
        b = _make(url, redis_wait_replicas=1)
        try:
            assert ContextBuffer(b).append("w", {"n": 1}, "a", "b").index == 0
        finally:
            b.buffer_clear()
            b.close()
    # More replicas than there are: the write is on the master, but the caller is told it is not
    # acknowledged by enough replicas (after the retries, as BackendUnavailable naming WAIT).
    b = _make(shared_sentinel.url, redis_wait_replicas=2, retries=0, socket_timeout=0.2)
    try:
        from xml_pipeline.errors import BackendUnavailable
        # 1 of 2, or 0 of 2 where the one replica did not answer within the 0.1 s WAIT on a busy machine.
        with pytest.raises(BackendUnavailable, match="WAIT: [01] of 2 replica"):
            b.registry_set("w.c", "w")
    finally:
        b.close()
        # Cleaned up without WAIT: with 2 replicas asked of a set that has 1, the clear's own write
        # would be refused the same way.
        cleaner = RedisBackend(dataclasses.replace(b.config, redis_wait_replicas=0))
        cleaner.registry_clear()
        cleaner.close()


def test_sentinel_mode_reaches_the_master_the_sentinels_name(shared_sentinel: LocalSentinel) -> None:
    b = _make(shared_sentinel.url)
    try:
        assert type(b) is RedisBackend and b.pipe_capable()
        assert b.connection_kwargs()["port"] == shared_sentinel.current_master().port
        b.buffer_append("s", b"x")
        master = shared_sentinel.current_master()
        assert master.client().llen(f"{b.prefix}buffer:{{s}}") == 1
    finally:
        b.buffer_clear()
        b.close()


def test_a_cluster_nobody_answers_is_backend_unavailable() -> None:
    from redis_server import free_port

    from xml_pipeline.errors import BackendUnavailable
    with pytest.raises(BackendUnavailable, match="unavailable"):
        # No retries: the default budget (about 7 s) is for failovers, not for a cluster that is not there.
        _make(f"redis+cluster://127.0.0.1:{free_port()}", connect_timeout=0.2, retries=0).buffer_get_thread("t")


def test_reindex_rebuilds_the_buckets_from_every_master(backend: RedisClusterBackend,
                                                        shared_cluster: LocalCluster) -> None:
    for i in range(20):
        backend.buffer_append(f"re-{i}", b"x")
    backend.registry_set("re.chain", "re-0")
    admin = shared_cluster.client()
    for bucket in backend.keys.buckets():
        admin.delete(bucket)
    assert backend.buffer_list_threads() == [] and backend.registry_list_all() == {}
    assert backend.reindex() == {"threads": 20, "chains": 1}
    assert backend.buffer_list_threads() == sorted(f"re-{i}" for i in range(20))
    assert backend.registry_list_all() == {"re-0": "re.chain"}
    assert all(0 < admin.pttl(b) <= 600_000 + 75_000 for b in backend.keys.buckets() if admin.exists(b))


def test_the_cli_reports_on_a_cluster(shared_cluster: LocalCluster) -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", "backend", "info"],
                         env={"XP_BACKEND_TYPE": "redis", "XP_REDIS_URL": shared_cluster.url,
                              "XP_REDIS_PREFIX": f"cli{secrets.token_hex(3)}:", "XP_SIGNING_KEY": SIGNING_KEY,
                              "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert (info["mode"], info["masters"], info["buffer_threads"]) == ("cluster", "3", "0")
