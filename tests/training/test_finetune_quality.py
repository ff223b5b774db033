"""Fine-tuning measured (issue 18): shapes sets without a colour / of one colour only, the
comparison of a base's and its fine-tunes' sora-eval shapes reports, and the fast version of
launch/finetune_quality.sh through the real entry points (pretrain without the colour, full and
LoRA fine-tunes on it, sora-eval shapes, sora-eval shapes-compare)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from sora_train.data.shapes import COLOURS, ShapesSetSpec
from sora_train.training import shapes_compare as sc
from sora_train.training.shapes_eval import ShapesEvalSettings, by_colour, colour_combos
from sora_train.utils.errors import SoraError

from cli_runs import BIN, ROOT, base_env


# -- the data option ------------------------------------------------------------------------------
def test_palette_restricts_and_excludes_colours():
    spec = ShapesSetSpec(8, 2, exclude_colours=["yellow"])
    assert "yellow" not in spec.palette and len(spec.palette) == len(COLOURS) - 1
    assert all(c != "yellow" for c, _ in spec.pairs)  # the default held-out pairs lose the excluded colour
    assert spec.options()["colours"] == list(spec.palette)
    assert "colours" not in ShapesSetSpec(8, 2).options()  # full palette: sets written before the option stay current
    only = ShapesSetSpec(8, 2, colours=["yellow"], heldout=[])
    assert only.palette == ("yellow",) and only.heldout_clips == 0


@pytest.mark.parametrize("kwargs, needle", [
    ({"colours": "yellow"}, "not one string"),
    ({"colours": ["pink"]}, "['pink']"),
    ({"exclude_colours": ["teal"]}, "exclude_colours"),
    ({"colours": ["red"], "exclude_colours": ["red"]}, "leaves no colour"),
    ({"colours": ["red", "blue"], "heldout": [["green", "circle"]]}, "not in the data set's colours"),
])
def test_bad_palettes_are_one_line_errors(kwargs, needle):
    with pytest.raises(SoraError, match=None) as e:
        ShapesSetSpec(8, 2, **kwargs).pairs
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- per colour and the comparison, on made-up records / reports ------------------------------------
def _record(colour: str, hit: bool) -> dict:
    attrs = ("colour", "shape", "direction", "size")
    return {"expected": {"colour": colour, "shape": "circle", "direction": "left", "size": "small"},
            "read": {k: "x" for k in attrs}, "hits": {**{k: hit for k in attrs}, "joint": hit}, "present": True, "temporal": {}}


def _report(acc: dict[str, float], new: float | None = None, **settings) -> dict:
    """A report whose by_colour has 10 prompts per colour at these accuracies."""
    t2v = {"by_colour": {c: {"n": 10, "accuracy": {k: a for k in sc.ATTRIBUTES}} for c, a in acc.items()}}
    if new is not None:
        t2v["colours"] = {"yellow": {"n": 32, "accuracy": {k: new for k in sc.ATTRIBUTES}}}
    return {"export": "/nowhere/export", "train_step": 3, "heldout_pairs": [["red", "circle"]], "t2v": t2v,
            "settings": {"seed": 0, "steps": 20, **settings}}


def test_by_colour_and_colour_combos():
    groups = by_colour([_record("red", True), _record("red", False), _record("blue", True)])
    assert groups["red"] == {"n": 2, "accuracy": {k: 0.5 for k in sc.ATTRIBUTES}} and groups["blue"]["n"] == 1
    assert len(colour_combos(["yellow"])) == 32 and {a.colour for a in colour_combos(["yellow"])} == {"yellow"}
    assert colour_combos(["yellow"], 4, 0) == colour_combos(["yellow"], 4, 0) and len(colour_combos(["yellow"], 4)) == 4
    with pytest.raises(SoraError, match="not in the palette"):
        ShapesEvalSettings(colours=("pink",))


def test_compare_reads_learned_and_lost_against_the_base(tmp_path):
    base = _report({"red": 1.0, "blue": 0.9, "yellow": 0.0}, new=0.0)
    tuned = _report({"red": 0.95, "blue": 0.8, "yellow": 1.0}, new=0.9)
    times = tmp_path / "times.txt"
    times.write_text("tuned 12\ntuned 61.5\n\n")
    result = sc.compare_reports({"base": base, "tuned": tuned}, "yellow", sc.read_times(times))
    run = result["runs"]["tuned"]
    assert run["new_colour"]["accuracy"]["colour"] == 0.9 and run["new_colour"]["source"] == "t2v.colours.yellow"
    assert run["other_colours"]["n"] == 20 and run["points_lost"]["shape"] == pytest.approx(7.5)  # (95+90)/2 - (95+80)/2
    assert run["wall_s"] == 61.5 and result["runs"]["base"]["points_lost"]["colour"] == 0.0
    assert run["targets"]["new colour: colour accuracy"]["pass"] and not run["targets"]["other colours: shape points lost"]["pass"]
    # without its own group, the new colour's prompts come from by_colour
    assert sc.new_colour_scores(_report({"yellow": 0.25}), "yellow")["accuracy"]["colour"] == 0.25
    with pytest.raises(SoraError, match="different steps"):
        sc.compare_reports({"base": base, "tuned": _report({"red": 1.0}, steps=2)}, "yellow")
    bad = tmp_path / "bad.txt"
    bad.write_text("tuned twelve\n")
    with pytest.raises(SoraError, match=r"bad.txt:1"):
        sc.read_times(bad)


# -- the recipe, at toy scale ---------------------------------------------------------------------------
def _tiny_vae_export(base: Path) -> Path:
    import torch

    from sora_train.models.export import export_parts
    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    return export_parts(base / "vae" / "export", {"vae": build_vae("debug")}, {"task": "vae", "step": 0})


def _captions(shard_dir: Path) -> list[str]:
    out = []
    for tar in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    out += [meta["caption"], *meta["captions"].values(), meta["attributes"]["colour"]]
    return out


@pytest.mark.slow
def test_fast_recipe_pretrains_without_the_colour_fine_tunes_both_ways_and_compares(tmp_path):
    base, out, data = tmp_path / "base", tmp_path / "out", tmp_path / "data"
    _tiny_vae_export(base)
    env = base_env(SORA_QUALITY_DIR=str(base), SORA_FINETUNE_DIR=str(out), SORA_DATA_DIR=str(data), SORA_FINETUNE_FAST="1",
                   SORA_FINETUNE_VARIANTS="full lora_replay", PATH=f"{BIN}:{os.environ['PATH']}")
    p = subprocess.run(["bash", "launch/finetune_quality.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    # the held-out colour is in no clip or caption the pretrain saw, and it is all the fine-tune saw
    for split in ("train", "val", "heldout"):
        assert not any("yellow" in c for c in _captions(data / "shapes_without_yellow" / split)), split
    assert not any("yellow" in c for c in _captions(out / "latents" / "pretrain_train"))
    new = _captions(out / "latents" / "new_train")
    assert new and all("yellow" in c for c in new)
    assert json.loads((data / "shapes_without_yellow" / "train" / "index.json").read_text())["options"]["colours"] == [
        c for c in COLOURS if c != "yellow"]
    # both fine-tunes exported from the pretrain; LoRA with its adapters
    for run in ("pretrain", "full", "lora_replay"):
        assert (out / run / "export" / "model.json").is_file(), run
    assert (out / "lora_replay" / "export" / "adapter.safetensors").is_file()
    cmp = json.loads((out / "compare" / "compare.json").read_text())
    assert cmp["colour"] == "yellow" and cmp["base"] == "pretrain" and set(cmp["runs"]) == {"pretrain", "full", "lora_replay"}
    for label in ("full", "lora_replay"):
        run = cmp["runs"][label]
        assert run["new_colour"]["source"] == "t2v.colours.yellow" and run["new_colour"]["n"] > 0
        assert run["wall_s"] > 0 and set(run["targets"]) == set(sc.TARGETS)
    assert "fine-tuning on 'yellow'" in p.stdout
