"""The HTTP kind: one GET, timed phase by phase (httptrace.py), and the certificates' expiry."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import propagate

from probe import __version__, names
from probe.checks import certs, failures, httptrace
from probe.checks.resolver import TimedResolver
from probe.checks.result import PHASES, AttributeValue, CheckResult, Facts, Failure, Kind, Outcome, Phase, Target
from probe.checkurls import HttpGet
from probe.settings import Settings
from probe.trust import ClusterCA, Reloading, cluster_ca, pin_to_cluster_ca

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


def api_server_ssl_context(ca: ClusterCA | None) -> ssl.SSLContext:
    """For the two checks that carry the service-account token: the cluster's CA only (the
    service account's ca.crt, else the kubeconfig's: `cluster_ca`), never the system CAs
    nor KUBENURSE_EXTRA_CA, and always verified (KUBENURSE_INSECURE does not apply)."""
    return pin_to_cluster_ca(httptrace.TimedSSLContext(ssl.PROTOCOL_TLS_CLIENT), ca)


class HttpKind(Kind):
    """`http://` and `https://` checks: one session for all of them."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # Both built again when a CA file changes on disk (the next connection uses the new one).
        ca = cluster_ca(settings)
        extra = (settings.extra_ca_file,) if settings.extra_ca_file else ()
        self._ssl = Reloading(
            lambda: build_ssl_context(settings, verify=not settings.insecure),
            lambda: (*(ca.files if ca else ()), *extra), "check CAs",
        )
        # The checks that carry the service-account token get the cluster CA only.
        self._token_ssl = Reloading(lambda: api_server_ssl_context(ca), lambda: ca.files if ca else (), "API-server CA")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self._settings
        connector = aiohttp.TCPConnector(
            ssl=self._ssl.get(),
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

    def attributes(self, target: Target) -> Mapping[str, AttributeValue]:
        url = urlsplit(target.url)
        return {
            "http.request.method": "GET",
            "server.address": url.hostname or "",
            "server.port": url.port or (443 if url.scheme == "https" else 80),
        }

    async def measure(self, target: Target) -> Outcome:
        assert isinstance(target.spec, HttpGet)
        timeline = httptrace.begin()
        headers = dict(target.spec.headers)
        if target.spec.send_token and (token := self._token()):
            headers["Authorization"] = f"Bearer {token}"
        propagate.inject(headers)
        try:
            return await self._request(target, target.spec, headers, timeline)
        except Exception as e:  # explained with what the timeline knows, like every other failure
            return self._failed(target, e, names.ROUND_TRIP_ERROR, timeline)

    def _failed(self, target: Target, error: BaseException, event: str, timeline: httptrace.Timeline) -> Outcome:
        failure = failures.explain(
            error,
            event,
            host=urlsplit(target.url).hostname or target.url,
            peer=timeline.peer,
            last_event=failures.last_event(timeline.marks),
            timeout=self._settings.check_timeout,
            connect_timeout=self._settings.check_connect_timeout,
        )
        return _outcome(timeline, failure=failure)

    async def after_span(self, target: Target, result: CheckResult) -> CheckResult:
        """A handshake that failed leaves no certificates to read: then ask the peer again,
        without verifying, only for its certificates (after the span: no part of the check)."""
        if result.cert_not_after is not None or result.error_event != names.TLS_HANDSHAKE_DONE or not result.peer:
            return result
        host = urlsplit(target.url).hostname
        sni = None if host is None or certs.is_ip(host) else host
        chain = await certs.fetch_chain(*result.peer, sni, self._settings.check_connect_timeout)
        expiry = certs.earliest_not_after(chain)
        return result if expiry is None else dataclasses.replace(result, cert_not_after=expiry)

    async def _request(
        self, target: Target, spec: HttpGet, headers: dict[str, str], timeline: httptrace.Timeline
    ) -> Outcome:
        assert self._session is not None, "HttpKind.start() first"
        try:
            # The outer deadline is a backstop: aiohttp's own timeout should always fire first.
            async with asyncio.timeout(self._settings.check_timeout + 1):
                # Redirects are followed like Go's client does, except where a token is sent:
                # the token goes to the API server and nowhere else, not even by redirect.
                redirects = not spec.send_token
                context = self._token_ssl.get() if spec.send_token else self._ssl.get()
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
        failure = None
        if resp.status != 200:
            reason = f"unexpected status code {resp.status} {resp.reason or ''}".rstrip()
            failure = Failure(names.status_code_event(resp.status), str(resp.status), reason)
        return _outcome(timeline, failure=failure, status_code=resp.status, duration=duration)


def _outcome(
    timeline: httptrace.Timeline, *, failure: Failure | None, status_code: int | None = None,
    duration: float | None = None,
) -> Outcome:
    """The outcome of the request the timeline timed: its phases, figures and certificates."""
    phases = []
    for _, start, done in PHASES:
        if start in timeline.marks:
            started, network = timeline.marks[start], timeline.phase_ns(done)
            end = None if network is None else started + network
            phases.append(Phase(start, done, started, end, timeline.sources.get(done, timeline.source)))
    attributes: dict[str, AttributeValue] = {}
    if status_code is not None:
        attributes["http.response.status_code"] = status_code
    if duration is not None:
        attributes[names.ATTR_NETWORK_DURATION] = duration
    chain = certs.peer_chain(timeline.ssl_object) if timeline.ssl_object is not None else []
    return Outcome(
        phases=tuple(phases),
        events=timeline.offsets(),
        peer=timeline.peer,
        timing_source=timeline.source,
        cert_not_after=certs.earliest_not_after(chain),
        facts=Facts(retransmits=timeline.retransmits(), attributes=attributes),
        failure=failure,
        status_code=status_code,
        duration=duration,
    )
