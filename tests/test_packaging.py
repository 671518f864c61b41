"""Installable parts: `pip install .[infer]` into a fresh virtual environment runs jobs.infer, and brings
neither DeepSpeed, img2dataset, spaCy nor Ray.

The fresh environment shares this one's torch (and the CUDA libraries torch depends on) through a
read-only path file, as a cluster image provides its own torch: pip must accept it (torch is a lower
bound in the dependencies, never a pin) and install everything else of the extra itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import venv

import pytest
import tomllib

from tests.test_model import _tiny_model

pytestmark = pytest.mark.install
SHARED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")  # the heavy, hardware-specific part
ABSENT = ("deepspeed", "img2dataset", "spacy", "ray", "webdataset", "nltk", "sentence_transformers")


def _share_torch(folder: str) -> None:
    """Symlink every top-level entry of the shared distributions into ``folder``."""
    os.makedirs(folder)
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if not SHARED.match(name):
            continue
        root = str(dist.locate_file(""))
        for top in {str(f).split("/")[0] for f in dist.files or []} - {"..", ""}:
            src, dst = os.path.join(root, top), os.path.join(folder, top)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)


@pytest.fixture(scope="module")
def infer_env(repo_root, tmp_path_factory) -> str:
    """A fresh venv holding `pip install -c constraints.txt .[infer]`; its bin folder."""
    root = tmp_path_factory.mktemp("fresh")
    env_dir = str(root / "venv")
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = os.path.join(env_dir, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip()
    _share_torch(str(root / "shared"))
    with open(os.path.join(site, "shared-torch.pth"), "w") as f:
        f.write(str(root / "shared") + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", "constraints.txt", ".[infer]"],
        cwd=repo_root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return os.path.join(env_dir, "bin")


def test_infer_extra_runs_jobs_infer_without_the_data_and_training_stacks(infer_env, world, tmp_path, repo_root):
    from model.checkpoint import save_pretrained
    from model.tokenizer import Tokenizer

    python = os.path.join(infer_env, "python")
    probe = f"import importlib.util, json; print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {ABSENT!r}}}))"
    found = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path).stdout)
    assert not any(found.values()), found
    pip_list = subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(pip_list)}
    assert installed["torch"] == importlib.metadata.version("torch")  # the existing torch was kept, not replaced

    tok = Tokenizer(world.tokenizer)
    export = save_pretrained(_tiny_model(tok), tok, str(tmp_path / "export"))
    image = next(f"{world.root}/{s['file']}" for s in world.samples("val") if s["kind"] == "good")
    # the console script, from a folder outside the repository: the installed package, not the checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PATH": f"{infer_env}:/usr/bin:/bin"}
    run = subprocess.run(
        [os.path.join(infer_env, "nxtp-infer"), "--checkpoint", export, "--image", image, "--format", "json", "--k", "3"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(run.stdout)
    assert result["image"] == image and 1 <= len(result["labels"]) <= 3
    with open(os.path.join(repo_root, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["scripts"]
    assert {"nxtp-ingest", "nxtp-curate", "nxtp-labels", "nxtp-train", "nxtp-evaluate", "nxtp-infer"} <= set(declared)
    for script in declared:
        assert os.path.isfile(os.path.join(infer_env, script)), script  # installed; most need their extras to run
    train = subprocess.run([os.path.join(infer_env, "nxtp-train"), "--config", "x.yaml"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert train.returncode == 2 and "pip install 'nxtp[train]'" in train.stderr
