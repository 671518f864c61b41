"""One-shot sampling on the CPU: PyTorch against the ONNX graphs in onnxruntime, side by side.

    python -m benchmarks.onnx_bench --checkpoint demo/run/export --name demo          # a trained model (make demo's)
    python -m benchmarks.onnx_bench --config small --tokenizer tokenizer.model       # random weights, 23M, 196 image tokens

The model is exported with ``model.onnx_export`` into a temporary folder (the export time
is reported), then both run ``model.sampling.one_shot`` (the same algorithm: only the
network runs in onnxruntime) on the same batch of held-out synthetic-world images, with
the same number of threads (``--threads``, default all cores). They alternate (A/B)
``--repeats`` times per k; the figures are the median images/s of each and their ratio
(onnxruntime / PyTorch), and the same for the prefill alone (image encoder and prompt).
The labels of both are compared (``agreement``: images with identical labels; the largest
probability difference). A random model's labels end after a few tokens (the delimiter's
output row is biased, as in sampling_bench).

Results go to benchmarks/results/onnx_cpu_<name>.json (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.sampling_bench import REPO, build_model, device_name, find_tokenizer, small_config, write_json


def held_out_images(n: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` validation images of the synthetic world of ``seed`` (the demo's is 0), preprocessed."""
    from model.vision import preprocess
    from pipeline.synthetic import make_sample, render

    transform = preprocess(image_size)
    return torch.stack([transform(render(make_sample(seed, "val", i), seed).convert("RGB")) for i in range(n)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="an exported model folder (as jobs.infer --checkpoint takes it)")
    which.add_argument("--config", choices=["small"], help="random weights at these shapes (sampling_bench's small config)")
    p.add_argument("--tokenizer", help="--config: the tokenizer (32k pieces for small; default $NXTP_TOKENIZER)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both runtimes (default: all cores)")
    p.add_argument("--name", help="the model's name in the result and its file name (default: the --config, or model)")
    p.add_argument("--out", default=None, help="result file (default: benchmarks/results/onnx_cpu_<name>.json)")
    args = p.parse_args(argv)
    args.command = "python -m benchmarks.onnx_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from model.checkpoint import load_model
    from model.onnx_export import export_onnx
    from model.onnx_runtime import load_onnx
    from model.sampling import one_shot
    from model.tokenizer import Tokenizer

    if args.checkpoint:
        model, tok, _ = load_model(args.checkpoint)
    else:
        tok = Tokenizer(find_tokenizer(args.tokenizer))
        model = build_model(small_config(tok.n_base), tok)
    name = args.name or args.config or "model"
    model = model.float().eval()
    images = held_out_images(args.batch, model.cfg.vision.image_size)
    prompt = torch.tensor(tok.prompt_ids(model.cfg.prompt)).expand(args.batch, -1)
    out = args.out or os.path.join(REPO, "benchmarks", "results", f"onnx_cpu_{name}.json")
    result = {
        "benchmark": "one-shot sampling on the CPU, PyTorch vs the ONNX graphs in onnxruntime",
        "command": args.command,
        "date": datetime.date.today().isoformat(),
        "device": device_name(torch.device("cpu")),
        "model": name,
        "parameters": sum(x.numel() for x in model.parameters()),
        "image_tokens": model.cfg.vision.n_tokens,
        "vocabulary": model.cfg.decoder.vocab_size + model.cfg.n_special,
        "tokenizer": "the model's own" if args.checkpoint else os.path.basename(tok.path),
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        export_onnx(model, tok, folder)
        result["export_s"] = round(time.perf_counter() - t0, 2)
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
        onnx_model, _ = load_onnx(folder, threads=args.threads)
        runners = {"pytorch": model, "onnxruntime": onnx_model}
        result["results"] = []

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return args.batch / (time.perf_counter() - t0)

        with torch.inference_mode():
            prefill = {key: [] for key in runners}
            for runner in runners.values():  # warm-up
                runner.prefill(images, prompt)
            for _ in range(args.repeats):
                for key, runner in runners.items():
                    prefill[key].append(timed(lambda r=runner: r.prefill(images, prompt)))
            for k in args.ks:
                labels = {key: one_shot(runner, images, tok, k=k) for key, runner in runners.items()}  # also the warm-up
                same = sum(a.labels == b.labels for a, b in zip(labels["pytorch"], labels["onnxruntime"]))
                worst = max(abs(x - y) for a, b in zip(labels["pytorch"], labels["onnxruntime"]) for x, y in zip(a.probs, b.probs))
                runs = {key: [] for key in runners}
                for _ in range(args.repeats):
                    for key, runner in runners.items():
                        runs[key].append(timed(lambda r=runner, k=k: one_shot(r, images, tok, k=k)))
                med = {key: statistics.median(v) for key, v in runs.items()}
                row = {
                    "k": k,
                    "pytorch_images_per_s": round(med["pytorch"], 2),
                    "onnxruntime_images_per_s": round(med["onnxruntime"], 2),
                    "ratio": round(med["onnxruntime"] / med["pytorch"], 2),
                    "agreement": f"{same}/{args.batch} images with identical labels, largest probability difference {worst:.1e}",
                    "runs": {key: [round(x, 2) for x in v] for key, v in runs.items()},
                }
                result["results"].append(row)
                print(f"top-{k:<4d} pytorch {row['pytorch_images_per_s']:8.2f} img/s   onnxruntime {row['onnxruntime_images_per_s']:8.2f} img/s"
                      f"   ratio {row['ratio']:.2f}   {row['agreement']}", flush=True)  # fmt: skip
            med = {key: statistics.median(v) for key, v in prefill.items()}
            result["prefill"] = {
                "pytorch_images_per_s": round(med["pytorch"], 2),
                "onnxruntime_images_per_s": round(med["onnxruntime"], 2),
                "ratio": round(med["onnxruntime"] / med["pytorch"], 2),
                "runs": {key: [round(x, 2) for x in v] for key, v in prefill.items()},
            }
            print(f"prefill   pytorch {med['pytorch']:8.2f} img/s   onnxruntime {med['onnxruntime']:8.2f} img/s   ratio {result['prefill']['ratio']:.2f}")
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out, result)
    print(f"export {result['export_s']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
