"""Bad configuration gets a ConfigError that names the field and the allowed values; good
configuration from the constructor, organism.yaml and the environment builds the right backend."""
from __future__ import annotations

from pathlib import Path

import pytest

from xml_pipeline.errors import ConfigError
from xml_pipeline.memory import BackendConfig, InMemoryBackend, ManagerBackend, get_shared_backend


def raises_config_error(fn: object, field: str, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn()  # type: ignore[operator]
    error = info.value
    assert error.field == field, str(error)
    assert isinstance(error, ValueError)
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in {str(error)!r}"
    return error


def test_unknown_backend_type() -> None:
    raises_config_error(lambda: BackendConfig(backend_type="mongo"), "backend.type",
                        "'mongo'", "'memory', 'manager', 'redis'")  # type: ignore[arg-type]
    raises_config_error(lambda: BackendConfig.from_dict({"type": "postgres"}), "backend.type", "allowed")


@pytest.mark.parametrize("ttl", [-1, -86400, 1.5, "soon", True])
def test_bad_ttl(ttl: object) -> None:
    raises_config_error(lambda: BackendConfig(backend_type="redis", redis_ttl=ttl), "backend.redis_ttl",
                        "0 (never expire) or a positive integer")  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["http://localhost:6379", "redis://localhost:99999", "redis://",
                                 "localhost:6379", "", "unix://"])
def test_malformed_url(url: str) -> None:
    raises_config_error(lambda: BackendConfig(backend_type="redis", redis_url=url), "backend.redis_url",
                        "redis://host[:port][/db]")


def test_malformed_url_never_shows_the_password() -> None:
    error = raises_config_error(lambda: BackendConfig(redis_url="redis://u:hunter2-secret@host:99999"),
                                "backend.redis_url")
    assert "hunter2-secret" not in str(error) and "***" in str(error)


@pytest.mark.parametrize("prefix", ["xp", "xp:buffer:", "a*:", "x y:", "", "{t}:"])
def test_bad_prefix(prefix: str) -> None:
    raises_config_error(lambda: BackendConfig(redis_prefix=prefix), "backend.redis_prefix",
                        "each followed by ':'")


def test_missing_yaml_section(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("name: demo\nlisteners: []\n")
    raises_config_error(lambda: BackendConfig.from_yaml(path), "backend", "section missing",
                        "memory | manager | redis")


def test_unknown_yaml_key_names_the_file_and_the_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("backend:\n  type: redis\n  redis_tll: 60\n")
    error = raises_config_error(lambda: BackendConfig.from_yaml(path), "backend.redis_tll",
                                "unknown key", "'redis_ttl'", "'type'")
    assert error.source == str(path)


def test_bad_value_in_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("backend:\n  type: redis\n  redis_ttl: -5\n")
    error = raises_config_error(lambda: BackendConfig.from_yaml(path), "backend.redis_ttl")
    assert str(path) in str(error)


def test_environment_errors_name_the_variable() -> None:
    raises_config_error(lambda: BackendConfig.from_env({"XP_REDIS_TTL": "a day"}), "XP_REDIS_TTL")
    raises_config_error(lambda: BackendConfig.from_env({"XP_BACKEND_TYPE": "etcd"}), "XP_BACKEND_TYPE",
                        "'memory', 'manager', 'redis'")
    raises_config_error(lambda: BackendConfig.from_env({"XP_SIGNING_KEY": "short"}), "XP_SIGNING_KEY", "16")


def test_factory_refuses_what_is_not_a_config() -> None:
    raises_config_error(lambda: get_shared_backend("redis"), "config", "BackendConfig")  # type: ignore[arg-type]


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("backend:\n  type: redis\n  redis_prefix: 'file:'\n  redis_ttl: 60\n")
    config = BackendConfig.from_env({"XP_CONFIG": str(path), "XP_REDIS_TTL": "120",
                                     "XP_REDIS_URL": "redis://cache:6380/1"})
    assert (config.backend_type, config.redis_prefix, config.redis_ttl, config.redis_url) == \
        ("redis", "file:", 120, "redis://cache:6380/1")


def test_factory_builds_what_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("XP_CONFIG", "XP_BACKEND_TYPE", "XP_REDIS_TTL"):
        monkeypatch.delenv(var, raising=False)
    with get_shared_backend() as backend:
        assert isinstance(backend, InMemoryBackend)
    monkeypatch.setenv("XP_BACKEND_TYPE", "manager")
    monkeypatch.setenv("XP_REDIS_TTL", "77")
    with get_shared_backend() as backend:
        assert isinstance(backend, ManagerBackend) and backend.ttl == 77
    with get_shared_backend({"type": "memory", "redis_ttl": 5}) as backend:
        assert isinstance(backend, InMemoryBackend) and backend.ttl == 5
