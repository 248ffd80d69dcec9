"""The real control plane the tests run (its code is shared with `kubenurse sandbox --real`)."""

from kubenurse_sandbox.real import ApiError, RealCluster, rotate_token, running_cluster

__all__ = ["ApiError", "RealCluster", "rotate_token", "running_cluster"]
