"""organism.yaml loader: every mistake names its field and the YAML line."""
from __future__ import annotations

from pathlib import Path

import pytest

from xml_pipeline.errors import ConfigError
from xml_pipeline.organism import load_organism, parse_organism

REPO = Path(__file__).parent.parent.parent

GOOD = """\
organism:
  name: demo
backend:
  type: memory
process_pool:
  workers: 2
listeners:
  - name: greeter
    handler: "xml_pipeline.examples.greeter:handle"
  - name: primes
    handler: "xml_pipeline.examples.cpu:count_primes"
    cpu_bound: true
    description: burns CPU
"""


def _err(text: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_organism(text, source="org.yaml", environ={}, **kw)  # type: ignore[arg-type]
    return e.value


def test_example_organism_loads() -> None:
    org = load_organism(REPO / "examples/demo/organism.yaml", environ={})
    assert org.name == "demo"
    assert org.backend.backend_type == "manager"
    assert [(ls.name, ls.cpu_bound) for ls in org.listeners] == [("greeter", False), ("primes", True)]
    assert all(callable(ls.func) for ls in org.listeners)


def test_good_organism_and_defaults() -> None:
    org = parse_organism(GOOD, environ={})
    assert org.process_pool.workers == 2 and org.process_pool.start_method == "spawn"
    assert org.listener("primes").description == "burns CPU"  # type: ignore[union-attr]
    assert org.has_cpu_bound


def test_unknown_top_level_key_names_field_and_line() -> None:
    e = _err(GOOD + "listners: []\n")
    assert e.field == "listners" and e.line == 14
    assert "unknown key" in str(e) and "'listeners'" in str(e) and "org.yaml:14" in str(e)


def test_unknown_listener_key() -> None:
    e = _err(GOOD.replace("    cpu_bound: true", "    cpu_bond: true"))
    assert e.field == "listeners[1].cpu_bond" and e.line == 12
    assert "'cpu_bound'" in str(e)


def test_missing_handler() -> None:
    e = _err(GOOD.replace('    handler: "xml_pipeline.examples.greeter:handle"\n', ""))
    assert e.field == "listeners[0].handler" and "missing" in str(e) and e.line == 8


def test_duplicate_listener_names() -> None:
    e = _err(GOOD.replace("name: primes", "name: greeter"))
    assert e.field == "listeners[1].name" and e.line == 10
    assert "duplicate listener name 'greeter'" in str(e)


def test_handler_that_does_not_import() -> None:
    e = _err(GOOD.replace("xml_pipeline.examples.cpu:count_primes", "no_such_package.mod:fn"))
    assert e.field == "listeners[1].handler" and e.line == 11
    assert "cannot import 'no_such_package.mod:fn'" in str(e) and "ModuleNotFoundError" in str(e)
    e = _err(GOOD.replace("xml_pipeline.examples.cpu:count_primes", "xml_pipeline.examples.cpu:nope"))
    assert "AttributeError" in str(e) and e.line == 11


def test_handler_reference_syntax() -> None:
    e = _err(GOOD.replace("xml_pipeline.examples.cpu:count_primes", "not a reference"))
    assert e.field == "listeners[1].handler" and "package.module:function" in str(e)


def test_listener_name_rules() -> None:
    e = _err(GOOD.replace("name: primes", "name: my.primes"))
    assert e.field == "listeners[1].name" and "'.'" in str(e)


def test_bad_values() -> None:
    assert _err(GOOD.replace("workers: 2", "workers: 0")).field == "process_pool.workers"
    e = _err(GOOD.replace("workers: 2", "start_method: fork"))
    assert e.field == "process_pool.start_method" and "'spawn'" in str(e) and e.line == 6
    assert _err(GOOD.replace("cpu_bound: true", "cpu_bound: yes please")).field == "listeners[1].cpu_bound"
    e = _err(GOOD.replace("workers: 2", "heartbeat_seconds: 40"))
    assert e.field == "process_pool.heartbeat_seconds" and "claim_idle_seconds" in str(e)
    assert _err(GOOD.split("listeners:")[0] + "listeners: []\n").field == "listeners"
    assert _err(GOOD.split("listeners:")[0]).field == "listeners"


def test_backend_errors_carry_the_line() -> None:
    e = _err(GOOD.replace("type: memory", "type: postgres"))
    assert e.field == "backend.type" and e.line == 4 and "'redis'" in str(e)
    e = _err(GOOD.replace("type: memory", "type: memory\n  redis_tll: 5"))
    assert e.field == "backend.redis_tll" and e.line == 5


def test_duplicate_yaml_key_and_bad_yaml() -> None:
    e = _err(GOOD.replace("  workers: 2", "  workers: 2\n  workers: 3"))
    assert e.field == "process_pool.workers" and "duplicate key" in str(e) and e.line == 7
    e = _err("listeners: [\n")
    assert "not valid YAML" in str(e) and e.line is not None


def test_organism_name() -> None:
    assert _err(GOOD.replace("  name: demo\n", "")).field == "organism"  # `organism:` with no value
    assert _err(GOOD.replace("organism:\n  name: demo\n", "")).field == "organism"
    org = parse_organism(GOOD.replace("organism:\n  name: demo\n", ""), environ={"XP_ORGANISM": "from-env"})
    assert org.name == "from-env"
    assert parse_organism(GOOD.replace("organism:\n  name: demo", "organism: short"), environ={}).name == "short"
    assert _err(GOOD.replace("name: demo", "name: a.b")).field == "organism.name"


def test_environment_overrides_backend(tmp_path: Path) -> None:
    path = tmp_path / "org.yaml"
    path.write_text(GOOD)
    org = load_organism(path, environ={"XP_BACKEND_TYPE": "redis", "XP_REDIS_PREFIX": "env:",
                                       "XP_REDIS_URL": "redis://127.0.0.1:1/0", "XP_REDIS_TTL": "60"})
    assert (org.backend.backend_type, org.backend.redis_prefix, org.backend.redis_ttl) == ("redis", "env:", 60)
    with pytest.raises(ConfigError) as e:
        load_organism(path, environ={"XP_REDIS_TTL": "soon"})
    assert e.value.field == "XP_REDIS_TTL"
    with pytest.raises(ConfigError) as e:
        load_organism(path, environ={"XP_BACKEND_TYPE": "etcd"})
    assert e.value.field == "XP_BACKEND_TYPE"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_organism(tmp_path / "nope.yaml", environ={})
    assert "does not exist" in str(e.value)


def test_environment_rules_match_backend_config_from_env(tmp_path: Path) -> None:
    """The pod contract: the loader's backend equals BackendConfig.from_env() with XP_CONFIG set."""
    from xml_pipeline.memory import BackendConfig

    path = tmp_path / "org.yaml"
    path.write_text(GOOD.replace("type: memory", "type: redis\n  redis_prefix: 'file:'\n  redis_ttl: 100"))
    env = {"XP_CONFIG": str(path), "XP_REDIS_URL": "redis://10.0.0.1:6380/2", "XP_REDIS_TTL": "7",
           "XP_REDIS_USERNAME": "u", "XP_REDIS_PASSWORD": "p", "XP_SIGNING_KEY": "k" * 16 + ",l" + "m" * 16}
    assert load_organism(path, environ=env).backend == BackendConfig.from_env(env)


# -------------------------------------------------------------------------------- hostile files
LISTENER = '  - {name: greeter, handler: "xml_pipeline.examples.greeter:handle"}\n'
ALIAS_BOMB = ('organism: {name: bomb, description: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]}\n'
              + "".join(f"x{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
              + "listeners:\n" + LISTENER)


def test_alias_bomb_is_refused_quickly() -> None:
    assert len(ALIAS_BOMB) < 700  # a few hundred bytes standing for 9^9 values
    e = _err(ALIAS_BOMB)
    assert e.field == "organism.yaml" and "more than 100000 values" in str(e) and "allowed" in str(e)


def test_recursive_alias_is_refused() -> None:
    e = _err("organism: {name: r, description: &d [*d]}\nlisteners:\n" + LISTENER)
    assert e.field == "organism.yaml" and "alias inside its own anchor" in str(e) and e.line == 1


def test_deep_nesting_is_refused() -> None:
    e = _err("organism: r\nlisteners:\n" + LISTENER + "x: " + "[" * 100 + "]" * 100 + "\n")
    assert e.field == "organism.yaml" and "nested too deeply" in str(e) and "64" in str(e)
    e = _err("x: " + "[" * 1500 + "]" * 1500 + "\n")  # deeper than the YAML parser's recursion
    assert e.field == "organism.yaml" and "nested too deeply" in str(e)


def test_aliases_within_the_bounds_still_work() -> None:
    org = parse_organism('organism: {name: a, description: &d "shared"}\nlisteners:\n'
                         '  - {name: one, handler: "xml_pipeline.examples.greeter:handle", description: *d}\n',
                         environ={})
    assert org.listeners[0].description == "shared" == org.description


def test_too_many_listeners() -> None:
    text = "organism: many\nlisteners:\n" + "".join(
        f'  - {{name: l{i}, handler: "xml_pipeline.examples.greeter:handle"}}\n' for i in range(50_000))
    e = _err(text, resolve_handlers=False)
    assert e.field == "organism.yaml" or e.field == "listeners"  # the node bound or the listener bound
    text = "organism: many\nlisteners:\n" + "".join(
        f'  - {{name: l{i}, handler: "xml_pipeline.examples.greeter:handle"}}\n' for i in range(1025))
    e = _err(text, resolve_handlers=False)
    assert e.field == "listeners" and "1025 listeners" in str(e) and "1..1024" in str(e)


def test_file_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "organism.yaml"
    path.write_text("organism: big\n# " + "x" * (1024 * 1024) + "\nlisteners:\n" + LISTENER)
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_organism(path)


@pytest.mark.parametrize("key,value", [
    ("claim_idle_seconds", ".nan"), ("heartbeat_seconds", ".nan"), ("drain_seconds", ".inf"),
    ("claim_idle_seconds", "1e300"), ("workers", "100000000"), ("max_attempts", "100000000000000000000"),
])
def test_pool_numbers_are_finite_and_bounded(key: str, value: str) -> None:
    e = _err(f"organism: p\nprocess_pool: {{{key}: {value}}}\nlisteners:\n" + LISTENER)
    assert e.field == f"process_pool.{key}" and "allowed: " in str(e)


@pytest.mark.parametrize("field,text", [
    ("organism", 'organism: "demo\\n"\nlisteners:\n' + LISTENER),
    ("listeners[0].name", 'organism: d\nlisteners:\n  - {name: "greeter\\n", handler: "m:f"}\n'),
    ("listeners[0].handler", 'organism: d\nlisteners:\n  - {name: g, handler: "xml_pipeline.examples.greeter:handle\\n"}\n'),
])
def test_trailing_newline_in_names(field: str, text: str) -> None:
    assert _err(text, resolve_handlers=False).field == field


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_organism(tmp_path)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match="symbolic links"):
        load_organism(tmp_path / "a")
