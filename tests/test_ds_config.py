"""DeepSpeed JSON files as users bring them (tests/user_ds_configs.py, verbatim): filled as the
Hugging Face integration fills them, contradictions refused, and each one training under the
real launcher."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types

import pytest
import torch

from pipeline.ds_config import (
    ADAM_BETAS,
    ADAM_EPS,
    MODEL_SIZE_KEYS,
    DeepSpeedConfigError,
    Recipe,
    auto_keys,
    deepspeed_accepts,
    describe,
    fill_deepspeed_config,
    fill_model_sizes,
    resolve_precision,
)
from pipeline.training import MetricsLog, lr_schedule, zero_memory_estimate
from tests.test_train import _launch
from tests.user_ds_configs import LLAVA_ZERO2, USER_CONFIGS

RECIPE = Recipe(
    micro_batch=4,
    grad_accum=2,
    world_size=2,
    lr=2e-3,
    min_lr=1e-4,
    weight_decay=0.05,
    warmup_steps=3,
    total_steps=10,
    grad_clip=1.0,
    precision="fp32",
)


def _filled(text: str, recipe: Recipe = RECIPE, hidden: int = 128, **changes) -> dict:
    return fill_model_sizes(fill_deepspeed_config(json.loads(text) | changes, recipe), hidden)


def _hugging_face(text: str, recipe: Recipe, hidden: int) -> dict:
    """What transformers' Trainer makes of the same JSON with the same settings (its own code)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(json.loads(text))
    args = types.SimpleNamespace(
        world_size=recipe.world_size, per_device_train_batch_size=recipe.micro_batch, gradient_accumulation_steps=recipe.grad_accum,
        max_grad_norm=recipe.grad_clip, learning_rate=recipe.lr, adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1],
        adam_epsilon=ADAM_EPS, weight_decay=recipe.weight_decay, save_on_each_node=False, fp16=recipe.precision == "fp16",
        fp16_full_eval=False, bf16=recipe.precision == "bf16", bf16_full_eval=False, get_warmup_steps=lambda total: recipe.warmup_steps,
    )  # fmt: skip
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(
        args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden)), recipe.total_steps
    )
    return hf.config


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(USER_CONFIGS))
def test_user_configs_are_filled_as_hugging_face_fills_them(name, precision):
    recipe = dataclasses.replace(RECIPE, precision=precision)
    ours, theirs = (
        _flat(_filled(USER_CONFIGS[name], recipe)),
        _flat(_hugging_face(USER_CONFIGS[name], recipe, 128)),
    )
    assert [k for k in ours if ours[k] == "auto"] == []
    assert {k: ours.get(k) for k in theirs} == theirs
    # beyond Hugging Face: keys the JSON lacks are set from the config too (DeepSpeed's own defaults
    # would differ from it), and a precision section the JSON lacks is added
    added = set(ours) - set(theirs)
    assert added <= {"gradient_clipping", "steps_per_print", "bf16.enabled"}, added
    assert ours.get("gradient_clipping") == 1.0 and ours.get("bf16.enabled", False) is (precision == "bf16")
    assert ours.get("fp16.enabled", False) is (precision == "fp16")


def test_hidden_size_keys_are_hugging_faces():
    filled = _filled(USER_CONFIGS["llava_zero3"], hidden=4096)["zero_optimization"]
    assert filled["reduce_bucket_size"] == 4096**2
    assert filled["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert filled["stage3_param_persistence_threshold"] == 40960


def test_contradictory_train_batch_size_names_micro_batch_accumulation_and_world_size():
    with pytest.raises(DeepSpeedConfigError) as err:
        _filled(LLAVA_ZERO2, train_batch_size=64)
    message = str(err.value)
    for part in (
        "train_batch_size 64",
        "micro batch 4",
        "gradient accumulation 2",
        "world size 2",
        "= 16",
        "global_batch: 64",
    ):
        assert part in message, message


def test_explicit_values_that_contradict_the_config_are_listed_together():
    ds = json.loads(USER_CONFIGS["hf_zero2"])
    ds["train_micro_batch_size_per_gpu"] = 8
    ds["gradient_clipping"] = 0.5
    ds["optimizer"]["params"]["lr"] = 3e-5
    ds["scheduler"]["params"]["warmup_num_steps"] = 500
    with pytest.raises(DeepSpeedConfigError) as err:
        fill_deepspeed_config(ds, RECIPE)
    message = str(err.value)
    for key in (
        "train_micro_batch_size_per_gpu = 8",
        "gradient_clipping = 0.5",
        "optimizer.params.lr = 3e-05",
        "scheduler.params.warmup_num_steps = 500",
    ):
        assert key in message, message
    # values with no config field are the user's to set: kept as written
    ds = json.loads(USER_CONFIGS["hf_zero2"])
    ds["optimizer"]["params"] |= {"betas": [0.8, 0.999], "eps": 1e-8, "lr": 2e-3}
    kept = fill_deepspeed_config(ds, RECIPE)["optimizer"]["params"]
    assert kept == {"lr": 2e-3, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 0.05}


def test_optimizer_and_scheduler_types_outside_the_recipe_are_refused():
    ds = json.loads(USER_CONFIGS["hf_zero2"])
    with pytest.raises(DeepSpeedConfigError, match="optimizer type 'Lamb'.*AdamW"):
        fill_deepspeed_config(ds | {"optimizer": {"type": "Lamb", "params": {}}}, RECIPE)
    with pytest.raises(
        DeepSpeedConfigError, match="scheduler type 'OneCycle'.*WarmupLR, WarmupDecayLR, WarmupCosineLR"
    ):
        fill_deepspeed_config(ds | {"scheduler": {"type": "OneCycle", "params": {}}}, RECIPE)


def test_an_auto_nothing_fills_is_refused_by_name_with_what_deepspeed_accepts_there():
    ds = json.loads(LLAVA_ZERO2)
    ds["zero_optimization"]["offload_optimizer"] = {"device": "auto"}
    ds["fp16"]["loss_scale_window"] = "auto"
    ds["zero_optimization"]["overlap_comm"] = "auto"
    ds["zero_allow_untested_optimizer"] = "auto"
    ds["activation_checkpointing"] = {"partition_activations": "auto"}
    # refused by fill_deepspeed_config, which jobs.train calls before it builds the model
    with pytest.raises(DeepSpeedConfigError) as err:
        fill_deepspeed_config(ds, RECIPE)
    lines = str(err.value).splitlines()
    assert lines[0] == '"auto" in the DeepSpeed JSON that nothing in the training config fills:'
    assert lines[1:-1] == [
        # DeepSpeed's own declarations: an enum's choices, a bool, a default constant, else its docs
        "- fp16.loss_scale_window: DeepSpeed's default is 1000",
        "- zero_optimization.overlap_comm: true or false",
        '- zero_optimization.offload_optimizer.device: one of "none", "cpu", "nvme"',
        "- zero_allow_untested_optimizer: DeepSpeed's default is false",
        "- activation_checkpointing.partition_activations: see https://www.deepspeed.ai/docs/config-json/",
    ]
    assert lines[-1] == "put a value there, or remove the key to take DeepSpeed's default"


def test_every_zero_key_gets_an_answer():
    """Whatever DeepSpeed's config models declare (enums, bools, defaults made by factories, paths), the
    refusal says something for each key, by its name or its stage3_ alias."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadParamConfig

    for section, model in (("zero_optimization", DeepSpeedZeroConfig), ("zero_optimization.offload_param", DeepSpeedZeroOffloadParamConfig)):
        for name, field in model.model_fields.items():
            for leaf in {name, field.alias} - {None}:
                answer = deepspeed_accepts(f"{section}.{leaf}")
                assert answer.startswith(("one of ", "true or false", "DeepSpeed's default is ", "see https://")), (leaf, answer)
    assert deepspeed_accepts("zero_optimization.stage3_max_live_parameters") == "DeepSpeed's default is 1000000000"


def test_only_the_hidden_size_keys_wait_for_the_model():
    ds = fill_deepspeed_config(json.loads(USER_CONFIGS["hf_zero3"]), RECIPE)  # HF's ZeRO-3 example: all three "auto"
    assert sorted(auto_keys(ds)) == sorted(MODEL_SIZE_KEYS)
    assert list(auto_keys(fill_model_sizes(ds, 128))) == []
    with pytest.raises(DeepSpeedConfigError) as err:  # the check runs again once they are filled
        fill_model_sizes(ds | {"extra": "auto"}, 128)
    assert str(err.value).splitlines()[1:-1] == ["- extra: see https://www.deepspeed.ai/docs/config-json/"]


def test_scheduler_parameters_the_type_does_not_take_are_refused_by_name():
    """Hugging Face's ZeRO-3 example with its scheduler switched to WarmupCosineLR keeps WarmupLR's keys:
    DeepSpeed would fail building the scheduler, after the model; refused at once, with the type's own keys."""
    ds = json.loads(USER_CONFIGS["hf_zero3"])
    ds["scheduler"]["type"] = "WarmupCosineLR"
    with pytest.raises(DeepSpeedConfigError) as err:
        fill_deepspeed_config(ds, RECIPE)
    assert str(err.value) == (
        "scheduler.params warmup_min_lr, warmup_max_lr: DeepSpeed's WarmupCosineLR takes no such parameter (it takes "
        "total_num_steps, warmup_min_ratio, warmup_num_steps, cos_min_ratio, warmup_type, last_batch_iteration); "
        "remove them or change the scheduler type"
    )


def test_an_enabled_precision_section_that_contradicts_the_config_is_named():
    with pytest.raises(DeepSpeedConfigError, match=r"fp16.enabled = True in the DeepSpeed JSON, but precision \(bf16\)"):
        fill_deepspeed_config(json.loads(USER_CONFIGS["hf_zero2"]) | {"fp16": {"enabled": True}}, dataclasses.replace(RECIPE, precision="bf16"))


@pytest.mark.parametrize("kind", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_scheduler_blocks_are_filled_and_used_as_deepspeed_defines_them(kind):
    from deepspeed.runtime import lr_schedules

    auto = {"warmup_num_steps": "auto", "warmup_type": "linear"}
    auto |= (
        {"warmup_min_lr": "auto", "warmup_max_lr": "auto"}
        if kind != "WarmupCosineLR"
        else {"cos_min_ratio": "auto"}
    )
    if kind != "WarmupLR":
        auto["total_num_steps"] = "auto"
    ds = _filled(LLAVA_ZERO2, scheduler={"type": kind, "params": auto})
    params = ds["scheduler"]["params"]
    assert params["warmup_num_steps"] == RECIPE.warmup_steps and "auto" not in params.values()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=RECIPE.lr)
    schedule = getattr(lr_schedules, kind)(optimizer, **params)
    lrs = []
    for _ in range(RECIPE.total_steps + 2):  # the last entry: after total_num_steps
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    # DeepSpeed's curves: WarmupCosineLR starts its cosine a step early, so it peaks just below lr
    assert (
        max(lrs) == pytest.approx(RECIPE.lr, rel=0.1 if kind == "WarmupCosineLR" else 1e-12)
        and max(lrs) <= RECIPE.lr
    )
    end = {"WarmupLR": RECIPE.lr, "WarmupDecayLR": 0.0, "WarmupCosineLR": RECIPE.min_lr}[kind]
    assert lrs[-1] == pytest.approx(end)
    assert "replaces the config's schedule" in describe(ds, RECIPE, cuda=False)["lr_schedule"]


@pytest.mark.parametrize(
    "requested, ds, cuda, bf16, fp16, expected",
    [
        ("auto", {}, False, True, True, "fp32"),
        ("auto", {}, True, True, True, "bf16"),
        ("auto", {}, True, False, True, "fp16"),
        ("auto", {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, True, True, True, "bf16"),
        ("auto", {"fp16": {"enabled": True}}, True, True, True, "fp16"),
        ("fp32", {}, True, True, True, "fp32"),
        ("fp16", {}, False, True, True, "fp16"),
        ("bf16", {}, False, True, False, "bf16"),
    ],
)
def test_precision(requested, ds, cuda, bf16, fp16, expected):
    assert resolve_precision(requested, ds, cuda=cuda, bf16_supported=bf16, fp16_supported=fp16) == expected


def test_fp16_is_refused_on_a_cpu_without_fp16_kernels():
    with pytest.raises(DeepSpeedConfigError, match="fp16 only where oneDNN has fp16 kernels"):
        resolve_precision("fp16", {}, cuda=False, bf16_supported=True, fp16_supported=False)
    with pytest.raises(DeepSpeedConfigError, match="no bf16 support"):
        resolve_precision("bf16", {}, cuda=True, bf16_supported=False, fp16_supported=True)


def _printed_estimate(capsys, printer, model, ranks: int, options: dict) -> tuple[float, float]:
    """(per GPU, per CPU) GB from the table the ``*_all_live`` printer writes, on the row of ``options``."""
    printer(model, num_gpus_per_node=ranks)
    for line in capsys.readouterr().out.splitlines():
        if line.count("|") == 2 and "=" in line:
            cpu, gpu, opts = line.split("|")
            row = dict(o.strip().split("=") for o in opts.split(","))
            row = {k: "cpu" if "cpu" in v else v for k, v in row.items()}  # "OffloadDeviceEnum.cpu" or "cpu "
            if row == options:
                return float(gpu.strip().removesuffix("GB")), float(cpu.strip().removesuffix("GB"))
    raise AssertionError(f"no line for {options}")


@pytest.mark.parametrize("stage", [2, 3])
def test_memory_estimate_is_deepspeeds_own(capsys, stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    from model.config import tiny_config
    from model.nxtp import NxTP

    model = NxTP(tiny_config(32000, image_size=64))
    zero = {"stage": stage, "offload_optimizer": {"device": "cpu"}} | (
        {"offload_param": {"device": "cpu"}} if stage == 3 else {}
    )
    ours = zero_memory_estimate(model, {"zero_optimization": zero}, world_size=4, ranks_per_node=4)
    if stage == 2:
        printed = _printed_estimate(
            capsys, estimate_zero2_model_states_mem_needs_all_live, model, 4, {"offload_optimizer": "cpu"}
        )
    else:
        printed = _printed_estimate(
            capsys,
            estimate_zero3_model_states_mem_needs_all_live,
            model,
            4,
            {"offload_param": "cpu", "offload_optimizer": "cpu", "zero_init": "0"},
        )
    # the printer writes 2 decimals, the estimate keeps 3
    assert (
        ours["all_parameters"]["per_device_GiB"],
        ours["all_parameters"]["cpu_per_node_GiB"],
    ) == pytest.approx(printed, abs=0.0056)
    for p in model.vision.parameters():
        p.requires_grad = False
    frozen = zero_memory_estimate(model, {"zero_optimization": zero}, world_size=4, ranks_per_node=4)
    assert frozen["trainable_parameters"]["parameters"] < frozen["all_parameters"]["parameters"]


# -- under the launcher

STEPS = 3


@pytest.fixture(scope="module")
def launch_config(labelled_shards, world):
    shards, labels = labelled_shards["train"]
    return {
        "model": "tiny", "tokenizer": world.tokenizer, "image_size": 64, "data": [{"name": "world", "shards": shards, "labels": labels}],
        "train_vision_blocks": -1, "train_embeddings": "all", "batch_size": 4, "lr": 2e-3, "min_lr": 1e-4, "warmup_steps": 4,
        "steps": STEPS, "save_every": 100, "log_every": 1, "num_workers": 0, "shuffle_buffer": 8, "max_text_len": 48, "seed": 3,
        "grad_clip": 1.0, "export": False,
    }  # fmt: skip


def schedule_lrs(make_schedule, lr: float, steps: int) -> list[float]:
    """The lr of each of ``steps`` updates under ``make_schedule(optimizer)`` from ``lr``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = make_schedule(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def _expected_lrs(saved: dict, lr: float, warmup: int, total: int, min_lr: float) -> list[float]:
    """The lr of each update: DeepSpeed's scheduler from the saved block, or the config's schedule."""
    if "scheduler" in saved:
        from deepspeed.runtime import lr_schedules

        def make(optimizer):
            return getattr(lr_schedules, saved["scheduler"]["type"])(optimizer, **saved["scheduler"]["params"])
    else:

        def make(optimizer):
            return lr_schedule(optimizer, warmup, total, min_lr)

    return schedule_lrs(make, lr, STEPS)


@pytest.mark.launcher
@pytest.mark.parametrize("name", sorted(USER_CONFIGS))
def test_user_config_trains_under_the_launcher(name, launch_config, repo_root, tmp_path):
    path = tmp_path / f"{name}.json"
    path.write_text(USER_CONFIGS[name])  # verbatim
    run = str(tmp_path / "run")
    # ZeRO-3 with activation checkpointing (parameters gathered again for the recomputation)
    checkpointing = name == "llava_zero3"
    output = _launch(repo_root, dict(launch_config, activation_checkpointing=checkpointing), str(path), run)
    assert f'"activation_checkpointing": {str(checkpointing).lower()}' in output
    saved = json.load(open(os.path.join(run, "ds_config.json")))
    assert list(auto_keys(saved)) == [] and '"auto"' not in open(os.path.join(run, "ds_config.json")).read()
    assert (
        saved["train_micro_batch_size_per_gpu"],
        saved["gradient_accumulation_steps"],
        saved["train_batch_size"],
    ) == (4, 1, 8)
    assert saved["gradient_clipping"] == 1.0 and saved["fp16"]["enabled"] is False
    if json.loads(USER_CONFIGS[name])["zero_optimization"]["reduce_bucket_size"] == "auto":
        assert saved["zero_optimization"]["reduce_bucket_size"] == 128 * 128  # the tiny model's hidden size, squared
    assert "deepspeed config (filled)" in output
    # export off and save_every past the last step: no checkpoint and no export written
    saves = os.path.join(run, "checkpoints")
    assert not os.path.exists(os.path.join(run, "export")) and not (os.path.isdir(saves) and os.listdir(saves))
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all(
        math.isfinite(r["loss"]) for r in rows
    )
    expected = _expected_lrs(saved, 2e-3, 4, STEPS, 1e-4)
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if (
        "scheduler" in saved
    ):  # the JSON's WarmupLR, with lr and warmup filled in, replaces the config's cosine
        assert saved["scheduler"]["params"] == {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 2e-3,
            "warmup_num_steps": 4,
        }
        assert expected != _expected_lrs({}, 2e-3, 4, STEPS, 1e-4)
        assert "WarmupLR from the DeepSpeed JSON" in output and "replaces the config's schedule" in output
        assert saved["optimizer"]["params"] == {
            "lr": 2e-3,
            "betas": list(ADAM_BETAS),
            "eps": ADAM_EPS,
            "weight_decay": 0.1,
        }


@pytest.mark.launcher
def test_contradictory_train_batch_size_stops_the_job_before_training(launch_config, repo_root, tmp_path):
    ds = json.loads(LLAVA_ZERO2) | {"train_batch_size": 32}
    path = tmp_path / "contradiction.json"
    path.write_text(json.dumps(ds))
    run = str(tmp_path / "run")
    output = _launch(repo_root, launch_config, str(path), run, expect_code=2, console_script=True)  # nxtp-train, for real
    assert "cmd = " in output and "jobs/train.py" in output  # the deepspeed launcher's own line: nxtp-train exec'd it
    assert (
        "error: train_batch_size 32 in the DeepSpeed JSON disagrees with micro batch 4 (batch_size) x gradient accumulation 1 x world size 2 = 8"
        in output
    )
    assert output.count("error: train_batch_size 32") == 1, "said once, not once per rank"
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))


@pytest.mark.launcher
def test_fp16_with_dynamic_loss_scaling_or_a_clear_refusal(launch_config, repo_root, tmp_path):
    """fp16 runs on a CPU where DeepSpeed's CPU accelerator has fp16 (oneDNN fp16 kernels);
    elsewhere the job refuses it before building anything."""
    from deepspeed.accelerator import get_accelerator

    run = str(tmp_path / "run")
    if not get_accelerator().is_fp16_supported():
        output = _launch(repo_root, dict(launch_config, precision="fp16"), "zero2", run, expect_code=2)
        assert "error: precision fp16 on this CPU" in output
        return
    _launch(repo_root, dict(launch_config, precision="fp16"), "zero2", run)
    saved = json.load(open(os.path.join(run, "ds_config.json")))
    assert saved["fp16"] == {"enabled": True, "loss_scale": 0} and saved["bf16"]["enabled"] is False
    rows = MetricsLog.read(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all(
        math.isfinite(r["loss"]) for r in rows
    )
    for r in rows:  # DeepSpeed's dynamic scale: 2^16 to start (initial_scale_power), halved after overflows
        assert r["loss_scale"] in [2.0**p for p in range(17)] and 0 <= r["skipped_steps"] <= r["step"], rows
    assert rows[-1]["skipped_steps"] < STEPS or rows[-1]["loss_scale"] < 2.0**16
