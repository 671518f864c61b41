"""The rows of BENCHMARKS.md's table from one gpu_suite.sh run: ``python -m benchmarks.suite_report <results folder>``.

Reads the suite's result files (sampling_*.json, evaluate_*.json, train*/train_*.json, curate_clip_*.json) and
writes ``summary.md`` beside them: one table row per figure, with its device, command and
goal, and whether a GPU goal was met (the goals are for one H100 or H200; on a CPU the
figures are recorded for regressions, with only the relative goal checked).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from pipeline.outputs import write_text

SAMPLING_GOALS = {10: 500.0, 100: 150.0}  # images/s on one H100 at g3m shapes, batch 64
SPEEDUP_GOAL_GPU, SPEEDUP_GOAL_CPU = 10.0, 5.0  # KV-cached over recompute, top-10
EVAL_RATIO_GOAL = 0.9  # end to end within 10% of model only
MFU_GOAL, DATA_WAIT_GOAL = 0.45, 0.05


def _load(pattern: str) -> list[tuple[str, dict]]:
    return [(path, json.load(open(path))) for path in sorted(glob.glob(pattern, recursive=True))]


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def rows(folder: str) -> list[list[str]]:
    """[stage, benchmark, command, device, figure, goal, met, date, result] per figure."""
    out = []
    for path, r in _load(os.path.join(folder, "sampling_*.json")):
        gpu = "cpu" not in os.path.basename(path)
        for row in r["results"]:
            k = row["k"]
            figure = (f"{row['cached_images_per_s']:.1f} vs {row['recompute_images_per_s']:.2f} images/s: x{row['speedup']:.1f} "
                      f"(recompute on {row['recompute_batch']} images; agreement {row['agreement']:.3f})")  # fmt: skip
            if gpu:
                goal = f">= {SAMPLING_GOALS.get(k, 0):g} images/s" + (f", >= {SPEEDUP_GOAL_GPU:g}x recompute" if k == 10 else "")
                ok = row["cached_images_per_s"] >= SAMPLING_GOALS.get(k, 0) and (k != 10 or row["speedup"] >= SPEEDUP_GOAL_GPU)
                met = _yes(ok)
            else:
                goal = f">= {SPEEDUP_GOAL_CPU:g}x recompute" if k == 10 else "recorded"
                met = _yes(row["speedup"] >= SPEEDUP_GOAL_CPU) if k == 10 else "-"
            bench = f"one-shot top-{k}, KV-cached vs recompute, {r['config']} shapes, batch {r['batch']}, {r['dtype']}"
            out.append(["model", bench, f"`{r['command']}`", r["device"], figure, goal, met, r["date"], os.path.basename(path)])
    for path, r in _load(os.path.join(folder, "evaluate_*.json")):
        gpu = "cpu" not in os.path.basename(path)
        for row in r["results"]:
            figure = (f"{row['predictor_actors']} actor(s): {row['end_to_end_images_per_s']:.1f} vs {row['model_only_images_per_s']:.1f} "
                      f"images/s model only (ratio {row['ratio']:.2f})")  # fmt: skip
            met = _yes(row["ratio"] >= EVAL_RATIO_GOAL)
            bench = f"Ray job end to end vs model-only one_shot, top-10, {r['config']} shapes, batch {r['batch']}, {r.get('dtype', 'float32')}"
            out.append(["evaluation", bench, f"`{r['command']}`", r["device"], figure, f"ratio >= {EVAL_RATIO_GOAL}", met, r["date"],
                        os.path.basename(path)])  # fmt: skip
    for path, r in _load(os.path.join(folder, "**", "train_*.json")):
        gpu = "cpu" not in os.path.basename(path)
        mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "MFU unknown (no peak for this device)"
        figure = (f"{r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:,.0f} tokens/s, data wait {r['data_wait_fraction']:.1%}, {mfu}")
        if gpu:
            goal = f">= {MFU_GOAL:.0%} MFU, data wait < {DATA_WAIT_GOAL:.0%}"
            met = _yes((r.get("mfu") or 0) >= MFU_GOAL and r["data_wait_fraction"] < DATA_WAIT_GOAL)
        else:
            goal, met = f"data wait < {DATA_WAIT_GOAL:.0%}", _yes(r["data_wait_fraction"] < DATA_WAIT_GOAL)
        bench = f"{r['shapes']} shapes, {r['parameters'] / 1e6:,.1f}M parameters, {r['ranks']} rank(s), global batch {r['global_batch']}"
        bench += ", torch.compile" if r.get("compile") else ""
        out.append(["training", bench, f"`{r['command']}`", r["device"], figure, goal, met, r["date"],
                    os.path.relpath(path, folder)])  # fmt: skip
    for path, r in _load(os.path.join(folder, "curate_clip_*.json")):
        by_threads = r.get("actor_by_threads") or {"1": {"images_per_s": r["actor_images_per_s"]}}
        actor = ", ".join(f"{v['images_per_s']:,.1f} with {t} decode thread(s)" for t, v in by_threads.items())
        figure = f"through the job's actor (read, decode, preprocess, embed): {actor}; model only {r['model_only_images_per_s']:,.1f} images/s"
        bench = f"CLIP scoring, ViT-B/32 shapes, random weights, one actor, batch {r['batch']}, {r['samples']} samples"
        out.append(["curation", bench, f"`{r['command']}`", r["device"], figure, "recorded", "-", r["date"], os.path.basename(path)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the suite's results folder (benchmarks/results/suite_cuda or suite_cpu)")
    p.add_argument("--command", default="bash benchmarks/gpu_suite.sh", help="the suite command, for the header")
    args = p.parse_args(argv)
    table = rows(args.folder)
    if not table:
        print(f"error: no benchmark results in {args.folder}", file=sys.stderr)
        return 1
    lines = [
        f"# Benchmark suite: `{args.command}`",
        "",
        "| stage | benchmark | command | device | figure | goal | met | date | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(args.folder, "summary.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
