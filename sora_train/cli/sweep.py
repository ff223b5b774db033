"""A Hydra callback that keeps a table of sweep trials: overrides -> returned metric.

Written after every trial to <sweep dir>/trials.csv and trials.md (sorted best first), so a
person watching a long sweep sees the standings without opening any run.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sora_train.utils.io import atomic_write_text


class TrialTable(Callback):
    def __init__(self, metric: str = "val/loss", direction: str | None = None) -> None:
        self.metric = metric
        self.direction = direction
        self.rows: list[dict[str, Any]] = []
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        sweeper_dir = config.hydra.sweeper.get("direction") if "sweeper" in config.hydra else None
        self.direction = self.direction or (sweeper_dir if isinstance(sweeper_dir, str) else "minimize")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            self.sweep_dir = Path(config.hydra.sweep.dir)
        ok = job_return.status == JobStatus.COMPLETED
        value = job_return._return_value if ok else None
        self.rows.append({
            "trial": config.hydra.job.get("num", len(self.rows)),
            "overrides": " ".join(job_return.overrides or []),
            self.metric: value,
            "status": "ok" if ok else f"failed: {str(job_return._return_value).splitlines()[0][:120] if job_return._return_value else ''}",
            "run_dir": config.get("run_dir", ""),
        })
        self.write()

    def write(self) -> None:
        if self.sweep_dir is None:
            return
        sign = -1.0 if (self.direction or "minimize").startswith("max") else 1.0
        rows = sorted(self.rows, key=lambda r: (r[self.metric] is None, sign * (r[self.metric] or 0.0)))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.sweep_dir / "trials.csv", buf.getvalue())
        lines = [f"| rank | trial | {self.metric} | overrides | status |", "|---|---|---|---|---|"]
        for i, r in enumerate(rows, 1):
            v = r[self.metric]
            lines.append(f"| {i} | {r['trial']} | {'' if v is None else f'{v:.5g}'} | `{r['overrides']}` | {r['status']} |")
        atomic_write_text(self.sweep_dir / "trials.md", "\n".join(lines) + "\n")
