"""``sora-eval shapes-compare``: what fine-tuning taught and what it cost, from ``sora-eval
shapes`` reports of a base export and of exports fine-tuned from it (issue 18, "fine-tuning
measured"; the recipe is launch/finetune_quality.sh).

For a new colour C that the base never saw and the fine-tunes were trained on:

- **learned**: colour accuracy (the colour read back right) on prompts asking for C — the
  report's ``t2v.colours.C`` group (``sora-eval shapes --colour C``: every combination of C),
  else its ``t2v.by_colour.C`` entry;
- **forgetting**: on prompts asking for any other colour (``t2v.by_colour`` minus C, pooled,
  seen and held-out pairs alike), colour / shape / direction / size / joint accuracy of each
  run against the base's, in points lost (positive: worse than the base).

Targets (issue 18): C's colour accuracy >= 80%; at most 5 points lost on the other colours'
colour, shape and direction. Every report must come from the same seed and prompts (the
same ``--data`` held-out pairs, settings and sampler), or the comparison is refused.

Wall times come from a file of ``label seconds`` lines (the recipe writes one per training
stage; a later line wins) and, when a report's run directory has the CSV logger's metrics,
the median training throughput (perf/samples_per_s) is read from them.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Mapping

from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_json

ATTRIBUTES = ("colour", "shape", "direction", "size", "joint")
# name -> (what, comparison, threshold); "learned" is a fraction, "lost" is in points
TARGETS: dict[str, tuple[str, str, float]] = {
    "new colour: colour accuracy": ("learned.colour", ">=", 0.80),
    "other colours: colour points lost": ("lost.colour", "<=", 5.0),
    "other colours: shape points lost": ("lost.shape", "<=", 5.0),
    "other colours: direction points lost": ("lost.direction", "<=", 5.0),
}
# report settings that must agree for two reports to be comparable
_SAME_SETTINGS = ("seed", "num_per_combo", "max_combos", "steps", "guidance_scale", "shift", "fast", "num_frames", "height", "width")


def read_report(path: str | Path) -> dict[str, Any]:
    """A ``sora-eval shapes`` report.json, checked for what the comparison reads."""
    p = Path(path)
    if not p.is_file():
        raise SoraError(f"{p}: no such report (run `sora-eval shapes` first)")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SoraError(f"{p}: not valid JSON ({e.msg})") from e
    if not isinstance(report, dict) or "by_colour" not in (report.get("t2v") or {}):
        raise SoraError(f"{p}: no t2v.by_colour (a report from an older sora-eval shapes; re-run it)")
    return report


def read_times(path: str | Path | None) -> dict[str, float]:
    """``label seconds`` per line -> {label: seconds} (a later line of a label wins)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SoraError(f"--times {p}: no such file")
    out: dict[str, float] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            out[parts[0]] = float(parts[1])
        except ValueError:
            raise SoraError(f"--times {p}:{n}: expected 'label seconds', got {line.strip()!r}") from None
    return out


def train_throughput(report: Mapping[str, Any]) -> float | None:
    """Median perf/samples_per_s of the run that wrote the report's export (its csv logs)."""
    run_dir = Path(str(report.get("export", ""))).parent
    values = []
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(f, newline="") as fh:
            values += [float(r["perf/samples_per_s"]) for r in csv.DictReader(fh) if r.get("perf/samples_per_s")]
    return statistics.median(values) if values else None


def pooled(by_colour: Mapping[str, Any], exclude: str) -> dict[str, Any]:
    """Accuracy over every asked colour but ``exclude``, weighted by its prompt count."""
    groups = [g for c, g in by_colour.items() if c != exclude and g.get("n")]
    n = sum(int(g["n"]) for g in groups)
    if n == 0:
        return {"n": 0, "accuracy": {k: None for k in ATTRIBUTES}}
    return {"n": n, "accuracy": {k: sum(g["accuracy"][k] * int(g["n"]) for g in groups) / n for k in ATTRIBUTES}}


def new_colour_scores(report: Mapping[str, Any], colour: str) -> dict[str, Any]:
    """The prompts asking for ``colour``: its own group when scored, else its by_colour entry."""
    t2v = report["t2v"]
    group = (t2v.get("colours") or {}).get(colour)
    if group is not None:
        return {"n": group["n"], "accuracy": {k: group["accuracy"][k] for k in ATTRIBUTES}, "source": f"t2v.colours.{colour}"}
    entry = t2v["by_colour"].get(colour)
    if entry is None:
        return {"n": 0, "accuracy": {k: None for k in ATTRIBUTES}, "source": "none"}
    return {"n": entry["n"], "accuracy": dict(entry["accuracy"]), "source": f"t2v.by_colour.{colour}"}


def _check_comparable(reports: Mapping[str, Mapping[str, Any]]) -> None:
    (first, ref), *rest = reports.items()
    for label, r in rest:
        for key in _SAME_SETTINGS:
            a, b = ref.get("settings", {}).get(key), r.get("settings", {}).get(key)
            if a != b:
                raise SoraError(f"reports {first} and {label} were scored with different {key} ({a!r} vs {b!r}); re-run with the same settings")
        if sorted(map(tuple, ref.get("heldout_pairs", []))) != sorted(map(tuple, r.get("heldout_pairs", []))):
            raise SoraError(f"reports {first} and {label} prompt different held-out pairs; pass the same --data to sora-eval shapes")


def compare_reports(reports: Mapping[str, Mapping[str, Any]], colour: str, times: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The first report is the base. -> {"colour", "base", "runs": {label: {...}}, "targets"}."""
    if len(reports) < 2:
        raise SoraError("shapes-compare: give the base report and at least one fine-tuned report")
    _check_comparable(reports)
    times = dict(times or {})
    base_label = next(iter(reports))
    base_other = pooled(reports[base_label]["t2v"]["by_colour"], colour)
    runs: dict[str, Any] = {}
    for label, r in reports.items():
        other = pooled(r["t2v"]["by_colour"], colour)
        lost = {k: None if other["accuracy"][k] is None or base_other["accuracy"][k] is None
                else 100.0 * (base_other["accuracy"][k] - other["accuracy"][k]) for k in ATTRIBUTES}
        learned = new_colour_scores(r, colour)
        entry = {"export": r.get("export"), "train_step": r.get("train_step"), "new_colour": learned, "other_colours": other,
                 "points_lost": lost, "wall_s": times.get(label), "train_samples_per_s": train_throughput(r)}
        if label != base_label:
            entry["targets"] = _targets(learned, lost)
        runs[label] = entry
    return {"colour": colour, "base": base_label, "runs": runs, "target_defs": {k: f"{v[0]} {v[1]} {v[2]:g}" for k, v in TARGETS.items()}}


def _targets(learned: Mapping[str, Any], lost: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, (path, op, threshold) in TARGETS.items():
        kind, key = path.split(".")
        value = learned["accuracy"][key] if kind == "learned" else lost[key]
        ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
        out[name] = {"value": value, "target": f"{op} {threshold:g}", "pass": bool(ok)}
    return out


def write_comparison(result: Mapping[str, Any], out_dir: str | Path) -> Path:
    """compare.json under ``out_dir`` (atomic); -> its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", dict(result))
    return out / "compare.json"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _pts(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.1f}"


def print_comparison(result: Mapping[str, Any]) -> None:
    """One row per run: the new colour's scores, the other colours' accuracy, points lost,
    targets met and wall time."""
    from rich.console import Console
    from rich.table import Table

    c = result["colour"]
    table = Table(title=f"fine-tuning on '{c}': base {result['base']} vs fine-tunes (lost: points vs the base; + = worse)")
    for col in ("run", f"{c}: colour", f"{c}: joint", "others: colour", "others: shape", "others: direction", "others: joint",
                "lost colour", "lost shape", "lost direction", "targets", "wall s", "train samples/s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, r in result["runs"].items():
        new, other, lost = r["new_colour"]["accuracy"], r["other_colours"]["accuracy"], r["points_lost"]
        tg = r.get("targets")
        met = "base" if tg is None else f"{sum(t['pass'] for t in tg.values())}/{len(tg)}"
        table.add_row(label, _pct(new["colour"]), _pct(new["joint"]), _pct(other["colour"]), _pct(other["shape"]),
                      _pct(other["direction"]), _pct(other["joint"]), _pts(lost["colour"]), _pts(lost["shape"]), _pts(lost["direction"]),
                      met, "n/a" if r["wall_s"] is None else f"{r['wall_s']:.0f}",
                      "n/a" if r["train_samples_per_s"] is None else f"{r['train_samples_per_s']:.1f}")
    Console(width=200).print(table)
    print("targets: " + "; ".join(result["target_defs"].keys()) + " (" + ", ".join(result["target_defs"].values()) + ")")
