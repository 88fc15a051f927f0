"""The Organism CRD: structure, examples validated by its schema and CEL rules, bad specs rejected
with the expected message, transition rules (oldSelf) on the prefix."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from operator_harness import CRD_PATH, EXAMPLES, ROOT
from crd_schema import iter_rules, load_crd, openapi_schema, validate
from xml_pipeline.memory.keys import KEY_SPACES
from xml_pipeline_operator import model, settings as op_settings

BAD_SPECS = Path(__file__).parent / "bad_specs"
CRD = load_crd(CRD_PATH)
SCHEMA = openapi_schema(CRD)


def examples() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def bad_specs() -> list[Path]:
    return sorted(BAD_SPECS.glob("*.yaml"))


def expectations(path: Path) -> dict[str, str]:
    """The `# key: value` header lines of a bad spec (schema / cel / model / api-server)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^# (schema|cel|model|api-server): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


# ------------------------------------------------------------------------------------------ structure
def test_crd_names_scope_and_subresources() -> None:
    spec = CRD["spec"]
    assert CRD["metadata"]["name"] == "organisms.xml-pipeline.dev"
    assert spec["group"] == "xml-pipeline.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "Organism", "listKind": "OrganismList", "plural": "organisms",
                             "singular": "organism", "shortNames": ["org"], "categories": ["xml-pipeline"]}
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.workers.replicas", "statusReplicasPath": ".status.workerReplicas",
        "labelSelectorPath": ".status.workerSelector"}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["workerReplicas"]["type"] == "integer" and status["workerSelector"]["type"] == "string"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Backend": ".spec.backend.type", "Redis": ".status.redis.mode", "Prefix": ".status.redis.prefix",
        "TTL": ".status.redis.ttl", "Workers": ".status.workersReady", "Threads": ".status.usage.threads",
        "Ready": '.status.conditions[?(@.type=="Ready")].status', "Age": ".metadata.creationTimestamp",
    }


def _undocumented(schema: dict[str, Any], path: str) -> list[str]:
    missing = []
    for key, sub in (schema.get("properties") or {}).items():
        where = f"{path}.{key}" if path else key
        if where != "metadata" and not sub.get("description"):
            missing.append(where)
        missing += _undocumented(sub, where)
    if "items" in schema:
        missing += _undocumented(schema["items"], f"{path}[]")
    return missing


def test_every_field_has_a_description_for_kubectl_explain() -> None:
    assert SCHEMA.get("description")
    assert _undocumented(SCHEMA, "") == []


def test_manifests_copy_is_identical_to_the_chart_crd() -> None:
    copy_path = ROOT / "manifests" / "crds" / CRD_PATH.name
    assert copy_path.read_bytes() == CRD_PATH.read_bytes(), (
        f"manifests/ drifted: cp {CRD_PATH.relative_to(ROOT)} {copy_path.relative_to(ROOT)}")


def test_cel_rules_agree_with_the_library_and_the_model() -> None:
    rules = {path: [r["rule"] for r in rs] for path, rs in _rules_by_path().items()}
    reserved = re.search(r"\(([a-z|]+)\):", " ".join(rules["spec.backend.redis.prefix"])).group(1)
    assert set(reserved.split("|")) == set(KEY_SPACES)
    assert f"size() <= {model.MAX_NAME_LEN}" in rules[""][0]
    ttl = SCHEMA["properties"]["spec"]["properties"]["backend"]["properties"]["redis"]["properties"]["ttl"]
    assert (ttl["minimum"], ttl["maximum"]) == (op_settings.TTL_MIN, op_settings.TTL_MAX)


def _rules_by_path() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for path, rule in iter_rules(SCHEMA):
        out.setdefault(path, []).append(rule)
    return out


def test_every_cel_rule_has_a_message() -> None:
    assert all(rule.get("message") for _, rule in iter_rules(SCHEMA))


# ------------------------------------------------------------------------------------------- examples
def test_there_is_an_example_per_redis_mode_and_one_for_manager() -> None:
    kinds = set()
    for path in examples():
        spec = yaml.safe_load(path.read_text())["spec"]
        backend = spec.get("backend", {})
        kinds.add(backend.get("type", "redis") if backend.get("type", "redis") != "redis"
                  else backend.get("redis", {}).get("mode", "dedicated"))
    assert {"dedicated", "shared", "external", "manager"} <= kinds


@pytest.mark.parametrize("path", examples(), ids=lambda p: p.name)
def test_example_passes_schema_and_cel(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    assert validate(obj, CRD) == []


@pytest.mark.parametrize("path", examples(), ids=lambda p: p.name)
def test_example_is_accepted_by_the_operator_model(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    obj["metadata"].setdefault("namespace", "default")
    settings = op_settings.OperatorSettings(shared_redis_url="redis://shared.platform.svc:6379")
    org = model.parse_organism(obj, settings)
    assert org.name == obj["metadata"]["name"]


# ------------------------------------------------------------------------------------------ bad specs
def test_there_are_at_least_ten_bad_specs() -> None:
    assert len(bad_specs()) >= 10


@pytest.mark.parametrize("path", bad_specs(), ids=lambda p: p.stem)
def test_bad_spec_is_rejected_by_the_api_schema_with_the_expected_message(path: Path) -> None:
    expect = expectations(path)
    obj = yaml.safe_load(path.read_text())
    messages = [f"{v.path}: {v.message}" for v in validate(obj, CRD)]
    if expect.get("api-server") == "accepts":
        assert messages == []  # honest: the API server cannot catch this one; the model does
        return
    wanted = expect.get("schema") or expect["cel"]
    assert any(wanted in m for m in messages), messages


@pytest.mark.parametrize("path", bad_specs(), ids=lambda p: p.stem)
def test_bad_spec_is_rejected_by_the_model_naming_the_field(path: Path) -> None:
    expect = expectations(path)
    obj = yaml.safe_load(path.read_text())
    obj["metadata"]["namespace"] = "default"
    with pytest.raises(model.SpecError) as err:
        model.parse_organism(obj, op_settings.OperatorSettings())
    assert err.value.field == expect["model"]
    assert err.value.reason == model.reason_for(expect["model"])
    assert str(err.value).startswith(expect["model"] + ":")


# ----------------------------------------------------------------------------------- transition rules
GOOD = yaml.safe_load((EXAMPLES / "organism-shared.yaml").read_text())


def _with(obj: dict[str, Any], **redis: Any) -> dict[str, Any]:
    new = copy.deepcopy(obj)
    for key, value in redis.items():
        if value is None:
            new["spec"]["backend"]["redis"].pop(key, None)
        else:
            new["spec"]["backend"]["redis"][key] = value
    return new


def test_prefix_change_is_refused_by_cel() -> None:
    errors = validate(_with(GOOD, prefix="xp:team-b.bus:"), CRD, old=GOOD)
    assert [e.message for e in errors] == [
        "spec.backend.redis.prefix is immutable: the organism's keys live under its current prefix"]


def test_prefix_removal_and_addition_are_refused_by_cel() -> None:
    removed = _with(GOOD, prefix=None)
    assert any("cannot be added or removed" in e.message for e in validate(removed, CRD, old=GOOD))
    assert any("cannot be added or removed" in e.message for e in validate(GOOD, CRD, old=removed))


def test_other_changes_pass_the_transition_rules() -> None:
    assert validate(_with(GOOD, ttl=600), CRD, old=GOOD) == []
    assert validate(GOOD, CRD, old=GOOD) == []


def test_defaults_are_applied_like_the_api_server() -> None:
    from crd_schema import apply_defaults
    obj = apply_defaults({"spec": {"config": {"listeners": []}, "workers": {}}}, SCHEMA)
    assert obj["spec"]["backend"] == {"type": "redis"}
    assert obj["spec"]["workers"] == {"replicas": 1}


# ------------------------------------------------------------------------------- limits of values
EXTERNAL = yaml.safe_load((EXAMPLES / "organism-external.yaml").read_text())


def _external(url: str) -> dict[str, Any]:
    obj = copy.deepcopy(EXTERNAL)
    obj["spec"]["backend"]["redis"]["external"]["url"] = url
    obj["metadata"].setdefault("namespace", "default")
    return obj


FORBIDDEN_URLS = [
    "redis://169.254.169.254:6379", "redis://169.254.0.1", "rediss://[fe80::1]:6380", "redis://[FEBF::1]",
    "redis://[::ffff:169.254.169.254]:6379", "redis://[::ffff:a9fe:a9fe]:6379",
    "redis://metadata.google.internal", "redis://metadata", "redis://METADATA.google.internal.",
    "redis://100.100.100.200", "redis://[fd00:ec2::254]",
    "redis://2852039166:6379", "redis://0xa9fea9fe", "redis://0251.0376.0251.0376", "redis://169.254.43518",
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_external_url_to_link_local_or_metadata_is_refused_by_cel_and_model(url: str) -> None:
    obj = _external(url)
    errors = validate(obj, CRD)
    assert errors and all(e.path == "spec.backend.redis.external.url" for e in errors), errors
    with pytest.raises(model.SpecError) as err:
        model.parse_organism(obj, op_settings.OperatorSettings())
    assert err.value.field == "spec.backend.redis.external.url"


@pytest.mark.parametrize("url", ["rediss://redis.example.com:6380/0", "redis://10.0.0.5:6379", "redis://redis",
                                 "redis://[2001:db8::1]:6379/1", "redis://169.255.0.1", "redis://cache-1.svc:65535",
                                 "redis://127.0.0.1:6380", "redis://localhost:6380", "redis://[::1]:6380"])
def test_external_url_to_an_ordinary_host_passes(url: str) -> None:
    obj = _external(url)
    assert validate(obj, CRD) == []
    model.parse_organism(obj, op_settings.OperatorSettings())


@pytest.mark.parametrize("url", ["redis://redis.example:0", "redis://redis.example:65536", "redis://redis.example:99999",
                                 "redis://redis.example?x=1", "redis://a b"])
def test_external_url_port_and_shape_are_schema_checked(url: str) -> None:
    assert any("does not match" in e.message for e in validate(_external(url), CRD))
    with pytest.raises(model.SpecError):
        model.parse_organism(_external(url), op_settings.OperatorSettings())


@pytest.mark.parametrize("image", ["ghcr.io/xml-pipeline/xml-pipeline:0.1.0", "redis:7.2.5-alpine", "localhost:5000/xp",
                                   "xp@sha256:" + "a" * 64, "registry.example/team/xp_worker:v1.2"])
def test_good_image_references(image: str) -> None:
    obj = copy.deepcopy(GOOD)
    obj["spec"]["image"] = image
    assert validate(obj, CRD) == []
    obj["metadata"]["namespace"] = "default"
    assert model.parse_organism(obj, op_settings.OperatorSettings(
        shared_redis_url="redis://shared.platform.svc:6379")).image == image


@pytest.mark.parametrize("image", ["xp:1;rm -rf /", "xp:$(id)", "xp:`id`", "xp|nc", "xp:1'", "xp\n", "xp:1&&x"])
def test_image_with_shell_metacharacters_is_refused(image: str) -> None:
    obj = copy.deepcopy(GOOD)
    obj["spec"]["image"] = image
    if not image.endswith("\n"):  # jsonschema's '$' (Python's) passes a trailing newline; the API server's does not
        assert any(e.path == "spec.image" for e in validate(obj, CRD))
    obj["metadata"]["namespace"] = "default"
    with pytest.raises(model.SpecError) as err:
        model.parse_organism(obj, op_settings.OperatorSettings(shared_redis_url="redis://shared.platform.svc:6379"))
    assert err.value.field == "spec.image"


@pytest.mark.parametrize("section,key,value,ok", [
    ("requests", "cpu", "1024", True), ("limits", "cpu", "1025", False), ("limits", "cpu", "1e9", False),
    ("limits", "memory", "4Ti", True), ("limits", "memory", "4097Gi", False), ("requests", "memory", "1e300", False),
    ("requests", "cpu", "-100m", False), ("requests", "cpu", 2, True), ("limits", "memory", 10 ** 15, False),
])
def test_quantity_bounds_in_cel_and_model(section: str, key: str, value: Any, ok: bool) -> None:
    obj = copy.deepcopy(GOOD)
    obj["spec"]["pump"] = {"resources": {section: {key: value}}}
    assert (validate(obj, CRD) == []) is ok
    obj["metadata"]["namespace"] = "default"
    settings = op_settings.OperatorSettings(shared_redis_url="redis://shared.platform.svc:6379")
    if ok:
        model.parse_organism(obj, settings)
    else:
        with pytest.raises(model.SpecError) as err:
            model.parse_organism(obj, settings)
        assert err.value.field == f"spec.pump.resources.{section}.{key}"


def test_requests_at_limits_pass_and_above_fail_in_cel() -> None:
    obj = copy.deepcopy(GOOD)
    obj["spec"]["pump"] = {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                                         "limits": {"cpu": "0.5", "memory": "1024Mi"}}}
    assert validate(obj, CRD) == []
    obj["spec"]["pump"]["resources"]["requests"]["cpu"] = "501m"
    assert [e.message for e in validate(obj, CRD)] == [
        "requests must not be above limits (cpu and memory): such pods are never created"]


def test_cel_rules_use_no_backslash_escapes() -> None:
    # Kubernetes compiles rules with cel-go, whose string literals reject escapes such as '\.' that
    # Python (and so the local evaluator) would accept: rules write '[.]' instead.
    assert [rule["rule"] for _, rule in iter_rules(SCHEMA) if "\\" in rule["rule"]] == []


def test_every_string_a_cel_rule_reads_has_a_max_length() -> None:
    # The API server estimates each CEL rule's cost from the maximum size of what it reads; an
    # unbounded string read by a rule can make the CRD itself be refused. The rules here read
    # their node, its children and grandchildren (resources -> requests -> cpu).
    def walk(schema: dict[str, Any], path: str, below_rule: int) -> list[str]:
        below_rule = 0 if schema.get("x-kubernetes-validations") else below_rule + 1
        out = []
        if below_rule <= 2 and (schema.get("type") == "string" or schema.get("x-kubernetes-int-or-string")) and \
                "maxLength" not in schema and "enum" not in schema and "format" not in schema:
            out.append(path)
        for key, sub in (schema.get("properties") or {}).items():
            out += walk(sub, f"{path}.{key}", below_rule)
        return out
    assert walk(SCHEMA["properties"]["spec"], "spec", 99) == []
