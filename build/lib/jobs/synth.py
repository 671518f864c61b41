"""Write the synthetic world: ``python -m jobs.synth --out DIR --n N [--val N] [--serve]``.

Writes images, ``ground_truth.parquet``, ``tokenizer.model`` and every source format
(CC3M tsv, COCO captions json, LAION parquet, OpenImages narratives) for each split.
The URL lists point at ``--base-url``; with ``--serve`` the world is served on
127.0.0.1 (``--port``, ephemeral by default), the lists are rewritten for that address,
and the command blocks until Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Annotated

import tyro
from tqdm import tqdm

from jobs._cli import parse
from pipeline import synthetic


@dataclass
class SynthConfig:
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """folder to write the world into"""
    n: int = 1000
    """training samples"""
    val: int = 200
    """validation samples"""
    seed: int = 0
    """the world is a pure function of the seed"""
    bad_fraction: float = 0.1
    """rows made deliberately bad (dead url, not an image, truncated jpeg, empty caption)"""
    base_url: str = "http://127.0.0.1:8000"
    """base URL written into the url lists"""
    serve: bool = False
    """serve the world over HTTP on 127.0.0.1 until Ctrl-C"""
    port: int = 0
    """port for --serve (0: ephemeral)"""

    def __post_init__(self):
        if self.n < 0 or self.val < 0:
            raise ValueError("--n and --val must be >= 0")
        if not 0.0 <= self.bad_fraction < 1.0:
            raise ValueError("--bad-fraction must be in [0, 1)")


def main(argv: list[str] | None = None) -> int:
    args = parse(SynthConfig, argv, prog="python -m jobs.synth", description=__doc__)
    out = os.path.abspath(args.output)
    print(f"synthetic world: {args.n} train + {args.val} val samples, seed {args.seed}, bad fraction {args.bad_fraction} -> {out}")
    bar = tqdm(total=args.n + args.val, unit="img", desc="render")
    world = synthetic.write_world(
        out, args.n, args.val, seed=args.seed, bad_fraction=args.bad_fraction, progress=lambda done, total: bar.update(done - bar.n)
    )
    bar.close()
    if not args.serve:
        _report(world, synthetic.render_sources(world, args.base_url))
        return 0
    with synthetic.serve(out, port=args.port) as base_url:
        _report(world, synthetic.render_sources(world, base_url))
        print(f"serving {out} at {base_url} (Ctrl-C to stop)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped")
    return 0


def _report(world: synthetic.World, sources: dict[str, dict[str, str]]) -> None:
    import pyarrow.parquet as pq

    kinds = pq.read_table(os.path.join(world.root, "ground_truth.parquet"), columns=["split", "kind"]).to_pandas()
    print(kinds.groupby(["split", "kind"]).size().unstack(fill_value=0).to_string())
    print(f"ground truth: {os.path.join(world.root, 'ground_truth.parquet')}")
    print(f"tokenizer:    {world.tokenizer}")
    for split, paths in sources.items():
        for fmt, path in paths.items():
            print(f"{split:5s} {fmt:15s} {path}")


if __name__ == "__main__":
    sys.exit(main())
