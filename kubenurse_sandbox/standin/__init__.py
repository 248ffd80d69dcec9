"""A Kubernetes API server stand-in (pods and nodes, get/list/watch) for tests and the sandbox."""

from .apiserver import ApiServerStandin, RequestRecord

__all__ = ["ApiServerStandin", "RequestRecord"]
