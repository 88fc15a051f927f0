"""xml_pipeline.contract (the library/operator contract module): the values the library and the operator share, and the library's side of
them (the environment it reads, XP_ROLE, the key layout its Lua uses)."""
from __future__ import annotations

import dataclasses
import re

import pytest

from xml_pipeline import contract
from xml_pipeline.cli import main
from xml_pipeline.errors import ConfigError
from xml_pipeline.memory import redis_scripts
from xml_pipeline.memory.config import BackendConfig
from xml_pipeline.memory.keys import RedisKeys, validate_prefix
from xml_pipeline.message_bus import streams


def test_backend_env_names_backend_config_fields_and_is_read() -> None:
    fields = {f.name for f in dataclasses.fields(BackendConfig)}
    assert set(contract.BACKEND_ENV.values()) <= fields
    assert all(name.startswith("XP_") for name in contract.ENV_NAMES)
    with pytest.raises(TypeError):
        contract.BACKEND_ENV["XP_OTHER"] = "x"  # type: ignore[index]
    env = {contract.ENV_BACKEND_TYPE: "redis", contract.ENV_REDIS_URL: "redis://h:1/0",
           contract.ENV_REDIS_USERNAME: "u", contract.ENV_REDIS_PASSWORD: "p",
           contract.ENV_REDIS_PREFIX: "xp:a.b:", contract.ENV_REDIS_TTL: "77", contract.ENV_SIGNING_KEY: "k" * 32}
    config = BackendConfig.from_env(env)
    assert (config.backend_type, config.redis_url, config.redis_username, config.redis_password,
            config.redis_prefix, config.redis_ttl, config.signing_key) == \
        ("redis", "redis://h:1/0", "u", "p", "xp:a.b:", 77, "k" * 32)


def test_default_prefix_is_valid_and_unique() -> None:
    assert contract.default_prefix("team-a", "orders") == "xp:team-a.orders:"
    assert validate_prefix(contract.default_prefix("team-a", "orders"))
    assert contract.default_prefix("team-a", "orders").startswith(contract.DEFAULT_PREFIX_SPACE)
    assert contract.default_prefix("a", "b-c") != contract.default_prefix("a-b", "c")


def test_acl_username_and_password_hash() -> None:
    assert contract.acl_username("team-a", "orders") == "xp-team-a.orders"
    # Redis stores SHA-256 hex of the password (ACL SETUSER #<hash>).
    assert contract.password_hash("secret") == "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"


def test_tenant_optional_fields_are_keyword_only() -> None:
    t = contract.Tenant("ns", "n", "xp:ns.n:", created="2026-01-01T00:00:00Z", username="xp-ns.n")
    assert t.ref == "ns/n" and t.order == ("2026-01-01T00:00:00Z", "ns", "n") and t.uid == ""
    with pytest.raises(TypeError):
        contract.Tenant("ns", "n", "xp:ns.n:", "2026-01-01T00:00:00Z")  # type: ignore[misc]


def test_key_layout_matches_the_contract_and_the_lua() -> None:
    keys = RedisKeys("xp:a.b:")
    assert keys.index() == "xp:a.b:" + contract.INDEX_KEY
    assert contract.INDEX_KEY.split(":")[0] in contract.KEY_SPACES
    assert keys.buffer("t").startswith("xp:a.b:" + contract.BUFFER_SPACE + ":")
    # Every key space the Lua scripts build after the prefix is one of the contract's.
    sources = [s.source for s in (*redis_scripts.ALL, *streams.SCRIPTS)]
    spaces = {m for src in sources for m in re.findall(r"'([a-z]+):[{']", src)} - {"t", "c"}
    assert spaces and spaces <= contract.KEY_SPACES, spaces
    # The append script cuts the thread id out of KEYS[1] = prefix .. "buffer:{" .. id .. "}".
    offset = len(contract.BUFFER_SPACE + ":{") + 1
    assert f"#ARGV[5] + {offset}, -2" in redis_scripts.APPEND.source


def test_check_role() -> None:
    assert contract.check_role("pump", {}) is None
    assert contract.check_role("pump", {contract.ENV_ROLE: "pump"}) == "pump"
    assert contract.check_role("healthcheck", {contract.ENV_ROLE: "worker"}) == "worker"
    with pytest.raises(ConfigError) as e:
        contract.check_role("pump", {contract.ENV_ROLE: "leader"})
    assert e.value.field == contract.ENV_ROLE and "'pump', 'worker'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        contract.check_role("worker", {contract.ENV_ROLE: "pump"})
    assert e.value.field == contract.ENV_ROLE and "xml-pipeline worker" in str(e.value)


@pytest.mark.parametrize("command,role", [("worker", "pump"), ("pump", "worker"), ("pump", "bogus")])
def test_a_pod_running_the_wrong_role_refuses_to_start(command: str, role: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(contract.ENV_ROLE, role)
    monkeypatch.setenv(contract.ENV_CONFIG, "/nonexistent/organism.yaml")
    assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and contract.ENV_ROLE in err and "Traceback" not in err, err
