"""When the certificates a TLS peer presented expire.

`earliest_not_after` reads notAfter straight from the DER (a few dozen lines of TLV walking,
no X.509 library needed at run time). Which certificates we get to see depends on Python:
3.13 gives the whole chain the peer sent (`get_unverified_chain`), 3.11 only the leaf
(`getpeercert(binary_form=True)`). A handshake that failed verification leaves nothing to
read, so `fetch_chain` asks the same peer again without verifying: an expired or untrusted
certificate still reports when it expires(d).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import ssl
from collections.abc import Iterable

from probe.checkurls import is_ip

__all__ = ["earliest_not_after", "fetch_chain", "is_ip", "not_after", "peer_chain"]

_SEQUENCE = 0x30
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_CONTEXT_0 = 0xA0


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 0 < n <= 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _time(tag: int, text: bytes) -> float:
    s = text.decode("ascii")
    if not s.endswith("Z"):
        raise ValueError(f"certificate time {s!r} is not UTC")
    if tag == _UTC_TIME:  # YYMMDDHHMM[SS]Z; RFC 5280: YY < 50 is 20YY
        year = int(s[:2])
        s = f"{2000 + year if year < 50 else 1900 + year}{s[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError("not a certificate time")
    digits = s[:-1]
    if len(digits) == 12:
        digits += "00"
    if len(digits) != 14 or not digits.isdigit():
        raise ValueError(f"certificate time {s!r} is not YYYYMMDDHHMMSSZ")
    fields = (int(digits[0:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10]), int(digits[10:12]))
    return float(calendar.timegm((*fields, int(digits[12:14]), 0, 0, 0)))


def not_after(der: bytes) -> float:
    """notAfter of one DER certificate, as Unix seconds."""
    tag, start, _ = _tlv(der, 0)  # Certificate
    if tag != _SEQUENCE:
        raise ValueError("not a DER certificate")
    tag, pos, end = _tlv(der, start)  # tbsCertificate
    if tag != _SEQUENCE:
        raise ValueError("not a DER certificate")
    tag, _, after = _tlv(der, pos)
    if tag == _CONTEXT_0:  # [0] version
        pos = after
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _tlv(der, pos)
    tag, pos, _ = _tlv(der, pos)  # validity
    if tag != _SEQUENCE or pos >= end:
        raise ValueError("no validity in certificate")
    _, _, pos = _tlv(der, pos)  # notBefore
    tag, start, stop = _tlv(der, pos)
    return _time(tag, der[start:stop])


def earliest_not_after(chain: Iterable[bytes]) -> float | None:
    """The earliest notAfter among the certificates; None for an empty chain.
    A certificate we cannot read does not hide the others."""
    times = []
    for der in chain:
        with contextlib.suppress(ValueError, IndexError, UnicodeDecodeError):
            times.append(not_after(der))
    return min(times) if times else None


def peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The DER certificates the peer presented: the whole chain where Python can say (3.13+),
    else the leaf. Empty before or after a failed handshake."""
    unverified = getattr(ssl_object, "get_unverified_chain", None)
    try:
        if unverified is not None:
            chain = unverified()
            if chain:
                return [c if isinstance(c, bytes) else c.public_bytes() for c in chain]
        leaf = ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError, OSError):  # handshake not done
        return []
    return [leaf] if leaf else []


async def fetch_chain(host: str, port: int, server_hostname: str | None, timeout: float) -> list[bytes]:
    """Connect to the peer once more without verifying anything, only to read its
    certificates. Empty when that fails too."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    writer = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=server_hostname or "")
            ssl_object = writer.get_extra_info("ssl_object")
            return peer_chain(ssl_object) if ssl_object is not None else []
    except (OSError, TimeoutError, ssl.SSLError, ValueError):
        return []
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
