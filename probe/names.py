"""Every externally visible name in one place: check types, events, metrics, spans.

docs/reference.md lists them; kubenurse's dashboards and alerts depend on them byte for byte.
"""

from __future__ import annotations

# Check types (the `type` label and `/alive` keys).
API_SERVER_DIRECT = "api_server_direct"
API_SERVER_DNS = "api_server_dns"
ME_INGRESS = "me_ingress"
ME_SERVICE = "me_service"
DNS_CLUSTER = "dns_cluster"
PATH_PREFIX = "path_"

# Check kinds, chosen by the URL scheme of an extra check.
KIND_HTTP = "http"
KIND_DNS = "dns"
KIND_TCP = "tcp"
KIND_UDP = "udp"


def path_type(node_name: str) -> str:
    """Check type of the neighbour check towards `node_name`."""
    return PATH_PREFIX + node_name


# Phase events, in the order they happen during one request (kubenurse's httptrace names).
DNS_START = "dns_start"
DNS_DONE = "dns_done"
CONNECT_START = "connect_start"
CONNECT_DONE = "connect_done"
TLS_HANDSHAKE_START = "tls_handshake_start"
TLS_HANDSHAKE_DONE = "tls_handshake_done"
GOT_CONN = "got_conn"
WROTE_REQUEST = "wrote_request"
GOT_FIRST_RESP_BYTE = "got_first_resp_byte"
EVENTS = (
    DNS_START,
    DNS_DONE,
    CONNECT_START,
    CONNECT_DONE,
    TLS_HANDSHAKE_START,
    TLS_HANDSHAKE_DONE,
    GOT_CONN,
    WROTE_REQUEST,
    GOT_FIRST_RESP_BYTE,
)
ROUND_TRIP_ERROR = "round_trip_error"
#: A UDP check's full-size datagrams were lost while small ones came back.
MTU = "mtu"
#: `code` of a check without an HTTP status (dns, tcp) that succeeded.
CODE_OK = "ok"


def status_code_event(code: int) -> str:
    return f"status_code_{code}"


# Outcomes shown in /alive.
OK = "ok"
SKIPPED = "skipped"

# Instruments. The Prometheus exporter appends `_seconds` (unit "s") and `_total` (counters),
# so these land on kubenurse's series names (the exporter has no switch to turn that off).
METER_NAME = "kubenurse"
REQUEST_DURATION = "kubenurse_httpclient_request_duration"
TRACE_REQUEST_DURATION = "kubenurse_httpclient_trace_request_duration"
REQUESTS = "kubenurse_httpclient_requests"
ERRORS = "kubenurse_errors"
INCOMING_CHECKS = "kubenurse_neighbourhood_incoming_checks"
#: Gauge, Unix seconds; the exporter appends `_seconds` (unit "s").
TCP_RETRANSMITS = "kubenurse_tcp_retransmits"
UDP_PACKETS_SENT = "kubenurse_udp_packets_sent"
UDP_PACKETS_LOST = "kubenurse_udp_packets_lost"
UDP_RTT = "kubenurse_udp_rtt"
TLS_CERT_EXPIRY = "kubenurse_tls_certificate_expiry_timestamp"
#: Served from the /metrics registry only (version and Python; OTLP has service.version).
BUILD_INFO = "kubenurse_build_info"
UNIT_SECONDS = "s"

# Metric attribute keys.
LABEL_TYPE = "type"
LABEL_EVENT = "event"
LABEL_CODE = "code"
LABEL_VERSION = "version"
LABEL_PYTHON_VERSION = "python_version"

# HTTP headers.
NEIGHBOUR_ORIGIN_HEADER = "KUBENURSE-NEIGHBOUR-ORIGIN"

# Span attributes of our own (the rest follow the HTTP semantic conventions).
ATTR_CHECK_TYPE = "kubenurse.check.type"
ATTR_NEIGHBOUR_NODE = "kubenurse.neighbour.node"
ATTR_NEIGHBOUR_POD = "kubenurse.neighbour.pod"
ATTR_ERROR_EVENT = "kubenurse.error.event"
#: Where the phase timings came from: "kernel" (receive timestamps, TCP_INFO) or "loop".
ATTR_TCP_RETRANSMITS = "kubenurse.tcp.retransmits"
ATTR_UDP_SENT = "kubenurse.udp.sent"
ATTR_UDP_LOST = "kubenurse.udp.lost"
ATTR_UDP_MTU = "kubenurse.udp.path_mtu"
ATTR_TIMING_SOURCE = "kubenurse.timing.source"
#: The request duration the metrics recorded (network time, seconds).
ATTR_NETWORK_DURATION = "kubenurse.request.duration"
ATTR_DNS_QUESTION_NAME = "dns.question.name"
ATTR_DNS_QUESTION_TYPE = "dns.question.type"
ATTR_DNS_ANSWER_COUNT = "dns.answer.count"
ATTR_DNS_RESPONSE_CODE = "dns.response_code"
TRACER_NAME = "kubenurse"
