"""WordNet for NLTK's lemmatizer: find it, download it, or assemble it from Debian's packages.

NLTK's WordNet reader wants ``<NLTK_DATA>/corpora/wordnet/`` with the WordNet 3.0 database
files and a ``lexnames`` file. Offline, Debian's ``wordnet-base`` and
``wordnet-sense-index`` packages hold the same database under ``/usr/share/wordnet``, but
no ``lexnames`` file, and NLTK's reader refuses symbolic links; so the files are copied
and ``lexnames`` is written from the table in the ``lexnames(5WN)`` man page.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil

from pipeline.outputs import staged_output

DEBIAN_WORDNET = "/usr/share/wordnet"
DEBIAN_LEXNAMES_MAN = "/usr/share/man/man5/lexnames.5WN.gz"
DEBIAN_PACKAGES = ("wordnet-base", "wordnet-sense-index")
REQUIRED_FILES = ("data.noun", "index.noun", "noun.exc", "index.sense")
_POS_CODES = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetMissing(RuntimeError):
    """No WordNet could be found, downloaded or assembled."""


def wordnet_dir(nltk_data: str) -> str:
    return os.path.join(nltk_data, "corpora", "wordnet")


def has_wordnet(nltk_data: str) -> bool:
    """True when ``nltk_data`` holds a WordNet NLTK can read (unpacked folder or zip)."""
    folder = wordnet_dir(nltk_data)
    unpacked = all(os.path.isfile(os.path.join(folder, f)) for f in ("lexnames", "data.noun", "index.noun"))
    return unpacked or os.path.isfile(folder + ".zip")


def download(nltk_data: str, timeout: float = 20.0) -> bool:
    """Try ``nltk.download('wordnet')`` into ``nltk_data``; False when the network refuses."""
    import socket

    import nltk

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        ok = nltk.download("wordnet", download_dir=nltk_data, quiet=True, raise_on_error=False)
    except Exception:  # noqa: BLE001 - any network or unzip failure means "not downloaded"
        ok = False
    finally:
        socket.setdefaulttimeout(previous)
    return bool(ok) and has_wordnet(nltk_data)


def lexnames_from_man_page(man_page: str = DEBIAN_LEXNAMES_MAN) -> list[tuple[int, str, int]]:
    """Parse the (number, file name, syntactic category) table of ``lexnames(5WN)``."""
    opener = gzip.open if man_page.endswith(".gz") else open
    with opener(man_page, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    rows = []
    for line in text.splitlines():
        m = re.match(r"^(\d\d)\t([a-z]+)\.([A-Za-z]+)\s*\t", line)
        if m:
            number, pos, name = int(m.group(1)), m.group(2), m.group(3)
            rows.append((number, f"{pos}.{name}", _POS_CODES[pos]))
    if [r[0] for r in rows] != list(range(len(rows))) or len(rows) < 45:
        raise WordNetMissing(f"{man_page}: could not read the lexicographer file table (found {len(rows)} rows)")
    return rows


def assemble_from_debian(nltk_data: str, source: str = DEBIAN_WORDNET, man_page: str = DEBIAN_LEXNAMES_MAN) -> str:
    """Copy Debian's WordNet files into ``<nltk_data>/corpora/wordnet`` and write ``lexnames``.

    Raises :class:`WordNetMissing` naming the missing package or file.
    """
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(source, f))]
    if missing:
        package = "wordnet-sense-index" if missing == ["index.sense"] else "wordnet-base"
        raise WordNetMissing(
            f"{os.path.join(source, missing[0])} is missing: install Debian's {package} "
            f"(apt-get install {' '.join(DEBIAN_PACKAGES)}), or point NLTK_DATA at a folder with WordNet"
        )
    if not os.path.isfile(man_page):
        raise WordNetMissing(f"{man_page} is missing: it comes with Debian's wordnet-base (man pages must not be excluded)")
    rows = lexnames_from_man_page(man_page)
    dest = wordnet_dir(nltk_data)
    with staged_output(dest) as tmp:
        for name in sorted(os.listdir(source)):
            path = os.path.join(source, name)
            if os.path.isfile(path):  # files only: the folder also holds bin/ and pixmaps/
                shutil.copyfile(path, os.path.join(tmp, name), follow_symlinks=True)
        with open(os.path.join(tmp, "lexnames"), "w") as f:
            for number, name, pos in rows:
                f.write(f"{number:02d}\t{name}\t{pos}\n")
    return dest
