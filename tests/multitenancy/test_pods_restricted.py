"""A pump and a worker process (`xml-pipeline pump` / `worker`, as the pods run them) logged in as an
organism's restricted ACL user: the distributed mode (streams, consumer groups, heartbeat script)
works end to end, and Redis's ACL LOG records no refused command."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.contract import STREAM_COMMANDS
from xml_pipeline.message_bus.ingress import send_message
from xml_pipeline.message_bus.message import Message
from xml_pipeline_operator.tenancy import acl

from .conftest import Org, stop_gracefully

ORGANISM_YAML = """\
organism:
  name: restricted
backend:
  type: redis
process_pool:
  workers: 1
listeners:
  - name: greeter
    handler: "xml_pipeline.examples.greeter:handle"
  - name: primes
    handler: "xml_pipeline.examples.cpu:count_primes"
    cpu_bound: true
"""
CLI = str(Path(sys.executable).with_name("xml-pipeline"))


def acl_denials(admin: redis.Redis, username: str) -> list[dict[str, object]]:
    entries = admin.execute_command("ACL", "LOG", "128")
    out = []
    for e in entries:
        fields = e if isinstance(e, dict) else {e[i]: e[i + 1] for i in range(0, len(e), 2)}
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        user = fields.get("username")
        if (user.decode() if isinstance(user, bytes) else user) == username:
            out.append(fields)
    return out


def test_stream_commands_are_granted() -> None:
    granted = set(acl.granted_commands())
    for cmd in STREAM_COMMANDS:
        # Containers (XGROUP, XINFO) are granted subcommand by subcommand.
        assert cmd in granted or any(g.startswith(f"{cmd}|") for g in granted), cmd


@pytest.mark.timeout(90)
def test_pump_and_worker_run_with_restricted_user(make_org: Callable[..., Org], admin: redis.Redis,
                                                  tmp_path: Path) -> None:
    if not Path(CLI).exists():
        pytest.skip("the xml-pipeline console script is not installed in this environment")
    org = make_org("pods")
    config = tmp_path / "organism.yaml"
    config.write_text(ORGANISM_YAML)
    key = secrets.token_hex(16)
    env = {**os.environ, "XP_ORGANISM": "restricted", "XP_CONFIG": str(config), "XP_BACKEND_TYPE": "redis",
           "XP_REDIS_URL": org.server.url, "XP_REDIS_USERNAME": org.username, "XP_REDIS_PASSWORD": org.password,
           "XP_REDIS_PREFIX": org.prefix, "XP_REDIS_TTL": "600", "XP_SIGNING_KEY": key}
    admin.execute_command("ACL", "LOG", "RESET")
    procs = {
        role: subprocess.Popen([CLI, role, "--heartbeat-file", str(tmp_path / f"{role}.hb")],
                               env={**env, "XP_ROLE": role}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for role in ("pump", "worker")
    }
    try:
        cfg = BackendConfig(backend_type="redis", redis_url=org.server.url, redis_prefix=org.prefix,
                            redis_username=org.username, redis_password=org.password, redis_ttl=600,
                            signing_key=key)
        with RedisBackend(cfg) as backend:
            reply = send_message(backend, Message(sender="console", to="greeter",
                                                  payload='<greet name="Ada" lucky="100"/>'), wait=45)
        assert reply is not None, "no reply from the pump within 45 s"
        # greeter (in the pump) called primes (in the worker, through the task stream) and answered.
        assert "25 primes below 100" in reply.text(), reply.payload
    finally:
        outputs = dict(zip(procs, stop_gracefully(procs.values())))
    for role, (code, err) in outputs.items():
        assert "NOPERM" not in err and "no permissions" not in err.lower(), f"{role}: {err[-2000:]}"
        assert code == 0, f"{role} exited {code}: {err[-2000:]}"
    assert acl_denials(admin, org.username) == []
    # Everything the organism stored is under its prefix.
    own = list(admin.scan_iter(match=f"{org.prefix}*"))  # the organism's own user may not SCAN
    assert own and f"{org.prefix}meta:index".encode() in own
