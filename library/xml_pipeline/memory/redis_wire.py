"""The wire of the library's own Redis connections (the pump's RedisPipe, a worker's
DirectConnection, the packed commands RedisBackend sends on its pooled connections): packing
commands, reading replies, the connection handshake and TLS.

- Replies are read by `hiredis.Reader` (the C parser redis-py itself uses when hiredis is
  installed). An error reply becomes the redis-py exception redis-py would raise for it
  (`error_reply`: NoScriptError for NOSCRIPT, AuthenticationError for WRONGPASS, ...), returned in
  its place, not raised, so one bad command in a pipeline answers only its own caller.
- Commands are packed here, not by a library: the packer is small, handles exactly the argument
  types our commands take (str, bytes, int), and the hot path packs the append's KEYS and ARGV in
  one `%` format (redis-py encodes argument by argument). tests/library/test_redis_wire.py checks
  it byte for byte against redis-py's own packer.
- An argument over LARGE_ARG bytes (a large slot or temp value) is not copied into the packed
  command: the command becomes a list of pieces (`Packed`), the argument's own buffer among them,
  written with one write per large piece (`pieces`, `send_packed`). A 1 MB slot packed by
  formatting and concatenation was copied twice more on the pump before it reached the socket.
- `handshake` is the one list of commands a new raw connection sends (AUTH, CLIENT SETNAME,
  SELECT), built from the connection kwargs of the backend's pool, the same ones redis-py's pooled
  connections use; `tls_context` is the SSLContext redis-py's SSLConnection builds for them.
"""
from __future__ import annotations

import ssl
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Union

import hiredis
from redis import exceptions as rx

__all__ = ["LARGE_ARG", "MORE", "Packed", "error_reply", "pieces", "send_packed", "handshake", "pack_args", "pack_command", "pack_commands", "pack_head",
           "reply_reader", "tls_context", "tls_supported"]


#: Arguments longer than this travel as their own buffer instead of being copied into the command.
LARGE_ARG = 32 * 1024

#: Packed commands: one bytes object, or a list of pieces (bytes / memoryview) sent back to back.
Packed = Union[bytes, list[Any]]


def pieces(*parts: Packed) -> list[Any]:
    """`parts` as one list of pieces to write in order: neighbouring small pieces joined into one
    bytes object, each piece over LARGE_ARG as a memoryview of its own buffer (not copied; a
    transport slicing a partly sent memoryview does not copy it either)."""
    out: list[Any] = []
    small: list[Any] = []
    for part in parts:
        for piece in (part if isinstance(part, list) else (part,)):
            if len(piece) > LARGE_ARG:
                if small:
                    out.append(b"".join(small))
                    small = []
                out.append(piece if isinstance(piece, memoryview) else memoryview(piece))
            elif piece:
                small.append(piece)
    if small:
        out.append(b"".join(small))
    return out


def join_packed(*parts: Packed) -> Packed:
    """`parts` back to back: one bytes object when every part is bytes, else `pieces(*parts)`."""
    if all(type(p) is bytes for p in parts):
        return b"".join(parts)  # type: ignore[arg-type]
    return pieces(*parts)


def send_packed(sock: socket.socket, packed: Packed) -> None:
    """Write `packed` on a blocking socket (plain or TLS): one sendall per piece."""
    if type(packed) is bytes:
        sock.sendall(packed)
        return
    for piece in pieces(packed):
        sock.sendall(piece)


def pack_head(command: bytes, script: bytes, numkeys: int, nargs: int) -> bytes:
    """The head "<command> <script> <numkeys>" of a script call with `numkeys` keys and `nargs`
    arguments (EVALSHA <sha>, EVAL <source>, FCALL <function>); the keys and arguments follow."""
    count = 3 + numkeys + nargs
    nk = str(numkeys).encode()
    return b"*%d\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        count, len(command), command, len(script), script, len(nk), nk)


def pack_args(args: Iterable[Any]) -> bytes:
    """RESP bulk strings for str / bytes / int arguments (the only types our commands take)."""
    out = []
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        elif not isinstance(a, bytes):
            a = bytes(a)
        out.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(out)


def pack_command(command: bytes, args: list[Any]) -> bytes:
    """One command: `command` and its arguments."""
    return b"*%d\r\n$%d\r\n%b\r\n" % (len(args) + 1, len(command), command) + pack_args(args)


def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
    """Commands (tuples of str / bytes / int) in RESP, back to back."""
    return b"".join(pack_command(str(c[0]).encode(), list(c[1:])) for c in commands)


# -- replies ------------------------------------------------------------------------------------------
#: What `reply_reader().gets()` returns while a reply is incomplete (a RESP2 reply is never this object).
MORE: Any = Ellipsis

# The error codes redis-py maps to its own exception classes (the code is dropped from the message,
# as redis-py does), so callers that handle both our replies and redis-py's see the same errors.
_BY_CODE: dict[str, type[rx.RedisError]] = {
    "NOSCRIPT": rx.NoScriptError, "NOPERM": rx.NoPermissionError, "WRONGPASS": rx.AuthenticationError,
    "NOAUTH": rx.AuthenticationError, "READONLY": rx.ReadOnlyError, "OOM": rx.OutOfMemoryError,
    "EXECABORT": rx.ExecAbortError, "LOADING": rx.BusyLoadingError, "MOVED": rx.MovedError,
    "ASK": rx.AskError, "TRYAGAIN": rx.TryAgainError, "CLUSTERDOWN": rx.ClusterDownError,
    "CROSSSLOT": rx.ClusterCrossSlotError, "MASTERDOWN": rx.MasterDownError,
}
# "ERR <text>" replies that mean a connection or credentials problem, not a refused command.
_ERR_TEXTS: dict[str, type[rx.RedisError]] = {
    "max number of clients reached": rx.ConnectionError,
    "invalid password": rx.AuthenticationError,
    "Client sent AUTH, but no password is set": rx.AuthenticationError,
    "AUTH <password> called without any password configured for the default user. "
    "Are you sure your configuration is correct?": rx.AuthenticationError,
    "wrong number of arguments for 'auth' command": rx.AuthenticationWrongNumberOfArgsError,
    "wrong number of arguments for 'AUTH' command": rx.AuthenticationWrongNumberOfArgsError,
}


def error_reply(text: str) -> rx.RedisError:
    """The exception for the error reply `text` (e.g. "NOSCRIPT No matching script"): the class
    redis-py raises for it, with the message redis-py gives it."""
    code, _, rest = text.partition(" ")
    if code == "ERR":
        return _ERR_TEXTS.get(rest, rx.ResponseError)(rest)
    cls = _BY_CODE.get(code)
    if cls is None:
        return rx.ResponseError(text)
    try:
        return cls(rest)
    except ValueError:  # MOVED / ASK without "<slot> <host:port>": still an error reply, never a crash
        return rx.ResponseError(text)


def reply_reader() -> Any:
    """A hiredis.Reader for RESP2 replies: `feed(bytes)`, then `gets()` returns each complete reply
    (bytes, int, None, lists; error replies as `error_reply` values) or MORE. A byte stream that is
    not RESP raises redis.exceptions.InvalidResponse (the connection is out of step: drop it)."""
    return hiredis.Reader(protocolError=rx.InvalidResponse, replyError=error_reply, notEnoughData=MORE)


# -- connecting -------------------------------------------------------------------------------------
def handshake(kw: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The commands a new raw connection sends first, from the pool's connection kwargs: AUTH (with
    the username when there is one), CLIENT SETNAME, SELECT of a database other than 0. Every
    reply must be OK."""
    hello: list[tuple[Any, ...]] = []
    if kw.get("password") is not None:
        hello.append(("AUTH", kw["username"], kw["password"]) if kw.get("username") else ("AUTH", kw["password"]))
    if kw.get("client_name"):
        hello.append(("CLIENT", "SETNAME", kw["client_name"]))
    if kw.get("db"):
        hello.append(("SELECT", int(kw["db"])))
    return hello


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# redis-py checks OCSP with pyOpenSSL on a second connection; our connections do not: with these
# set, the library keeps to redis-py's connections (tls_supported is False).
_UNSUPPORTED_TLS = ("ssl_validate_ocsp", "ssl_validate_ocsp_stapled", "ssl_ocsp_context", "ssl_ocsp_expected_cert")


def tls_supported(kw: Mapping[str, Any]) -> bool:
    """False when the kwargs ask for a TLS check that `tls_context` does not make (OCSP)."""
    return not any(kw.get(k) for k in _UNSUPPORTED_TLS)


def tls_context(kw: Mapping[str, Any]) -> ssl.SSLContext:
    """The SSLContext for the pool's ssl_* connection kwargs, made as redis-py's SSLConnection makes
    it: the system's CAs unless ssl_ca_certs / ssl_ca_path / ssl_ca_data name others, certificates
    required and the host name checked unless ssl_cert_reqs / ssl_check_hostname say otherwise, a
    client certificate from ssl_certfile / ssl_keyfile (/ ssl_password), ssl_min_version,
    ssl_ciphers. Raises ValueError for a bad ssl_cert_reqs, OSError / ssl.SSLError for files that
    cannot be read."""
    reqs: Any = kw.get("ssl_cert_reqs", "required")
    if reqs is None:
        reqs = ssl.CERT_NONE
    elif isinstance(reqs, str):
        if reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs is {reqs!r}; allowed: {', '.join(_CERT_REQS)}")
        reqs = _CERT_REQS[reqs]
    context = ssl.create_default_context()
    context.check_hostname = bool(kw.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    for flag in kw.get("ssl_include_verify_flags") or ():
        context.verify_flags |= flag
    for flag in kw.get("ssl_exclude_verify_flags") or ():
        context.verify_flags &= ~flag
    if kw.get("ssl_certfile") or kw.get("ssl_keyfile"):
        certfile: Any = kw.get("ssl_certfile")  # a key file without a certificate fails here, as in redis-py
        context.load_cert_chain(certfile=certfile, keyfile=kw.get("ssl_keyfile"),
                                password=kw.get("ssl_password"))
    if any(kw.get(k) is not None for k in ("ssl_ca_certs", "ssl_ca_path", "ssl_ca_data")):
        context.load_verify_locations(cafile=kw.get("ssl_ca_certs"), capath=kw.get("ssl_ca_path"),
                                      cadata=kw.get("ssl_ca_data"))
    if kw.get("ssl_min_version") is not None:
        context.minimum_version = kw["ssl_min_version"]
    if kw.get("ssl_ciphers"):
        context.set_ciphers(kw["ssl_ciphers"])
    return context
