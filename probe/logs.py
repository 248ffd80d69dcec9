"""Structured logs: one line per record, JSON (default) or logfmt (KUBENURSE_LOG_FORMAT).

Fields passed with `extra=` become keys of their own, so a line about a failed check reads
`level=warning msg="check failed" check=path_node-b event=connect_done error="..."`.

Values come from the API server and from requests, so no control character reaches the
log raw in either format: a hostile value can neither start a line of its own nor move a
terminal's cursor. "Too many open files" is said at most once every EMFILE_LOG_SECONDS.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import sys
import time
from collections.abc import Callable

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    fields: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            fields[key] = value
    if record.exc_info:
        fields["exception"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # ensure_ascii escapes every control character (and everything past ASCII).
        return json.dumps(_fields(record), default=str)


def _escape_char(c: str) -> str:
    code = ord(c)
    if code > 0xFFFF:  # as JSON spells it: a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


_JSON_ESCAPES = {"\"": '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(text: str) -> str:
    """A JSON string literal with every non-printable character escaped (control, format,
    separator and unassigned characters; printable Unicode stays readable)."""
    return '"' + "".join(
        _JSON_ESCAPES.get(c) or (c if c.isprintable() else _escape_char(c)) for c in text
    ) + '"'


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return _quote(text)


_KEY_UNSAFE = re.compile(r'[^\w.\-]')


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # logfmt has no null: a field without a value (node unknown outside a cluster) is left
        # out rather than printed as `node=None`.
        return " ".join(
            f"{_KEY_UNSAFE.sub('_', k) or '_'}={_logfmt_value(v)}" for k, v in _fields(record).items() if v is not None
        )


#: A full file table makes every accept, check and export fail at once, each with a log line
#: (124,411 lines in 29 s were seen); one line per this many seconds says it as well.
EMFILE_LOG_SECONDS = 10.0
_EMFILE_TEXT = ("Too many open files", "Too many open files in system")


def _about_emfile(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    texts = [record.getMessage(), *(v for k, v in record.__dict__.items() if k not in _STANDARD and isinstance(v, str))]
    return any(t in text for text in texts for t in _EMFILE_TEXT)


class EmfileFilter(logging.Filter):
    """Lets one "too many open files" record through per EMFILE_LOG_SECONDS; the next one
    that passes says how many were held back (`suppressed`)."""

    def __init__(self, interval: float = EMFILE_LOG_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval, self._clock = interval, clock
        self._next = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not _about_emfile(record):
            return True
        now = self._clock()
        if now < self._next:
            self.suppressed += 1
            return False
        self._next = now + self._interval
        if self.suppressed:
            record.suppressed = self.suppressed
            self.suppressed = 0
        return True


def configure(log_format: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter() if log_format == "logfmt" else JsonFormatter())
    handler.addFilter(EmfileFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp logs every bad request from a scanner at error level with a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
