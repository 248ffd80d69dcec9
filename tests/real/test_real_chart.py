"""Every chart render through the session's real kube-apiserver (tests/real/conftest.py): its
server-side dry run checks what the schemas cannot (port names, update strategies...),
defaulting, and admission, Pod Security included (the namespace enforces "restricted", as
k8s/base makes it).

The session's cluster already holds k8s/base's objects under the release's names (the
fixture applies the node-events overlay), and a dry run of an object that exists is an
update (a patch merged into it), not the create a first `helm install` makes. So the chart
is rendered here as the release "kubenurse-chart": the same objects under names nobody
holds, each dry run a create.
"""

from __future__ import annotations

import pytest
import yaml

from tests.real.cluster import RealCluster
from tests.test_deploy import build
from tests.test_helm import HELM, renders

pytestmark = pytest.mark.skipif(HELM is None, reason="helm not built (.ci/components builds it)")

RELEASE = "kubenurse-chart"


@pytest.fixture(scope="module")
def cluster(real_cluster: RealCluster, crds: None) -> RealCluster:
    """The session's cluster, its CRDs installed and the namespace as k8s/base makes it (for
    real: a dry run creates no namespace; another module may have applied an overlay's)."""
    namespaces = [o for o in build("base") if o["kind"] == "Namespace"]
    real_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(namespaces))
    return real_cluster


def dry_run(cluster: RealCluster, documents: str) -> tuple[int, str, str]:
    done = cluster.kubectl("--request-timeout=60s", "apply", "--dry-run=server", "-f", "-", stdin=documents,
                           check=False)
    return done.returncode, done.stdout, done.stderr


def test_every_render_passes_a_server_side_dry_run(cluster: RealCluster) -> None:
    problems = []
    for name, objects in renders(RELEASE).items():
        code, stdout, stderr = dry_run(cluster, yaml.safe_dump_all(list(objects)))
        # Admission warnings (Pod Security "warn", deprecated APIs) count as problems too.
        if code != 0 or "Warning" in stderr:
            problems.append(f"{name}:\n{stderr}")
        # Each object a create, as in a first install (not "configured": merged into one that exists).
        lines = stdout.splitlines()
        if len(lines) != len(objects) or not all(line.endswith(" created (server dry run)") for line in lines):
            problems.append(f"{name}: not each object created:\n{stdout}")
    assert not problems, "\n".join(problems)


def test_the_dry_run_refuses_what_the_api_server_refuses(cluster: RealCluster) -> None:
    """It can fail: a surge beside unavailable pods is refused; a pod on the host's network
    in the restricted namespace is a Pod Security warning (enforced on its pods)."""
    (ds,) = [o for o in renders(RELEASE)["defaults"] if o["kind"] == "DaemonSet"]
    surging = yaml.safe_load(yaml.safe_dump(ds))
    surging["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] = 1
    code, _, stderr = dry_run(cluster, yaml.safe_dump(surging))
    assert code != 0 and "maxSurge" in stderr, stderr
    host = yaml.safe_load(yaml.safe_dump(ds))
    host["spec"]["template"]["spec"]["hostNetwork"] = True
    code, _, stderr = dry_run(cluster, yaml.safe_dump(host))
    assert "would violate PodSecurity" in stderr and "hostNetwork" in stderr, stderr
