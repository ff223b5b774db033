"""A Hydra callback that keeps the table of a sweep's trials: parameters -> metric, status.

Each trial writes its own record, ``<run dir>/trial.json``, when it ends (ok or failed), and
the table is rebuilt from every record on disk: ``<root>/trials.md`` and ``trials.csv``,
best first, failed trials last. Rebuilt, not kept in memory, because with a Slurm launcher
each trial ends in its own job process (Hydra runs ``on_job_end`` there), and a continued
Optuna study spans several ``sora-train -m`` invocations: ``root`` (``study_dir``) holds the
sweep directory of each, and the table covers them all. The launcher process rebuilds it
once more at the end, marking a trial that started but never wrote a record (killed, out of
memory, cancelled) as failed.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from sora_train.utils.io import atomic_write_json, atomic_write_text

RECORD = "trial.json"  # in each trial's run directory
OVERRIDES = ".hydra/overrides.yaml"  # Hydra writes it when a trial starts


class TrialTable(Callback):
    """Args:
        metric: the name of the value each trial returns (``optimized_metric``).
        direction: ``minimize`` / ``maximize``; default: the sweeper's, else minimize.
        root: where the table goes and under which every trial's record is looked for
            (two levels down: ``<root>/<sweep dir>/<trial>/trial.json``); default: the
            sweep directory.
    """

    def __init__(self, metric: str = "val/loss", direction: str | None = None, root: str | None = None) -> None:
        self.metric = metric
        self.direction = direction
        self.root = root

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        root = self._root(config)
        root.mkdir(parents=True, exist_ok=True)  # before the sweeper opens a storage file in it

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        ok = job_return.status == JobStatus.COMPLETED
        value = _as_float(job_return._return_value) if ok else None
        error = "" if ok else _first_line(job_return._return_value)
        if ok and value is None:
            ok, error = False, f"returned {job_return._return_value!r}, not a number for {self.metric}"
        record = {
            "trial": int(config.hydra.job.num),
            "overrides": list(job_return.overrides or []),
            "params": sorted(_param_keys(config)),
            "metric": self.metric,
            "value": value,
            "status": "ok" if ok else "failed",
            "error": error,
            "run_dir": str(run_dir),
        }
        atomic_write_json(run_dir / RECORD, record)
        self.write(self._root(config), self._direction(config), final=False, sweep_dir=Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write(self._root(config), self._direction(config), final=True, sweep_dir=Path(config.hydra.sweep.dir))

    # -- the table -------------------------------------------------------------------------
    def _root(self, config: DictConfig) -> Path:
        return Path(self.root) if self.root else Path(config.hydra.sweep.dir)

    def _direction(self, config: DictConfig) -> str:
        if self.direction:
            return self.direction
        d = OmegaConf.select(config, "hydra.sweeper.direction")
        return d if isinstance(d, str) else "minimize"

    def write(self, root: Path, direction: str, final: bool, sweep_dir: Path | None = None) -> list[dict[str, Any]]:
        """Rebuild trials.csv and trials.md under ``root`` from every record (and the trials
        of ``sweep_dir`` when it was put elsewhere); returns the rows, best first."""
        rows = collect_trials(root, final=final)
        if sweep_dir is not None and root.resolve() not in sweep_dir.resolve().parents and root.resolve() != sweep_dir.resolve():
            rows += collect_trials(sweep_dir, final=final)
        if not rows:
            return rows
        sign = -1.0 if direction.startswith("max") else 1.0
        rows.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0), r["trial"]))
        varying = _varying_keys(rows)
        for r in rows:
            shown = set(r.pop("params")) | varying
            r["params"] = " ".join(o for o in r["overrides"] if o.split("=", 1)[0].lstrip("+~") in shown)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["rank", "trial", self.metric, "status", "error", "params", "overrides", "run_dir"])
        for i, r in enumerate(rows, 1):
            w.writerow([i, r["trial"], "" if r["value"] is None else r["value"], r["status"], r["error"], r["params"],
                        " ".join(r["overrides"]), r["run_dir"]])
        atomic_write_text(root / "trials.csv", buf.getvalue())
        lines = [f"| rank | trial | {self.metric} | params | status |", "|---|---|---|---|---|"]
        for i, r in enumerate(rows, 1):
            v = "" if r["value"] is None else f"{r['value']:.5g}"
            status = r["status"] if not r["error"] else f"{r['status']}: {r['error'][:120]}"
            lines.append(f"| {i} | {r['trial']} | {v} | `{r['params']}` | {status.replace('|', '/')} |")
        atomic_write_text(root / "trials.md", "\n".join(lines) + "\n")
        return rows


class ContinuedStudySeed(Callback):
    """Seed the sampler of a continued study with ``seed + trials already under root``.

    The sweeper builds its sampler from the config on every invocation, so with a fixed seed
    a continued study would draw its random start-up points again, repeating the first
    invocation's trials. Hydra calls ``on_multirun_start`` before it instantiates the
    sweeper, so the seed can still be moved there; a first invocation keeps the seed as
    configured (reproducible), and so does a sampler without one.
    """

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed")
        done = len(collect_trials(self.root)) if self.root.is_dir() else 0
        if isinstance(seed, int) and done:
            with read_write(config.hydra.sweeper.sampler):
                config.hydra.sweeper.sampler.seed = seed + done


def collect_trials(root: Path, final: bool = True) -> list[dict[str, Any]]:
    """Every trial under ``root`` (a sweep dir, or a study dir holding sweep dirs).

    A trial is a numbered directory with Hydra's ``.hydra/overrides.yaml``; with a record it
    is what the record says, without one it is running or (``final``) failed with no result.
    Its name in the table is its path relative to ``root`` (``3``, or ``2026-01-02_10-00-00/3``).
    """
    rows = []
    dirs = [p.parent.parent for p in list(root.glob(f"*/{OVERRIDES}")) + list(root.glob(f"*/*/{OVERRIDES}"))]
    for d in sorted({d for d in dirs if d.name.isdigit()}):
        name = str(d.relative_to(root))
        try:
            rec = json.loads((d / RECORD).read_text(encoding="utf-8"))
            rows.append({**rec, "trial": name, "params": rec.get("params", [])})
        except (OSError, json.JSONDecodeError):
            try:
                overrides = [str(o) for o in OmegaConf.load(d / OVERRIDES)]
            except Exception:  # noqa: BLE001 - a half-written file: the trial is just starting
                overrides = []
            status, error = ("failed", "no result: the job ended without one (killed, timed out, out of memory?)") if final else ("running", "")
            rows.append({"trial": name, "overrides": overrides, "params": [], "value": None, "status": status,
                         "error": error, "run_dir": str(d)})
    return rows


def _param_keys(config: DictConfig) -> set[str]:
    params = OmegaConf.select(config, "hydra.sweeper.params")
    return {str(k) for k in params} if params else set()


def _varying_keys(rows: list[dict[str, Any]]) -> set[str]:
    """Override keys whose value differs between trials: the parameters of a grid sweep."""
    values: dict[str, set[str]] = {}
    for r in rows:
        for o in r["overrides"]:
            k, _, v = o.partition("=")
            values.setdefault(k.lstrip("+~"), set()).add(v)
    n = {k: sum(any(o.split("=", 1)[0].lstrip("+~") == k for o in r["overrides"]) for r in rows) for k in values}
    return {k for k, vs in values.items() if len(vs) > 1 or n[k] < len(rows)}


def _as_float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _first_line(x: Any) -> str:
    text = f"{type(x).__name__}: {x}" if isinstance(x, BaseException) else str(x or "")
    return (text.strip().splitlines() or [""])[0][:200]
