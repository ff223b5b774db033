"""Scaling law of the DiT: validation loss against training compute, L(C) = a * C^(-b) + c.

The recipe (launch/scaling_law.sh, docs/launching.md "Scaling law"):

1. a ladder of DiT sizes trains on the same latents for the same number of samples
   (``sora-train -m experiment=scaling_shapes hparams_search=scaling``); each trial's
   ``ScalingRecord`` callback (training/callbacks/scaling.py) writes ``<run_dir>/scaling.json``: parameters, samples seen and
   training FLOPs, summed per batch from the DiT's own ``flops_per_step`` (per sample,
   forward + backward), and its final ``val/loss`` (whole val split, fixed noise and
   timesteps: the same numbers for every size, so losses compare);
2. ``sora-eval scaling LADDER --next NAME`` fits the law to the ladder and predicts the loss
   of size NAME at its own compute (same budget, its ``flops_per_step``), with a 1-sigma
   band from the fit's covariance and a back-test (the fit without the largest rung
   predicting it); writes ``prediction.json``, ``report.json`` and ``scaling.png``;
3. size NAME trains, and the same command with ``--next-run`` adds the measured loss and the
   relative error of the prediction.

The fit never sees the next size's loss: it is a prediction, written before that run starts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json

RECORD = "scaling.json"  # in each trial's run directory
MIN_POINTS = 4  # three parameters: at least one degree of freedom left to judge the fit by
# A fit is called poor when a ladder point is further than this from the curve (relative):
# a law that misses its own points by more cannot be trusted to extrapolate a rung further.
MAX_REL_RESIDUAL = 0.02
# ... or when the prediction's 1-sigma band is wider than this (relative): too few points or
# too noisy a ladder for the extrapolation to mean anything.
MAX_REL_SIGMA = 0.05


@dataclass
class Trial:
    """One trained size, as its ``scaling.json`` says."""

    name: str
    params: int
    flops: float
    samples: int
    val_loss: float
    train_seconds: float
    run_dir: str


def load_trial(run_dir: str | Path) -> tuple[Trial, dict[str, Any]]:
    """A run directory's record -> (Trial, the whole record). One-line errors for a run that
    did not finish or did not validate."""
    f = Path(run_dir) / RECORD
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SoraError(f"{f}: missing (the trial did not finish, or ran without callbacks.scaling)") from None
    except json.JSONDecodeError as e:
        raise SoraError(f"{f}: not JSON ({e})") from None
    if rec.get("val_loss") is None or not math.isfinite(float(rec["val_loss"])):
        raise SoraError(f"{f}: no final val/loss (set trainer.val_check_interval to trainer.max_steps)")
    if not rec.get("flops") or not rec.get("samples"):
        raise SoraError(f"{f}: no training FLOPs recorded (the trial trained no step)")
    trial = Trial(name=str(rec.get("name") or Path(run_dir).name), params=int(rec["params"]), flops=float(rec["flops"]),
                  samples=int(rec["samples"]), val_loss=float(rec["val_loss"]), train_seconds=float(rec.get("train_seconds", 0.0)),
                  run_dir=str(run_dir))
    return trial, rec


def load_ladder(root: str | Path) -> tuple[list[Trial], list[dict[str, Any]]]:
    """Every trial under ``root`` (``<root>/*/scaling.json``), smallest compute first."""
    root = Path(root)
    if not root.is_dir():
        raise SoraError(f"{root}: not a directory (the ladder's sweep directory, e.g. outputs/scaling/ladder)")
    loaded = [load_trial(f.parent) for f in sorted(root.glob(f"*/{RECORD}"))]
    if not loaded:
        raise SoraError(f"{root}: no trial with a {RECORD} (run the ladder first: sora-train -m experiment=scaling_shapes hparams_search=scaling)")
    loaded.sort(key=lambda tr: tr[0].flops)
    samples = {t.samples for t, _ in loaded}
    if len(samples) > 1:
        raise SoraError(f"{root}: the trials saw different numbers of samples {sorted(samples)}; a scaling ladder trains every size on one budget")
    return [t for t, _ in loaded], [r for _, r in loaded]


# -- the fit --------------------------------------------------------------------------------
@dataclass
class PowerLawFit:
    """L(C) = a * C^(-b) + c, fitted with C in units of ``c0`` FLOPs (conditioning: C is ~1e12).

    ``a`` is for C in FLOPs; ``cov`` is the covariance of (a_n, b, c) with a_n = a * c0^(-b),
    the coefficient in the fitted units (None when the data cannot estimate it)."""

    a: float
    b: float
    c: float
    c0: float
    cov: list[list[float]] | None
    residuals: list[float]  # measured - fitted, per point

    def predict(self, flops: float | np.ndarray) -> float | np.ndarray:
        return self.a_n * (np.asarray(flops, dtype=float) / self.c0) ** (-self.b) + self.c

    @property
    def a_n(self) -> float:
        return self.a * self.c0 ** (-self.b)

    def sigma(self, flops: float) -> float | None:
        """1-sigma of the prediction at ``flops``, by the delta method on the covariance."""
        if self.cov is None:
            return None
        x = flops / self.c0
        g = np.array([x ** (-self.b), -self.a_n * x ** (-self.b) * math.log(x), 1.0])
        var = float(g @ np.asarray(self.cov) @ g)
        return math.sqrt(var) if var >= 0 and math.isfinite(var) else None


def fit_power_law(flops: Sequence[float], losses: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of L(C) = a * C^(-b) + c with b > 0, 0 <= c < min(L).

    Several starts (the irreducible c at 0, half and 90% of the lowest loss); the lowest
    squared error wins. At least :data:`MIN_POINTS` points at distinct compute."""
    from scipy.optimize import curve_fit

    C, L = np.asarray(flops, dtype=float), np.asarray(losses, dtype=float)
    if C.shape != L.shape or C.ndim != 1:
        raise SoraError(f"scaling fit: {C.shape} FLOPs for {L.shape} losses")
    if len(np.unique(C)) < MIN_POINTS:
        raise SoraError(f"scaling fit: needs at least {MIN_POINTS} sizes at distinct compute, got {len(np.unique(C))} "
                        f"(three parameters a, b, c and one point to judge them by)")
    if not (np.all(np.isfinite(C)) and np.all(C > 0) and np.all(np.isfinite(L)) and np.all(L > 0)):
        raise SoraError("scaling fit: FLOPs and losses must be positive and finite")
    c0 = float(C.min())
    x = C / c0

    def law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a * x ** (-b) + c

    hi_c = float(L.min()) * (1 - 1e-6)
    best: tuple[float, np.ndarray, np.ndarray | None] | None = None
    for c_init in (0.0, 0.5 * hi_c, 0.9 * hi_c):
        for b_init in (0.1, 0.5):
            a_init = max(float(L.max()) - c_init, 1e-6)
            try:
                p, cov = curve_fit(law, x, L, p0=[a_init, b_init, c_init], bounds=([0.0, 1e-4, 0.0], [np.inf, 5.0, hi_c]), maxfev=20000)
            except (RuntimeError, ValueError):
                continue
            sse = float(np.sum((law(x, *p) - L) ** 2))
            if best is None or sse < best[0]:
                best = (sse, p, cov)
    if best is None:
        raise SoraError("scaling fit: did not converge from any start (are the losses decreasing with compute?)")
    _, p, cov = best
    a_n, b, c = (float(v) for v in p)
    good_cov = cov is not None and np.all(np.isfinite(cov))
    return PowerLawFit(a=a_n * c0**b, b=b, c=c, c0=c0, cov=cov.tolist() if good_cov else None,
                       residuals=[float(v) for v in L - law(x, *p)])


# -- the report -----------------------------------------------------------------------------
def next_size_flops(record: dict[str, Any], name: str) -> tuple[float, int]:
    """Training FLOPs and parameters of ladder size ``name`` at the ladder's budget, from its
    own ``flops_per_step``: a trial's DiT config with the size's width, depth and heads."""
    import torch

    from sora_train.models.dit import DiT

    sizes = record.get("sizes") or {}
    if name not in sizes:
        raise SoraError(f"--next {name}: not a size of the ladder (scaling.sizes: {', '.join(sorted(sizes)) or 'none recorded'})")
    config = {**record["dit"], **sizes[name]}
    with torch.device("meta"):  # only its numbers
        dit = DiT(**config)
    per_sample = dit.flops_per_step(int(record["num_tokens"]), float(record["text_len_mean"]), training=True)
    return per_sample * int(record["samples"]), int(sum(p.numel() for p in dit.parameters()))


def scaling_report(ladder_dir: str | Path, next_name: str, out: str | Path, next_run: str | Path | None = None) -> dict[str, Any]:
    """Fit the ladder, predict size ``next_name``, compare with ``next_run`` when it has
    trained; writes ``prediction.json`` (first call), ``report.json`` and ``scaling.png``."""
    out = Path(out)
    trials, records = load_ladder(ladder_dir)
    if any(t.name == next_name for t in trials):
        raise SoraError(f"--next {next_name}: that size is in the ladder ({ladder_dir}); the fit must not see the size it predicts")
    fit = fit_power_law([t.flops for t in trials], [t.val_loss for t in trials])
    next_flops, next_params = next_size_flops(records[-1], next_name)
    predicted = float(fit.predict(next_flops))
    sigma = fit.sigma(next_flops)
    losses = np.array([t.val_loss for t in trials])
    rel_res = np.abs(np.asarray(fit.residuals)) / losses
    backtest = None
    if len(trials) > MIN_POINTS:  # the fit without the largest rung, predicting it
        bt = fit_power_law([t.flops for t in trials[:-1]], losses[:-1])
        bt_pred = float(bt.predict(trials[-1].flops))
        backtest = {"size": trials[-1].name, "predicted": bt_pred, "measured": trials[-1].val_loss,
                    "rel_error": (bt_pred - trials[-1].val_loss) / trials[-1].val_loss}
    problems = []
    if np.any(np.diff(losses) >= 0):
        problems.append("the loss does not fall with every rung")
    if rel_res.max() > MAX_REL_RESIDUAL:
        problems.append(f"a ladder point is {rel_res.max():.1%} off the curve (> {MAX_REL_RESIDUAL:.0%})")
    if sigma is None or sigma / predicted > MAX_REL_SIGMA:
        problems.append("the prediction's uncertainty is " + ("unknown" if sigma is None else f"{sigma / predicted:.1%} (> {MAX_REL_SIGMA:.0%})"))
    if fit.b >= 5.0 * (1 - 1e-3) or fit.c >= losses.min() * (1 - 1e-3):
        problems.append("a parameter sits on its bound")
    prediction = {"size": next_name, "params": next_params, "flops": next_flops, "predicted_loss": predicted, "sigma": sigma}
    pred_file = out / "prediction.json"
    if next_run is None or not pred_file.is_file():
        atomic_write_json(pred_file, {**prediction, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    measured = None
    if next_run is not None:
        t, _ = load_trial(next_run)
        measured = {"loss": t.val_loss, "flops": t.flops, "params": t.params, "train_seconds": t.train_seconds, "run_dir": t.run_dir,
                    "rel_error": (predicted - t.val_loss) / t.val_loss,
                    "within_sigma": None if sigma is None else abs(predicted - t.val_loss) <= sigma}
        if t.val_loss < fit.c:
            problems.append(f"the measured loss is below the fitted floor c = {fit.c:.4f}: the ladder's curve flattens too early")
        if abs(t.flops - next_flops) > 1e-6 * next_flops:
            problems.append(f"the next run's compute {t.flops:.4g} is not the predicted size's {next_flops:.4g} (another budget?)")
    report = {
        "law": "L(C) = a * C^(-b) + c, C = training FLOPs (DiT flops_per_step x samples)",
        "fit": {"a": fit.a, "b": fit.b, "c": fit.c, "cov_units": f"(a*{fit.c0:.4g}^-b, b, c)", "cov": fit.cov,
                "residuals": fit.residuals, "max_rel_residual": float(rel_res.max())},
        "ladder": [asdict(t) for t in trials],
        "backtest": backtest,
        "prediction": prediction,
        "measured": measured,
        "quality": "good" if not problems else "poor",
        "problems": problems,
        "ladder_train_seconds": sum(t.train_seconds for t in trials),
    }
    atomic_write_json(out / "report.json", report)
    plot_scaling(report, fit, out / "scaling.png")
    return report


def plot_scaling(report: dict[str, Any], fit: PowerLawFit, path: str | Path) -> Path:
    """Ladder points, the fitted curve (log-x FLOPs), the predicted next size with its band
    and the measured one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ladder, pred, meas = report["ladder"], report["prediction"], report["measured"]
    C = [t["flops"] for t in ladder]
    hi = max(pred["flops"], *(C + ([meas["flops"]] if meas else [])))
    xs = np.geomspace(min(C) / 1.3, hi * 1.3, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(xs, fit.predict(xs), "-", color="tab:blue", label=f"fit: {fit.a:.3g}·C^-{fit.b:.3g} + {fit.c:.3g}")
    ax.scatter(C, [t["val_loss"] for t in ladder], color="tab:blue", zorder=3, label="ladder (fitted)")
    for t in ladder:
        ax.annotate(t["name"], (t["flops"], t["val_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.errorbar([pred["flops"]], [pred["predicted_loss"]], yerr=[pred["sigma"] or 0.0], fmt="o", mfc="none", color="tab:orange",
                capsize=4, zorder=4, label=f"{pred['size']} predicted")
    if meas:
        ax.scatter([meas["flops"]], [meas["loss"]], marker="*", s=120, color="tab:red", zorder=5,
                   label=f"{pred['size']} measured ({meas['rel_error']:+.1%})")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))  # a ladder spans about one decade
    ax.xaxis.set_minor_formatter(matplotlib.ticker.LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(np.inf, np.inf)))
    ax.set_xlabel("training FLOPs (flops_per_step x samples)")
    ax.set_ylabel("final val/loss")
    ax.set_title(f"DiT scaling on a fixed budget ({ladder[0]['samples']} samples per size); fit {report['quality']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def one_line(report: dict[str, Any]) -> str:
    """The headline: the law, the prediction, the measurement and the verdict."""
    f, p, m = report["fit"], report["prediction"], report["measured"]
    sig = "" if p["sigma"] is None else f" ± {p['sigma']:.4f}"
    line = (f"scaling: L(C) = {f['a']:.4g}·C^-{f['b']:.3f} + {f['c']:.4f} on {len(report['ladder'])} sizes "
            f"(max residual {f['max_rel_residual']:.2%}); {p['size']} predicted {p['predicted_loss']:.4f}{sig}")
    line += f", measured {m['loss']:.4f} ({m['rel_error']:+.2%})" if m else " (not trained yet)"
    line += "; fit " + report["quality"] + (f": {'; '.join(report['problems'])}" if report["problems"] else "")
    return line
