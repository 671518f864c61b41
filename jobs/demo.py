"""``make demo``: the whole chain on the synthetic world, with the ecosystem's own launchers.

1. writes the synthetic world and serves it over HTTP on 127.0.0.1;
2. starts a local Ray head (``ray start --head --node-ip-address=127.0.0.1``), stopped at
   the end, also on failure or Ctrl-C;
3. ``ray job submit`` ingestion of the train and validation splits (img2dataset on Ray);
   the train split carries labelled duplicates and mismatched captions (5% and 3%);
4. curation of the train shards: a tiny CLIP trained on the world (no real weights here),
   then ``ray job submit`` jobs.curate (dedup, also against the validation shards; the
   lowest 5% of CLIP scores dropped), scored against the world's labels;
5. ``ray job submit`` noun labels of the curated train split and of validation (spaCy);
6. ``deepspeed`` training of the demo model (2 ranks, ZeRO-2; CPU here, GPU when present);
7. ``ray job submit`` evaluation of the trained and of an untrained model;
8. prints the report table, a held-out image's labels from ``jobs.infer``, whether the
   model learned (exact recall@5 >= 0.7 and >= 3x the untrained model's), and every path.

Every stage's output goes to the terminal and to ``<out>/logs/<stage>.log``; a failing
stage is named with its log. Exit status: 0 when the chain ran and the model learned.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Annotated

import tyro

from jobs._cli import parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class DemoConfig:
    output: Annotated[str, tyro.conf.arg(aliases=("--out",))] = "demo"
    """folder for every output of the demo"""
    n: int = 6000
    """training samples of the synthetic world"""
    val: int = 300
    """held-out validation samples"""
    steps: int = 0
    """training steps (0: the demo.yaml preset's)"""
    seed: int = 0
    """seed of the world (the training seed is the preset's)"""
    ranks: int = 2
    """deepspeed ranks (processes)"""
    keep: bool = False
    """keep the outputs of an earlier demo in --out (default: start afresh)"""

    def __post_init__(self):
        if self.n < 100 or self.val < 20:
            raise ValueError("--n must be >= 100 and --val >= 20")
        if self.ranks < 1:
            raise ValueError("--ranks must be >= 1")


# the curate stage: the world's labelled duplicates and mismatches (train split), the tiny CLIP, the filter
CURATE = {"duplicates": 0.05, "mismatches": 0.03, "clip_pairs": 1500, "clip_steps": 150, "top_fraction": 0.95}


class StageFailed(RuntimeError):
    pass


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = os.path.abspath(cfg.output)
        self.logs = os.path.join(self.out, "logs")
        self.stage_no = 0
        self.proc: subprocess.Popen | None = None
        self.train_shards = self.path("shards", "train")

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage(self, name: str, title: str, cmd: list[str], env: dict | None = None) -> None:
        """Run ``cmd``, streaming its output to the terminal and to logs/<name>.log."""
        self.stage_no += 1
        log_path = os.path.join(self.logs, f"{name}.log")
        print(f"\n=== [{self.stage_no}] {title}\n    $ {shlex.join(cmd)}\n    log: {log_path}", flush=True)
        t0 = time.time()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            while chunk := os.read(self.proc.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            code = self.proc.wait()
            self.proc = None
        if code != 0:
            raise StageFailed(f"stage '{title}' failed (exit {code}); see {log_path}")
        print(f"=== [{self.stage_no}] {title}: done in {time.time() - t0:.0f}s", flush=True)

    def kill_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def run(self) -> dict:
        from pipeline import ray_local, synthetic

        if os.path.exists(self.out) and not self.cfg.keep:
            shutil.rmtree(self.out)
        os.makedirs(self.logs, exist_ok=True)
        print(f"demo config: {json.dumps(asdict(self.cfg))}", flush=True)
        print(f"\n=== writing the synthetic world ({self.cfg.n} train + {self.cfg.val} val) into {self.path('world')}", flush=True)
        world = synthetic.write_world(
            self.path("world"), self.cfg.n, self.cfg.val, seed=self.cfg.seed, bad_fraction=0.05,
            duplicates=CURATE["duplicates"], mismatches=CURATE["mismatches"], hygiene_splits=("train",),
        )  # fmt: skip
        print(f"\n=== starting a local Ray head on 127.0.0.1 (logs under {self.logs})", flush=True)
        head = ray_local.start_head(num_cpus=max(2, os.cpu_count() or 2), log=print)
        try:
            with synthetic.serve(world.root) as base_url:
                print(f"=== serving the world at {base_url}", flush=True)
                sources = synthetic.render_sources(world, base_url)
                return self._chain(head, world, sources)
        finally:
            self.kill_running()
            head.stop()
            print("=== Ray head stopped", flush=True)

    def _submit(self, head, name: str, title: str, entry: list[str]) -> None:
        cmd = ["ray", "job", "submit", "--address", head.dashboard_url, "--working-dir", REPO]
        if os.path.commonpath([self.out, REPO]) == REPO:  # never pack the demo's own data with the code
            cmd += ["--runtime-env-json", json.dumps({"excludes": [os.path.relpath(self.out, REPO) + "/"]})]
        cmd += ["--", *entry]
        self.stage(name, title, cmd, env=head.env)

    def _chain(self, head, world, sources) -> dict:
        py = "python"
        size = str(self.preset()["image_size"])  # shards at the model's input size: no resize per training step
        for split, fmt in (("train", "cc3m"), ("val", "coco")):
            self._submit(head, f"ingest_{split}", f"ingest {split} ({fmt} format) with img2dataset on Ray", [
                py, "-m", "jobs.ingest", "--source", fmt, "--input", sources[split][fmt], "--split", split,
                "--output", self.path("shards", split), "--image-size", size, "--samples-per-shard", "500",
                "--processes", "2", "--threads", "16",
            ])  # fmt: skip
        self._curate(head, world)
        for split in ("train", "val"):
            self._submit(head, f"labels_{split}", f"noun labels of {split} on Ray Data (spaCy)", [
                py, "-m", "jobs.labels", "--shards", self.train_shards if split == "train" else self.path("shards", split),
                "--output", self.path("labels", split),
            ])  # fmt: skip
        self._train(world)
        untrained = self._untrained(world)
        reports = {}
        for name, checkpoint in (("trained", self.path("run", "export")), ("untrained", untrained)):
            self._submit(head, f"evaluate_{name}", f"evaluate the {name} model on held-out images", [
                py, "-m", "jobs.evaluate", "--checkpoint", checkpoint, "--shards", self.path("shards", "val"),
                "--labels", self.path("labels", "val"), "--dataset", "synthetic", "--k", "5", "10",
                "--output", self.path("reports", name),
            ])  # fmt: skip
            reports[name] = self.path("reports", name)
        return self._summary(world, reports)

    def _train(self, world) -> None:
        import torch

        gpus = torch.cuda.device_count()
        ranks = min(self.cfg.ranks, gpus) if gpus else self.cfg.ranks
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        from pipeline.ray_local import free_port

        cmd = [
            deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "jobs/train.py",
            "--config", "jobs/configs/demo.yaml", "--deepspeed", "jobs/configs/zero2.json",
            "--run-dir", self.path("run"), "--tokenizer", world.tokenizer,
            "--data", f"synthetic={self.train_shards},{self.path('labels', 'train')}",
        ]  # fmt: skip
        if self.cfg.steps:
            cmd += ["--steps", str(self.cfg.steps)]
        where = f"{gpus} GPU(s)" if gpus else "CPU"
        self.stage("train", f"train the demo model with deepspeed ({ranks} ranks, ZeRO-2, {where})", cmd)

    def _curate(self, head, world) -> None:
        """A tiny CLIP trained on the world's pairs, then jobs.curate on the train shards (self-contained stage)."""
        from pipeline.tiny_clip import train_tiny_clip

        self.stage_no += 1
        good = [r for r in world.samples("train") if r["kind"] == "good"][: CURATE["clip_pairs"]]
        print(f"\n=== [{self.stage_no}] train a tiny CLIP on {len(good)} image-caption pairs of the world (no CLIP weights can be downloaded here)", flush=True)
        t0 = time.time()
        pairs = [(open(os.path.join(world.root, r["file"]), "rb").read(), r["caption"]) for r in good]
        clip = train_tiny_clip(pairs, self.path("tiny_clip"), steps=CURATE["clip_steps"], progress=lambda step, loss: print(f"    step {step}: contrastive loss {loss:.3f}", flush=True))
        print(f"=== [{self.stage_no}] tiny CLIP: done in {time.time() - t0:.0f}s ({clip})", flush=True)
        self.train_shards = self.path("shards", "train_curated")
        self._submit(head, "curate_train", "curate the train shards on Ray Data: dedup (also against val), CLIP score", [
            "python", "-m", "jobs.curate", "--shards", self.path("shards", "train"), "--output", self.train_shards,
            "--exclude-near", self.path("shards", "val"), "--dedup", "phash", "--clip-model", clip,
            "--top-fraction", str(CURATE["top_fraction"]),
        ])  # fmt: skip

    def _curation_report(self, world) -> dict:
        """What curation dropped, against the world's labels: duplicates found, mismatches dropped."""
        import pyarrow.parquet as pq

        curation = pq.read_table(os.path.join(self.train_shards, "curation.parquet")).to_pylist()
        uid = {}
        for name in os.listdir(self.path("shards", "train")):
            if name[0].isdigit() and name.endswith(".parquet"):
                for r in pq.read_table(self.path("shards", "train", name), columns=["key", "uid", "status"]).to_pylist():
                    if r["status"] == "success":
                        uid[r["key"]] = int(r["uid"].split("-")[1])
        truth = world.samples("train")
        kind = {r["key"]: truth[uid[r["key"]]]["kind"] for r in curation}
        dup_reasons = ("exact_duplicate", "near_duplicate", "eval_duplicate")
        copies = [r for r in curation if kind[r["key"]] == "duplicate"]
        flagged = [r for r in curation if r["reason"] in dup_reasons]
        mismatch = [r for r in curation if kind[r["key"]] == "mismatch"]
        match = [r for r in curation if kind[r["key"]] == "good" and r["reason"] not in dup_reasons]
        reasons = Counter(r["reason"] or "kept" for r in curation)
        report = {
            "samples": len(curation),
            "kept": reasons.pop("kept", 0),
            "dropped": dict(sorted(reasons.items())),
            "copies_in_world": len(copies),
            "copies_dropped_as_duplicates": sum(r["reason"] in dup_reasons for r in copies),
            "duplicate_drops_that_are_copies": sum(kind[r["key"]] == "duplicate" for r in flagged),
            "duplicate_drops": len(flagged),
            "mismatch_drop_rate": sum(r["reason"] == "below_top_fraction" for r in mismatch) / max(1, len(mismatch)),
            "match_drop_rate": sum(r["reason"] == "below_top_fraction" for r in match) / max(1, len(match)),
        }
        print("\n=== curation of the train shards (against the world's labels)")
        print(f"    {report['samples']} samples, {report['kept']} kept; dropped: " + ", ".join(f"{k} {v}" for k, v in report["dropped"].items()))
        print(f"    duplicates: {report['copies_dropped_as_duplicates']} of the world's {report['copies_in_world']} copies dropped as duplicates; "
              f"{report['duplicate_drops_that_are_copies']} of {report['duplicate_drops']} duplicate drops are copies (the rest: distinct images that look alike at 64 px)")  # fmt: skip
        print(f"    CLIP score (tiny CLIP, lowest {1 - CURATE['top_fraction']:.0%} dropped): {report['mismatch_drop_rate']:.0%} of mismatched captions "
              f"dropped vs {report['match_drop_rate']:.0%} of matching ones")  # fmt: skip
        return report

    @staticmethod
    def preset() -> dict:
        import yaml

        with open(os.path.join(REPO, "jobs", "configs", "demo.yaml")) as f:
            return yaml.safe_load(f)

    def _untrained(self, world) -> str:
        """The same architecture and initialization as the trained run, before any step."""
        import torch

        from model.checkpoint import save_pretrained
        from model.config import tiny_config
        from model.nxtp import NxTP
        from model.tokenizer import Tokenizer

        preset = self.preset()
        tok = Tokenizer(world.tokenizer)
        torch.manual_seed(preset["seed"])
        model = NxTP(tiny_config(tok.n_base, image_size=preset["image_size"], patch_size=preset["patch_size"]))
        model.init_weights()
        return save_pretrained(model, tok, self.path("untrained"))

    def _summary(self, world, reports: dict) -> dict:
        import pyarrow.parquet as pq

        rows = {name: {(r["k"]): r for r in pq.read_table(os.path.join(path, "report.parquet")).to_pylist()} for name, path in reports.items()}
        print("\n=== report (held-out synthetic images)")
        print(f"{'model':10s} {'k':>3s} {'samples':>8s} {'failed':>7s} {'R':>7s} {'P':>7s} {'F1':>7s} {'exact R@k':>10s} {'exact P@k':>10s}")
        for name, by_k in rows.items():
            for k, r in sorted(by_k.items()):
                print(f"{name:10s} {k:3d} {r['samples']:8d} {r['failed']:7d} {r['recall']:7.3f} {r['precision']:7.3f} {r['f1']:7.3f} {r['exact_recall']:10.3f} {r['exact_precision']:10.3f}")
        sample = next(s for s in world.samples("val") if s["kind"] == "good")
        image = os.path.join(world.root, sample["file"])
        self.stage("infer", "jobs.infer on a held-out image", [sys.executable, "-m", "jobs.infer", "--checkpoint", self.path("run", "export"), "--image", image, "--num-labels", "5"])
        print(f"    ground truth of {os.path.basename(image)}: {', '.join(sample['labels'])}  (caption: {sample['caption'].splitlines()[0]!r})")
        curation = self._curation_report(world)
        trained, untrained = rows["trained"][5], rows["untrained"][5]
        ratio = trained["exact_recall"] / untrained["exact_recall"] if untrained["exact_recall"] > 0 else None  # None: untrained found nothing
        learned = trained["exact_recall"] >= 0.7 and trained["exact_recall"] >= 3 * untrained["exact_recall"] and trained["recall"] > untrained["recall"]
        summary = {
            "trained_exact_recall_at_5": trained["exact_recall"],
            "untrained_exact_recall_at_5": untrained["exact_recall"],
            "ratio": ratio,
            "trained_semantic_recall_at_5": trained["recall"],
            "untrained_semantic_recall_at_5": untrained["recall"],
            "learned": learned,
            "curation": curation,
        }
        with open(self.path("summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        verdict = "PASS" if learned else "FAIL"
        print(
            f"\n=== learning check: trained exact recall@5 {trained['exact_recall']:.3f} (goal >= 0.7), "
            f"{f'{ratio:.1f}x' if ratio is not None else 'against 0 for'} the untrained model's {untrained['exact_recall']:.3f} (goal >= 3x); "
            f"semantic recall {trained['recall']:.3f} vs {untrained['recall']:.3f}: {verdict}"
        )
        print("\n=== outputs")
        for label, path in (
            ("synthetic world", self.path("world")),
            ("shards (train, val)", self.path("shards")),
            ("curated train shards", self.train_shards),
            ("curation table", os.path.join(self.train_shards, "curation.parquet")),
            ("CLIP score histogram", os.path.join(self.train_shards, "clip_scores.png")),
            ("label tables", self.path("labels")),
            ("training run", self.path("run")),
            ("exported model", self.path("run", "export")),
            ("loss curve", self.path("run", "loss.png")),
            ("TensorBoard", self.path("run", "tensorboard")),
            ("reports", self.path("reports")),
            ("report chart", self.path("reports", "trained", "report.png")),
            ("stage logs", self.logs),
            ("summary", self.path("summary.json")),
        ):
            print(f"    {label:22s} {path}")
        export = self.path("run", "export")
        print("\n=== try the trained model")
        print(f"    page (labels, probability bars, attention maps; Ctrl-C stops it): {shlex.join([sys.executable, '-m', 'jobs.serve', '--checkpoint', export])}")
        print(f"    attention maps of an image: {shlex.join([sys.executable, '-m', 'jobs.infer', '--checkpoint', export, '--image', image, '--attention-map', self.path('attention')])}")
        return summary


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: the stage's processes, the server, the Ray head


def main(argv: list[str] | None = None) -> int:
    cfg = parse(DemoConfig, argv, prog="python -m jobs.demo", description=__doc__)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.time()
    demo = Demo(cfg)
    try:
        summary = demo.run()
    except StageFailed as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the running stage and the Ray head were stopped", file=sys.stderr)
        return 130
    print(f"\n=== demo finished in {(time.time() - t0) / 60:.1f} min")
    return 0 if summary["learned"] else 1


if __name__ == "__main__":
    sys.exit(main())
