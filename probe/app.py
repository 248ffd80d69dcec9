"""Wiring: settings -> discovery -> checks -> telemetry -> server, and the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from probe import __version__, resources
from probe.checks import kernel
from probe.checks.pipeline import Pipeline
from probe.checks.rounds import Prober
from probe.discovery import Discovery, Fixed, make_discovery
from probe.discovery.kube import locate
from probe.mesh.events import NAMESPACE as NODE_EVENTS_NAMESPACE
from probe.mesh.events import NodeEventReporter
from probe.mesh.routes import MESH_VIEW, own_node
from probe.neighbours import NeighbourSource, Readiness, StaticReadiness
from probe.server import ServerLimits, Servers, ServerState, build_app, start_servers
from probe.settings import Settings
from probe.telemetry import otel
from probe.telemetry.incoming import IncomingChecks
from probe.telemetry.metrics import Metrics, series_limit
from probe.udpecho import Listening, UdpEcho, start_echo

log = logging.getLogger("probe")

#: How long the final flush to a collector may take when the probe stops.
TELEMETRY_FLUSH_SECONDS = 3.0


class Probe:
    """One running probe: its checks, its telemetry and its servers."""

    def __init__(
        self,
        settings: Settings,
        neighbours: NeighbourSource | None = None,
        readiness: Readiness | None = None,
        *,
        discovery: Discovery | None = None,
        server_limits: ServerLimits | None = None,
    ) -> None:
        self.settings = settings
        self.server_limits = server_limits
        if discovery is None:
            if neighbours is not None:
                discovery = Fixed(neighbours, readiness or StaticReadiness())
            else:
                discovery = make_discovery(settings)
        self.discovery = discovery
        self.neighbours = self.discovery.neighbours
        # Only pods discovery knows, from their own address, count as incoming checks.
        self.incoming = IncomingChecks(pod_ip=self._known_pod_ip)
        resource = otel.build_resource(settings)
        self.tracing = otel.build_tracing(settings, resource)
        limit = series_limit(settings.neighbour_limit, len(settings.extra_checks))
        otlp_reader = otel.build_otlp_metric_reader(settings, limit)
        self.metrics = Metrics(
            buckets=settings.histogram_buckets,
            incoming=self.incoming.count,
            resource=resource,
            extra_readers=[otlp_reader] if otlp_reader else [],
            cardinality_limit=limit,
        )
        tracer = otel.tracer(self.tracing)
        self.checker = Pipeline(settings, record=self.metrics.record, tracer=tracer)
        self.prober = Prober(
            settings, self.neighbours, self.checker.check, check_many=self.checker.check_many,
            on_departed=self._forget_series,
        )
        self.state = ServerState(
            last_round=lambda: self.prober.last_round,
            neighbourhood=self.neighbours.current,
            node_schedulable=self.discovery.readiness.node_schedulable,
            incoming=self.incoming,
            extra=self._alive_extra,
            eligible=getattr(self.neighbours, "eligible", tuple),
            udp_arrivals=lambda: self.udp_echo.recent() if self.udp_echo is not None else {},
            listed=getattr(self.neighbours, "listed", None),
        )
        self.app = build_app(settings, self.state, self.metrics, tracer, server_limits)
        self.servers: Servers | None = None
        self._rounds: asyncio.Task[None] | None = None
        self.node_events = node_event_reporter(settings, self.app, self.neighbours)
        self._node_events: asyncio.Task[None] | None = None
        self.udp_echo: UdpEcho | None = None
        self._udp_transport: Listening | None = None

    def _known_pod_ip(self, name: str) -> str | None:
        lookup = getattr(self.neighbours, "pod_ip", None)
        return lookup(name) if lookup is not None else None

    def _alive_extra(self) -> dict[str, object]:
        extra: dict[str, object] = {}
        if self.udp_echo is not None:
            extra["udp_echo"] = self.udp_echo.stats.as_alive()
        if self.servers is not None:
            guard = self.servers.guard
            extra["server"] = {
                "connections": guard.count,
                "refused_too_large": guard.cut - guard.shed,
                "closed_at_memory_ceiling": guard.shed,
                "rss_bytes": resources.rss_bytes(),
                "memory_ceiling_bytes": guard.ceiling,
            }
        if self.tracing is None:
            return extra
        exporter = self.tracing.exporter
        return {
            **extra,
            "otlp": {
                "spans_exported": exporter.exported,
                "spans_dropped": exporter.dropped,
                "spans_export_failed": exporter.failed,
                "spans_dropped_queue_full": exporter.queue_full,
            }
        }

    def _forget_series(self, check_types: set[str]) -> None:
        dropped = self.metrics.forget(check_types)
        log.info("neighbours left", extra={"checks": sorted(check_types), "series_dropped": dropped})

    async def start(self) -> None:
        try:
            await self.checker.start()
            await self.discovery.start()
            self.servers = await start_servers(self.settings, self.app, self.server_limits)
            self._udp_transport, self.udp_echo = await start_echo(self.settings.listen_host, self.settings.http_port)
        except BaseException:
            await self.stop()  # e.g. the port is taken: release what was opened, then say so
            raise
        self._rounds = asyncio.create_task(self.prober.run(), name="rounds")
        if self.node_events is not None:
            self._node_events = asyncio.create_task(self.node_events.run(), name="node-events")
        timing = kernel.capabilities()
        log.info(
            "probe started",
            extra={
                "version": __version__,
                "http_port": self.settings.http_port,
                "pod": self.settings.pod_name,
                "node": self.settings.node_name,
                "timing_source": timing.source,
                "timing": timing.describe(),
            },
        )

    def begin_shutdown(self) -> None:
        """/ready answers 503 from now on; the servers keep answering."""
        self.state.shutting_down = True

    async def stop(self) -> None:
        self.begin_shutdown()
        for task in (self._rounds, self._node_events):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.node_events is not None:
            await self.node_events.close()
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        if self.servers is not None:
            await self.servers.cleanup()
        await self.discovery.stop()
        await self.checker.close()
        # Final flush of spans and metrics, side by side, each within the budget.
        flushes = [asyncio.to_thread(self.metrics.shutdown, TELEMETRY_FLUSH_SECONDS)]
        if self.tracing is not None:
            flushes.append(asyncio.to_thread(self.tracing.shutdown, TELEMETRY_FLUSH_SECONDS))
        await asyncio.gather(*flushes)


#: How long a thread may wait for the interpreter while the loop is busy (Python's default is
#: 5 ms). A DNS lookup's end is noted on its own thread once it has the interpreter back, so
#: this bounds how much a busy probe can add to a DNS figure.
SWITCH_INTERVAL = 0.001


def node_event_reporter(
    settings: Settings, app: web.Application, neighbours: NeighbourSource
) -> NodeEventReporter | None:
    """With KUBENURSE_NODE_EVENTS: the reporter, or None (and why) when it cannot post."""
    if not settings.node_events:
        return None
    credentials = locate(settings)
    if isinstance(credentials, str):
        log.warning("node events off", extra={"reason": credentials})
        return None
    eligible = getattr(neighbours, "eligible", tuple)
    return NodeEventReporter(
        credentials,
        app[MESH_VIEW],
        namespace=NODE_EVENTS_NAMESPACE,
        pod=settings.pod_name,
        own_node=lambda: own_node(settings, neighbours.current()),
        eligible_nodes=lambda: [n.node_name for n in eligible()],
    )


async def serve(settings: Settings, neighbours: NeighbourSource | None = None) -> None:
    """Run until SIGTERM/SIGINT; then report not-ready for the shutdown duration and stop.
    A second signal during that time stops at once. `neighbours` replaces discovery."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    before, after = resources.raise_file_limit()
    if after != before:
        log.info("open-files limit raised", extra={"from": before, "to": after})
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the ports open: no window without them
        loop.add_signal_handler(sig, stop.set)
    probe = Probe(settings, neighbours)
    await probe.start()
    await stop.wait()
    stop.clear()
    grace = settings.shutdown_duration
    log.info(
        "shutting down",
        extra={
            "grace_seconds": grace,
            "detail": f"/ready answers 503 for {grace:g}s (KUBENURSE_SHUTDOWN_DURATION), then the servers stop;"
            " a second Ctrl-C or SIGTERM stops now",
        },
    )
    probe.begin_shutdown()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), grace)
        log.info("second signal: stopping now")
    await probe.stop()
    log.info("stopped")
