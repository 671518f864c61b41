"""Output folders that appear whole or not at all, shared by the jobs that write folders.

A job writes into a hidden temporary sibling of its output and renames it onto the output
when everything is written. A previous output of the same job is replaced; any other
existing, non-empty path is refused before any work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator


def check_replaceable(output: str, is_own: Callable[[str], bool], refusal: str) -> None:
    """Raise ``FileExistsError`` unless ``output`` is absent, empty, or ``is_own(output)``.

    ``refusal`` says what the folder lacks, e.g. "is not a labels output (no summary.json)".
    """
    if not os.path.exists(output):
        return
    if not os.path.isdir(output):
        raise FileExistsError(f"{output}: exists and is not a folder; choose another output")
    if os.listdir(output) and not is_own(output):
        raise FileExistsError(f"{output}: exists and {refusal}; refusing to replace it, choose another output")


@contextlib.contextmanager
def staged_output(output: str, check: Callable[[str], None]) -> Iterator[str]:
    """Yield a hidden temporary sibling of ``output``; when the block succeeds, rename it onto ``output``.

    ``check(output)`` raises when ``output`` may not be replaced; it runs before the block
    and again before the rename. On an exception the temporary folder is removed; a
    killed process leaves only a hidden ``.<name>.tmp-*`` folder, never a half-written
    output. A replaced output is moved aside first and put back if the rename fails.
    """
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    check(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        yield tmp
        check(output)
        if os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)
        if os.path.exists(output):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(output, old)
            try:
                os.rename(tmp, output)
            except BaseException:
                os.rename(old, output)  # put the previous output back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
