"""The function library tenants FCALL: generated from the library's own scripts (single source),
versioned by its text, loaded idempotently by the operator, and free of loops a tenant could make
run forever."""
from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisServer

from xml_pipeline.memory import redis_cluster_scripts, redis_scripts
from xml_pipeline.memory.redis_functions import FunctionLibrary, library, mechanism_error
from xml_pipeline.message_bus import streams
from xml_pipeline_operator.tenancy import functions


def test_the_library_is_every_script_of_the_library() -> None:
    lib = library()
    scripts = (*redis_scripts.ALL, *redis_cluster_scripts.ALL, *streams.SCRIPTS)
    assert set(lib.functions) == {s.name for s in scripts}
    for s in scripts:
        # Each script's body is in the text unchanged (but for the Redis 6 replication call).
        assert s.source.replace("redis.replicate_commands()", "") in lib.text
        assert f"function_name='{lib.function(s)}'" in lib.text
    assert lib.text.startswith(f"#!lua name={lib.name}\n") and lib.name.endswith(lib.version)


def test_a_script_edit_changes_the_version() -> None:
    scripts = (*redis_scripts.ALL, *redis_cluster_scripts.ALL, *streams.SCRIPTS)
    edited = tuple(redis_scripts.LuaScript(s.name, s.numkeys, s.nargs, s.source + "\n-- edited")
                   if s.name == "append" else s for s in scripts)
    a, b = FunctionLibrary(scripts), FunctionLibrary(edited)
    assert a.version == library().version and b.version != a.version
    assert set(a.functions.values()).isdisjoint(b.functions.values())  # both can be loaded side by side
    with pytest.raises(ValueError, match="unique"):
        FunctionLibrary((scripts[0], scripts[0]))


def test_no_function_can_loop_without_bound() -> None:
    """A function that has written cannot be killed: ours have no while/repeat/goto, and every `for`
    runs over the call's own arguments or a bounded reply."""
    text = library().text
    assert not re.search(r"\b(while|repeat|goto)\b", text)
    # Bounded by: the call's arguments, SRANDMEMBER's count, the release script's XPENDING COUNT 1000,
    # the fields of one stream entry, or a literal list.
    bounded = ("#ARGV", "SRANDMEMBER", "ipairs(pending)", "#f", "ipairs({")
    for loop in re.findall(r"\bfor\b[^\n]*\bdo\b", text):
        assert any(b in loop for b in bounded), loop
    assert "redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])" in text  # what `pending` is


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.cleanup()


def test_ensure_library_loads_once_and_beside_other_versions(server: RedisServer) -> None:
    admin = server.client()
    older = FunctionLibrary(tuple(redis_scripts.LuaScript(s.name, s.numkeys, s.nargs, s.source + "\n-- v0")
                                  for s in library().scripts))
    functions.ensure_library(admin, older)
    assert functions.ensure_library(admin) is functions.LibraryState.LOADED
    assert functions.ensure_library(admin) is functions.LibraryState.PRESENT
    assert functions.library_loaded(admin, older) and functions.library_loaded(admin)
    admin.execute_command("FUNCTION", "FLUSH")
    assert not functions.library_loaded(admin)
    admin.close()


def test_mechanism_errors_are_told_from_script_errors(server: RedisServer) -> None:
    admin = server.client()
    with pytest.raises(redis.ResponseError) as missing:
        admin.execute_command("FCALL", "xp_nope_append", 0)
    assert mechanism_error(missing.value)
    admin.set("n", "x")
    with pytest.raises(redis.ResponseError) as failing:
        admin.execute_command("EVAL", "return redis.call('INCR', KEYS[1])", 1, "n")
    assert not mechanism_error(failing.value)
    admin.close()
