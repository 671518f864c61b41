"""One lock around ``ast.parse`` on the CPython releases whose AST constructor is not thread-safe.

On CPython 3.11.0-3.11.7 (and 3.12.0-3.12.1) the conversion of a parsed tree into Python
objects keeps its recursion counter in interpreter-wide state (python/cpython#106905, fixed
in 3.11.8 and 3.12.2). A garbage collection during one thread's ``ast.parse`` may run a
finalizer that lets another thread in; when that thread parses too, the first one ends with
``SystemError: AST constructor recursion depth mismatch``. Nobody needs to call ``ast``
for that: Python 3.11's ``traceback`` module parses source lines to place its ``^^^``
marks, so two threads that format a traceback at once (a Ray Data executor thread and the
driver's main thread, an HTTP server's request thread and a test) are enough, and so is
pytest rewriting a module while a thread formats one.

``install()`` replaces ``ast.parse`` with the same function under a process-wide re-entrant
lock on those releases and does nothing on the others; ``ast.literal_eval`` and every
module that calls ``ast.parse`` go through it. Job entry points (``jobs._cli.parse``), the
Ray worker processes of a job (``jobs._cli.ray_session`` names :func:`install` as Ray's
``worker_process_setup_hook``) and the test suite install it.
"""

from __future__ import annotations

import ast
import functools
import sys
import threading

_LOCK = threading.RLock()


def affected(version: tuple[int, ...] | None = None) -> bool:
    """Whether this CPython (or ``version``, a ``sys.version_info``-like tuple) has the race."""
    v = tuple(sys.version_info[:3] if version is None else version[:3])
    if sys.implementation.name != "cpython" and version is None:
        return False
    return (3, 11, 0) <= v < (3, 11, 8) or (3, 12, 0) <= v < (3, 12, 2)


def installed() -> bool:
    return getattr(ast.parse, "__ast_guard__", False)


def install() -> bool:
    """Guard ``ast.parse`` when this interpreter needs it (idempotent); True when it is guarded."""
    if installed():
        return True
    if not affected():
        return False
    parse = ast.parse

    @functools.wraps(parse)
    def guarded(*args, **kwargs):
        with _LOCK:
            return parse(*args, **kwargs)

    guarded.__ast_guard__ = True
    ast.parse = guarded
    return True
