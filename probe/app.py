"""Wiring: settings -> discovery -> checks -> telemetry -> server, and the lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from probe.checks.http import HttpChecker
from probe.checks.rounds import Prober
from probe.discovery import Discovery, Fixed, make_discovery
from probe.neighbours import NeighbourSource, Readiness, StaticReadiness
from probe.server import ServerState, build_app, start_servers
from probe.settings import Settings
from probe.telemetry import otel
from probe.telemetry.incoming import IncomingChecks
from probe.telemetry.metrics import Metrics

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
    ) -> None:
        self.settings = settings
        if discovery is None:
            if neighbours is not None:
                discovery = Fixed(neighbours, readiness or StaticReadiness())
            else:
                discovery = make_discovery(settings)
        self.discovery = discovery
        self.neighbours = self.discovery.neighbours
        self.incoming = IncomingChecks()
        resource = otel.build_resource(settings)
        self.tracing = otel.build_tracing(settings, resource)
        otlp_reader = otel.build_otlp_metric_reader(settings)
        self.metrics = Metrics(
            buckets=settings.histogram_buckets,
            incoming=self.incoming.count,
            resource=resource,
            extra_readers=[otlp_reader] if otlp_reader else [],
        )
        tracer = otel.tracer(self.tracing)
        self.checker = HttpChecker(settings, record=self.metrics.record, tracer=tracer)
        self.prober = Prober(settings, self.neighbours, self.checker.check, on_departed=self._forget_series)
        self.state = ServerState(
            last_round=lambda: self.prober.last_round,
            neighbourhood=self.neighbours.current,
            node_schedulable=self.discovery.readiness.node_schedulable,
            incoming=self.incoming,
            extra=self._alive_extra,
        )
        self.app = build_app(settings, self.state, self.metrics, tracer)
        self._runner: web.AppRunner | None = None
        self._rounds: asyncio.Task[None] | None = None

    def _alive_extra(self) -> dict[str, object]:
        if self.tracing is None:
            return {}
        exporter = self.tracing.exporter
        return {"otlp": {"spans_exported": exporter.exported, "spans_dropped": exporter.dropped}}

    def _forget_series(self, check_types: set[str]) -> None:
        dropped = self.metrics.forget(check_types)
        log.info("neighbours left", extra={"checks": sorted(check_types), "series_dropped": dropped})

    async def start(self) -> None:
        try:
            await self.checker.start()
            await self.discovery.start()
            self._runner = await start_servers(self.settings, self.app)
        except BaseException:
            await self.stop()  # e.g. the port is taken: release what was opened, then say so
            raise
        self._rounds = asyncio.create_task(self.prober.run(), name="rounds")
        log.info(
            "probe started",
            extra={
                "http_port": self.settings.http_port,
                "pod": self.settings.pod_name,
                "node": self.settings.node_name,
            },
        )

    def begin_shutdown(self) -> None:
        """/ready answers 503 from now on; the servers keep answering."""
        self.state.shutting_down = True

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._rounds is not None:
            self._rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rounds
        if self._runner is not None:
            await self._runner.cleanup()
        await self.discovery.stop()
        await self.checker.close()
        # Final flush of spans and metrics, side by side, each within the budget.
        flushes = [asyncio.to_thread(self.metrics.shutdown, TELEMETRY_FLUSH_SECONDS)]
        if self.tracing is not None:
            flushes.append(asyncio.to_thread(self.tracing.shutdown, TELEMETRY_FLUSH_SECONDS))
        await asyncio.gather(*flushes)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT; then report not-ready for the shutdown duration and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the ports open: no window without them
        loop.add_signal_handler(sig, stop.set)
    probe = Probe(settings)
    await probe.start()
    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_duration})
    probe.begin_shutdown()
    await asyncio.sleep(settings.shutdown_duration)
    await probe.stop()
    log.info("stopped")
