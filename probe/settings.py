"""Settings: every environment variable the probe reads, parsed once into one immutable object.

Nothing else in the probe reads the environment (the OpenTelemetry SDK reads its own
OTEL_* variables; we only validate the ones whose typos would silently disable export).
"""

from __future__ import annotations

import itertools
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from probe import checkurls, names
from probe.labels import SelectorError, parse_label_selector

T = TypeVar("T")

DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
DEFAULT_SERVICE_DNS = "kubernetes.default.svc.cluster.local"
DEFAULT_SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LOG_FORMATS = ("json", "logfmt")
#: As users write them; any case is accepted.
LOG_LEVELS = ("debug", "info", "warning", "error")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


class SettingsError(ValueError):
    """A bad setting; the message is the one line printed before exiting 2."""

    def __init__(self, variable: str, value: str, reason: str) -> None:
        super().__init__(f"invalid {variable}={value!r}: {reason}")
        self.variable = variable
        self.value = value


@dataclass(frozen=True)
class ExtraCheck:
    name: str
    url: str
    #: names.KIND_HTTP, KIND_DNS or KIND_TCP, from the URL's scheme.
    kind: str = names.KIND_HTTP
    #: What the check performs: the URL parsed by its kind, here, once (never again per check).
    target: checkurls.Spec = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", checkurls.parse(self.url))


@dataclass(frozen=True)
class Namespaces:
    """Which namespace is meant (`Settings.namespaces`); None where nothing names one."""

    #: This pod's: where its own pod object and its Events live.
    own: str | None
    #: Where the neighbour pods are listed.
    neighbours: str | None


@dataclass(frozen=True)
class Settings:
    ingress_url: str | None = None
    service_url: str | None = None
    insecure: bool = False
    extra_ca_file: str | None = None
    extra_checks: tuple[ExtraCheck, ...] = ()
    namespace: str | None = None
    neighbour_filter: str = ""
    neighbour_limit: int = 10
    allow_unschedulable: bool = False
    check_api_server_direct: bool = True
    check_api_server_dns: bool = True
    check_me_ingress: bool = True
    check_me_service: bool = True
    check_neighbourhood: bool = True
    #: Also send each neighbour a UDP train a round (loss, round trips, MTU).
    check_neighbourhood_udp: bool = True
    check_dns_cluster: bool = True
    check_interval: float = 5.0
    check_timeout: float = 6.0
    check_connect_timeout: float = 5.0
    reuse_connections: bool = False
    histogram_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    expose_metadata: bool = True
    use_tls: bool = False
    cert_file: str | None = None
    cert_key: str | None = None
    shutdown_duration: float = 5.0
    kubernetes_service_host: str | None = None
    kubernetes_service_port: int = 443
    #: None: not set, the default name below is used.
    kubernetes_service_dns: str | None = None
    pod_name: str = field(default_factory=socket.gethostname)
    node_name: str | None = None
    pod_namespace: str | None = None
    listen_host: str | None = None
    http_port: int = 8080
    https_port: int = 8443
    #: None: /mesh, /mesh.json and /mesh/report are served on the HTTP(S) ports; a port: there only.
    mesh_port: int | None = None
    serviceaccount_dir: str = DEFAULT_SERVICEACCOUNT_DIR
    kubeconfig: str | None = None
    log_format: str = "json"
    log_level: str = "INFO"
    otlp_traces_enabled: bool = False
    otlp_metrics_enabled: bool = False
    otlp_traces_protocol: str = "http/protobuf"
    otlp_metrics_protocol: str = "http/protobuf"
    #: OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE (OTLP only; /metrics is cumulative).
    otlp_metrics_temporality: str = "delta"
    #: OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION (OTLP only).
    otlp_histogram_aggregation: str = "base2_exponential_bucket_histogram"
    #: The mesh page links a failing or slow path to its trace: this URL with `{trace_id}` filled in.
    trace_url_template: str | None = None
    #: Post Kubernetes Events on the culprit node of a mesh verdict (needs the node-events RBAC).
    node_events: bool = False

    @property
    def own_namespace(self) -> str | None:
        """This pod's namespace as far as the settings alone tell (see `namespaces`)."""
        return self.namespaces().own

    def namespaces(self, found: str | None = None) -> Namespaces:
        """The one rule for which namespace is meant, wherever one is needed.

        This pod's own namespace: POD_NAMESPACE (the downward API), else `found`, the
        namespace the discovery credentials name (the service account's `namespace` file,
        which the kubelet writes for this very pod; outside a cluster the kubeconfig
        context's), else KUBENURSE_NAMESPACE. Before the credentials are read (`found` is
        None: the telemetry resource, the Events) that is POD_NAMESPACE, else
        KUBENURSE_NAMESPACE, the documented default.
        The neighbours' namespace: KUBENURSE_NAMESPACE (kubenurse's "namespace in which to
        look for the neighbour kubenurses"), else this pod's own.
        """
        own = self.pod_namespace or found or self.namespace
        return Namespaces(own=own, neighbours=self.namespace or own)

    @property
    def in_cluster(self) -> bool:
        return self.kubernetes_service_host is not None

    @property
    def api_server_dns_name(self) -> str:
        return self.kubernetes_service_dns or DEFAULT_SERVICE_DNS


# --- value parsers: each raises ValueError with a short reason --------------------------

#: Go's strconv.ParseBool, which kubenurse and the API server's query parameters use.
GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which kubenurse uses."""
    try:
        return GO_BOOLS[text.strip()]
    except KeyError:
        raise ValueError("not a boolean (use true or false)") from None


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds: `500ms`, `5s`, `1m30s`, `1.5h`; negative rejected."""
    s = text.strip()
    if s in ("0", "+0"):
        return 0.0
    if s.startswith("-"):
        raise ValueError("must not be negative")
    s = s.removeprefix("+")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError("not a duration (Go syntax, e.g. 500ms, 5s, 1m30s)")
        total += float(m[1]) * _DURATION_UNITS[m[2]]
        pos = m.end()
    if not s:
        raise ValueError("empty duration")
    return total


def parse_positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def parse_buckets(text: str) -> tuple[float, ...]:
    bounds: list[float] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("bounds must be finite")
        # Integral bounds stay ints so they print as le="1", like Go's client does.
        bounds.append(int(value) if value.is_integer() and "e" not in part.lower() else value)
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError("bounds must be strictly increasing")
    return tuple(bounds)


def parse_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        # urllib's own text ("Port could not be cast to integer value as ...") repeats the URL.
        raise ValueError("the port must be a number from 1 to 65535") from None
    if parts.port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    return text.strip()


def parse_base_url(text: str) -> str:
    """A base URL that `/alwayshappy` is appended to: one trailing slash dropped."""
    return parse_url(text).rstrip("/")


_BUILTIN_CHECKS = frozenset(
    {names.API_SERVER_DIRECT, names.API_SERVER_DNS, names.ME_INGRESS, names.ME_SERVICE, names.DNS_CLUSTER}
)


def parse_check_url(text: str) -> tuple[str, str]:
    """(kind, url) of one extra check's URL, by scheme; ValueError saying what is wrong."""
    kind = checkurls.parse(text).kind
    return kind, parse_url(text) if kind == names.KIND_HTTP else text.strip()


def parse_extra_checks(text: str) -> tuple[ExtraCheck, ...]:
    checks: list[ExtraCheck] = []
    items = [item.strip() for item in text.split("|") if item.strip()]
    for item in items:
        # The whole value is printed once already: name the entry only when there are several.
        entry = f"entry {item!r}: " if len(items) > 1 else ""
        name, sep, url = item.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{entry}not name:url")
        if name in _BUILTIN_CHECKS or name.startswith(names.PATH_PREFIX) or name.startswith("neighbourhood"):
            raise ValueError(f"{entry}{name!r} is the name of a built-in check")
        try:
            kind, url = parse_check_url(url)
        except ValueError as e:
            raise ValueError(f"{entry}{e}") from None
        checks.append(ExtraCheck(name, url, kind))
    if len({c.name for c in checks}) != len(checks):
        raise ValueError("check names must be unique")
    return tuple(checks)


def parse_port(text: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError("not a port number") from None
    if not 0 < port < 65536:
        raise ValueError("port must be 1-65535")
    return port


def parse_limit(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("not an integer") from None
    if value < 0:
        raise ValueError("must be 0 (all) or more")
    return value


def parse_selector_text(text: str) -> str:
    try:
        parse_label_selector(text)
    except SelectorError as e:
        raise ValueError(str(e)) from None
    return text.strip()


def readable_file(text: str) -> str:
    path = Path(text)
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"cannot read file: {e.strerror or e}") from None
    return str(path)


def pem_file(text: str) -> str:
    path = readable_file(text)
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError):
        # OpenSSL's own text ("[X509: NO_CERTIFICATE_OR_CRL_FOUND] ...", "PEM lib") says little.
        raise ValueError("not a PEM CA bundle (no readable BEGIN CERTIFICATE block)") from None
    return path


def existing_directory(text: str) -> str:
    """A directory that is there now (the service-account files are read from it later)."""
    path = Path(text.strip())
    if not path.is_dir():
        raise ValueError("not a directory" if path.exists() else "no such directory")
    return str(path)


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_namespace(text: str) -> str:
    """A Kubernetes namespace name: an RFC 1123 label (lower-case letters, digits, '-')."""
    value = text.strip()
    if not _DNS_LABEL.fullmatch(value):
        raise ValueError("not a namespace name (at most 63 lower-case letters, digits and '-',"
                         " starting and ending with a letter or digit)")
    return value


def parse_kubeconfig(text: str) -> str:
    """KUBECONFIG: one path or several joined by ':' (kubectl merges them). Checked for what
    discovery needs: a YAML mapping with a current context naming a cluster with a server."""
    import yaml  # here: only probes given a KUBECONFIG pay for it

    merged: dict[str, object] = {}
    clusters: dict[str, object] = {}
    contexts: dict[str, object] = {}
    paths = [p for p in text.strip().split(":") if p]
    if len(paths) > 1:  # kubectl skips the missing files of a list
        paths = [p for p in paths if Path(p).exists()] or paths[:1]
    for path in paths:
        try:
            readable_file(path)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        try:
            with open(path, "rb") as f:
                doc = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a kubeconfig (a YAML mapping)")
        for key, value in doc.items():
            merged.setdefault(key, value)  # the first file to set a key wins, as in kubectl
        for item in doc.get("clusters") or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                clusters.setdefault(item["name"], item.get("cluster"))
        for item in doc.get("contexts") or []:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                contexts.setdefault(item["name"], item.get("context"))
    current = merged.get("current-context")
    if not current:
        raise ValueError("no current-context")
    context = contexts.get(str(current))
    if not isinstance(context, dict):
        raise ValueError(f"current-context {current!r} is not among its contexts")
    cluster = clusters.get(str(context.get("cluster")))
    if not isinstance(cluster, dict) or not cluster.get("server"):
        raise ValueError(f"context {current!r} names no cluster with a server")
    return text.strip()


def parse_trace_url_template(text: str) -> str:
    if "{trace_id}" not in text:
        raise ValueError("must contain {trace_id}")
    parse_url(text.replace("{trace_id}", "0" * 32))
    return text.strip()


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return parse


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


# --- the table: variable -> (field, parser) -----------------------------------------------

_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "KUBENURSE_INGRESS_URL": ("ingress_url", parse_base_url),
    "KUBENURSE_SERVICE_URL": ("service_url", parse_base_url),
    "KUBENURSE_INSECURE": ("insecure", parse_bool),
    "KUBENURSE_EXTRA_CA": ("extra_ca_file", pem_file),
    "KUBENURSE_EXTRA_CHECKS": ("extra_checks", parse_extra_checks),
    "KUBENURSE_NAMESPACE": ("namespace", parse_namespace),
    "KUBENURSE_NEIGHBOUR_FILTER": ("neighbour_filter", parse_selector_text),
    "KUBENURSE_NEIGHBOUR_LIMIT": ("neighbour_limit", parse_limit),
    "KUBENURSE_ALLOW_UNSCHEDULABLE": ("allow_unschedulable", parse_bool),
    "KUBENURSE_CHECK_API_SERVER_DIRECT": ("check_api_server_direct", parse_bool),
    "KUBENURSE_CHECK_API_SERVER_DNS": ("check_api_server_dns", parse_bool),
    "KUBENURSE_CHECK_ME_INGRESS": ("check_me_ingress", parse_bool),
    "KUBENURSE_CHECK_ME_SERVICE": ("check_me_service", parse_bool),
    "KUBENURSE_CHECK_NEIGHBOURHOOD": ("check_neighbourhood", parse_bool),
    "KUBENURSE_CHECK_NEIGHBOURHOOD_UDP": ("check_neighbourhood_udp", parse_bool),
    "KUBENURSE_CHECK_DNS_CLUSTER": ("check_dns_cluster", parse_bool),
    "KUBENURSE_CHECK_INTERVAL": ("check_interval", parse_positive_duration),
    "KUBENURSE_CHECK_TIMEOUT": ("check_timeout", parse_positive_duration),
    "KUBENURSE_CHECK_CONNECT_TIMEOUT": ("check_connect_timeout", parse_positive_duration),
    "KUBENURSE_REUSE_CONNECTIONS": ("reuse_connections", parse_bool),
    "KUBENURSE_HISTOGRAM_BUCKETS": ("histogram_buckets", parse_buckets),
    "KUBENURSE_EXPOSE_METADATA": ("expose_metadata", parse_bool),
    "KUBENURSE_USE_TLS": ("use_tls", parse_bool),
    "KUBENURSE_CERT_FILE": ("cert_file", readable_file),
    "KUBENURSE_CERT_KEY": ("cert_key", readable_file),
    "KUBENURSE_SHUTDOWN_DURATION": ("shutdown_duration", parse_duration),
    "KUBERNETES_SERVICE_HOST": ("kubernetes_service_host", _nonempty),
    "KUBERNETES_SERVICE_PORT": ("kubernetes_service_port", parse_port),
    "KUBERNETES_SERVICE_DNS": ("kubernetes_service_dns", _nonempty),
    "POD_NAME": ("pod_name", _nonempty),
    "NODE_NAME": ("node_name", _nonempty),
    "POD_NAMESPACE": ("pod_namespace", _nonempty),
    "KUBENURSE_LISTEN_HOST": ("listen_host", _nonempty),
    "KUBENURSE_HTTP_PORT": ("http_port", parse_port),
    "KUBENURSE_HTTPS_PORT": ("https_port", parse_port),
    "KUBENURSE_MESH_PORT": ("mesh_port", parse_port),
    "KUBENURSE_SERVICEACCOUNT_DIR": ("serviceaccount_dir", existing_directory),
    "KUBECONFIG": ("kubeconfig", parse_kubeconfig),
    "KUBENURSE_LOG_FORMAT": ("log_format", one_of(*LOG_FORMATS)),
    "KUBENURSE_LOG_LEVEL": ("log_level", lambda t: one_of(*LOG_LEVELS)(t.lower()).upper()),
    "KUBENURSE_TRACE_URL_TEMPLATE": ("trace_url_template", parse_trace_url_template),
    "KUBENURSE_NODE_EVENTS": ("node_events", parse_bool),
}

#: Every environment variable the probe reads itself (OTEL_* aside: the SDK reads those).
KNOWN_VARIABLES: frozenset[str] = frozenset(_VARIABLES)


TEMPORALITIES = ("delta", "cumulative", "lowmemory")
HISTOGRAM_AGGREGATIONS = ("base2_exponential_bucket_histogram", "explicit_bucket_histogram")
_TRACES_EXPORTERS = ("otlp", "none")
#: `prometheus` is /metrics, which is always on: it asks for nothing over OTLP.
_METRICS_EXPORTERS = ("otlp", "prometheus", "none")


def variable_help() -> list[tuple[str, str]]:
    """(variable, default as a user writes it) for every variable the probe reads, for --help."""
    defaults = Settings()
    durations = (parse_duration, parse_positive_duration)
    shown: dict[str, str] = {
        "POD_NAME": "the hostname",
        "NODE_NAME": "spec.nodeName of this pod",
        "POD_NAMESPACE": "KUBENURSE_NAMESPACE",
        "KUBENURSE_NAMESPACE": "this pod's namespace",
        "KUBENURSE_LISTEN_HOST": "all interfaces",
        "KUBERNETES_SERVICE_DNS": DEFAULT_SERVICE_DNS,
        "KUBENURSE_NEIGHBOUR_LIMIT": f"{defaults.neighbour_limit} (0: all)",
    }
    rows: list[tuple[str, str]] = []
    for variable, (name, parse) in _VARIABLES.items():
        value = getattr(defaults, name)
        if variable in shown:
            text = shown[variable]
        elif value is None or value in ((), ""):
            text = "unset"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif parse in durations:
            text = f"{value:g}s"
        elif isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value).lower() if variable == "KUBENURSE_LOG_LEVEL" else str(value)
        rows.append((variable, text))
    return rows


def _otel_choice(env: Mapping[str, str], variable: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(variable, "")
    value = raw.strip().lower() or default
    if value not in choices:
        raise SettingsError(variable, raw, f"must be one of {', '.join(choices)}")
    return value


def _otel_endpoint(env: Mapping[str, str], variable: str) -> bool:
    """Whether the endpoint variable is set; a set one must be an http(s) URL with a host."""
    raw = env.get(variable, "")
    if not raw.strip():
        return False
    try:
        parse_url(raw)
    except ValueError as e:
        raise SettingsError(variable, raw, f"{e} (e.g. http://collector:4318)") from None
    return True


def _otel_exporters(env: Mapping[str, str], variable: str, choices: tuple[str, ...]) -> bool:
    """OTEL_{TRACES,METRICS}_EXPORTER: a comma-separated list; True when it asks for OTLP."""
    raw = env.get(variable, "")
    wanted = {part.strip().lower() for part in raw.split(",") if part.strip()} or {"otlp"}
    unknown = sorted(wanted - set(choices))
    if unknown or ("none" in wanted and len(wanted) > 1):
        raise SettingsError(variable, raw, f"this probe supports {', '.join(choices)}")
    return "otlp" in wanted


def _otlp_settings(env: Mapping[str, str]) -> dict[str, object]:
    """Which OTLP signals are on, over which protocol, and how metrics are aggregated. No
    endpoint set: nothing is exported and nothing connects. Every OTEL_* value the probe
    acts on is checked here, so a typo exits 2 instead of failing at the first export."""
    disabled = _otel_choice(env, "OTEL_SDK_DISABLED", ("true", "false"), "false") == "true"
    values: dict[str, object] = {
        "otlp_metrics_temporality": _otel_choice(
            env, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", TEMPORALITIES, "delta"
        ),
        "otlp_histogram_aggregation": _otel_choice(
            env, "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",
            HISTOGRAM_AGGREGATIONS, "base2_exponential_bucket_histogram",
        ),
    }
    default_protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() or "http/protobuf"
    base = _otel_endpoint(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    for signal, exporters in (("traces", _TRACES_EXPORTERS), ("metrics", _METRICS_EXPORTERS)):
        variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
        raw = env.get(variable, "").strip()
        if not raw:
            variable, raw = "OTEL_EXPORTER_OTLP_PROTOCOL", default_protocol
        if raw not in OTLP_PROTOCOLS:
            raise SettingsError(variable, env.get(variable, raw), f"must be one of {', '.join(OTLP_PROTOCOLS)}")
        wants_otlp = _otel_exporters(env, f"OTEL_{signal.upper()}_EXPORTER", exporters)
        own = _otel_endpoint(env, f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
        values[f"otlp_{signal}_enabled"] = (base or own) and wants_otlp and not disabled
        values[f"otlp_{signal}_protocol"] = raw
    return values


SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)


def _check_sampler(env: Mapping[str, str]) -> None:
    """OTEL_TRACES_SAMPLER(_ARG): the SDK logs an unknown sampler or ratio and samples
    everything instead; here it is a bad setting."""
    raw = env.get("OTEL_TRACES_SAMPLER", "")
    if raw.strip() and raw.strip().lower() not in SAMPLERS:
        raise SettingsError("OTEL_TRACES_SAMPLER", raw, f"must be one of {', '.join(SAMPLERS)}")
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "")
    if arg.strip():
        try:
            ratio = float(arg)
        except ValueError:
            ratio = float("nan")
        if not 0.0 <= ratio <= 1.0:
            raise SettingsError("OTEL_TRACES_SAMPLER_ARG", arg, "must be a sampling ratio from 0 to 1 (e.g. 0.25)")


def _check_resource_attributes(env: Mapping[str, str]) -> None:
    """OTEL_RESOURCE_ATTRIBUTES: `key=value,key2=value2`; the SDK warns about a pair
    without `=` (twice: it reads the variable twice) and starts without it."""
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            what = f"{item.strip()!r} is not key=value" if "," in raw else "not key=value"
            raise SettingsError("OTEL_RESOURCE_ATTRIBUTES", raw, f"{what} (e.g. deployment.environment=prod,team=net)")


def _check_timeouts(settings: Settings, env: Mapping[str, str]) -> None:
    """A connect timeout set above the whole check's could never fire. (Left at its default,
    it is simply cut short by a shorter KUBENURSE_CHECK_TIMEOUT.)"""
    raw = env.get("KUBENURSE_CHECK_CONNECT_TIMEOUT", "")
    if raw.strip() and settings.check_connect_timeout > settings.check_timeout:
        raise SettingsError(
            "KUBENURSE_CHECK_CONNECT_TIMEOUT", raw,
            f"longer than the whole check (KUBENURSE_CHECK_TIMEOUT={settings.check_timeout:g}s)",
        )


def _check_tls_pair(settings: Settings) -> None:
    if not settings.use_tls:
        return
    cert, key = settings.cert_file, settings.cert_key
    if not cert:
        raise SettingsError("KUBENURSE_CERT_FILE", "", "required when KUBENURSE_USE_TLS=true")
    if not key:
        raise SettingsError("KUBENURSE_CERT_KEY", "", "required when KUBENURSE_USE_TLS=true")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise SettingsError("KUBENURSE_CERT_FILE", cert, tls_pair_problem(e)) from None


def tls_pair_problem(error: BaseException) -> str:
    """Why a certificate and key do not load, in our words ("[SSL] PEM lib (_ssl.c:3905)" is OpenSSL's)."""
    reason = getattr(error, "reason", None) or ""
    if reason == "KEY_VALUES_MISMATCH":
        return "KUBENURSE_CERT_KEY is not the key of this certificate"
    if isinstance(error, ssl.SSLError):
        return "KUBENURSE_CERT_FILE and KUBENURSE_CERT_KEY must be a PEM certificate and its PEM private key"
    return f"cannot read it with KUBENURSE_CERT_KEY: {getattr(error, 'strerror', None) or error}"


def load_settings(env: Mapping[str, str]) -> Settings:
    """Parse `env` (normally os.environ) into Settings; raise SettingsError naming the variable."""
    values: dict[str, object] = {}
    for variable, (name, parse) in _VARIABLES.items():
        raw = env.get(variable)
        if raw is None or not raw.strip():
            continue  # blank means unset, as in kubenurse
        try:
            values[name] = parse(raw)
        except ValueError as e:
            raise SettingsError(variable, raw, str(e)) from None
    values.update(_otlp_settings(env))
    _check_sampler(env)
    _check_resource_attributes(env)
    settings = Settings(**values)  # type: ignore[arg-type]
    _check_timeouts(settings, env)
    _check_tls_pair(settings)
    if settings.mesh_port is not None and settings.mesh_port in (
        settings.http_port, *([settings.https_port] if settings.use_tls else []),
    ):
        raise SettingsError(
            "KUBENURSE_MESH_PORT", str(settings.mesh_port),
            "must differ from KUBENURSE_HTTP_PORT and KUBENURSE_HTTPS_PORT (empty: the mesh on those ports)",
        )
    return settings
