"""In CI (CI=true) a test that would skip (a tool missing, not root) fails instead: a green
run must mean every test ran. Loaded by tests/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


def skips_fail() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if skips_fail() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, which CI=true does not allow: {reason}"
