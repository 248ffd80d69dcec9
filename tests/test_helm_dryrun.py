"""Every chart render through a real kube-apiserver's server-side dry run: its validation
beyond the schemas (port names, update strategies...), defaulting, and admission, Pod
Security included (the namespace enforces "restricted", as k8s/base makes it).

etcd and kube-apiserver come from .ci/components (the same cache as helm); the server runs
on loopback for this module only, with a static admin token.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.test_deploy import KUBECTL, build
from tests.test_helm import HELM, renders

COMPONENTS = Path(os.environ.get("KUBENURSE_COMPONENTS") or Path.home() / ".cache" / "kubenurse-components")
ETCD = COMPONENTS / "bin" / "etcd"
APISERVER = COMPONENTS / "bin" / "kube-apiserver"
CRDS = sorted((COMPONENTS / "builds").glob("crds-*/*.yaml"))

pytestmark = pytest.mark.skipif(
    not (ETCD.is_file() and APISERVER.is_file() and CRDS and HELM and KUBECTL),
    reason="etcd, kube-apiserver, the prometheus-operator CRDs (.ci/components), helm or kubectl missing",
)


def write_pki(directory: Path) -> None:
    """A serving certificate for 127.0.0.1 and the service-account signing key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def pem_key(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.key").write_bytes(pem_key(key))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "sa.key").write_bytes(pem_key(signing))
    (directory / "sa.pub").write_bytes(
        signing.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("apiserver")
    write_pki(directory)
    (directory / "tokens.csv").write_text("dry-run-token,admin,admin,system:masters\n")
    client, peer, secure = free_port(), free_port(), free_port()
    etcd_log = (directory / "etcd.log").open("wb")
    etcd = subprocess.Popen(
        [
            str(ETCD),
            f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
        ],
        stdout=etcd_log,
        stderr=subprocess.STDOUT,
    )
    api_log = (directory / "apiserver.log").open("wb")
    apiserver = subprocess.Popen(
        [
            str(APISERVER),
            f"--etcd-servers=http://127.0.0.1:{client}",
            "--bind-address=127.0.0.1",
            f"--secure-port={secure}",
            f"--tls-cert-file={directory / 'tls.crt'}",
            f"--tls-private-key-file={directory / 'tls.key'}",
            f"--service-account-key-file={directory / 'sa.pub'}",
            f"--service-account-signing-key-file={directory / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--token-auth-file={directory / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/16",
        ],
        stdout=api_log,
        stderr=subprocess.STDOUT,
    )
    config = directory / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{secure}",
                                                       "certificate-authority": str(directory / "tls.crt")}}],
                "users": [{"name": "u", "user": {"token": "dry-run-token"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # two busy cores: a cold start takes tens of seconds
        while kubectl(config, "get", "--raw", "/readyz").returncode != 0:
            assert apiserver.poll() is None and etcd.poll() is None, (directory / "apiserver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (directory / "apiserver.log").read_text()[-3000:]
            time.sleep(1)
        # The namespace as k8s/base makes it (enforcing "restricted"), and the CRDs.
        namespaces = [o for o in build("base") if o["kind"] == "Namespace"]
        applied = kubectl(config, "apply", "-f", "-", stdin=yaml.safe_dump_all(namespaces))
        assert applied.returncode == 0, applied.stderr
        for crd in CRDS:
            applied = kubectl(config, "apply", "--server-side", "-f", str(crd))
            assert applied.returncode == 0, applied.stderr
        established = kubectl(
            config, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com",
        )  # fmt: skip
        assert established.returncode == 0, established.stderr
        yield config
    finally:
        stop(apiserver)
        stop(etcd)
        api_log.close()
        etcd_log.close()


def kubectl(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBECTL or "kubectl", "--kubeconfig", str(config), "--request-timeout=60s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_render_passes_a_server_side_dry_run(kubeconfig: Path) -> None:
    problems = []
    for name, objects in renders().items():
        done = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(list(objects)))
        # Admission warnings (Pod Security "warn", deprecated APIs) count as problems too.
        if done.returncode != 0 or "Warning" in done.stderr:
            problems.append(f"{name}:\n{done.stderr}")
    assert not problems, "\n".join(problems)


def test_the_dry_run_refuses_what_the_api_server_refuses(kubeconfig: Path) -> None:
    """It can fail: a surge beside unavailable pods is refused; a pod on the host's network
    in the restricted namespace is a Pod Security warning (enforced on its pods)."""
    (ds,) = [o for o in renders()["defaults"] if o["kind"] == "DaemonSet"]
    surging = yaml.safe_load(yaml.safe_dump(ds))
    surging["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 1
    done = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(surging))
    assert done.returncode != 0 and "maxSurge" in done.stderr, done.stderr
    host = yaml.safe_load(yaml.safe_dump(ds))
    host["spec"]["template"]["spec"]["hostNetwork"] = True
    done = kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(host))
    assert "would violate PodSecurity" in done.stderr and "hostNetwork" in done.stderr, done.stderr
