"""Service Binding directories: BackendConfig.from_binding, discovery under SERVICE_BINDING_ROOT, and
get_shared_backend() picking the binding only when no XP_* configuration is set."""
from __future__ import annotations

from pathlib import Path

import pytest

from xml_pipeline.binding import discover
from xml_pipeline.errors import ConfigError
from xml_pipeline.memory import BackendConfig
from xml_pipeline.memory.factory import default_config

GOOD = {"type": "redis", "provider": "xml-pipeline", "host": "redis.platform.svc", "port": "6380",
        "url": "redis://redis.platform.svc:6380/0", "username": "xpc-team.shop", "password": "pw-" + "x" * 30,
        "prefix": "xp:team.shop:", "ttl": "600", "signing-key": "k" * 32, "tls": "false"}


def write(root: Path, name: str, values: dict[str, str]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for k, v in values.items():
        (d / k).write_text(v + "\n")  # kubelet writes the bytes as stored; a trailing newline is common by hand
    return d


def test_from_binding_reads_every_key(tmp_path: Path) -> None:
    cfg = BackendConfig.from_binding(write(tmp_path, "shop", GOOD))
    assert (cfg.backend_type, cfg.redis_url, cfg.redis_prefix, cfg.redis_ttl) == (
        "redis", "redis://redis.platform.svc:6380/0", "xp:team.shop:", 600)
    assert (cfg.redis_username, cfg.redis_password) == ("xpc-team.shop", GOOD["password"])
    assert cfg.signing_keys == (b"k" * 32,)


def test_host_and_port_make_the_url_and_tls_means_rediss(tmp_path: Path) -> None:
    values = {k: v for k, v in GOOD.items() if k != "url"} | {"tls": "true"}
    assert BackendConfig.from_binding(write(tmp_path, "b", values)).redis_url == "rediss://redis.platform.svc:6380/0"


@pytest.mark.parametrize(("change", "file", "text"), [
    ({"type": "postgresql"}, "type", "'postgresql'"),
    ({"provider": "bitnami"}, "provider", "'bitnami'"),
    ({"prefix": ""}, "prefix", "missing"),
    ({"prefix": "xp:*:"}, "prefix", "not a valid prefix"),
    ({"ttl": "ten"}, "ttl", "'ten'"),
    ({"tls": "yes"}, "tls", "'yes'"),
    ({"url": "redis://u:secret@host:6379/0"}, "url", "credentials"),
    ({"signing-key": "short"}, "signing-key", "16"),
])
def test_errors_name_the_file(tmp_path: Path, change: dict[str, str], file: str, text: str) -> None:
    d = write(tmp_path, "b", GOOD | change)
    with pytest.raises(ConfigError) as e:
        BackendConfig.from_binding(d)
    assert e.value.field == f"{d}/{file}" and text in str(e.value)
    assert "secret@" not in str(e.value) and GOOD["password"] not in str(e.value)


def test_missing_host_without_url_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="host: is missing"):
        BackendConfig.from_binding(write(tmp_path, "b", {k: v for k, v in GOOD.items() if k not in ("url", "host")}))
    with pytest.raises(ConfigError, match="not a directory"):
        BackendConfig.from_binding(tmp_path / "nowhere")


def test_discover_skips_other_bindings_and_refuses_two_of_ours(tmp_path: Path) -> None:
    write(tmp_path, "postgres", {"type": "postgresql", "provider": "bitnami", "host": "db"})
    write(tmp_path, "other-redis", GOOD | {"provider": "bitnami"})
    assert discover({}) is None
    assert discover({"SERVICE_BINDING_ROOT": str(tmp_path)}) is None
    shop = write(tmp_path, "shop", GOOD)
    assert discover({"SERVICE_BINDING_ROOT": str(tmp_path)}) == shop
    write(tmp_path, "orders", GOOD)
    with pytest.raises(ConfigError, match="2 xml-pipeline bindings .orders, shop."):
        discover({"SERVICE_BINDING_ROOT": str(tmp_path)})
    with pytest.raises(ConfigError, match="SERVICE_BINDING_ROOT"):
        discover({"SERVICE_BINDING_ROOT": str(tmp_path / "missing")})


def test_default_config_prefers_the_environment_then_the_binding(tmp_path: Path) -> None:
    write(tmp_path, "shop", GOOD)
    root = {"SERVICE_BINDING_ROOT": str(tmp_path)}
    assert default_config(root).redis_prefix == "xp:team.shop:"
    env = root | {"XP_BACKEND_TYPE": "redis", "XP_REDIS_PREFIX": "xp:mine:"}
    assert default_config(env).redis_prefix == "xp:mine:"  # any XP_* variable: the environment decides
    assert default_config({}).backend_type == "memory"


def test_get_shared_backend_without_configuration_uses_the_binding(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from xml_pipeline.memory.config import ENV_CONFIG_PATH, ENV_VARS
    from xml_pipeline.memory.factory import get_shared_backend, reset_shared_backend
    for var in (*ENV_VARS, ENV_CONFIG_PATH):
        monkeypatch.delenv(var, raising=False)
    write(tmp_path, "shop", GOOD)
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path))
    reset_shared_backend()
    try:
        backend = get_shared_backend()  # connects lazily: nothing is reached here
        assert backend.config.redis_prefix == "xp:team.shop:" and backend.config.redis_username == "xpc-team.shop"
    finally:
        reset_shared_backend()
