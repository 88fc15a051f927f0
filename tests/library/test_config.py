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


# -------------------------------------------------------------------------------- hostile values
# Each of these once hung, crashed with a traceback deep in redis-py, or was accepted and meant
# something else than it said.
@pytest.mark.parametrize("field,value", [
    ("retries", 10 ** 20), ("retries", -1), ("retries", 101),
    ("max_connections", 100_000_000), ("max_connections", 0),
    ("health_check_interval", 10 ** 9),
])
def test_integer_settings_are_bounded(field: str, value: int) -> None:
    raises_config_error(lambda: BackendConfig(**{field: value}), f"backend.{field}", "must be an integer from",
                        "allowed: ")


@pytest.mark.parametrize("field", ["socket_timeout", "connect_timeout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0, 1e9])
def test_timeouts_must_be_finite_and_bounded(field: str, value: float) -> None:
    raises_config_error(lambda: BackendConfig(**{field: value}), f"backend.{field}", "finite number of seconds",
                        "0.001..3600")


def test_timeouts_from_yaml_nan(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("backend:\n  type: redis\n  socket_timeout: .nan\n  connect_timeout: .inf\n")
    raises_config_error(lambda: BackendConfig.from_yaml(path), "backend.socket_timeout", "nan")


@pytest.mark.parametrize("url,fragment", [
    ("redis://localhost:6379/?socket_timeout=abc", "query parameters ('socket_timeout')"),
    ("redis://localhost:6379/0?max_connections=100000000", "query parameters"),
    ("redis://localhost/abc", "'/abc', not a database number"),
    ("redis://localhost/0/1", "not a database number"),
    ("redis://localhost/٣", "not a database number"),  # Arabic-Indic digit: int() would read 3
])
def test_redis_url_options_and_database(url: str, fragment: str) -> None:
    raises_config_error(lambda: BackendConfig(redis_url=url), "backend.redis_url", fragment, "allowed: ")


@pytest.mark.parametrize("url", ["redis://localhost", "redis://localhost/", "redis://localhost:6379/15",
                                 "rediss://u:p@host:6380/0", "unix:///run/redis.sock"])
def test_good_redis_urls(url: str) -> None:
    assert BackendConfig(redis_url=url).redis_url == url


@pytest.mark.parametrize("key,fragment", [
    (32, "must be a string, got int"),
    ([32], "key 1 must be a string, got int"),  # bytes(32) would be 32 zero bytes
    (["a-long-enough-signing-key", 7], "key 2 must be a string, got int"),
    (",,,", "key 1 of 4 is empty"),
    ("a-long-enough-signing-key,", "key 2 of 2 is empty"),
    ("", "is empty"),
    ({"k": "v"}, "must be a string, got dict"),
])
def test_signing_key_shapes(key: object, fragment: str) -> None:
    raises_config_error(lambda: BackendConfig(signing_key=key), "backend.signing_key", fragment,  # type: ignore[arg-type]
                        "16 or more characters")


def test_signing_key_commas_only_in_the_environment() -> None:
    raises_config_error(lambda: BackendConfig.from_env({"XP_SIGNING_KEY": ",,,"}), "XP_SIGNING_KEY", "empty")


def test_recursive_signing_key_in_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("backend:\n  signing_key: &k [*k]\n")
    raises_config_error(lambda: BackendConfig.from_yaml(path), "organism.yaml", "alias inside its own anchor")


@pytest.mark.parametrize("raw", ["٣٠", "３０", " 30", "30 ", "+30", "3_0"])
def test_ttl_in_the_environment_is_ascii_digits(raw: str) -> None:
    raises_config_error(lambda: BackendConfig.from_env({"XP_REDIS_TTL": raw}), "XP_REDIS_TTL", "ASCII digits")


def test_ttl_string_in_yaml_is_ascii_digits() -> None:
    assert BackendConfig.from_dict({"redis_ttl": "30"}).redis_ttl == 30
    raises_config_error(lambda: BackendConfig.from_dict({"redis_ttl": "٣٠"}), "backend.redis_ttl", "'٣٠'")


@pytest.mark.parametrize("prefix", ["xp:\n", "xp:a:\n", "\nxp:"])
def test_prefix_with_a_newline(prefix: str) -> None:
    raises_config_error(lambda: BackendConfig(redis_prefix=prefix), "backend.redis_prefix", "not a valid prefix")
    raises_config_error(lambda: BackendConfig.from_env({"XP_REDIS_PREFIX": prefix}), "XP_REDIS_PREFIX")


def test_xp_config_directory_symlink_loop_and_size(tmp_path: Path) -> None:
    raises_config_error(lambda: BackendConfig.from_env({"XP_CONFIG": str(tmp_path)}), "XP_CONFIG", "is a directory")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    raises_config_error(lambda: BackendConfig.from_env({"XP_CONFIG": str(tmp_path / "a")}), "XP_CONFIG",
                        "cannot read", "symbolic links")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1024 * 1024) + "\n")
    raises_config_error(lambda: BackendConfig.from_env({"XP_CONFIG": str(big)}), "XP_CONFIG", "larger than")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"backend:\n  type: \xff\n")
    raises_config_error(lambda: BackendConfig.from_env({"XP_CONFIG": str(binary)}), "XP_CONFIG", "not UTF-8")
