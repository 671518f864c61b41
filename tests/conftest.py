"""Shared fixtures: a small synthetic world served on 127.0.0.1, and a real local Ray head."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("NLTK_DATA", os.path.join(REPO, ".cache", "nltk_data"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every Ray address on loopback
os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback heads; no ~/.ray/auth_token written by local ray.init()
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pipeline import ast_guard, ray_local, synthetic  # noqa: E402

ast_guard.install()  # pytest parses while server and Ray threads format tracebacks (pipeline/ast_guard.py)


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> synthetic.World:
    """60 train + 24 val samples, 10% bad rows, seed 0."""
    return synthetic.write_world(str(tmp_path_factory.mktemp("world")), n_train=60, n_val=24, seed=0, bad_fraction=0.1)


@pytest.fixture(scope="session")
def tok(world):
    """The synthetic world's tokenizer."""
    from model.tokenizer import Tokenizer

    return Tokenizer(world.tokenizer)


@pytest.fixture
def no_grad():
    """Gradients off for one test (forward-only modules use it through ``pytestmark``): a module-level
    ``torch.set_grad_enabled(False)`` would leak into every test collected after it."""
    import torch

    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def served_world(world):
    """(world, base_url, {split: {format: path}}) while the world is served on 127.0.0.1."""
    with synthetic.serve(world.root) as base_url:
        yield world, base_url, synthetic.render_sources(world, base_url)


@pytest.fixture(scope="session")
def s3():
    """(endpoint, env) of an S3 server on 127.0.0.1 (moto), with the bucket ``nxtp`` made; for the
    session, ``env`` (endpoint and credentials) is also in this process's environment, so every
    process started after it inherits it."""
    from tests import s3_server

    with s3_server.serve() as endpoint:
        env = s3_server.client_env(endpoint)
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            s3_server.make_bucket("nxtp")
            yield endpoint, env
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head (`ray start --head --node-ip-address=127.0.0.1`), shared by the session."""
    head = ray_local.start_head(num_cpus=2)
    yield head
    head.stop()


def build_shards(source_parquet: str, out: str, image_size: int = 64, per_shard: int = 20) -> str:
    """Real img2dataset output (webdataset tars + per-shard parquet + stats) from a LAION-format file.

    One download thread: img2dataset writes samples in the order its threads finish, and the
    tests that train on these shards must read the same stream on every machine and run."""
    import img2dataset

    img2dataset.download(
        url_list=source_parquet,
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        output_folder=out,
        output_format="webdataset",
        processes_count=1,
        thread_count=1,
        image_size=image_size,
        resize_mode="center_crop",
        number_sample_per_shard=per_shard,
        distributor="multiprocessing",
        extract_exif=False,
        enable_wandb=False,
        timeout=5,
    )
    return out


@pytest.fixture(scope="session")
def shards(served_world, tmp_path_factory):
    """{split: folder} of webdataset shards downloaded by img2dataset from the served world."""
    world, _, sources = served_world
    root = tmp_path_factory.mktemp("shards")
    return {split: build_shards(sources[split]["laion"], str(root / split)) for split in ("train", "val")}


def write_label_tables(shards_dir: str, out_dir: str) -> str:
    """Label tables for img2dataset shards, written with the noun extractor (no Ray)."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.nouns import NounExtractor
    from schemas import LABEL_TABLE, write_table

    extractor = NounExtractor()
    os.makedirs(os.path.join(out_dir, "labels"), exist_ok=True)
    for path in sorted(glob.glob(os.path.join(shards_dir, "*.parquet"))):
        shard = os.path.basename(path).removesuffix(".parquet")
        rows = pq.read_table(path, columns=["key", "caption", "status"]).to_pylist()
        rows = [r for r in rows if r["status"] == "success"]
        labels = extractor([r["caption"] for r in rows])
        table = pa.table(
            {
                "key": [r["key"] for r in rows],
                "shard": [shard] * len(rows),
                "caption": [r["caption"] for r in rows],
                "labels": labels,
                "extractor": ["spacy"] * len(rows),
            }
        )
        write_table(table, os.path.join(out_dir, "labels", f"{shard}.parquet"), LABEL_TABLE)
    return out_dir


@pytest.fixture(scope="session")
def labelled_shards(shards, tmp_path_factory):
    """{split: (shards folder, labels folder)} for the served world's shards."""
    root = tmp_path_factory.mktemp("labels")
    return {split: (path, write_label_tables(path, str(root / split))) for split, path in shards.items()}


# smaller than `make demo` (held-out samples); the training recipe is the demo's own
DEMO_ARGS = ["--n", "6000", "--val", "100", "--seed", "0"]
# development only: a folder holding a finished `jobs.demo --out DIR` run with these arguments
# (and its stdout in DIR/stdout.txt) stands in for the session's own run; CI never sets it
REUSE_DEMO = "NXTP_TEST_REUSE_DEMO"


@pytest.fixture(scope="session")
def demo_run(repo_root, tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """(output folder, finished process) of `python -m jobs.demo` on the synthetic world, once per session.

    The trained demo model is ``<out>/run/export``; tests that need a model that learned
    share this run instead of training their own.
    """
    reuse = os.environ.get(REUSE_DEMO)
    if reuse:
        stdout = open(os.path.join(reuse, "stdout.txt")).read()
        return reuse, subprocess.CompletedProcess(["jobs.demo", *DEMO_ARGS], 0, stdout, "")
    out = str(tmp_path_factory.mktemp("demo") / "out")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--out", out, *DEMO_ARGS],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    return out, proc
