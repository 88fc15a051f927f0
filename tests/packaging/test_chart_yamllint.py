"""yamllint over the chart's non-template YAML, the generated manifests and our tool configs
(templates are Go templates, not YAML: their output is checked by the render tests instead)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chartkit import CHART, ROOT

CONFIG = Path(__file__).parent / "yamllint.yaml"
YAMLLINT = Path(sys.executable).parent / "yamllint"
FILES = [
    CHART / "Chart.yaml",
    CHART / "values.yaml",
    *sorted((CHART / "crds").glob("*.yaml")),
    ROOT / "manifests" / "xml-pipeline-operator.yaml",
    ROOT / "manifests" / "Kustomization",
    Path(__file__).parent / ".checkov.yaml",
    CONFIG,
]


def _lint(*files: Path) -> subprocess.CompletedProcess[str]:
    # Relative paths from the repository root: the config's `ignore` patterns are written that way.
    return subprocess.run(
        [str(YAMLLINT), "-f", "parsable", "-c", str(CONFIG),
         *(str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f) for f in files)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_yamllint_clean() -> None:
    assert all(f.is_file() for f in FILES), [str(f) for f in FILES if not f.is_file()]
    result = _lint(*FILES)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_yamllint_would_catch_a_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:   [1,2]\n")  # duplicate key, bad spacing
    result = _lint(bad)
    assert result.returncode != 0 and "key-duplicates" in result.stdout
