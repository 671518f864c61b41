"""Labels and evaluation on a local cluster of three nodes against one node with the same CPUs.

    python -m benchmarks.multinode_bench [--captions 40000] [--images 240] [--rounds 2] [--out benchmarks/results]

One node: a Ray head with ``--cpus`` CPUs (default 2). Three nodes, as tests/test_multinode.py
builds them: a head with no CPUs of its own (drivers and Ray's services only, as on a real
cluster) and two worker nodes that share the same CPUs between them, every node its own
raylet and object store on this machine. The same jobs go through ``ray job submit`` on each
(``jobs.labels`` with spaCy on img2dataset-style caption shards; ``jobs.evaluate`` top-10 of
a small random model at 196 image tokens, the synthetic world's tokenizer), alternating the two
clusters round by round. Overhead = wall(3 nodes) / wall(1 node) - 1, median over rounds, wall
time from submission to the job's exit; each job's own throughput (its summary) is recorded too.
What the overhead holds: moving blocks between object stores, scheduling across raylets, a
driver whose node has no CPUs. Writes ``multinode.json`` and ``multinode.md`` into ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local instances that write no ~/.ray/auth_token

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("NLTK_DATA", os.path.join(REPO, ".cache", "nltk_data"))

from benchmarks.labels_bench import build_corpus, device  # noqa: E402
from benchmarks.labels_bench import write_shards as write_caption_shards  # noqa: E402
from pipeline import ray_local  # noqa: E402
from pipeline.outputs import write_json, write_text  # noqa: E402

GOAL = "overhead stated (no target): 3 nodes sharing the CPUs of 1"


@contextmanager
def cluster(kind: str, cpus: int) -> Iterator[ray_local.RayHead]:
    """A head alone with ``cpus`` CPUs, or a 0-CPU head and two workers splitting ``cpus``."""
    if kind == "1 node":
        head = ray_local.start_head(num_cpus=cpus, object_store_mb=256)
        workers = []
    else:
        head = ray_local.start_head(num_cpus=0, object_store_mb=256)
        split = [cpus // 2, cpus - cpus // 2]
        workers = [ray_local.start_worker(head, f"node_{chr(ord('a') + i)}", num_cpus=n, object_store_mb=256) for i, n in enumerate(split)]
    try:
        yield head
    finally:
        for worker in workers:
            worker.stop()
        head.stop()


def timed_job(head: ray_local.RayHead, cmd: list[str], summary: str, clear: str) -> dict:
    shutil.rmtree(clear, ignore_errors=True)
    t0 = time.perf_counter()
    proc = head.submit(cmd, working_dir=REPO, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return {"wall_s": round(wall, 2), "summary": json.load(open(summary))}


def make_inputs(work: str, captions: int, images: int) -> dict:
    from benchmarks.evaluate_bench import make_inputs as evaluation_inputs
    from pipeline import synthetic

    caption_shards = os.path.join(work, "captions")
    write_caption_shards(build_corpus(captions), caption_shards, per_shard=max(1, captions // 8))
    tokenizer = synthetic.write_world(os.path.join(work, "tok_world"), n_train=0, n_val=1, seed=0).tokenizer
    shards, labels, export = evaluation_inputs(os.path.join(work, "eval"), images, "small", tokenizer)
    return {"captions": caption_shards, "shards": shards, "labels": labels, "export": export}


def jobs(inputs: dict, work: str, batch: int) -> dict[str, Callable[[ray_local.RayHead], dict]]:
    labels_out, eval_out = os.path.join(work, "labels_out"), os.path.join(work, "eval_out")
    labels_cmd = ["python", "-m", "jobs.labels", "--shards", inputs["captions"], "--output", labels_out]
    eval_cmd = ["python", "-m", "jobs.evaluate", "--checkpoint", inputs["export"], "--shards", inputs["shards"], "--labels", inputs["labels"],
                "--output", eval_out, "--k", "10", "--batch-size", str(batch), "--device", "cpu"]  # fmt: skip
    return {
        "labels": lambda head: timed_job(head, labels_cmd, os.path.join(labels_out, "summary.json"), labels_out),
        "evaluate": lambda head: timed_job(head, eval_cmd, os.path.join(eval_out, "summary.json"), eval_out),
    }


def summarize(runs: list[dict]) -> dict:
    out = {}
    for job in sorted({r["job"] for r in runs}):
        walls = {kind: statistics.median(r["wall_s"] for r in runs if r["job"] == job and r["cluster"] == kind) for kind in ("1 node", "3 nodes")}
        out[job] = {"wall_s_1_node": round(walls["1 node"], 2), "wall_s_3_nodes": round(walls["3 nodes"], 2),
                    "overhead": round(walls["3 nodes"] / walls["1 node"] - 1, 3)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=40000, help="captions for the labels job (8 shards)")
    p.add_argument("--images", type=int, default=240, help="validation images for the evaluation job")
    p.add_argument("--batch", type=int, default=16, help="evaluation batch size")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the one node, split between the two workers of the three-node cluster")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="multinode_bench")
    try:
        inputs = make_inputs(work, args.captions, args.images)
        todo = jobs(inputs, work, args.batch)
        runs = []
        for rnd in range(args.rounds):
            order = ("1 node", "3 nodes") if rnd % 2 == 0 else ("3 nodes", "1 node")
            for kind in order:
                with cluster(kind, args.cpus) as head:
                    for job, run in todo.items():
                        result = run(head)
                        runs.append({"round": rnd, "cluster": kind, "job": job, **result})
                        print(json.dumps({k: v for k, v in runs[-1].items() if k != "summary"}), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    command = "python -m benchmarks.multinode_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {
        "date": datetime.date.today().isoformat(),
        "command": command.strip(),
        "device": device(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "goal": GOAL,
        "runs": runs,
        "summary": summarize(runs),
    }
    write_json(os.path.join(args.out, "multinode.json"), results)
    write_text(os.path.join(args.out, "multinode.md"), markdown(results))
    print(json.dumps(results["summary"], indent=2))
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Labels and evaluation: 3 local nodes against 1 with the same CPUs",
        "",
        f"- date: {r['date']}",
        f"- device: {r['device']}",
        f"- command: `{r['command']}`",
        f"- settings: {json.dumps(r['settings'])}",
        "- 1 node: a Ray head with all the CPUs; 3 nodes: a 0-CPU head and two worker nodes splitting them, on this machine",
        "",
        "| job | wall, 1 node (s) | wall, 3 nodes (s) | overhead |",
        "| --- | ---: | ---: | ---: |",
    ]
    for job, s in r["summary"].items():
        lines.append(f"| {job} | {s['wall_s_1_node']:.1f} | {s['wall_s_3_nodes']:.1f} | {s['overhead']:+.1%} |")
    lines += ["", "| round | cluster | job | wall (s) |", "| ---: | --- | --- | ---: |"]
    lines += [f"| {x['round']} | {x['cluster']} | {x['job']} | {x['wall_s']:.1f} |" for x in r["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
