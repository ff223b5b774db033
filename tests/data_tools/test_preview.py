"""`sora-data preview`: a contact sheet of real loader batches, one section per bucket."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from sora_train.data.shapes import ShapesWorld, generate_shards
from sora_train.data_tools.cli import main
from sora_train.data_tools.preview import SheetStyle, parse_buckets
from sora_train.utils.errors import SoraError


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview_shapes")
    generate_shards(root, num_train=16, num_val=0, world=ShapesWorld(num_frames=9))
    return root / "train"


def expected_size(style: SheetStyle, sections: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Sheet size from the layout rule: sections of (frames shown, H, W, panels) stacked, each
    a header and rows of ``style.columns`` equal panels."""
    width, height = 0, style.pad
    for k, h, w, panels in sections:
        pw = k * round(w * style.frame_height / h) + (k - 1) * style.frame_gap
        ph = style.frame_height + style.caption_height
        width = max(width, style.pad + min(style.columns, panels) * (pw + style.pad))
        height += style.header_height + math.ceil(panels / style.columns) * (ph + style.pad)
    return width, height


def test_preview_draws_a_section_per_bucket(shapes_train, tmp_path, capsys):
    out = tmp_path / "sheet.png"
    rc = main([
        "preview", str(shapes_train), "--out", str(out),
        "--buckets", "9x32x32:4,1x32x32:8", "--image-ratio", "0.5",
        "--samples", "3", "--frames", "4", "--columns", "2", "--frame-height", "64",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "9x32x32: 3 sample(s)" in printed and "1x32x32: 3 sample(s)" in printed
    style = SheetStyle(frame_height=64, columns=2)
    # video bucket: 3 panels of 4 frames in 2 rows; image bucket: 3 panels of 1 frame
    assert Image.open(out).size == expected_size(style, [(4, 32, 32, 3), (1, 32, 32, 3)])
    assert Image.open(out).format == "PNG"


def test_preview_defaults_to_the_shapes_of_the_index(shapes_train, tmp_path, capsys):
    out = tmp_path / "native.png"
    assert main(["preview", str(shapes_train), "--out", str(out), "--samples", "2"]) == 0
    assert "one bucket per shape of the index: 9x32x32" in capsys.readouterr().out
    assert Image.open(out).size == expected_size(SheetStyle(), [(4, 32, 32, 2)])


def test_preview_reads_a_data_option_and_rejects_bad_input(shapes_train, tmp_path, capsys):
    data = tmp_path / "data.yaml"  # the form of conf/data/*.yaml; seed is a Hydra interpolation
    data.write_text(
        "_target_: sora_train.data.datamodule.VideoDataModule\n"
        "buckets:\n  - {num_frames: 5, height: 32, width: 32, batch_size: 2}\n"
        "caption_probs: {original: 1.0}\nseed: ${seed}\n"
    )
    out = tmp_path / "data.png"
    assert main(["preview", str(shapes_train), "--out", str(out), "--data", str(data), "--samples", "2"]) == 0
    assert Image.open(out).size == expected_size(SheetStyle(), [(4, 32, 32, 2)])

    assert main(["preview", str(shapes_train), "--out", str(out), "--data", "nope"]) == 2
    assert "not a conf/data option" in capsys.readouterr().err
    other = tmp_path / "latents.yaml"
    other.write_text("_target_: sora_train.data.latents.LatentDataModule\nbuckets: null\n")
    assert main(["preview", str(shapes_train), "--out", str(out), "--data", str(other)]) == 2
    assert "previews read video shards" in capsys.readouterr().err
    with pytest.raises(SoraError, match="FRAMESxHEIGHTxWIDTH"):
        parse_buckets("17x32:8")
