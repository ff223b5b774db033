"""`sora-eval vae`: reconstruction PSNR/SSIM of a VAE export, JSON report, side-by-side video."""

from __future__ import annotations

import json

import pytest
import torch

from sora_train.data.shapes import ShapesWorld, generate_shards
from sora_train.data.video_io import decode_video, probe_video
from sora_train.models.vae import build_vae
from sora_train.models.export import export_parts
from sora_train.training.vae_eval import evaluate_vae
from sora_train.utils.errors import SoraError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_eval")
    generate_shards(root / "shapes", num_train=0, num_val=5, world=ShapesWorld(num_frames=9), heldout=[])
    torch.manual_seed(0)
    export_parts(root / "vae", {"vae": build_vae("debug")})
    return root


def test_cli_writes_json_video_and_strip(setup, capsys):
    from sora_train.cli.eval import main

    out = setup / "eval"
    with pytest.raises(SystemExit) as e:
        main(["vae", "--vae", str(setup / "vae"), "--shards", str(setup / "shapes" / "val"), "--out", str(out),
              "--max-samples", "4", "--num-videos", "2", "--batch-size", "3"])
    assert e.value.code == 0
    assert "PSNR" in capsys.readouterr().out
    r = json.loads((out / "vae_eval.json").read_text())
    assert r["num_samples"] == 4 and len(r["samples"]) == 4  # max-samples cuts the second batch
    assert r["shape"] == {"num_frames": 9, "height": 32, "width": 32}  # the set's shape, by default
    assert r["latent_shape"] == [4, 5, 8, 8]
    assert 0.0 < r["psnr_mean"] < 60.0 and -1.0 <= r["ssim_mean"] <= 1.0
    for row in r["samples"]:
        assert row["key"].startswith("shapes_val_") and 0.0 < row["psnr"] < 60.0
    assert r["psnr_mean"] == pytest.approx(sum(x["psnr"] for x in r["samples"]) / 4, abs=1e-3)
    # two clips, each row input | reconstruction with 2-px dividers
    data = (out / r["video"]).read_bytes()
    info = probe_video(data)
    assert (info.num_frames, info.height, info.width) == (9, 2 * 32 + 2, 2 * 32 + 2)
    assert decode_video(data).shape == (9, 66, 66, 3)
    assert (out / r["strip"]).stat().st_size > 0


def test_shape_errors_name_the_options(setup):
    val = str(setup / "shapes" / "val")
    with pytest.raises(SoraError, match="--num-frames/--height/--width 8x32x32"):
        evaluate_vae(setup / "vae", val, setup / "e1", num_frames=8, height=32, width=32)
    with pytest.raises(SoraError, match="go together"):
        evaluate_vae(setup / "vae", val, setup / "e2", num_frames=9)
    with pytest.raises(SoraError, match="no clip could be read"):  # every clip too short for 17 frames
        evaluate_vae(setup / "vae", val, setup / "e3", num_frames=17, height=32, width=32)
