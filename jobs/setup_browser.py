"""Provide a headless browser for the page test: ``python -m jobs.setup_browser``.

The test of ``jobs.serve`` drives a real Chromium through Selenium and its chromedriver.
Browser downloads (Selenium Manager, Playwright) are often unreachable, so this uses
Debian's ``chromium`` and ``chromium-driver``: found on PATH or in /usr/bin, or installed
with apt-get when run as root and missing. Prints the two paths; exits non-zero with a
message naming what is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from jobs._system import apt_install

DEBIAN_PACKAGES = ("chromium", "chromium-driver")


def find() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) executables, None where missing."""

    def which(name: str) -> str | None:
        found = shutil.which(name)
        if found is None and os.access(f"/usr/bin/{name}", os.X_OK):
            found = f"/usr/bin/{name}"
        return found

    return which("chromium"), which("chromedriver")


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    chromium, driver = find()
    if chromium is None or driver is None:
        print(f"browser: installing Debian's {' and '.join(DEBIAN_PACKAGES)}", flush=True)
        problem = apt_install(DEBIAN_PACKAGES)
        chromium, driver = find()
        if chromium is None or driver is None:
            print(
                f"error: the page test needs Chromium and chromedriver; Debian's {' and '.join(DEBIAN_PACKAGES)} "
                f"are not installed ({problem or 'installed, yet not found on PATH'}). Install them "
                f"(apt-get install {' '.join(DEBIAN_PACKAGES)}).",
                file=sys.stderr,
            )
            return 1
    print(f"browser: {chromium}, driver: {driver}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
