"""tests/ci_skips.py: under CI=true a skip is a failure; elsewhere it stays a skip."""

from __future__ import annotations

import pytest

SKIPPING = """
import pytest

def test_tool_missing():
    pytest.skip("promtool not installed")

@pytest.mark.skipif(True, reason="needs root")
def test_not_root():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_runs():
    pass
"""


@pytest.mark.parametrize("ci", ["true", "", "false"])
def test_skips_fail_only_in_ci(ci: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(SKIPPING)
    result = pytester.runpytest_inprocess("-p", "tests.ci_skips", "-p", "no:cacheprovider")
    if ci == "true":
        result.assert_outcomes(passed=1, failed=1, errors=1, xfailed=1)
        result.stdout.fnmatch_lines(["*CI=true does not allow*promtool not installed*"])
    else:
        result.assert_outcomes(passed=1, skipped=2, xfailed=1)
