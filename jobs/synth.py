"""Write the synthetic world: ``python -m jobs.synth --out DIR --n N [--val N] [--serve]``.

Writes images, ``ground_truth.parquet``, ``tokenizer.model`` and every source format
(CC3M tsv, COCO captions json, LAION parquet, OpenImages narratives) for each split.
The URL lists point at ``--base-url``; with ``--serve`` the world is served on
127.0.0.1 (``--port``, ephemeral by default), the lists are rewritten for that address,
and the command blocks until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from tqdm import tqdm

from pipeline import synthetic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the world into")
    p.add_argument("--n", type=int, default=1000, help="training samples (default 1000)")
    p.add_argument("--val", type=int, default=200, help="validation samples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="the world is a pure function of the seed")
    p.add_argument("--bad-fraction", type=float, default=0.1, help="rows made deliberately bad (dead url, not an image, truncated jpeg, empty caption)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="base URL written into the url lists")
    p.add_argument("--serve", action="store_true", help="serve the world over HTTP on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=0, help="port for --serve (default: ephemeral)")
    args = p.parse_args(argv)
    if args.n < 0 or args.val < 0:
        p.error("--n and --val must be >= 0")
    if not 0.0 <= args.bad_fraction < 1.0:
        p.error("--bad-fraction must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
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
