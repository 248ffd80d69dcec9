"""Which certificate authorities a client trusts, read from files that may change on disk.

The two API-server checks carry the service-account token, so they trust the cluster's CA
and nothing else: the service account's `ca.crt`, or, outside a cluster, the CA of the
kubeconfig's current cluster. Never the system CAs, never KUBENURSE_EXTRA_CA (in the TLS
overlay it signs every probe's serving certificate, so a pod holding one of those could
pose as the API server).

`Reloading` rebuilds an SSL context when one of its files changed (the kubelet swaps
mounted secrets and config maps in place; cert-manager renews certificates): the next
connection uses the new one, connections already open keep theirs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from probe.settings import Settings

log = logging.getLogger("probe.trust")

C = TypeVar("C")


@dataclass(frozen=True)
class ClusterCA:
    """The API server's CA: a PEM file, or PEM text (a kubeconfig's certificate-authority-data)."""

    cafile: str | None = None
    cadata: str | None = None
    #: Where it came from, for messages.
    source: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        return (self.cafile,) if self.cafile else ()


def cluster_ca(settings: Settings) -> ClusterCA | None:
    """The CA the API-server checks trust: the service account's ca.crt when there is one,
    else the kubeconfig's current cluster's; None when neither says."""
    sa_ca = Path(settings.serviceaccount_dir) / "ca.crt"
    if sa_ca.is_file():
        return ClusterCA(cafile=str(sa_ca), source=str(sa_ca))
    if settings.kubeconfig:
        return kubeconfig_ca(settings.kubeconfig)
    return None


def kubeconfig_ca(kubeconfig: str) -> ClusterCA | None:
    """certificate-authority(-data) of the current context's cluster (the first file of a
    list that names each key wins, as kubectl merges them)."""
    import yaml  # only probes given a KUBECONFIG pay for it

    docs: list[tuple[Path, dict[str, Any]]] = []
    for part in (p for p in kubeconfig.split(":") if p):
        try:
            with open(part, "rb") as f:
                doc = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(doc, dict):
            docs.append((Path(part), doc))
    current = next((d["current-context"] for _, d in docs if d.get("current-context")), None)
    contexts = {c["name"]: c.get("context") or {} for _, d in docs for c in _named(d.get("contexts"))}
    cluster_name = (contexts.get(current) or {}).get("cluster") if isinstance(current, str) else None
    for path, doc in docs:
        for item in _named(doc.get("clusters")):
            if item["name"] != cluster_name or not isinstance(item.get("cluster"), dict):
                continue
            cluster = item["cluster"]
            if data := cluster.get("certificate-authority-data"):
                try:
                    pem = base64.b64decode(str(data), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    return None
                return ClusterCA(cadata=pem, source=f"{path} (certificate-authority-data)")
            if file := cluster.get("certificate-authority"):
                resolved = Path(str(file))
                resolved = resolved if resolved.is_absolute() else path.parent / resolved
                return ClusterCA(cafile=str(resolved), source=str(resolved))
            return None
    return None


def _named(items: object) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("name"), str)]


def pin_to_cluster_ca(context: ssl.SSLContext, ca: ClusterCA | None) -> ssl.SSLContext:
    """Trust `ca` only (the context must have been created without default certificates).
    With no CA known the context trusts nothing: the API-server checks then fail their
    handshake instead of sending the token to whoever a public CA vouches for."""
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca.cafile, cadata=ca.cadata)
        except (OSError, ssl.SSLError, ValueError) as e:
            # A broken mounted CA must not stop the other checks; the API-server checks will fail.
            log.warning("cluster CA not loaded; the API-server checks will fail", extra={
                "ca": ca.source, "error": getattr(e, "strerror", None) or str(e),
            })
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = Path(path).stat()  # follows the kubelet's ..data symlink swap
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Reloading(Generic[C]):
    """A value built from files, built again when one of them changed. `get()` costs a
    stat per file; a build that fails keeps the previous value (and says so once)."""

    def __init__(self, build: Callable[[], C], files: Callable[[], Sequence[str]], what: str) -> None:
        self._build, self._files, self._what = build, files, what
        self._stamps = self._current_stamps()
        self._value = build()
        #: Times the value was built again after a change (for tests and /alive).
        self.reloads = 0

    def _current_stamps(self) -> tuple[tuple[int, int, int] | None, ...]:
        return tuple(_stamp(f) for f in self._files())

    def get(self) -> C:
        stamps = self._current_stamps()
        if stamps == self._stamps:
            return self._value
        self._stamps = stamps
        try:
            value = self._build()
        except (OSError, ssl.SSLError, ValueError) as e:
            # Mid-rotation (a key written before its certificate): keep the old one until
            # the files change again.
            log.warning("reload failed; keeping the previous one", extra={
                "what": self._what, "error": getattr(e, "strerror", None) or str(e),
            })
        else:
            self._value = value
            self.reloads += 1
            log.info("reloaded after a change on disk", extra={"what": self._what})
        return self._value
