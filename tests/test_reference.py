"""docs/reference.md against the code: every variable the settings parser reads, every metric
family a real probe exposes (with its type and labels), every name in probe/names.py and
every endpoint the server routes is documented there. Adding one without documenting it
fails here."""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from probe import names
from probe.app import Probe
from probe.neighbours import StaticNeighbours
from probe.settings import KNOWN_VARIABLES, load_settings
from probe.telemetry.metrics import Metrics
from tests.conftest import StartTarget, free_port

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"


def reference() -> str:
    return REFERENCE.read_text()


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of every table row under `heading` (up to the next heading of its level or above)."""
    level = len(heading) - len(heading.lstrip("#"))
    section = text.split(heading + "\n", 1)[1]
    section = re.split(rf"\n#{{1,{level}}} ", section, maxsplit=1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows[1:] if rows else rows  # without the header row


def documented_variables(text: str) -> set[str]:
    """Every `NAME` in the first column of the settings tables."""
    found: set[str] = set()
    for row in table_rows(text, "## Settings"):
        found.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0]))
    return found


class _Recording(Mapping[str, str]):
    """An environment that notes every variable asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_the_parser_reads() -> set[str]:
    env = _Recording()
    load_settings(env)
    return env.asked


def test_every_variable_the_settings_parser_reads_is_documented() -> None:
    read = variables_the_parser_reads()
    assert read >= KNOWN_VARIABLES, "the recording environment misses some reads"
    assert any(v.startswith("OTEL_") for v in read), "the OTEL_* the probe validates are read too"
    missing = read - documented_variables(reference())
    assert not missing, f"read by probe/settings.py but not in docs/reference.md (Settings): {sorted(missing)}"


def test_the_settings_check_can_fail() -> None:
    text = reference()
    row = next(line for line in text.splitlines() if line.startswith("| `KUBENURSE_CHECK_INTERVAL`"))
    assert "KUBENURSE_CHECK_INTERVAL" not in documented_variables(text.replace(row + "\n", ""))
    assert "KUBENURSE_CHECK_INTERVAL" in documented_variables(text)


# --- metrics -----------------------------------------------------------------------------------


def documented_families(text: str) -> dict[str, tuple[str, set[str]]]:
    """family -> (type, labels) from the Metrics table."""
    families = {}
    for row in table_rows(text, "## Metrics"):
        name = row[0].strip("`")
        labels = {label.strip() for label in row[2].split(",") if label.strip()}
        families[name] = (row[1], labels)
    return families


def exposed_name(family_name: str, kind: str) -> str:
    """The parser gives counters without `_total`; the page names them as /metrics prints them."""
    return f"{family_name}_total" if kind == "counter" else family_name


@pytest.fixture
async def busy_probe(start_target: StartTarget, server_tls: ssl.SSLContext, ca_file: Path) -> AsyncIterator[int]:
    """A real probe whose checks produce every family they can: answers, failures, HTTPS."""
    good = await start_target()
    secure = await start_target(ssl_context=server_tls)
    port = free_port()
    settings = load_settings(
        {
            "KUBENURSE_LISTEN_HOST": "127.0.0.1",
            "KUBENURSE_HTTP_PORT": str(port),
            "KUBENURSE_CHECK_INTERVAL": "100ms",
            "KUBENURSE_SERVICE_URL": good.url,
            "KUBENURSE_EXTRA_CA": str(ca_file),
            "KUBENURSE_EXTRA_CHECKS": (
                f"secure:{secure.url}/|fails:{good.url}/status/500|refused:tcp://127.0.0.1:{free_port()}"
            ),
            "POD_NAME": "pod-a",
        }
    )
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    await probe.start()
    deadline = asyncio.get_running_loop().time() + 10
    while probe.prober.rounds < 2:
        assert asyncio.get_running_loop().time() < deadline, "rounds did not run"
        await asyncio.sleep(0.02)
    yield port
    await probe.stop()


async def test_every_family_on_a_real_metrics_page_is_documented(busy_probe: int) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{busy_probe}/metrics") as r:
        text = await r.text()
    documented = documented_families(reference())
    exposed = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("kubenurse_")}
    assert len(exposed) >= 7, sorted(exposed)  # every check family, errors, TLS, build info
    for name, family in exposed.items():
        shown = exposed_name(name, family.type)
        assert shown in documented, f"{shown} is on /metrics but not in docs/reference.md (Metrics)"
        kind, labels = documented[shown]
        assert kind == family.type, f"{shown}: documented as {kind}, exposed as {family.type}"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, f"{shown}: {sorted(sample.labels)}, documented {labels}"
    assert "process_*" in documented
    assert any(f.name.startswith("process_") for f in text_string_to_metric_families(text))


def metric_names_in_code() -> set[str]:
    """Every instrument name probe/names.py defines (what the code can ever expose)."""
    return {
        value
        for key, value in vars(names).items()
        if key.isupper() and isinstance(value, str) and re.fullmatch(r"kubenurse_[a-z0-9_]+", value)
    }


def test_every_metric_name_in_the_code_is_documented() -> None:
    """Families that need a condition this test does not create (UDP, a retransmit) are
    still caught: each instrument name in probe/names.py must be a documented family,
    give or take the suffix the exporter appends (`_seconds`, `_total`)."""
    documented = documented_families(reference())
    code = metric_names_in_code()
    assert {names.REQUEST_DURATION, names.ERRORS, names.BUILD_INFO} <= code
    for name in code:
        candidates = {name, f"{name}_seconds", f"{name}_total", f"{name}_seconds_total"}
        assert candidates & set(documented), f"{name} (probe/names.py) is not in docs/reference.md (Metrics)"


def test_the_metrics_check_can_fail() -> None:
    text = reference()
    row = next(line for line in text.splitlines() if line.startswith("| `kubenurse_errors_total`"))
    assert "kubenurse_errors_total" not in documented_families(text.replace(row + "\n", ""))


def test_a_fresh_probe_shows_the_families_the_reference_says_it_shows() -> None:
    """'A family appears with its first sample': what /metrics holds before any check ran."""
    metrics = Metrics(buckets=(0.1, 1), incoming=lambda: 0)
    try:
        body, _ = metrics.exposition("text/plain")
    finally:
        metrics.shutdown()
    fresh = {
        exposed_name(f.name, f.type)
        for f in text_string_to_metric_families(body.decode())
        if f.name.startswith("kubenurse_")
    }
    said = reference().split("**A family appears with its first sample.**", 1)[1].split("families come with", 1)[0]
    assert fresh == set(re.findall(r"`(kubenurse_[a-z_]+)`", said)), (fresh, said)


# --- names, endpoints ---------------------------------------------------------------------------


def test_every_span_attribute_and_event_name_is_documented() -> None:
    text = reference()
    attributes = {v for k, v in vars(names).items() if k.startswith("ATTR_") and isinstance(v, str)}
    missing = {a for a in attributes if f"`{a}`" not in text}
    assert not missing, f"span attributes in probe/names.py but not in docs/reference.md: {sorted(missing)}"
    missing = {e for e in names.EVENTS if f"`{e}`" not in text}
    assert not missing, f"events not in docs/reference.md: {sorted(missing)}"


async def test_every_endpoint_the_server_routes_is_documented() -> None:
    settings = load_settings({"KUBENURSE_LISTEN_HOST": "127.0.0.1", "KUBENURSE_HTTP_PORT": str(free_port())})
    probe = Probe(settings, StaticNeighbours.unavailable("test"))
    try:
        routed = {r.canonical for r in probe.app.router.resources()}
    finally:
        await probe.stop()
    documented = {row[0].strip("`") for row in table_rows(reference(), "## Endpoints")}
    assert {"/alive", "/metrics", "/mesh.json"} <= routed
    assert routed <= documented, f"routed but not in docs/reference.md (Endpoints): {sorted(routed - documented)}"
