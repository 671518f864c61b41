"""Source adapters, filters and subset selection (pipeline/sources.py), on the synthetic world's real files."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources
from schemas import URL_TABLE, validate


def _tsv_caption(sample: dict) -> str:
    """The caption as the world's tsv holds it: the first line, a tab (the column separator) as a space."""
    return sample["caption"].split("\n")[0].replace("\t", " ")


def _clean(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def test_tsv_without_header_keys_urls_captions(served_world):
    world, base_url, paths = served_world
    rows = sources.read_tsv(paths["train"]["cc3m"], "train")
    validate(rows.table, URL_TABLE)
    samples = world.samples("train")
    assert rows.rows_read == len(samples) and not rows.skipped
    got = rows.table.to_pylist()
    assert [r["key"] for r in got] == [f"cc3m-{s['index']:09d}" for s in samples]
    assert [r["url"] for r in got] == [f"{base_url}/{s['file']}" for s in samples]
    assert [r["caption"] for r in got] == [_tsv_caption(s) for s in samples]
    assert {r["source"] for r in got} == {"cc3m"} and {r["split"] for r in got} == {"train"}
    again = sources.read_tsv(paths["train"]["cc3m"], "train")
    assert again.table.equals(rows.table)


def test_tsv_header_cc12m_layout_and_malformed_rows(served_world, tmp_path):
    _, _, paths = served_world
    with open(paths["train"]["cc3m"]) as f:
        lines = f.read().splitlines()
    plain = sources.read_tsv(paths["train"]["cc3m"], "train")

    with_header = tmp_path / "with_header.tsv"
    with_header.write_text("caption\turl\n" + "\n".join(lines) + "\n")
    assert sources.read_tsv(str(with_header), "train").table.equals(plain.table)

    url_first = tmp_path / "cc12m.tsv"  # CC12M writes url<TAB>caption
    url_first.write_text("\n".join("\t".join(reversed(line.split("\t"))) for line in lines) + "\n")
    cc12m = sources.read_tsv(str(url_first), "train", source="cc12m").table
    assert cc12m.column("url").equals(plain.table.column("url"))
    assert cc12m.column("caption").equals(plain.table.column("caption"))
    assert cc12m.column("key")[0].as_py() == "cc12m-000000000"

    broken = tmp_path / "broken.tsv"
    broken.write_text(lines[0] + "\n" + "no tab on this line\n" + "\n" + lines[3] + "\n")
    rows = sources.read_tsv(str(broken), "train")
    assert rows.skipped == {"malformed_row": 2}
    assert f"{broken}:2:" in rows.examples["malformed_row"]
    # keys come from the data line, so a bad line never shifts the keys after it
    assert rows.table.column("key").to_pylist() == ["cc3m-000000000", "cc3m-000000003"]

    bad_header = tmp_path / "bad_header.tsv"
    bad_header.write_text("foo\tbar\n" + lines[0] + "\n")
    with pytest.raises(sources.SourceError, match="bad_header.tsv:1: header"):
        sources.read_tsv(str(bad_header), "train")
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        sources.read_tsv(str(tmp_path / "missing.tsv"), "train")


def test_coco_joins_all_captions_of_an_image(served_world):
    world, base_url, paths = served_world
    rows = sources.read_coco(paths["val"]["coco"], "val")
    validate(rows.table, URL_TABLE)
    samples = world.samples("val")
    got = rows.table.to_pylist()
    assert [r["key"] for r in got] == [f"coco-{100000 + s['index']}" for s in samples]
    assert [r["url"] for r in got] == [f"{base_url}/{s['file']}" for s in samples]
    assert [r["caption"] for r in got] == [s["caption"] for s in samples]  # all captions, "\n"-joined
    assert any(r["caption"].count("\n") >= 2 for r in got)


def test_coco_images_dir_gives_local_paths_inside_the_folder(served_world, tmp_path):
    world, _, paths = served_world
    images = os.path.join(world.root, "images", "val")
    rows = sources.read_coco(paths["val"]["coco"], "val", images_dir=images)
    samples = world.samples("val")
    assert rows.table.column("url").to_pylist() == [os.path.join(world.root, s["file"]) for s in samples]

    with open(paths["val"]["coco"]) as f:
        coco = json.load(f)
    coco["images"][0]["file_name"] = "../../../../../../etc/passwd"
    coco["images"][1]["file_name"] = "/etc/hostname"
    hostile = tmp_path / "hostile.json"
    hostile.write_text(json.dumps(coco))
    rows = sources.read_coco(str(hostile), "val", images_dir=images)
    assert rows.skipped == {"outside_images_dir": 2}
    assert all(u.startswith(images + os.sep) for u in rows.table.column("url").to_pylist())

    with pytest.raises(sources.SourceError, match="not a COCO captions file"):
        (tmp_path / "list.json").write_text("[]")
        sources.read_coco(str(tmp_path / "list.json"), "val")


def test_laion_filters_are_counted(served_world, tmp_path):
    _, _, paths = served_world
    path = paths["train"]["laion"]
    raw = pq.read_table(path).to_pylist()
    threshold = sorted(r["similarity"] for r in raw)[len(raw) // 2]
    rows = sources.read_laion(path, "train", min_similarity=threshold)
    low = sum(r["similarity"] < threshold for r in raw)
    assert low > 0 and rows.skipped == {"low_similarity": low}
    assert rows.table.num_rows == len(raw) - low
    kept = {int(k.split("-")[1]) for k in rows.table.column("key").to_pylist()}
    assert kept == {i for i, r in enumerate(raw) if r["similarity"] >= threshold}  # keys are row numbers

    assert sources.read_laion(path, "train", min_width=256, min_height=256).table.num_rows == len(raw)
    assert sources.read_laion(path, "train", min_width=257).skipped == {"too_small": len(raw)}

    mixed = tmp_path / "sizes.parquet"
    pq.write_table(pa.table({"URL": ["http://127.0.0.1/a", "http://127.0.0.1/b", "http://127.0.0.1/c"], "TEXT": ["a", "b", "c"], "WIDTH": [100, None, 300], "HEIGHT": [300, None, 300]}), mixed)
    rows = sources.read_laion(str(mixed), "train", min_width=200, min_height=200)
    assert rows.skipped == {"too_small": 1} and rows.table.column("key").to_pylist() == ["laion-000000001", "laion-000000002"]
    with pytest.raises(sources.SourceError, match="no similarity column"):
        sources.read_laion(str(mixed), "train", min_similarity=0.3)


def test_openimages_narratives_joined_per_image(served_world, tmp_path):
    world, base_url, paths = served_world
    rows = sources.read_openimages(paths["val"]["openimages"], paths["val"]["openimages_urls"], "val")
    validate(rows.table, URL_TABLE)
    samples = world.samples("val")
    got = rows.table.to_pylist()
    assert [r["key"] for r in got] == [f"openimages-{s['index']:016x}" for s in samples]
    assert [r["url"] for r in got] == [f"{base_url}/{s['file']}" for s in samples]
    assert [r["caption"] for r in got] == ["\n".join(s["caption"].split("\n")[:2]) for s in samples]

    extra = tmp_path / "narratives.jsonl"
    with open(paths["val"]["openimages"]) as f:
        text = f.read()
    extra.write_text(text + json.dumps({"image_id": "ffffffffffffffff", "caption": "x"}) + "\n" + "{not json\n")
    rows = sources.read_openimages(str(extra), paths["val"]["openimages_urls"], "val")
    assert rows.skipped == {"no_url": 1, "malformed_row": 1}
    assert rows.table.num_rows == len(samples)

    bad_map = tmp_path / "map.csv"
    bad_map.write_text("ImageID,Thumbnail300KURL\nx,http://127.0.0.1/x\n")
    with pytest.raises(sources.SourceError, match="ImageID and OriginalURL"):
        sources.read_openimages(paths["val"]["openimages"], str(bad_map), "val")


def _table(rows: list[tuple[str, str | None, str | None]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"key": k, "url": u, "caption": c, "source": "cc3m", "split": "train"} for k, u, c in rows], schema=URL_TABLE
    )


def test_filter_urls_reasons_and_caption_cleanup():
    table = _table(
        [
            ("k0", "http://127.0.0.1:8000/a.jpg", "  a  red\tcircle  "),
            ("k1", "file:///etc/passwd", "a local file"),
            ("k2", "FILE:///home/user/image.jpg", "a local file"),
            ("k3", "ftp://127.0.0.1/a.jpg", "ftp"),
            ("k4", "javascript:alert(1)", "js"),
            ("k5", "", "no url"),
            ("k6", "http://dstormer6em3i4km.onion.link/b.jpg", "tor gateway"),
            ("k7", "http://abcdefghijklmnop.onion/c.jpg", "onion"),
            ("k8", "https://img.tracker.example/d.jpg", "subdomain of a blocked host"),
            ("k9", "https://127.0.0.1:8000/ads/e.jpg", "blocked URL pattern"),
            ("k10", "http://127.0.0.1:8000/f.jpg", " \t "),
            ("k11", "http://127.0.0.1:8000/g.jpg", None),
            ("k12", "http://127.0.0.1:8000/a.jpg", "duplicate of k0"),
            ("k13", "HTTPS://127.0.0.1:8000/h.jpg", "line one \n\n   line\u00a0two  "),
        ]
    )
    blocklist = sources.Blocklist.parse(["# hosts", "tracker.example", "*/ads/*"])
    result = sources.filter_urls(table, blocklist)
    assert result.dropped == {"bad_scheme": 5, "blocklisted": 4, "empty_caption": 2, "duplicate_url": 1}
    assert result.table.column("key").to_pylist() == ["k0", "k13"]
    assert result.table.column("caption").to_pylist() == ["a red circle", "line one\nline two"]
    assert result.examples["bad_scheme"].startswith("k1 ")
    validate(result.table, URL_TABLE)


def test_filter_urls_local_mode_refuses_paths_outside_the_folder(tmp_path):
    root = str(tmp_path / "images")
    table = _table([("a", f"{root}/1.jpg", "x"), ("b", f"{root}-evil/2.jpg", "x"), ("c", "/etc/passwd", "x")])
    result = sources.filter_urls(table, local_root=root)
    assert result.dropped == {"outside_images_dir": 2}
    assert result.table.column("key").to_pylist() == ["a"]


def test_select_subset_is_reproducible_and_nested():
    table = _table([(f"cc3m-{i:09d}", f"http://127.0.0.1/{i}.jpg", "c") for i in range(2000)])
    a = sources.select_subset(table, limit=100, seed=0)
    assert a.num_rows == 100 and a.equals(sources.select_subset(table, limit=100, seed=0))
    keys = a.column("key").to_pylist()
    assert keys == sorted(keys)  # input order kept
    bigger = set(sources.select_subset(table, limit=300, seed=0).column("key").to_pylist())
    assert set(keys) <= bigger
    assert set(keys) != set(sources.select_subset(table, limit=100, seed=1).column("key").to_pylist())
    half = sources.select_subset(table, fraction=0.5, seed=0).num_rows
    assert 900 < half < 1100
    both = sources.select_subset(table, fraction=0.5, limit=10, seed=0)
    assert both.num_rows == 10
    assert set(both.column("key").to_pylist()) <= set(sources.select_subset(table, fraction=0.5, seed=0).column("key").to_pylist())
    assert sources.select_subset(table).equals(table)
