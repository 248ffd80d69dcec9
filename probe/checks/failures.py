"""Why a check failed, in words for people: what /alive, the logs and the sandbox show.

aiohttp's own texts name internal objects (`ssl:<...TimedSSLContext object at 0x...>`) and
cut off what matters. A failure is data (where it failed, the error's class); the sentence
is made from that data here, at the edge, and names the peer and the limit that was hit.
"""

from __future__ import annotations

import errno
import ssl

import aiohttp

from probe import names
from probe.checks.result import Failure

_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused by {peer}",
    errno.ECONNRESET: "connection reset by {peer}",
    errno.EHOSTUNREACH: "no route to host {peer}",
    errno.ENETUNREACH: "network unreachable for {peer}",
    errno.ETIMEDOUT: "connect to {peer} timed out (the kernel gave up)",
    errno.EMFILE: "too many open files in the probe (connecting to {peer})",
}


def explain(
    error: BaseException,
    event: str,
    *,
    host: str,
    peer: tuple[str, int] | None,
    last_event: str | None,
    timeout: float,
    connect_timeout: float,
) -> Failure:
    """The Failure for `error`, raised at `event` while talking to `host` (`peer` is the
    address of the last connect attempt, `last_event` the last phase event that happened)."""
    where = f"{peer[0]}:{peer[1]}" if peer else host
    kind = type(error).__name__
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        reason = _os_reason(error.os_error) or "no address"
        return Failure(event, kind, f"could not resolve {host}: {reason}")
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        cert_error = error.certificate_error
        reason = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None) or str(cert_error)
        return Failure(event, kind, f"certificate of {where} not accepted: {reason}")
    if isinstance(error, aiohttp.ClientConnectorSSLError | ssl.SSLError):
        ssl_error = error.os_error if isinstance(error, aiohttp.ClientConnectorError) else error
        reason = getattr(ssl_error, "reason", None) or _os_reason(ssl_error) or kind
        return Failure(event, kind, f"TLS handshake with {where} failed: {reason}")
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return Failure(event, kind, f"no connection to {where} within {_seconds(connect_timeout)} (timeout)")
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        template = _ERRNO_TEXT.get(os_error.errno or 0)
        if template:
            return Failure(event, kind, template.format(peer=where))
        return Failure(event, kind, f"cannot connect to {where}: {_os_reason(os_error) or kind}")
    if isinstance(error, TimeoutError | aiohttp.ServerTimeoutError):
        after = f" after {last_event}" if last_event else ""
        return Failure(event, "TimeoutError", f"no answer from {where} within {_seconds(timeout)} (timeout){after}")
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return Failure(event, kind, f"{where} closed the connection without an answer")
    if isinstance(error, aiohttp.ClientOSError):
        template = _ERRNO_TEXT.get(error.errno or 0)
        if template:
            return Failure(event, kind, template.format(peer=where))
        return Failure(event, kind, f"{_os_reason(error) or kind} ({where})")
    if isinstance(error, aiohttp.TooManyRedirects):
        return Failure(event, kind, f"too many redirects from {where}")
    text = str(error).strip()
    return Failure(event, kind, f"{kind}: {text} ({where})" if text else f"{kind} ({where})")


def _os_reason(error: BaseException | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text or None


def _seconds(value: float) -> str:
    return f"{value:g}s"


def last_event(marks: dict[str, int]) -> str | None:
    """The latest phase event that happened, in phase order."""
    happened = [e for e in names.EVENTS if e in marks]
    return happened[-1] if happened else None
