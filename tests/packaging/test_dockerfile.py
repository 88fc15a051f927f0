"""The Dockerfile: hadolint-clean, multi-stage on a pinned slim Python, installs the wheel built in
the first stage with the operator extra, numeric non-root user, no compilers, one image for the
operator, the pump and the worker. (Building it needs Docker: the e2e test does.)"""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from chartkit import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
COMPILERS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|apt-get install|apk add|python3?-dev)\b")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr in _instructions(DOCKERFILE.read_text()):
        if instr[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    return stages


def test_hadolint_clean() -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_would_catch_a_problem(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the `latest` tag


def test_pinned_slim_python_base_in_every_stage() -> None:
    text = DOCKERFILE.read_text()
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert default, "the base image is an ARG with a default"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", default.group(1)), default.group(1)
    froms = [args for stage in _stages() for word, args in stage if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms), froms


def test_final_stage_installs_the_built_wheel_and_nothing_else() -> None:
    build, final = _stages()[0], _stages()[-1]
    build_runs = " ".join(args for word, args in build if word == "RUN")
    assert "pip wheel" in build_runs and "[operator]" in build_runs
    final_runs = " ".join(args for word, args in final if word == "RUN")
    assert "from=build" in final_runs and "--no-index" in final_runs, \
        "the final stage installs only the wheels of the build stage"
    assert not COMPILERS.search(final_runs), "no compilers or system packages in the final image"
    assert not [args for word, args in final if word in ("COPY", "ADD") and "--from" not in args], \
        "no source tree in the final image"


def test_numeric_non_root_user() -> None:
    users = [args for word, args in _stages()[-1] if word == "USER"]
    assert users, "the final stage sets USER"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert m, f"USER must be numeric (runAsNonRoot cannot check a name): {users[-1]!r}"
    assert int(m.group(1)) >= 10000 and (m.group(2) is None or int(m.group(2)) != 0)


def test_one_image_for_operator_pump_and_worker() -> None:
    cmds = [args for word, args in _stages()[-1] if word == "CMD"]
    assert cmds == ['["xml-pipeline-operator"]']
    assert not [1 for word, _ in _stages()[-1] if word == "ENTRYPOINT"], \
        "no ENTRYPOINT: the operator sets `xml-pipeline pump|worker` as the pod's command"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"xml-pipeline", "xml-pipeline-operator"} <= set(scripts)
    assert 'command: ["xml-pipeline-operator"]' in (CHART / "templates" / "deployment.yaml").read_text()


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "LICENSE", "library", "operator"}
