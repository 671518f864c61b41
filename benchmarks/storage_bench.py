"""Ingestion and labels with shards in an S3 bucket against a local folder, in the same run.

    python -m benchmarks.storage_bench [--rounds 2] [--images 1000]

On the synthetic world served on 127.0.0.1, with one Ray head and the same flags on both
sides, alternating (local, s3, s3, local, ...) for ``--rounds`` rounds:

  ingest   python -m jobs.ingest --source laion --input <local list> --output <shards> --address <head>
  labels   python -m jobs.labels --shards <shards> --output <labels> --address <head>

where <shards> and <labels> are a local folder on one side and prefixes of a bucket of
an S3-compatible server on 127.0.0.1 (moto, in a process of its own) on the other; every
process reaches it through AWS_ENDPOINT_URL and the AWS_* credentials. Figures: ingestion
images/s over the shard phase (the job's own figure, ``ingest_summary.json``) and over the
command's wall time; labels captions/s over the command's wall time. The ratio s3 / local
of each is the result (goal: at least 0.8). Results: ``benchmarks/results/storage.json``
and ``storage.md``.

The S3 server is a Python process on the same 2 cores: every request it serves takes CPU
from the jobs, which a remote object store would not, so the ratio here is a lower bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.ingest_bench import device, served  # noqa: E402
from pipeline import ray_local, storage, synthetic  # noqa: E402
from pipeline.outputs import write_json, write_text  # noqa: E402
from tests import s3_server  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
BUCKET = "bench"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs both sides once, the order alternating")
    p.add_argument("--images", type=int, default=1000, help="rows of the URL list")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=RESULTS, help="folder for storage.json and storage.md")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def start_s3(work: str) -> tuple[subprocess.Popen, str]:
    """moto's server in a process and session of its own, on a free port of 127.0.0.1."""
    port = ray_local.free_port()
    log = open(os.path.join(work, "s3.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return proc, endpoint
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the S3 server did not start; see {log.name}") from None
            time.sleep(0.3)


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, start_new_session=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def one_side(side: str, root: str, lst: str, head, env: dict, args, tag: str) -> dict:
    shards, labels = storage.join(root, f"shards-{tag}"), storage.join(root, f"labels-{tag}")
    py = sys.executable
    ingest = [py, "-m", "jobs.ingest", "--source", "laion", "--input", lst, "--output", shards, "--address", head.gcs_address,
              "--processes", str(args.processes), "--threads", str(args.threads), "--samples-per-shard", str(args.samples_per_shard),
              "--image-size", str(args.image_size)]  # fmt: skip
    wall_ingest, ingest_log = run(ingest, env)
    summary = storage.read_json(storage.join(shards, "ingest_summary.json"))
    wall_labels, log = run([py, "-m", "jobs.labels", "--shards", shards, "--output", labels, "--address", head.gcs_address], env)
    captions = storage.read_json(storage.join(labels, "summary.json"))["captions"]
    job_s = float(re.search(r"^\s+([\d.]+) s, \d+ captions/s$", log, re.M).group(1))
    if side == "s3":  # the jobs' own words, for the README
        print("\n".join(line for line in ingest_log.splitlines() if line.startswith(("ingestion summary", "  "))), flush=True)
        print("\n".join(line for line in log.splitlines() if line.startswith(("labels:", "  "))), flush=True)
    return {
        "side": side,
        "images": summary["downloaded"],
        "ingest_wall_s": round(wall_ingest, 3),
        "ingest_images_per_s_wall": round(summary["downloaded"] / wall_ingest, 2),
        "ingest_images_per_s_shard_phase": summary["this_run"]["images_per_s"],
        "captions": captions,
        "labels_wall_s": round(wall_labels, 3),
        "labels_captions_per_s_wall": round(captions / wall_labels, 2),
        "labels_captions_per_s_job": round(captions / job_s, 2),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still stops the servers and the head
    work = args.work or tempfile.mkdtemp(prefix="storage_bench_")
    os.makedirs(work, exist_ok=True)
    world = synthetic.write_world(os.path.join(work, "world"), n_train=args.images, n_val=0, seed=0, bad_fraction=0.1)
    results: dict = {
        "benchmark": "ingest + labels: shards and labels in an S3 bucket (moto on 127.0.0.1) vs a local folder",
        "date": datetime.date.today().isoformat(),
        "device": device(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "command": "python -m benchmarks.storage_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": [],
    }
    s3_proc, endpoint = start_s3(work)
    try:
        os.environ.update(s3_server.client_env(endpoint))
        s3_server.make_bucket(BUCKET)
        with served(world.root) as base_url:
            rows = pq.read_table(synthetic.render_sources(world, base_url)["train"]["laion"])
            lst = os.path.join(work, "list.parquet")  # rows jobs.ingest would filter (empty captions) left out
            pq.write_table(rows.filter(pc.not_equal(pc.utf8_trim_whitespace(rows.column("TEXT")), "")), lst)
            with ray_local.ray_head(num_cpus=args.processes) as head:  # started with the S3 environment: its workers have it
                env = dict(head.env, PYTHONUNBUFFERED="1")  # loopback Ray settings and the S3 variables, as the head has them
                roots = {"local": os.path.join(work, "out"), "s3": f"s3://{BUCKET}/out"}
                for r in range(args.rounds):
                    order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
                    for side in order:
                        result = {"round": r, **one_side(side, roots[side], lst, head, env, args, f"{r}")}
                        results["runs"].append(result)
                        print(json.dumps(result), flush=True)
    finally:
        s3_proc.terminate()
        s3_proc.wait(timeout=30)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for key in ("ingest_images_per_s_shard_phase", "ingest_images_per_s_wall", "labels_captions_per_s_wall", "labels_captions_per_s_job"):
        local = statistics.median(r[key] for r in results["runs"] if r["side"] == "local")
        s3 = statistics.median(r[key] for r in results["runs"] if r["side"] == "s3")
        summary[key] = {"local": round(local, 2), "s3": round(s3, 2), "ratio": round(s3 / local, 3)}
    results["summary"] = summary
    results["note"] = args.note
    write_json(os.path.join(args.out, "storage.json"), results)
    write_text(os.path.join(args.out, "storage.md"), render_markdown(results))
    print(json.dumps(summary, indent=2))
    return 0


def render_markdown(res: dict) -> str:
    d = res["device"]
    lines = [
        "# Storage: shards in an S3 bucket vs a local folder",
        "",
        f"`{res['command']}` on {d['cpu']} ({d['cores']} cores), Python {d['python']}, Ray {d['ray']}, {res['date']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in d['load_average_at_start'])}.",
        "",
        "S3 side: moto's S3 server on 127.0.0.1, a process on the same cores (what it spends, a remote store would not).",
        "Medians over the rounds; ratio = s3 / local (goal >= 0.8).",
        "",
        "| figure | local | s3 | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for key, v in res["summary"].items():
        lines.append(f"| {key} | {v['local']} | {v['s3']} | {v['ratio']} |")
    lines += ["", "Runs:", "", "| round | side | images | ingest wall s | images/s (shard phase) | captions | labels wall s | captions/s (wall) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        lines.append(f"| {r['round']} | {r['side']} | {r['images']} | {r['ingest_wall_s']} | {r['ingest_images_per_s_shard_phase']} | {r['captions']} | {r['labels_wall_s']} | {r['labels_captions_per_s_wall']} |")
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
