"""jobs._cli: a YAML preset's values as the fields' types, or a usage error naming the field."""

from __future__ import annotations

import pytest

from jobs._cli import _preset, parse
from jobs.train import TrainConfig


def _parse(tmp_path, text: str, *flags: str) -> TrainConfig:
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    return parse(TrainConfig, ["--config", str(preset), "--deepspeed", "jobs/configs/zero2.json", *flags], prog="train", description=None)


def test_numbers_yaml_reads_as_text_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 3e-5 as a string: the preset means a float."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("lr: 3e-5\nmin_lr: 1e-6\nsteps: 10\ndata:\n  - {name: a, shards: /s, labels: /l, weight: auto}\n")
    defaults = _preset(TrainConfig, ["--config", str(preset)])
    assert (defaults.lr, defaults.min_lr, defaults.steps) == (3e-5, 1e-6, 10) and isinstance(defaults.lr, float)
    assert [(d.name, d.weight) for d in defaults.data] == [("a", "auto")]


@pytest.mark.parametrize(
    "text, said",
    [
        ("steps: ten\n", "steps: 'ten' is not a whole number"),
        ("steps: 2.5\n", "steps: 2.5 is not a whole number"),
        ("lr: fast\n", "lr: 'fast' is not a number"),
        ("lr: .nan\n", "lr: nan: this field takes a finite number"),
        ("prompt_augmentation: maybe\n", "prompt_augmentation: 'maybe' is not true or false"),
        ("data:\n  - {name: a, shards: /s, labels: /l, wieght: 2}\n", "data[0]: unknown key(s) ['wieght'] (an entry takes name, shards, labels, weight, batch_size)"),
        ("data:\n  - {name: a, shards: /s}\n", "data[0]: DatasetSpec.__init__() missing 1 required positional argument: 'labels'"),
    ],
)
def test_a_value_of_another_kind_is_a_usage_error_naming_the_field(tmp_path, capsys, text, said):
    with pytest.raises(SystemExit) as exit_:
        _parse(tmp_path, text)
    assert exit_.value.code == 2 and f"error: --config {tmp_path / 'preset.yaml'}: {said}" in capsys.readouterr().err
