"""Where the real components are: `.ci/components` builds them into
${KUBENURSE_COMPONENTS:-~/.cache/kubenurse-components}/bin; tests look there first, then on PATH.
A missing one skips its tests (and CI=true turns that skip into a failure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubenurse_sandbox.real import components_dir as cache_dir
from kubenurse_sandbox.real import find_component as find

__all__ = ["cache_dir", "find", "need"]


def need(name: str) -> Path:
    """The binary, or skip saying how to build it."""
    path = find(name)
    if path is None:
        pytest.skip(f"{name} not built: run .ci/components {name} (it builds into {cache_dir()}/bin)")
    return path
