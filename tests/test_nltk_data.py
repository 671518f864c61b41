import os

import pytest

from pipeline import nltk_data


def test_lexnames_table_from_man_page():
    if not os.path.exists(nltk_data.DEBIAN_LEXNAMES_MAN):
        pytest.skip("Debian's wordnet-base is not installed here (nltk.download provided WordNet)")
    rows = nltk_data.lexnames_from_man_page()
    assert len(rows) == 45
    assert rows[0] == (0, "adj.all", 3)
    assert rows[3] == (3, "noun.Tops", 1)
    assert rows[29] == (29, "verb.body", 2)
    assert rows[44] == (44, "adj.ppl", 3)


def test_assembled_wordnet_lemmatizes(tmp_path, monkeypatch):
    if not os.path.exists(os.path.join(nltk_data.DEBIAN_WORDNET, "index.sense")):
        pytest.skip("Debian's wordnet packages are not installed here (nltk.download provided WordNet)")
    dest = nltk_data.assemble_from_debian(str(tmp_path))
    assert nltk_data.has_wordnet(str(tmp_path))
    assert not any(os.path.islink(os.path.join(dest, f)) for f in os.listdir(dest))
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # only the assembled copy
    wn = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
    assert os.path.samefile(wn.root.path, dest)
    assert [wn.morphy(w, "n") for w in ("mice", "leaves", "children")] == ["mouse", "leaf", "child"]


def test_missing_package_is_named(tmp_path):
    empty = tmp_path / "usr_share_wordnet"
    empty.mkdir()
    with pytest.raises(nltk_data.WordNetMissing, match="wordnet-base"):
        nltk_data.assemble_from_debian(str(tmp_path / "out"), source=str(empty))
    for name in ("data.noun", "index.noun", "noun.exc"):
        (empty / name).write_text("")
    with pytest.raises(nltk_data.WordNetMissing, match="wordnet-sense-index"):
        nltk_data.assemble_from_debian(str(tmp_path / "out"), source=str(empty))


def test_setup_job_finds_existing_wordnet(capsys):
    from jobs import setup_nltk

    assert setup_nltk.main(["--dir", os.environ["NLTK_DATA"], "--no-download"]) == 0
    assert "wordnet: found" in capsys.readouterr().out
