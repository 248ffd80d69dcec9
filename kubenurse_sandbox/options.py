"""What a sandbox run is asked for, and the error when it cannot be had. No heavy imports:
`kubenurse sandbox <command>` (the client) needs only this and control.py."""

from __future__ import annotations

from dataclasses import dataclass

#: The control endpoint and the probes' port; the stand-ins take the next four.
#: Below the Linux ephemeral range, away from 8080/9090/3000-style defaults and NodePorts.
DEFAULT_PORT = 24080
MAX_NODES = 50  # 127.0.0.2 .. 127.0.0.51 (127.0.0.53 is often systemd-resolved's)


@dataclass(frozen=True)
class Options:
    nodes: int = 5
    port: int = DEFAULT_PORT  # 0: free ports picked at start
    interval: str = "1s"
    #: KUBENURSE_CHECK_TIMEOUT of every probe; empty: the probe's default.
    timeout: str = ""
    neighbour_limit: int = 3
    prometheus: bool = True
    #: A real etcd + kube-apiserver (and Jaeger, where built) instead of the stand-in.
    real: bool = False
    #: UDP trains between the probes (KUBENURSE_CHECK_NEIGHBOURHOOD_UDP).
    udp: bool = True


class SandboxError(Exception):
    """The sandbox cannot start, or a command cannot be done; the message is one line for the user."""
