"""One check = one GET, timed phase by phase, traced as a CLIENT span, recorded by a sink."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import propagate, trace

from probe import __version__, names
from probe.checks import certs, failures, httptrace, spans
from probe.checks.resolver import TimedResolver
from probe.checks.result import CheckResult, Target
from probe.settings import Settings

USER_AGENT = f"kubenurse/{__version__}"
# Generous enough for any small body; a target that streams forever is cut off here.
MAX_BODY_BYTES = 1 << 20


def build_ssl_context(settings: Settings, *, verify: bool = True) -> ssl.SSLContext:
    """System CAs + the service-account CA + KUBENURSE_EXTRA_CA; no verification at all
    when `verify` is False."""
    context = httptrace.TimedSSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_default_certs()
    sa_ca = Path(settings.serviceaccount_dir) / "ca.crt"
    if sa_ca.is_file():
        # A broken mounted CA must not stop the other checks; the TLS checks will say so.
        with contextlib.suppress(OSError, ssl.SSLError):
            context.load_verify_locations(cafile=str(sa_ca))
    if settings.extra_ca_file:
        context.load_verify_locations(cafile=settings.extra_ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class HttpChecker:
    """Performs checks. `record` is called with each result inside the check's span."""

    def __init__(
        self,
        settings: Settings,
        *,
        record: Callable[[CheckResult], None] = lambda _r: None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._settings = settings
        self._record = record
        self._tracer = tracer or trace.get_tracer(names.TRACER_NAME)
        self._ssl = build_ssl_context(settings, verify=not settings.insecure)
        # KUBENURSE_INSECURE never covers the checks that carry the service-account token:
        # the API server's CA is in the service-account CA bundle, and an unverified peer
        # could be anyone.
        self._token_ssl = build_ssl_context(settings) if settings.insecure else self._ssl
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self._settings
        connector = aiohttp.TCPConnector(
            ssl=self._ssl,
            # Go's DisableKeepAlives unless reuse is asked for: every check then measures
            # DNS, connect and TLS afresh, which is the point of a network probe.
            force_close=not s.reuse_connections,
            use_dns_cache=False,
            resolver=TimedResolver(),
            limit=0,
            socket_factory=httptrace.socket_factory,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=s.check_timeout, connect=s.check_connect_timeout),
            trace_configs=[httptrace.trace_config()],
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _token(self) -> str | None:
        # Read every time: projected service-account tokens are rotated on disk.
        try:
            return (Path(self._settings.serviceaccount_dir) / "token").read_text().strip() or None
        except OSError:
            return None

    async def check(self, target: Target) -> CheckResult:
        timeline = httptrace.begin()
        span = spans.start_client_span(self._tracer, target, timeline)
        with trace.use_span(span, end_on_exit=False):
            headers = dict(target.headers)
            if target.send_token and (token := self._token()):
                headers["Authorization"] = f"Bearer {token}"
            propagate.inject(headers)
            try:
                result = await self._request(target, headers, timeline)
            except Exception as e:  # never let one check take the round down
                result = self._failed(target, e, names.ROUND_TRIP_ERROR, timeline)
            context = span.get_span_context()
            result = dataclasses.replace(
                result,
                timing_source=timeline.source,
                retransmits=timeline.retransmits(),
                trace_id=format(context.trace_id, "032x") if context.is_valid and context.trace_flags.sampled else None,
            )
            spans.finish_client_span(self._tracer, span, result, timeline)
            # After the span ended: a second fetch of a failed peer's certificate is no part of the check.
            result = await self._with_cert_expiry(result, target, timeline)
            self._record(result)
        return result

    def _failed(
        self, target: Target, error: BaseException, event: str, timeline: httptrace.Timeline
    ) -> CheckResult:
        failure = failures.explain(
            error,
            event,
            host=urlsplit(target.url).hostname or target.url,
            peer=timeline.peer,
            last_event=failures.last_event(timeline.marks),
            timeout=self._settings.check_timeout,
            connect_timeout=self._settings.check_connect_timeout,
        )
        return CheckResult(
            target.check_type, failure.summary, target,
            error_event=failure.event, events=timeline.offsets(), error_type=failure.error_type,
        )

    async def _with_cert_expiry(self, result: CheckResult, target: Target, timeline: httptrace.Timeline) -> CheckResult:
        """Note when the peer's certificates expire. A handshake that failed leaves none to
        read: then ask the peer again, without verifying, only for its certificates."""
        if timeline.ssl_object is None:
            return result
        chain = certs.peer_chain(timeline.ssl_object)
        if not chain and result.error_event == names.TLS_HANDSHAKE_DONE and timeline.peer is not None:
            host = urlsplit(target.url).hostname
            sni = None if host is None or certs.is_ip(host) else host
            chain = await certs.fetch_chain(*timeline.peer, sni, self._settings.check_connect_timeout)
        expiry = certs.earliest_not_after(chain)
        return result if expiry is None else dataclasses.replace(result, cert_not_after=expiry)

    async def _request(self, target: Target, headers: dict[str, str], timeline: httptrace.Timeline) -> CheckResult:
        assert self._session is not None, "HttpChecker.start() first"
        try:
            # The outer deadline is a backstop: aiohttp's own timeout should always fire first.
            async with asyncio.timeout(self._settings.check_timeout + 1):
                # Redirects are followed like Go's client does, except where a token is sent:
                # the token goes to the API server and nowhere else, not even by redirect.
                redirects = not target.send_token
                context = self._token_ssl if target.send_token else self._ssl
                async with self._session.get(
                    target.url, headers=headers, allow_redirects=redirects, ssl=context
                ) as resp:
                    # The request's duration ends when the answer reached us (its first byte),
                    # not when our parser was done with it, and counts network time only.
                    timeline.mark(names.GOT_FIRST_RESP_BYTE)
                    duration = timeline.duration()
                    await resp.content.read(MAX_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as e:
            return self._failed(target, e, httptrace.failed_event(e, timeline), timeline)
        events = timeline.offsets()
        if resp.status == 200:
            return CheckResult(target.check_type, names.OK, target, 200, None, duration, events)
        event = names.status_code_event(resp.status)
        summary = f"{event}: unexpected status code {resp.status} {resp.reason or ''}".rstrip()
        return CheckResult(target.check_type, summary, target, resp.status, event, duration, events)


