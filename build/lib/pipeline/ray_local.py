"""A real single-node Ray head on 127.0.0.1, owned by the caller: for tests and ``make demo``.

``ray start --head --node-ip-address=127.0.0.1`` in its own process group, on free ports,
with its own temp dir, so that it neither meets another cluster on the machine nor
outlives its owner: ``stop()`` (also on an exception or Ctrl-C through the context
manager) kills exactly its process group. ``ray stop`` would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
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
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
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
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline and _group_alive(self.pgid):
                time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_head(num_cpus: int = 2, timeout: float = 90.0, log=None) -> RayHead:
    """Start the head and wait until its dashboard (the job API) answers."""
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


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, log=None) -> Iterator[RayHead]:
    head = start_head(num_cpus=num_cpus, log=log)
    try:
        yield head
    finally:
        head.stop()
