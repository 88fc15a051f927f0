"""The environment the chart gives the operator is what the operator reads: every XPO_* variable is
one it knows, and its settings parser accepts the values of every scenario."""
from __future__ import annotations

import inspect
import re
from typing import Any

import pytest

from chartkit import SCENARIOS, env_of, one
from xml_pipeline_operator import settings as operator_settings
from xml_pipeline_operator.settings import OperatorSettings


def _operator_env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deploy = one(objects, "Deployment")
    return env_of(deploy["spec"]["template"]["spec"]["containers"][0])


def test_chart_sets_only_variables_the_operator_reads(rendered: dict[str, list[dict[str, Any]]]) -> None:
    known = set(re.findall(r'"(XPO_[A-Z_]+)"', inspect.getsource(operator_settings)))
    assert {"XPO_NAMESPACES", "XPO_DEFAULT_IMAGE", "XPO_DEFAULT_TTL", "XPO_SHARED_REDIS_PASSWORD"} <= known
    for scenario, objects in rendered.items():
        names = {n for n in _operator_env(objects) if n.startswith("XPO_")}
        assert names <= known, f"{scenario}: unknown to the operator: {sorted(names - known)}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_accepts_the_chart_settings(rendered: dict[str, list[dict[str, Any]]], scenario: str,
                                            tmp_path: Any) -> None:
    env = _operator_env(rendered[scenario])
    # Values from Secrets arrive at runtime; the parser only needs some password.
    plain = {k: (v if isinstance(v, str) else "from-a-secret") for k, v in env.items()}
    if "XPO_SHARED_REDIS_CA_FILE" in plain:  # a file the chart mounts; read at start
        ca = tmp_path / "ca.crt"
        ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        plain["XPO_SHARED_REDIS_CA_FILE"] = str(ca)
    s = OperatorSettings.from_env(plain)
    values = SCENARIOS[scenario]
    assert s.namespaces == tuple(values.get("watchNamespaces", ()))
    assert s.default_ttl == values.get("organismDefaults", {}).get("ttl", 86400)
    assert s.health_port == values.get("healthPort", 8080)
    mode = values.get("sharedRedis", {}).get("mode", "disabled")
    assert (s.shared_redis_url is None) == (mode == "disabled")
    if mode != "disabled":
        assert isinstance(env["XPO_SHARED_REDIS_PASSWORD"], dict), "the password comes from a Secret"
