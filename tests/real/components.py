"""Where the real components are: `.ci/components` builds them into
${KUBENURSE_COMPONENTS:-~/.cache/kubenurse-components}/bin; tests look there first, then on PATH.
A missing one skips its tests (and CI=true turns that skip into a failure)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NAMES = ("helm", "kube-apiserver", "etcd", "otelcol", "jaeger")


def cache_dir() -> Path:
    return Path(os.environ.get("KUBENURSE_COMPONENTS") or Path.home() / ".cache" / "kubenurse-components")


def find(name: str) -> Path | None:
    built = cache_dir() / "bin" / name
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(name)
    return Path(found) if found else None


def need(name: str) -> Path:
    """The binary, or skip saying how to build it."""
    path = find(name)
    if path is None:
        pytest.skip(f"{name} not built: run .ci/components {name} (it builds into {cache_dir()}/bin)")
    return path
