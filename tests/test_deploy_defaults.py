"""A fresh `kubectl apply -k k8s/base` comes up green: the probe runs with the environment the
default build gives it, against the API-server stand-in, and /alive answers 200 with no check
failing. Only what a cluster provides is stood in for (the API server's address, a name for
it, the service-account files, the Service's address, the pod IPs); every other setting is
the manifest's own. A placeholder (an ingress host that does not exist) would fail here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kubenurse_sandbox.standin import ApiServerStandin
from tests.conftest import free_port
from tests.test_deploy import KUBECTL, POD_FIELDS, build, probe_container, probe_daemonset, resolved_env

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with `kubectl kustomize`) not installed")

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def alive(port: int) -> tuple[int, dict[str, object]]:
    try:
        with _DIRECT.open(f"http://127.0.0.1:{port}/alive", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def base_env() -> tuple[dict[str, str], dict[str, str], str]:
    """(the probe's env as the base sets it, the pod labels, the namespace)."""
    objects = build("base")
    ds = probe_daemonset(objects)
    env = resolved_env(ds, probe_container(objects))
    return env, ds["spec"]["template"]["metadata"]["labels"], ds["metadata"]["namespace"]


def test_the_base_sets_no_address_but_the_cluster_s_own() -> None:
    """Every URL the base gives the probe is an address of the cluster it is installed in."""
    env, _, namespace = base_env()
    urls = {name: value for name, value in env.items() if "://" in value}
    assert set(urls) == {"KUBENURSE_SERVICE_URL"}, f"the base points checks at {urls}"
    assert urlsplit(urls["KUBENURSE_SERVICE_URL"]).hostname == f"kubenurse.{namespace}.svc.cluster.local"
    assert "KUBENURSE_INGRESS_URL" not in env, "no ingress URL until one is given (k8s/overlays/ingress)"


@pytest.fixture
async def standin() -> AsyncIterator[ApiServerStandin]:
    api = ApiServerStandin(bookmark_interval=0.5)
    await api.start()
    yield api
    await api.stop()


async def test_a_fresh_base_install_comes_up_green(standin: ApiServerStandin, tmp_path: Path) -> None:
    env, labels, namespace = base_env()
    # Never run with an address the test cannot stand in for: it would reach out of loopback.
    assert {n for n, v in env.items() if "://" in v} == {"KUBENURSE_SERVICE_URL"}, env
    port = free_port()
    # This pod and one neighbour on another node; the neighbour's pod IP is this probe's
    # address, so the neighbour check really runs (and reaches a real probe).
    standin.add_node(POD_FIELDS["spec.nodeName"])
    standin.add_pod(POD_FIELDS["metadata.name"], namespace=namespace, node_name=POD_FIELDS["spec.nodeName"],
                    pod_ip="127.0.0.1", labels=labels)
    standin.add_node("node-2")
    standin.add_pod("kubenurse-peer", namespace=namespace, node_name="node-2", pod_ip="127.0.0.1", labels=labels)
    cluster = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(standin.port),
        # The stand-in's certificate names localhost; a loopback name the probe resolves
        # without asking a nameserver of this machine.
        "KUBERNETES_SERVICE_DNS": "localhost",
        # No cluster DNS on loopback: dns_cluster would ask this machine's nameserver (the
        # sandbox turns it off for the same reason).
        "KUBENURSE_CHECK_DNS_CLUSTER": "false",
        "KUBENURSE_SERVICEACCOUNT_DIR": str(standin.write_serviceaccount(tmp_path / "sa", namespace)),
        "KUBENURSE_LISTEN_HOST": "127.0.0.1",
        "KUBENURSE_HTTP_PORT": str(port),
        # The Service, whose only endpoint is this probe.
        "KUBENURSE_SERVICE_URL": f"http://127.0.0.1:{port}",
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
    }
    environment = {"PATH": os.environ.get("PATH", ""), **env, **cluster}
    process = subprocess.Popen([sys.executable, "-m", "probe"], env=environment, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        status, doc = 0, {}
        while time.monotonic() < deadline:
            try:
                status, doc = await asyncio.to_thread(alive, port)
            except OSError:
                status = 0
            results = doc.get("last_check_result", {}) if status else {}
            if status == 200 and isinstance(results, dict) and "path_node-2" in results:
                break
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            await asyncio.sleep(0.2)
        assert status == 200, doc
        results = doc["last_check_result"]
        assert isinstance(results, dict)
        checks = {k: v for k, v in results.items() if not k.startswith("neighbourhood")}
        failing = {k: v for k, v in checks.items() if v not in ("ok", "skipped")}
        assert not failing, failing
        assert {k for k, v in checks.items() if v == "ok"} >= {
            "api_server_direct", "api_server_dns", "me_service", "path_node-2",
        }, checks
        assert checks["me_ingress"] == "skipped"
        assert doc["skipped_checks"] == {
            "me_ingress": "KUBENURSE_INGRESS_URL not set",
            "dns_cluster": "disabled by KUBENURSE_CHECK_DNS_CLUSTER",
        }
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
