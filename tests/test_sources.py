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
    assert rows.skipped == {"malformed_row": 1} and rows.rows_read == 3  # a blank line is no row
    assert f"{broken}:2:" in rows.examples["malformed_row"]
    # keys come from the data line, so a bad or blank line never shifts the keys after it
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
    # a cc3m row holds one caption: its line breaks become spaces (labels and training read each line as a caption)
    assert result.table.column("caption").to_pylist() == ["a red circle", "line one line two"]
    assert result.examples["bad_scheme"].startswith("k1 ")
    validate(result.table, URL_TABLE)
    # rows of the sources that hold all the captions of an image keep one per line
    rows = [(f"k{i}", f"http://127.0.0.1/{i}.jpg", "line one \r\n\n   line\u00a0two  ") for i in range(4)]
    several = _table(rows).set_column(3, "source", pa.array(["coco", "openimages", "laion", "cc12m"]))
    assert sources.filter_urls(several).table.column("caption").to_pylist() == ["line one\nline two"] * 2 + ["line one line two"] * 2


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


# ----------------------------------------------------------------------------- lists as tools export them

U1, U2, U3 = "http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg", "http://127.0.0.1/c.jpg"


def _rows(rows: sources.SourceRows) -> list[tuple[str, str, str]]:
    return [(r["key"], r["url"], r["caption"]) for r in rows.table.to_pylist()]


@pytest.mark.parametrize(
    "name, data",
    [
        ("plain.tsv", f"caption\turl\na red cup\t{U1}\na star\t{U2}\n".encode()),
        ("bom_crlf.tsv", f"\ufeffcaption\turl\r\na red cup\t{U1}\r\na star\t{U2}\r\n\r\n\r\n".encode()),
        ("no_header_trailing_blank.tsv", f"a red cup\t{U1}\na star\t{U2}\n\n  \n".encode()),
        ("excel.csv", f'\ufeffURL,Caption\r\n{U1},a red cup\r\n{U2},a star\r\n'.encode()),
        ("utf16.txt", f"caption\turl\r\na red cup\t{U1}\r\na star\t{U2}\r\n".encode("utf-16")),
        ("data.tsv.gz", __import__("gzip").compress(f"caption\turl\na red cup\t{U1}\na star\t{U2}\n".encode())),
    ],
)
def test_delimited_lists_read_as_a_person_reads_them(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    rows = sources.read_tsv(str(path), "train")
    assert _rows(rows) == [("cc3m-000000000", U1, "a red cup"), ("cc3m-000000001", U2, "a star")]
    assert rows.rows_read == 2 and not rows.skipped and not rows.notes


def test_the_url_column_is_told_from_many_rows_not_a_caption_quoting_a_url(tmp_path):
    """A caption holding "http://" in the first row, a first row whose URL is empty, either layout."""
    quoting = "a cat, see http://example.com/cat"
    for name, text in (
        ("cc3m.tsv", f"{quoting}\t{U1}\na star\t{U2}\n"),
        ("cc12m.tsv", f"{U1}\t{quoting}\n{U2}\ta star\n"),
    ):
        (tmp_path / name).write_text(text)
        assert _rows(sources.read_tsv(str(tmp_path / name), "train")) == [("cc3m-000000000", U1, quoting), ("cc3m-000000001", U2, "a star")]
    (tmp_path / "empty_url.tsv").write_text(f"a red cup\t\na star\t{U2}\n")  # data, not a header: its URL is filtered downstream
    assert _rows(sources.read_tsv(str(tmp_path / "empty_url.tsv"), "train")) == [("cc3m-000000000", "", "a red cup"), ("cc3m-000000001", U2, "a star")]
    (tmp_path / "no_scheme.tsv").write_text(f"a red cup\twww.example.com/cup.jpg\na star\t{U2}\n")
    with pytest.raises(sources.SourceError, match="names no url column .* if line 1 is data rather than a header, none of its fields is a URL"):
        sources.read_tsv(str(tmp_path / "no_scheme.tsv"), "train")


def test_a_stray_quote_never_takes_the_next_record_and_a_trailing_tab_keeps_the_header(tmp_path):
    (tmp_path / "stray.tsv").write_text(f'"Best of\t{U1}\nrecord 12"\t{U2}\n"a two-line\ncaption"\t{U1}\n')
    rows = sources.read_tsv(str(tmp_path / "stray.tsv"), "train")
    assert _rows(rows) == [("cc3m-000000000", U1, '"Best of'), ("cc3m-000000001", U2, 'record 12"'), ("cc3m-000000002", U1, "a two-line\ncaption")]
    (tmp_path / "trailing.tsv").write_text(f"caption\turl\t\na red cup\t{U1}\t\n")  # a spreadsheet's trailing delimiter
    assert _rows(sources.read_tsv(str(tmp_path / "trailing.tsv"), "train")) == [("cc3m-000000000", U1, "a red cup")]


def test_a_blocked_domain_blocks_every_subdomain_and_a_bad_file_is_named(tmp_path):
    blocklist = sources.Blocklist.parse(["example.com"])
    urls = [f"http://{'a.' * n}example.com/x.jpg" for n in (0, 1, 16, 17, 40)] + ["http://example.org/x.jpg", "http://notexample.com/x.jpg"]
    assert blocklist.matches(pa.array(urls)).to_pylist() == [True] * 5 + [False, False]
    (tmp_path / "blocklist.txt").write_bytes(b"caf\xe9.example\n")
    with pytest.raises(sources.SourceError, match=r"blocklist.txt: not UTF-8 \(invalid continuation byte at byte 3\)"):
        sources.Blocklist.from_file(str(tmp_path / "blocklist.txt"))


def test_quoted_fields_hold_tabs_newlines_and_quotes_and_quotes_elsewhere_are_text(tmp_path):
    tsv = tmp_path / "quoted.tsv"
    tsv.write_text(
        "caption\turl\n"
        f'"a cup\twith a tab"\t{U1}\n'  # a quoted field holding the delimiter
        f'"two\nlines, ""quoted"""\t{U2}\n'  # a line break and doubled quotes inside quotes
        f'"the cat" said hi\t{U3}\n'  # quotes that are text: the field is not quoted whole
        f'"never closed\t{U1}x\n'  # an opening quote never closed: text as written
        f'last\t{U2}x\n'
    )
    rows = sources.read_tsv(str(tsv), "train")
    assert _rows(rows) == [
        ("cc3m-000000000", U1, "a cup\twith a tab"),
        ("cc3m-000000001", U2, 'two\nlines, "quoted"'),
        ("cc3m-000000002", U3, '"the cat" said hi'),
        ("cc3m-000000003", U1 + "x", '"never closed'),
        ("cc3m-000000004", U2 + "x", "last"),
    ]
    assert not rows.skipped

    csv_file = tmp_path / "sheet.csv"  # more columns than two, in another order, commas inside quotes
    csv_file.write_text(f'id,Image URL,alt text,width\n1,{U1},"a cup, red",10\n2,{U2},"say ""hi""",20\n3,,empty url,30\n4\n')
    with pytest.raises(sources.SourceError, match=r"sheet.csv:1: header .* names no url column .*--url-col"):
        sources.read_tsv(str(csv_file), "train")
    rows = sources.read_tsv(str(csv_file), "train", url_col="image url", caption_col="ALT TEXT")
    assert _rows(rows) == [("cc3m-000000000", U1, "a cup, red"), ("cc3m-000000001", U2, 'say "hi"'), ("cc3m-000000002", "", "empty url")]
    assert rows.skipped == {"malformed_row": 1} and f"{csv_file}:5: 1 field(s), expected 4" == rows.examples["malformed_row"]

    headerless = tmp_path / "headerless.tsv"  # no header, three columns: numbers say which is which
    headerless.write_text(f"x\t{U1}\tcup\ny\t{U2}\tstar\n")
    with pytest.raises(sources.SourceError, match="3 columns and no header row.*--caption-col"):
        sources.read_tsv(str(headerless), "train")
    assert _rows(sources.read_tsv(str(headerless), "train", caption_col="2")) == [("cc3m-000000000", U1, "cup"), ("cc3m-000000001", U2, "star")]
    with pytest.raises(sources.SourceError, match="no header row"):
        sources.read_tsv(str(headerless), "train", url_col="url")


def test_latin1_and_windows_1252_lists_are_decoded_and_said(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes(f"caf\xe9 au lait \x96 cr\xe8me\t{U1}\nna\xefve\t{U2}\n".encode("latin-1"))
    rows = sources.read_tsv(str(path), "train")
    assert [r[2] for r in _rows(rows)] == ["café au lait – crème", "naïve"]  # 0x96 is an en dash in Windows-1252
    assert len(rows.notes) == 1 and "not UTF-8" in rows.notes[0] and "Windows-1252" in rows.notes[0]
    # a UTF-8 byte-order mark before Latin-1 text is dropped too (no "ï»¿" in the first caption or
    # header), and the note names the file's first byte that is not UTF-8, however far in
    bom = tmp_path / "bom_latin1.tsv"
    bom.write_bytes(b"\xef\xbb\xbfcaption\turl\n" + f"cup\t{U1}\n".encode() * 5000 + f"na\xefve\t{U2}\n".encode("latin-1"))
    rows = sources.read_tsv(str(bom), "train")
    captions = [r[2] for r in _rows(rows)]
    assert (captions[0], captions[-1], len(captions)) == ("cup", "naïve", 5001)
    first_bad = bom.read_bytes().index("naïve".encode("latin-1")) + 2
    assert f"at byte {first_bad})" in rows.notes[0], rows.notes
    headerless = tmp_path / "bom_latin1_no_header.tsv"
    headerless.write_bytes(b"\xef\xbb\xbf" + f"na\xefve\t{U1}\n".encode("latin-1"))
    assert [r[2] for r in _rows(sources.read_tsv(str(headerless), "train"))] == ["naïve"]
    utf8 = tmp_path / "utf8.tsv"
    utf8.write_text(f"café au lait – crème\t{U1}\n", encoding="utf-8")
    assert [r[2] for r in _rows(sources.read_tsv(str(utf8), "train"))] == ["café au lait – crème"]


def test_several_parts_globs_and_braces_key_each_row_by_its_file(tmp_path):
    from pipeline import storage

    for i in range(3):
        pq.write_table(pa.table({"url": [f"http://127.0.0.1/{i}/{j}.jpg" for j in range(2)], "text": [f"p{i} r{j}" for j in range(2)]}), tmp_path / f"part-{i:05d}.parquet")
    files = storage.expand([str(tmp_path / "part-*.parquet")])
    assert files == storage.expand(str(tmp_path / "part-{00000..00002}.parquet"))
    assert files == [str(tmp_path / f"part-{i:05d}.parquet") for i in range(3)]
    rows = sources.read_many(files, lambda path, part: sources.read_laion(path, "train", part=part))
    keys = rows.table.column("key").to_pylist()
    assert keys == [f"laion-part-{i:05d}-{j:09d}" for i in range(3) for j in range(2)]
    assert rows.table.column("caption").to_pylist()[-1] == "p2 r1" and rows.rows_read == 6  # DataComp's url / text
    one = sources.read_many(files[:1], lambda path, part: sources.read_laion(path, "train", part=part))
    assert one.table.column("key").to_pylist() == ["laion-000000000", "laion-000000001"]  # one file: keys as before
    with pytest.raises(FileNotFoundError, match=r"part-9\*.parquet: matches no file"):
        storage.expand([str(tmp_path / "part-9*.parquet")])
    with pytest.raises(FileNotFoundError, match=r"part-00003.parquet: no such file"):
        storage.expand(str(tmp_path / "part-{00002..00003}.parquet"))
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"url": [U1], "text": ["x"]}), tmp_path / "b" / "part-00000.parquet")
    with pytest.raises(sources.SourceError, match="have the same name"):
        sources.read_many([files[0], str(tmp_path / "b" / "part-00000.parquet")], lambda p, part: sources.read_laion(p, "train", part=part))
    with pytest.raises(sources.SourceError, match="no Caption column.*--caption-col"):
        sources.read_laion(files[0], "train", caption_col="Caption")


def test_lists_are_read_from_urls(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/lists/cc.tsv", f"a red cup\t{U1}\n".encode())
    pq.write_table(pa.table({"URL": [U2], "TEXT": ["a star"]}), "/lists/l.parquet", filesystem=fs)
    assert _rows(sources.read_tsv("memory://lists/cc.tsv", "train")) == [("cc3m-000000000", U1, "a red cup")]
    assert _rows(sources.read_laion("memory://lists/l.parquet", "train")) == [("laion-000000000", U2, "a star")]
    with pytest.raises(FileNotFoundError, match="memory://lists/none.tsv"):
        sources.read_tsv("memory://lists/none.tsv", "train")
