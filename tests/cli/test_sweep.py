"""Job 3: an Optuna sweep through sora-train -m, ending in a table of trials."""

from __future__ import annotations

import csv

import pytest

from test_e2e import BIN, run  # same directory: pytest puts it on sys.path


@pytest.mark.slow
def test_optuna_sweep_writes_a_table_of_trials(tmp_path):
    sweep = tmp_path / "sweep"
    run([str(BIN / "sora-train"), "-m", "experiment=smoke", "hparams_search=dit_lr", "hydra.sweeper.n_trials=2",
         "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}",
         "callbacks.samples=null", "export=false"])
    rows = list(csv.DictReader((sweep / "trials.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    values = [float(r["val/loss"]) for r in rows]
    assert values == sorted(values)  # best first
    assert all("optimizer.lr=" in r["overrides"] for r in rows)
    assert (sweep / "trials.md").read_text().startswith("| rank |")
    assert (sweep / "optimization_results.yaml").exists()
