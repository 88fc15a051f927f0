"""The `xml-pipeline` command.

    xml-pipeline run ORGANISM.yaml [--input FILE|-] [--demo]   the whole organism on this machine
    xml-pipeline pump | worker                                 the long-running processes of pods
    xml-pipeline send [--to L] MESSAGE [--wait]                talk to a pump through Redis
    xml-pipeline backend ping|info|threads|clear|reindex       inspect or reset the shared backend
    xml-pipeline healthcheck                                   liveness probe of pump/worker pods

Exit codes: 0 success, 2 bad usage or configuration (the message names the field), 1 runtime
failure. A user's mistake never prints a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_HEARTBEAT_FILE = "/tmp/xml-pipeline.heartbeat"
#: Bounds of duration and process-count options (one week; the organism.yaml bound of workers).
MAX_SECONDS = 7 * 86400.0
MAX_PROCESSES = 256


class UsageError(Exception):
    """A mistake in how the command was called (exit 2)."""


def _port(text: str) -> int:
    """argparse type of a TCP port (0 = off); a bad one is a usage error naming the allowed range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the usage summary is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _seconds(text: str) -> float:
    """argparse type of a duration: a finite number of seconds > 0 (float() alone takes 'nan' and 'inf')."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds (0 < SECONDS <= {MAX_SECONDS:g}), "
                                         f"got {text!r}") from None
    if not 0 < value <= MAX_SECONDS:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds (0 < SECONDS <= {MAX_SECONDS:g}), "
                                         f"got {text!r}")
    return value


def _count(text: str) -> int:
    """argparse type of a process count: an integer 1..MAX_PROCESSES."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_PROCESSES or not text.strip().isascii():
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_PROCESSES}, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")


def _add_config(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--config", metavar="ORGANISM.yaml",
                   help="the organism.yaml (default: $XP_CONFIG); XP_* variables override its backend section")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xml-pipeline",
        description="Run and operate an xml-pipeline organism: a multi-agent XML message bus.",
        epilog="Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.")
    from importlib.metadata import PackageNotFoundError, version
    try:
        ver = version("xml-pipeline")
    except PackageNotFoundError:
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"xml-pipeline {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run an organism locally: pump + worker processes, feed messages, print responses",
                       description="Start the pump and its local worker processes, feed messages from a file, "
                                   "stdin or the built-in demo set, print every response, and end with the "
                                   "backend's info(). Exit 0 when every conversation got an answer; 1 when any "
                                   "ended in an error response (--demo: its error is on purpose, exit 0) or "
                                   "the run timed out; 2 for a usage or configuration mistake.")
    p.add_argument("organism", metavar="ORGANISM.yaml", help="the organism to run")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--input", "-i", metavar="FILE", help="XML messages to feed ('-' for stdin): one or more "
                     "<message> elements, or a <messages> document")
    src.add_argument("--demo", action="store_true", help="feed the built-in demo messages")
    p.add_argument("--format", choices=("xml", "text"), help="how to print responses (default: text with "
                   "--demo, else xml: one <message> per line)")
    p.add_argument("--workers", type=_count, metavar="N", help="override process_pool.workers")
    p.add_argument("--start-method", choices=("spawn", "forkserver"), help="override process_pool.start_method")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="give up (exit 1) if the run takes longer")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_common(p)

    p = sub.add_parser("pump", help="run the pump of a pod (ingress stream → listeners → egress stream)",
                       description="The pump pod's process. Reads messages from the organism's ingress stream "
                                   "(redis backend), runs the plain listeners, sends cpu_bound work to worker "
                                   "pods, writes responses to the egress stream. SIGTERM drains and exits 0.")
    _add_config(p)
    p.add_argument("--heartbeat-file", default=DEFAULT_HEARTBEAT_FILE, help="file refreshed while healthy "
                   f"(default {DEFAULT_HEARTBEAT_FILE})")
    p.add_argument("--metrics-port", type=_port, default=0, metavar="PORT",
                   help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (default: off)")
    _add_common(p)

    p = sub.add_parser("worker", help="run a worker of a pod (takes cpu_bound tasks from the Redis stream)",
                       description="The worker pod's process: process_pool.workers consumers of the organism's "
                                   "task stream (redis backend). SIGTERM finishes the task in hand and exits 0.")
    _add_config(p)
    p.add_argument("--processes", type=_count, metavar="N", help="consumer processes (default process_pool.workers)")
    p.add_argument("--heartbeat-file", default=DEFAULT_HEARTBEAT_FILE, help="file refreshed while healthy "
                   f"(default {DEFAULT_HEARTBEAT_FILE})")
    _add_common(p)

    p = sub.add_parser("healthcheck", help="exit 0 if this pod's pump/worker heartbeat is fresh",
                       description="Liveness probe: exit 0 if the heartbeat file was refreshed recently, else 1.")
    p.add_argument("--file", default=DEFAULT_HEARTBEAT_FILE, help=f"heartbeat file (default {DEFAULT_HEARTBEAT_FILE})")
    p.add_argument("--max-age", type=_seconds, default=30.0, metavar="SECONDS", help="maximum age (default 30)")

    p = sub.add_parser("send", help="send a message to a pump through its ingress stream (redis backend)",
                       description="Put a message on the organism's ingress stream; with --wait, print the "
                                   "response from the egress stream.")
    p.add_argument("message", metavar="MESSAGE", nargs="?", default="-",
                   help="a <message> document, or with --to a payload fragment; '-' reads stdin, @FILE a file")
    p.add_argument("--to", metavar="LISTENER", help="wrap MESSAGE as the payload of a message to LISTENER")
    p.add_argument("--from", dest="sender", default="cli", metavar="NAME", help="sender name with --to (default cli)")
    p.add_argument("--thread", metavar="ID", help="thread id with --to")
    p.add_argument("--wait", action="store_true", help="wait for the response and print it")
    p.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS", help="how long --wait waits (default 30)")
    _add_config(p)
    _add_common(p)

    p = sub.add_parser("backend", help="inspect or reset the shared backend",
                       description="Talk to the organism's shared backend (config from --config/$XP_CONFIG and XP_*).")
    bsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (("ping", "exit 0 if the backend answers"), ("info", "counts and settings"),
                       ("threads", "thread ids with their call chains and slot counts"),
                       ("clear", "delete every key of one prefix (buffer, registry, streams, temp data)"),
                       ("reindex", "rebuild the redis backend's thread index from a SCAN of the prefix "
                                   "(for keys written without it, e.g. restored from a dump; needs a user allowed to SCAN)")):
        bp = bsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _add_config(bp)
        bp.add_argument("--type", dest="backend_type", choices=("memory", "manager", "redis"), help="backend type")
        bp.add_argument("--url", help="Redis URL (no credentials: use XP_REDIS_USERNAME/XP_REDIS_PASSWORD)")
        bp.add_argument("--prefix", required=(name == "clear"), help="key prefix" + (" to clear (required)" if name == "clear" else ""))
        bp.add_argument("--json", action="store_true", help="machine-readable output")
        _add_common(bp)
    return parser


def _setup_logging(args: argparse.Namespace, default: int) -> None:
    level = default
    if getattr(args, "quiet", False):
        level = logging.ERROR
    elif getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    elif getattr(args, "verbose", 0) == 1:
        level = logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The backend also logs this warning; once on stderr is enough.
    warnings.filterwarnings("ignore", message=r"Redis backend .* has no signing key")
    from ..errors import BackendError, ConfigError, XmlPipelineError
    from ..message_bus.message import MessageError
    try:
        if args.command == "run":
            _setup_logging(args, logging.WARNING)
            from .run import cmd_run
            return cmd_run(args)
        if args.command in ("pump", "worker"):
            _setup_logging(args, logging.INFO)
            # The operator sets XP_ROLE to the command a pod must run; a pod running the other one
            # (a hand-edited Deployment) would serve the wrong streams: refuse to start.
            from ..contract import check_role
            if check_role(args.command, os.environ) is not None:
                logging.getLogger("xml_pipeline.cli").info("role %s (XP_ROLE)", args.command)
            from . import pods
            return pods.cmd_pump(args) if args.command == "pump" else pods.cmd_worker(args)
        if args.command == "healthcheck":
            from .pods import cmd_healthcheck
            return cmd_healthcheck(args)
        if args.command == "send":
            _setup_logging(args, logging.WARNING)
            from .tools import cmd_send
            return cmd_send(args)
        if args.command == "backend":
            _setup_logging(args, logging.WARNING)
            from .tools import cmd_backend
            return cmd_backend(args)
    except (ConfigError, UsageError) as e:
        print(f"xml-pipeline {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MessageError as e:
        print(f"xml-pipeline {args.command}: error: bad message: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (BackendError, XmlPipelineError) as e:
        print(f"xml-pipeline {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"xml-pipeline {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
