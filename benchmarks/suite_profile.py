"""Where a command's CPU goes, by process kind and by test: a profile of `make test` (or any command).

    python -m benchmarks.suite_profile [--interval 0.5] [--output FILE.json] [--top 40] -- make test

Runs the command while sampling every process on the machine each ``--interval`` seconds
(psutil): its CPU time (user + system), command line, and the ``PYTEST_CURRENT_TEST`` it
inherited. pytest sets that variable while a test runs, so every process a test starts (a
``ray start`` head and the workers its raylet spawns, the ``deepspeed`` launcher and its
ranks, a job under ``ray job submit``) carries the test and phase that started it; a
session fixture's processes (the suite's shared Ray head) carry the first test that asked
for the fixture. Work done inside the pytest process itself has the kind ``pytest`` and no
test (``-``). A process already running when the profile starts counts only the CPU it
used after that; one that ends between two samples loses at most one interval of its CPU,
so the process tables sum to a little less than the machine's busy CPU-seconds (from
``/proc/stat`` through psutil), which lose nothing.

The report: wall time, how busy the machine was, its busy CPU-seconds and the floor they
put on the wall time with every core busy, CPU-seconds by process kind (``ray worker``,
``ray raylet``, ``deepspeed.launcher.launch``, ``pytest``...), and by test. Written as JSON
to ``--output`` (default: ``benchmarks/results/suite_profile.json``) and printed; the
command's exit status is returned.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.outputs import write_json  # noqa: E402

RESULTS = os.path.join(REPO, "benchmarks", "results")
RAY_SCRIPTS = ("log_monitor.py", "monitor.py", "dashboard.py", "agent.py", "runtime_env_agent", "client")
PHASE = re.compile(r" \((setup|call|teardown)\)$")


def kind(cmdline: list[str], name: str) -> str:
    """A short name for what a process is: a Ray part, ``python -m X``, a script, or its program."""
    if name.startswith("ray::") or any(w.endswith(("default_worker.py", "setup_worker.py")) for w in cmdline[:3]):
        return "ray worker"
    program = os.path.basename(cmdline[0]) if cmdline else name
    if program in ("raylet", "gcs_server"):
        return f"ray {program}"
    args = cmdline[1:]
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            return args[i + 1]
        if arg == "-c":
            return f"{program} -c"
        if arg.endswith(".py") or "/bin/" in arg:
            script = os.path.basename(arg)
            if "/ray/" in arg:
                return "ray " + script.removesuffix(".py")
            return script
        if not arg.startswith("-"):
            break
    return program or name


def test_of(environ: dict) -> str:
    """``path::name phase`` of the test whose run started the process, or ``""``."""
    current = environ.get("PYTEST_CURRENT_TEST", "")
    return PHASE.sub(r" \1", current)


class Sampler(threading.Thread):
    """Every process's CPU time, kind and test, sampled until ``stop``."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.procs: dict[tuple[int, float], dict] = {}
        self._done = threading.Event()
        self.me = os.getpid()
        # command lines name paths under the working dir relative to it, temporary ones under $TMPDIR
        self.prefixes = ((os.getcwd() + os.sep, "./"), (tempfile.gettempdir() + os.sep, "$TMPDIR/"))

    def shorten(self, cmdline: str) -> str:
        for prefix, short in self.prefixes:
            cmdline = cmdline.replace(prefix, short)
        return cmdline

    def sample(self, first: bool = False) -> None:
        for p in psutil.process_iter(["pid", "create_time", "cmdline", "name", "cpu_times"]):
            info = p.info
            if info["pid"] == self.me or info["cpu_times"] is None:
                continue
            cpu = info["cpu_times"].user + info["cpu_times"].system
            key = (info["pid"], info["create_time"])
            row = self.procs.get(key)
            if row is None:
                try:
                    environ = p.environ()
                except (psutil.Error, OSError):
                    environ = {}
                row = self.procs[key] = {
                    "pid": info["pid"],
                    "kind": kind(info["cmdline"] or [], info["name"] or ""),
                    "cmdline": self.shorten(" ".join(info["cmdline"] or []))[:300],
                    "test": test_of(environ),
                    "base": cpu if first else 0.0,  # a process running before the profile: only what it uses after
                }
            row["cpu"] = cpu - row["base"]

    def run(self) -> None:
        self.sample(first=True)
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


def tally(rows: list[dict], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        t = out.setdefault(r[key] or "-", {"cpu_s": 0.0, "processes": 0})
        t["cpu_s"] += r["cpu"]
        t["processes"] += 1
    return dict(sorted(((k, {"cpu_s": round(v["cpu_s"], 1), "processes": v["processes"]}) for k, v in out.items()),
                       key=lambda kv: -kv[1]["cpu_s"]))  # fmt: skip


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile(command: list[str], interval: float) -> dict:
    sampler = Sampler(interval)
    before, t0 = psutil.cpu_times(), time.time()
    sampler.start()
    returncode = subprocess.call(command)
    sampler.stop()
    after, wall = psutil.cpu_times(), time.time() - t0
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    busy = total - idle
    rows = [r for r in sampler.procs.values() if r["cpu"] > 0]
    cores = psutil.cpu_count() or 1
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(command),
        "device": f"{cpu_name()}, {cores} cores",
        "returncode": returncode,
        "wall_s": round(wall, 1),
        "busy_fraction": round(busy / total, 3) if total > 0 else 0.0,
        "busy_cpu_s": round(busy, 1),
        "wall_floor_s": round(busy / cores, 1),
        "process_cpu_s": round(sum(r["cpu"] for r in rows), 1),
        "by_kind": tally(rows, "kind"),
        "by_test": tally(rows, "test"),
        "top_processes": [
            {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k != "base"}
            for r in sorted(rows, key=lambda r: -r["cpu"])[:50]
        ],
    }


def print_report(result: dict, top: int) -> None:
    print(f"\n{result['command']}: exit {result['returncode']}, {result['wall_s']:.0f} s, machine "
          f"{result['busy_fraction']:.1%} busy ({result['busy_cpu_s']:.0f} CPU-s; "
          f"{result['wall_floor_s']:.0f} s with every core busy), processes {result['process_cpu_s']:.0f} CPU-s")  # fmt: skip
    for title, key in (("by process kind", "by_kind"), ("by test (the test whose run started the process)", "by_test")):
        print(f"\nCPU-s {title}:")
        for name, t in list(result[key].items())[:top]:
            print(f"{t['cpu_s']:9.1f} {t['processes']:5d}  {name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.suite_profile", usage="%(prog)s [options] -- COMMAND ...",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("--output", default=os.path.join(RESULTS, "suite_profile.json"), help="JSON report (default %(default)s)")
    p.add_argument("--top", type=int, default=40, help="rows printed per table (default 40)")
    args = p.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        p.error("no command after --")
    result = profile(command, args.interval)
    write_json(args.output, result)
    print_report(result, args.top)
    print(f"\nwritten {args.output}")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
