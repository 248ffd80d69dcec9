# syntax=docker/dockerfile:1
# kubenurse-otel image:
#   docker build -t ghcr.io/kubenurse-otel/kubenurse:0.1.0 .
#
# Two stages. `build` (python:3.11.14-slim) installs the pinned lock into a venv, then
# deploy/image/rootfs.sh gathers what runs: the interpreter and standard library, the venv
# minus pip, the shared libraries they load (ldd), the CA bundle, passwd/group. The runtime
# stage is that tree on `scratch`: no shell, no package manager, no pip.
#
# The base is pinned to a patch release. Pin its digest too when you publish: resolve it
# with `docker buildx imagetools inspect python:3.11.14-slim` and write
#   FROM python:3.11.14-slim@sha256:<index digest> AS build
# (no registry is reachable where this file is tested, so no digest is filled in here).
# docs/security.md says how to check a built image.

FROM python:3.11.14-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kubenurse
# Dependencies first (their layer survives code changes). Wheels only, exactly the
# pinned closure: --no-deps lets nothing unpinned in, `pip check` proves it complete.
COPY requirements.lock /src/requirements.lock
RUN /opt/kubenurse/bin/pip install --only-binary=:all: --no-deps -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY probe /src/probe
# pip compiles the .pyc files here, so the read-only runtime never needs to.
RUN /opt/kubenurse/bin/pip install --no-deps /src \
 && /opt/kubenurse/bin/pip check
COPY deploy/image/rootfs.sh /src/rootfs.sh
RUN sh /src/rootfs.sh /rootfs /usr/local /opt/kubenurse

FROM scratch
LABEL org.opencontainers.image.title="kubenurse-otel" \
      org.opencontainers.image.description="Kubernetes network probe: kubenurse-compatible metrics, OpenTelemetry traces" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11.14-slim"
COPY --from=build /rootfs /
# Read-only root filesystem: no bytecode writes, logs unbuffered to stdout, and a
# HOME that does not exist so nothing can quietly write there. glibc's malloc instead of
# pymalloc: what a burst of connections used goes back to the kernel once they close
# (malloc_trim), instead of staying pinned in half-empty arenas (bench/bench_hostile.py).
# LD_LIBRARY_PATH: libpython lives beside the interpreter, as in the base image.
ENV PATH=/opt/kubenurse/bin:/usr/local/bin \
    LD_LIBRARY_PATH=/usr/local/lib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    HOME=/nonexistent \
    LANG=C.UTF-8
# Numeric, so runAsNonRoot can verify it; the same uid as the DaemonSet's runAsUser.
USER 65532:65532
EXPOSE 8080/tcp 8443/tcp 8080/udp
ENTRYPOINT ["kubenurse"]
