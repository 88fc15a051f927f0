"""Our own check of the Kubernetes Pod Security Standards, "restricted" profile (which includes
"baseline"), plus the project's extra rule: a read-only root filesystem.

Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.30+ text), so
that every pod the chart renders and every pod the operator builds can be checked offline, without an
API server's admission plugin. `violations(pod_spec)` returns human-readable findings; empty = OK.
Use `pod_specs(obj)` to find the pod spec(s) in any workload object.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Baseline: capabilities that may be added. Restricted narrows this to NET_BIND_SERVICE.
RESTRICTED_ADDABLE_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
# Restricted: the only volume types allowed.
RESTRICTED_VOLUME_TYPES = frozenset({
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
})
# Baseline: the "safe" sysctls.
SAFE_SYSCTLS = frozenset({
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
})
ALLOWED_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t",
                                   "container_engine_t"})
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
ALLOWED_APPARMOR = frozenset({"RuntimeDefault", "Localhost"})

# Objects whose pod template lives at spec.template.spec; CronJob one level deeper.
_TEMPLATED_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job",
                              "ReplicationController"})


def pod_specs(obj: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield (label, pod spec) for a Pod or any workload object; nothing for other kinds."""
    kind = obj.get("kind")
    name = f"{kind}/{obj.get('metadata', {}).get('name')}"
    if kind == "Pod":
        yield name, obj["spec"]
    elif kind in _TEMPLATED_KINDS:
        yield name, obj["spec"]["template"]["spec"]
    elif kind == "CronJob":
        yield name, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield f"{field}[{c.get('name')}]", c


def violations(spec: Mapping[str, Any], *, read_only_root: bool = True) -> list[str]:
    """Every way `spec` (a PodSpec as a dict) breaks the restricted profile; [] when it complies."""
    out: list[str] = []
    psc: Mapping[str, Any] = spec.get("securityContext") or {}
    containers = list(_containers(spec))
    if not spec.get("containers"):
        out.append("pod has no containers")

    # --- baseline -------------------------------------------------------------------------------
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"spec.{field} must be unset or false")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("securityContext.windowsOptions.hostProcess must not be true")
    for vol in spec.get("volumes") or []:
        kinds = [k for k in vol if k != "name"]
        if "hostPath" in kinds:
            out.append(f"volume {vol.get('name')}: hostPath volumes are forbidden")
        elif not set(kinds) <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {vol.get('name')}: type {kinds} not allowed by restricted "
                       f"(allowed: {sorted(RESTRICTED_VOLUME_TYPES)})")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    out.extend(_selinux("securityContext", psc))
    out.extend(_apparmor("securityContext", psc))

    # --- restricted, pod level -------------------------------------------------------------------
    pod_non_root = psc.get("runAsNonRoot") is True
    if psc.get("runAsNonRoot") is False:
        out.append("securityContext.runAsNonRoot must not be false")
    if psc.get("runAsUser") == 0:
        out.append("securityContext.runAsUser must not be 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP:
        out.append(f"securityContext.seccompProfile.type {pod_seccomp!r} not allowed "
                   f"(allowed: {sorted(ALLOWED_SECCOMP)})")

    # --- per container ----------------------------------------------------------------------------
    for where, c in containers:
        csc: Mapping[str, Any] = c.get("securityContext") or {}
        if csc.get("privileged"):
            out.append(f"{where}: securityContext.privileged must be false")
        if (csc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess must not be true")
        if csc.get("procMount") not in (None, "Default"):
            out.append(f"{where}: securityContext.procMount must be Default")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"{where}: hostPort {port['hostPort']} is forbidden")
        out.extend(_selinux(f"{where}: securityContext", csc))
        out.extend(_apparmor(f"{where}: securityContext", csc))
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
        if csc.get("runAsNonRoot") is False:
            out.append(f"{where}: securityContext.runAsNonRoot must not be false")
        elif not pod_non_root and csc.get("runAsNonRoot") is not True:
            out.append(f"{where}: runAsNonRoot must be true (in the pod or the container)")
        if csc.get("runAsUser") == 0:
            out.append(f"{where}: securityContext.runAsUser must not be 0")
        seccomp = (csc.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in ALLOWED_SECCOMP:
            out.append(f"{where}: seccompProfile.type {seccomp!r} not allowed")
        elif seccomp is None and pod_seccomp is None:
            out.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost "
                       "(in the pod or the container)")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: securityContext.capabilities.drop must include ALL")
        extra = set(caps.get("add") or []) - RESTRICTED_ADDABLE_CAPABILITIES
        if extra:
            out.append(f"{where}: capabilities.add {sorted(extra)} not allowed "
                       "(only NET_BIND_SERVICE)")
        # --- the project's own rule --------------------------------------------------------------
        if read_only_root and where.startswith(("containers", "initContainers")) \
                and csc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{where}: securityContext.readOnlyRootFilesystem must be true")
    return out


def _selinux(where: str, sc: Mapping[str, Any]) -> list[str]:
    se = sc.get("seLinuxOptions") or {}
    out = []
    if se.get("type", "") not in ALLOWED_SELINUX_TYPES:
        out.append(f"{where}.seLinuxOptions.type {se['type']!r} not allowed")
    for field in ("user", "role"):
        if se.get(field):
            out.append(f"{where}.seLinuxOptions.{field} must be unset")
    return out


def _apparmor(where: str, sc: Mapping[str, Any]) -> list[str]:
    profile = (sc.get("appArmorProfile") or {}).get("type")
    if profile is not None and profile not in ALLOWED_APPARMOR:
        return [f"{where}.appArmorProfile.type {profile!r} not allowed"]
    return []


def check_objects(objects: list[Mapping[str, Any]], *, read_only_root: bool = True) -> dict[str, list[str]]:
    """Violations per workload among `objects` (only the non-compliant ones are listed)."""
    found: dict[str, list[str]] = {}
    for obj in objects:
        for label, spec in pod_specs(obj):
            v = violations(spec, read_only_root=read_only_root)
            if v:
                found[label] = v
    return found
