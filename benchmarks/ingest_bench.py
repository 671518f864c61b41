"""Ingestion throughput: ``jobs.ingest`` (img2dataset on Ray) against plain ``img2dataset.download``.

    python benchmarks/ingest_bench.py [--rounds 4] [--ab-images 2000] [--big-images 10000]

On the synthetic world served on 127.0.0.1, with the same processes, threads, shard size,
image size and encoding on both sides:

  A  python -m jobs.ingest --source laion ... --ray-address <head>   (a running Ray head, as
     users run it with `ray job submit`; the job connects to it)
  B  python -c "img2dataset.download(..., distributor='multiprocessing')"

run A/B alternating (ABBA...) for ``--rounds`` rounds on the same ``--ab-images`` rows,
then each side once on ``--big-images`` rows. Each run is a fresh process; its
images/s counts the images written into shards over (a) the whole command's wall time
and (b) the shard phase (first shard start to last shard end, from the stats files).
Results go to ``benchmarks/results/ingest.json`` and ``ingest.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private loopback head; see tests/test_ingest.py
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline import ray_local, synthetic  # noqa: E402
from pipeline.outputs import write_json, write_text  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")

BASELINE = """
import sys, img2dataset
img2dataset.download(
    url_list=sys.argv[1], input_format="parquet", url_col="URL", caption_col="TEXT",
    output_folder=sys.argv[2], output_format="webdataset", processes_count=int(sys.argv[3]),
    thread_count=int(sys.argv[4]), number_sample_per_shard=int(sys.argv[5]), image_size=int(sys.argv[6]),
    resize_mode="keep_ratio", encode_quality=95, compute_hash="sha256", extract_exif=False,
    timeout=10, distributor="multiprocessing", enable_wandb=False,
)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="A/B rounds (each runs both sides once, order alternating)")
    p.add_argument("--ab-images", type=int, default=2000, help="rows of each A/B run")
    p.add_argument("--big-images", type=int, default=10000, help="rows of the single large run of each side (0: skip)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--out", default=RESULTS, help="folder for ingest.json and ingest.md")
    p.add_argument("--note", default="", help="a remark recorded with the results (e.g. what changed since the last run)")
    return p.parse_args(argv)


def device() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    import ray

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "img2dataset": version("img2dataset"),
        "load_average_at_start": os.getloadavg(),
    }


def shard_phase(out: str) -> tuple[int, int, float]:
    """(url rows, images written, seconds from the first shard's start to the last one's end)."""
    stats = []
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            stats.append(json.load(f))
    if not stats:
        return 0, 0, 0.0
    rows = sum(s["count"] for s in stats)
    ok = sum(s["successes"] for s in stats)
    return rows, ok, max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def _serve_forever(root: str, urls) -> None:
    os.setsid()  # its own session, away from both sides (see timed)
    with synthetic.serve(root) as base_url:
        urls.put(base_url)
        while True:
            time.sleep(3600)


@contextlib.contextmanager
def served(root: str) -> Iterator[str]:
    """The world served on 127.0.0.1 from a process of its own: the benchmark's own process stays out of the way."""
    ctx = multiprocessing.get_context("spawn")
    urls = ctx.Queue()
    server = ctx.Process(target=_serve_forever, args=(root, urls), daemon=True)
    server.start()
    try:
        yield urls.get(timeout=60)
    finally:
        server.terminate()
        server.join(timeout=10)


def timed(cmd: list[str], out: str, env: dict) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    # own session: Linux shares CPU between sessions (autogroups) first, so each side competes alike
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, start_new_session=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows, ok, phase = shard_phase(out)
    return {
        "rows": rows,
        "images": ok,
        "wall_s": round(wall, 3),
        "shard_phase_s": round(phase, 3),
        "images_per_s_wall": round(ok / wall, 2),
        "images_per_s_shard_phase": round(ok / phase, 2) if phase > 0 else None,
        "load_1m_before": round(load, 2),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ingest_bench_")
    os.makedirs(work, exist_ok=True)
    n_world = max(args.ab_images, args.big_images)
    world_dir = os.path.join(work, "world")
    print(f"writing a synthetic world of {n_world} images into {world_dir} ...", flush=True)
    if os.path.exists(os.path.join(world_dir, "world.json")) and synthetic.load_world(world_dir).sizes["train"] >= n_world:
        world = synthetic.load_world(world_dir)
    else:
        world = synthetic.write_world(world_dir, n_train=n_world, n_val=0, seed=0, bad_fraction=0.1)
    info = device()
    results: dict = {
        "benchmark": "ingest: jobs.ingest (img2dataset on Ray) vs img2dataset.download (multiprocessing)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "settings": {k: getattr(args, k) for k in ("rounds", "ab_images", "big_images", "processes", "threads", "samples_per_shard", "image_size")},
        "note": args.note,
        "runs": [],
    }
    head = None
    try:
        with served(world.root) as base_url:
            laion = synthetic.render_sources(world, base_url)["train"]["laion"]
            table = pq.read_table(laion)
            subsets = {}
            for n in {args.ab_images, args.big_images} - {0}:
                # rows jobs.ingest would filter (empty captions) are left out: both sides get the same work
                rows = table.slice(0, n)
                subsets[n] = os.path.join(work, f"laion_{n}.parquet")
                pq.write_table(rows.filter(pc.not_equal(pc.utf8_trim_whitespace(rows.column("TEXT")), "")), subsets[n])
            head = ray_local.start_head(num_cpus=args.processes)
            env = dict(head.env)
            env.pop("RAY_ADDRESS", None)
            common = ["--threads", str(args.threads), "--samples-per-shard", str(args.samples_per_shard), "--image-size", str(args.image_size)]

            def ray_cmd(n: int, out: str) -> list[str]:
                return [
                    sys.executable, "-m", "jobs.ingest", "--source", "laion", "--input", subsets[n], "--output", out,
                    "--processes", str(args.processes), "--resize-mode", "keep_ratio", "--ray-address", head.gcs_address, *common,
                ]  # fmt: skip

            def mp_cmd(n: int, out: str) -> list[str]:
                return [sys.executable, "-c", BASELINE, subsets[n], out, str(args.processes), str(args.threads), str(args.samples_per_shard), str(args.image_size)]

            sides = {"ray": ray_cmd, "multiprocessing": mp_cmd}
            for r in range(args.rounds):
                order = ["ray", "multiprocessing"] if r % 2 == 0 else ["multiprocessing", "ray"]
                for side in order:
                    out = os.path.join(work, f"{side}_{r}")
                    shutil.rmtree(out, ignore_errors=True)
                    run = {"side": side, "round": r, **timed(sides[side](args.ab_images, out), out, env)}
                    results["runs"].append(run)
                    print(json.dumps(run), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            if args.big_images:
                results["big"] = {}
                for side in ("ray", "multiprocessing"):
                    out = os.path.join(work, f"{side}_big")
                    shutil.rmtree(out, ignore_errors=True)
                    results["big"][side] = {"side": side, **timed(sides[side](args.big_images, out), out, env)}
                    print(json.dumps(results["big"][side]), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            results["commands"] = {
                "ray": " ".join(ray_cmd(args.ab_images, "<out>")[1:]).replace(work, "<work>").replace(head.gcs_address, "<head>"),
                "multiprocessing": "python -c <img2dataset.download(...)> "
                + " ".join(mp_cmd(args.ab_images, "<out>")[3:]).replace(work, "<work>"),
                "baseline_source": BASELINE.strip(),
            }
    finally:
        if head is not None:
            head.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for side in ("ray", "multiprocessing"):
        runs = [r for r in results["runs"] if r["side"] == side]
        summary[side] = {
            "median_images_per_s_wall": statistics.median(r["images_per_s_wall"] for r in runs),
            "median_images_per_s_shard_phase": statistics.median(r["images_per_s_shard_phase"] for r in runs),
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        }
    summary["ratio_wall"] = round(summary["ray"]["median_images_per_s_wall"] / summary["multiprocessing"]["median_images_per_s_wall"], 3)
    summary["ratio_shard_phase"] = round(
        summary["ray"]["median_images_per_s_shard_phase"] / summary["multiprocessing"]["median_images_per_s_shard_phase"], 3
    )
    summary["goal"] = "ratio >= 0.9"
    results["summary"] = summary
    write_json(os.path.join(args.out, "ingest.json"), results)
    write_text(os.path.join(args.out, "ingest.md"), render_markdown(results))
    print(json.dumps(summary, indent=2))
    return 0


def render_markdown(res: dict) -> str:
    s, d, cfg = res["summary"], res["device"], res["settings"]
    lines = [
        "# Ingestion throughput",
        "",
        f"{res['date']} · {d['cpu']}, {d['cores']} cores (load average at start {', '.join(f'{x:.2f}' for x in d['load_average_at_start'])}) · "
        f"Python {d['python']}, Ray {d['ray']}, img2dataset {d['img2dataset']}",
        "",
        f"Synthetic world served on 127.0.0.1 (256x256 JPEGs, ~10% bad rows), {cfg['processes']} processes x "
        f"{cfg['threads']} threads, {cfg['samples_per_shard']} samples per shard, image size {cfg['image_size']} "
        "(keep_ratio), JPEG quality 95, sha256, no EXIF, on both sides. Each run is a fresh process; "
        "`jobs.ingest` connects to a running Ray head (as under `ray job submit`).",
        "",
        f"## A/B, the first {cfg['ab_images']} rows ({res['runs'][0]['rows']} with a caption), {cfg['rounds']} rounds alternating",
        "",
        "| round | side | images | wall s | images/s (wall) | shard phase s | images/s (shard phase) | load (1 min) before |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {r['round']} | {r['side']} | {r['images']} | {r['wall_s']:.1f} | {r['images_per_s_wall']:.1f} | "
            f"{r['shard_phase_s']:.1f} | {r['images_per_s_shard_phase']:.1f} | {r['load_1m_before']:.2f} |"
        )
    lines += [
        "",
        "| median | images/s (wall) | images/s (shard phase) |",
        "| --- | ---: | ---: |",
        f"| jobs.ingest (Ray) | {s['ray']['median_images_per_s_wall']:.1f} | {s['ray']['median_images_per_s_shard_phase']:.1f} |",
        f"| img2dataset.download (multiprocessing) | {s['multiprocessing']['median_images_per_s_wall']:.1f} | "
        f"{s['multiprocessing']['median_images_per_s_shard_phase']:.1f} |",
        f"| **ratio Ray / multiprocessing** | **{s['ratio_wall']:.3f}** | **{s['ratio_shard_phase']:.3f}** |",
        "",
        f"Goal: {s['goal']}.",
        "",
    ]
    if "big" in res:
        rows = res["big"]["ray"]["rows"]
        lines += [f"## The first {cfg['big_images']} rows ({rows} with a caption), one run each", ""]
        for side, label in (("ray", "jobs.ingest (Ray)"), ("multiprocessing", "img2dataset.download (multiprocessing)")):
            b = res["big"][side]
            lines.append(
                f"- {label}: {b['images']} images in {b['wall_s']:.1f} s, **{b['images_per_s_wall']:.1f} images/s** end to end, "
                f"{b['images_per_s_shard_phase']:.1f} images/s over the shard phase ({b['shard_phase_s']:.1f} s), load before {b['load_1m_before']:.2f}"
            )
        lines.append("")
    if res.get("note"):
        lines += ["## Note", "", res["note"], ""]
    lines += ["## Commands", "", f"    python {res['commands']['ray']}", "", f"    {res['commands']['multiprocessing']}", "", "Regenerate with `python benchmarks/ingest_bench.py`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
