"""jobs.curate on the synthetic world's labelled duplicates and mismatches, on a real Ray head.

The world (pipeline.synthetic, ``duplicates=`` / ``mismatches=``) says which rows copy which
image (exact, re-encoded, resized, cropped; some train rows copy a validation image) and
which captions belong to another picture. The shards come from jobs.ingest downloading the
served world; the CLIP model is a tiny one trained here (pipeline.tiny_clip: random CLIP
weights score every pair alike, so they could not show a filter working).
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import curate as curate_job
from pipeline import curate, dedup, synthetic
from pipeline.labels import read_shard
from pipeline.shards import find_shards, index_tar
from pipeline.tiny_clip import train_tiny_clip
from schemas import CURATION, SHARD_MANIFEST, read_table
from tests.test_ingest import ray_driver, run_job, time_limit  # noqa: F401 - fixtures
from tests.test_shards import write_tar

N_TRAIN, N_VAL = 240, 60


# ----------------------------------------------------------------------------- units


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    flips = [np.uint64(1) << np.uint64(b) for b in rng.integers(0, 64, (100, 5)).ravel()]
    copies = base[:100].copy()
    for i in range(100):
        for b in flips[i * 5 : i * 5 + int(rng.integers(0, 6))]:
            copies[i] ^= b
    hashes = np.concatenate([base, copies])
    brute = dedup.popcount_xor(hashes[:, None], hashes[None, :])
    for d in (0, 3, 6, 10):
        i, j = np.nonzero(np.triu(brute <= d, 1))
        assert {tuple(p) for p in dedup.near_pairs(hashes, d)[:, :2].tolist()} == set(zip(i.tolist(), j.tolist()))
    cross = dedup.near_pairs(copies, 6, other=base)
    assert {(int(a), int(b)) for a, b, _ in cross} >= {(k, k) for k in range(100) if dedup.popcount_xor(copies[k], base[k]) <= 6}


def test_clusters_keep_the_largest_picture():
    groups = dedup.clusters(["a", "b", "a", "c"], np.array([1, 3, 1, 2**40], np.uint64), [10, 20, 10, 5], 1)
    assert groups == [(1, "near_duplicate", 1), None, (1, "near_duplicate", 1), None]
    assert dedup.clusters(["a", "b", "a"], np.zeros(3, np.uint64), [1, 1, 1], None) == [None, None, (0, "exact_duplicate", 0)]
    wide = dedup.from_hex(["f" * 64, "f" * 63 + "0", "0" * 64])  # 256-bit hashes: exhaustive search
    assert dedup.near_pairs(wide, 4).tolist() == [[0, 1, 4]]
    assert dedup.clusters(["a", "b", "c"], wide, [1, 2, 3], 4) == [(1, "near_duplicate", 4), None, None]


def linear_classifier(direction: np.ndarray):
    import torch

    layer = torch.nn.Linear(len(direction), 1)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(direction.astype(np.float32))[None])
        layer.bias.zero_()
    return torch.nn.Sequential(layer, torch.nn.Flatten(0))


def test_classifier_loads_from_torchscript_and_onnx(tmp_path):
    import torch

    model = linear_classifier(np.linspace(-1, 1, 8)).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "c.pt"))
    torch.onnx.export(model, torch.zeros(2, 8), str(tmp_path / "c.onnx"), dynamo=False, input_names=["embedding"],
                      output_names=["score"], dynamic_axes={"embedding": {0: "n"}, "score": {0: "n"}})  # fmt: skip
    emb = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    want = emb @ np.linspace(-1, 1, 8)
    for name in ("c.pt", "c.onnx"):
        np.testing.assert_allclose(curate.load_classifier(str(tmp_path / name))(emb), want, rtol=1e-5, atol=1e-5)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="need a CLIP model"):
        curate.CurateSettings(min_clip_score=0.3)
    with pytest.raises(ValueError, match="go together"):
        curate.CurateSettings(clip_model="ViT-B-32", classifier="c.pt")
    with pytest.raises(ValueError, match="top_fraction"):
        curate.CurateSettings(clip_model="ViT-B-32", top_fraction=1.5)
    for field, bad in (("colour_tolerance", -5.0), ("colour_tolerance", float("nan")), ("min_clip_score", float("nan")), ("max_retries", -1)):
        with pytest.raises(ValueError, match=field):
            curate.CurateSettings(clip_model="ViT-B-32", **{field: bad})
    with pytest.raises(ValueError, match="max_classifier_score"):
        curate.CurateSettings(clip_model="ViT-B-32", classifier="c.pt", max_classifier_score=float("nan"))
    assert curate.CurateSettings(clip_model="ViT-B-32", min_clip_score=float("inf"), colour_tolerance=255.0).min_clip_score == float("inf")


@pytest.mark.parametrize(
    "flags",
    [
        ("--colour-tolerance", "-5"), ("--colour-tolerance", "nan"), ("--min-clip-score", "nan"), ("--top-fraction", "nan"),
        ("--max-classifier-score", "nan", "--classifier", "c.pt"), ("--dedup-distance", "-1"), ("--max-retries", "-1"),
        ("--batch-size", "0"), ("--concurrency", "-1"), ("--cpus-per-actor", "0"),
    ],
)  # fmt: skip
def test_bad_numbers_are_usage_errors(flags, tmp_path, capsys):
    """Refused by the flag parser (exit 2, the reason said) before anything starts or is written."""
    with pytest.raises(SystemExit) as exit_:
        curate_job.main(["--shards", str(tmp_path), "--output", str(tmp_path / "out"), "--clip-model", "ViT-B-32", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flags[0] in err or flags[0].removeprefix("--").replace("-", "_") in err
    assert not (tmp_path / "out").exists()


def test_top_fraction_keeps_its_share_exactly():
    """0.07 x 100 is 7.000000000000001 in floats: 7 kept, not 8; a share of a count that does not divide rounds up."""
    for fraction, n, kept in ((0.07, 100, 7), (0.14, 100, 14), (0.55, 100, 55), (0.3, 7, 3), (1.0, 5, 5)):
        table = pa.table({"key": [f"{i:03d}" for i in range(n)], "reason": pa.array([None] * n, pa.string()),
                          "clip_score": [i / n for i in range(n)], "classifier_score": pa.array([None] * n, pa.float64())})  # fmt: skip
        reasons, _ = curate.decide_scores(table, curate.CurateSettings(clip_model="ViT-B-32", top_fraction=fraction))
        assert reasons.count(None) == kept, (fraction, n)


def test_an_exclude_set_needs_a_dedup_and_a_resume_the_same_shards(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        curate_job.main(["--shards", str(tmp_path), "--output", str(tmp_path / "out"), "--dedup", "none", "--exclude-near", str(tmp_path)])
    said = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro wraps the message in a box
    assert exit_.value.code == 2 and "--exclude-near drops the copies of an evaluation set's images, a dedup: give --dedup exact, phash or dhash" in said
    cfg = curate_job.CurateConfig(shards="/data/laion", output=str(tmp_path / "out"))
    settings = cfg.settings(1, 0)
    (tmp_path / "out").mkdir()
    record = {"shards": cfg.shards, "exclude_near": None, **settings.decision_fields(), "input_shards": ["00000", "00001"]}
    (tmp_path / "out" / "curate_config.json").write_text(json.dumps(record))
    curate_job.check_resume(cfg, settings, ["00000", "00001"])  # the same shards: completes what is missing
    with pytest.raises(ValueError, match=r"holds a curation of other shards: since it began, /data/laion has 1 added \(e.g. 00002\); dedup"):
        curate_job.check_resume(cfg, settings, ["00000", "00001", "00002"])
    with pytest.raises(ValueError, match=r"1 added \(e.g. 00002\), 1 gone \(e.g. 00001\)"):
        curate_job.check_resume(cfg, settings, ["00000", "00002"])


def jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def unusable_shards(tmp_path):
    """A folder of shards without one usable sample: an empty tar, bytes that are no tar, an undecodable image."""
    folder = tmp_path / "unusable"
    folder.mkdir()
    write_tar(folder / "00000.tar", [])
    (folder / "00001.tar").write_bytes(b"PAR1 not a tar" * 100)
    write_tar(folder / "00002.tar", [("000020000", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a caption"})])
    return str(folder)


def test_zero_samples_pass_every_decision(unusable_shards, tmp_path):
    """Dedup (also against an eval set), the CLIP filters, the summary and the histogram with no usable sample."""
    assert dedup.thumbnails([]).shape == (0, 48) and dedup.near_pairs(dedup.from_hex([]), 50).shape == (0, 3)
    other = curate.hash_shard(write_tar(tmp_path / "eval.tar", [("e", {"jpg": jpeg((200, 10, 10))})]))[0]
    other = other.append_column("shard", pa.array(["eval"], pa.string()))
    for shard in find_shards(unusable_shards):
        table, damage = curate.hash_shard(shard.tar)
        assert (damage is not None) == (shard.name == "00001")
        hashes = table.append_column("shard", pa.array([shard.name] * table.num_rows, pa.string()))
        for settings in (curate.CurateSettings(), curate.CurateSettings(dedup="exact")):
            for exclude in (None, other):
                assert curate.decide_dedup(hashes, settings, exclude) == [{"reason": "unreadable", "duplicate_of": None, "phash_distance": None}] * hashes.num_rows
    settings = curate.CurateSettings(clip_model="ViT-B-32", min_clip_score=0.3, top_fraction=0.5)
    empty = CURATION.empty_table()
    assert curate.decide_scores(empty, settings) == ([], None)
    summary = curate.summarize(empty, settings, None, 3, {}, 0.0, 0.0, 0.0)
    assert summary["samples"] == summary["kept"] == 0 and summary["clip_scores"] is None
    assert [line.split() for line in curate.format_summary(summary, "out").splitlines() if "kept" in line] == [["kept", "0", "0.0%"]]
    curate.plot_scores(empty, settings, None, str(tmp_path / "scores.png"))
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_curation_of_no_usable_sample_is_an_empty_shard_set(unusable_shards, tmp_path, ray_driver):  # noqa: F811
    """As when the filters keep nothing: exit 0, one empty output shard per input shard, every table, nothing scored."""
    out = str(tmp_path / "out")
    assert run_curate("--shards", unusable_shards, "--output", out, "--clip-model", "ViT-B-32", "--top-fraction", "0.5") == 0
    table = read_table(os.path.join(out, "curation.parquet"), CURATION)
    assert table["reason"].to_pylist() == ["unreadable"]  # the one sample read: its image does not decode
    assert [s.name for s in find_shards(out)] == ["00000", "00001", "00002"] and tar_keys(out) == []
    manifest = read_table(os.path.join(out, "manifest.parquet"), SHARD_MANIFEST)
    assert manifest["samples"].to_pylist() == [0, 0, 1] and sum(manifest["successes"].to_pylist()) == 0
    summary = json.load(open(os.path.join(out, "curate_summary.json")))
    assert summary["samples"] == 1 and summary["kept"] == 0 and summary["dropped"]["unreadable"] == 1
    assert list(summary["damaged_shards"]) == ["00001"] and "not a readable tar" in summary["damaged_shards"]["00001"]
    assert summary["clip_scores"] is None and not os.path.exists(os.path.join(out, "clip_scores.png"))


def test_an_exclude_set_that_cannot_serve_is_refused(unusable_shards, tmp_path, capsys):
    """A damaged, non-tar or empty --exclude-near set: a usage error naming it, before any output (the leak filter
    would pass leaks silently); the library refuses the hashed set too, and drops the cache it refused."""
    good = write_tar(tmp_path / "00000.tar", [("k", {"jpg": jpeg((10, 200, 10)), "txt": b"green"})])
    table = tmp_path / "val.parquet"
    pq.write_table(pa.table({"key": ["k"]}), str(table))
    truncated = tmp_path / "trunc" / "00000.tar"
    truncated.parent.mkdir()
    truncated.write_bytes(open(good, "rb").read()[:700])
    cases = {
        str(table): "not a webdataset shard", str(truncated): "truncated", os.path.join(unusable_shards, "00000.tar"): "hold no samples: nothing to check against",
        os.path.join(unusable_shards, "00001.tar"): "not a readable tar",
    }  # fmt: skip
    for path, why in cases.items():
        with pytest.raises(ValueError, match=why):
            curate.check_exclude(find_shards(path))
        out = tmp_path / "out"
        assert run_curate("--shards", good, "--output", str(out), "--exclude-near", path) == 2
        err = capsys.readouterr().err
        assert why in err and path in err and not out.exists()
    assert curate.check_exclude(find_shards(good)) == 1

    folder = tmp_path / "hashes"  # the check on the hashed set (curate.curate), which decodes the images too
    for name, shard in (("damaged", find_shards(str(truncated))[0]), ("no image", find_shards(os.path.join(unusable_shards, "00002.tar"))[0])):
        spec = {"name": shard.name, "tar": shard.tar, "out": str(folder / f"{shard.name}.parquet")}
        curate.hash_shards_batch(pa.Table.from_pylist([spec]), "phash")
        with pytest.raises(ValueError, match="truncated" if name == "damaged" else "no samples with a readable image"):
            curate._exclude_hashes([shard], str(folder))
        assert not os.path.exists(spec["out"]), name  # a re-run reads the shard again
    shard = find_shards(good)[0]
    curate.hash_shards_batch(pa.Table.from_pylist([{"name": shard.name, "tar": shard.tar, "out": str(folder / "00000.parquet")}]), "phash")
    assert curate._exclude_hashes([shard], str(folder))["key"].to_pylist() == ["k"]


# ----------------------------------------------------------------------------- the world, shards and model


@pytest.fixture(scope="module")
def hygiene(tmp_path_factory, ray_driver):  # noqa: F811
    """(world, {split: shards folder}, tiny CLIP name): the world with duplicates and mismatches, ingested."""
    root = tmp_path_factory.mktemp("hygiene")
    world = synthetic.write_world(str(root / "world"), N_TRAIN, N_VAL, seed=0, bad_fraction=0.0, duplicates=0.15, mismatches=0.1)
    folders = {}
    with synthetic.serve(world.root) as base_url:
        sources = synthetic.render_sources(world, base_url)
        for split in ("train", "val"):
            folders[split] = str(root / "shards" / split)
            assert run_job("--source", "cc3m", "--input", sources[split]["cc3m"], "--split", split, "--output", folders[split], "--samples-per-shard", "64") == 0
    good = [r for r in world.samples("train") if r["kind"] == "good"]
    pairs = [(open(os.path.join(world.root, r["file"]), "rb").read(), r["caption"]) for r in good]
    clip = train_tiny_clip(pairs, str(root / "tiny_clip"), steps=120, batch_size=64)
    return world, folders, clip


def uids(folder: str) -> dict[str, str]:
    """sample key -> the world row's uid (cc3m-<index>), from the ingestion's per-shard tables."""
    out = {}
    for path in sorted(p for p in os.listdir(folder) if p[0].isdigit() and p.endswith(".parquet")):
        for row in pq.read_table(os.path.join(folder, path), columns=["key", "uid", "status"]).to_pylist():
            if row["status"] == "success":
                out[row["key"]] = row["uid"]
    return out


def tar_keys(folder: str) -> list[str]:
    keys = []
    for shard in find_shards(folder):
        with tarfile.open(shard.tar) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def run_curate(*args: str) -> int:
    return curate_job.main([*args, "--concurrency", "1", "--batch-size", "32"])


@pytest.fixture(scope="module")
def curated(hygiene, tmp_path_factory):
    """One curation of the train shards: dedup against themselves and the validation shards, CLIP top 85%,
    and a classifier that scores how much an image looks like a snow scene."""
    import open_clip
    import torch
    from PIL import Image

    world, folders, clip = hygiene
    out = str(tmp_path_factory.mktemp("curated") / "train")
    model, _, preprocess = open_clip.create_model_and_transforms(clip)
    rows = [r for r in world.samples("train") if r["kind"] == "good"]
    with torch.no_grad():
        emb = model.encode_image(torch.stack([preprocess(Image.open(os.path.join(world.root, r["file"])).convert("RGB")) for r in rows]), normalize=True).numpy()
    snow = np.array([r["scene"] == "snow" for r in rows])
    direction = emb[snow].mean(0) - emb[~snow].mean(0)
    threshold = float(np.percentile(emb @ direction, 100 * (1 - snow.mean() / 2)))  # about half the snow scenes score above
    classifier = str(tmp_path_factory.mktemp("classifier") / "snow.pt")
    torch.jit.save(torch.jit.script(linear_classifier(direction).eval()), classifier)
    args = [
        "--shards", folders["train"], "--output", out, "--exclude-near", folders["val"], "--clip-model", clip,
        "--top-fraction", "0.85", "--classifier", classifier, "--max-classifier-score", str(threshold),
    ]  # fmt: skip
    assert run_curate(*args) == 0
    return out, args


def test_dedup_finds_the_labelled_duplicates(hygiene, curated):
    """Precision and recall >= 0.95 on the world's labelled pairs (a copy and the image it copies)."""
    world, folders, _ = hygiene
    out, _ = curated
    table = read_table(os.path.join(out, "curation.parquet"), CURATION).to_pylist()
    uid_of = uids(folders["train"])
    val_uid = uids(folders["val"])
    by_file = {r["file"]: r for split in ("train", "val") for r in world.samples(split)}
    row_of = {k: by_file[f"images/train/{int(u.split('-')[1]):06d}.jpg"] for k, u in uid_of.items()}

    def root(row) -> str:
        return row["duplicate_of"] or row["file"]

    labelled = [r for r in table if row_of[r["key"]]["kind"] == "duplicate"]
    assert len(labelled) >= 30
    found, flagged, right = 0, 0, 0
    for r in table:
        truth = row_of[r["key"]]
        if r["reason"] in ("exact_duplicate", "near_duplicate"):
            flagged += 1
            right += root(row_of[r["duplicate_of"]]) == root(truth)
        elif r["reason"] == "eval_duplicate":
            flagged += 1
            shard, key = r["duplicate_of"].split("/")
            right += root(by_file[f"images/val/{int(val_uid[key].split('-')[1]):06d}.jpg"]) == root(truth)  # val has copies too
    for r in labelled:  # found: the copy is dropped as a duplicate of its source, or its source as one of it
        truth = row_of[r["key"]]
        partners = [t for t in table if root(row_of[t["key"]]) == root(truth)]
        if truth["duplicate_of"].startswith("images/val/"):
            found += r["reason"] == "eval_duplicate"
        else:
            found += sum(t["reason"] in ("exact_duplicate", "near_duplicate") for t in partners) == len(partners) - 1
    precision, recall = right / flagged, found / len(labelled)
    transforms = Counter(row_of[r["key"]]["transform"] for r in labelled)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, transforms)
    assert {"exact", "reencode", "resize", "crop"} <= set(transforms)
    reasons = Counter(r["reason"] for r in table)
    assert reasons["exact_duplicate"] >= 1 and reasons["eval_duplicate"] >= 1


def test_clip_filter_drops_mismatches_more_often(hygiene, curated):
    world, folders, _ = hygiene
    out, _ = curated
    table = read_table(os.path.join(out, "curation.parquet"), CURATION).to_pylist()
    uid_of = uids(folders["train"])
    kind = {k: world.samples("train")[int(u.split("-")[1])]["kind"] for k, u in uid_of.items()}
    scored = [r for r in table if r["clip_score"] is not None]
    mismatch = [r for r in scored if kind[r["key"]] == "mismatch"]
    match = [r for r in scored if kind[r["key"]] != "mismatch"]
    assert len(mismatch) >= 15
    drop = {name: np.mean([r["reason"] == "below_top_fraction" for r in rows]) for name, rows in (("mismatch", mismatch), ("match", match))}
    assert drop["mismatch"] >= 0.5 and drop["match"] <= 0.1, drop
    assert np.mean([r["clip_score"] for r in mismatch]) < np.mean([r["clip_score"] for r in match])


def test_clip_scores_do_not_depend_on_decode_threads(hygiene):
    """The actor's decode pool: 1 or 3 threads, a batch size that leaves a short last batch, the same
    scores in the same order, equal to the model's own cosine of each image with its caption."""
    import open_clip
    import torch
    from PIL import Image

    world, folders, clip = hygiene
    shard = find_shards(folders["train"])[0]
    with tarfile.open(shard.tar) as tar:
        keys = sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})[:23]
    assert len(keys) == 23
    tables = [curate.ClipScorer(clip, None, None, batch_size=5, threads=threads).score_shard(shard.tar, keys) for threads in (1, 3)]
    assert tables[0].equals(tables[1])
    assert tables[0]["key"].to_pylist() == keys
    model, _, preprocess = open_clip.create_model_and_transforms(clip)
    with tarfile.open(shard.tar) as tar:
        first = keys[0]
        image = Image.open(tar.extractfile(f"{first}.jpg")).convert("RGB")
        lines = [line for line in tar.extractfile(f"{first}.txt").read().decode().split("\n") if line.strip()]
    with torch.no_grad():
        a = model.encode_image(preprocess(image)[None], normalize=True)
        b = model.encode_text(open_clip.get_tokenizer(clip)(lines), normalize=True)
    assert tables[0]["clip_score"][0].as_py() == pytest.approx(float((a * b).sum(-1).mean()), abs=1e-5)


def test_classifier_drops_what_it_flags(hygiene, curated):
    world, folders, _ = hygiene
    out, _ = curated
    table = read_table(os.path.join(out, "curation.parquet"), CURATION).to_pylist()
    uid_of = uids(folders["train"])
    scene = {k: world.samples("train")[int(u.split("-")[1])]["scene"] for k, u in uid_of.items()}
    flagged = [r for r in table if r["reason"] == "classifier"]
    assert len(flagged) >= 5
    assert np.mean([scene[r["key"]] == "snow" for r in flagged]) >= 0.8  # the tiny classifier built here finds snow
    summary = json.load(open(os.path.join(out, "curate_summary.json")))
    assert summary["dropped"]["classifier"] == len(flagged)


def test_curated_shards_are_read_like_ingested_ones(hygiene, curated):
    _, folders, _ = hygiene
    out, _ = curated
    table = read_table(os.path.join(out, "curation.parquet"), CURATION)
    keys = table["key"].to_pylist()
    assert sorted(keys) == sorted(tar_keys(folders["train"])) and len(set(keys)) == len(keys)  # every input sample once
    kept = sorted(k for k, ok in zip(keys, table["kept"].to_pylist()) if ok)
    assert sorted(tar_keys(out)) == kept  # every kept sample once in the output, nothing else
    for shard in find_shards(out):
        shard_keys, captions = read_shard(shard)  # the labels job's own reader and its checks
        assert len(shard_keys) == len(captions)
        assert index_tar(shard.tar).keys == sorted(shard_keys), shard.name  # key order, whatever the input's order
    manifest = read_table(os.path.join(out, "manifest.parquet"), SHARD_MANIFEST)
    assert sum(manifest["successes"].to_pylist()) == len(kept) and sum(manifest["samples"].to_pylist()) == len(keys)
    png = open(os.path.join(out, "clip_scores.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    clip_in_parquet = pq.read_table(os.path.join(out, find_shards(out)[0].name + ".parquet"), columns=["key", "clip_score"])
    assert all(s is not None for s in clip_in_parquet["clip_score"].to_pylist())


def test_resume_and_worker_death_give_the_same_result(hygiene, curated, tmp_path):
    """A CLIP actor SIGKILLed right after writing a shard's scores (once), then a re-run that finds one output
    shard missing: the same curation, every sample exactly once. A changed setting on the output is refused."""
    import ray

    _, folders, _ = hygiene
    first, args = curated
    marker = str(tmp_path / "killed")

    class DiesAfterItsFirstShard(curate.ClipScorer):
        def __call__(self, batch):
            out = super().__call__(batch)
            if not os.path.exists(marker):  # once: the restarted actor lives
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return out

    out = str(tmp_path / "again")
    cfg = curate_job.parse(curate_job.CurateConfig, [*args[:2], "--output", out, *args[4:]], prog="t", description=None)
    settings = cfg.settings(1, 0.0)
    found, exclude = find_shards(folders["train"]), find_shards(folders["val"])
    assert ray.is_initialized()
    result = curate.curate(found, out, settings, exclude=exclude, scorer_cls=DiesAfterItsFirstShard)
    assert os.path.exists(marker), "the scorer was never killed"
    want = read_table(os.path.join(first, "curation.parquet"), CURATION)
    assert result.table.equals(want.select(result.table.column_names).cast(result.table.schema))
    assert sorted(tar_keys(out)) == sorted(tar_keys(first))
    tars = lambda folder: {s.name: open(s.tar, "rb").read() for s in find_shards(folder)}  # noqa: E731
    assert tars(out) == tars(first)  # byte for byte: the same samples in the same (key) order

    name = found[1].name  # as if a crash came before this shard's output was complete
    os.remove(os.path.join(first, f"{name}{curate.STATS_SUFFIX}"))
    os.remove(os.path.join(first, f"{name}.tar"))
    before = {p: open(os.path.join(first, p), "rb").read() for p in os.listdir(first) if p.endswith(".tar")}
    assert run_curate(*args) == 0
    assert sorted(tar_keys(first)) == sorted(tar_keys(out))
    assert all(open(os.path.join(first, p), "rb").read() == data for p, data in before.items())
    assert read_table(os.path.join(first, "curation.parquet"), CURATION).equals(want)
    assert run_curate(*[a if a != "0.85" else "0.5" for a in args]) == 2  # another --top-fraction on this output
