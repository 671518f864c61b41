"""A real Ray head on 127.0.0.1, and worker nodes joining it, owned by the caller: for tests and ``make demo``.

``ray start --head --node-ip-address=127.0.0.1`` in its own process group, on free ports,
with its own temp dir, so that it neither meets another cluster on the machine nor
outlives its owner: ``stop()`` (also on an exception or Ctrl-C through the context
manager) kills exactly its process group. ``ray stop`` would kill every Ray on the machine.

``start_worker`` adds a node to such a head (``ray start --address``), again as its own
process group: a several-node cluster on one machine, each node with its own CPUs, custom
resources and object store. ``RayWorker.kill()`` SIGKILLs the node's raylet and every
worker process on it at once, which is what the rest of the cluster sees when a machine is
lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def single_node_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment under which Ray keeps every address on loopback.

    Ray resolves ``--node-ip-address=127.0.0.1`` to the machine's routable address unless
    told that no multi-node cluster is wanted (the variable's name says Windows/OSX, but
    the switch is generic). Token authentication is off for this loopback-only head: Ray
    would otherwise switch it on as soon as any local ``ray.init()`` has written
    ``~/.ray/auth_token``, and clients that do not know the token would be refused.
    """
    env = dict(os.environ if base is None else base)
    env[CLUSTER_SWITCH] = "0"
    env["RAY_AUTH_MODE"] = "disabled"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


@dataclass
class RayHead:
    gcs_address: str  # for ray.init(address=...)
    dashboard_url: str  # for ray job submit --address
    temp_dir: str
    pgid: int
    env: dict[str, str]

    def submit(self, entrypoint: list[str], working_dir: str, timeout: float = 900, extra_args: list[str] | None = None) -> subprocess.CompletedProcess:
        """``ray job submit --address <dashboard> --working-dir <dir> -- <entrypoint>``, waiting for the end."""
        cmd = ["ray", "job", "submit", "--address", self.dashboard_url, "--working-dir", working_dir, *(extra_args or []), "--", *entrypoint]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        _end_group(self.pgid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class RayWorker:
    """A worker node of a local cluster: its raylet, object store and worker processes, one process group."""

    name: str  # the custom resource {name: 1} it was started with: pins work to it, finds it among the nodes
    node_id: str
    log_dir: str  # the output of its ray start (Ray's own logs are under the head's temp dir)
    pgid: int

    def kill(self) -> None:
        """SIGKILL every process of the node at once: to the cluster, a machine that is lost."""
        _end_group(self.pgid, graceful_s=0.0)
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def stop(self) -> None:
        _end_group(self.pgid)
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _end_group(pgid: int, graceful_s: float = 3.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``graceful_s``; return once it is gone."""
    for sig, wait in ((signal.SIGTERM, graceful_s), (signal.SIGKILL, 10.0)):
        if sig == signal.SIGTERM and graceful_s <= 0:
            continue
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline and _group_alive(pgid):
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_head(num_cpus: int = 2, timeout: float = 90.0, log=None, object_store_mb: int | None = None) -> RayHead:
    """Start the head and wait until its dashboard (the job API) answers.

    ``num_cpus`` 0 gives a head that runs only drivers and Ray's own services, as on a
    cluster whose work runs on its worker nodes. ``object_store_mb``: the node's object
    store (default: Ray's, a share of the machine's memory).
    """
    env = single_node_env()
    # short: Ray's unix socket paths under it must stay below 108 bytes
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port, dashboard, client, agent = free_port(), free_port(), free_port(), free_port()
    cmd = [
        "ray", "start", "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]  # fmt: skip
    if object_store_mb is not None:
        cmd.append(f"--object-store-memory={object_store_mb * 2**20}")
    out = open(os.path.join(temp_dir, "ray_start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"{LOOPBACK}:{port}", f"http://{LOOPBACK}:{dashboard}", temp_dir, proc.pid, env)
    deadline = time.time() + timeout
    try:
        if proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"ray start failed; see {out.name}:\n{open(out.name).read()[-2000:]}")
        while True:
            try:
                urllib.request.urlopen(f"{head.dashboard_url}/api/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"Ray dashboard at {head.dashboard_url} did not answer within {timeout:.0f}s") from None
                time.sleep(0.5)
    except BaseException:
        head.stop()
        raise
    finally:
        out.close()
    if log:
        log(f"ray head: {head.gcs_address}, jobs API {head.dashboard_url}")
    return head


# ``ray start``, except that the head's address stays 127.0.0.1: with several nodes allowed,
# Ray swaps a loopback address for the machine's routable one, where this head does not listen
_JOIN_ON_LOOPBACK = (
    "import sys, ray._private.services as services, ray.scripts.scripts as scripts\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(scripts.main())\n"
)


def start_worker(
    head: RayHead, name: str, num_cpus: int = 1, object_store_mb: int = 256, timeout: float = 90.0
) -> RayWorker:
    """Add a worker node to ``head`` (``ray start --address``) and wait until the cluster lists it alive.

    The node has ``num_cpus`` CPUs and the custom resource ``{name: 1}``; its own ports keep
    it apart from the head and the other nodes on this machine (it shares the head's temp
    dir, as every node of a one-machine cluster does).
    """
    env = dict(head.env)
    env[CLUSTER_SWITCH] = "1"  # else ray start refuses to add a node
    log_dir = tempfile.mkdtemp(prefix="rayw", dir="/tmp")  # this helper's log; Ray's files go under the head's temp dir
    cmd = [
        sys.executable, "-c", _JOIN_ON_LOOPBACK, "start",
        f"--address={head.gcs_address}",
        f"--node-ip-address={LOOPBACK}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps({name: 1})}",
        f"--object-store-memory={object_store_mb * 2**20}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = os.path.join(log_dir, "ray_start.log")
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    worker = RayWorker(name, "", log_dir, proc.pid)
    try:
        deadline = time.time() + timeout
        while not worker.node_id:
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"ray start --address {head.gcs_address} failed:\n{open(log_path).read()[-2000:]}")
            worker.node_id = next((n["node_id"] for n in alive_nodes(head) if n["resources"].get(name)), "")
            if not worker.node_id:
                if time.time() > deadline:
                    raise RuntimeError(f"node {name} did not join {head.gcs_address} within {timeout:.0f}s:\n{open(log_path).read()[-2000:]}")
                time.sleep(0.2)
    except BaseException:
        worker.kill()
        raise
    return worker


def alive_nodes(head: RayHead) -> list[dict]:
    """The cluster's live nodes (Ray's state API): ``node_id``, ``resources`` (totals), ``is_head``."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=head.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
    return [{"node_id": n.node_id, "resources": dict(n.resources_total), "is_head": n.is_head_node} for n in nodes]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, log=None) -> Iterator[RayHead]:
    head = start_head(num_cpus=num_cpus, log=log)
    try:
        yield head
    finally:
        head.stop()
