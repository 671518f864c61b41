"""``nxtp-train``: the deepspeed launcher on this package's training job.

    nxtp-train --config jobs/configs/g3m.yaml --deepspeed jobs/configs/zero2.json      # every local GPU
    nxtp-train --num_gpus 2 -- --config demo.yaml --deepspeed zero2.json               # launcher options first
    nxtp-train --hostfile hosts --num_nodes 4 -- --config g3m.yaml --deepspeed zero3.json

Arguments before ``--`` go to the ``deepspeed`` launcher, the rest to ``jobs/train.py``
(without ``--`` everything goes to the training job). The launcher replaces this process.
"""

from __future__ import annotations

import os
import shutil
import sys


def command(argv: list[str]) -> list[str]:
    """The deepspeed launcher's command line for ``argv``."""
    launcher, train = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")  # this environment's launcher first
    deepspeed = beside if os.path.exists(beside) else shutil.which("deepspeed") or beside
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    return [deepspeed, *launcher, script, *train]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    cmd = command(args)
    if not os.path.exists(cmd[0]):
        print("error: the deepspeed launcher is not installed (pip install 'nxtp[train]')", file=sys.stderr)
        return 2
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
