"""Train several short runs of one strategy in one launch: the strategy x precision test matrix.

Started once per rank with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so Lightning uses the processes as they are, exactly as under torchrun or Slurm.
Each cell composes the real config (the same compose as sora-train, plus the cell's overrides)
and runs the same ``train(cfg)`` that sora-train calls: data, model, strategy, precision,
callbacks (end-of-run samples, EMA, checkpoints) and export. Cells run one after another in the
same process group; starting torch, Lightning and DeepSpeed once per strategy instead of once per
cell is what keeps the matrix inside the suite's time budget.

    python matrix_driver.py --out DIR --cell NAME '<override> <override> ...' [--cell ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--cell", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
args = p.parse_args()


def main() -> int:
    import torch.distributed as dist
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import sora_train.cli.train as cli_train

    close = cli_train._close_process_group
    cli_train._close_process_group = lambda: None  # later cells reuse the process group
    rank = int(os.environ.get("RANK", "0"))
    failed = 0
    for name, overrides in args.cell:
        run_dir = Path(args.out) / name
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="sora_train.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*shlex.split(overrides), f"run_dir={run_dir}"])
        if rank == 0:  # what the run was given, for the per-experiment test
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ".hydra_used.json").write_text(json.dumps({"strategy": cfg.strategy.name, "precision": str(cfg.trainer.precision)}))
        status = {"cell": name, "ok": True}
        try:
            cli_train.train(cfg)
        except Exception as e:  # every cell is reported; the test names the failing ones
            traceback.print_exc()
            status = {"cell": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
            failed += 1
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "status.json").write_text(json.dumps(status))
        print(f"[matrix] rank {rank} cell {name}: {'ok' if status['ok'] else status['error']}", flush=True)
    close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
