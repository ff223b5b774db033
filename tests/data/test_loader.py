"""The loader: bucketed batches of one shape, image+video mix, exact resume, corrupt samples —
with every decoder of ``data.decoder`` (a decoder that cannot load on this machine is skipped
with its reason: torchcodec's PyPI wheel needs the CUDA build of torch)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from sora_train.data.buckets import BucketTable
from sora_train.data.datamodule import VideoDataModule
from sora_train.data.dataset import ShardVideoDataset, expand_shards
from sora_train.data.shards import ShardWriter
from sora_train.data.transforms import frame_indices, resize_for_crop
from sora_train.data.video_io import DECODERS, decode_video, encode_image, encode_video, probe_video, torchcodec_problem
from sora_train.utils.errors import SoraError

BUCKETS = [
    {"num_frames": 9, "height": 32, "width": 32, "batch_size": 4},
    {"num_frames": 9, "height": 32, "width": 48, "batch_size": 4},
    {"num_frames": 1, "height": 32, "width": 32, "batch_size": 8},
]


def _decoder_params():
    for d in DECODERS:
        problem = torchcodec_problem() if d == "torchcodec" else None
        yield pytest.param(d, id=d, marks=pytest.mark.skipif(problem is not None, reason=problem or ""))


ALL_DECODERS = list(_decoder_params())


def _meta(i: int, F: int, H: int, W: int, fps: float = 8.0) -> dict:
    return dict(caption=f"clip {i}", captions={"original": f"clip {i}", "rewritten": f"a long description of clip {i}"}, fps=fps, num_frames=F,
                width=W, height=H, duration=F / fps if fps else 0.0, frame_range=[0, F], source={"path": f"src/{i}", "sha256": f"{i:064x}"})


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """48 clips in 6 shards: square and wide videos of 17/25 frames, plus a few images."""
    d = tmp_path_factory.mktemp("loader_shards")
    with ShardWriter(d, max_count=8) as w:
        for i in range(48):
            if i % 8 == 7:
                img = np.full((40, 40, 3), i * 5, np.uint8)
                w.write(f"img{i:03d}", {"png": encode_image(img)}, _meta(i, 1, 40, 40, 0.0))
                continue
            F = 17 if i % 3 else 25
            H, W = (36, 54) if i % 2 else (40, 40)
            frames = np.full((F, H, W, 3), i * 5, np.uint8)
            frames[:, :, :, 0] = np.arange(F, dtype=np.uint8)[:, None, None] * 10  # frame index in red
            w.write(f"vid{i:03d}", {"mp4": encode_video(frames, 8)}, _meta(i, F, H, W))
    return d


def _batches(dm: VideoDataModule, n: int) -> list[dict]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_frame_indices_and_resize_math():
    assert frame_indices(17, 8.0, 9, None, None) == list(range(4, 13))  # centred
    assert frame_indices(17, 16.0, 9, 8.0, None) == list(range(0, 17, 2))  # 16 -> 8 fps
    assert frame_indices(5, 8.0, 9, None, None) is None  # too short
    assert resize_for_crop(36, 54, 32, 32) == (32, 48)
    assert resize_for_crop(40, 40, 32, 48) == (48, 48)


def test_bucket_table_validation():
    with pytest.raises(SoraError, match="data.buckets\\[0\\]: unknown field"):
        BucketTable([{"num_frames": 1, "height": 2, "width": 2, "colour": 1}])
    with pytest.raises(SoraError, match="no batch_size"):
        BucketTable([{"num_frames": 1, "height": 2, "width": 2}])
    t = BucketTable([{"num_frames": 9, "height": 32, "width": 32}], tokens_per_batch=9 * 32 * 32 * 3)
    assert t.buckets[0].batch_size == 3
    with pytest.raises(SoraError, match="image_ratio > 0 but no image bucket"):
        BucketTable(BUCKETS[:2], image_ratio=0.5)
    table = BucketTable(BUCKETS)
    assert table.assign(25, 36, 54, 8.0, None).name == "9x32x48"  # wide video -> wide bucket
    assert table.assign(1, 40, 40, 0.0, None).name == "1x32x32"
    assert table.assign(5, 40, 40, 8.0, None) is None  # too short for every video bucket


def test_schedule_is_shared_by_ranks_and_mixes_images():
    t = BucketTable(BUCKETS, image_ratio=0.25)
    a = [t.schedule(7, 0, j).name for j in range(400)]
    assert a == [t.schedule(7, 0, j).name for j in range(400)]  # a pure function of (seed, j)
    frac = sum(n.startswith("1x") for n in a) / len(a)
    assert 0.15 < frac < 0.35


def test_schedule_draws_every_bucket_at_its_share_without_drift():
    """Over n batches each bucket is drawn n * share times give or take a few, for a consumer
    taking every batch or every k-th: no random-walk drift (sqrt(n), ~35 here) that lets the
    samples waiting for an under-drawn bucket pile up until the loader stops."""
    t = BucketTable(BUCKETS + [{"num_frames": 1, "height": 32, "width": 48, "batch_size": 8}], image_ratio=0.2,
                    weights={"9x32x32": 3.0, "9x32x48": 1.0, "1x32x32": 1.0, "1x32x48": 1.0})
    share = {"9x32x32": 0.6, "9x32x48": 0.2, "1x32x32": 0.1, "1x32x48": 0.1}
    n = 6000
    for stride, first in [(1, 0), (2, 1), (3, 2), (8, 5)]:
        names = [t.schedule(11, 0, first + stride * j).name for j in range(n)]
        worst = max(abs(names.count(b) - n * s) for b, s in share.items())
        assert worst <= 12, (stride, worst)


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_batches_are_one_shape_and_mix_images_and_videos(shard_dir, decoder):
    dm = VideoDataModule(str(shard_dir), BUCKETS, image_ratio=0.3, num_workers=2, shuffle_buffer=8, caption_probs={"rewritten": 1.0}, decoder=decoder)
    dm.setup()
    batches = _batches(dm, 16)
    kinds = set()
    for j, b in enumerate(batches):
        assert b["batch_index"] == j  # workers alternate: batch j comes from worker j % 2
        F, H, W = (int(x) for x in b["bucket"].split("x"))
        v = b["video"]  # the workers hand over uint8 as decoded; the DataModule makes it float on the device
        assert v.shape[1:] == (F, H, W, 3) and v.dtype == torch.uint8
        f = dm.on_after_batch_transfer(dict(b), 0)["video"]
        assert f.shape[1:] == (3, F, H, W) and f.dtype == torch.float32 and f.is_contiguous()
        assert -1.0 <= float(f.min()) and float(f.max()) <= 1.0
        torch.testing.assert_close(f, v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0)
        assert len(b["caption"]) == v.shape[0] and all(c.startswith("a long description") for c in b["caption"])
        kinds.add("image" if F == 1 else "video")
    assert kinds == {"image", "video"}


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_temporal_sampling_reads_consecutive_frames(shard_dir, decoder):
    dm = VideoDataModule(str(shard_dir), BUCKETS[:2], num_workers=0, shuffle_buffer=4, decoder=decoder)
    dm.setup()
    b = _batches(dm, 1)[0]
    red = (b["video"][..., 4, 4, 0].float() / 10).round()  # (B, F) frame index written in red
    steps = red[:, 1:] - red[:, :-1]
    assert torch.all(steps == 1), red


@pytest.mark.parametrize(("workers", "consumed"), [(0, 6), (2, 6), (2, 7)])
def test_exact_resume(shard_dir, workers, consumed):
    """Consume k batches, checkpoint the DataModule, restart: the stream continues with exactly
    the batches an uninterrupted run would have produced (odd k: the next batch is worker 1's,
    though a new DataLoader iterator asks worker 0 first)."""
    kw = dict(image_ratio=0.2, num_workers=workers, shuffle_buffer=8, seed=3)
    dm = VideoDataModule(str(shard_dir), BUCKETS, **kw)
    dm.setup()
    full = _batches(dm, consumed + 8)
    for b in full[:consumed]:  # what the trainer consumed before the "crash"
        dm.trainer = type("T", (), {"training": True})()
        dm.on_after_batch_transfer(b, 0)
    state = dm.state_dict()

    dm2 = VideoDataModule(str(shard_dir), BUCKETS, **kw)
    dm2.load_state_dict(state)
    dm2.setup()
    resumed = _batches(dm2, 8)
    for a, b in zip(full[consumed:], resumed, strict=True):
        assert a["batch_index"] == b["batch_index"]
        assert a["key"] == b["key"]
        assert torch.equal(a["video"], b["video"])


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_decoders_agree_on_frames_size_and_count(decoder):
    """Every decoder reads the same stream: frame count, fps, size, and the frames at given
    indices (H.264 is lossy and decoders may convert YUV->RGB slightly differently: a few levels)."""
    F, H, W = 12, 32, 48
    frames = np.zeros((F, H, W, 3), np.uint8)
    frames[..., 0] = (np.arange(F, dtype=np.uint8) * 20)[:, None, None]
    frames[:, :, W // 2 :, 1] = 200  # a vertical edge, so that resizing shows
    data = encode_video(frames, 8)
    info = probe_video(data, backend=decoder)
    assert (info.num_frames, info.width, info.height) == (F, W, H) and info.fps == pytest.approx(8.0)
    idx = [0, 5, 11, 5]
    got = decode_video(data, idx, backend=decoder)
    assert got.shape == (4, H, W, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - frames[idx].astype(int)).mean() < 4
    small = decode_video(data, [1, 2], backend=decoder, width=24, height=16)
    ref = decode_video(data, [1, 2], backend="decord", width=24, height=16)
    if decoder != "pyav":  # pyav reads at full size; the loader resizes after it
        assert small.shape == (2, 16, 24, 3)
        assert np.abs(small.astype(int) - ref.astype(int)).mean() < 6


def test_a_decoder_that_cannot_load_is_a_one_line_error(tmp_path):
    """data.decoder=torchcodec where torchcodec does not load (this machine: PyPI's wheel needs
    CUDA torch) stops before any sample is read, with one line saying what to install —
    instead of every sample failing and the skip-rate guard firing with a misleading error."""
    table = BucketTable([BUCKETS[0]])
    if torchcodec_problem() is None:
        ShardVideoDataset(str(tmp_path), table, decoder="torchcodec")  # loads: nothing to report
        return
    with pytest.raises(SoraError) as e:
        ShardVideoDataset(str(tmp_path), table, decoder="torchcodec")
    msg = str(e.value)
    assert msg.startswith("data.decoder=torchcodec: torchcodec does not load") and "\n" not in msg and "download.pytorch.org" in msg


@pytest.mark.parametrize("decoder", ALL_DECODERS)
def test_corrupt_samples_are_skipped_and_counted(tmp_path, decoder):
    good = encode_video(np.zeros((9, 32, 32, 3), np.uint8), 8)
    with ShardWriter(tmp_path, max_count=100) as w:
        for i in range(20):
            data = good if i % 5 else b"\x00not a video at all" * 10
            w.write(f"s{i:03d}", {"mp4": data}, _meta(i, 9, 32, 32))
    ds = ShardVideoDataset(str(tmp_path), BucketTable([BUCKETS[0]]), max_skip_rate=0.5, shuffle_buffer=1, decoder=decoder)
    it = iter(ds)
    batches = [next(it) for _ in range(3)]
    assert all(b["video"].shape[0] <= 4 for b in batches)
    assert batches[-1]["skipped"] >= 1
    # past the allowed rate the run stops with a clear error instead of training on nothing
    strict = ShardVideoDataset(str(tmp_path), BucketTable([BUCKETS[0]]), max_skip_rate=0.01, min_samples_for_skip_check=5, shuffle_buffer=1, decoder=decoder)
    with pytest.raises(SoraError, match="max_skip_rate"):
        for _ in zip(range(20), iter(strict)):
            pass


def test_truncated_shard_is_survived(tmp_path, shard_dir):
    src = sorted(shard_dir.glob("*.tar"))[0].read_bytes()
    (tmp_path / "cut.tar").write_bytes(src[: len(src) // 2])
    (tmp_path / "ok.tar").write_bytes(sorted(shard_dir.glob("*.tar"))[1].read_bytes())
    ds = ShardVideoDataset(str(tmp_path), BucketTable(BUCKETS[:2]), max_skip_rate=0.9, shuffle_buffer=1)
    b = next(iter(ds))
    assert b["video"].shape[0] == 4


def test_bad_paths_give_one_line_errors(tmp_path):
    with pytest.raises(SoraError, match="data path not found: /nonexistent"):
        expand_shards("/nonexistent/shard-{000..002}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoraError, match="no index.json and no"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(SoraError, match="decoder"):
        ShardVideoDataset(str(tmp_path / "empty"), BucketTable(BUCKETS[:1]), decoder="ffmpeg-cli")


def test_nothing_is_unpickled(tmp_path):
    """A shard member with a pickle extension is never decoded, only allowlisted ones are."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a.pyd", b"cos\nsystem\n(S'echo pwned'\ntR."), ("a.json", b'{"caption": "x"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "evil.tar").write_bytes(buf.getvalue())
    from sora_train.data.dataset import iter_tar_samples

    (sample,) = list(iter_tar_samples(str(tmp_path / "evil.tar")))
    assert "pyd" not in sample and sample["json"] == b'{"caption": "x"}'
