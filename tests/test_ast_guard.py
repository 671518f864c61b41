"""``pipeline.ast_guard``: two threads parsing at once never raise CPython 3.11's SystemError.

The race is forced, not waited for: one thread parses a large module while garbage with
finalizers is pending, so a collection inside its parse runs a finalizer that yields the
GIL; another thread, deeper in its stack, parses in a loop meanwhile. On an affected
CPython every unguarded parse of the first thread then fails; with the guard none does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import ast_guard

RACE = r"""
import ast, gc, json, sys, threading, time
if sys.argv[1] == "guard":
    from pipeline import ast_guard
    assert ast_guard.install()

class Finalized:
    def __del__(self):
        time.sleep(0)  # lets the other thread in

big = "\n".join(f"def f{i}(a, b):\n    return [a + b * {i} for _ in range(3)]" for i in range(300))
errors, done = [], threading.Event()

def at_depth(k, fn):
    return at_depth(k - 1, fn) if k else fn()

def parse_big():
    for _ in range(20):
        gc.disable()
        for _ in range(20):
            x = Finalized()
            x.cycle = x
        del x
        gc.enable()
        try:
            ast.parse(big)
        except SystemError as err:
            errors.append(str(err))
    done.set()

def parse_small():
    while not done.is_set():
        try:
            ast.literal_eval("[1, 2, 3]")
        except SystemError as err:
            errors.append(str(err))

threads = [threading.Thread(target=at_depth, args=(0, parse_big)), threading.Thread(target=at_depth, args=(50, parse_small))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(errors))
"""


def _race(repo_root: str, mode: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", RACE, mode], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_guarded_parses_never_fail_and_unguarded_ones_do_where_cpython_has_the_race(repo_root):
    assert _race(repo_root, "guard") == []
    if ast_guard.affected():
        failures = _race(repo_root, "bare")
        assert failures and all("AST constructor recursion depth mismatch" in f for f in failures)


def test_the_guard_is_installed_where_needed_and_parses_as_before():
    assert ast_guard.installed() == ast_guard.affected()  # tests/conftest.py installs it
    assert ast_guard.install() == ast_guard.affected()  # idempotent
    import ast

    source = "def f(a, b=2):\n    return [a + b for _ in range(3)]\n"
    assert ast.dump(ast.parse(source)) == ast.dump(compile(source, "<test>", "exec", ast.PyCF_ONLY_AST))  # the same tree as unguarded
    assert ast.literal_eval("{'a': (1, 2)}") == {"a": (1, 2)}


@pytest.mark.parametrize(
    ("version", "affected"),
    [((3, 10, 14), False), ((3, 11, 0), True), ((3, 11, 7), True), ((3, 11, 8), False), ((3, 12, 1), True), ((3, 12, 2), False), ((3, 13, 0), False)],
)
def test_affected_releases(version, affected):
    assert ast_guard.affected(version) is affected


_RAY_JOB = """
import ast, json, ray
from jobs._cli import ray_session
from pipeline import ast_guard

@ray.remote
def worker_state():
    return {"installed": ast_guard.installed(), "guarded_parse": getattr(ast.parse, "__ast_guard__", False)}

with ray_session(None):
    print("WORKER " + json.dumps(ray.get(worker_state.remote())))
"""


@pytest.mark.cluster
def test_a_jobs_ray_workers_install_the_guard_where_needed(ray_head, repo_root, tmp_path):
    """Ray's worker processes run the job's tasks and actors (Ray Data's threads among them); they do not go
    through the job's entry point, so ray_session installs the guard as their setup hook."""
    script = tmp_path / "probe.py"
    script.write_text(_RAY_JOB)
    result = ray_head.submit(["python", str(script)], working_dir=repo_root, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("WORKER ")]
    assert json.loads(line.removeprefix("WORKER ")) == {"installed": ast_guard.affected(), "guarded_parse": ast_guard.affected()}


def test_the_submitters_own_setup_hook_and_env_vars_win(monkeypatch):
    from jobs import _cli

    monkeypatch.delenv(_cli.SUBMITTED, raising=False)
    hook = {"worker_process_setup_hook": "pipeline.ast_guard.install"} if ast_guard.affected() else {}
    assert _cli.job_runtime_env({"A": "1"}) == {"env_vars": {"A": "1"}} | hook
    assert _cli.job_runtime_env() == (hook or None)
    submitted = {"runtime_env": {"env_vars": {"A": "mine"}, "worker_process_setup_hook": "my_setup.hook"}}
    monkeypatch.setenv(_cli.SUBMITTED, json.dumps(submitted))
    assert _cli.job_runtime_env({"A": "1", "B": "2"}) == {"env_vars": {"B": "2"}}  # Ray merges the submitter's in
