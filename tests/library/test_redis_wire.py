"""The wire of the library's own Redis connections (memory/redis_wire.py): hiredis reads every reply
kind however the bytes are split, error replies come back as the exceptions redis-py raises for
them, our packer writes exactly what redis-py's packer writes, one handshake list, and the TLS
settings turn into the SSLContext redis-py would use."""
from __future__ import annotations

import ssl

import pytest
import redis
from redis import exceptions as rx

from xml_pipeline.memory.redis_direct import DirectConnection
from xml_pipeline.memory.redis_wire import (
    MORE,
    error_reply,
    handshake,
    pack_args,
    pack_command,
    pack_commands,
    pack_head,
    reply_reader,
    tls_context,
    tls_supported,
)


def read_all(reader, parts: list[bytes]) -> list[object]:
    got = []
    for part in parts:
        reader.feed(part)
        while (reply := reader.gets()) is not MORE:
            got.append(reply)
    return got


def test_every_reply_kind_split_anywhere() -> None:
    wire = (b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*3\r\n:1\r\n$0\r\n\r\n*-1\r\n-NOSCRIPT No matching script\r\n"
            b"-WRONGTYPE Operation against a key\r\n*2\r\n-ERR inner\r\n:7\r\n:-1\r\n")
    for cut in range(1, len(wire)):
        got = read_all(reply_reader(), [wire[:cut], wire[cut:]])
        assert got[:5] == [b"OK", 42, b"hello", None, [1, b"", None]], cut
        assert type(got[5]) is rx.NoScriptError and str(got[5]) == "No matching script"
        assert type(got[6]) is rx.ResponseError and str(got[6]) == "WRONGTYPE Operation against a key"
        inner, seven = got[7]  # an error inside an array (an EXEC reply) is a value too
        assert type(inner) is rx.ResponseError and str(inner) == "inner" and seven == 7
        assert got[8] == -1 and len(got) == 9


def test_a_stream_that_is_not_resp_is_invalid_response() -> None:
    reader = reply_reader()
    reader.feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(rx.InvalidResponse):
        reader.gets()


@pytest.mark.parametrize(("text", "cls", "message"), [
    ("NOSCRIPT No matching script. Please use EVAL.", rx.NoScriptError, "No matching script. Please use EVAL."),
    ("NOPERM this user has no permissions to run the 'eval' command", rx.NoPermissionError,
     "this user has no permissions to run the 'eval' command"),
    ("WRONGPASS invalid username-password pair or user is disabled.", rx.AuthenticationError,
     "invalid username-password pair or user is disabled."),
    ("NOAUTH Authentication required.", rx.AuthenticationError, "Authentication required."),
    ("READONLY You can't write against a read only replica.", rx.ReadOnlyError,
     "You can't write against a read only replica."),
    ("LOADING Redis is loading the dataset in memory", rx.BusyLoadingError, "Redis is loading the dataset in memory"),
    ("ERR max number of clients reached", rx.ConnectionError, "max number of clients reached"),
    ("ERR invalid password", rx.AuthenticationError, "invalid password"),
    ("ERR Function not found", rx.ResponseError, "Function not found"),
    ("ERR unknown command 'FCALL', with args beginning with: ", rx.ResponseError,
     "unknown command 'FCALL', with args beginning with: "),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", rx.ResponseError,
     "WRONGTYPE Operation against a key holding the wrong kind of value"),
    ("CROSSSLOT Keys in request don't hash to the same slot", rx.ClusterCrossSlotError,
     "Keys in request don't hash to the same slot"),
    ("MOVED broken", rx.ResponseError, "MOVED broken"),  # malformed: still an error value, never a crash
])
def test_error_replies_are_the_exceptions_redis_py_raises(text: str, cls: type, message: str) -> None:
    err = error_reply(text)
    assert type(err) is cls and str(err) == message
    # The same through the reader, as a reply.
    reader = reply_reader()
    reader.feed(b"-" + text.encode() + b"\r\n")
    again = reader.gets()
    assert type(again) is cls and str(again) == message


def test_error_replies_of_a_real_server_match_redis_py(redis_factory) -> None:  # type: ignore[no-untyped-def]
    server = redis_factory().start()
    admin = server.client()
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">reader-pw-123", "~*", "+get", "+auth", "+ping")
    admin.set("a-string", "v")
    commands = [("EVALSHA", "0" * 40, 0), ("LPUSH", "a-string", "x"), ("FCALL", "no_such_function", 0),
                ("NO-SUCH-COMMAND",), ("AUTH", "reader", "wrong-password")]
    kw = {"host": "127.0.0.1", "port": server.port}
    for command in commands:
        with pytest.raises(rx.RedisError) as theirs:
            admin.execute_command(*command)
        direct = DirectConnection(kw, socket_timeout=5, connect_timeout=5)
        try:
            (ours,) = direct.pipeline(pack_commands([command]), 1)
        except rx.RedisError as e:  # connection-level errors (AUTH) are raised, as redis-py raises them
            ours = e
        direct.disconnect()
        assert type(ours) is type(theirs.value) and str(ours) == str(theirs.value), command
    # NOPERM: a user without SET, on our connection (with its handshake) and on redis-py's.
    user = {**kw, "username": "reader", "password": "reader-pw-123"}
    direct = DirectConnection(user, socket_timeout=5, connect_timeout=5)
    (ours,) = direct.pipeline(pack_commands([("SET", "a-string", "w")]), 1)
    direct.disconnect()
    with pytest.raises(rx.NoPermissionError) as theirs:
        server.client(username="reader", password="reader-pw-123").set("a-string", "w")
    assert type(ours) is rx.NoPermissionError and str(ours) == str(theirs.value)


def test_moved_and_ask_carry_slot_and_node() -> None:
    moved, ask = error_reply("MOVED 3999 127.0.0.1:6381"), error_reply("ASK 12 10.0.0.2:7000")
    assert isinstance(moved, rx.MovedError) and moved.slot_id == 3999 and moved.node_addr == ("127.0.0.1", 6381)
    assert isinstance(ask, rx.AskError) and not isinstance(ask, rx.MovedError) and ask.node_addr == ("10.0.0.2", 7000)


def redis_py_packed(*args: object) -> bytes:
    return b"".join(redis.Connection().pack_command(*args))


@pytest.mark.parametrize("args", [
    ("GET", "k"),
    ("SET", "tmp:{a}", b"\x00\r\n\xff" * 100, "EX", 86400),
    ("DEL", "a", "b", "c"),
    ("CLIENT", "SETNAME", "xml-pipeline:xp:"),
    ("AUTH", "user", "pässwörd"),
    ("XADD", "xp:tasks", "MAXLEN", "~", 10000, "*", "f", b""),
    ("SELECT", 0),
    ("INCRBY", "n", -5),
])
def test_our_packer_writes_what_redis_py_writes(args: tuple[object, ...]) -> None:
    assert pack_command(str(args[0]).encode(), list(args[1:])) == redis_py_packed(*args)
    assert pack_commands([args, args]) == redis_py_packed(*args) * 2


def test_script_heads_and_arguments_pack_like_redis_py() -> None:
    keys, argv = ("xp:buffer:{t}", "xp:op:{t}"), (b"slot\r\n", "id", 600, 0)
    ours = pack_head(b"EVALSHA", b"a" * 40, len(keys), len(argv)) + pack_args((*keys, *argv))
    assert ours == redis_py_packed("EVALSHA", "a" * 40, len(keys), *keys, *argv)


def test_handshake_from_connection_kwargs() -> None:
    assert handshake({"host": "h", "port": 6379, "db": 0}) == []
    assert handshake({"password": "pw", "client_name": "xml-pipeline:xp:", "db": 3}) == [
        ("AUTH", "pw"), ("CLIENT", "SETNAME", "xml-pipeline:xp:"), ("SELECT", 3)]
    assert handshake({"username": "tenant", "password": "", "db": None}) == [("AUTH", "tenant", "")]


def test_tls_context_follows_the_settings(tmp_path) -> None:
    ctx = tls_context({})
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    ctx = tls_context({"ssl_cert_reqs": "none", "ssl_check_hostname": True})
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    ctx = tls_context({"ssl_cert_reqs": "required", "ssl_check_hostname": False,
                       "ssl_min_version": ssl.TLSVersion.TLSv1_3})
    assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(ValueError, match="ssl_cert_reqs is 'sometimes'; allowed: none, optional, required"):
        tls_context({"ssl_cert_reqs": "sometimes"})
    with pytest.raises(OSError):
        tls_context({"ssl_ca_certs": str(tmp_path / "missing.pem")})
    assert tls_supported({"ssl_cert_reqs": "required"}) and not tls_supported({"ssl_validate_ocsp": True})
