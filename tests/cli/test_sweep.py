"""Job 3: an Optuna sweep through sora-train -m, ending in a table of trials.

The Slurm version (trials as jobs, two at a time; continuing the study; a failed trial) is
in tests/launch/test_slurm.py.
"""

from __future__ import annotations

import csv
import json

import pytest

from sora_train.cli.sweep import RECORD, TrialTable, collect_trials
from test_e2e import BIN, run  # same directory: pytest puts it on sys.path


def _trial(sweep, num, overrides, value=None, status="ok", record=True):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if record:
        (d / RECORD).write_text(json.dumps({"trial": num, "overrides": overrides, "params": ["optimizer.lr"], "value": value,
                                            "status": status, "error": "" if status == "ok" else "ValueError: boom", "run_dir": str(d)}))


def test_table_is_rebuilt_from_every_trial_record_on_disk(tmp_path):
    """Each trial's job writes only its own record; the table holds all of them, best first,
    across the sweep dirs of a continued study, and a trial that left no record is failed."""
    root = tmp_path / "study"
    _trial(root / "run1", 0, ["optimizer.lr=0.1", "experiment=smoke"], 1.23)
    _trial(root / "run1", 1, ["optimizer.lr=0.2", "experiment=smoke"], 1.205)
    _trial(root / "run1", 2, ["optimizer.lr=0.3", "experiment=smoke"], status="failed")
    _trial(root / "run2", 0, ["optimizer.lr=0.4", "experiment=smoke", "+x=1"], 1.3)
    _trial(root / "run2", 1, ["optimizer.lr=0.5", "experiment=smoke"], record=False)  # killed

    assert [r["status"] for r in collect_trials(root, final=False)].count("running") == 1
    rows = TrialTable(metric="val/loss").write(root, "minimize", final=True)
    assert [r["trial"] for r in rows] == ["run1/1", "run1/0", "run2/0", "run1/2", "run2/1"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert rows[0]["params"] == "optimizer.lr=0.2" and rows[2]["params"] == "optimizer.lr=0.4 +x=1"  # not the fixed experiment=
    md = (root / "trials.md").read_text().splitlines()
    assert len(md) == 2 + 5 and "| 1 | run1/1 | 1.205 |" in md[2] and "failed: ValueError: boom" in md[5] and "no result" in md[6]
    assert [r["trial"] for r in csv.DictReader((root / "trials.csv").open())][:2] == ["run1/1", "run1/0"]
    rows = TrialTable(metric="val/psnr").write(root, "maximize", final=True)
    assert [r["trial"] for r in rows][:3] == ["run2/0", "run1/0", "run1/1"]


@pytest.mark.slow
def test_grid_sweep_writes_a_table_of_trials(tmp_path):
    """A grid (hparams_search=dit_grid, narrowed to 2 points from the command line) on this
    machine: every point once, the table best first, the study in its sqlite file. ~40 s."""
    optuna = pytest.importorskip("optuna")
    study = tmp_path / "study"
    run([str(BIN / "sora-train"), "-m", "experiment=smoke", "hparams_search=dit_grid", "optimizer.lr=choice(1e-4,1e-3)",
         "scheduler.warmup_steps=choice(1)", f"study_dir={study}", f"paths.data_dir={tmp_path / 'data'}",
         "callbacks.samples=null", "export=false"])
    rows = list(csv.DictReader((study / "trials.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    values = [float(r["val/loss"]) for r in rows]
    assert values == sorted(values)  # best first
    assert sorted(r["params"] for r in rows) == ["optimizer.lr=0.0001 scheduler.warmup_steps=1", "optimizer.lr=0.001 scheduler.warmup_steps=1"]
    assert (study / "trials.md").read_text().startswith("| rank |")
    best = optuna.load_study(study_name="dit_grid", storage=f"sqlite:///{study}/optuna.db").best_value
    assert values[0] == pytest.approx(best)
    (sweep,) = [p for p in study.iterdir() if p.is_dir()]
    assert (sweep / "optimization_results.yaml").exists()
