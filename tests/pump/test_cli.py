"""The `xml-pipeline` command as a real process: the example organism end to end, exit codes, messages."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from pump_harness import REPO, SIGNING_KEY, cli, organism_yaml

from xml_pipeline.cli import build_parser, main
from xml_pipeline.memory import BackendConfig, create_backend
from xml_pipeline.message_bus.message import Message, parse_message

EXAMPLE = str(REPO / "examples/demo/organism.yaml")
INPUT = "\n".join(m.to_xml() for m in [
    Message("console", "greeter", '<greet name="Ada"/>'),
    Message("console", "greeter", '<greet name="Grace" lucky="1000"/>'),
    Message("console", "primes", '<count below="20000"/>'),
    Message("console", "primes", '<count below="many"/>'),
])


@pytest.mark.parametrize("argv", [[], ["run"], ["pump"], ["worker"], ["healthcheck"], ["send"], ["backend"],
                                  ["backend", "ping"], ["backend", "info"], ["backend", "threads"],
                                  ["backend", "clear"], ["backend", "reindex"]])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: xml-pipeline")


def test_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'xml-pipeline = "xml_pipeline.cli:main"' in text
    assert build_parser().prog == "xml-pipeline"


@pytest.mark.parametrize("backend", ["memory", "manager", "redis"])
def test_run_the_example_organism_end_to_end(backend: str, redis_server, prefix: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             cli_env: dict[str, str]) -> None:
    env = dict(cli_env, XP_BACKEND_TYPE=backend)
    if backend == "redis":
        env.update(XP_REDIS_URL=redis_server.url, XP_REDIS_PREFIX=prefix, XP_REDIS_TTL="300")
    (tmp_path / "in.xml").write_text(INPUT)
    r = cli("run", EXAMPLE, "--input", str(tmp_path / "in.xml"), env=env)
    # One conversation ends in an error response (below="many"): the run says so and exits 1.
    assert r.returncode == 1, r.stderr
    assert "1 of 4 conversation(s) ended in an error response" in r.stderr and "Traceback" not in r.stderr
    outs = [parse_message(line) for line in r.stdout.splitlines()]
    assert len(outs) == 4 and all(o.to == "console" for o in outs)
    payloads = sorted(o.payload for o in outs)
    assert "<greeting>Hello, Ada!</greeting>" in payloads
    assert "<greeting>Hello, Grace! Your lucky number: there are 168 primes below 1000.</greeting>" in payloads
    assert '<primes below="20000" count="2262"/>' in payloads
    (err,) = [o for o in outs if o.is_error]
    assert err.sender == "primes" and "must be an integer, got 'many'" in err.payload
    info = json.loads(r.stderr.split("backend info: ", 1)[1].splitlines()[0])
    assert info["backend"] == backend and info["buffer_threads"] >= 4 and info["registry_entries"] >= 5
    if backend == "redis":
        client = redis_server.client()
        assert list(client.scan_iter(match=f"{prefix}tmp:*")) == []
        assert info["prefix"] == prefix


def test_make_demo_runs_on_the_manager_backend(cli_env: dict[str, str]) -> None:
    r = cli("run", EXAMPLE, "--demo", env=cli_env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "organism demo · backend manager · 2 worker process(es) (spawn)" in out
    assert "greeter → console  <greeting>Hello, Ada!</greeting>" in out
    assert "primes below 100000" in out and '<primes below="400000" count="33860"/>' in out
    assert "8 conversation(s), 8 response(s) (1 error)" in out
    assert '"backend": "manager"' in out.splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_run_reads_stdin(cli_env: dict[str, str]) -> None:
    r = cli("run", EXAMPLE, "--input", "-", "--format", "text", env=dict(cli_env, XP_BACKEND_TYPE="memory"),
            input=Message("console", "greeter", '<greet name="Stdin"/>').to_xml())
    assert r.returncode == 0, r.stderr
    assert "greeter → console  <greeting>Hello, Stdin!</greeting>" in r.stdout


def _usage_error(r, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_bad_config_exits_2_naming_the_field(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(organism_yaml(listeners='- {name: a, handler: "xml_pipeline.examples.greeter:handle", cpu: true}'))
    _usage_error(cli("run", str(bad), "--demo", env=cli_env), "listeners[0].cpu", "unknown key", f"{bad}:")
    bad.write_text(organism_yaml(listeners='- {name: a, handler: "nowhere.mod:fn"}'))
    _usage_error(cli("run", str(bad), "--demo", env=cli_env), "listeners[0].handler", "cannot import")
    _usage_error(cli("run", str(tmp_path / "missing.yaml"), "--demo", env=cli_env), "does not exist")
    _usage_error(cli("run", EXAMPLE, "--demo", env=dict(cli_env, XP_BACKEND_TYPE="etcd")), "XP_BACKEND_TYPE", "'redis'")
    _usage_error(cli("pump", env=cli_env), "XP_CONFIG")
    _usage_error(cli("worker", env=dict(cli_env, XP_CONFIG=EXAMPLE)), "backend.type", "'redis'")
    _usage_error(cli("worker", env=dict(cli_env, XP_CONFIG=EXAMPLE, XP_BACKEND_TYPE="redis", XP_REDIS_TTL="soon")),
                 "XP_REDIS_TTL")


def test_bad_usage_exits_2(tmp_path: Path, cli_env: dict[str, str]) -> None:
    _usage_error(cli("run", EXAMPLE, "--input", str(tmp_path / "nope.xml"), env=cli_env), "--input", "nope.xml")
    (tmp_path / "bad.xml").write_text('<message from="console" to="greeter"><payload><x></payload></message>')
    _usage_error(cli("run", EXAMPLE, "--input", str(tmp_path / "bad.xml"), env=cli_env), "bad message", "mismatched tag")
    (tmp_path / "evil.xml").write_text('<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                       '<message from="a" to="greeter"><payload>&x;</payload></message>')
    _usage_error(cli("run", EXAMPLE, "--input", str(tmp_path / "evil.xml"), env=cli_env), "DTDs")
    _usage_error(cli("run", EXAMPLE, "--demo", "--workers", "0", env=cli_env), "--workers")
    _usage_error(cli("backend", "clear", env=cli_env), "--prefix")
    _usage_error(cli("backend", "info", "--type", "memory", env=cli_env), "backend.type", "memory")
    _usage_error(cli("backend", "reindex", "--type", "manager", env=cli_env), "backend type", "only redis")
    _usage_error(cli("send", "--to", "greeter", "<unclosed>", env=cli_env), "bad message")
    r = cli("nonsense", env=cli_env)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_runtime_failures_exit_1(tmp_path: Path, redis_server, prefix: str, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    from redis_server import free_port
    dead = f"redis://127.0.0.1:{free_port()}/0"
    r = cli("backend", "ping", "--url", dead, env=cli_env)
    assert r.returncode == 1 and "unreachable" in r.stdout and "Traceback" not in r.stderr
    r = cli("backend", "info", "--url", dead, env=dict(cli_env, XP_REDIS_PASSWORD="hunter2"))
    assert r.returncode == 1 and "BackendUnavailable" in r.stderr and "Traceback" not in r.stderr
    assert "hunter2" not in r.stderr + r.stdout
    env = dict(cli_env, XP_BACKEND_TYPE="redis", XP_REDIS_URL=redis_server.url, XP_REDIS_PREFIX=prefix)
    r = cli("send", "--to", "greeter", '<greet name="nobody-listens"/>', "--wait", "--timeout", "0.5", env=env)
    assert r.returncode == 1 and "no response" in r.stderr


def test_backend_commands_on_redis(redis_server, prefix: str, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    other = prefix.replace("xpt:", "xpo:")
    for p in (prefix, other):
        b = create_backend(BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=p,
                                             signing_key=SIGNING_KEY))
        b.buffer_append("thread-1", b.signer.sign(b"x"))
        b.registry_set("console.greeter", "thread-1")
        b.temp_put("tmp-1", b"y")
        b.close()
    env = dict(cli_env, XP_REDIS_URL=redis_server.url, XP_BACKEND_TYPE="redis")
    r = cli("backend", "ping", "--prefix", prefix, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    r = cli("backend", "info", "--prefix", prefix, "--json", env=env)
    info = json.loads(r.stdout)
    assert (info["buffer_threads"], info["registry_entries"], info["prefix"]) == (1, 1, prefix)
    assert "streams" in info
    r = cli("backend", "threads", "--prefix", prefix, "--json", env=env)
    assert json.loads(r.stdout) == [{"thread": "thread-1", "chain": "console.greeter", "slots": 1}]
    client = redis_server.client()
    client.delete(f"{prefix}meta:index")  # as if the keys came from a dump without the index
    assert json.loads(cli("backend", "threads", "--prefix", prefix, "--json", env=env).stdout) == []
    r = cli("backend", "reindex", "--prefix", prefix, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["added"] == {"threads": 1, "chains": 1}
    r = cli("backend", "threads", "--prefix", prefix, "--json", env=env)
    assert json.loads(r.stdout) == [{"thread": "thread-1", "chain": "console.greeter", "slots": 1}]
    r = cli("backend", "clear", "--prefix", prefix, "--json", env=env)
    assert r.returncode == 0, r.stderr
    removed = json.loads(r.stdout)["removed"]
    assert removed["threads"] == 1 and removed["registry_entries"] == 1 and removed["stream_and_temp_keys"] >= 1
    assert list(client.scan_iter(match=f"{prefix}*")) == []
    assert len(list(client.scan_iter(match=f"{other}*"))) >= 3  # the other tenant is untouched


def test_healthcheck(tmp_path: Path, cli_env: dict[str, str]) -> None:
    hb = tmp_path / "hb"
    assert cli("healthcheck", "--file", str(hb), env=cli_env).returncode == 1
    hb.touch()
    assert cli("healthcheck", "--file", str(hb), env=cli_env).returncode == 0
    old = time.time() - 120
    os.utime(hb, (old, old))
    r = cli("healthcheck", "--file", str(hb), "--max-age", "30", env=cli_env)
    assert r.returncode == 1 and "old" in r.stderr


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from xml_pipeline.cli.run import ProgressBar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain = io.StringIO()
    bar = ProgressBar(10, plain)
    bar._start -= 1
    bar.update(5)
    assert plain.getvalue() == ""
    tty = Tty()
    bar = ProgressBar(10, tty)
    bar._start -= 1
    bar.update(5)
    assert "5/10" in tty.getvalue() and "#" in tty.getvalue()


# -------------------------------------------------------------------------------- hostile input
def _one_line_usage_error(r, *needles: str) -> None:  # type: ignore[no-untyped-def]
    """Exit 2, exactly one line on stderr naming what is wrong, no traceback."""
    _usage_error(r, *needles)
    lines = [ln for ln in r.stderr.splitlines() if " WARNING " not in ln]  # the no-signing-key warning
    assert len(lines) == 1, r.stderr


def _cli_bytes(*args: str, env: dict[str, str], stdin: bytes):  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "xml_pipeline.cli", *args], env=env, input=stdin,
                       capture_output=True, timeout=60, cwd=REPO)
    r.stdout, r.stderr = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return r


HOSTILE_ENV = [
    ({"XP_REDIS_URL": "redis://127.0.0.1:6379/?socket_timeout=abc"}, ("XP_REDIS_URL", "query parameters")),
    ({"XP_REDIS_URL": "redis://127.0.0.1:6379/abc"}, ("XP_REDIS_URL", "not a database number")),
    ({"XP_REDIS_TTL": "٣٠"}, ("XP_REDIS_TTL", "ASCII digits")),
    ({"XP_SIGNING_KEY": ",,,"}, ("XP_SIGNING_KEY", "empty")),
    ({"XP_REDIS_PREFIX": "xp:\n"}, ("XP_REDIS_PREFIX", "not a valid prefix")),
]


@pytest.mark.parametrize("env_over,needles", HOSTILE_ENV, ids=lambda v: str(v)[:24])
def test_hostile_environment_is_one_line(env_over: dict[str, str], needles: tuple[str, ...],
                                         cli_env: dict[str, str]) -> None:
    env = dict(cli_env, XP_BACKEND_TYPE="redis", **env_over)
    _one_line_usage_error(cli("backend", "ping", env=env), *needles)


HOSTILE_FILES = {
    "alias-bomb": ("organism: {name: b, description: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]}\n"
                   + "".join(f"x{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8)),
                   ("organism.yaml", "more than 100000 values")),
    "recursive-alias": ("organism: {name: r, description: &d [*d]}\n", ("alias inside its own anchor",)),
    "retries": ("organism: r\nbackend: {type: redis, retries: 100000000000000000000}\n", ("backend.retries", "0..100")),
    "max-connections": ("organism: r\nbackend: {type: redis, max_connections: 100000000}\n",
                        ("backend.max_connections", "1..10000")),
    "nan-timeout": ("organism: r\nbackend: {type: redis, socket_timeout: .nan}\n", ("backend.socket_timeout", "nan")),
    "inf-timeout": ("organism: r\nbackend: {type: redis, connect_timeout: .inf}\n", ("backend.connect_timeout", "inf")),
    "int-signing-key": ("organism: r\nbackend: {type: redis, signing_key: 12345678901234567890}\n",
                        ("backend.signing_key", "got int")),
    "list-signing-key": ("organism: r\nbackend: {type: redis, signing_key: [32]}\n", ("backend.signing_key", "got int")),
    "nan-claim-idle": ("organism: r\nprocess_pool: {claim_idle_seconds: .nan}\n",
                       ("process_pool.claim_idle_seconds", "0.05..86400")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_hostile_organism_yaml_is_one_line(name: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    text, needles = HOSTILE_FILES[name]
    path = tmp_path / "organism.yaml"
    path.write_text(text + 'listeners: [{name: g, handler: "xml_pipeline.examples.greeter:handle"}]\n')
    _one_line_usage_error(cli("worker", env=dict(cli_env, XP_CONFIG=str(path))), *needles)


def test_unreadable_config_paths_are_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    _one_line_usage_error(cli("pump", env=dict(cli_env, XP_CONFIG=str(tmp_path))), "XP_CONFIG", "is a directory")
    _one_line_usage_error(cli("backend", "info", env=dict(cli_env, XP_CONFIG=str(tmp_path))), "XP_CONFIG",
                          "is a directory")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _one_line_usage_error(cli("pump", "--config", str(tmp_path / "a"), env=cli_env), "symbolic links")
    _one_line_usage_error(cli("backend", "ping", "--config", str(tmp_path / "a"), env=cli_env), "--config",
                          "symbolic links")


@pytest.mark.parametrize("argv,needles", [
    (["healthcheck", "--max-age", "nan"], ("--max-age", "nan")),
    (["healthcheck", "--max-age", "inf"], ("--max-age", "inf")),
    (["healthcheck", "--max-age", "-5"], ("--max-age",)),
    (["send", "--to", "greeter", "<x/>", "--wait", "--timeout", "nan"], ("--timeout", "nan")),
    (["run", EXAMPLE, "--demo", "--timeout", "inf"], ("--timeout", "inf")),
    (["worker", "--processes", "100000000"], ("--processes", "1 to 256")),
])
def test_non_finite_and_huge_options_are_one_line(argv: list[str], needles: tuple[str, ...],
                                                   cli_env: dict[str, str]) -> None:
    _one_line_usage_error(cli(*argv, env=cli_env), *needles)


def test_a_nan_max_age_never_reports_healthy(tmp_path: Path, cli_env: dict[str, str]) -> None:
    hb = tmp_path / "hb"
    hb.touch()
    old = time.time() - 3600
    os.utime(hb, (old, old))
    assert cli("healthcheck", "--file", str(hb), "--max-age", "nan", env=cli_env).returncode == 2


@pytest.mark.parametrize("argv", [["send", "--to", "greeter"], ["send"]])
def test_send_non_utf8_stdin_is_one_line(argv: list[str], cli_env: dict[str, str]) -> None:
    env = dict(cli_env, XP_BACKEND_TYPE="redis")
    r = _cli_bytes(*argv, env=env, stdin=b"\xff\xfe<greet/>")
    _one_line_usage_error(r, "UTF-8" if "--to" in argv else "bad message")


def test_send_wait_with_redis_down_is_one_line(cli_env: dict[str, str]) -> None:
    from redis_server import free_port
    env = dict(cli_env, XP_BACKEND_TYPE="redis", XP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    r = cli("send", "--to", "greeter", "<x/>", "--wait", "--timeout", "1", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "BackendUnavailable" in r.stderr and "unavailable" in r.stderr


def test_wrong_password_says_authentication_failed(redis_factory, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    server = redis_factory(password="right-password").start()
    env = dict(cli_env, XP_BACKEND_TYPE="redis", XP_REDIS_URL=server.url, XP_REDIS_PASSWORD="wrong-password")
    r = cli("send", "--to", "greeter", "<x/>", "--wait", "--timeout", "1", env=env)
    _one_line_usage_error(r, "authentication failed", "XP_REDIS_PASSWORD")
    assert "wrong-password" not in r.stderr + r.stdout
    r = cli("backend", "ping", env=env)
    assert r.returncode == 2 and r.stdout.startswith("authentication failed:"), (r.stdout, r.stderr)
    assert "unreachable" not in r.stdout and "Traceback" not in r.stderr and "wrong-password" not in r.stderr
    r = cli("backend", "ping", "--json", env=env)
    assert json.loads(r.stdout)["state"] == "authentication failed"
    for action in ("info", "threads", "reindex"):  # every backend action: exit 2, as for ping
        r = cli("backend", action, env=env)
        _one_line_usage_error(r, "authentication failed", "XP_REDIS_PASSWORD")
        assert "wrong-password" not in r.stderr + r.stdout
    r = cli("backend", "ping", env=dict(env, XP_REDIS_PASSWORD="right-password"))
    assert r.returncode == 0 and r.stdout.startswith("ok:")


def test_run_refuses_an_input_that_reuses_a_message_id_before_feeding_any(cli_env: dict[str, str]) -> None:
    """Two messages of one input with one id: refused up front (exit 2, one line naming both), not
    half way through the run with the rest of the input never fed."""
    first = Message("console", "greeter", '<greet name="First"/>')
    again = Message("console", "greeter", '<greet name="Second"/>', id=first.id)
    third = Message("console", "greeter", '<greet name="Third"/>')
    text = "<messages>" + "".join(m.to_xml() for m in (first, again, third)) + "</messages>"
    r = cli("run", EXAMPLE, "--input", "-", env=dict(cli_env, XP_BACKEND_TYPE="memory"), input=text)
    _one_line_usage_error(r, "message 2 repeats the id", first.id, "message 1")
    assert "Hello" not in r.stdout


@pytest.mark.parametrize("role", ["pump", "worker"])
def test_an_unwritable_heartbeat_file_is_one_line(role: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Refused at start: a pump or worker that cannot write its heartbeat would be restarted by its
    liveness probe over and over without a word about why."""
    path = tmp_path / "organism.yaml"
    path.write_text('organism: h\nbackend: {type: redis}\nlisteners: [{name: g, handler: "xml_pipeline.examples.greeter:handle"}]\n')
    env = dict(cli_env, XP_CONFIG=str(path))
    for bad, why in ((tmp_path, "is a directory"), (tmp_path / "organism.yaml" / "hb", "Not a directory")):
        r = cli(role, "--heartbeat-file", str(bad), env=env)
        _one_line_usage_error(r, "--heartbeat-file", why)


@pytest.mark.parametrize("argv", [["send"], ["run", EXAMPLE, "--input", "-"]], ids=["send", "run"])
def test_a_20000_deep_messages_document_on_stdin_is_one_line(argv: list[str], cli_env: dict[str, str]) -> None:
    deep = b"<messages>" * 20_000 + b"</messages>" * 20_000
    r = _cli_bytes(*argv, env=dict(cli_env, XP_BACKEND_TYPE="redis" if argv == ["send"] else "memory"), stdin=deep)
    _one_line_usage_error(r, "nested more than 256 deep")
