"""The image's runtime filesystem (issue 23 item 7): deploy/image/rootfs.sh run on this
machine's interpreter and a venv holding exactly the lock's packages, then the probe started
inside the result with chroot: it must run, verify TLS, and find no shell, package manager
or pip there. (No image is built here: no registry is reachable for the base image.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import trustme

from tests.conftest import free_port
from tests.test_deploy import dockerfile_stages

ROOT = Path(__file__).resolve().parent.parent
ROOTFS_SCRIPT = ROOT / "deploy" / "image" / "rootfs.sh"
#: Nothing a shell, a package manager or pip would be found by.
FORBIDDEN = re.compile(r"(sh|bash|dash|ash|busybox|apt|apt-get|dpkg|pip|pip3(\.\d+)?|easy_install)")

pytestmark = pytest.mark.timeout(180)


def chroot_prefix() -> list[str] | None:
    """How to enter a directory as /: chroot as root, else in a user namespace."""
    if not sys.platform.startswith("linux"):
        return None
    chroot, unshare = shutil.which("chroot"), shutil.which("unshare")
    if chroot is None:
        return None
    if os.geteuid() == 0:
        return [chroot]
    if unshare and subprocess.run([unshare, "-r", "true"], capture_output=True).returncode == 0:
        return [unshare, "-r", chroot]
    return None


CHROOT = chroot_prefix()


def lock_names() -> list[str]:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    return [line.split("==")[0] for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(root of the runtime tree, the venv path inside it)."""
    if CHROOT is None:
        pytest.skip("needs chroot (root, or unprivileged user namespaces)")
    work = tmp_path_factory.mktemp("image")
    venv = work / "opt" / "kubenurse"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = venv / "lib" / version / "site-packages"
    # Exactly the lock's packages, file by file from this environment (what the image's pip installs).
    for name in lock_names():
        dist = metadata.distribution(name)
        for file in dist.files or ():
            if file.parts[0] == "..":  # console scripts of dependencies: not needed
                continue
            source = Path(str(dist.locate_file(file)))
            if source.is_file():
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, site / file)
    # The probe as a regular package, and its console script, as `pip install /src` leaves them.
    shutil.copytree(ROOT / "probe", site / "probe", ignore=shutil.ignore_patterns("__pycache__"))
    script = venv / "bin" / "kubenurse"
    script.write_text(f"#!{venv}/bin/python\nimport sys\nfrom probe.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    # pip's own traces, which the script must remove.
    (venv / "bin" / "pip").write_text("#!/bin/sh\n")
    (site / "pip").mkdir()
    root = work / "rootfs"
    subprocess.run(["sh", str(ROOTFS_SCRIPT), str(root), sys.base_prefix, str(venv)], check=True, timeout=150)
    yield root, venv
    shutil.rmtree(work, ignore_errors=True)


def test_the_runtime_tree_has_no_shell_package_manager_or_pip(image: tuple[Path, Path]) -> None:
    root, venv = image
    found = [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if FORBIDDEN.fullmatch(path.name) and (path.is_file() or path.is_symlink() or path.is_dir())
    ]
    assert not found, found
    assert not list(root.rglob("ensurepip")), "no way to bring pip back either"
    assert (root / str(venv).lstrip("/") / "bin" / "kubenurse").is_file()
    for shell in ("bin/sh", "usr/bin/sh", "bin/bash"):
        assert not (root / shell).exists()


def in_image(image: tuple[Path, Path], *command: str, env: dict[str, str] | None = None,
             **kwargs: object) -> subprocess.Popen[bytes]:
    root, _ = image
    assert CHROOT is not None
    base = {"PATH": "/nonexistent", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONMALLOC": "malloc"}
    return subprocess.Popen([*CHROOT, str(root), *command], env={**base, **(env or {})}, **kwargs)  # type: ignore[call-overload]


def test_a_shell_cannot_even_start(image: tuple[Path, Path]) -> None:
    done = in_image(image, "/bin/sh", "-c", "true", stderr=subprocess.PIPE)
    _, stderr = done.communicate(timeout=10)
    assert done.returncode != 0 and b"No such file" in stderr


def test_the_probe_runs_and_verifies_tls_in_it(image: tuple[Path, Path]) -> None:
    root, venv = image
    # The system CA bundle is there (the non-token checks use it) and the TLS stack loads it.
    stats = in_image(image, f"{venv}/bin/python", "-c",
                     "import ssl, json; print(json.dumps(ssl.create_default_context().cert_store_stats()))",
                     stdout=subprocess.PIPE)
    out, _ = stats.communicate(timeout=30)
    assert json.loads(out)["x509_ca"] > 10, out
    # A real HTTPS check from inside, against a server signed by an extra CA put in the tree.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "tmp" / "extra-ca.pem"))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    listener = socket.create_server(("127.0.0.1", 0))
    target_port = listener.getsockname()[1]
    port = free_port()
    probe = in_image(image, f"{venv}/bin/kubenurse", env={
        "KUBENURSE_LISTEN_HOST": "127.0.0.1", "KUBENURSE_HTTP_PORT": str(port), "KUBENURSE_CHECK_INTERVAL": "500ms",
        "KUBENURSE_EXTRA_CA": "/tmp/extra-ca.pem", "KUBENURSE_EXTRA_CHECKS": f"tls:https://127.0.0.1:{target_port}/",
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
    }, stderr=subprocess.PIPE)
    try:
        import threading

        def serve() -> None:
            listener.settimeout(20)
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    with server.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(4096)
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                except (OSError, ssl.SSLError):
                    pass

        threading.Thread(target=serve, daemon=True).start()
        deadline = time.monotonic() + 30
        document: dict[str, object] = {}
        while time.monotonic() < deadline:
            if probe.poll() is not None:
                pytest.fail(f"the probe exited: {probe.stderr.read().decode() if probe.stderr else ''}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/alive", timeout=2) as response:
                    document = json.loads(response.read())
            except OSError:
                time.sleep(0.2)
                continue
            results = document.get("last_check_result")
            if isinstance(results, dict) and results.get("tls") == "ok":
                break
            time.sleep(0.2)
        assert isinstance(document.get("last_check_result"), dict), document
        assert document["last_check_result"]["tls"] == "ok", document["last_check_result"]  # type: ignore[index]
    finally:
        probe.terminate()
        probe.wait(timeout=15)
        listener.close()


def test_the_dockerfile_runs_the_script_and_ships_only_its_tree() -> None:
    stages = dockerfile_stages()
    build, final = stages[0], stages[-1]
    runs = [rest for keyword, rest in build if keyword == "RUN"]
    assert "sh /src/rootfs.sh /rootfs /usr/local /opt/kubenurse" in runs
    assert ("COPY", "deploy/image/rootfs.sh /src/rootfs.sh") in build
    assert final[0] == ("FROM", "scratch"), "nothing of the base image but what the script gathered"
    assert [rest for keyword, rest in final if keyword == "COPY"] == ["--from=build /rootfs /"]
    assert not [rest for keyword, rest in final if keyword == "RUN"], "a RUN would need a shell"
