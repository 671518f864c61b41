"""Helpers for jobs that provide system packages (Debian's WordNet, Chromium for the browser tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


def apt_install(packages: Sequence[str]) -> str | None:
    """Install Debian ``packages`` with apt-get (root only); returns an error message or None.

    A first failure is retried after ``apt-get update``: package lists may be stale on a fresh machine.
    """
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "not running as root, so apt-get cannot install them"
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in (cmd, None):
        if attempt is None:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            attempt = cmd
        if subprocess.run(attempt, env=env, stdout=subprocess.DEVNULL, check=False).returncode == 0:
            return None
    return f"'{' '.join(cmd)}' failed"
