"""checkov (its Kubernetes policies) over the rendered chart, once for all scenarios; each skipped
check is justified in tests/packaging/.checkov.yaml."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

CONFIG = Path(__file__).parent / ".checkov.yaml"
CHECKOV = Path(sys.executable).parent / "checkov"


def test_checkov_passes_on_every_scenario(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    for name, objects in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    # A deliberately bad copy of the operator Deployment, in the same (single, slow) run: proves that
    # checkov really looks at our files and would fail them.
    deploy = copy.deepcopy(next(o for o in rendered["defaults"] if o["kind"] == "Deployment"))
    deploy["metadata"]["name"] = "canary-bad"
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    (tmp_path / "canary-bad.yaml").write_text(yaml.safe_dump(deploy))

    result = subprocess.run(
        [str(CHECKOV), "-d", str(tmp_path), "--config-file", str(CONFIG), "-o", "json"],
        capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0
    failed = report["results"]["failed_checks"]
    # podUserIds=platform leaves the user id to the platform on purpose (OpenShift assigns a high one
    # per namespace): "run as a high UID" cannot be seen in those manifests, and is all we accept there.
    platform_only = {("CKV_K8S_40", "/platform-user-ids.yaml"),
                     # The self-signed webhook writes its CA into the chart's one MutatingWebhookConfiguration:
                     # get/patch restricted by resourceNames to that object (test_chart_rbac checks it).
                     ("CKV_K8S_155", "/webhook.yaml")}
    ours = [f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in failed
            if "canary-bad" not in c["resource"] and (c["check_id"], c["file_path"]) not in platform_only]
    assert not ours, "checkov failures on the chart:\n" + "\n".join(ours)
    canary = {c["check_id"] for c in failed if "canary-bad" in c["resource"]}
    assert {"CKV_K8S_16", "CKV_K8S_20"} <= canary  # privileged, allowPrivilegeEscalation
    assert report["summary"]["passed"] > 100


def test_every_skipped_check_is_justified() -> None:
    lines = CONFIG.read_text().splitlines()
    start = lines.index("skip-check:")
    entries = [ln for ln in lines[start + 1:] if ln.startswith("  - ")]
    assert entries
    for line in entries:
        assert re.fullmatch(r"  - CKV2?_K8S_\d+  # \S.{20,}", line), f"unjustified skip: {line!r}"
    skipped = yaml.safe_load(CONFIG.read_text())["skip-check"]
    assert len(skipped) == len(entries) == len(set(skipped))
