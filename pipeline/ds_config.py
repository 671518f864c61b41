"""The DeepSpeed JSON a user brings, filled from the training config and checked against it.

Users arrive with the DeepSpeed files of the projects they already train with (LLaVA's
``scripts/zero2.json``, the Hugging Face Trainer's documented examples): "auto" almost
everywhere, often an ``optimizer`` or ``scheduler`` block, sometimes an explicit
``train_batch_size``. They are resolved here the way Hugging Face's integration resolves
them (``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig``:
``trainer_config_process`` before the model exists, ``trainer_config_finalize`` after):

- "auto" takes the value derived from the training config (``Recipe``) or, for the bucket
  sizes, from the model's hidden size;
- an explicit value of a key that mirrors a config field (batch sizes, accumulation,
  clipping, lr, weight decay, precision, the scheduler's steps and peak) must agree with
  it: every disagreement is listed in one error;
- keys with no config field (Adam's betas and eps, warmup_min_lr, bucket sizes) are
  filled only where they say "auto";
- an ``optimizer`` block is used if it is Adam or AdamW (DeepSpeed builds its own: CPU
  Adam under ZeRO-Offload, fused Adam on GPUs); a ``scheduler`` block is used if it is
  WarmupLR, WarmupDecayLR or WarmupCosineLR, and then replaces the config's cosine
  schedule (``describe`` says so); any other type is refused;
- a scheduler parameter the chosen type does not take (HF's WarmupLR keys under
  WarmupCosineLR, say) is an error naming it and the type's parameters;
- after filling, any "auto" left anywhere is an error naming the key and what DeepSpeed
  accepts there; it is raised before the model is built, except for the three keys that
  wait for the model's hidden size (``MODEL_SIZE_KEYS``).
"""

from __future__ import annotations

import copy
import enum
import inspect
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass

ADAM_BETAS = (0.9, 0.98)  # the paper's (and the reference implementation's) AdamW
ADAM_EPS = 1e-6
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# "auto" keys filled from the model's hidden size, once the model is built (fill_model_sizes)
MODEL_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)
CONFIG_DOCS = "https://www.deepspeed.ai/docs/config-json/"


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that cannot be used with the training config, and why."""


@dataclass(frozen=True)
class Recipe:
    """What the JSON's "auto" values stand for: the training config, resolved for this run."""

    micro_batch: int
    grad_accum: int
    world_size: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    grad_clip: float
    precision: str  # bf16, fp16 or fp32 (resolved: see resolve_precision)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def gradient_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that micro_batch x accumulation x world_size = global_batch."""
    per_step = micro_batch * world_size
    if global_batch <= 0 or global_batch % per_step:
        raise DeepSpeedConfigError(
            f"global_batch {global_batch} is not a multiple of batch_size {micro_batch} x world size {world_size} = {per_step}: "
            f"choose a global batch divisible by {per_step}, or another batch_size or number of ranks"
        )
    return global_batch // per_step


def resolve_precision(
    requested: str, ds: dict, *, cuda: bool, bf16_supported: bool, fp16_supported: bool
) -> str:
    """bf16, fp16 or fp32 for this run.

    auto: an fp16 or bf16 section of the JSON that says ``"enabled": true`` (exactly one);
    else bf16 on a GPU that has it, fp16 on an older GPU, fp32 on a CPU.
    ``fp16_supported``: on a CPU, whether DeepSpeed's CPU accelerator runs fp16 (it needs
    oneDNN fp16 kernels: AVX512-FP16 or AMX-FP16); fp16 is refused where it does not.
    """
    if requested not in PRECISIONS:
        raise DeepSpeedConfigError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        chosen = [p for p in ("bf16", "fp16") if _node(ds, f"{p}.enabled") is True]
        if len(chosen) == 1:
            requested = chosen[0]
        elif cuda:
            requested = "bf16" if bf16_supported else "fp16"
        else:
            requested = "fp32"
    if requested == "fp16" and not cuda and not fp16_supported:
        raise DeepSpeedConfigError(
            "precision fp16 on this CPU: DeepSpeed's CPU accelerator runs fp16 only where oneDNN has fp16 kernels "
            "(CPUs with AVX512-FP16 or AMX-FP16), and this one has none; use bf16 or fp32 here, fp16 on a GPU"
        )
    if requested == "bf16" and cuda and not bf16_supported:
        raise DeepSpeedConfigError(
            "precision bf16: this GPU has no bf16 support (it predates Ampere); use fp16 or fp32"
        )
    return requested


class _Filler:
    """HF's ``fill_match`` / ``fill_only`` on a copy of the JSON, collecting disagreements."""

    def __init__(self, ds: dict):
        self.ds = copy.deepcopy(ds)
        self.mismatches: list[str] = []

    def fill(self, key: str, value, config_field: str | None = None, if_absent: bool = False) -> None:
        """An "auto" becomes ``value``, and so does an absent key of an existing section when ``config_field``
        or ``if_absent`` is given; with ``config_field``, an explicit different value is a disagreement."""
        parent, leaf = self._parent(key)
        if parent is None:
            return
        current = parent.get(leaf)
        if current == "auto" or (current is None and (config_field is not None or if_absent)):
            parent[leaf] = value
        elif config_field is not None and not _same(current, value):
            self.mismatches.append(
                f"- {key} = {current!r} in the DeepSpeed JSON, but {config_field} = {value!r} in the training config"
            )

    def _parent(self, key: str) -> tuple[dict | None, str]:
        *path, leaf = key.split(".")
        node = self.ds
        for part in path:
            node = node.get(part)
            if not isinstance(node, dict):
                return None, leaf
        return node, leaf

    def raise_mismatches(self) -> None:
        if self.mismatches:
            raise DeepSpeedConfigError(
                "the DeepSpeed JSON disagrees with the training config:\n"
                + "\n".join(self.mismatches)
                + '\nset these keys to "auto" (they then follow the config), or change the config to match'
            )


def fill_deepspeed_config(ds: dict, recipe: Recipe) -> dict:
    """The JSON with every config-derived "auto" filled (HF's ``trainer_config_process`` and the
    scheduler part of ``trainer_config_finalize``); raises DeepSpeedConfigError on a disagreement
    or an unsupported optimizer/scheduler. The hidden-size keys wait for ``fill_model_sizes``."""
    f = _Filler(ds)
    _check_batch(f.ds, recipe)
    f.fill("train_micro_batch_size_per_gpu", recipe.micro_batch, "batch_size")
    f.fill(
        "gradient_accumulation_steps",
        recipe.grad_accum,
        "gradient accumulation (global_batch / (batch_size x world size), or grad_accum)",
    )
    f.ds["train_batch_size"] = recipe.global_batch  # checked above when explicit
    f.fill("gradient_clipping", recipe.grad_clip, "grad_clip")

    for section in ("fp16", "bf16"):
        f.fill(f"{section}.enabled", recipe.precision == section, f"precision ({recipe.precision})")
        if recipe.precision == section and section not in f.ds:
            f.ds[section] = {"enabled": True}
    if recipe.precision == "fp16":
        f.ds["fp16"].setdefault("loss_scale", 0)  # 0: dynamic loss scaling, as the reference trained

    if "optimizer" in f.ds:
        kind = str(f.ds["optimizer"].get("type", ""))
        if kind.lower() not in OPTIMIZERS:
            raise DeepSpeedConfigError(
                f"optimizer type {kind!r} in the DeepSpeed JSON: training uses AdamW (the paper's recipe); "
                'write "type": "AdamW" (DeepSpeed then builds its CPU or fused Adam) or remove the optimizer block'
            )
        f.ds["optimizer"].setdefault("params", {})
        f.fill("optimizer.params.lr", recipe.lr, "lr")
        f.fill("optimizer.params.weight_decay", recipe.weight_decay, "weight_decay")
        f.fill(
            "optimizer.params.betas", list(ADAM_BETAS), if_absent=True
        )  # the recipe's, not DeepSpeed's defaults
        f.fill("optimizer.params.eps", ADAM_EPS, if_absent=True)

    if "scheduler" in f.ds:
        kind = f.ds["scheduler"].get("type")
        if kind not in SCHEDULERS:
            raise DeepSpeedConfigError(
                f"scheduler type {kind!r} in the DeepSpeed JSON is not supported: use one of {', '.join(SCHEDULERS)}, "
                "or remove the scheduler block to use the config's schedule (linear warmup, cosine decay to min_lr)"
            )
        f.ds["scheduler"].setdefault("params", {})
        _check_scheduler_params(kind, f.ds["scheduler"]["params"])
        warmup = max(1, recipe.warmup_steps)  # DeepSpeed refuses 0 warmup steps
        if kind in ("WarmupLR", "WarmupDecayLR"):
            f.fill("scheduler.params.warmup_min_lr", 0.0)
            f.fill("scheduler.params.warmup_max_lr", recipe.lr, "lr")
        else:  # WarmupCosineLR scales the optimizer's lr by ratios
            f.fill("scheduler.params.warmup_min_ratio", 0.0)
            f.fill("scheduler.params.cos_min_ratio", recipe.min_lr / recipe.lr, "min_lr / lr")
        f.fill("scheduler.params.warmup_num_steps", warmup, "warmup_steps")
        if kind != "WarmupLR":
            f.fill("scheduler.params.total_num_steps", recipe.total_steps, "total steps")

    f.raise_mismatches()
    _refuse_auto(f.ds, allowed=MODEL_SIZE_KEYS)  # before the model is built: a typo costs no loading
    f.ds.setdefault("steps_per_print", 10**9)  # progress is the job's to print
    return f.ds


def fill_model_sizes(ds: dict, hidden_size: int) -> dict:
    """The hidden-size "auto" keys (HF's ``trainer_config_finalize``), then the check that no "auto" is left.

    reduce_bucket_size = h², stage3_prefetch_bucket_size = 0.9 h², stage3_param_persistence_threshold = 10 h
    (the Hugging Face values; the stage-3 keys are filled for any stage so that none stays "auto").
    """
    f = _Filler(ds)
    bucket, prefetch, persistence = MODEL_SIZE_KEYS
    f.fill(bucket, hidden_size * hidden_size)
    f.fill(prefetch, int(0.9 * hidden_size * hidden_size))
    f.fill(persistence, 10 * hidden_size)
    _refuse_auto(f.ds)
    return f.ds


def _refuse_auto(ds: dict, allowed: tuple[str, ...] = ()) -> None:
    """An error naming every "auto" left (but ``allowed``) and what DeepSpeed accepts at each."""
    left = [key for key in auto_keys(ds) if key not in allowed]
    if left:
        raise DeepSpeedConfigError(
            '"auto" in the DeepSpeed JSON that nothing in the training config fills:\n'
            + "\n".join(f"- {key}: {deepspeed_accepts(key)}" for key in left)
            + "\nput a value there, or remove the key to take DeepSpeed's default"
        )


def deepspeed_accepts(key: str) -> str:
    """What a value at ``key`` may be, from DeepSpeed's own declarations: the ZeRO sections' config
    models (choices, type, default), else its ``<KEY>_DEFAULT`` constants, else its config reference."""
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    section, _, leaf = key.rpartition(".")
    model = {
        "zero_optimization": DeepSpeedZeroConfig,
        "zero_optimization.offload_optimizer": DeepSpeedZeroOffloadOptimizerConfig,
        "zero_optimization.offload_param": DeepSpeedZeroOffloadParamConfig,
    }.get(section)  # fmt: skip
    for name, field in model.model_fields.items() if model else ():
        if leaf in (name, field.alias):
            kinds = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
            if len(kinds) == 1 and isinstance(kinds[0], type) and issubclass(kinds[0], enum.Enum):
                return "one of " + ", ".join(_json(member) for member in kinds[0])
            default = None if field.is_required() or field.default_factory is not None else field.default
            said = f"DeepSpeed's default is {_json(default)}" if default is not None else ""
            return f"true or false{'; ' + said if said else ''}" if kinds == [bool] else said or f"see {CONFIG_DOCS}"
    constant = key.replace(".", "_").upper().replace("BF16_", "BFLOAT16_", 1) + "_DEFAULT"
    if hasattr(constants, constant):
        return f"DeepSpeed's default is {_json(getattr(constants, constant))}"
    return f"see {CONFIG_DOCS}"


def _json(value) -> str:
    """``value`` as the JSON a user would write (an enum by its value, anything else JSON lacks as a string)."""
    return json.dumps(value.value if isinstance(value, enum.Enum) else value, default=str)


def _check_scheduler_params(kind: str, params: dict) -> None:
    """Refuse parameters DeepSpeed's ``kind`` scheduler does not take (it would fail building it, after the model)."""
    from deepspeed.runtime import lr_schedules

    taken = [p for p in inspect.signature(getattr(lr_schedules, kind)).parameters if p != "optimizer"]
    unknown = [p for p in params if p not in taken]
    if unknown:
        raise DeepSpeedConfigError(
            f"scheduler.params {', '.join(unknown)}: DeepSpeed's {kind} takes no such parameter "
            f"(it takes {', '.join(taken)}); remove {'them' if len(unknown) > 1 else 'it'} or change the scheduler type"
        )


def auto_keys(node, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every value that is still "auto"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from auto_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from auto_keys(value, f"{prefix}{i}.")
    elif node == "auto":
        yield prefix.rstrip(".")


def optimizer_offloaded(ds: dict) -> bool:
    """ZeRO-Offload of the optimizer states (to the CPU or NVMe)."""
    device = (_node(ds, "zero_optimization.offload_optimizer") or {}).get("device", "none")
    return device in ("cpu", "nvme")


def describe(ds: dict, recipe: Recipe, cuda: bool) -> dict:
    """Which optimizer and learning-rate schedule the run uses, in words (printed at start)."""
    if "optimizer" in ds:
        if optimizer_offloaded(ds):
            built = "DeepSpeedCPUAdam, optimizer offload"
        elif ds["optimizer"]["params"].get("torch_adam"):
            built = "torch AdamW, torch_adam"
        else:
            built = "its FusedAdam"
        optimizer = f"{ds['optimizer']['type']} from the DeepSpeed JSON, built by DeepSpeed ({built})"
    elif optimizer_offloaded(ds):
        optimizer = "AdamW: DeepSpeedCPUAdam (optimizer offload)"
    else:
        optimizer = f"AdamW: torch.optim.AdamW{' (fused)' if cuda else ''}"
    if "scheduler" in ds:
        kind, params = ds["scheduler"]["type"], dict(ds["scheduler"]["params"])
        params.setdefault("warmup_type", "log (DeepSpeed's default)")
        schedule = (
            f"{kind} from the DeepSpeed JSON ({', '.join(f'{k}={v}' for k, v in params.items())}); "
            f"it replaces the config's schedule (linear warmup, cosine decay to min_lr {recipe.min_lr})"
        )
    elif recipe.warmup_steps >= recipe.total_steps:  # a short run: the peak would come at step warmup_steps, after the last
        schedule = (
            f"linear warmup over {recipe.warmup_steps} steps to lr {recipe.lr}, warmup not finished by step {recipe.total_steps}; "
            f"no decay (transformers' get_cosine_with_min_lr_schedule_with_warmup)"
        )
    else:
        schedule = (
            f"linear warmup over {recipe.warmup_steps} steps to lr {recipe.lr}, cosine decay to min_lr {recipe.min_lr} "
            f"at step {recipe.total_steps} (transformers' get_cosine_with_min_lr_schedule_with_warmup)"
        )
    return {"optimizer": optimizer, "lr_schedule": schedule, "precision": recipe.precision}


def _check_batch(ds: dict, r: Recipe) -> None:
    explicit = ds.get("train_batch_size", "auto")
    if explicit != "auto" and explicit != r.global_batch:
        raise DeepSpeedConfigError(
            f"train_batch_size {explicit} in the DeepSpeed JSON disagrees with micro batch {r.micro_batch} (batch_size) "
            f"x gradient accumulation {r.grad_accum} x world size {r.world_size} = {r.global_batch}; "
            f'set it to "auto", or set global_batch: {explicit} in the training config'
        )


def _node(ds: dict, key: str):
    node = ds
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
