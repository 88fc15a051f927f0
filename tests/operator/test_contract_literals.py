"""The chart, the CRD and the rendered manifests cannot import xml_pipeline.contract: their copies of
its values (API group, kind, plural, version, labels, config path, default-prefix space, the Redis
port of the shared Redis's policy) must equal the contract's."""
from __future__ import annotations

import re

import yaml
from operator_harness import CRD_PATH, ROOT

from xml_pipeline import contract
from xml_pipeline_operator.desired.naming import REDIS_PORT

CHART = ROOT / "charts" / "xml-pipeline-operator"
TEXT_FILES = sorted([*CHART.glob("templates/*"), *CHART.glob("crds/*.yaml"), CHART / "Chart.yaml",
                     *(ROOT / "manifests").rglob("*.yaml")])


def _crd() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(CRD_PATH.read_text())


def test_crd_api_coordinates_are_the_contracts() -> None:
    crd = _crd()
    assert crd["metadata"]["name"] == f"{contract.PLURAL}.{contract.GROUP}"
    assert crd["spec"]["group"] == contract.GROUP
    assert crd["spec"]["names"]["kind"] == contract.KIND and crd["spec"]["names"]["plural"] == contract.PLURAL
    assert [v["name"] for v in crd["spec"]["versions"]] == [contract.VERSION]
    assert crd["metadata"]["labels"][contract.LABEL_NAME] == contract.APP_NAME
    assert crd["metadata"]["labels"][contract.LABEL_MANAGED_BY] == contract.MANAGED_BY
    assert CRD_PATH.name == f"{contract.PLURAL}.{contract.GROUP}.yaml"
    chart_text = (CHART / "Chart.yaml").read_text()
    assert f"kind: {contract.KIND}" in chart_text and f"version: {contract.VERSION}" in chart_text
    assert f"name: {contract.PLURAL}.{contract.GROUP}" in chart_text


def test_crd_names_the_contracts_config_path_and_prefix_space() -> None:
    text = CRD_PATH.read_text()
    assert contract.CONFIG_PATH in text
    for path in re.findall(r"/etc/[\w./-]+", text):
        # The config file, or its directory (named where user mounts are refused at or under it).
        assert path.rstrip(".,") in (contract.CONFIG_PATH, contract.CONFIG_DIR), path
    # The CEL rule of shared mode: the prefix space and the shape of a default prefix.
    (rule,) = [r for r in re.findall(r'rule: "(.*)"', text) if "startsWith('xp:')" in r or "matches('^xp:" in r]
    assert f"startsWith('{contract.DEFAULT_PREFIX_SPACE}')" in rule
    pattern = re.search(r"matches\('(.*?)'\)", rule)
    assert pattern is not None
    assert re.match(pattern.group(1), contract.default_prefix("team-a", "orders"))
    assert not re.match(pattern.group(1), contract.default_prefix("team-a", "orders").replace(".", ":", 1))


def test_chart_and_manifest_literals_equal_the_contract() -> None:
    """Every literal the templates and manifests write for a contract label or API name."""
    checked = 0
    for path in TEXT_FILES:
        text = path.read_text()
        for value in re.findall(rf"{re.escape(contract.LABEL_NAME)}: ([\w.-]+)\s*$", text, re.M):
            # The operator's own objects are named after the chart; the organism's pods after the app.
            assert value in (contract.APP_NAME, "xml-pipeline-operator"), (path, value)
            checked += 1
        for value in re.findall(rf"{re.escape(contract.LABEL_MANAGED_BY)}: ([\w.-]+)\s*$", text, re.M):
            # The operator's own objects are Helm's (rendered: "Helm"); the organism's are the operator's.
            assert value in (contract.MANAGED_BY, "Helm"), (path, value)
            checked += 1
        for groups in re.findall(r'apiGroups: \[([^\]]*)\]\s*\n\s*resources: \[([^\]]*organisms[^\]]*)\]', text):
            assert groups[0].strip().strip('"') == contract.GROUP, (path, groups)
            assert all(r.strip().strip('"').split("/")[0] == contract.PLURAL for r in groups[1].split(",")), \
                (path, groups)
            checked += 1
        for key in re.findall(r"\b(xml-pipeline\.dev/[\w-]+):", text):
            assert key in (contract.LABEL_ORGANISM, contract.LABEL_CLIENT, contract.LABEL_REDIS_CLIENT,
                           f"{contract.GROUP}/rotate-credentials"), (path, key)
    assert checked > 10


def test_shared_redis_policy_admits_the_contracts_pods() -> None:
    text = (CHART / "templates" / "shared-redis.yaml").read_text()
    assert f"{contract.LABEL_NAME}: {contract.APP_NAME}" in text
    assert f"{contract.LABEL_MANAGED_BY}: {contract.MANAGED_BY}" in text
    assert f"key: {contract.LABEL_COMPONENT}" in text
    assert f'values: ["{contract.ROLES[0]}", "{contract.ROLES[1]}"]' in text
    assert f"port: {REDIS_PORT}" in text


def test_the_operator_writes_exactly_the_environment_the_library_reads() -> None:
    from test_operator_desired import by_name, container, make

    _, state = make({"workers": {"replicas": 1}})
    for role in contract.ROLES:
        c = container(by_name(state)[f"Deployment/orders-{role}"])
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert set(env) == contract.ENV_NAMES
        assert env[contract.ENV_ROLE] == role and c["command"][:2] == ["xml-pipeline", role]
        assert env[contract.ENV_CONFIG] == contract.CONFIG_PATH
        # The library accepts the pod's role for the command the pod runs.
        assert contract.check_role(c["command"][1], env) == role  # type: ignore[arg-type]
