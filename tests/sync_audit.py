"""Run the Trainer on one rank while recording every operation that makes the host wait for the device.

    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=... \
        python tests/sync_audit.py CONFIG.yaml DEEPSPEED.json REPORT.json

On a GPU these operations stall the CPU until the queued kernels are done: reading a value
(``.item()``, ``int(t)``, ``if t:``) or an output whose size depends on the data (``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``). On a CPU they cost nothing, so they are
found by their operator name (a ``TorchDispatchMode``), with the Python stack that called them.
The report lists each one: operator, the innermost frame outside torch, and the functions on
the stack.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ALWAYS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "is_nonzero",
    "equal",
}
BOOL_INDEXED = {"index", "index_put", "index_put_"}
TORCH_DIR = os.path.dirname(torch.__file__)


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


class SyncAudit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.records: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # repeat_interleave waits only when the repeats are a tensor and no output_size is given
        repeats = (
            name == "repeat_interleave"
            and func._overloadname != "self_int"
            and not (kwargs or {}).get("output_size")
        )
        if name in ALWAYS or repeats or (name in BOOL_INDEXED and _bool_index(args)):
            stack = traceback.extract_stack()[:-1]
            outside = [f for f in stack if not f.filename.startswith(TORCH_DIR)]
            origin = outside[-1] if outside else stack[-1]
            mine = origin.filename.startswith(REPO) and os.sep + ".venv" + os.sep not in origin.filename
            self.records.append(
                {
                    "op": name,
                    "origin": f"{os.path.relpath(origin.filename, REPO) if mine else origin.filename}:{origin.lineno}",
                    "in_repo": mine,
                    "functions": [f.name for f in stack],
                }
            )
        return func(*args, **(kwargs or {}))


def main(config_path: str, ds_path: str, report_path: str) -> int:
    import deepspeed

    from jobs.train import TrainConfig
    from pipeline.training import Trainer

    with open(config_path) as f:
        cfg = TrainConfig(**yaml.safe_load(f), deepspeed=ds_path)
    with open(ds_path) as f:
        ds = json.load(f)
    os.makedirs(cfg.run_dir, exist_ok=True)
    deepspeed.init_distributed(dist_backend="gloo")
    audit = SyncAudit()
    with audit:
        Trainer(cfg, ds).run()
    torch.distributed.destroy_process_group()
    with open(report_path, "w") as f:
        json.dump(audit.records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
