"""The labels stage: shard reading, the Ray stage on a plain batch, atomic output, and the job via `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from jobs._cli import SUBMITTED
from pipeline import labels
from pipeline.shards import Shard, ShardReadError, find_shards
from schemas import LABEL_TABLE, VOCAB
from schemas.validate import read_table, validate

LONG_CAPTION = "a red circle on the table " * 4000 + "and a zebra"  # 104k characters
# the tar-only shard of bad captions: (key, members), with the kind each caption is counted as
BAD_CAPTIONS = [
    ("b00", {"txt": "a dog and two cats on a sofa"}, None),
    ("b01", {"txt": ""}, "empty"),
    ("b02", {"txt": "   "}, "whitespace"),
    ("b03", {}, "null"),  # a sample with an image and no caption
    ("b04", {"json": {"caption": None}}, "null"),
    ("b05", {"json": {"caption": "a cup on a wooden table"}}, None),  # json when there is no txt
    ("b06", {"txt": "Ein Hund auf dem Tisch"}, "non_english"),
    ("b07", {"txt": "😀😀😀"}, "no_words"),
    ("b08", {"txt": LONG_CAPTION}, None),
]
BAD_CAPTION_LABELS = {"b00": ["dog", "cat", "sofa"], "b05": ["cup", "table"], "b08": ["circle", "table"]}


def write_tar(path: str, samples: list[tuple[str, dict]]) -> str:
    with wds.TarWriter(path) as sink:
        for key, members in samples:
            sink.write({"__key__": key, "jpg": b"\xff\xd8 not decoded \xff\xd9", **members})
    return path


def truncate(path: str, fraction: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def copy_shard(src_folder: str, name: str, dest_folder: str, new_name: str | None = None) -> None:
    for ext in (".tar", ".parquet"):
        shutil.copyfile(os.path.join(src_folder, name + ext), os.path.join(dest_folder, (new_name or name) + ext))


@pytest.fixture(scope="module")
def job_shards(shards, tmp_path_factory) -> str:
    """The world's train shards 00000-00002 (tar + parquet), plus:

    00003  a tar without parquet holding every kind of bad caption
    00004  a copy of 00000 with its tar cut in half (its parquet intact)
    00005  a shard where every download failed: an empty tar, a parquet without success rows
    manifest.parquet, which is not a shard
    """
    folder = str(tmp_path_factory.mktemp("job_shards"))
    for name in ("00000", "00001", "00002"):
        copy_shard(shards["train"], name, folder)
    write_tar(os.path.join(folder, "00003.tar"), [(k, m) for k, m, _ in BAD_CAPTIONS])
    copy_shard(shards["train"], "00000", folder, "00004")
    truncate(os.path.join(folder, "00004.tar"))
    write_tar(os.path.join(folder, "00005.tar"), [])
    pq.write_table(pa.table({"key": ["0000500"], "caption": ["a dog"], "status": ["failed_to_download"]}), os.path.join(folder, "00005.parquet"))
    pq.write_table(pa.table({"shard": ["00000.tar"]}), os.path.join(folder, "manifest.parquet"))
    return folder


# ----------------------------------------------------------------------------- reading


def test_find_shards(job_shards, tmp_path):
    found = find_shards(job_shards)
    assert [s.name for s in found] == ["00000", "00001", "00002", "00003", "00004", "00005"]
    assert found[3].parquet is None and found[0].parquet.endswith("00000.parquet")
    shutil.copyfile(os.path.join(job_shards, "00000.parquet"), tmp_path / "00007.parquet")
    assert find_shards(str(tmp_path)) == [Shard("00007", None, str(tmp_path / "00007.parquet"))]
    with pytest.raises(ShardReadError, match="00007.tar is missing"):
        labels.read_shard(find_shards(str(tmp_path))[0])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_shards(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no webdataset shard"):
        find_shards(str(empty))


def test_parquet_and_tar_give_the_same_captions(shards):
    folder = shards["train"]
    name = "00001"
    keys, captions = labels.read_shard(Shard(name, os.path.join(folder, name + ".tar"), os.path.join(folder, name + ".parquet")))
    from_tar = labels.read_shard(Shard(name, os.path.join(folder, name + ".tar"), None))
    assert (keys, captions) == from_tar
    status = pq.read_table(os.path.join(folder, name + ".parquet")).to_pylist()
    assert keys == sorted(r["key"] for r in status if r["status"] == "success")
    assert len(keys) < len(status)  # the world's bad rows were not downloaded: not in the tar, not labelled


def test_bad_caption_tar_is_read(job_shards):
    keys, captions = labels.read_tar_captions(os.path.join(job_shards, "00003.tar"))
    assert keys == [k for k, _, _ in BAD_CAPTIONS]
    assert captions[3] is None and captions[4] is None
    assert captions[5] == "a cup on a wooden table" and captions[8] == LONG_CAPTION


def test_unreadable_shards_are_reported(job_shards, tmp_path):
    src = os.path.join(job_shards, "00000")
    with pytest.raises(ShardReadError, match="truncated"):
        labels.read_shard(Shard("00004", os.path.join(job_shards, "00004.tar"), os.path.join(job_shards, "00004.parquet")))
    with pytest.raises(ShardReadError, match="00004.tar"):
        labels.read_shard(Shard("00004", os.path.join(job_shards, "00004.tar"), None))
    bad_parquet = tmp_path / "00008.parquet"
    bad_parquet.write_bytes(open(src + ".parquet", "rb").read()[:100])
    with pytest.raises(ShardReadError, match="cannot read parquet"):
        labels.read_shard(Shard("00008", src + ".tar", str(bad_parquet)))
    other = os.path.join(job_shards, "00001.parquet")
    with pytest.raises(ShardReadError, match="success rows but"):
        labels.read_shard(Shard("00000", src + ".tar", other))
    garbage = tmp_path / "00009.tar"
    garbage.write_bytes(b"this is not a tar archive" * 50)
    with pytest.raises(ShardReadError, match="00009.tar"):
        labels.read_shard(Shard("00009", str(garbage), None))


def test_a_curated_tar_only_shard_takes_its_captions_from_the_tar(tmp_path):
    """Curation writes a parquet of key, status and scores beside a shard that had none: its captions are the tar's."""
    from pipeline import curate

    src, out = tmp_path / "src", tmp_path / "curated"
    src.mkdir()
    out.mkdir()
    samples = [
        ("k0", {"txt": "two mice on a table"}),
        ("k1", {"json": {"caption": "a dog on a sofa"}}),
        ("k2", {}),
        ("k3", {"txt": "a cat on a bench"}),  # dropped by curation
    ]
    tar = write_tar(str(src / "00000.tar"), samples)
    curate.write_shard(tar, None, ["k0", "k1", "k2"], {"k0": 0.3, "k1": 0.2, "k2": None}, str(out), "00000")
    assert pq.read_schema(out / "00000.parquet").names == ["key", "status", "clip_score"]
    (shard,) = find_shards(str(out))
    assert shard.parquet is not None
    assert labels.read_shard(shard) == (["k0", "k1", "k2"], ["two mice on a table", "a dog on a sofa", None])

    folder = tmp_path / "labels"
    folder.mkdir()
    stage = labels.LabelShards(str(folder), labels.LabelSettings("spacy"))
    error, stats = stage.label_shard(shard)
    assert error is None and stats["captions"] == 3
    assert [(r["key"], r["caption"], r["labels"]) for r in read_table(folder / "00000.parquet", LABEL_TABLE).to_pylist()] == [
        ("k0", "two mice on a table", ["mouse", "table"]),
        ("k1", "a dog on a sofa", ["dog", "sofa"]),
        ("k2", None, []),
    ]
    # its keys are still checked against the tar
    pq.write_table(pa.table({"key": ["k0", "k1", "k2", "k9"], "status": ["success"] * 4}), out / "00000.parquet")
    with pytest.raises(ShardReadError, match=r"4 success rows but 3 samples .*\(k9 is not in the tar\)"):
        labels.read_shard(shard)
    pq.write_table(pa.table({"key": ["k0"], "clip_score": [0.3]}), out / "00000.parquet")
    with pytest.raises(ShardReadError, match="no column 'status'"):
        labels.read_shard(shard)


def test_check_stage_reports_errors_as_rows(job_shards):
    specs = pa.Table.from_pylist(
        [{"shard": s.name, "tar": s.tar or "", "parquet": s.parquet or ""} for s in find_shards(job_shards)]
    )
    checked = labels.check_shards_batch(specs)
    assert checked["shard"].to_pylist() == specs["shard"].to_pylist()
    errors = dict(zip(checked["shard"].to_pylist(), checked["error"].to_pylist()))
    assert [name for name, e in errors.items() if e] == ["00004"] and "truncated" in errors["00004"]


# ----------------------------------------------------------------------------- the stage on a plain batch


def test_label_stage_reads_tags_and_writes_each_shard(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    write_tar(str(src / "00001.tar"), [("k2", {"txt": "a stock image of leaves"}), ("k0", {"txt": "two mice on a table"}), ("k1", {})])
    write_tar(str(src / "00002.tar"), [("k5", {"txt": "a dog"})])
    truncate(str(src / "00002.tar"), 0.1)  # inside the first sample (a tar is padded to 10 KiB)
    write_tar(str(src / "00003.tar"), [("k9", {"txt": "😀"})])
    write_tar(str(src / "00004.tar"), [])
    out = tmp_path / "out"
    out.mkdir()
    # batch_size 2: the first shard's three captions go through the extractor in two calls, in key order
    stage = labels.LabelShards(str(out), labels.LabelSettings("spacy", batch_size=2))
    specs = pa.Table.from_pylist([{"shard": s.name, "tar": s.tar, "parquet": ""} for s in find_shards(str(src))])
    result = stage(specs)
    assert result["shard"].to_pylist() == ["00001", "00002", "00003", "00004"]
    errors = result["error"].to_pylist()
    assert errors[0] is None and "00002.tar" in errors[1] and errors[2:] == [None, None]
    assert sorted(os.listdir(out)) == ["00001.parquet", "00003.parquet", "00004.parquet"]  # nothing for the bad shard
    assert read_table(out / "00001.parquet", LABEL_TABLE).to_pylist() == [
        {"key": "k0", "shard": "00001", "caption": "two mice on a table", "labels": ["mouse", "table"], "extractor": "spacy"},
        {"key": "k1", "shard": "00001", "caption": None, "labels": [], "extractor": "spacy"},
        {"key": "k2", "shard": "00001", "caption": "a stock image of leaves", "labels": ["leaf"], "extractor": "spacy"},
    ]
    assert read_table(out / "00004.parquet", LABEL_TABLE).num_rows == 0
    stats = [json.loads(x) for x in result["stats"].to_pylist()]
    assert [st.get("captions") for st in stats] == [3, None, 1, 0]
    assert stats[0]["label_counts"] == {"mouse": 1, "table": 1, "leaf": 1}
    assert stats[0]["bad_input"] == {"null": 1} and stats[2]["bad_input"] == {"no_words": 1}
    with pytest.raises(ValueError, match="2 keys but 1 captions"):
        stage.label_table("00005", ["a", "b"], ["a dog"])


def test_write_shard_and_merge_stats(tmp_path):
    rows = pa.Table.from_pylist(
        [
            {"key": "2", "shard": "00003", "caption": "a cat", "labels": ["cat"], "extractor": "spacy"},
            {"key": "1", "shard": "00003", "caption": "a dog and a cat", "labels": ["dog", "cat"], "extractor": "spacy"},
            {"key": "3", "shard": "00003", "caption": "", "labels": [], "extractor": "spacy"},
        ],
        schema=LABEL_TABLE,
    )
    stats = labels.write_shard(rows, str(tmp_path), "00003")
    with pytest.raises(ValueError, match="rows of shard"):
        labels.write_shard(rows, str(tmp_path), "00004")
    written = read_table(tmp_path / "00003.parquet", LABEL_TABLE)
    assert written["key"].to_pylist() == ["1", "2", "3"]
    vocab, summary = labels.merge_stats({"00003": stats})
    validate(vocab, VOCAB)
    assert vocab.to_pylist() == [
        {"label": "cat", "count": 2, "document_frequency": 2 / 3},
        {"label": "dog", "count": 1, "document_frequency": 1 / 3},
    ]
    assert summary["captions"] == 3 and summary["with_labels"] == 2 and summary["without_labels"] == 1
    assert summary["labels_per_caption"] == {"0": 1, "1": 1, "2": 1}
    assert summary["bad_input"]["empty"] == 1


def test_a_label_repeated_in_a_caption_counts_once():
    """--protocol reference keeps a lemma twice ("a dog and two dogs" -> dog, dog); the vocabulary counts captions."""
    rows = pa.Table.from_pylist(
        [
            {"key": "1", "shard": "00000", "caption": "a dog and two dogs", "labels": ["dog", "dog"], "extractor": "nltk"},
            {"key": "2", "shard": "00000", "caption": "a cat", "labels": ["cat"], "extractor": "nltk"},
        ],
        schema=LABEL_TABLE,
    )
    stats = labels.shard_stats(rows)
    assert stats["label_counts"] == {"dog": 1, "cat": 1}
    vocab, _ = labels.merge_stats({"00000": stats})
    assert vocab.to_pylist() == [
        {"label": "cat", "count": 1, "document_frequency": 0.5},
        {"label": "dog", "count": 1, "document_frequency": 0.5},
    ]


# ----------------------------------------------------------------------------- atomic output


def test_staged_output_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crash"):
        with labels.staged_output(str(out)) as staging:
            (open(os.path.join(staging, "half.parquet"), "w")).write("x")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []  # neither the output nor the temporary folder
    with labels.staged_output(str(out)) as staging:
        os.mkdir(os.path.join(staging, labels.LABELS_DIR))
        open(os.path.join(staging, labels.SUMMARY_FILE), "w").write("{}")
        assert not out.exists()
    assert labels.is_labels_output(str(out)) and os.listdir(tmp_path) == ["out"]
    with labels.staged_output(str(out)) as staging:  # a previous labels output is replaced
        os.mkdir(os.path.join(staging, labels.LABELS_DIR))
        open(os.path.join(staging, labels.SUMMARY_FILE), "w").write('{"second": 1}')
    assert json.load(open(out / labels.SUMMARY_FILE)) == {"second": 1} and os.listdir(tmp_path) == ["out"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a labels output"):
        with labels.staged_output(str(precious)):
            pass
    assert (precious / "data.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- the job's arguments


def test_job_rejects_missing_and_relative_paths(tmp_path, monkeypatch, capsys):
    from jobs import labels as job

    assert job.main(["--shards", str(tmp_path / "absent"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "absent: no such folder" in err and "resolved where the job runs" in err
    monkeypatch.setenv(SUBMITTED, "{}")
    assert job.main(["--shards", "data/cc3m", "--output", str(tmp_path / "out")]) == 2
    assert "absolute path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        job.main(["--shards", str(tmp_path), "--output", str(tmp_path / "o"), "--batch-size", "0"])
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_job_names_the_missing_nltk_tagger_before_starting_ray(job_shards, tmp_path, monkeypatch, capsys):
    import nltk

    from jobs import labels as job

    wordnet_root = os.path.dirname(os.path.dirname(nltk.data.find("corpora/wordnet")))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), wordnet_root])
    argv = ["--shards", job_shards, "--output", str(tmp_path / "out"), "--extractor", "nltk", "--nltk-data", str(tmp_path)]
    assert job.main(argv) == 1
    assert "averaged_perceptron_tagger_eng" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_job_names_a_missing_spacy_model_before_starting_ray(tmp_path, monkeypatch, capsys):
    from jobs import labels as job

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(str(shards / "00000.tar"), [("k0", {"txt": "a dog"})])
    monkeypatch.chdir(tmp_path)
    base = ["--shards", str(shards), "--output", str(tmp_path / "out")]
    for name, said in (
        ("./models/en_core_web_sm-3.7.1", f"spaCy model folder {tmp_path}/models/en_core_web_sm-3.7.1 does not exist"),  # resolved like the other paths
        ("/opt/x-3.7.1", "spaCy model folder /opt/x-3.7.1 does not exist"),
        ("en_core_web_sm.missing", "spaCy model en_core_web_sm.missing is not installed"),
    ):
        assert job.main([*base, "--spacy-model", name]) == 1
        err = capsys.readouterr().err
        assert f"error: {said}" in err and "Traceback" not in err, err
    monkeypatch.setenv(SUBMITTED, "{}")
    assert job.main([*base, "--spacy-model", "./models/en_core_web_sm-3.7.1"]) == 2
    assert "--spacy-model ./models/en_core_web_sm-3.7.1 is relative" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the job on a real Ray head


def _submit(ray_head, repo_root, shards: str, output: str, *extra: str):
    cmd = ["python", "-m", "jobs.labels", "--shards", shards, "--output", output, "--concurrency", "2", "--batch-size", "16", *extra]
    return ray_head.submit(cmd, working_dir=repo_root, timeout=300)


def _outputs(folder: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


@pytest.mark.cluster
def test_job_fails_naming_every_bad_shard(ray_head, repo_root, job_shards, tmp_path):
    # a second bad shard, last in order: the job stops at the first it meets, then checks the rest
    shards = tmp_path / "shards"
    shutil.copytree(job_shards, shards)
    copy_shard(job_shards, "00001", str(shards), "00099")
    truncate(str(shards / "00099.tar"), 0.3)
    out = tmp_path / "labels_out"
    result = _submit(ray_head, repo_root, str(shards), str(out))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "2 shard(s) cannot be read: 00004:" in log and "; 00099: " in log and "--skip-bad-shards" in log, log[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # nothing written, no temporary folder left behind


@pytest.fixture(scope="module")
def skipped_run(ray_head, repo_root, job_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "labels_out")
    result = _submit(ray_head, repo_root, job_shards, out, "--skip-bad-shards")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return out, result.stdout + result.stderr


@pytest.mark.cluster
def test_job_with_skip_bad_shards_writes_every_good_shard(skipped_run, job_shards, world):
    out, log = skipped_run
    assert sorted(os.listdir(out)) == ["config.json", "labels", "summary.json", "vocab.parquet"]
    assert sorted(os.listdir(os.path.join(out, "labels"))) == [f"{n}.parquet" for n in ("00000", "00001", "00002", "00003", "00005")]
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]

    tables = {n: read_table(os.path.join(out, "labels", f"{n}.parquet"), LABEL_TABLE) for n in ("00000", "00001", "00002", "00003", "00005")}
    for name, table in tables.items():
        keys = table["key"].to_pylist()
        assert keys == sorted(keys) and set(table["shard"].to_pylist()) <= {name}
        assert set(table["extractor"].to_pylist()) <= {"spacy"}
        assert keys == labels.read_tar_keys(os.path.join(job_shards, f"{name}.tar"))  # one row per sample in the tar
    assert tables["00005"].num_rows == 0

    truth = {s["caption"].split("\n")[0]: s["labels"] for s in world.samples("train")}
    world_rows = [r for n in ("00000", "00001", "00002") for r in tables[n].to_pylist()]
    assert len(world_rows) > 40
    for row in world_rows:
        expected = [] if not row["caption"].strip() else sorted(truth[row["caption"]])
        assert sorted(row["labels"]) == expected, row
    crafted = {r["key"]: r for r in tables["00003"].to_pylist()}
    assert {k: r["labels"] for k, r in crafted.items() if r["labels"]} == BAD_CAPTION_LABELS
    assert crafted["b08"]["caption"] == LONG_CAPTION  # stored whole, labelled from its first MAX_CAPTION_CHARS

    summary = json.load(open(os.path.join(out, "summary.json")))
    world_empty = sum(r["caption"] == "" for r in world_rows)
    world_blank = sum(r["caption"] != "" and not r["caption"].strip() for r in world_rows)
    assert world_empty + world_blank > 0
    assert summary["bad_input"] == {
        "null": 2,
        "empty": world_empty + 1,
        "whitespace": world_blank + 1,
        "no_words": 1,
        "non_english": 1,
    }
    assert summary["truncated"] == 1
    assert summary["captions"] == len(world_rows) + len(BAD_CAPTIONS)
    assert summary["with_labels"] == sum(bool(r["labels"]) for t in tables.values() for r in t.to_pylist())
    assert (summary["shards"], summary["shards_written"], summary["shards_skipped"]) == (6, 5, 1)
    assert summary["skipped_shards"][0]["shard"] == "00004" and "truncated" in summary["skipped_shards"][0]["reason"]

    vocab = read_table(os.path.join(out, "vocab.parquet"), VOCAB).to_pylist()
    counts: dict[str, int] = {}
    for table in tables.values():
        for ls in table["labels"].to_pylist():
            for label in ls:
                counts[label] = counts.get(label, 0) + 1
    assert [(v["label"], v["count"]) for v in vocab] == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert all(v["document_frequency"] == v["count"] / summary["captions"] for v in vocab)
    assert summary["top_labels"][0] == [vocab[0]["label"], vocab[0]["count"]]

    config = json.load(open(os.path.join(out, "config.json")))
    assert config["shards"] == job_shards and config["skip_bad_shards"] and config["concurrency"] == 2
    assert "skipping shard 00004" in log and "bad input: null 2" in log and "labels per caption" in log


@pytest.mark.cluster
def test_rerun_writes_identical_files(skipped_run, ray_head, repo_root, job_shards):
    out, _ = skipped_run
    before = _outputs(out)
    result = _submit(ray_head, repo_root, job_shards, out, "--skip-bad-shards")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    after = _outputs(out)
    assert sorted(after) == sorted(before)
    assert [name for name in before if before[name] != after[name]] == []
