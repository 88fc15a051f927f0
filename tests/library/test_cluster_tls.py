"""rediss+cluster:// and rediss+sentinel:// on real TLS-only sets (tests/redis_cluster.py with `tls=`:
every node listens on its TLS port alone; the cluster bus, replication and the sentinels' links are
TLS too; the first test checks that). The backend verifies every node against `redis_ca_cert`:

- the contract basics (append, read back byte-exact, registry, temp data) in both modes, and the
  pump's fast path (RedisPipe) on the TLS master a Sentinel set names;
- a wrong CA is one clear BackendUnavailable, not retried (the pool, the cluster client, a worker's
  own connection), and a one-line error in the CLI;
- a slot moved between TLS nodes, a Sentinel failover and a killed cluster master: the same
  backend object carries on over TLS.

The sets are started once per module (conftest `tls_cluster`, `tls_sentinel`); the tests that move
a slot or fail a master over come last.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_cluster import LocalCluster, LocalSentinel, wait_replicated
from redis_server import RedisServer, TLSFiles

from xml_pipeline.errors import BackendUnavailable
from xml_pipeline.memory import BackendConfig, ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_cluster import RedisClusterBackend
from xml_pipeline.memory.redis_pipe import RedisPipe

pytestmark = pytest.mark.cluster

SIGNING_KEY = "cluster-tls-tests-signing-key-0123456789"
MODES = ("cluster", "sentinel")
#: Every byte value, a zero run and a long tail: what a slot holds must come back unchanged.
PAYLOAD = bytes(range(256)) + b"\x00" * 64 + secrets.token_bytes(40_000)


def backend_on(url: str, ca: Path, **config: Any) -> Any:
    cfg: dict[str, Any] = dict(backend_type="redis", redis_url=url, redis_prefix=f"tls{secrets.token_hex(4)}:",
                               redis_ca_cert=str(ca), signing_key=SIGNING_KEY, redis_ttl=600,
                               socket_timeout=2.0, connect_timeout=1.0)
    cfg.update(config)
    return RedisBackend(BackendConfig(**cfg))


def data_nodes(request: pytest.FixtureRequest, mode: str) -> tuple[str, list[RedisServer]]:
    """(URL, the data node servers) of the module's TLS set of `mode`."""
    if mode == "cluster":
        cluster: LocalCluster = request.getfixturevalue("tls_cluster")
        return cluster.url, [n.server for n in cluster.nodes]
    local: LocalSentinel = request.getfixturevalue("tls_sentinel")
    return local.url, local.data_nodes()


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """Backends a test built, closed at teardown (their keys, under prefixes of their own, go with
    the module's sets)."""
    backends: list[Any] = []
    yield backends
    for b in backends:
        b.close()


def test_every_link_of_the_local_sets_is_tls(tls_cluster: LocalCluster, tls_sentinel: LocalSentinel) -> None:
    """What the fixtures claim: no node or sentinel has a plain port, so the cluster bus (state ok),
    replication (links up) and the sentinels' links (they see the replica and each other) work
    over TLS or not at all."""
    cluster_nodes = [n.server for n in tls_cluster.nodes]
    for node in cluster_nodes + tls_sentinel.data_nodes():
        config = node.client(decode_responses=True).config_get("port", "tls-port", "tls-replication", "tls-cluster")
        assert config == {"port": "0", "tls-port": str(node.port), "tls-replication": "yes",
                          "tls-cluster": "yes" if node in cluster_nodes else "no"}
    tls_cluster.wait_ok(timeout=5)
    for replica in [n.server for n in tls_cluster.replicas()] + tls_sentinel.replicas:
        assert replica.client().info("replication")["master_link_status"] == "up"
    for i, sentinel in enumerate(tls_sentinel.sentinels):
        with pytest.raises(redis.ConnectionError):
            redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
        state = tls_sentinel.sentinel_client(i).execute_command("SENTINEL", "MASTER", tls_sentinel.master_name)
        assert (int(state["num-slaves"]), int(state["num-other-sentinels"])) == (1, 2)


@pytest.mark.parametrize("mode", MODES)
def test_the_contract_basics_over_tls(mode: str, request: pytest.FixtureRequest, tls_files: TLSFiles,
                                      made: list[Any]) -> None:
    url, nodes = data_nodes(request, mode)
    assert url.startswith(f"rediss+{mode}://")
    # The nodes speak TLS only: whatever the backend reads below came over TLS.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=nodes[0].port, socket_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
    backend = backend_on(url, tls_files.ca)
    made.append(backend)
    assert isinstance(backend, RedisClusterBackend) == (mode == "cluster")

    thread = secrets.token_hex(16)
    slots = [backend.signer.sign(PAYLOAD + b"%d" % i) for i in range(3)]
    assert [backend.buffer_append(thread, s) for s in slots] == [0, 1, 2]
    assert backend.buffer_get_thread(thread) == slots  # byte-exact, signature and all
    assert backend.buffer_get_slot(thread, 1) == slots[1] and backend.buffer_thread_len(thread) == 3
    buffer, signed = ContextBuffer(backend), secrets.token_hex(16)  # slots signed for their place
    slot = buffer.append(signed, {"text": "über TLS", "n": 3}, "a", "b")
    assert slot.index == 0 and buffer.get_thread_slots(signed)[0].payload == {"text": "über TLS", "n": 3}

    backend.registry_set("root.a.b", thread)
    assert backend.registry_get_uuid("root.a.b") == thread and backend.registry_get_chain(thread) == "root.a.b"
    assert backend.registry_get_or_create("root.a.c", "u-first") == "u-first"
    assert backend.registry_get_or_create("root.a.c", "u-second") == "u-first"
    assert backend.registry_list_all() == {thread: "root.a.b", "u-first": "root.a.c"}

    keys = [secrets.token_hex(16) for _ in range(4)]
    backend.temp_put(keys[0], PAYLOAD)
    backend.temp_put_many([(k, k.encode()) for k in keys[1:]])
    assert backend.temp_get(keys[0]) == PAYLOAD
    assert backend.temp_get_many(keys[1:]) == [k.encode() for k in keys[1:]]
    assert backend.temp_take(keys[1], keys[2]) == keys[1].encode() and backend.temp_get(keys[2]) is None

    assert backend.buffer_list_threads() == sorted([thread, signed]) and backend.ping()
    assert backend.info()["buffer_threads"] == 2


async def test_the_fast_path_follows_the_tls_master_of_a_sentinel_set(tls_sentinel: LocalSentinel,
                                                                      tls_files: TLSFiles, made: list[Any]) -> None:
    backend = backend_on(tls_sentinel.url, tls_files.ca)
    made.append(backend)
    kw = backend.connection_kwargs()
    assert kw["tls"] is True and kw["ssl_ca_certs"] == str(tls_files.ca)
    assert kw["port"] == tls_sentinel.current_master().port and backend.pipe_capable()
    pipe = RedisPipe.for_backend(backend)
    assert pipe is not None
    try:
        backend.buffer_append(secrets.token_hex(16), backend.signer.sign(b"warm-up"))  # the script is known
        thread, n = secrets.token_hex(16), 20
        keys = [secrets.token_hex(16) for _ in range(n)]
        outcomes = await asyncio.gather(*(
            pipe.append_at(thread, b"slot %d" % i, i, max_slots=None, append_id=f"a{i}", items=[(keys[i], PAYLOAD)])
            for i in range(n)))
        assert sorted(o.position for o in outcomes) == list(range(n)) and {o.status for o in outcomes} == {"stored"}
        assert await pipe.take(keys[0]) == PAYLOAD
        assert backend.buffer_get_thread(thread) == [b"slot %d" % i for i in range(n)]
    finally:
        pipe.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_wrong_ca_is_one_clear_error_not_retried(mode: str, request: pytest.FixtureRequest, tls_files: TLSFiles,
                                                   made: list[Any]) -> None:
    url, _ = data_nodes(request, mode)
    backend = backend_on(url, tls_files.other_ca, retries=3)
    made.append(backend)
    for call in (lambda: backend.buffer_thread_len("t"), lambda: backend.buffer_append("t", b"x"),
                 lambda: backend.registry_get_uuid("c")):
        # A certificate that does not verify will not verify on the next attempt either: one attempt.
        with pytest.raises(BackendUnavailable, match="after 1 attempt.*certificate verify failed") as caught:
            call()
        assert url_host(backend) in str(caught.value) and "\n" not in str(caught.value)
    assert not backend.ping()
    backend.use_direct_connection()  # a worker's own connection (on Sentinel: asks the sentinels first)
    with pytest.raises(BackendUnavailable, match="after 1 attempt.*certificate verify failed"):
        backend.temp_get_many([secrets.token_hex(16)])


def url_host(backend: Any) -> str:
    """The first node of the backend's URL (the error names the URL)."""
    return str(backend.config.redis_url).split("//")[1].split(",")[0].split("/")[0]


@pytest.mark.parametrize("mode", MODES)
def test_the_cli_says_a_wrong_ca_in_one_line(mode: str, request: pytest.FixtureRequest, tls_files: TLSFiles,
                                             tmp_path: Path) -> None:
    url, _ = data_nodes(request, mode)
    config = tmp_path / "organism.yaml"
    config.write_text(f"organism: {{name: tls-{mode}}}\nbackend:\n  type: redis\n  redis_url: '{url}'\n"
                      f"  redis_prefix: 'tlscli{secrets.token_hex(3)}:'\n  redis_ca_cert: '{tls_files.other_ca}'\n"
                      "listeners: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XP_", "SSL_CERT"))}
    env["XP_SIGNING_KEY"] = SIGNING_KEY
    for action in ("info", "threads"):
        done = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", "backend", action, "--config", str(config)],
                              capture_output=True, text=True, env=env, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith("xml-pipeline backend: BackendUnavailable: ") and "certificate verify failed" in lines[0]
        assert "after 1 attempt" in lines[0] and "Traceback" not in done.stderr
    ping = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", "backend", "ping", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert ping.returncode == 1 and ping.stdout.startswith("unreachable: ") and "Traceback" not in ping.stderr


def _appended(backend: Any, thread: str, tag: bytes) -> list[bytes]:
    slots = [backend.signer.sign(tag + b" %d" % i) for i in range(5)]
    for s in slots:
        backend.buffer_append(thread, s)
    return slots


def _a_thread_on(url: str, tls_files: TLSFiles, made: list[Any]) -> tuple[Any, str, list[bytes]]:
    """(a backend on `url`, a thread, the five slots appended to it) before a fault."""
    backend = backend_on(url, tls_files.ca)
    made.append(backend)
    thread = secrets.token_hex(16)
    return backend, thread, _appended(backend, thread, b"before")


def test_a_slot_moved_between_tls_nodes_and_the_backend_follows(tls_cluster: LocalCluster, tls_files: TLSFiles,
                                                                 made: list[Any]) -> None:
    backend, thread, before = _a_thread_on(tls_cluster.url, tls_files, made)
    slot = int(backend.client.keyslot(backend.keys.buffer(thread)))
    owner = tls_cluster.owner_of(slot)
    masters = tls_cluster.masters()
    target = masters[(masters.index(owner) + 1) % len(masters)]
    assert tls_cluster.migrate_slot(slot, target) >= 2  # MIGRATE node to node, over TLS (tls-cluster)
    assert tls_cluster.owner_of(slot) is target
    after = _appended(backend, thread, b"after")  # MOVED followed, to the new owner's TLS port
    assert backend.buffer_get_thread(thread) == before + after


# -- failovers: last in the module (they leave the sets with one node fewer) ---------------------

def test_a_tls_sentinel_failover_and_the_same_backend_carries_on(tls_sentinel: LocalSentinel, tls_files: TLSFiles,
                                                                made: list[Any]) -> None:
    backend, thread, before = _a_thread_on(tls_sentinel.url, tls_files, made)
    backend.registry_set("root.failover", thread)
    old = tls_sentinel.current_master()
    wait_replicated(old, [r for r in tls_sentinel.data_nodes() if r is not old])
    new = tls_sentinel.failover(kill=True)
    assert new is not old
    after = _appended(backend, thread, b"after")  # the same object: it asks the sentinels (TLS) again
    assert backend.buffer_get_thread(thread) == before + after
    assert backend.registry_get_uuid("root.failover") == thread
    assert backend.connection_kwargs()["port"] == new.port


def test_a_killed_tls_cluster_master_and_the_same_backend_carries_on(tls_cluster: LocalCluster, tls_files: TLSFiles,
                                                                     made: list[Any]) -> None:
    backend, thread, before = _a_thread_on(tls_cluster.url, tls_files, made)
    slot = int(backend.client.keyslot(backend.keys.buffer(thread)))
    victim = tls_cluster.owner_of(slot)
    wait_replicated(victim.server, [n.server for n in tls_cluster.replicas_of(victim)])
    promoted = tls_cluster.kill_master_and_wait_failover(victim)
    assert tls_cluster.owner_of(slot) is promoted
    after = _appended(backend, thread, b"after")  # retried across the promotion, over TLS
    assert backend.buffer_get_thread(thread) == before + after
    assert len(backend.buffer_list_threads()) == 1
