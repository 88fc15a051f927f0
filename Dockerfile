# syntax=docker/dockerfile:1
# One image for every part of xml-pipeline:
#   xml-pipeline-operator   the operator (default command)
#   xml-pipeline pump       an organism's pump     (command set by the operator)
#   xml-pipeline worker     an organism's worker   (command set by the operator)
# Build: docker build -t ghcr.io/xml-pipeline/xml-pipeline:0.1.0 .

# An exact, slim base (Debian 12); bump deliberately. Both stages use the same one, so the wheels
# built in the first stage match the interpreter of the second.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- stage 1: build the project's wheel and collect the wheels of its dependencies -------------
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY library/ library/
COPY operator/ operator/
# requirements.txt pins the project to the exact version just built, with the operator extra.
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /dist . \
 && wheel="$(find /dist -name 'xml_pipeline-*.whl')" \
 && pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels "${wheel}[operator]" \
 && version="$(basename "${wheel}" | cut -d- -f2)" \
 && echo "xml-pipeline[operator]==${version}" > /wheels/requirements.txt

# ---- stage 2: the runtime image (no compiler, no build tools, no source tree) ---------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="xml-pipeline" \
      org.opencontainers.image.description="xml-pipeline operator, pump and worker" \
      org.opencontainers.image.source="https://github.com/xml-pipeline/xml-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0"
# The root filesystem is read-only in the cluster: no .pyc writes (pip precompiles at install), a
# HOME under /tmp (an emptyDir), and unbuffered logs for `kubectl logs`.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Install from the wheels of stage 1 only (--no-index: nothing is fetched at this point), through a
# bind mount so that the wheels themselves do not end up in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index --find-links=/wheels \
        -r /wheels/requirements.txt \
 && groupadd --system --gid 10001 xp \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin xp
# Numeric, so that Kubernetes can verify runAsNonRoot without resolving a user name.
USER 10001:10001
WORKDIR /tmp
# /healthz and /metrics of the operator.
EXPOSE 8080
CMD ["xml-pipeline-operator"]
