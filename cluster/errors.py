"""User errors of the cluster commands: the CLI prints them as one line and exits non-zero."""


class ClusterError(Exception):
    """A request that cannot be carried out as asked (no feasible plan, unreachable cluster, bad flag)."""
