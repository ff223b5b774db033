"""Latent shards: what `sora-data cache-latents` writes and the DiT trains on without a VAE.

A latent shard set is a shard set (see `shards.py`) whose samples hold, per key:

    KEY.latent.safetensors   {"latent": (C, f, h, w)} float16/float32 - or KEY.latent.npy
    KEY.text.safetensors     optional: {"0": (L_0, D), "1": (L_1, D), ...}, one per caption
    KEY.json                 the source sample's json, with num_frames/height/width/fps/
                             duration/frame_range describing the clip that was encoded, plus
                             "latent" {shape, dtype, member, normalized} and, with text,
                             "text_embeddings" {captions: [caption i <-> tensor "i"], dim}

Latents are stored NORMALISED (`vae.normalize(posterior.mode())`, the VAE's stored per-channel
shift/scale applied): what `DiTModule.encode_video` consumes as-is. The statistics are part of
the VAE's fingerprint (they are buffers and config fields), so normalised latents can never be
paired with other statistics. Decoding a cached latent is `vae.decode(vae.denormalize(z))`.

index.json records `vae_hash` and `text_hash`: the fingerprint of the part that made them
(`sora_train.utils.exports`: sha256 over the class, its constructor config without local
paths, and every state_dict tensor). It depends only on the module, never on which export
file held it, so the VAE of a VAE run's export and the copy inside a DiT run's export agree;
:func:`export_fingerprint` computes the same value from an export directory without building
the model. `LatentDataModule` refuses latent shards whose `vae_hash` is not the run's VAE.

The loader is `ShardVideoDataset` with the decode step swapped for reading tensors: the same
rank/worker split, shuffle buffer, bucket schedule and exact resume. Buckets are exact
(F, H, W) pixel shapes (the clip the latent decodes to); by default one per shape in the
index. An image bucket may take a video latent's first latent frame: the VAE is causal, so
latent frame 0 is exactly the image latent of pixel frame 0.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.datamodule import VideoDataModule
from sora_train.data.dataset import LoadedSample, PendingSample, ShardVideoDataset, SkipSample, expand_shards
from sora_train.data.shards import INDEX_NAME, read_index, shape_key
from sora_train.utils.errors import SoraError
from sora_train.utils.exports import CONFIG_NAME, export_fingerprint, module_fingerprint
from sora_train.utils.logging import get_logger

log = get_logger(__name__)

LATENT_FORMAT = "sora_train.latents/1"
LATENT_MEMBERS = ("latent.safetensors", "latent.npy")
TEXT_MEMBER = "text.safetensors"
LATENT_KEY = "latent"  # tensor name inside latent.safetensors


# -- fingerprints ------------------------------------------------------------------------------
def vae_fingerprint(vae: nn.Module) -> str:
    """The `vae_hash` of latents made by ``vae`` (its latent shift/scale included)."""
    return module_fingerprint(vae)


def text_fingerprint(encoder: nn.Module) -> str:
    """The `text_hash` of text embeddings made by ``encoder``."""
    return module_fingerprint(encoder)


# -- members -----------------------------------------------------------------------------------
def encode_latent(z: Tensor, member: str = LATENT_MEMBERS[0]) -> bytes:
    """(C, f, h, w) tensor -> bytes of a ``latent.safetensors`` or ``latent.npy`` member (no pickle)."""
    z = z.detach().to("cpu").contiguous()
    if member == "latent.safetensors":
        from safetensors.torch import save

        return save({LATENT_KEY: z})
    if member == "latent.npy":
        if z.dtype == torch.bfloat16:
            raise SoraError("latent.npy cannot hold bfloat16; use --dtype float16/float32 or --format safetensors")
        buf = io.BytesIO()
        np.save(buf, z.numpy(), allow_pickle=False)
        return buf.getvalue()
    raise SoraError(f"latent member {member!r}: expected one of {LATENT_MEMBERS}")


def decode_latent(data: bytes, member: str) -> Tensor:
    """Bytes of a latent member -> (C, f, h, w) float32."""
    if member == "latent.safetensors":
        from safetensors.torch import load

        z = load(data)[LATENT_KEY]
    elif member == "latent.npy":
        z = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
    else:
        raise ValueError(f"unknown latent member {member!r}")
    if z.ndim != 4:
        raise ValueError(f"latent has shape {tuple(z.shape)}, expected (C, f, h, w)")
    return z.float()


def encode_text_member(embeddings: Sequence[Tensor]) -> bytes:
    """Unpadded (L_i, D) embeddings, one per caption -> bytes of ``text.safetensors``."""
    from safetensors.torch import save

    return save({str(i): e.detach().to("cpu").contiguous() for i, e in enumerate(embeddings)})


def decode_text_member(data: bytes) -> dict[str, Tensor]:
    from safetensors.torch import load

    return load(data)


def pad_text(embeddings: Sequence[Tensor], pad_to: int | None = None) -> tuple[Tensor, Tensor]:
    """(L_i, D) embeddings -> (emb (B, L, D) float32, zero where padded; mask (B, L) bool).

    The padding rule of `TextEncoder.collate_cached`: L = the longest entry (or ``pad_to`` when
    larger), valid tokens first - so a frozen encoder's forward is reproduced exactly.
    """
    length = max(e.shape[0] for e in embeddings)
    length = max(length, pad_to or 0)
    emb = torch.zeros(len(embeddings), length, embeddings[0].shape[1])  # (B, L, D)
    mask = torch.zeros(len(embeddings), length, dtype=torch.bool)  # (B, L)
    for i, e in enumerate(embeddings):
        emb[i, : e.shape[0]] = e.float()
        mask[i, : e.shape[0]] = True
    return emb, mask


# -- the dataset -------------------------------------------------------------------------------
def own_size_image_bucket(buckets: BucketTable, height: int, width: int) -> Bucket | None:
    """A cached latent is not resized: the only image bucket it can feed (with its latent
    frame 0) is the one of its own height and width."""
    return next((b for b in buckets.images if (b.height, b.width) == (height, width)), None)


class LatentShardDataset(ShardVideoDataset):
    """Bucketed batches of cached latents (and text embeddings) from latent shards.

    Yields {"latent" (B, C, f, h, w) float32, "caption", "fps", "key", "bucket", "batch_index",
    "worker", "skipped", "seen"} and, when every sample of the batch has cached text and
    ``load_text``, "text_emb" (B, L, D) float32 + "text_mask" (B, L) bool for the chosen
    captions. Arguments as `ShardVideoDataset` (no decoding or fps resampling: the clip was
    fixed when it was cached); ``buckets`` are exact pixel shapes of the cached clips.
    """

    allowed_exts = frozenset({"json", "txt", *LATENT_MEMBERS, TEXT_MEMBER})

    def __init__(
        self,
        shards: str | list[str],
        buckets: BucketTable,
        seed: int = 0,
        train: bool = True,
        shuffle_buffer: int = 256,
        caption_probs: dict[str, float] | None = None,
        max_skip_rate: float = 0.05,
        min_samples_for_skip_check: int = 64,
        max_pool: int = 4096,
        load_text: bool = True,
        text_pad_to: int | None = None,
    ) -> None:
        super().__init__(
            shards, buckets, target_fps=None, seed=seed, train=train, shuffle_buffer=shuffle_buffer, caption_probs=caption_probs,
            max_skip_rate=max_skip_rate, min_samples_for_skip_check=min_samples_for_skip_check, max_pool=max_pool,
        )
        self.load_text = load_text
        self.text_pad_to = text_pad_to
        self._by_shape = {b.name: b for b in buckets.buckets}

    def pending(self, sample: dict[str, Any]) -> PendingSample:
        member = next((m for m in LATENT_MEMBERS if m in sample), None)
        if member is None or "json" not in sample:
            raise SkipSample("missing_latent_or_json", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        try:
            meta = json.loads(sample["json"])
            name = shape_key(int(meta["num_frames"]), int(meta["height"]), int(meta["width"]))
        except (ValueError, KeyError, TypeError) as e:
            raise SkipSample("bad_json", str(e)) from None
        bucket = self._by_shape.get(name)
        if bucket is None:
            raise SkipSample("fits_no_bucket", f"{name} is none of {sorted(self._by_shape)}")
        # media carries the tensor members of the sample (latent, and text if any)
        media = {m: sample[m] for m in (member, TEXT_MEMBER) if m in sample}
        return PendingSample(sample["__key__"], meta, member, media, bucket)

    def _text_for(self, item: PendingSample, caption: str) -> tuple[str, Tensor | None]:
        """(caption, its cached (L, D) embedding); the primary caption when the chosen one has none."""
        info = item.meta.get("text_embeddings") or {}
        cached = list(info.get("captions") or [])
        if not self.load_text or TEXT_MEMBER not in item.media or not cached:
            return caption, None
        if caption not in cached:
            caption = str(item.meta.get("caption") or "")
        tensors = decode_text_member(item.media[TEXT_MEMBER])
        return caption, tensors[str(cached.index(caption))]

    def image_bucket_for(self, item: PendingSample) -> Bucket | None:
        return own_size_image_bucket(self.buckets, int(item.meta["height"]), int(item.meta["width"]))

    def load_sample(self, item: PendingSample, bucket: Bucket, rng: np.random.Generator, batch: list[LoadedSample]) -> LoadedSample:
        z = decode_latent(item.media[item.media_ext], item.media_ext)  # (C, f, h, w)
        if bucket.is_image and (int(item.meta["height"]), int(item.meta["width"])) != (bucket.height, bucket.width):
            raise ValueError(f"a {item.meta['height']}x{item.meta['width']} latent cannot feed image bucket {bucket.name}")
        z = z[:, :1] if bucket.is_image else z  # (C, 1, h, w): causal, so frame 0 is the image latent
        if batch and z.shape != batch[0].data.shape:
            raise ValueError(f"latent shape {tuple(z.shape)} differs from the batch's {tuple(batch[0].data.shape)}")
        caption, emb = self._text_for(item, self._choose_caption(item.meta, rng))
        fps = 0.0 if bucket.is_image else float(item.meta.get("fps") or 0.0)
        # boxes: the json was updated to the cached clip (cache-latents), so frame i is latent-clip frame i
        return LoadedSample(item.key, z, caption, fps, emb, boxes=self._boxes(item, {}, bucket))

    def collate(self, batch: list[LoadedSample]) -> dict[str, Any]:
        out: dict[str, Any] = {"latent": torch.stack([s.data for s in batch])}  # (B, C, f, h, w)
        texts = [s.text for s in batch]
        if all(t is not None for t in texts):
            out["text_emb"], out["text_mask"] = pad_text(texts, self.text_pad_to)  # type: ignore[arg-type]  (B, L, D), (B, L)
        return out


# -- the DataModule ----------------------------------------------------------------------------
def index_dirs(spec: str | Sequence[str]) -> list[str] | None:
    """The shard-set directories (with index.json) behind a shard spec; None if any is remote."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    dirs: list[str] = []
    for s in map(str, specs):
        if "://" in s or s.startswith("pipe:"):
            return None
        if os.path.isdir(s):
            dirs.append(s)
            continue
        parents = sorted({os.path.dirname(p) or "." for p in expand_shards(s)})
        dirs.extend(p for p in parents if os.path.isfile(os.path.join(p, INDEX_NAME)))
    return list(dict.fromkeys(dirs))


def check_latent_set(shard_dir: str, expected_vae_hash: str | None, vae_source: str, expected_text_hash: str | None = None) -> dict[str, Any]:
    """Read ``shard_dir``'s index; raise a one-line SoraError unless it is a latent set of that VAE."""
    index = read_index(shard_dir)
    theirs = index.get("vae_hash")
    if not theirs:
        raise SoraError(f"{shard_dir}: index.json has no vae_hash, so it is not a latent shard set (write one with `sora-data cache-latents`)")
    if expected_vae_hash and theirs != expected_vae_hash:
        raise SoraError(
            f"{shard_dir}: latent shards were encoded by VAE {theirs[:16]}, but {vae_source} is VAE {expected_vae_hash[:16]}; "
            "re-run `sora-data cache-latents` with this VAE, or train with the VAE that made them"
        )
    text = index.get("text_hash")
    if expected_text_hash and text and text != expected_text_hash:
        raise SoraError(
            f"{shard_dir}: text embeddings were made by text encoder {text[:16]}, but the run's (or data.expected_text_hash) is {expected_text_hash[:16]}; "
            "re-run `sora-data cache-latents --text` with this encoder, or set data.load_text=false"
        )
    return index


@dataclass(frozen=True)
class LatentSetCheck:
    """Which VAE (and text encoder) a run's latent sets must come from.

    Args:
        vae_ckpt: the run's VAE export; its `vae` part's fingerprint must equal every latent
            set's `vae_hash`. ``expected_vae_hash`` gives it directly (and wins). With neither,
            nothing is checked (a warning says so).
        expected_text_hash: refuse cached text embeddings of another text encoder.
    """

    vae_ckpt: str | None = None
    expected_vae_hash: str | None = None
    expected_text_hash: str | None = None
    vae_source: str | None = None  # how messages name where expected_vae_hash came from

    def expected_vae(self) -> tuple[str | None, str]:
        """(the VAE hash latents must carry, how the message names its source)."""
        if self.expected_vae_hash:
            return self.expected_vae_hash, f"{self.vae_source or 'data.expected_vae_hash'} ({self.expected_vae_hash[:16]})"
        if self.vae_ckpt:
            return export_fingerprint(self.vae_ckpt, "vae"), f"vae_ckpt={self.vae_ckpt}"
        return None, ""

    def check(self, specs: Iterable[str | Sequence[str] | None]) -> None:
        """Refuse every local latent set behind ``specs`` (None: no such split) not made by that VAE."""
        expected, source = self.expected_vae()
        if expected is None:
            log.warning("data: neither vae_ckpt nor data.expected_vae_hash is set, so the latent shards' VAE is not checked")
        for spec in specs:
            if spec is None:
                continue
            dirs = index_dirs(spec)
            if dirs is None:
                log.warning("data: %s is remote; its VAE hash cannot be checked here", spec)
                continue
            for d in dirs:
                check_latent_set(d, expected, source, self.expected_text_hash)


class LatentDataModule(VideoDataModule):
    """Batches of cached latents for DiT training, refusing latents of another VAE.

    Args (as `VideoDataModule`, minus decoding; plus):
        buckets: exact pixel shapes {num_frames, height, width[, batch_size]} of the cached
            clips; None = one bucket per shape in the train set's index.json.
        batch_size: batch size of buckets without one (else ``tokens_per_batch`` decides, in
            pixel volume F*H*W as for videos, so the same run gets the same batch sizes).
        vae_ckpt, expected_vae_hash, expected_text_hash: which VAE and text encoder the
            latent sets must come from, checked in ``setup`` (see :class:`LatentSetCheck`).
        load_text: emit cached "text_emb"/"text_mask" when the shards hold them.
        text_pad_to: pad cached text to at least this many tokens (static shapes).
        target_fps: must be None (cached clips are resampled once, by ``cache-latents --fps``);
            accepted so a fine-tune experiment written for video shards takes data=latents.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        buckets: Sequence[dict[str, Any]] | None = None,
        batch_size: int | None = None,
        tokens_per_batch: int | None = None,
        image_ratio: float = 0.0,
        bucket_weights: dict[str, float] | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1024,
        caption_probs: dict[str, float] | None = None,
        max_skip_rate: float = 0.02,
        seed: int = 0,
        vae_ckpt: str | None = None,
        expected_vae_hash: str | None = None,
        expected_text_hash: str | None = None,
        load_text: bool = True,
        text_pad_to: int | None = None,
        prepare: Any = None,
        target_fps: float | None = None,
    ) -> None:
        if target_fps is not None:  # accepted so experiments written for video data compose with data=latents
            raise SoraError(f"data.target_fps={target_fps}: latent shards keep the frame rate they were cached at; "
                            "set it with `sora-data cache-latents --fps` and leave data.target_fps null")
        super().__init__(
            train_shards, list(buckets or []), val_shards=val_shards, tokens_per_batch=tokens_per_batch, image_ratio=image_ratio,
            bucket_weights=bucket_weights, target_fps=None, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
            caption_probs=caption_probs, max_skip_rate=max_skip_rate, seed=seed, prepare=prepare,
        )
        if batch_size is not None and int(batch_size) < 1:
            raise SoraError(f"data.batch_size={batch_size}: must be >= 1")
        self.batch_size = batch_size
        self.latent_check = LatentSetCheck(str(vae_ckpt) if vae_ckpt else None, expected_vae_hash, expected_text_hash)
        self.load_text = load_text
        self.text_pad_to = text_pad_to

    def _histogram(self) -> dict[str, int]:
        dirs = index_dirs(self.train_spec) or []
        hist: dict[str, int] = {}
        for d in dirs:
            for shape, n in read_index(d).get("shape_histogram", {}).items():
                hist[shape] = hist.get(shape, 0) + int(n)
        return hist

    def make_buckets(self) -> BucketTable:
        hist = self._histogram()
        cfg = self.bucket_cfg
        if not cfg:
            if not hist:
                raise SoraError(f"data.buckets is not set and no index.json with a shape_histogram was found for data.train_shards={self.train_spec}")
            if self.batch_size is None and not self.tokens_per_batch:
                raise SoraError("data.batch_size (or data.tokens_per_batch) must be set when data.buckets comes from the index")
            cfg = []
            for shape in sorted(hist):
                f, h, w = (int(x) for x in shape.split("x"))
                cfg.append({"num_frames": f, "height": h, "width": w, **({"batch_size": self.batch_size} if self.batch_size else {})})
        else:
            cfg = [{**b, **({"batch_size": self.batch_size} if self.batch_size and "batch_size" not in b else {})} for b in cfg]
        table = BucketTable(cfg, self.tokens_per_batch, self.image_ratio, self.bucket_weights)
        if self.bucket_weights is None and hist:  # cached shapes are exact: each feeds its own buckets only
            images = {b.name: 0.0 for b in table.images}
            names = {b.name for b in table.video}
            for shape, n in hist.items():
                _, h, w = (int(x) for x in shape.split("x"))
                image = own_size_image_bucket(table, h, w) if shape in names else None  # no video bucket: skipped, feeds nothing
                if image is not None:
                    images[image.name] += float(n)
            table.fit_weights_to_samples({name: float(n) for name, n in hist.items()}, images)
        return table

    def expect_models(self, vae: nn.Module | None = None, text_encoder: nn.Module | None = None) -> LatentSetCheck:
        """The run's own frozen parts, built: latent sets must then come from this VAE (unless
        vae_ckpt or expected_vae_hash already says which) and their cached text embeddings,
        when the run reads them, from this text encoder (unless expected_text_hash says) —
        always, not only when a hash is configured. Fingerprinting reads every weight once
        (seconds per GB)."""
        check = self.latent_check
        vae_hash, vae_source = check.expected_vae_hash, check.vae_source
        # vae_ckpt may be a public base's folder (no model.json to fingerprint): the run's VAE was built from it
        ckpt_is_export = bool(check.vae_ckpt) and (Path(check.vae_ckpt) / CONFIG_NAME).is_file()
        if not vae_hash and not ckpt_is_export and vae is not None:
            vae_hash, vae_source = vae_fingerprint(vae), f"the run's VAE ({check.vae_ckpt or type(vae).__name__})"
        text_hash = check.expected_text_hash
        if not text_hash and self.load_text and text_encoder is not None and not getattr(text_encoder, "trainable", False):
            text_hash = text_fingerprint(text_encoder)
        self.latent_check = LatentSetCheck(check.vae_ckpt, vae_hash, text_hash, vae_source)
        return self.latent_check

    def check_sets(self) -> None:
        """Refuse every local latent set (train and val) not made by the run's VAE."""
        self.latent_check.check([self.train_spec, self.val_spec])

    def make_dataset(self, shards: str | list[str], buckets: BucketTable, train: bool) -> LatentShardDataset:
        return LatentShardDataset(
            shards, buckets, seed=self.seed, train=train, caption_probs=self.caption_probs, max_skip_rate=self.max_skip_rate,
            load_text=self.load_text, text_pad_to=self.text_pad_to, **({"shuffle_buffer": self.shuffle_buffer} if train else {}),
        )


__all__ = [
    "LATENT_FORMAT",
    "LATENT_MEMBERS",
    "TEXT_MEMBER",
    "LatentDataModule",
    "LatentSetCheck",
    "LatentShardDataset",
    "check_latent_set",
    "decode_latent",
    "encode_latent",
    "encode_text_member",
    "export_fingerprint",
    "index_dirs",
    "module_fingerprint",
    "own_size_image_bucket",
    "pad_text",
    "text_fingerprint",
    "vae_fingerprint",
]
