"""Loading an export executes nothing it names.

An export is model.json + model.safetensors that anyone may hand a user. Crafted ones (a
foreign ``_target_`` in the diffusion settings, a part naming a function or another package's
class, unknown constructor arguments, a truncated weights file) are refused with a one-line
error, and nothing they name is called: the files they would create or copy do not appear.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sora_train.diffusion import FlowMatching
from sora_train.models.dit import build_dit
from sora_train.models.export import export_parts, load_parts
from sora_train.models.text import TinyTextEncoder
from sora_train.models.vae import build_vae
from sora_train.training.pipeline import VideoPipeline
from sora_train.utils.errors import SoraError


@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    vae, text = build_vae("debug"), TinyTextEncoder(dim=32, depth=1, num_heads=2, trainable=False)
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    return export_parts(tmp_path / "export", {"vae": vae, "text": text, "dit": dit}, {"task": "dit", "diffusion": FlowMatching(base_shift=2.0).config()})


def _edit(export, fn):
    path = export / "model.json"
    spec = json.loads(path.read_text())
    fn(spec)
    path.write_text(json.dumps(spec))


def test_a_plain_export_loads_and_keeps_its_settings(export):
    pipe = VideoPipeline.from_export(export)
    assert pipe.flow.base_shift == 2.0 and pipe.flow.config() == FlowMatching(base_shift=2.0).config()


def test_exports_written_with_hydra_targets_still_load(export):
    def old_style(spec):
        spec["meta"]["diffusion"]["_target_"] = "sora_train.diffusion.FlowMatching"
        spec["meta"]["diffusion"]["timestep_sampler"]["_target_"] = "sora_train.diffusion.TimestepSampler"

    _edit(export, old_style)
    assert VideoPipeline.from_export(export).flow.base_shift == 2.0


@pytest.mark.parametrize("crafted", ["open", "copyfile", "nested", "callable_value", "dunder"])
def test_crafted_diffusion_settings_are_refused_and_touch_nothing(export, tmp_path, crafted):
    victim, copy = tmp_path / "pwned.txt", tmp_path / "copied.json"
    settings = {
        "open": {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
        "copyfile": {"_target_": "shutil.copyfile", "src": str(export / "model.json"), "dst": str(copy)},
        "nested": {"timestep_sampler": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}},
        "callable_value": {"base_shift": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}},
        "dunder": {"_args_": [str(victim), "w"], "base_shift": 1.0},
    }[crafted]
    _edit(export, lambda spec: spec["meta"].__setitem__("diffusion", settings))
    with pytest.raises(SoraError) as e:
        VideoPipeline.from_export(export)
    assert "\n" not in str(e.value) and "model.json" in str(e.value)
    assert not victim.exists() and not copy.exists()


@pytest.mark.parametrize("target, config, match", [
    ("sora_train.utils.io.atomic_write_text", {"path": "VICTIM", "text": "x"}, "only sora_train.models classes"),
    ("os.system", {"command": "touch VICTIM"}, "only sora_train.models classes"),
    ("sora_train.models.export.save_safetensors_atomic", {"tensors": {}, "path": "VICTIM"}, "not a model class"),
    ("sora_train.models.dit.dit.DiT", {"in_channels": 4, "evil": "VICTIM"}, "unknown argument 'evil'"),
])
def test_crafted_parts_are_refused_and_touch_nothing(export, tmp_path, target, config, match):
    victim = tmp_path / "pwned.txt"
    config = json.loads(json.dumps(config).replace("VICTIM", str(victim)))
    _edit(export, lambda spec: spec["parts"].__setitem__("dit", {"target": target, "config": config}))
    with pytest.raises(SoraError, match=match):
        load_parts(export)
    assert not victim.exists()


def test_a_truncated_weights_file_is_one_line(export):
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SoraError, match="model.safetensors: not a readable safetensors file") as e:
        load_parts(export)
    assert "\n" not in str(e.value)


def test_sora_sample_on_a_crafted_export_is_one_line_and_touches_nothing(export, tmp_path):
    victim = tmp_path / "pwned.txt"
    _edit(export, lambda spec: spec["meta"].__setitem__("diffusion", {"_target_": "builtins.open", "file": str(victim), "mode": "w"}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run([str(bin_dir / "sora-sample"), "--ckpt", str(export), "--prompt", "a red circle", "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "refusing _target_='builtins.open'" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not victim.exists() and not (tmp_path / "out").exists()
