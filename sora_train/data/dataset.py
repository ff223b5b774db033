"""The training stream: webdataset shards -> decoded, bucketed batches.

One ``ShardVideoDataset`` instance runs in each DataLoader worker of each rank. It

1. lists shards (local paths, directories with index.json, brace patterns or URLs that
   ``webdataset.gopen`` understands: http(s)://, pipe:, s3 via pipe:),
2. splits them by (rank, worker) - by shard when there are enough shards, else by sample,
3. streams tar members (only an allowlist of extensions is kept; nothing is unpickled),
4. shuffles through a seeded buffer,
5. assigns each sample to a bucket from its json (no decoding needed for that), and
6. emits batch j when the bucket schedule's bucket for j has enough samples - decoding
   only then, with one short-lived decord reader per sample, only the frames needed. The
   batch's ``video`` is uint8 (B, F, H, W, 3), channels last as decoded: a quarter of the
   bytes through the worker queue, and the channels-first float conversion (as costly as
   decoding on a CPU) happens on the training device in
   ``VideoDataModule.on_after_batch_transfer`` (``transforms.video_to_float``).

Batch j of the run (across epochs) comes from worker ``j % num_workers`` - the order in which
torch's DataLoader reads workers - and its shape is ``buckets.schedule(seed, 0, j)`` on every
rank. Exact resume therefore needs, per worker, the index of the next batch it has not
delivered; each worker replays the batches before it from metadata alone (nothing is
decoded while replaying) and goes on. A sample found corrupt at decode time before the
checkpoint is replayed as if good, so the batch it was in may differ by that one sample.

Elastic resume (another number of data-parallel ranks or workers than the checkpoint's): the
stream gets a new *layout* (``ShardVideoDataset.consumed_before``): the global batch index goes
on, and the pass in progress is finished with exactly the samples no old consumer had consumed,
split by sample over the new consumers.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sora_train.data.boxes import boxes_for_clip, collate_boxes
from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.shards import ALLOWED_EXTS, INDEX_NAME, UnreadableShard, iter_tar_samples, shard_paths
from sora_train.data.transforms import crop_offsets, frame_indices, resize_for_crop, resize_frames
from sora_train.data.video_io import IMAGE_EXTS, VIDEO_EXTS, check_decoder, decode_image, decode_video
from sora_train.utils.dist_groups import ENV as SP_ENV
from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard list from a directory (with index.json), glob, brace pattern, URL or list of them."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        s = str(s)
        if "://" in s or s.startswith("pipe:"):
            out.extend(braceexpand.braceexpand(s))
        elif os.path.isdir(s):
            if os.path.isfile(os.path.join(s, INDEX_NAME)):
                out.extend(shard_paths(s))
            else:
                found = sorted(glob.glob(os.path.join(s, "*.tar")))
                if not found:
                    raise SoraError(f"data path {s} holds no index.json and no *.tar shards")
                out.extend(found)
        else:
            matches: list[str] = []
            for p in braceexpand.braceexpand(s):
                matches.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
            missing = [p for p in matches if not os.path.isfile(p)]
            if missing or not matches:
                raise SoraError(f"data path not found: {missing[0] if missing else s}")
            out.extend(matches)
    if not out:
        raise SoraError(f"no shards found for {spec!r}")
    return out


class SkipSample(Exception):
    """A sample that cannot be used, with a machine-readable ``reason`` (the loader counts it,
    cache-latents rejects it) and a ``detail`` for people."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class PendingSample:
    """A sample assigned to a bucket and not decoded yet (its bytes, as read from the tar)."""

    key: str
    meta: dict[str, Any]
    media_ext: str  # the member to decode
    media: Any  # its bytes (latent sets: every tensor member by name)
    bucket: Bucket
    epoch: int = 0  # the pass over the data it was read in, and its shard: with the key, its identity
    url: str = ""


@dataclass
class LoadedSample:
    """One decoded sample of a batch, ready to stack."""

    key: str
    data: torch.Tensor  # video (F, H, W, 3) uint8; latent (C, f, h, w) float32
    caption: str
    fps: float
    text: torch.Tensor | None = None  # the caption's cached (L, D) embedding (latent sets)
    boxes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # dense (K, F, 4), (K, F), (K,): data/boxes.py


@dataclass
class WorkerState:
    """Where one DataLoader worker of one rank stands: its place in the split, and its counts."""

    rank: int = 0
    world: int = 1
    worker: int = 0
    num_workers: int = 1
    seen: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)


def _dist_info() -> tuple[int, int]:
    """(rank, world) to shard data by: the data-parallel ones. The ranks of one sequence-parallel
    group (sora_train.utils.dist_groups) split one sample's tokens, so they read the same data."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    sp = max(1, int(os.environ.get(SP_ENV, "1")))
    return rank // sp, max(1, world // sp)



def data_parallel_info() -> tuple[int, int]:
    """(rank, world size) the loader splits data by: the data-parallel ones."""
    return _dist_info()


def first_index(start: int, worker: int, num_workers: int) -> int:
    """The first global batch index >= ``start`` that DataLoader worker ``worker`` delivers
    (batch j comes from worker j mod num_workers)."""
    return start + (worker - start) % max(1, num_workers)


def _stack_for_queue(frames: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, written straight into shared memory inside a DataLoader worker.

    A worker's output crosses to the main process through shared memory; a tensor that is not
    there yet is copied into it on the way (torch's default_collate avoids that copy the same
    way, but whole-batch datasets like this one bypass collate)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(frames)
    first = frames[0]
    storage = first._typed_storage()._new_shared(len(frames) * first.numel(), device=first.device)
    out = first.new(storage).view(len(frames), *first.shape)  # (B, ...) in shared memory
    return torch.stack(frames, out=out)

class ShardVideoDataset(IterableDataset):
    """Bucketed batches of decoded video from webdataset shards (see module docstring).

    Args:
        shards: shard spec (see :func:`expand_shards`).
        buckets: the bucket table.
        target_fps: resample to this frame rate (None: native).
        seed: shuffling, bucket schedule and crop randomness.
        train: True = infinite, shuffled, random start/crop, scheduled buckets; False = one
            ordered pass, centred, partial batches flushed at the end (validation).
        shuffle_buffer: samples held for shuffling (per worker).
        caption_probs: source -> probability of training on that caption (e.g.
            {"rewritten": 0.8, "original": 0.2}); sources a sample lacks are renormalised away.
        decoder: "decord" (default), "pyav" or "torchcodec" (must load: see video_io.check_decoder).
        max_skip_rate: stop with an error when more than this fraction of samples is corrupt
            (after ``min_samples_for_skip_check`` samples), rather than train on nothing.
    """

    allowed_exts: frozenset[str] = ALLOWED_EXTS  # tar members kept; subclasses widen it (latent shards)

    def __init__(
        self,
        shards: str | list[str],
        buckets: BucketTable,
        target_fps: float | None = None,
        seed: int = 0,
        train: bool = True,
        shuffle_buffer: int = 256,
        caption_probs: dict[str, float] | None = None,
        decoder: str = "decord",
        max_skip_rate: float = 0.05,
        min_samples_for_skip_check: int = 64,
        max_pool: int = 4096,
    ) -> None:
        super().__init__()
        check_decoder(decoder)
        self.urls = expand_shards(shards)
        self.buckets = buckets
        self.target_fps = target_fps
        self.seed = seed
        self.train = train
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.caption_probs = dict(caption_probs or {})
        self.decoder = decoder
        self.max_skip_rate = max_skip_rate
        self.min_samples_for_skip_check = min_samples_for_skip_check
        self.max_pool = max_pool
        # Resume point, set from the checkpoint before the DataLoader starts its workers:
        # worker -> the first global batch index it has not delivered yet.
        self.resume_next_index: dict[int, int] = {}
        # The stream's layout after an elastic resume (see consumed_before); None: from batch 0.
        self.layout: dict[str, Any] | None = None

    # -- sample stream -------------------------------------------------------------------------
    def _consumer(self) -> WorkerState:
        rank, world = _dist_info()
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.resume_next_index and n > 1:
            # A new DataLoader iterator asks worker 0 first, but after k batches the next one
            # (the smallest undelivered index) belongs to worker k % n: DataLoader worker i
            # plays worker (i + k) % n, so batches still come out in order.
            w = (w + min(self.resume_next_index.values())) % n
        return WorkerState(rank=rank, world=world, worker=w, num_workers=n)

    def _epoch_samples(self, st: WorkerState, epoch: int, exclude: set[tuple[str, str]] | None = None) -> Iterator[dict[str, Any]]:
        """This consumer's share of pass ``epoch``. ``exclude``: (url, key) of samples already
        consumed in this pass (elastic resume): the rest is split by sample."""
        consumers = st.world * st.num_workers
        me = st.rank * st.num_workers + st.worker
        urls = list(self.urls)
        if self.train:
            np.random.default_rng([self.seed, epoch, 0xC0FFEE]).shuffle(urls)
        by_shard = len(urls) >= consumers and exclude is None
        mine = urls[me::consumers] if by_shard else urls
        counter = 0
        for url in mine:
            try:
                for sample in iter_tar_samples(url, self.allowed_exts):
                    if exclude is not None and (url, sample["__key__"]) in exclude:
                        continue
                    if not by_shard:
                        counter += 1
                        if (counter - 1) % consumers != me:
                            continue
                    sample["__url__"], sample["__epoch__"] = url, epoch
                    yield sample
            except UnreadableShard as e:
                self._count_skip(st, "unreadable_shard")
                log.warning("skipping the rest of it: %s", e)

    def _shuffled(self, st: WorkerState, epoch: int, exclude: set[tuple[str, str]] | None = None) -> Iterator[dict[str, Any]]:
        if not self.train:
            yield from self._epoch_samples(st, epoch)
            return
        rng = np.random.default_rng([self.seed, epoch, st.rank, st.worker, 0xB0FF])
        buf: list[dict[str, Any]] = []
        for sample in self._epoch_samples(st, epoch, exclude):
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)  # type: ignore[arg-type]
        yield from buf

    def _count_skip(self, st: WorkerState, reason: str) -> None:
        st.skipped += 1
        st.skip_reasons[reason] = st.skip_reasons.get(reason, 0) + 1
        total = st.seen + st.skipped
        if total >= self.min_samples_for_skip_check and st.skipped / total > self.max_skip_rate:
            raise SoraError(
                f"{st.skipped} of {total} samples could not be used (by reason: {st.skip_reasons}); "
                f"more than data.max_skip_rate={self.max_skip_rate}. Check the shards with `sora-data probe`."
            )

    def pending(self, sample: dict[str, Any]) -> PendingSample:
        """A raw sample assigned to its bucket, from its json alone; raises :class:`SkipSample`."""
        media_ext = next((e for e in VIDEO_EXTS + IMAGE_EXTS if e in sample), None)
        if media_ext is None or "json" not in sample:
            raise SkipSample("missing_media_or_json", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        try:
            meta = json.loads(sample["json"])
            f, h, w = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
            fps = float(meta.get("fps") or 0.0)
        except (ValueError, KeyError, TypeError) as e:
            raise SkipSample("bad_json", str(e)) from None
        # an image member can only feed an image bucket, whatever its json claims
        bucket = self.buckets.assign(f, h, w, fps, self.target_fps, want_image=media_ext in IMAGE_EXTS)
        if bucket is None:
            names = [b.name for b in self.buckets.buckets]
            raise SkipSample("fits_no_bucket", f"{f}x{h}x{w} at {fps:g} fps fits none of {names}")
        return PendingSample(sample["__key__"], meta, media_ext, sample[media_ext], bucket)

    def image_bucket_for(self, item: PendingSample) -> Bucket | None:
        """The image bucket a video can feed with one of its frames: the one nearest its
        aspect ratio (resized and cropped to it like any frame); None without image buckets."""
        if not self.buckets.images:
            return None
        return self.buckets.assign(1, int(item.meta["height"]), int(item.meta["width"]), 0.0, None, want_image=True)

    def _to_pending(self, st: WorkerState, sample: dict[str, Any]) -> PendingSample | None:
        try:
            item = self.pending(sample)
        except SkipSample as e:
            self._count_skip(st, e.reason)
            return None
        item.epoch, item.url = int(sample.get("__epoch__", 0)), str(sample.get("__url__", ""))
        return item

    # -- batches -------------------------------------------------------------------------------
    def _choose_caption(self, meta: dict[str, Any], rng: np.random.Generator) -> str:
        caps = meta.get("captions") or {}
        if self.caption_probs and isinstance(caps, dict):
            options = [(src, p) for src, p in self.caption_probs.items() if p > 0 and isinstance(caps.get(src), str) and caps[src]]
            if options:
                p = np.array([o[1] for o in options], dtype=np.float64)
                return caps[options[int(rng.choice(len(options), p=p / p.sum()))][0]]
        return str(meta.get("caption") or "")

    def decode_clip(self, item: PendingSample, bucket: Bucket, rng: np.random.Generator, geometry: dict[str, Any] | None = None) -> tuple[np.ndarray, float]:
        """-> frames (F, H, W, 3) uint8 at the bucket's shape, effective fps (validation sets:
        centred and deterministic, what cache-latents encodes). ``geometry``, when given, is
        filled with the source frames chosen, the resize and the crop (boxes follow them)."""
        meta = item.meta
        f, h, w = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
        fps = float(meta.get("fps") or 0.0)
        rh, rw = resize_for_crop(h, w, bucket.height, bucket.width)
        if item.media_ext in IMAGE_EXTS:
            frames = decode_image(item.media)  # (1, H, W, 3)
            out_fps = fps
        else:
            if bucket.is_image:
                idx: list[int] | None = [int(rng.integers(f)) if self.train else f // 2]
                out_fps = 0.0
            else:
                idx = frame_indices(f, fps, bucket.num_frames, self.target_fps, rng if self.train else None, random_start=self.train)
                out_fps = float(self.target_fps or fps)
            if idx is None:
                raise ValueError("clip shorter than its bucket")
            if self.decoder in ("decord", "torchcodec"):  # these resize inside the decoder
                frames = decode_video(item.media, idx, backend=self.decoder, width=rw, height=rh)
            else:
                frames = decode_video(item.media, idx, backend=self.decoder)
        frames = resize_frames(frames, rh, rw)  # no-op when the decoder already resized
        if frames.shape[0] != bucket.num_frames:
            raise ValueError(f"decoded {frames.shape[0]} frames, bucket needs {bucket.num_frames}")
        top, left = crop_offsets(frames.shape[1], frames.shape[2], bucket.height, bucket.width, rng if self.train else None)
        if geometry is not None:
            geometry.update(indices=[0] if item.media_ext in IMAGE_EXTS else list(idx), resized=(frames.shape[1], frames.shape[2]), crop=(top, left))
        return frames[:, top : top + bucket.height, left : left + bucket.width], out_fps

    def load_sample(self, item: PendingSample, bucket: Bucket, rng: np.random.Generator, batch: list[LoadedSample]) -> LoadedSample:
        """Decode one sample of a batch (``batch``: those before it); raises on a corrupt one."""
        geometry: dict[str, Any] = {}
        frames, fps = self.decode_clip(item, bucket, rng, geometry)
        # (F, H, W, 3) uint8, a strided crop view
        return LoadedSample(item.key, torch.from_numpy(frames), self._choose_caption(item.meta, rng), fps,
                            boxes=self._boxes(item, geometry, bucket))

    @staticmethod
    def _boxes(item: PendingSample, geometry: dict[str, Any], bucket: Bucket) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The sample's boxes (json ``boxes``) on the frames and crop the loader chose, dense."""
        boxes = boxes_for_clip(item.meta, item.key, geometry, bucket.height, bucket.width)
        return None if boxes is None else boxes.dense(bucket.num_frames)

    def collate(self, batch: list[LoadedSample]) -> dict[str, Any]:
        """The tensors of a batch. Video stays uint8, channels last as decoded: one plain copy
        here; VideoDataModule makes it float (B, 3, F, H, W) in [-1, 1] on the device."""
        return {"video": _stack_for_queue([s.data for s in batch])}  # (B, F, H, W, 3) uint8

    def _emit(self, st: WorkerState, index: int, bucket: Bucket, items: list[PendingSample]) -> dict[str, Any] | None:
        batch: list[LoadedSample] = []
        for i, item in enumerate(items):
            rng = np.random.default_rng([self.seed, index, i, 0xDEC0])
            try:
                batch.append(self.load_sample(item, bucket, rng, batch))
            except Exception as e:  # a corrupt sample must not kill the run: count it, go on
                self._count_skip(st, "decode_error")
                log.warning("skipping sample %s: %s", item.key, e)
                continue
            st.seen += 1
        if not batch:
            return None
        boxes = collate_boxes([s.boxes for s in batch], bucket.num_frames)
        return {
            **self.collate(batch),
            **(boxes or {}),
            "caption": [s.caption for s in batch],
            "fps": torch.tensor([s.fps for s in batch], dtype=torch.float32),
            "key": [s.key for s in batch],
            "bucket": bucket.name,
            "batch_index": index,
            "worker": st.worker,
            "skipped": st.skipped,
            "seen": st.seen,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        st = self._consumer()
        if not self.train:
            yield from self._iter_eval(st)
            return
        layout = self.layout
        if layout is None:
            first, stream = st.worker, self._forever(st)  # global batch indices of this worker: worker, worker + N, ...
        else:
            first = first_index(layout["start"], st.worker, st.num_workers)
            stream = self._elastic_forever(st, *self.consumed_before(layout))
        start = self.resume_next_index.get(st.worker, first)
        for index, bucket, batch_items in self._batches(st, stream, first):
            if index >= start:  # earlier ones are replayed from metadata only, never decoded
                batch = self._emit(st, index, bucket, batch_items)
                if batch is not None:
                    yield batch

    def _batches(self, st: WorkerState, stream: Iterator[dict[str, Any]], index: int) -> Iterator[tuple[int, Bucket, list[PendingSample]]]:
        """(global batch index, bucket, its samples) of one consumer, from ``index`` on, in steps
        of the worker count: bucket assignment from metadata alone, nothing decoded."""
        pools: dict[str, list[PendingSample]] = {b.name: [] for b in self.buckets.buckets}
        # per image bucket: waiting videos that can feed it with one of their frames
        videos_for_image: dict[str, list[PendingSample]] = {b.name: [] for b in self.buckets.images}
        while True:
            bucket = self.buckets.schedule(self.seed, 0, index)
            pool = pools[bucket.name]
            while len(pool) < bucket.batch_size:
                feeders = videos_for_image.get(bucket.name)
                if feeders:
                    v = feeders.pop(0)
                    pools[v.bucket.name].remove(v)
                    pool.append(PendingSample(v.key, v.meta, v.media_ext, v.media, bucket, v.epoch, v.url))
                    continue
                item = self._to_pending(st, next(stream))
                if item is None:
                    continue
                pools[item.bucket.name].append(item)
                image_bucket = None if item.bucket.is_image else self.image_bucket_for(item)
                if image_bucket is not None:
                    videos_for_image[image_bucket.name].append(item)
                if sum(len(p) for p in pools.values()) > self.max_pool:
                    raise SoraError(
                        f"bucket pools exceeded {self.max_pool} samples waiting for bucket {bucket.name}: "
                        "the data has (almost) no samples for it; remove the bucket or fix data.bucket_weights"
                    )
            batch_items, pools[bucket.name] = pool[: bucket.batch_size], pool[bucket.batch_size :]
            for it in batch_items:
                for feeders in videos_for_image.values():
                    if it in feeders:
                        feeders.remove(it)
            yield index, bucket, batch_items
            index += st.num_workers

    # -- elastic resume ----------------------------------------------------------------------
    # A run resumed with another number of data-parallel ranks (or DataLoader workers) cannot
    # replay its own stream: the split of samples over consumers changed. Its stream is a new
    # *layout* {world, num_workers, start, origin}: batches from global index ``start`` on, by
    # ``world`` x ``num_workers`` consumers, continuing the run ``origin`` (the layout that
    # delivered the batches before ``start``; None for a run that started from nothing). Each
    # consumer replays every consumer of the origin up to ``start`` from metadata (tars are read,
    # nothing is decoded) to know which samples of each pass were consumed; the passes still in
    # progress are then finished with exactly the samples not consumed yet, split by sample over
    # the new consumers, and later passes are split as usual.
    def consumed_before(self, layout: dict[str, Any]) -> tuple[dict[int, set[tuple[str, str]]], int]:
        """-> ({pass: {(url, key)} consumed before ``layout["start"]``}, the first pass still in
        progress then). Samples of earlier passes that waited in a bucket pool are not served again."""
        cache = getattr(self, "_consumed_cache", None)
        ident = repr(layout)
        if cache is not None and cache[0] == ident:
            return cache[1]
        origin, until = layout.get("origin"), int(layout["start"])
        consumed: dict[int, set[tuple[str, str]]] = {}
        first_open = 0
        if origin is not None:
            inherited, inherited_open = self.consumed_before(origin) if origin.get("origin") is not None else ({}, 0)
            for e, keys in inherited.items():
                consumed.setdefault(e, set()).update(keys)
            last_pass: list[int] = []
            world, workers = int(origin["world"]), int(origin["num_workers"])
            for rank in range(world):
                for worker in range(workers):
                    st = WorkerState(rank=rank, world=world, worker=worker, num_workers=workers)
                    first = first_index(int(origin.get("start", 0)), worker, workers)
                    stream = self._forever(st) if origin.get("origin") is None else self._elastic_forever(st, inherited, inherited_open)
                    newest = -1
                    for index, _, items in self._batches(st, stream, first):
                        if index >= until:
                            break
                        for it in items:
                            consumed.setdefault(it.epoch, set()).add((it.url, it.key))
                            newest = max(newest, it.epoch)
                    if newest >= 0:
                        last_pass.append(newest)
            first_open = min(last_pass) if last_pass else inherited_open
            # Passes every old consumer had moved past are not served again: their keys can go.
            consumed = {e: keys for e, keys in consumed.items() if e >= first_open}
        self._consumed_cache = (ident, (consumed, first_open))
        return consumed, first_open

    def _elastic_forever(self, st: WorkerState, consumed: dict[int, set[tuple[str, str]]], first_open: int) -> Iterator[dict[str, Any]]:
        for epoch in range(first_open, 1_000_000):  # bounded: a run ends by max_steps long before this
            exclude = consumed.get(epoch)
            if exclude is not None:
                yield from self._shuffled(st, epoch, exclude)  # the rest of a pass in progress; may be empty here
                continue
            empty = True
            for sample in self._shuffled(st, epoch):
                empty = False
                yield sample
            if empty:
                raise SoraError(f"no samples for rank {st.rank} worker {st.worker} in shards {self.urls[:3]}...")

    def _forever(self, st: WorkerState) -> Iterator[dict[str, Any]]:
        yield from self._elastic_forever(st, {}, 0)  # no pass in progress to finish

    def _iter_eval(self, st: WorkerState) -> Iterator[dict[str, Any]]:
        pools: dict[str, list[PendingSample]] = {}
        index = st.worker
        for sample in self._shuffled(st, 0):
            item = self._to_pending(st, sample)
            if item is None:
                continue
            pool = pools.setdefault(item.bucket.name, [])
            pool.append(item)
            if len(pool) >= item.bucket.batch_size:
                batch = self._emit(st, index, item.bucket, pool)
                pools[item.bucket.name] = []
                index += st.num_workers
                if batch is not None:
                    yield batch
        for name, pool in pools.items():
            if pool:
                batch = self._emit(st, index, self.buckets.by_name(name), pool)
                index += st.num_workers
                if batch is not None:
                    yield batch
