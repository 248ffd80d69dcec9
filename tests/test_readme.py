"""The README's first command, run as a new user would (on a free port instead of 8080):
it must show a working probe, not a page of skipped checks."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def first_command_env() -> dict[str, str]:
    """The variables the README's first `.venv/bin/kubenurse` line sets."""
    section = README.read_text().split("## Two commands", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block under 'Two commands'"
    script = block[1].replace("\\\n", " ")
    [line] = [line for line in script.splitlines() if line.strip().endswith(".venv/bin/kubenurse")]
    words = shlex.split(line)
    assert words[-1] == ".venv/bin/kubenurse"
    return dict(word.split("=", 1) for word in words[:-1])


def get(url: str) -> tuple[int, str]:
    try:
        with _DIRECT.open(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_first_command_shows_a_working_probe() -> None:
    port = free_port()
    readme_env = {k: v.replace(":8080", f":{port}") for k, v in first_command_env().items()}
    assert readme_env, "the first command sets no variable: outside a cluster every check would be skipped"
    env = {
        "PATH": str(Path(sys.executable).parent),
        "KUBENURSE_LISTEN_HOST": "127.0.0.1",
        "KUBENURSE_HTTP_PORT": str(port),
        "KUBENURSE_SHUTDOWN_DURATION": "0s",
        **readme_env,
    }
    process = subprocess.Popen([sys.executable, "-m", "probe"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        status, body = 0, ""
        while time.monotonic() < deadline:
            try:
                status, body = get(f"http://127.0.0.1:{port}/alive")
            except OSError:
                status = 0
            if status == 200:
                break
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            time.sleep(0.1)
        assert status == 200, body
        results = json.loads(body)["last_check_result"]
        performed = {k: v for k, v in results.items() if v not in ("skipped",) and not k.startswith("neighbourhood")}
        assert performed == {"me_service": "ok", "self": "ok"}, results
        _, metrics = get(f"http://127.0.0.1:{port}/metrics")
        families = {f.name for f in text_string_to_metric_families(metrics)}
        assert {
            "kubenurse_httpclient_request_duration_seconds",
            "kubenurse_httpclient_trace_request_duration_seconds",
            "kubenurse_httpclient_requests",
        } <= families
    finally:
        process.terminate()
        process.wait(10)
