"""An in-process OTLP receiver (gRPC and HTTP/protobuf) for tests.

Tests point the probe (or a bare SDK exporter) at ``grpc_endpoint`` or ``http_endpoint``
and assert on what really went over the wire, through plain dataclass views of the
decoded requests. The servers run on their own threads so sync tests and asyncio tests
alike can use one receiver without blocking an event loop.

Fault modes for resilience tests, all keeping the same ports:

- ``stop()`` / ``start()``: the ports refuse connections while stopped.
- ``blackhole()``: the ports accept TCP connections and never answer (a client hits its
  own timeout), until ``restore()``.
- ``fail(http_status, grpc_code)``: the servers answer every export with an error,
  until ``restore()``.

Usage::

    with OtlpReceiver() as rx:
        exporter = OTLPSpanExporter(endpoint=rx.grpc_endpoint)
        ...
        span = rx.wait_for(lambda: rx.find_span("check"), timeout=5)
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

T = TypeVar("T")
Transport = Literal["grpc", "http"]
Signal = Literal["traces", "metrics"]

_LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class Received:
    """One export request as it arrived."""

    signal: Signal
    transport: Transport
    headers: Mapping[str, str]  # lower-cased names; gRPC metadata or HTTP headers
    request: trace_service_pb2.ExportTraceServiceRequest | metrics_service_pb2.ExportMetricsServiceRequest


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER", "UNSPECIFIED"
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[SpanEvent]
    status_code: str  # "UNSET", "OK", "ERROR"
    status_message: str
    resource: dict[str, Any]
    scope: str

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass(frozen=True)
class Exemplar:
    value: float
    time_ns: int
    trace_id: str  # "" when the exemplar was not recorded inside a sampled span
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class MetricPoint:
    """One data point, flattened with its metric, scope and resource.

    ``value`` is set for sum and gauge points; ``count``/``sum``/``min``/``max`` for
    histograms; ``buckets`` (upper bound, count; the last bound is +inf) for explicit
    histograms; ``scale``/``zero_count``/``positive``/``negative`` for exponential ones.
    """

    name: str
    unit: str
    description: str
    kind: str  # "sum", "gauge", "histogram", "exponential_histogram", "summary"
    temporality: str  # "CUMULATIVE", "DELTA" or "" (gauges)
    monotonic: bool | None  # sums only
    attributes: dict[str, Any]
    start_ns: int
    time_ns: int
    resource: dict[str, Any]
    scope: str
    value: float | int | None = None
    count: int | None = None
    sum: float | None = None
    min: float | None = None
    max: float | None = None
    buckets: list[tuple[float, int]] = field(default_factory=list)
    scale: int | None = None
    zero_count: int | None = None
    positive: tuple[int, list[int]] | None = None  # (offset, bucket counts)
    negative: tuple[int, list[int]] | None = None
    exemplars: list[Exemplar] = field(default_factory=list)


def any_value(value: AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value (lists and dicts for nested ones)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes_dict(value.kvlist_value.values)
    return getattr(value, which)


def attributes_dict(attributes: Any) -> dict[str, Any]:
    kvs: list[KeyValue] = list(attributes)
    return {kv.key: any_value(kv.value) for kv in kvs}


def _enum_suffix(descriptor: Any, number: int, prefix: str) -> str:
    return str(descriptor.values_by_number[number].name).removeprefix(prefix)


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out: list[Span] = []
    kind_enum = trace_pb2.Span.SpanKind.DESCRIPTOR
    status_enum = trace_pb2.Status.StatusCode.DESCRIPTOR
    for rs in request.resource_spans:
        resource = attributes_dict(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=_enum_suffix(kind_enum, s.kind, "SPAN_KIND_"),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=attributes_dict(s.attributes),
                        events=[
                            SpanEvent(e.name, e.time_unix_nano, attributes_dict(e.attributes))
                            for e in s.events
                        ],
                        status_code=_enum_suffix(status_enum, s.status.code, "STATUS_CODE_"),
                        status_message=s.status.message,
                        resource=resource,
                        scope=ss.scope.name,
                    )
                )
    return out


def _number(point: Any) -> float | int:
    # NumberDataPoint and Exemplar both carry a oneof of as_double / as_int.
    which = point.WhichOneof("value")
    return getattr(point, which) if which else 0


def _exemplars(point: Any) -> list[Exemplar]:
    return [
        Exemplar(
            value=float(_number(e)),
            time_ns=e.time_unix_nano,
            trace_id=e.trace_id.hex(),
            span_id=e.span_id.hex(),
            attributes=attributes_dict(e.filtered_attributes),
        )
        for e in point.exemplars
    ]


def _opt(point: Any, name: str) -> float | None:
    return getattr(point, name) if point.HasField(name) else None


def points_of(request: metrics_service_pb2.ExportMetricsServiceRequest) -> list[MetricPoint]:
    out: list[MetricPoint] = []
    temporality_enum = metrics_pb2.AggregationTemporality.DESCRIPTOR
    for rm in request.resource_metrics:
        resource = attributes_dict(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is None:
                    continue
                data = getattr(m, kind)
                temporality = (
                    _enum_suffix(temporality_enum, data.aggregation_temporality, "AGGREGATION_TEMPORALITY_")
                    if hasattr(data, "aggregation_temporality")
                    else ""
                )
                monotonic = data.is_monotonic if kind == "sum" else None
                for p in data.data_points:
                    common: dict[str, Any] = {
                        "name": m.name,
                        "unit": m.unit,
                        "description": m.description,
                        "kind": kind,
                        "temporality": temporality,
                        "monotonic": monotonic,
                        "attributes": attributes_dict(p.attributes),
                        "start_ns": p.start_time_unix_nano,
                        "time_ns": p.time_unix_nano,
                        "resource": resource,
                        "scope": sm.scope.name,
                    }
                    if kind in ("sum", "gauge"):
                        out.append(MetricPoint(**common, value=_number(p), exemplars=_exemplars(p)))
                    elif kind == "histogram":
                        bounds = [*p.explicit_bounds, float("inf")]
                        out.append(
                            MetricPoint(
                                **common,
                                count=p.count,
                                sum=_opt(p, "sum"),
                                min=_opt(p, "min"),
                                max=_opt(p, "max"),
                                buckets=list(zip(bounds, p.bucket_counts, strict=False)),
                                exemplars=_exemplars(p),
                            )
                        )
                    elif kind == "exponential_histogram":
                        out.append(
                            MetricPoint(
                                **common,
                                count=p.count,
                                sum=_opt(p, "sum"),
                                min=_opt(p, "min"),
                                max=_opt(p, "max"),
                                scale=p.scale,
                                zero_count=p.zero_count,
                                positive=(p.positive.offset, list(p.positive.bucket_counts)),
                                negative=(p.negative.offset, list(p.negative.bucket_counts)),
                                exemplars=_exemplars(p),
                            )
                        )
                    else:  # summary
                        out.append(MetricPoint(**common, count=p.count, sum=p.sum))
    return out


# --------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class _Failure:
    http_status: int
    grpc_code: grpc.StatusCode


class _Store:
    """Received requests plus a condition so waiters wake on each arrival."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[Received] = []
        self.failure: _Failure | None = None

    def add(self, item: Received) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def items(self) -> list[Received]:
        with self._cond:
            return list(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _grpc_export(
            self._store, "traces", request, context, trace_service_pb2.ExportTraceServiceResponse()
        )


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self._store = store

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        return _grpc_export(
            self._store, "metrics", request, context, metrics_service_pb2.ExportMetricsServiceResponse()
        )


def _grpc_export(store: _Store, signal: Signal, request: Any, context: grpc.ServicerContext, ok: T) -> T:
    failure = store.failure
    if failure is not None:
        context.abort(failure.grpc_code, "injected failure")
    headers = {k.lower(): v if isinstance(v, str) else v.decode() for k, v in context.invocation_metadata()}
    store.add(Received(signal, "grpc", headers, request))
    return ok


_HTTP_PATHS: dict[str, tuple[Signal, Any, Any]] = {
    "/v1/traces": (
        "traces",
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "/v1/metrics": (
        "metrics",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
}


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's requests session expects
    server: _HttpServer

    def do_POST(self) -> None:
        route = _HTTP_PATHS.get(self.path.split("?", 1)[0])
        body = self._read_body()
        if route is None:
            return self._reply(404, b"not found", "text/plain")
        signal, request_type, response_type = route
        failure = self.server.store.failure
        if failure is not None:
            return self._reply(failure.http_status, b"injected failure", "text/plain")
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if content_type != "application/x-protobuf":
            # OTLP/JSON is not supported: the probe sends protobuf only.
            return self._reply(415, b"only application/x-protobuf", "text/plain")
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                return self._reply(415, b"unsupported content-encoding", "text/plain")
            request = request_type.FromString(body)
        except Exception as exc:  # a malformed body is the client's bug: tell it so
            return self._reply(400, f"bad request: {exc}".encode(), "text/plain")
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.store.add(Received(signal, "http", headers, request))
        self._reply(200, response_type().SerializeToString(), "application/x-protobuf")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # rebind the same port while old connections sit in TIME_WAIT

    def __init__(self, port: int, store: _Store) -> None:
        self.store = store
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((_LOOPBACK, port), _HttpHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        with self._conns_lock:
            self._conns.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Stop listening and cut kept-alive connections, so nothing answers any more."""
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by the peer
                conn.shutdown(socket.SHUT_RDWR)


class _Blackhole:
    """Listens on a port, accepts every connection and never reads or answers."""

    def __init__(self, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((_LOOPBACK, port))
        self._sock.listen(128)
        self._sock.settimeout(0.05)
        self._held: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"otlp-blackhole-{port}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._sock.close()
        for conn in self._held:
            conn.close()


def _reserve(port: int) -> socket.socket:
    # Bound but not listening: the port stays ours and connecting to it is refused.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((_LOOPBACK, port))
    return sock


State = Literal["stopped", "running", "blackhole"]


class OtlpReceiver:
    """OTLP over gRPC and HTTP/protobuf on 127.0.0.1; ports stay fixed across fault modes."""

    def __init__(self) -> None:
        self._store = _Store()
        self._lock = threading.Lock()  # serialises state changes
        self._state: State = "stopped"
        self._grpc: grpc.Server | None = None
        self._http: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self._holes: list[_Blackhole] = []
        # Reserve both ports up front so they are known before start() and never change.
        self._reserved = [_reserve(0), _reserve(0)]
        self.grpc_port: int = self._reserved[0].getsockname()[1]
        self.http_port: int = self._reserved[1].getsockname()[1]

    @property
    def grpc_endpoint(self) -> str:
        return f"http://{_LOOPBACK}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://{_LOOPBACK}:{self.http_port}"

    @property
    def state(self) -> State:
        return self._state

    # ---- lifecycle and faults

    def start(self) -> OtlpReceiver:
        with self._lock:
            if self._state == "running":
                return self
            self._to_stopped()
            self._release_reservation()
            # so_reuseport off: nothing else may share the port with us unnoticed.
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)]
            )
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self._store), server)
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
                _MetricsService(self._store), server
            )
            if server.add_insecure_port(f"{_LOOPBACK}:{self.grpc_port}") != self.grpc_port:
                raise OSError(f"could not bind gRPC port {self.grpc_port}")
            server.start()
            self._grpc = server
            self._http = _HttpServer(self.http_port, self._store)
            self._http_thread = threading.Thread(
                target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-http", daemon=True
            )
            self._http_thread.start()
            self._state = "running"
        return self

    def stop(self) -> None:
        """Close both ports (connections refused) but keep them reserved for start()."""
        with self._lock:
            self._to_stopped()

    def blackhole(self) -> None:
        """Accept connections on both ports and never answer, until restore()."""
        with self._lock:
            self._to_stopped()
            self._release_reservation()
            self._holes = [_Blackhole(self.grpc_port), _Blackhole(self.http_port)]
            self._state = "blackhole"

    def fail(self, http_status: int = 503, grpc_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        """Answer every export with this error (503/UNAVAILABLE are retryable for OTLP clients)."""
        self._store.failure = _Failure(http_status, grpc_code)

    def restore(self) -> None:
        """Undo blackhole()/fail()/stop(): answer normally again."""
        self._store.failure = None
        self.start()

    def close(self) -> None:
        with self._lock:
            self._to_stopped()
            for sock in self._reserved:
                sock.close()
            self._reserved = []

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _to_stopped(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait()
            self._grpc = None
        if self._http is not None:
            self._http.close_all()
            assert self._http_thread is not None
            self._http_thread.join()
            self._http = None
            self._http_thread = None
        for hole in self._holes:
            hole.close()
        self._holes = []
        if not self._reserved:
            self._reserved = [_reserve(self.grpc_port), _reserve(self.http_port)]
        self._state = "stopped"

    def _release_reservation(self) -> None:
        for sock in self._reserved:
            sock.close()
        self._reserved = []

    # ---- what arrived

    def received(self, signal: Signal | None = None) -> list[Received]:
        return [r for r in self._store.items() if signal is None or r.signal == signal]

    def trace_requests(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        return [r.request for r in self.received("traces")]

    def metric_requests(self) -> list[metrics_service_pb2.ExportMetricsServiceRequest]:
        return [r.request for r in self.received("metrics")]

    def spans(self) -> list[Span]:
        return [s for r in self.trace_requests() for s in spans_of(r)]

    def metrics(self) -> list[MetricPoint]:
        return [p for r in self.metric_requests() for p in points_of(r)]

    def find_span(self, name: str) -> Span | None:
        return next((s for s in self.spans() if s.name == name), None)

    def points(self, name: str) -> list[MetricPoint]:
        return [p for p in self.metrics() if p.name == name]

    def clear(self) -> None:
        self._store.clear()

    # ---- waiting

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0) -> T:
        """Block until predicate() is truthy (checked on every arrival); return its value."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s; received {self._summary()}")
            # Short waits too, so a predicate on something other than arrivals still gets re-checked.
            self._store.wait(min(remaining, 0.1))

    async def async_wait_for(self, predicate: Callable[[], T], timeout: float = 10.0) -> T:
        """Like wait_for, polling, so the event loop (and a probe running on it) keeps going."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout}s; received {self._summary()}")
            await asyncio.sleep(0.02)

    def _summary(self) -> str:
        spans = sorted({s.name for s in self.spans()})
        metrics = sorted({p.name for p in self.metrics()})
        return f"{len(self.received())} requests, spans {spans}, metrics {metrics}"
