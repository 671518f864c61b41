"""Provide WordNet for NLTK's lemmatizer: ``python -m jobs.setup_nltk --dir .cache/nltk_data``.

In order: an existing WordNet in ``--dir`` or in any folder of ``NLTK_DATA`` counts;
otherwise ``nltk.download('wordnet')``; otherwise (no network) it is assembled from
Debian's ``wordnet-base`` and ``wordnet-sense-index``, installed with apt-get when run as
root and they are missing. Exits non-zero with a message naming what is missing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Annotated

import tyro

from jobs._cli import parse
from jobs._system import apt_install
from pipeline import nltk_data


@dataclass
class SetupConfig:
    output: Annotated[str, tyro.conf.arg(aliases=("--dir",))] = os.path.join(".cache", "nltk_data")
    """NLTK data folder to fill"""
    download: bool = True
    """try nltk.download first (--no-download on offline machines)"""


def main(argv: list[str] | None = None) -> int:
    args = parse(SetupConfig, argv, prog="python -m jobs.setup_nltk", description=__doc__)
    target = os.path.abspath(args.output)

    candidates = [target] + [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    for folder in candidates:
        if nltk_data.has_wordnet(folder):
            print(f"wordnet: found in {folder}")
            return 0
    os.makedirs(target, exist_ok=True)
    if args.download and nltk_data.download(target):
        print(f"wordnet: downloaded into {target}")
        return 0
    print("wordnet: nltk.download is not reachable; assembling it from Debian's wordnet packages")
    if not os.path.isfile(os.path.join(nltk_data.DEBIAN_WORDNET, "index.sense")):
        problem = apt_install(nltk_data.DEBIAN_PACKAGES)
        if problem:
            print(
                f"error: WordNet is missing: nltk.download failed and Debian's {' and '.join(nltk_data.DEBIAN_PACKAGES)} "
                f"are not installed ({problem}). Install them, or set NLTK_DATA to a folder holding corpora/wordnet.",
                file=sys.stderr,
            )
            return 1
    try:
        dest = nltk_data.assemble_from_debian(target)
    except nltk_data.WordNetMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wordnet: assembled in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
