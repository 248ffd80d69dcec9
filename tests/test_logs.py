"""The log formats against hostile values (issue 11 item 2) and a full file table (item 5)."""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import unicodedata
from collections.abc import Iterator

import pytest

from probe import logs

# What a hostile API server or client can put in a value: a forged second line (CR and LF,
# NEL and the Unicode separators), terminal escapes, a bidi override, DEL, a NUL, and
# a tag character beyond the BMP.
HOSTILE = (
    "pod-a\r\nlevel=error msg=\"forged\"\rtime=0 \x1b[2J\x1b]0;title\x07 \x00 \x7f \x85 \u2028 \u2029 "
    "\u202egnp.exe \u200b \U000e0041 \x08 end"
)
READABLE = "café ✓ naïve"  # printable Unicode stays as it is
# No space, quote or equals sign: a value a formatter might think safe to leave bare.
BARE_LOOKING = "node-b\r\x1b[1A\x1b[2Kforged\x7f\u2028"


def control_characters(line: str) -> list[str]:
    return [c for c in line if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """The real handler configure() installs, writing to a buffer instead of stderr."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    yield logging.getLogger("probe.test"), buffer
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def install(buffer: io.StringIO, log_format: str) -> None:
    logs.configure(log_format)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)


def parse_logfmt(line: str) -> dict[str, str]:
    fields = {}
    for m in re.finditer(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        key, value = m[1], m[2]
        fields[key] = json.loads(value) if value.startswith('"') else value
    return fields


@pytest.mark.parametrize("log_format", ["json", "logfmt"])
def test_every_control_character_is_escaped_and_the_value_survives(
    captured: tuple[logging.Logger, io.StringIO], log_format: str
) -> None:
    log, buffer = captured
    install(buffer, log_format)
    log.warning(
        "check failed: %s", HOSTILE, extra={"pod": HOSTILE, "node": BARE_LOOKING, "plain": "ok", "readable": READABLE}
    )
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        log.exception("boom")
    text = buffer.getvalue()
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) == 3, "one line per record, whatever the values hold"
    for line in lines[:2]:
        assert control_characters(line) == [], line
        assert all(c.isprintable() for c in line), line
    first = json.loads(lines[0]) if log_format == "json" else parse_logfmt(lines[0])
    assert first["pod"] == HOSTILE, "escaped, not dropped: the value reads back exactly"
    assert first["node"] == BARE_LOOKING
    assert first["msg"] == f"check failed: {HOSTILE}"
    assert first["plain"] == "ok"
    assert first["readable"] == READABLE
    assert "level" in first and "forged" not in first.get("level", "")
    second = json.loads(lines[1]) if log_format == "json" else parse_logfmt(lines[1])
    assert HOSTILE in second["exception"]
    if log_format == "logfmt":
        assert " plain=ok " in lines[0] or lines[0].endswith(" plain=ok"), "safe values stay bare"
        assert READABLE in lines[0], "printable Unicode is not turned into escapes"


def test_logfmt_keys_cannot_break_the_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, buffer = captured
    install(buffer, "logfmt")
    log.info("x", extra={"bad key=\r\nlevel": "v"})
    line = buffer.getvalue().rstrip("\n")
    assert "\n" not in line and "\r" not in line
    assert parse_logfmt(line)["bad_key___level"] == "v"


def emfile_error() -> OSError:
    return OSError(errno.EMFILE, "Too many open files")


def test_too_many_open_files_is_logged_once_per_interval() -> None:
    now = [0.0]
    limiter = logs.EmfileFilter(interval=10.0, clock=lambda: now[0])
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(limiter)
    log = logging.getLogger("probe.test.emfile")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        for i in range(2_000):  # what asyncio and every failing check say, all at once
            now[0] = i * 0.001
            try:
                raise emfile_error()
            except OSError:
                log.error("socket.accept() out of system resource", exc_info=True)
            log.warning("check failed", extra={"error": "connect_done: ... [Too many open files]"})
        log.info("unrelated")  # other lines are never held back
        now[0] = 12.0
        log.warning("check failed", extra={"error": "[Errno 24] Too many open files"})
    finally:
        log.removeHandler(handler)
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert [r["msg"] for r in records] == ["socket.accept() out of system resource", "unrelated", "check failed"]
    assert records[2]["suppressed"] == 3_999
