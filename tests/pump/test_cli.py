"""The `xml-pipeline` command as a real process: the example organism end to end, exit codes, messages."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from pump_harness import REPO, SIGNING_KEY, cli, organism_yaml

from xml_pipeline.cli import build_parser, main
from xml_pipeline.memory import BackendConfig, get_shared_backend
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
        b = get_shared_backend(BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix=p,
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
