"""The connection to the Kubernetes API server: where it is, who we are, one HTTP session.

In a cluster the service account's `token`, `ca.crt` and `namespace` are read straight from
KUBENURSE_SERVICEACCOUNT_DIR, and the token is read again whenever the file changes (the
kubelet rotates projected tokens), after a 401, and at least once a minute. Importing any
part of kubernetes_asyncio costs ~40 MB RSS (its package __init__ loads every model), so
this path, the one every DaemonSet pod takes, does without it. Outside a cluster KUBECONFIG
goes through kubernetes_asyncio.config, imported only then, so exec plugins, OIDC and client
certificates work as they do for kubectl.

The HTTP is plain aiohttp with raw JSON: the callers decode only the fields they need.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from probe.ratelimit import TokenBucket
from probe.settings import Settings

log = logging.getLogger("probe.discovery")

USER_AGENT = "kubenurse-otel/discovery"
#: Re-read the token file at least this often even if its stat looks unchanged.
TOKEN_MAX_AGE = 60.0
#: Longest watch event line accepted (a pod is at most ~1.5 MiB in etcd).
MAX_LINE = 16 * 1024 * 1024
#: Largest list page accepted: 500 realistic Nodes are ~10 MB. A server that ignores
#: `limit` and sends more fails the list with a clear error instead of filling memory.
MAX_BODY = 64 * 1024 * 1024


class ConfigError(Exception):
    """No usable connection; the message is the `skipped` reason."""


class ApiError(Exception):
    """The API server answered with an error Status (or something that is not JSON)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")
        self.code = code
        self.reason = reason

    @classmethod
    def from_status(cls, code: int, body: bytes) -> ApiError:
        try:
            status = json.loads(body)
            return cls(int(status.get("code") or code), str(status.get("reason", "")), str(status.get("message", "")))
        except (ValueError, AttributeError, TypeError):
            return cls(code, "", body[:200].decode(errors="replace").strip())

    @property
    def expired(self) -> bool:
        """410: the resource version is too old; list again."""
        return self.code == 410


class Credentials(Protocol):
    """Where the API server is and how to authenticate to it; may change over time."""

    server: str
    source: str  # "in-cluster" or "kubeconfig", for /alive

    async def load(self) -> None:
        """Read the configuration; raise ConfigError when it is unusable."""

    async def authorization(self) -> str | None:
        """The Authorization header value for the next request."""

    def ssl_context(self) -> ssl.SSLContext | bool:
        """How to verify the server (False: do not)."""

    def rejected(self) -> None:
        """The server answered 401: read credentials again before the next request."""

    @property
    def namespace(self) -> str | None:
        """The namespace this identity lives in, if the configuration says."""


@dataclass(frozen=True)
class _FileStamp:
    inode: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> _FileStamp | None:
        try:
            st = path.stat()  # follows the kubelet's ..data symlink swap
        except OSError:
            return None
        return cls(st.st_ino, st.st_mtime_ns, st.st_size)


class ServiceAccount:
    """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, token, CA and namespace files."""

    source = "in-cluster"

    def __init__(self, directory: str, host: str, port: int) -> None:
        self.directory = Path(directory)
        host = f"[{host}]" if ":" in host else host
        self.server = f"https://{host}:{port}"
        self._token: str | None = None
        self._stamp: _FileStamp | None = None
        self._read_at = 0.0
        self._ca_stamp: _FileStamp | None = None
        self._ssl: ssl.SSLContext | None = None
        self._namespace: str | None = None

    @staticmethod
    def present(directory: str) -> bool:
        return (Path(directory) / "token").is_file()

    @property
    def namespace(self) -> str | None:
        return self._namespace

    async def load(self) -> None:
        self._read_token(force=True)
        self.ssl_context()
        try:
            self._namespace = (self.directory / "namespace").read_text().strip() or None
        except OSError:
            self._namespace = None

    def _read_token(self, *, force: bool = False) -> None:
        path = self.directory / "token"
        stamp = _FileStamp.of(path)
        if not force and stamp == self._stamp and time.monotonic() - self._read_at < TOKEN_MAX_AGE:
            return
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read service-account token {path}: {e.strerror or e}") from None
        if not token:
            raise ConfigError(f"service-account token {path} is empty")
        if self._token is not None and token != self._token:
            log.info("service-account token changed on disk; using the new one")
        self._token, self._stamp, self._read_at = token, stamp, time.monotonic()

    async def authorization(self) -> str | None:
        try:
            self._read_token()
        except ConfigError as e:
            # Mid-rotation or briefly unreadable: keep the one we have, the server decides.
            if self._token is None:
                raise
            log.warning("%s; keeping the previous token", e)
        return f"Bearer {self._token}"

    def rejected(self) -> None:
        self._read_at = 0.0

    def ssl_context(self) -> ssl.SSLContext:
        path = self.directory / "ca.crt"
        stamp = _FileStamp.of(path)
        if self._ssl is None or stamp != self._ca_stamp:
            try:
                context = ssl.create_default_context(cafile=str(path))
            except (OSError, ssl.SSLError) as e:
                if self._ssl is not None:
                    return self._ssl
                raise ConfigError(f"cannot load service-account CA {path}: {e}") from None
            self._ssl, self._ca_stamp = context, stamp
        return self._ssl


class Kubeconfig:
    """A kubeconfig file (KUBECONFIG), read by kubernetes_asyncio.config, reloaded when the
    file changes or after a 401; exec-plugin tokens are renewed when they expire."""

    source = "kubeconfig"

    def __init__(self, path: str) -> None:
        self.path = path
        self.server = ""
        self._loader: Any = None
        self._config: Any = None
        self._stamp: tuple[_FileStamp | None, ...] = ()
        self._stale = True
        self._ssl: ssl.SSLContext | bool = True
        self._namespace: str | None = None

    @property
    def namespace(self) -> str | None:
        return self._namespace

    def _stamps(self) -> tuple[_FileStamp | None, ...]:
        return tuple(_FileStamp.of(Path(p)) for p in self.path.split(os.pathsep) if p)

    async def load(self) -> None:
        # Imported here: ~40 MB and ~0.3 s, paid only by probes running outside a cluster.
        from kubernetes_asyncio.client import Configuration
        from kubernetes_asyncio.config import load_kube_config

        stamp = self._stamps()
        if not any(stamp):
            raise ConfigError(f"KUBECONFIG={self.path}: file not found")
        config = Configuration()
        try:
            loader = await load_kube_config(
                config_file=self.path, client_configuration=config, persist_config=False
            )
        except Exception as e:  # ConfigException, yaml, OSError, exec plugin failures ...
            raise ConfigError(f"KUBECONFIG={self.path}: {e or type(e).__name__}") from None
        self._loader, self._config, self._stamp, self._stale = loader, config, stamp, False
        self.server = str(config.host).rstrip("/")
        self._ssl = self._build_ssl(config)
        context = (loader.current_context or {}).get("context") or {}
        self._namespace = context.get("namespace") or None

    @staticmethod
    def _build_ssl(config: Any) -> ssl.SSLContext | bool:
        if not config.verify_ssl:
            return False
        try:
            context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"KUBECONFIG: cannot load TLS files: {e}") from None
        return context

    async def authorization(self) -> str | None:
        if self._stale or self._stamps() != self._stamp:
            await self.load()
        elif "exec" in (getattr(self._loader, "_user", None) or {}):
            # Runs the plugin again only once its token expired.
            await self._loader.load_from_exec_plugin()
            if getattr(self._loader, "token", None):
                self._config.api_key["BearerToken"] = self._loader.token
        value = self._config.api_key.get("BearerToken") or self._config.api_key.get("authorization")
        return str(value) if value else None

    def rejected(self) -> None:
        self._stale = True

    def ssl_context(self) -> ssl.SSLContext | bool:
        return self._ssl

    @property
    def tls_server_name(self) -> str | None:
        return getattr(self._config, "tls_server_name", None) or None

    @property
    def proxy(self) -> str | None:
        return getattr(self._config, "proxy", None) or None


def locate(settings: Settings) -> Credentials | str:
    """Where discovery connects to, or why it cannot (the `skipped` reason).

    In a cluster (KUBERNETES_SERVICE_HOST set and a service-account token present) the
    service account wins; otherwise KUBECONFIG; otherwise nothing.
    """
    directory = settings.serviceaccount_dir
    if settings.kubernetes_service_host and ServiceAccount.present(directory):
        return ServiceAccount(directory, settings.kubernetes_service_host, settings.kubernetes_service_port)
    if settings.kubeconfig:
        return Kubeconfig(settings.kubeconfig)
    if settings.kubernetes_service_host:
        return f"no service-account token in {directory} and KUBECONFIG not set"
    return "KUBERNETES_SERVICE_HOST not set (not in a cluster) and KUBECONFIG not set"


class KubeClient:
    """GETs and watch streams against the API server, every request with a deadline and
    paced by a token bucket."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        connect_timeout: float = 10.0,
        user_agent: str = USER_AGENT,
        qps: float = 5.0,
        burst: int = 40,
        max_body: int = MAX_BODY,
    ) -> None:
        self.credentials = credentials
        self._connect_timeout = connect_timeout
        self._user_agent = user_agent
        self._bucket = TokenBucket(qps, burst)
        self._max_body = max_body
        self._session: aiohttp.ClientSession | None = None
        #: Requests sent, for /alive and tests.
        self.requests = 0

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # One connection per open watch (HTTP/1.1), plus room for lists.
                connector=aiohttp.TCPConnector(limit=64, enable_cleanup_closed=True),
                headers={"Accept": "application/json", "User-Agent": self._user_agent},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request_kwargs(self, accept: str) -> dict[str, Any]:
        if (wait := self._bucket.delay()) > 0:
            await asyncio.sleep(wait)
        self.requests += 1
        headers = {"Accept": accept}
        if auth := await self.credentials.authorization():
            headers["Authorization"] = auth
        # The token goes to the API server only: never follow a redirect with it.
        kwargs: dict[str, Any] = {"headers": headers, "ssl": self.credentials.ssl_context(), "allow_redirects": False}
        if isinstance(self.credentials, Kubeconfig):
            if self.credentials.tls_server_name:
                kwargs["server_hostname"] = self.credentials.tls_server_name
            if self.credentials.proxy:
                kwargs["proxy"] = self.credentials.proxy
        return kwargs

    async def _check(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200:
            return
        body = await response.content.read(64 * 1024)
        if response.status == 401:
            self.credentials.rejected()
        raise ApiError.from_status(response.status, body)

    async def get(
        self, path: str, params: Mapping[str, str], *, timeout: float, accept: str = "application/json"
    ) -> bytearray:
        """The body of a 200 answer; ApiError otherwise. `timeout` bounds the whole request;
        a body over `max_body` bytes is refused (ApiError TooLarge) without being held."""
        kwargs = await self._request_kwargs(accept)
        client_timeout = aiohttp.ClientTimeout(total=timeout, connect=min(self._connect_timeout, timeout))
        async with self._open_session().get(
            self.credentials.server + path, params=params, timeout=client_timeout, **kwargs
        ) as response:
            await self._check(response)
            too_large = ApiError(0, "TooLarge", f"{path}: response larger than {self._max_body} bytes")
            if (response.content_length or 0) > self._max_body:
                raise too_large
            body = bytearray()
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > self._max_body:
                    raise too_large
            return body  # not copied again: the caller decodes it once

    @asynccontextmanager
    async def stream(
        self, path: str, params: Mapping[str, str], *, total: float, idle: float, accept: str = "application/json"
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """A watch: yields an iterator over its lines. The stream fails with a timeout when
        no byte arrives for `idle` seconds (a half-dead connection) or after `total`."""
        kwargs = await self._request_kwargs(accept)
        client_timeout = aiohttp.ClientTimeout(
            total=total, connect=min(self._connect_timeout, total), sock_read=idle
        )
        async with self._open_session().get(
            self.credentials.server + path, params=params, timeout=client_timeout, **kwargs
        ) as response:
            await self._check(response)
            yield _lines(response.content)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited chunks of a watch stream, without aiohttp's 128 KiB line limit."""
    buffer = bytearray()
    async for chunk in content.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            if end > start:
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            raise ApiError(0, "LineTooLong", f"watch event longer than {MAX_LINE} bytes")
    if buffer.strip():
        yield bytes(buffer)

