"""`xml-pipeline send` and `xml-pipeline backend ping|info|threads|clear|reindex`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import urlsplit

from ..contract import ENV_CONFIG
from ..errors import BackendUnavailable, ConfigError
from ..memory.config import BackendConfig
from ..memory.factory import create_backend, default_config
from ..safe_yaml import read_config_text
from ..memory.protocol import SharedBackend
from . import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError


def backend_config(args: argparse.Namespace) -> BackendConfig:
    """XP_CONFIG (or --config) + XP_* environment, then the command-line overrides."""
    env = dict(os.environ)
    if getattr(args, "config", None):
        env[ENV_CONFIG] = args.config
    if env.get(ENV_CONFIG):
        # Missing, a directory, a symlink loop, unreadable, too large: one error naming the option.
        read_config_text(env[ENV_CONFIG], ENV_CONFIG if not getattr(args, "config", None) else "--config")
    config = default_config(env)  # XP_* / XP_CONFIG, else a mounted xml-pipeline Service Binding
    changes: dict[str, Any] = {}
    if getattr(args, "backend_type", None):
        changes["backend_type"] = args.backend_type
    if getattr(args, "url", None):
        changes["redis_url"] = args.url
        changes.setdefault("backend_type", "redis")
    if getattr(args, "prefix", None):
        changes["redis_prefix"] = args.prefix
    return config.replace(**changes) if changes else config


def _open_backend(config: BackendConfig, what: str) -> SharedBackend:
    if config.backend_type == "memory":
        raise ConfigError("backend.type", f"is 'memory': that backend lives inside one process, there is "
                          f"nothing to {what} from outside it", ["manager", "redis"])
    if config.backend_type == "manager" and not config.manager_address:
        raise ConfigError("backend.manager_address", "is required to reach a manager backend from another process",
                          "'127.0.0.1:PORT' or a Unix socket path, with backend.manager_authkey")
    return create_backend(config)


# ---------------------------------------------------------------------------------------------------
# send
# ---------------------------------------------------------------------------------------------------
def _read_arg(value: str) -> bytes:
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            with open(value[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"MESSAGE: cannot read {value[1:]!r}: {e.strerror or e}") from None
    return value.encode("utf-8")


def cmd_send(args: argparse.Namespace) -> int:
    from ..client import NoAnswer, OrganismClient
    from ..message_bus.message import Message, check_fragment, parse_message

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    raw = _read_arg(args.message)
    if args.to:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"MESSAGE: is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                             "messages must be UTF-8") from None
        message = Message(sender=args.sender, to=args.to, payload=check_fragment(text), thread=args.thread)
    else:
        if args.thread:
            raise UsageError("--thread goes with --to (a full <message> carries its own thread attribute)")
        message = parse_message(raw)
    config = backend_config(args)
    if config.backend_type != "redis":
        raise ConfigError("backend.type", f"is {config.backend_type!r}: `send` talks to a pump through its Redis "
                          "ingress stream", ["redis"])
    client = OrganismClient(config)  # the library's client API: ingress, egress, nothing else
    response = None
    try:
        # A PING through the backend's error mapping first: Redis down or refusing the credentials is
        # one line naming the cause, not a redis-py traceback from the stream commands below.
        _check_redis(client.backend, config)
        try:
            if args.wait:
                response = client.request(message, timeout=args.timeout)
            else:
                client.send(message)
        except NoAnswer:
            response = None
        except PermissionError as e:
            raise BackendUnavailable(str(e)) from None
        except _redis_errors() as e:  # Redis went away between the PING and the stream commands
            raise BackendUnavailable(f"Redis at {config.redacted_url}: {type(e).__name__}: "
                                     f"{_scrub(str(e), config)}") from None
    finally:
        client.close()
    if not args.wait:
        print(message.id)
        return EXIT_OK
    if response is None:
        print(f"xml-pipeline send: no response to message {message.id} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_FAILURE
    print(response.to_xml())
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------------
def _redis_errors() -> tuple[type[Exception], ...]:
    import redis  # only the redis backend gets here; the CLI does not pay the import otherwise
    return (redis.exceptions.RedisError,)


def _scrub(text: str, config: BackendConfig) -> str:
    for secret in (config.redis_password, urlsplit(config.redis_url).password):
        if secret:
            text = text.replace(secret, "***")
    return text


def _user(config: BackendConfig) -> str:
    return config.redis_username or urlsplit(config.redis_url).username or "default"


def _credentials_field(config: BackendConfig) -> str:
    return "XP_REDIS_USERNAME/XP_REDIS_PASSWORD (backend.redis_username/redis_password or the URL's credentials)"


def _check_redis(backend: SharedBackend, config: BackendConfig) -> None:
    """Raise ConfigError when Redis refuses the credentials, BackendUnavailable when it does not answer."""
    import redis
    from ..memory.redis_backend import RedisBackend
    assert isinstance(backend, RedisBackend)
    try:
        backend.execute(lambda c: c.ping(), idempotent=True, what="PING")
    except BackendUnavailable:
        try:  # one more, unretried, to tell wrong credentials from a Redis that is down
            backend.client.ping()
        except redis.exceptions.AuthenticationError:
            raise ConfigError(_credentials_field(config),
                              f"authentication failed: Redis at {config.redacted_url} rejected the user "
                              f"{_user(config)!r} and its password",
                              "the user and password of an enabled ACL user of that Redis") from None
        except redis.exceptions.RedisError:
            pass
        raise


def _ping(backend: SharedBackend, config: BackendConfig) -> str:
    """'ok', 'unreachable' or 'authentication failed'."""
    if config.backend_type != "redis":
        return "ok" if backend.ping() else "unreachable"
    try:
        _check_redis(backend, config)
    except ConfigError:
        return "authentication failed"
    except BackendUnavailable:
        return "unreachable"
    return "ok"


def cmd_backend(args: argparse.Namespace) -> int:
    config = backend_config(args)
    if args.action == "ping":
        backend = _open_backend(config, "ping")
        try:
            state = _ping(backend, config)
        finally:
            backend.close()
        where = _where(config)
        if args.json:
            print(json.dumps({"ok": state == "ok", "state": state, "backend": config.backend_type,
                              "endpoint": where}))
        else:
            print(f"{state}: {config.backend_type} backend at {where}")
        if state == "authentication failed":
            print(f"xml-pipeline backend ping: error: {_credentials_field(config)}: Redis refused the "
                  f"credentials of user {_user(config)!r}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK if state == "ok" else EXIT_FAILURE
    if args.action == "reindex" and config.backend_type != "redis":
        raise UsageError(f"backend reindex: the {config.backend_type} backend has no index to rebuild "
                         "(backend type: only redis)")
    backend = _open_backend(config, args.action)
    try:
        if args.action == "info":
            data = backend.info()
            if config.backend_type == "redis":
                from ..message_bus.streams import as_redis, stream_info
                data["streams"] = stream_info(as_redis(backend))
            _print(data, args.json)
        elif args.action == "threads":
            chains = backend.registry_list_all()
            rows = [{"thread": t, "chain": chains.get(t), "slots": backend.buffer_thread_len(t)}
                    for t in sorted(backend.buffer_list_threads())]
            if args.json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    print(f"{r['thread']}  {r['slots']:>6} slot(s)  {r['chain'] or '-'}")
                print(f"{len(rows)} thread(s)", file=sys.stderr)
        elif args.action == "reindex":
            from ..memory.redis_backend import RedisBackend
            assert isinstance(backend, RedisBackend)  # checked above: reindex is refused for other types
            added = backend.reindex()
            if args.json:
                print(json.dumps({"prefix": config.redis_prefix, "added": added}))
            else:
                print(f"reindexed prefix {config.redis_prefix!r}: added {added['threads']} thread(s), "
                      f"{added['chains']} chain(s)")
        else:  # clear
            removed: dict[str, int] = {"threads": backend.buffer_clear(), "registry_entries": backend.registry_clear()}
            swept = True
            if config.backend_type == "redis":
                removed["stream_and_temp_keys"], swept = _clear_streams(backend)
            if args.json:
                print(json.dumps({"prefix": config.redis_prefix, "removed": removed, "temp_keys_swept": swept}))
            else:
                print(f"cleared prefix {config.redis_prefix!r}: " + ", ".join(f"{v} {k}" for k, v in removed.items()))
            if not swept:
                print("note: this Redis user may not SCAN (an organism's restricted user), so temporary worker "
                      "data and results streams were left to expire with their TTL", file=sys.stderr)
    except BackendUnavailable:
        if config.backend_type == "redis":
            _check_redis(backend, config)  # wrong credentials are the user's mistake: exit 2, as for ping
        raise
    finally:
        backend.close()
    return EXIT_OK


def _clear_streams(backend: Any) -> tuple[int, bool]:
    """Delete this prefix's streams and temp keys: (keys removed, whether temp data was swept).

    The fixed streams are deleted by name. Temp keys and per-pump results streams have no index
    (it would cost the hot path a write per message), so they are swept with SCAN (escaped prefix,
    never KEYS) when this user may SCAN; an organism's restricted user may not (docs/multi-tenancy.md),
    and they then expire with their TTL."""
    # key("tasks") itself is "{prefix}tasks" (no trailing ':'), which the patterns below do not match.
    import redis  # only the redis backend gets here; the CLI does not pay the import otherwise

    from ..message_bus.streams import Streams

    s = Streams(backend)  # the task buckets and their dead-letter streams on a cluster
    fixed = dict.fromkeys((*s.task_streams, *s.dlqs, *([s.wake] if s.wake else []),
                           *(backend.key(x) for x in ("tasks", "dlq", "ingress", "egress"))))
    removed = int(backend.client.unlink(*fixed))
    try:
        for space in ("tasks", "results", "dlq", "ingress", "egress", "tmp"):
            batch = []
            for key in backend.client.scan_iter(match=backend.keys.pattern(space), count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    removed += backend.client.unlink(*batch)
                    batch = []
            if batch:
                removed += backend.client.unlink(*batch)
    except redis.exceptions.NoPermissionError:
        return removed, False
    return removed, True


def _where(config: BackendConfig) -> str:
    if config.backend_type == "redis":
        return f"{config.redacted_url} (prefix {config.redis_prefix!r})"
    return str(config.manager_address)


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, default=str, sort_keys=True))
        return
    for k in sorted(data):
        v = data[k]
        if isinstance(v, dict):
            v = ", ".join(f"{ik}={iv}" for ik, iv in v.items())
        print(f"{k:<18} {v}")
