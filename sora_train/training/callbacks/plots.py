"""Loss curves a person can look at: run_dir/plots/loss.png (+ the numbers as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from sora_train.utils.io import atomic_write_json


class LossPlot(pl.Callback):
    """Records every scalar matching ``prefixes`` each step and plots them at validation ends
    and when training ends. History is kept in the checkpoint so a resumed run's plot is whole.
    Lightning keeps a metric's last value until it is logged again (some are logged only every
    ``trainer.log_every_n_steps``): a value equal to the previous point is a repeat, not recorded.
    """

    def __init__(self, out_dir: str, prefixes: tuple[str, ...] = ("train/loss", "val/"), every_n_steps: int = 1) -> None:
        self.out_dir = Path(out_dir)
        self.prefixes = tuple(prefixes)
        self.every_n_steps = max(1, every_n_steps)
        self.history: dict[str, list[tuple[int, float]]] = {}

    def _record(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        for name, value in trainer.callback_metrics.items():
            if name.startswith(self.prefixes):
                series = self.history.setdefault(name, [])
                v = float(value)
                if not series or (series[-1][0] != step and series[-1][1] != v):
                    series.append((step, v))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)
        if trainer.is_global_zero:
            write_loss_plot(self.history, self.out_dir / "loss.png", title=type(pl_module).__name__)
            atomic_write_json(self.out_dir / "loss_history.json", self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(x) for x in v] for k, v in state_dict.get("history", {}).items()}


def write_loss_plot(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per metric family (train losses, validation), log-scale y when positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(k for k in history if history[k])
    by_t = [n for n in names if "loss_t" in n]  # loss per timestep bin: which noise levels are learned
    groups = {
        "train": [n for n in names if n.startswith("train/") and n not in by_t],
        "val": [n for n in names if n.startswith("val/") and n not in by_t],
        "loss by timestep": by_t,
    }
    groups = {k: v for k, v in groups.items() if v}
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6 * max(1, len(groups)), 4), squeeze=False)
    for ax, (group, members) in zip(axes[0], groups.items()):
        for name in members:
            steps, values = zip(*history[name])
            ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
            if min(values) > 0:
                ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{title} {group}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def combine_plots(history_files: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Plot several runs' histories (e.g. the demo's VAE and DiT) into one PNG."""
    merged: dict[str, list[tuple[int, float]]] = {}
    for i, f in enumerate(history_files):
        label = labels[i] if labels else Path(f).parent.parent.name
        for name, series in json.loads(Path(f).read_text()).items():
            prefix, _, rest = name.partition("/")
            merged[f"{prefix}/{label} {rest}"] = [tuple(x) for x in series]
    return write_loss_plot(merged, out)
