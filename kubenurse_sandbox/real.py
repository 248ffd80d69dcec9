"""A real control plane on loopback: etcd and kube-apiserver (built from their Go modules by
the repository's .ci/components into ${KUBENURSE_COMPONENTS:-~/.cache/kubenurse-components}/bin),
with a serving certificate from a throwaway CA, RBAC authorization, a service-account issuer
and signing key, and one static admin token. No controller manager runs: nothing schedules,
nothing makes ServiceAccount token Secrets; the caller creates Nodes and Pods directly (status
through the status subresource) and mints tokens with the TokenRequest API.

Used by tests/real and by `kubenurse sandbox --real`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kubenurse_sandbox import children

ISSUER = "https://kubernetes.default.svc.cluster.local"
#: What a pod of the restricted Pod Security Standard (the kubenurse namespace enforces it) needs.
RESTRICTED_CONTAINER = {
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
}


def components_dir() -> Path:
    return Path(os.environ.get("KUBENURSE_COMPONENTS") or Path.home() / ".cache" / "kubenurse-components")


def find_component(name: str) -> Path | None:
    """A component binary: the built one first, then PATH."""
    built = components_dir() / "bin" / name
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(name)
    return Path(found) if found else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Child:
    """A child process with its output in a log file; stop() is idempotent."""

    def __init__(self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self.proc = children.spawn(argv, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})},
                                   log_path=log)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                children.kill(self.proc)

    def tail(self, lines: int = 20) -> str:
        return f"--- {self.name} ({self.log}):\n" + "\n".join(children.tail(self.log, lines))


def wait_port(host: str, port: int, timeout: float, process: Child) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if not process.running:
                raise RuntimeError(f"{process.name} exited\n{process.tail()}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


class ApiError(Exception):
    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(f"{status}: {body.get('message', body)}")
        self.status = status
        self.body = body


class RealCluster:
    """etcd + kube-apiserver processes and a small admin client (sync; loopback answers in ms)."""

    def __init__(self, workdir: Path, etcd: Path, apiserver: Path, *, extra_args: tuple[str, ...] = (),
                 port: int = 0) -> None:
        self.workdir = workdir
        self._etcd_bin, self._apiserver_bin, self._extra_args = etcd, apiserver, extra_args
        self.ca = trustme.CA()
        self.ca_file = workdir / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.admin_token = secrets.token_hex(16)
        self.port = port or free_port()
        self.etcd_port, self._peer_port = free_port(), free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.etcd: Child | None = None
        self.apiserver: Child | None = None
        self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        self.kubeconfig = self._write_files()

    # ---- processes

    def _write_files(self) -> Path:
        w = self.workdir
        cert = self.ca.issue_cert("127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc")
        cert.private_key_pem.write_to_path(str(w / "serving.key"))
        cert.cert_chain_pems[0].write_to_path(str(w / "serving.crt"))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (w / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (w / "sa.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (w / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')
        return self.write_kubeconfig(w / "admin.kubeconfig", self.admin_token)

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "real",
            "clusters": [{"name": "real", "cluster": {"server": self.server,
                                                      "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "real", "context": {"cluster": "real", "user": "u", "namespace": namespace}}],
        }))
        return path

    def start_etcd(self) -> None:
        data = self.workdir / "etcd"
        peer = f"http://127.0.0.1:{self._peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = Child("etcd", [
            str(self._etcd_bin), "--name=default", f"--data-dir={data}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}", "--unsafe-no-fsync", "--log-level=warn",
        ], self.workdir / "etcd.log")
        wait_port("127.0.0.1", self.etcd_port, timeout=30, process=self.etcd)

    def start_apiserver(self, timeout: float = 90.0) -> None:
        w = self.workdir
        self.apiserver = Child("kube-apiserver", [
            str(self._apiserver_bin),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={w}", f"--tls-cert-file={w / 'serving.crt'}", f"--tls-private-key-file={w / 'serving.key'}",
            f"--token-auth-file={w / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={w / 'sa.pub'}",
            f"--service-account-signing-key-file={w / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16",
            # The "kubernetes" Service's endpoints may not point at loopback; nothing here needs them.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
            *self._extra_args,
        ], w / "kube-apiserver.log")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.get("/readyz") == "ok":
                    return
            except (OSError, ApiError):
                pass
            if not self.apiserver.running:
                raise RuntimeError(f"kube-apiserver exited\n{self.apiserver.tail(30)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver not ready after {timeout}s\n{self.apiserver.tail(30)}")
            time.sleep(0.25)

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            self.apiserver.stop(timeout=10)

    def stop(self) -> None:
        self.stop_apiserver()
        if self.etcd is not None:
            self.etcd.stop()

    # ---- the admin client

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                token: str | None = None) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}", "Content-Type": content_type,
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self._ssl, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = {"message": raw}
            raise ApiError(e.code, detail) from None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def kubectl(self, *args: str, check: bool = True, kubeconfig: Path | None = None,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        kubectl = shutil.which("kubectl") or "kubectl"
        done = subprocess.run([kubectl, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args], input=stdin,
                              capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
        return done

    # ---- objects

    def ensure_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})

    def service_account(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}})

    def token(self, namespace: str, name: str, *, seconds: int = 3600, bound_secret: str | None = None) -> str:
        """A service-account token from the TokenRequest API; bound to a Secret when given, so
        deleting that Secret revokes it (what a real rotation does to the old token)."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if bound_secret:
            secret = self.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{bound_secret}")
            spec["boundObjectRef"] = {"kind": "Secret", "apiVersion": "v1", "name": bound_secret,
                                      "uid": secret["metadata"]["uid"]}
        answer = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                              {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return str(answer["status"]["token"])

    def write_serviceaccount(self, directory: Path, token: str, namespace: str) -> Path:
        """The files the kubelet projects into a pod: token, ca.crt, namespace."""
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.ca_file, directory / "ca.crt")
        (directory / "namespace").write_text(namespace)
        rotate_token(directory, token)
        return directory

    def add_node(self, name: str, *, ready: bool = True, unschedulable: bool = False,
                 labels: Mapping[str, str] | None = None) -> dict[str, Any]:
        node = self.request("POST", "/api/v1/nodes", {
            "metadata": {"name": name, "labels": dict(labels or {})},
            "spec": {"unschedulable": unschedulable},
        })
        self.set_node_ready(name, ready)
        return dict(node)

    def set_node_ready(self, name: str, ready: bool) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"conditions": [{
            "type": "Ready", "status": "True" if ready else "False", "reason": "Test",
            "lastHeartbeatTime": now, "lastTransitionTime": now}]}},
            content_type="application/strategic-merge-patch+json")

    def cordon(self, name: str, on: bool = True) -> None:
        self.request("PATCH", f"/api/v1/nodes/{name}", {"spec": {"unschedulable": on}},
                     content_type="application/merge-patch+json")

    def delete_node(self, name: str) -> None:
        self.request("DELETE", f"/api/v1/nodes/{name}")

    def add_pod(self, name: str, *, namespace: str, node: str, ip: str, labels: Mapping[str, str],
                phase: str = "Running") -> dict[str, Any]:
        self.request("POST", f"/api/v1/namespaces/{namespace}/pods", {
            "metadata": {"name": name, "labels": dict(labels)},
            # The DaemonSet's service account: without a controller manager there is no
            # "default" one, and the ServiceAccount admission plugin refuses a pod without it.
            "spec": {"nodeName": node, "serviceAccountName": "kubenurse", "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "probe", "image": "kubenurse:test", **RESTRICTED_CONTAINER}]},
        })
        return self.set_pod_status(name, namespace=namespace, ip=ip, phase=phase)

    def set_pod_status(self, name: str, *, namespace: str, ip: str, phase: str = "Running") -> dict[str, Any]:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return dict(self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": {
            "phase": phase, "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip, "startTime": now,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]}},
            content_type="application/merge-patch+json"))

    def delete_pod(self, name: str, *, namespace: str, grace: int = 0) -> None:
        self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}",
                     {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": grace})

    def resource_version(self) -> int:
        return int(self.get("/api/v1/namespaces?limit=1")["metadata"]["resourceVersion"])

    def compact_etcd(self, revision: int) -> None:
        """Compacts etcd's history up to `revision` (its JSON gateway), as the API server's
        own compactor does every --etcd-compaction-interval."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.etcd_port}/v3/kv/compaction",
            data=json.dumps({"revision": str(revision), "physical": True}).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()


def rotate_token(directory: Path, token: str) -> None:
    """Swap the token file atomically, as the kubelet does (rename over it)."""
    tmp = directory / ".token.tmp"
    tmp.write_text(token)
    tmp.replace(directory / "token")


@contextlib.contextmanager
def running_cluster(workdir: Path, etcd: Path, apiserver: Path, *, extra_args: tuple[str, ...] = ()
                    ) -> Iterator[RealCluster]:
    cluster = RealCluster(workdir, etcd, apiserver, extra_args=extra_args)
    try:
        cluster.start_etcd()
        cluster.start_apiserver()
        yield cluster
    finally:
        cluster.stop()


# The sandbox's API server, real -------------------------------------------------------------

#: The probe's RBAC as k8s/base grants it (the sandbox ships without the manifests).
_PROBE_RULES = {
    "Role": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    "ClusterRole": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}],
}


class RealApiServer:
    """What the sandbox asks of its API server, done by a real etcd + kube-apiserver (the
    stand-in's methods of the same names). Nodes and pods added before start() are created
    once the server is up."""

    def __init__(self, workdir: Path, port: int = 0) -> None:
        missing = [n for n in ("etcd", "kube-apiserver") if find_component(n) is None]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not built: run .ci/components (from a checkout; builds into "
                f"{components_dir()}/bin)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        etcd, apiserver = find_component("etcd"), find_component("kube-apiserver")
        assert etcd is not None and apiserver is not None
        self.cluster = RealCluster(workdir, etcd, apiserver, port=port)
        self._pending: list[Callable[[], object]] = []
        self._started = False

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def url(self) -> str:
        return self.cluster.server

    @property
    def is_up(self) -> bool:
        return self.cluster.apiserver is not None and self.cluster.apiserver.running

    def _do(self, action: Callable[[], object]) -> None:
        if self._started:
            action()
        else:
            self._pending.append(action)

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        self.cluster.start_etcd()
        self.cluster.start_apiserver()
        self._started = True
        for action in self._pending:
            action()
        self._pending.clear()

    async def stop(self) -> None:
        await asyncio.to_thread(self.cluster.stop)

    async def down(self) -> None:
        await asyncio.to_thread(self.cluster.stop_apiserver)

    async def up(self) -> None:
        if not self.is_up:
            await asyncio.to_thread(self.cluster.start_apiserver)

    def add_node(self, name: str, *, internal_ip: str | None = None,
                 labels: Mapping[str, str] | None = None) -> None:
        self._do(lambda: self.cluster.add_node(name, labels=labels))

    def add_pod(self, name: str, *, namespace: str, node_name: str, pod_ip: str,
                labels: Mapping[str, str], phase: str = "Running") -> None:
        def create() -> None:
            self._namespace(namespace)
            self.cluster.add_pod(name, namespace=namespace, node=node_name, ip=pod_ip, labels=labels, phase=phase)

        self._do(create)

    def _namespace(self, namespace: str) -> None:
        """The namespace, its `kubenurse` service account and the probe's RBAC (once)."""
        with contextlib.suppress(ApiError):
            self.cluster.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/kubenurse")
            return
        self.cluster.ensure_namespace(namespace)
        self.cluster.service_account(namespace, "kubenurse")
        rbac = "/apis/rbac.authorization.k8s.io/v1"
        subject = [{"kind": "ServiceAccount", "name": "kubenurse", "namespace": namespace}]
        for kind, rules in _PROBE_RULES.items():
            scoped = f"{rbac}/namespaces/{namespace}" if kind == "Role" else rbac
            plural = kind.lower() + "s"
            binding = "RoleBinding" if kind == "Role" else "ClusterRoleBinding"
            with contextlib.suppress(ApiError):
                self.cluster.request("POST", f"{scoped}/{plural}", {"metadata": {"name": "kubenurse"}, "rules": rules})
                self.cluster.request("POST", f"{scoped}/{binding.lower()}s", {
                    "metadata": {"name": "kubenurse"}, "subjects": subject,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": "kubenurse"}})

    def pod(self, name: str, *, namespace: str) -> dict[str, Any] | None:
        try:
            return dict(self.cluster.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))
        except ApiError:
            return None

    def set_pod_phase(self, name: str, phase: str, *, namespace: str) -> None:
        pod = self.pod(name, namespace=namespace)
        if pod is not None:
            ip = (pod.get("status") or {}).get("podIP", "")
            self.cluster.set_pod_status(name, namespace=namespace, ip=ip, phase=phase)

    def cordon(self, name: str) -> None:
        self.cluster.cordon(name)

    def uncordon(self, name: str) -> None:
        self.cluster.cordon(name, on=False)

    def write_serviceaccount(self, directory: str | Path, namespace: str = "default") -> Path:
        self._namespace(namespace)
        token = self.cluster.token(namespace, "kubenurse", seconds=7 * 24 * 3600)
        return self.cluster.write_serviceaccount(Path(directory), token, namespace)


def start_jaeger(workdir: Path, host: str = "127.0.0.1", port: int = 16686) -> tuple[Child, str, str] | None:
    """Jaeger v2 with in-memory storage when built: (process, OTLP/HTTP endpoint, UI URL)."""
    binary = find_component("jaeger")
    if binary is None:
        return None
    otlp = free_port(host)
    config = {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query"],
            "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["jaeger_storage_exporter"]}},
            "telemetry": {"metrics": {"level": "none"}},
        },
        "extensions": {
            "jaeger_query": {"storage": {"traces": "memstore"}, "http": {"endpoint": f"{host}:{port}"},
                             "grpc": {"endpoint": f"{host}:{free_port(host)}"}},
            "jaeger_storage": {"backends": {"memstore": {"memory": {"max_traces": 20000}}}},
        },
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"{host}:{otlp}"}}}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memstore"}},
    }
    path = workdir / "jaeger.json"
    path.write_text(json.dumps(config))  # JSON is YAML
    process = Child("jaeger", [str(binary), f"--config={path}"], workdir / "jaeger.log")
    wait_port(host, port, timeout=30, process=process)
    return process, f"http://{host}:{otlp}", f"http://{host}:{port}"
