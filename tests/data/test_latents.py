"""Latent shards: `sora-data cache-latents` end to end, the latent loader, and DiT training
from latents with no VAE in the loop.

One tiny shapes-world set (8 clips of 9x32x32) and a debug VAE, cached once per module.
"""

from __future__ import annotations

import io
import json
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from sora_train.data.buckets import BucketTable
from sora_train.data.dataset import ShardVideoDataset
from sora_train.data.transforms import video_to_float
from sora_train.data.latents import (
    LatentDataModule,
    decode_latent,
    decode_text_member,
    export_fingerprint,
    pad_text,
    text_fingerprint,
    vae_fingerprint,
)
from sora_train.data.shapes import ShapesWorld, generate_shards
from sora_train.data.shards import REQUIRED_META, iter_samples, read_index, shard_paths
from sora_train.data_tools.cache_latents import CacheOptions, cache_latents
from sora_train.models.text import TinyTextEncoder
from sora_train.models.vae import build_vae
from sora_train.models.export import export_parts
from sora_train.utils.errors import SoraError

SHAPE = (9, 32, 32)
OPTS = dict(shapes=[SHAPE], dtype="float32", batch_size=4, shard_max_count=3)


def _vae(seed: int, shift: float = 0.1):
    torch.manual_seed(seed)
    vae = build_vae("debug")
    vae.set_latent_stats(torch.full((4,), shift), torch.tensor([2.0, 1.0, 0.5, 1.5]))
    return vae.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    generate_shards(root / "shapes", num_train=8, num_val=0, world=ShapesWorld(num_frames=9), heldout=[], clips_per_shard=4)
    vae = _vae(0)
    text = TinyTextEncoder(dim=32, depth=1, num_heads=2, vocab_size=512, max_length=32)
    export_parts(root / "vae", {"vae": vae})
    export_parts(root / "vae_other", {"vae": _vae(1)})
    export_parts(root / "text", {"text": text})
    index = cache_latents(root / "shapes" / "train", root / "lat", root / "vae", CacheOptions(**OPTS), text_dir=root / "text", quiet=True)
    return {"root": root, "vae": vae, "text": text, "src": root / "shapes" / "train", "lat": root / "lat", "index": index}


def _samples(d):
    return [s for p in shard_paths(d) for s in iter_samples(p)]


def test_fingerprint_is_the_module_not_the_file(world, tmp_path):
    vae, text = world["vae"], world["text"]
    # The same VAE inside a multi-part export (as a DiT run writes it) has the same hash.
    export_parts(tmp_path, {"vae": vae, "text": text})
    assert export_fingerprint(tmp_path, "vae") == vae_fingerprint(vae) == export_fingerprint(world["root"] / "vae")
    assert export_fingerprint(tmp_path, "text") == text_fingerprint(text)
    other = _vae(0, shift=0.2)  # same weights, other latent statistics: other normalised latents
    assert vae_fingerprint(other) != vae_fingerprint(vae)
    with pytest.raises(SoraError, match="no 'dit' part"):
        export_fingerprint(tmp_path, "dit")


def test_cache_writes_normalised_latents_text_and_json(world):
    index, vae, text = world["index"], world["vae"], world["text"]
    assert index["num_samples"] == 8 and index["shape_histogram"] == {"9x32x32": 8}
    assert index["vae_hash"] == vae_fingerprint(vae) and index["text_hash"] == text_fingerprint(text)
    assert index["latent"]["normalized"] is True and index["latent"]["channels"] == 4
    assert [s["count"] for s in index["shards"]] == [3, 3, 2]
    # the source set's options (shapes world: held-out pairs) travel along for sora-eval shapes
    assert index["source_options"] == read_index(world["src"])["options"] and "heldout_pairs" in index["source_options"]

    # The reference: the video loader's validation decode of the same clips, through the VAE.
    ref_ds = ShardVideoDataset(str(world["src"]), BucketTable([{"num_frames": 9, "height": 32, "width": 32, "batch_size": 8}]), train=False)
    ref = next(iter(ref_ds))
    with torch.no_grad():
        want = vae.normalize(vae.encode(video_to_float(ref["video"])).mode())  # (8, 4, 5, 8, 8)
    want = dict(zip(ref["key"], want))

    samples = _samples(world["lat"])
    assert sorted(s["__key__"] for s in samples) == sorted(want)
    for s in samples:
        meta = json.loads(s["json"])
        assert all(k in meta for k in REQUIRED_META)
        assert (meta["num_frames"], meta["height"], meta["width"]) == SHAPE
        assert meta["latent"] == {"shape": [4, 5, 8, 8], "dtype": "float32", "member": "latent.safetensors", "normalized": True}
        assert meta["cached_from"]["frame_indices"] == list(range(9))
        z = decode_latent(s["latent.safetensors"], "latent.safetensors")
        torch.testing.assert_close(z, want[s["__key__"]], atol=1e-5, rtol=1e-5)
        # every caption a loader may choose is embedded, unpadded, exactly as the encoder does
        caps = meta["text_embeddings"]["captions"]
        assert caps[0] == meta["caption"] and meta["captions"]["dense"] in caps
        cached = decode_text_member(s["text.safetensors"])
        with torch.no_grad():
            emb, mask = text(caps)
        for i, c in enumerate(caps):
            torch.testing.assert_close(cached[str(i)], emb[i, : int(mask[i].sum())])


def test_rerun_skips_resumes_and_refuses_other_settings(world, tmp_path):
    out = tmp_path / "lat"
    shutil.copytree(world["lat"], out)
    index = cache_latents(world["src"], out, world["root"] / "vae", CacheOptions(**OPTS), text_dir=world["root"] / "text", quiet=True)
    assert index["num_samples"] == 8 and len(index["shards"]) == 3  # nothing re-encoded
    # A killed run: its last shard never got its final name -> only those clips are redone.
    (out / "shard-000002.tar").rename(out / ".shard-000002.tar.tmp")
    index = cache_latents(world["src"], out, world["root"] / "vae", CacheOptions(**OPTS), text_dir=world["root"] / "text", quiet=True)
    assert index["num_samples"] == 8 and [s["count"] for s in index["shards"]] == [3, 3, 2]
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(SoraError, match="different vae_hash"):
        cache_latents(world["src"], out, world["root"] / "vae_other", CacheOptions(**OPTS), text_dir=world["root"] / "text", quiet=True)
    with pytest.raises(SoraError, match="different options"):
        cache_latents(world["src"], out, world["root"] / "vae", CacheOptions(**{**OPTS, "dtype": "float16"}), text_dir=world["root"] / "text", quiet=True)


def test_loader_refuses_latents_of_another_vae(world):
    lat = str(world["lat"])
    dm = LatentDataModule(lat, batch_size=4, num_workers=0, vae_ckpt=str(world["root"] / "vae_other"))
    theirs, ours = world["index"]["vae_hash"][:16], export_fingerprint(world["root"] / "vae_other")[:16]
    with pytest.raises(SoraError) as e:
        dm.setup()
    msg = str(e.value)
    assert "\n" not in msg and lat in msg and theirs in msg and ours in msg
    with pytest.raises(SoraError, match="no vae_hash"):  # a video shard set is not a latent set
        LatentDataModule(str(world["src"]), batch_size=4, num_workers=0).setup()
    with pytest.raises(SoraError, match="text encoder"):
        LatentDataModule(lat, batch_size=4, num_workers=0, expected_text_hash="0" * 64).setup()
    LatentDataModule(lat, batch_size=4, num_workers=0, vae_ckpt=str(world["root"] / "vae")).setup()  # the right VAE passes
    LatentDataModule(lat, batch_size=4, num_workers=0, expected_vae_hash=world["index"]["vae_hash"]).setup()


def _batches(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_cached_text_and_exact_resume(world, workers):
    kw = dict(batch_size=3, num_workers=workers, shuffle_buffer=4, seed=5, caption_probs={"original": 0.5, "dense": 0.5})
    dm = LatentDataModule(str(world["lat"]), vae_ckpt=str(world["root"] / "vae"), **kw)
    dm.setup()
    full = _batches(dm, 5)
    b = full[0]
    assert b["latent"].shape == (3, 4, 5, 8, 8) and b["latent"].dtype == torch.float32
    assert b["bucket"] == "9x32x32" and b["batch_index"] == 0 and len(b["caption"]) == 3
    # the cached text of the *chosen* caption, padded like the encoder pads: forward reproduced
    with torch.no_grad():
        emb, mask = world["text"](b["caption"])
    assert torch.equal(b["text_mask"], mask)
    torch.testing.assert_close(b["text_emb"], emb)
    assert any(c.count(" ") > 6 for x in full for c in x["caption"])  # dense captions are chosen too

    dm.trainer = type("T", (), {"training": True})()
    for x in full[:3]:  # what the trainer consumed before the "crash"
        dm.on_after_batch_transfer(x, 0)
    dm2 = LatentDataModule(str(world["lat"]), vae_ckpt=str(world["root"] / "vae"), **kw)
    dm2.load_state_dict(dm.state_dict())
    dm2.setup()
    for a, r in zip(full[3:], _batches(dm2, 2)):
        assert a["batch_index"] == r["batch_index"] and a["key"] == r["key"]
        assert torch.equal(a["latent"], r["latent"])


class _NoVAE(torch.nn.Module):
    """Stands in for the VAE: any use of it fails the test."""

    latent_channels = 4

    def encode(self, *a, **k):
        raise AssertionError("the VAE was called while training from latent shards")

    decode = forward = normalize = encode


def test_dit_trains_two_steps_on_latents_without_the_vae(world):
    import lightning.pytorch as pl

    from sora_train.diffusion import FlowMatching
    from sora_train.models.dit import build_dit
    from sora_train.training.dit_module import DiTModule

    text = TinyTextEncoder(**world["text"].config())
    text.load_state_dict(world["text"].state_dict())
    text.trainable = False  # a frozen encoder: the module uses the cached embeddings
    calls: list[list[str]] = []
    text.register_forward_pre_hook(lambda m, args: calls.append(list(args[0])))
    torch.manual_seed(0)
    module = DiTModule(
        dit=build_dit("debug", in_channels=4, text_dim=32), text_encoder=text, flow=FlowMatching(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3), vae=_NoVAE(), caption_dropout=0.5,
    )
    before = [p.detach().clone() for p in module.dit.parameters()]
    dm = LatentDataModule(str(world["lat"]), batch_size=4, num_workers=0, vae_ckpt=str(world["root"] / "vae"))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.dit.parameters()))
    assert calls in ([], [[""]])  # captions never re-encoded; the empty caption at most once

    # caption dropout on cached rows: a dropped row is exactly the empty caption's embedding
    module.train()
    module.caption_dropout = 1.0
    b = next(iter(dm.train_dataloader()))
    emb, mask = module.encode_text(b["caption"], (b["text_emb"], b["text_mask"]))
    with torch.no_grad():
        e, m = text([""])
    assert mask.sum(dim=1).tolist() == [int(m.sum())] * len(b["caption"])
    torch.testing.assert_close(emb[:, : e.shape[1]], e.expand(len(b["caption"]), -1, -1))
    assert not emb[:, e.shape[1]:].any()


def test_cli_npy_fp16_and_one_line_errors(world, tmp_path, capsys):
    from sora_train.data_tools.cli import main

    base = ["cache-latents", str(world["src"]), "--vae", str(world["root"] / "vae")]
    rc = main(base + ["--out", str(tmp_path / "bad"), "--num-frames", "8", "--height", "32", "--width", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --num-frames") and "1 + k*2" in err and "\n" not in err
    assert main(base + ["--out", str(tmp_path / "x"), "--num-frames", "9"]) == 2  # shape options go together

    out = tmp_path / "npy"
    assert main(base + ["--out", str(out), "--buckets", "9x32x32", "--format", "npy", "--dtype", "float16", "--batch-size", "8"]) == 0
    s = _samples(out)[0]
    assert "latent.npy" in s and "text.safetensors" not in s
    z = np.load(io.BytesIO(s["latent.npy"]), allow_pickle=False)
    assert z.dtype == np.float16 and z.shape == (4, 5, 8, 8)
    assert read_index(out)["text_hash"] is None
    dm = LatentDataModule(str(out), batch_size=8, num_workers=0, vae_ckpt=str(world["root"] / "vae"))
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["latent"].shape == (8, 4, 5, 8, 8) and "text_emb" not in b


def test_pad_text_matches_collate_cached(world):
    text = world["text"]
    caps = ["a red circle", "", "a large blue square moving left"]
    cached = text.encode_for_cache(caps)
    emb, mask = pad_text(cached)
    e2, m2 = text.collate_cached(cached)
    assert torch.equal(emb, e2) and torch.equal(mask, m2)
    assert pad_text(cached, pad_to=12)[0].shape == (3, 12, 32)
