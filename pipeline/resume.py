"""Resuming a training run: which checkpoint, what changed since it, and resuming on another cluster size.

``--resume auto`` (the default) continues from the latest checkpoint in ``<run_dir>/checkpoints``
when there is one, ``never`` starts fresh and refuses a run folder that already holds
checkpoints (two runs in one folder would corrupt both), and a path resumes from a
checkpoint tag folder (``.../checkpoints/step800``) or a checkpoints folder with DeepSpeed's
``latest`` file, e.g. of another run. A run folder that already holds checkpoints of its own
refuses another run's, unless its run began from that same path (its recorded config says
so): a re-run of the command that began it continues from the folder's own latest checkpoint.

Beside each checkpoint the trainer writes ``run_state.json`` (:data:`RUN_STATE`, rank 0, after
every rank saved): step, samples seen, world size, global batch, ZeRO stage, the training
config, the model config and the tokenizer's fingerprint. On resume it says what changed
(:func:`config_changes`) and refuses what would break the run (:func:`check_unchanged`,
:func:`check_model`): the model's shape, the tokenizer, which parameters train, the protocol,
and the ZeRO stage (:func:`check_stage`: DeepSpeed loads a checkpoint only under its own stage).

A ZeRO checkpoint is partitioned for the world size that wrote it. When the world size
differs, rank 0 converts it once into a DeepSpeed *universal* checkpoint
(:func:`convert_to_universal`: DeepSpeed's own ``ds_to_universal``, into
``<run_dir>/checkpoints/universal/<tag>``, written under a temporary name and renamed), which
any world size loads (``"checkpoint": {"load_universal": true}``). The learning-rate schedule
and the data stream follow the samples seen, not the steps: the run resumes at step
``samples // new global batch`` (:func:`resume_step`), the data stream seeded by the samples
seen (a changed global batch draws fresh data), and the schedule at the step of the samples of
the updates applied (:func:`schedule_step`: fp16 updates that loss scaling skipped do not
step it).

DeepSpeed checkpoints are POSIX folders (a local disk, or a file system every node shares).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

RUN_STATE = "run_state.json"
UNIVERSAL = "universal"  # <save_dir>/universal/<tag>: conversions of checkpoints written on another world size
FROZEN = "frozen_parameters.pt"  # in a universal folder: the parameters that do not train (DeepSpeed's conversion skips them)
SOURCE = "source.json"  # in a universal folder: which checkpoint it was converted from
# changes of these config fields break a run: the optimizer states belong to the parameters that train, the
# loss to the protocol (the model's shape and the tokenizer are compared on the model itself: check_model)
BREAKING_FIELDS = ("train_vision_blocks", "train_embeddings", "protocol")
IGNORED_FIELDS = ("resume",)  # how this launch resumes is no change of the run


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed with this config, and why (naming the field and both values)."""


@dataclasses.dataclass
class Checkpoint:
    """A DeepSpeed checkpoint tag folder ``<save_dir>/<tag>`` and what is known about how it was written."""

    save_dir: str
    tag: str
    world_size: int  # data-parallel ranks that wrote it
    zero_stage: int
    state: dict | None  # its run_state.json; None for a checkpoint without one (see read_checkpoint)
    note: str | None = None  # why this checkpoint and not the one asked for (find_checkpoint), for the log

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.tag)


def latest_tag(save_dir: str) -> str | None:
    """The tag DeepSpeed recorded as complete (its ``latest`` file is written after the save)."""
    path = os.path.join(save_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if tag and os.path.isdir(os.path.join(save_dir, tag)) else None


def _optim_ranks(tag_dir: str) -> list[int]:
    names = [os.path.basename(p) for p in glob.glob(os.path.join(tag_dir, "*optim_states.pt"))]
    return sorted({int(m.group(1)) for n in names if (m := re.match(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", n))})


def read_checkpoint(save_dir: str, tag: str) -> Checkpoint:
    """The checkpoint with its ``run_state.json``; without one (a run killed between DeepSpeed's save and
    that file, or a checkpoint of an older version) the world size is counted from the tag's
    ``zero_pp_rank_*optim_states.pt`` files and the stage read from its file names."""
    path = os.path.join(save_dir, tag)
    if not os.path.isdir(path):
        raise ResumeError(f"checkpoint {path} does not exist")
    state_path = os.path.join(path, RUN_STATE)
    if os.path.isfile(state_path):
        with open(state_path) as f:
            state = json.load(f)
        return Checkpoint(save_dir, tag, state["world_size"], state["zero_stage"], state)
    ranks = _optim_ranks(path)
    if not ranks:
        raise ResumeError(f"{path} is not a DeepSpeed ZeRO checkpoint: no zero_pp_rank_*optim_states.pt files")
    stage3 = not os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")) and glob.glob(os.path.join(path, "zero_pp_rank_*_model_states.pt"))
    return Checkpoint(save_dir, tag, len(ranks), 3 if stage3 else 2, None)


def find_checkpoint(resume: str, save_dir: str) -> Checkpoint | None:
    """The checkpoint to resume from (None: start fresh), for ``resume`` auto, never or a path; see the module docstring."""
    own = latest_tag(save_dir)
    if resume == "auto":
        if own is None and checkpoint_tags(save_dir):
            raise ResumeError(
                f"{save_dir} holds checkpoints ({', '.join(t for _, t in checkpoint_tags(save_dir))}) but no latest file naming a "
                "complete one (a run killed during its first save?): --resume one of them, or remove them to start afresh"
            )
        return read_checkpoint(save_dir, own) if own else None
    if resume == "never":
        if own or checkpoint_tags(save_dir):
            raise ResumeError(
                f"--resume never, but {save_dir} already holds checkpoints ({own or 'incomplete ones'}): a second run "
                "there would mix with the first; choose another --run-dir, or --resume auto to continue that run"
            )
        return None
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isfile(os.path.join(path, "latest")):  # a checkpoints folder
        tag = latest_tag(path)
        if tag is None:
            raise ResumeError(f"--resume {resume}: its latest file names no checkpoint folder there")
        parent = path
    elif glob.glob(os.path.join(path, "*_model_states.pt")):  # a tag folder
        parent, tag = os.path.split(path)
    else:
        raise ResumeError(f"--resume {resume}: neither a DeepSpeed checkpoint folder (*_model_states.pt) nor a checkpoints folder with a latest file")
    if own and os.path.realpath(parent) != os.path.realpath(save_dir):
        if _same_path(resume, _resumed_from(save_dir)):  # this run began from that checkpoint: a re-run of its command
            ckpt = read_checkpoint(save_dir, own)
            ckpt.note = (
                f"--resume {resume}: {save_dir} already holds this run's own checkpoints, begun from that one: "
                f"continuing from its latest, {ckpt.path}"
            )
            return ckpt
        raise ResumeError(
            f"--resume {resume}: {save_dir} already holds checkpoints of its own run ({own}), which did not begin from "
            f"{resume}; continuing another run's checkpoint there would mix the two: choose a new --run-dir, or "
            "--resume auto to continue the run already there"
        )
    return read_checkpoint(parent, tag)


def _same_path(a: str, b: set[str]) -> bool:
    return os.path.realpath(os.path.abspath(a.rstrip("/"))) in {os.path.realpath(os.path.abspath(p.rstrip("/"))) for p in b}


def _resumed_from(save_dir: str) -> set[str]:
    """The ``--resume`` paths the launches of the run in ``save_dir``'s folder were given, as recorded in its
    checkpoints' run_state.json and the run folder's train_config.json (auto and never left out)."""
    configs = []
    for _, tag in checkpoint_tags(save_dir):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(save_dir, tag, RUN_STATE)) as f:
                configs.append(json.load(f).get("train_config", {}))
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(os.path.dirname(os.path.abspath(save_dir)), "train_config.json")) as f:
            configs.append(json.load(f))
    return {c["resume"] for c in configs if isinstance(c, dict) and isinstance(c.get("resume"), str) and c["resume"] not in ("auto", "never")}


def checkpoint_tags(save_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of the checkpoints in ``save_dir``, oldest first: by samples seen when each has its
    run_state.json (a run resumed on another global batch renumbers its steps), else by step."""
    if not os.path.isdir(save_dir):
        return []
    tags = [(int(m.group(1)), d) for d in os.listdir(save_dir) if (m := re.fullmatch(r"step(\d+)", d))]
    samples = {}
    for _, tag in tags:
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(os.path.join(save_dir, tag, RUN_STATE)) as f:
                samples[tag] = json.load(f)["samples"]
    if len(samples) == len(tags):
        return sorted(tags, key=lambda t: (samples[t[1]], t[0]))
    return sorted(tags)


def tokenizer_fingerprint(path: str) -> str:
    """sha256 of the tokenizer file: the same tokenizer wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): value}


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict, str)) or value is None else str(value)


def config_changes(old: dict, new: dict, ignore: tuple[str, ...] = IGNORED_FIELDS) -> list[str]:
    """``field: old -> new`` for every field of two configs (dicts) that differs, in ``new``'s order."""
    lines = []
    for key in dict.fromkeys([*new, *old]):
        if key in ignore:
            continue
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a != b:
            lines.append(f"{key}: {_show(a)} -> {_show(b)}")
    return lines


def check_unchanged(state: dict, train_config: dict) -> None:
    """Raise ResumeError when a field that breaks the run (:data:`BREAKING_FIELDS`) differs from the checkpoint's."""
    old = state.get("train_config", {})
    for key in BREAKING_FIELDS:
        if key in old and old[key] != train_config.get(key):
            raise ResumeError(
                f"{key} changed: {_show(old[key])} in the checkpoint's run, {_show(train_config.get(key))} now; "
                f"{'which parameters train' if key != 'protocol' else 'the training mask'} cannot change within a run "
                f"(set {key}: {_show(old[key])} to resume, or start a new run with --run-dir and --model an exported model)"
            )


def check_model(state: dict, model_config: dict, tokenizer_sha256: str) -> None:
    """Raise ResumeError when the model's config (its shape) or the tokenizer differs from the checkpoint's."""
    old_tok = state.get("tokenizer", {}).get("sha256")
    if old_tok and old_tok != tokenizer_sha256:
        raise ResumeError(
            f"tokenizer changed: sha256 {old_tok[:12]}... ({state['tokenizer'].get('path')}) in the checkpoint's run, "
            f"{tokenizer_sha256[:12]}... now; the token ids would mean other words: use the run's tokenizer"
        )
    old, new = _flat(state.get("model_config", {})), _flat(model_config)
    changed = [f"model.{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    if state.get("model_config") and changed:
        raise ResumeError("the model changed since the checkpoint (its weights would not fit): " + "; ".join(changed))


def check_stage(ckpt: Checkpoint, zero_stage: int) -> None:
    """Raise ResumeError when the ZeRO stage changed: DeepSpeed loads a checkpoint, universal or not, only under
    the stage that wrote it (0.19.8: a stage-2 load finds no ``mp_rank_*`` files in a stage-3 checkpoint, and the
    reverse)."""
    if ckpt.zero_stage != zero_stage:
        raise ResumeError(
            f"ZeRO stage changed: {ckpt.zero_stage} in the checkpoint's run ({ckpt.path}), {zero_stage} now; DeepSpeed loads a "
            f"checkpoint only under the stage that wrote it: resume with a DeepSpeed JSON of stage {ckpt.zero_stage} (offload "
            "settings may differ), or start a new run from the export (--model)"
        )


def resume_step(samples: int, global_batch: int) -> tuple[int, int]:
    """(step, samples past it): the step at which a run that has seen ``samples`` continues with ``global_batch``."""
    return samples // global_batch, samples % global_batch


def schedule_step(samples: int, global_batch: int, skipped_samples: int = 0) -> int:
    """The learning-rate schedule's step for a run that has seen ``samples`` and continues with ``global_batch``.

    DeepSpeed steps the schedule only on an update it applies: an fp16 update that dynamic loss
    scaling skipped (an overflow; ``engine.skipped_steps``) does not step it, so an uninterrupted
    fp16 run at step s uses the lr of step s - skipped. ``skipped_samples``: the samples of the
    skipped updates (skipped x global batch while it did not change); they do not count."""
    return max(0, samples - skipped_samples) // global_batch


def write_run_state(checkpoint_dir: str, state: dict) -> None:
    from pipeline.outputs import write_json

    write_json(os.path.join(checkpoint_dir, RUN_STATE), state)


def set_schedule_step(scheduler, step: int) -> None:
    """Put a learning-rate scheduler where it is after ``step`` optimizer steps (the lr of update ``step`` next).

    torch's schedulers (the config's cosine, a ``LambdaLR``) count ``last_epoch`` from 0 at the
    first update; DeepSpeed's (WarmupLR and its kin, from a JSON ``scheduler`` block) count
    ``last_batch_iteration`` from -1."""
    import warnings

    import torch

    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": placing it is the point
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before", UserWarning)
            scheduler.step()
    else:
        scheduler.step(step - 1)


def needs_universal(ckpt: Checkpoint, world_size: int) -> bool:
    return ckpt.world_size != world_size


def universal_dir(save_dir: str) -> str:
    return os.path.join(save_dir, UNIVERSAL)


def convert_to_universal(ckpt: Checkpoint, save_dir: str, workers: int = 1) -> str:
    """Convert ``ckpt`` into ``<save_dir>/universal/<tag>`` (reused when already converted from the same
    checkpoint); returns that folder. Run by one rank, while the others wait.

    DeepSpeed's ``ds_to_universal`` (in a child process: it may start worker processes) writes
    the trainable parameters with their optimizer states; the frozen ones, which it leaves out,
    are written beside them (:data:`FROZEN`) from the checkpoint's model states.
    """
    out = os.path.join(universal_dir(save_dir), ckpt.tag)
    source = {"checkpoint": os.path.realpath(ckpt.path), "world_size": ckpt.world_size, "zero_stage": ckpt.zero_stage}
    if os.path.isfile(os.path.join(out, SOURCE)):
        with open(os.path.join(out, SOURCE)) as f:
            if json.load(f) == source:
                return out
    os.makedirs(universal_dir(save_dir), exist_ok=True)
    tmp = os.path.join(universal_dir(save_dir), f".{ckpt.tag}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed earlier
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ckpt.path, "--output_folder", tmp,
           "--num_extract_workers", str(workers), "--num_merge_workers", str(workers), "--inject_missing_state"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {ckpt.path} (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    import torch

    torch.save(frozen_parameters(ckpt.path, ckpt.zero_stage), os.path.join(tmp, FROZEN))
    with open(os.path.join(tmp, SOURCE), "w") as f:
        json.dump(source, f)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    with contextlib.suppress(FileNotFoundError):  # ds_to_universal's pointer at the temporary name
        os.remove(os.path.join(universal_dir(save_dir), "latest_universal"))
    return out


def frozen_parameters(tag_dir: str, zero_stage: int) -> dict:
    """name -> full tensor of the parameters that did not train, from a ZeRO checkpoint's model states
    (never its optimizer states): under ZeRO-0/1/2 the saved module minus the trainable parameters and
    the buffers; under ZeRO-3 DeepSpeed's ``zero_to_fp32`` merge of every rank's frozen fragments."""
    import torch
    from deepspeed.checkpoint.constants import BUFFER_NAMES, PARAM_SHAPES

    if zero_stage <= 2:
        state = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        skip = {name for group in state[PARAM_SHAPES] for name in group} | set(state[BUFFER_NAMES])
        return {k: v for k, v in state["module"].items() if k not in skip}
    from deepspeed.utils import zero_to_fp32

    files = sorted(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt")), key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p).group(1)))
    frozen: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        states = zero_to_fp32.parse_model_states(files)
        zero_to_fp32._zero3_merge_frozen_params(frozen, len(states), states)
    return {k: v.clone() for k, v in frozen.items()}


def load_frozen(model, universal: str) -> int:
    """Copy the checkpoint's frozen parameters (:data:`FROZEN`) into ``model``'s parameters that do not train;
    returns how many. The two sets must be equal, name for name and shape for shape."""
    import torch

    saved = torch.load(os.path.join(universal, FROZEN), map_location="cpu", weights_only=True)
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    if set(saved) != set(frozen):
        extra, missing = sorted(set(saved) - set(frozen)), sorted(set(frozen) - set(saved))
        raise ResumeError(f"the parameters that do not train differ from the checkpoint's: frozen there only {extra[:5]}, here only {missing[:5]}")
    with torch.no_grad():
        for name, p in frozen.items():
            if saved[name].shape != p.shape:
                raise ResumeError(f"{name}: shape {tuple(saved[name].shape)} in the checkpoint, {tuple(p.shape)} here")
            p.copy_(saved[name])
    return len(frozen)
