"""The scaling-law recipe: the power-law fit on synthetic points with a known law, its one-line
errors, and launch/scaling_law.sh end to end at toy scale (a ladder of 4 tiny trials of 2 steps
on a debug VAE's latents, the prediction, the next size, the report)."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from sora_train.training.scaling import fit_power_law, load_ladder
from sora_train.utils.errors import SoraError
from cli_runs import ROOT, base_env


def _law(C, a=500.0, b=0.3, c=0.8):
    return a * np.asarray(C, dtype=float) ** (-b) + c


def test_fit_recovers_a_known_law():
    C = np.geomspace(1e10, 1e12, 6)
    rng = np.random.default_rng(0)
    L = _law(C) * (1 + 0.001 * rng.standard_normal(C.shape))  # 0.1% noise
    fit = fit_power_law(C, L)
    assert fit.b == pytest.approx(0.3, abs=0.05)
    assert fit.c == pytest.approx(0.8, abs=0.03)
    nxt = 2.5e12  # one rung beyond the points
    assert float(fit.predict(nxt)) == pytest.approx(float(_law(nxt)), rel=0.005)
    sigma = fit.sigma(nxt)
    assert sigma is not None and 0 < sigma < 0.01
    assert max(abs(r) for r in fit.residuals) < 0.01


def test_fit_without_noise_is_exact_and_a_is_in_flops():
    C = np.geomspace(3e9, 5e11, 5)
    fit = fit_power_law(C, _law(C, a=80.0, b=0.2, c=0.5))
    assert (fit.a, fit.b, fit.c) == pytest.approx((80.0, 0.2, 0.5), rel=1e-3)


@pytest.mark.parametrize("flops,losses,match", [
    ([1e10, 2e10, 4e10], [1.0, 0.9, 0.85], "at least 4 sizes"),
    ([1e10, 1e10, 2e10, 2e10, 4e10], [1.0, 1.0, 0.9, 0.9, 0.85], "at least 4 sizes at distinct compute, got 3"),
    ([1e10, 2e10, 4e10, 8e10], [1.0, 0.9, float("nan"), 0.8], "positive and finite"),
])
def test_fit_rejects_bad_input_in_one_line(flops, losses, match):
    with pytest.raises(SoraError, match=match) as e:
        fit_power_law(flops, losses)
    assert "\n" not in str(e.value)


def test_ladder_of_mixed_budgets_is_refused(tmp_path):
    for i, samples in enumerate((64, 64, 128)):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "scaling.json").write_text(json.dumps(
            {"name": f"s{i}", "params": 10, "flops": 1e9 * (i + 1), "samples": samples, "val_loss": 1.0, "dit": {}, "sizes": {}}))
    with pytest.raises(SoraError, match="different numbers of samples"):
        load_ladder(tmp_path)
    with pytest.raises(SoraError, match="no trial with a scaling.json"):
        load_ladder(tmp_path / "0")


@pytest.fixture(scope="module")
def quality_dir(tmp_path_factory):
    """What launch/shapes_quality.sh leaves for the recipe, in miniature: a debug VAE export and
    its latents of a few 9x32x32 shapes clips (train and val)."""
    import torch

    from sora_train.data.shapes import ShapesWorld, generate_shards
    from sora_train.data_tools.cache_latents import CacheOptions, cache_latents
    from sora_train.models.export import export_parts
    from sora_train.models.vae import build_vae

    root = tmp_path_factory.mktemp("scaling_quality")
    generate_shards(root / "shapes", num_train=8, num_val=4, world=ShapesWorld(num_frames=9), heldout=[], clips_per_shard=8)
    torch.manual_seed(0)
    export_parts(root / "vae" / "export", {"vae": build_vae("debug")}, meta={"task": "vae"})
    for split in ("train", "val"):
        cache_latents(root / "shapes" / split, root / "latents" / split, root / "vae" / "export",
                      CacheOptions(shapes=[(9, 32, 32)], dtype="float32", batch_size=4), quiet=True)
    return root


@pytest.mark.slow
def test_recipe_end_to_end_at_toy_scale(quality_dir, tmp_path):
    """The real launch/scaling_law.sh: ladder sweep -> prediction written -> next size trains ->
    predicted vs measured; the compute the fit predicted for the next size is the compute its
    run counted, batch by batch."""
    out = tmp_path / "scaling"
    env = base_env(SORA_QUALITY_DIR=str(quality_dir), SORA_SCALING_DIR=str(out), SCALING_LADDER="d32,d48,d64,d80",
                   SCALING_PARALLEL="4", SCALING_NEXT="d96", SCALING_NEXT_THREADS="1")
    args = ["trainer.max_steps=2", "data.batch_size=2", "trainer.limit_val_batches=1", "data.load_text=false"]
    proc = subprocess.run(["bash", "launch/scaling_law.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert [t["name"] for t in report["ladder"]] == ["d32", "d48", "d64", "d80"]  # smallest compute first
    assert len({t["samples"] for t in report["ladder"]}) == 1 and report["ladder"][0]["samples"] == 4
    pred, meas = report["prediction"], report["measured"]
    assert pred["size"] == "d96" and meas is not None and math.isfinite(meas["rel_error"])
    assert meas["flops"] == pytest.approx(pred["flops"], rel=1e-9)
    assert meas["rel_error"] == pytest.approx((pred["predicted_loss"] - meas["loss"]) / meas["loss"])
    assert report["quality"] in ("good", "poor") and len(report["fit"]["residuals"]) == 4
    written = json.loads((out / "report" / "prediction.json").read_text())
    assert written["predicted_loss"] == pytest.approx(pred["predicted_loss"])  # the fit never saw d96
    assert (out / "report" / "prediction.json").stat().st_mtime <= (out / "runs" / "d96" / "scaling.json").stat().st_mtime
    assert (out / "report" / "scaling.png").stat().st_size > 0 and (out / "ladder" / "trials.md").is_file()
    assert "predicted" in proc.stdout and "measured" in proc.stdout
