# syntax=docker/dockerfile:1
# kubenurse-otel image:
#   docker build -t ghcr.io/kubenurse-otel/kubenurse:0.1.0 .
#
# The base is pinned to a patch release in both stages (they must stay the same: the
# venv's interpreter link points into the base image). Pin the digest too when you
# publish, from `docker buildx imagetools inspect python:3.11.14-slim`:
#   FROM python:3.11.14-slim@sha256:<index digest> AS build
# (no registry is reachable where this file is tested, so no digest is filled in).

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

FROM python:3.11.14-slim
LABEL org.opencontainers.image.title="kubenurse-otel" \
      org.opencontainers.image.description="Kubernetes network probe: kubenurse-compatible metrics, OpenTelemetry traces" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kubenurse /opt/kubenurse
# Read-only root filesystem: no bytecode writes, logs unbuffered to stdout, and a
# HOME that does not exist so nothing can quietly write there. glibc's malloc instead of
# pymalloc: what a burst of connections used goes back to the kernel once they close
# (malloc_trim), instead of staying pinned in half-empty arenas (bench/bench_hostile.py).
ENV PATH=/opt/kubenurse/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONMALLOC=malloc \
    HOME=/nonexistent
# Numeric, so runAsNonRoot can verify it; the same uid as the DaemonSet's runAsUser.
USER 65532:65532
EXPOSE 8080/tcp 8443/tcp 8080/udp
ENTRYPOINT ["kubenurse"]
