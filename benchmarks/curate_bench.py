"""Curation: dedup quality on the synthetic world, hashing and CLIP-scoring throughput per core,
its cost next to ingestion's, and the peak memory of one ingestion shard task on hostile images.

    python -m benchmarks.curate_bench [--n 2000] [--clip-images 64] [--skip-memory]

1. dedup quality: a world with labelled copies (exact, re-encoded q30-70, resized to 50-80%,
   cropped 1-5% a side) of good images; every image resized as ingestion stores it
   (keep_ratio, 64 and 256 px); 256-bit phash and dhash of each (``pipeline.curate.HASH_SIZE``); the Hamming distance of each
   copy to its source, and of each distinct image to its nearest distinct neighbour; precision
   and recall of ``pipeline.dedup.clusters`` at each distance. The default ``--dedup-distance``
   is chosen from this table.
2. throughput, one process, one thread: images/s for decode + sha256 + phash of stored
   256 px JPEGs (``pipeline.curate.hash_shard``'s per-image work), and for CLIP scoring at
   ViT-B/32 shapes (224 px, random weights: the speed of real weights) including
   preprocessing. GPU rows: run with ``--device cuda`` (not measured here: no GPU).
3. cost as a fraction of ingestion: per-core seconds per image of curation over those of
   ingestion (benchmarks/results/ingest.json, shard phase).
4. memory: one ingestion shard worker (WebDownloader, 32 threads, the defaults) over a shard of
   80 rows of 8-bit images at the area limit, bombs and large PNGs served on 127.0.0.1;
   peak RSS of the process (ru_maxrss) against its RSS before the shard.

Results: ``benchmarks/results/curate.json`` and ``curate.md``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402

from pipeline import dedup, synthetic  # noqa: E402
from pipeline.curate import perceptual_hash  # noqa: E402
from pipeline.images import ImageResizer  # noqa: E402
from pipeline.outputs import write_json  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
DISTANCES = (0, 8, 16, 24, 32, 40, 44, 48, 50, 52, 56, 64)
COLOUR_TOLERANCE = 6.0  # pipeline.curate.CurateSettings.colour_tolerance


def stored(data: bytes, size: int):
    from PIL import Image

    jpeg = ImageResizer(size, "keep_ratio")(io.BytesIO(data))[0]
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


def dedup_quality(n: int, seed: int = 0) -> dict:
    root = tempfile.mkdtemp(prefix="curate_bench_")
    world = synthetic.write_world(root, n, 0, seed=seed, bad_fraction=0.0, duplicates=0.25, mismatches=0.0)
    rows = world.samples("train")
    files = [r["file"] for r in rows]
    index = {f: i for i, f in enumerate(files)}
    source = [index.get(r["duplicate_of"], i) if r["kind"] == "duplicate" else i for i, r in enumerate(rows)]
    out = {"images": len(rows), "copies": sum(r["kind"] == "duplicate" for r in rows), "by_size": {}}
    for size in (64, 256):
        for method in ("phash", "dhash"):
            imgs = [stored(open(os.path.join(root, f), "rb").read(), size) for f in files]
            h = dedup.from_hex([perceptual_hash(im, method) for im in imgs])
            cols = dedup.thumbnails([dedup.colour_thumbnail(im) for im in imgs])
            copy_d = {}
            for i, r in enumerate(rows):
                if r["kind"] == "duplicate":
                    copy_d.setdefault(r["transform"], []).append(int(dedup.hamming(h[i : i + 1], h[source[i] : source[i] + 1])[0]))
            distinct = [i for i, r in enumerate(rows) if r["kind"] != "duplicate"]
            dist = dedup.hamming(h[distinct][:, None, :], h[distinct][None, :, :])
            np.fill_diagonal(dist, 99)
            nearest = dist.min(1)
            sha = [str(source[i]) if rows[i]["transform"] == "exact" else str(i) for i in range(len(rows))]
            table = []
            copies = [i for i, r in enumerate(rows) if r["kind"] == "duplicate"]
            for d in DISTANCES:
                row = {"distance": d}
                for label, tolerance in (("", COLOUR_TOLERANCE), ("no_colour_", 255.0)):
                    groups = dedup.clusters(sha, h, [1] * len(rows), d, cols, tolerance)
                    flagged = [(i, g[0]) for i, g in enumerate(groups) if g is not None]
                    right = sum(source[i] == source[k] for i, k in flagged)
                    rep = {i: (g[0] if g is not None else i) for i, g in enumerate(groups)}
                    found = sum(rep[i] == rep[source[i]] for i in copies)
                    row.update({f"{label}flagged": len(flagged), f"{label}precision": right / max(1, len(flagged)), f"{label}recall": found / len(copies)})
                table.append(row)
            out["by_size"][f"{size}px {method}"] = {
                "copy_distance": {t: {"max": max(v), "p95": float(np.percentile(v, 95)), "mean": float(np.mean(v))} for t, v in sorted(copy_d.items())},
                "distinct_nearest": {"min": int(nearest.min()), "p1": float(np.percentile(nearest, 1)), "p5": float(np.percentile(nearest, 5)), "median": float(np.median(nearest))},
                "distinct_pairs_within": {str(d): int(np.triu(dist <= d, 1).sum()) for d in DISTANCES},
                "by_distance": table,
            }
    return out


def hashing_rate(images: list[bytes], repeats: int = 3) -> float:
    import hashlib

    from PIL import Image

    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for data in images:
            hashlib.sha256(data).hexdigest()
            img = Image.open(io.BytesIO(data))
            img.load()
            perceptual_hash(img.convert("RGB"), "phash")
        best = max(best, len(images) / (time.perf_counter() - t))
    return best


def clip_rate(images: list[bytes], captions: list[str], device: str, batch: int) -> float:
    import open_clip
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", device=device)  # random weights
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rates = []
    for _ in range(2):
        t = time.perf_counter()
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            with torch.no_grad():
                pixels = torch.stack([preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in chunk]).to(device)
                a = model.encode_image(pixels, normalize=True)
                b = model.encode_text(tokenizer(captions[start : start + batch]).to(device), normalize=True)
                (a * b).sum(-1).cpu()
        rates.append(len(images) / (time.perf_counter() - t))
    return max(rates)


def clip_scorer_rates(images: list[bytes], captions: list[str], batch: int, n: int, threads: list[int], repeats: int = 3) -> dict:
    """CLIP scoring as the curation job's actor runs it (``pipeline.curate.ClipScorer``: one actor, the GPU when
    there is one), ViT-B/32 shapes, random weights: ``n`` samples in one webdataset tar (the images repeated
    under distinct keys). Rates, the best of ``repeats``: the actor's (``score_shard``: read the tar, decode
    and preprocess in a pool of each of ``threads`` threads, embed) and the model's alone (the same batch
    already preprocessed on the device: encode image and text, cosine)."""
    import tarfile

    import torch

    from pipeline.curate import ClipScorer

    keys = [f"{i:09d}" for i in range(n)]
    actor: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tar = os.path.join(tmp, "00000.tar")
        with tarfile.open(tar, "w") as tf:
            for i, key in enumerate(keys):
                for ext, data in (("jpg", images[i % len(images)]), ("txt", captions[i % len(captions)].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        for t in threads:
            scorer = ClipScorer("ViT-B-32", None, None, batch, threads=t)
            sync = torch.cuda.synchronize if scorer.device == "cuda" else (lambda: None)
            scorer.score_shard(tar, keys[:batch])  # warm-up: cuBLAS / cuDNN plans
            runs = []
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                table = scorer.score_shard(tar, keys)
                sync()
                runs.append(n / (time.perf_counter() - start))
            if table.num_rows != n:
                raise RuntimeError(f"scored {table.num_rows} of {n} samples")
            actor[str(t)] = {"images_per_s": round(max(runs), 1), "runs": [round(r, 1) for r in runs]}
    pixels = torch.stack([scorer.pixels(images[i % len(images)]) for i in range(batch)])
    model_only = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(0, n, batch):
            scorer.embed(pixels, [[captions[i % len(captions)]] for i in range(batch)])
        sync()
        model_only.append(n // batch * batch / (time.perf_counter() - start))
    return {
        "device": scorer.device,
        "samples": n,
        "batch": batch,
        "actor_by_threads": actor,
        "actor_images_per_s": max(v["images_per_s"] for v in actor.values()),
        "model_only_images_per_s": round(max(model_only), 1),
        "model_only_runs": [round(r, 1) for r in model_only],
    }


MEMORY_CHILD = r"""
import io, json, os, resource, sys, tempfile
sys.path.insert(0, sys.argv[1])
import pyarrow as pa, pyarrow.ipc as ipc, psutil
from pipeline import ingest
site, out, rows = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
os.makedirs(out, exist_ok=True)
table = pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows], "uid": [str(i) for i in range(len(rows))], "source": ["bench"] * len(rows), "split": ["train"] * len(rows)})
arrow = os.path.join(out, "shard.arrow")
with ipc.new_file(arrow, table.schema) as w:
    w.write(table)
settings = ingest.ShardSettings(image_size=256, samples_per_shard=len(rows))
worker = ingest._make_worker(out, settings, ["url", "caption", "uid", "source", "split"], 5, None)
before = psutil.Process().memory_info().rss
ok, _ = worker((0, arrow))
stats = json.load(open(os.path.join(out, "00000_stats.json")))
print(json.dumps({"ok": ok, "rss_before_mb": before / 2**20, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "status": stats["status_dict"]}))
"""


def memory_peak() -> dict:
    from PIL import Image

    site = tempfile.mkdtemp(prefix="curate_bench_site_")
    rng = np.random.default_rng(0)
    side = 8192  # exactly the default area limit: decoded, resized
    photo = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    photo.save(buf, "PNG", compress_level=1)
    open(os.path.join(site, "at_limit.png"), "wb").write(buf.getvalue())
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    open(os.path.join(site, "at_limit.jpg"), "wb").write(buf.getvalue())
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    open(os.path.join(site, "bomb.png"), "wb").write(buf.getvalue())
    sizes = {f: os.path.getsize(os.path.join(site, f)) for f in os.listdir(site)}
    with synthetic.serve(site) as base:
        rows = [(f"{base}/{name}?i={i}", "x") for i in range(20) for name in ("at_limit.png", "at_limit.jpg", "bomb.png")]
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, REPO, site, tempfile.mkdtemp(), json.dumps(rows)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(rows=len(rows), files={k: round(v / 2**20, 1) for k, v in sizes.items()}, threads=32)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="base images of the dedup-quality world")
    p.add_argument("--clip-images", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument(
        "--clip-only", action="store_true",
        help="only CLIP scoring through the job's actor (pipeline.curate.ClipScorer) on --clip-images samples in batches "
             "of --clip-batch, on the GPU when there is one; writes benchmarks/results/curate_clip_<cuda|cpu>.json",
    )  # fmt: skip
    p.add_argument("--clip-batch", type=int, default=256, help="--clip-only: the actor's batch (default 256)")
    p.add_argument("--clip-threads", type=int, nargs="+", default=[1], help="--clip-only: the actor's decode threads, one run each (default 1)")
    p.add_argument("--out", default=None, help="--clip-only: result file (default benchmarks/results/curate_clip_<device>.json)")
    args = p.parse_args()
    if args.clip_only:
        return clip_only(args)
    load = os.getloadavg()
    t0 = time.time()
    quality = dedup_quality(args.n)
    world = synthetic.write_world(tempfile.mkdtemp(), 400, 0, seed=1, bad_fraction=0.0)
    rows = world.samples("train")
    images = [open(os.path.join(world.root, r["file"]), "rb").read() for r in rows]
    hash_per_s = hashing_rate(images)
    clip_per_s = clip_rate(images[: args.clip_images], [r["caption"].split("\n")[0] for r in rows[: args.clip_images]], args.device, 32)
    ingest = json.load(open(os.path.join(RESULTS, "ingest.json")))
    memory = None if args.skip_memory else memory_peak()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.curate_bench " + " ".join(sys.argv[1:]),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.device}",
        "load_before": load,
        "dedup_quality": quality,
        "hash_images_per_s_per_core": hash_per_s,
        "clip_vit_b32_images_per_s_per_core": clip_per_s,
        "ingest_reference": ingest.get("summary", {}),
        "memory": memory,
        "seconds": time.time() - t0,
    }
    write_json(os.path.join(RESULTS, "curate.json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "dedup_quality"}, indent=2))
    for name, q in quality["by_size"].items():
        print(name, json.dumps(q["copy_distance"]), json.dumps(q["distinct_nearest"]))
        for row in q["by_distance"]:
            print("   ", row)
    return 0


def clip_only(args) -> int:
    import torch

    from benchmarks.sampling_bench import device_name

    world = synthetic.write_world(tempfile.mkdtemp(), 400, 0, seed=1, bad_fraction=0.0)
    rows = world.samples("train")
    images = [open(os.path.join(world.root, r["file"]), "rb").read() for r in rows]
    captions = [r["caption"].split("\n")[0] for r in rows]
    rates = clip_scorer_rates(images, captions, args.clip_batch, args.clip_images, args.clip_threads)
    device = torch.device(rates.pop("device"))
    result = {
        "benchmark": "CLIP scoring, ViT-B/32 shapes, random weights: the curation job's actor (read, decode and preprocess in its threads, embed) and the model alone",
        "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.curate_bench " + " ".join(sys.argv[1:]),
        "device": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        **rates,
    }
    out = args.out or os.path.join(RESULTS, f"curate_clip_{device.type}.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
