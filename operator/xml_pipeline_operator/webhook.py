"""Injection by label: a mutating admission webhook that configures a team's pods as clients of an organism.

A pod labelled `xml-pipeline.dev/client: <organism>` in the organism's namespace gets, when it is
created, the organism's client identity (desired/binding.py) in one of two forms, chosen by the pod
annotation `xml-pipeline.dev/client-inject`:

- `env` (default): the XP_* environment of the library (XP_BACKEND_TYPE, XP_REDIS_URL, _USERNAME,
  _PASSWORD, _PREFIX, _TTL, XP_SIGNING_KEY) on every container, each value a `secretKeyRef` to the
  `<organism>-binding` Secret -- never a literal, so the webhook never reads a Secret and no secret
  ends up in the pod spec;
- `binding`: the Secret mounted read-only at `/bindings/<organism>` and SERVICE_BINDING_ROOT=/bindings
  (the Service Binding specification's layout; the library's get_shared_backend() finds it).

For an organism whose Redis speaks TLS, env mode also mounts the binding's `ca.crt` (the CA file the
library verifies the server with; binding mode has it already).

A pod naming an Organism that does not exist, or one without a binding (not provisioned yet, or not
on the shared Redis), is refused with a message saying so: admitting it unchanged would start a pod
that fails later with a less helpful error. The MutatingWebhookConfiguration (chart) selects only pods
with the label (objectSelector) and runs with failurePolicy Fail: while the operator is down, labelled
pods wait; no other pod ever passes through the webhook.

Only CREATE is mutated (a pod's containers are immutable afterwards); an UPDATE is admitted as is.
The handler has no side effects, so a dry-run gets the same answer.

TLS: with XPO_WEBHOOK_CERT_DIR (cert-manager's tls.crt/tls.key) the server uses that certificate;
otherwise kopf's server makes a self-signed one for XPO_WEBHOOK_HOST and the operator writes its CA
into the caBundle of the MutatingWebhookConfiguration XPO_WEBHOOK_CONFIGURATION (patching only that
one object by name).
"""
from __future__ import annotations

import base64
import copy
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import kopf
from xml_pipeline import contract

from .desired import naming
from .desired.binding import INJECT_ANNOTATION, binding_name
from .desired.tls import CA_KEY
from .kube import Kube

logger = logging.getLogger(__name__)

CLIENT_LABEL = naming.CLIENT_LABEL
INJECT_MODES = ("env", "binding")
BINDING_ROOT = "/bindings"
BINDING_VOLUME = "xml-pipeline-binding"
#: The XP_* variables and the binding key each comes from.
ENV_FROM_BINDING: tuple[tuple[str, str], ...] = (
    (contract.ENV_REDIS_URL, "url"),
    (contract.ENV_REDIS_USERNAME, "username"),
    (contract.ENV_REDIS_PASSWORD, "password"),
    (contract.ENV_REDIS_PREFIX, "prefix"),
    (contract.ENV_REDIS_TTL, "ttl"),
    (contract.ENV_SIGNING_KEY, "signing-key"),
)
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class Refused(Exception):
    """The pod may not be admitted; the message is what `kubectl apply` prints."""


def injected_env(organism: str) -> list[dict[str, Any]]:
    secret = binding_name(organism)
    return [{"name": contract.ENV_BACKEND_TYPE, "value": "redis"},
            *({"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
              for var, key in ENV_FROM_BINDING)]


def check_organism(namespace: str, organism: str, body: Mapping[str, Any] | None) -> None:
    """Raise Refused unless Organism `namespace/organism` exists and publishes a binding."""
    where = f"label {CLIENT_LABEL}={organism!r}"
    if not organism or not _DNS_SUBDOMAIN.match(organism):
        raise Refused(f"{where}: not an Organism name (a DNS subdomain name, e.g. 'orders')")
    if body is None:
        raise Refused(f"{where}: there is no Organism {organism!r} in namespace {namespace!r} "
                      "(a client pod must run in its organism's namespace)")
    bound = ((body.get("status") or {}).get("binding") or {}).get("name")
    if bound != binding_name(organism):
        mode = (((body.get("spec") or {}).get("backend") or {}).get("redis") or {}).get("mode")
        why = ("client identities exist for organisms on the shared or a dedicated Redis (not on an external one)"
               if mode == "external" else "it is not provisioned yet (its status.binding is empty; retry once it is Ready)")
        raise Refused(f"{where}: Organism {namespace}/{organism} has no client binding: {why}")


def uses_tls(body: Mapping[str, Any] | None) -> bool:
    """The Organism's Redis speaks TLS (status.redis.endpoint is rediss://...)."""
    endpoint = (((body or {}).get("status") or {}).get("redis") or {}).get("endpoint") or ""
    return str(endpoint).startswith("rediss")


def _mount_binding(containers: list[dict[str, Any]], organism: str) -> None:
    for c in containers:
        env = [e for e in c.get("env") or [] if e.get("name") != "SERVICE_BINDING_ROOT"]
        c["env"] = env + [{"name": "SERVICE_BINDING_ROOT", "value": BINDING_ROOT}]
        mounts = [m for m in c.get("volumeMounts") or [] if m.get("name") != BINDING_VOLUME]
        c["volumeMounts"] = mounts + [{"name": BINDING_VOLUME, "mountPath": f"{BINDING_ROOT}/{organism}",
                                       "readOnly": True}]


def pod_changes(pod: Mapping[str, Any], organism: str, *, tls: bool = False) -> dict[str, Any]:
    """The new `spec.containers` (and `spec.volumes` in binding mode) of a client pod. Pure.

    Variables we inject replace any of the same name the pod set (the label asked for this organism);
    everything else in the pod is kept as it is. `tls` (the organism's Redis speaks TLS): in env mode
    the binding's ca.crt is mounted too (with `type` and `provider`, so the library finds it under
    SERVICE_BINDING_ROOT: no XP_* variable names a CA file); optional, as a Redis whose certificate
    the system trust store accepts has no ca.crt."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    mode = annotations.get(INJECT_ANNOTATION, "env")
    if mode not in INJECT_MODES:
        raise Refused(f"annotation {INJECT_ANNOTATION}={mode!r}: allowed values are {', '.join(INJECT_MODES)}")
    spec = pod.get("spec") or {}
    containers = copy.deepcopy(list(spec.get("containers") or []))
    changes: dict[str, Any] = {"containers": containers}
    volumes = [v for v in copy.deepcopy(list(spec.get("volumes") or [])) if v.get("name") != BINDING_VOLUME]
    if mode == "env":
        ours = injected_env(organism)
        names = {e["name"] for e in ours}
        for c in containers:
            c["env"] = [e for e in c.get("env") or [] if e.get("name") not in names] + copy.deepcopy(ours)
        if tls:
            volumes.append({"name": BINDING_VOLUME, "secret": {
                "secretName": binding_name(organism), "optional": True,
                "items": [{"key": k, "path": k} for k in ("type", "provider", CA_KEY)]}})
            changes["volumes"] = volumes
            _mount_binding(containers, organism)
        return changes
    volumes.append({"name": BINDING_VOLUME, "secret": {"secretName": binding_name(organism)}})
    changes["volumes"] = volumes
    _mount_binding(containers, organism)
    return changes


# -- kopf ------------------------------------------------------------------------------------------
def register(registry: kopf.OperatorRegistry, get_organism: Callable[[str, str], Mapping[str, Any] | None]) -> None:
    """The mutating handler for client pods (`get_organism(namespace, name)` reads an Organism)."""

    @kopf.on.mutate("v1", "pods", registry=registry, id="client-pods", operations=["CREATE"],
                    labels={CLIENT_LABEL: kopf.PRESENT}, side_effects=False)
    def inject_client(body: kopf.Body, namespace: str | None, patch: kopf.Patch, **kwargs: Any) -> None:
        # kopf routes every operation the configuration sends here (`operations` only shapes the
        # configuration it would manage); a pod's containers are immutable once created.
        if kwargs.get("operation") != "CREATE":
            return
        labels = body.get("metadata", {}).get("labels") or {}
        organism = str(labels.get(CLIENT_LABEL, ""))
        ns = namespace or body.get("metadata", {}).get("namespace") or ""
        try:
            found = get_organism(ns, organism) if _DNS_SUBDOMAIN.match(organism) else None
            check_organism(ns, organism, found)
            changes = pod_changes(dict(body), organism, tls=uses_tls(found))
        except Refused as e:
            raise kopf.AdmissionError(str(e), code=403) from None
        for key, value in changes.items():
            patch.spec[key] = value


class CaPublishingServer:
    """kopf's WebhookServer, and after it made its self-signed certificate, the CA written into the
    caBundle of our MutatingWebhookConfiguration (so the API server trusts it)."""

    def __init__(self, server: kopf.WebhookServer, publish: Callable[[str], None] | None) -> None:
        self.server, self.publish = server, publish

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        import asyncio
        async for client_config in self.server(fn):
            ca = client_config.get("caBundle")
            if ca and self.publish is not None:
                try:
                    await asyncio.get_running_loop().run_in_executor(None, self.publish, ca)
                except Exception as e:  # noqa: BLE001 - serve anyway; the chart's caBundle or cert-manager may hold
                    logger.warning("could not publish the webhook CA: %s", e)
            yield client_config


def make_server(*, port: int, host: str | None, cert_dir: str | None,
                publish: Callable[[str], None] | None, addr: str = "0.0.0.0") -> CaPublishingServer:
    """kopf's HTTPS webhook server for the admission requests (listening on `addr`:`port`).

    With `cert_dir` (cert-manager's tls.crt/tls.key, renewed in place: kopf reloads changed files) the
    certificate is that one. Otherwise a self-signed certificate for `host` is made at start (its own
    CA, handed to kopf as the client config's caBundle and to `publish`). It is made here rather than
    by kopf's generator, whose certbuilder/oscrypto dependency cannot load current OpenSSL 3 releases.
    """
    if cert_dir:
        d = Path(cert_dir)
        server = kopf.WebhookServer(addr=addr, port=port, host=host, certfile=str(d / "tls.crt"),
                                    pkeyfile=str(d / "tls.key"))
        return CaPublishingServer(server, None)  # cert-manager injects the CA itself
    import tempfile
    cert, key = self_signed(host or "localhost", extra_sans=[addr] if addr not in ("0.0.0.0", "::") else [])
    d = Path(tempfile.mkdtemp(prefix="xpo-webhook-"))
    (d / "tls.crt").write_bytes(cert)
    (d / "tls.key").write_bytes(key)
    (d / "tls.key").chmod(0o600)
    server = kopf.WebhookServer(addr=addr, port=port, host=host, certfile=str(d / "tls.crt"),
                                pkeyfile=str(d / "tls.key"), cadata=cert)
    return CaPublishingServer(server, publish)


def self_signed(host: str, *, extra_sans: Sequence[str] = (), days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed certificate (its own CA) and its EC private key, PEM, for `host` (+ SANs)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
    sans: list[x509.GeneralName] = []
    for n in dict.fromkeys([host, *extra_sans]):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def ca_bundle_patch(configuration: Mapping[str, Any], ca_b64: str) -> dict[str, Any] | None:
    """A merge patch giving every webhook of `configuration` the caBundle `ca_b64` (lists are replaced
    whole by a merge patch, so the webhooks are sent complete); None when all have it already."""
    hooks = copy.deepcopy(list(configuration.get("webhooks") or []))
    if all((h.get("clientConfig") or {}).get("caBundle") == ca_b64 for h in hooks):
        return None
    for h in hooks:
        h.setdefault("clientConfig", {})["caBundle"] = ca_b64
    return {"webhooks": hooks}


def publish_ca(kube: Kube, name: str, ca_b64: str) -> None:
    """Write the CA into MutatingWebhookConfiguration `name` (one GET; a PATCH only if it differs)."""
    base64.b64decode(ca_b64, validate=True)  # never write anything but a CA bundle
    current = kube.get("MutatingWebhookConfiguration", "", name)
    if current is None:
        raise LookupError(f"MutatingWebhookConfiguration {name!r} does not exist (XPO_WEBHOOK_CONFIGURATION)")
    patch = ca_bundle_patch(current, ca_b64)
    if patch is not None:
        kube.patch("MutatingWebhookConfiguration", "", name, patch)
        logger.info("webhook CA written into MutatingWebhookConfiguration %s", name)
