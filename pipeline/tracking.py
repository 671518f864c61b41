"""Experiment tracking: a run folder's TensorBoard events and its Weights & Biases run.

Training logs its scalars through :class:`RunLog` (``--report-to tensorboard,wandb``);
``jobs.evaluate --log-to RUN_DIR`` opens the same run folder afterwards and adds the
evaluation's figures, table and chart to the same TensorBoard folder and the same W&B run
(its id is kept in ``RUN_DIR/wandb_run_id.txt``), so that one run holds both curves.

    <run_dir>/tensorboard/        TensorBoard event files (training and evaluation)
    <run_dir>/wandb/              W&B's own run folders (``offline-run-*`` in offline mode:
                                  ``wandb sync <run_dir>/wandb/offline-run-*`` uploads them)
    <run_dir>/wandb_run_id.txt    the W&B run id every later writer resumes

Tags: ``train/<name>`` at the training step; ``eval/<dataset>/<metric>@<k>`` at the step of
the evaluated model (W&B: against the ``eval/step`` metric, since a resumed W&B run only
accepts steps past its last one), ``eval/<dataset>/report`` (the report as a table) and
``eval/<dataset>/chart`` (report.png).
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence

from pipeline.outputs import atomic_file

REPORTERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id.txt"
EVAL_METRICS = ("recall", "precision", "f1", "exact_recall", "exact_precision")


def run_reporters(run_dir: str) -> tuple[str, ...]:
    """What a training run folder holds: ``tensorboard`` (its events folder), ``wandb`` (its run id)."""
    found = []
    if os.path.isdir(os.path.join(run_dir, "tensorboard")):
        found.append("tensorboard")
    if os.path.isfile(os.path.join(run_dir, WANDB_ID_FILE)):
        found.append("wandb")
    return tuple(found)


def check_reporters(names: Iterable[str]) -> tuple[str, ...]:
    """The reporters asked for (comma-separated or a list; ``none`` for none), each known, in order."""
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name or name == "none":
                continue
            if name not in REPORTERS:
                raise ValueError(f"unknown reporter {name!r}: choose from {', '.join(REPORTERS)} (or none)")
            if name not in out:
                out.append(name)
    return tuple(out)


class RunLog:
    """Writes to ``run_dir``'s TensorBoard folder and/or its W&B run (created, or resumed by id).

    ``wandb_mode`` is W&B's own (``online``, ``offline``, ``disabled``; None: W&B decides from
    its settings and ``WANDB_MODE``). ``purge_from``: training resumed at that step drops
    TensorBoard events past it (the steps it will write again).
    """

    def __init__(
        self,
        run_dir: str,
        report_to: Sequence[str],
        *,
        config: Mapping | None = None,
        job_type: str = "train",
        project: str = "nxtp",
        name: str | None = None,
        wandb_mode: str | None = None,
        purge_from: int | None = None,
    ):
        self.run_dir = run_dir
        self.report_to = check_reporters(report_to)
        self.board = None
        self.wandb_run = None
        if not self.report_to:
            return
        os.makedirs(run_dir, exist_ok=True)
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_from)
        if "wandb" in self.report_to:
            self.wandb_run = _wandb_run(run_dir, config, job_type, project, name or os.path.basename(os.path.abspath(run_dir)), wandb_mode)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def scalars(self, values: Mapping[str, float], step: int, prefix: str = "train/") -> None:
        """``prefix + name`` = value at ``step``, for every value."""
        if self.board is not None:
            for key, value in values.items():
                self.board.add_scalar(prefix + key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({prefix + key: value for key, value in values.items()}, step=step)

    def evaluation(self, report, step: int, chart: str | bytes | None = None) -> dict[str, float]:
        """An evaluation report (``schemas.REPORT`` rows) at the model's training ``step``.

        Scalars of the report's first embedding model (the run's R / P / F1 model), the whole
        report as a table, and ``chart`` (report.png: a path or its bytes) when given; returns the
        scalars logged.
        """
        rows = report.to_pylist() if hasattr(report, "to_pylist") else list(report)
        if not rows:
            return {}
        primary = rows[0]["embedding"]
        scalars: dict[str, float] = {}
        for row in rows:
            if row["embedding"] != primary:
                continue
            for metric in EVAL_METRICS:
                if row.get(metric) is not None:
                    scalars[f"eval/{row['dataset']}/{metric}@{row['k']}"] = float(row[metric])
        dataset = rows[0]["dataset"]
        columns = ["dataset", "k", "embedding", "samples", *EVAL_METRICS]
        table = [[row.get(c) for c in columns] for row in rows]
        image = _read_png(chart) if chart else None
        if self.board is not None:
            for tag, value in scalars.items():
                self.board.add_scalar(tag, value, step)
            self.board.add_text(f"eval/{dataset}/report", _markdown(columns, table), step)
            if image is not None:
                self.board.add_image(f"eval/{dataset}/chart", image, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb

            payload: dict = {"eval/step": step, **scalars, f"eval/{dataset}/report": wandb.Table(columns=columns, data=table)}
            if image is not None:
                payload[f"eval/{dataset}/chart"] = wandb.Image(image)
            self.wandb_run.log(payload)
        return scalars

    def flush(self) -> None:
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wandb_run(run_dir: str, config, job_type: str, project: str, name: str, mode: str | None):
    try:
        import wandb
    except ImportError as err:
        raise ImportError("reporting to W&B needs the wandb package: pip install 'nxtp[tracking]' (or wandb)") from err

    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
        with atomic_file(id_path, "w") as f:
            f.write(run_id + "\n")
    run = wandb.init(
        project=project,
        name=name,
        id=run_id,
        resume="allow",
        dir=run_dir,
        config=dict(config) if config else None,
        job_type=job_type,
        mode=mode,
    )
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    return run


def _read_png(chart: str | bytes):
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(chart) if isinstance(chart, bytes) else chart) as img:
        return np.asarray(img.convert("RGB"))


def _markdown(columns: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
