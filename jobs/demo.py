"""`make demo`: the whole chain on the synthetic world (grows as the stages land)."""

from __future__ import annotations

import argparse
import os
import sys

from jobs import synth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo", help="folder for every output of the demo (default: ./demo)")
    p.add_argument("--n", type=int, default=2000, help="training samples of the synthetic world")
    p.add_argument("--val", type=int, default=200, help="held-out validation samples")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    return synth.main(["--out", os.path.join(out, "world"), "--n", str(args.n), "--val", str(args.val)])


if __name__ == "__main__":
    sys.exit(main())
