"""Helpers shared by the job entry points."""

from __future__ import annotations

import ast
import inspect
import os


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (the string below it in the class body), for --help."""
    docs, body = {}, ast.parse(inspect.getsource(cls)).body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs


def start_ray(address: str | None) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local instance; True when started here."""
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
        return False
    # a local instance for this job only: on 127.0.0.1, without token auth (which would also write
    # ~/.ray/auth_token and so turn auth on for every later `ray start` on the machine)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


def print_path_error(err: Exception) -> None:
    """A missing or refused path, said with where it was looked for (the cluster, under `ray job submit`)."""
    import socket
    import sys

    print(
        f"error: {err} (looked on {socket.gethostname()}: paths are resolved where the job runs, "
        "which under `ray job submit` is the cluster, so they must exist there)",
        file=sys.stderr,
    )
