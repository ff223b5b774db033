"""The ``data=`` config group's class: a LightningDataModule over shard sets."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from sora_train.data.buckets import BucketTable
from sora_train.data.dataset import ShardVideoDataset, data_parallel_info, expand_shards, first_index
from sora_train.data.shards import read_index
from sora_train.data.transforms import video_to_float
from sora_train.utils.errors import SoraError


def _worker_init(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM. A SIGTERM to the whole process group (Slurm's cancel,
    a terminal) is the training process's to handle: it finishes the step and saves a checkpoint
    (callbacks/checkpoint.py). A worker killed by it would make torch raise in the training
    process mid-save. Workers still stop when the loader shuts them down or their parent dies.
    """
    import os
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning adds when no worker_init_fn is set
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class VideoDataModule(pl.LightningDataModule):
    """Bucketed video/image batches from webdataset shards, with exact resume.

    Args:
        train_shards: shard spec for training (directory with index.json, glob, brace
            pattern, URL, or a list).
        val_shards: same for validation (None: no validation loader).
        buckets: list of {num_frames, height, width[, batch_size]}.
        tokens_per_batch: pixel budget per batch for buckets without a batch_size.
        image_ratio: fraction of batches that are images (1-frame videos).
        bucket_weights: bucket name -> weight among video buckets (default: from the index).
        target_fps: resample videos to this rate (None: native).
        num_workers: DataLoader worker processes per rank.
        shuffle_buffer: samples per worker held for shuffling.
        caption_probs: caption source -> probability (e.g. rewritten 0.8, original 0.2).
        decoder: "decord", "pyav" or "torchcodec" (data.decoder; see video_io.check_decoder).
        max_skip_rate: corrupt-sample fraction that stops the run.
        seed: data order seed (the same on every rank).
        prepare: optional callable run before loading (e.g. generate the shapes world if it
            is missing): once per run on global rank 0, or once per node with
            ``prepare_per_node`` (node-local disks).
        prepare_per_node: run ``prepare`` on every node's local rank 0 instead.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        buckets: Sequence[dict[str, Any]],
        val_shards: str | Sequence[str] | None = None,
        tokens_per_batch: int | None = None,
        image_ratio: float = 0.0,
        bucket_weights: dict[str, float] | None = None,
        target_fps: float | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 256,
        caption_probs: dict[str, float] | None = None,
        decoder: str = "decord",
        max_skip_rate: float = 0.05,
        seed: int = 0,
        prepare: Callable[[], Any] | None = None,
        prepare_per_node: bool = False,
    ) -> None:
        super().__init__()
        # Default: one writer for a shared filesystem; two nodes generating the same files collide.
        self.prepare_data_per_node = prepare_per_node
        self.train_spec = train_shards if isinstance(train_shards, str) else list(train_shards)
        self.val_spec = val_shards if (val_shards is None or isinstance(val_shards, str)) else list(val_shards)
        self.bucket_cfg = [dict(b) for b in buckets]
        self.tokens_per_batch = tokens_per_batch
        self.image_ratio = image_ratio
        self.bucket_weights = dict(bucket_weights) if bucket_weights else None
        self.target_fps = target_fps
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.caption_probs = dict(caption_probs) if caption_probs else None
        self.decoder = decoder
        self.max_skip_rate = max_skip_rate
        self.seed = seed
        self.prepare = prepare
        self.train_set: ShardVideoDataset | None = None
        self.val_set: ShardVideoDataset | None = None
        # worker -> next undelivered global batch index (consumed position, for resume)
        self.next_index: dict[int, int] = {}
        self.skipped_by_worker: dict[int, int] = {}
        # The stream's layout after a resume on another number of ranks or workers (None: the
        # run's own, from batch 0); see ShardVideoDataset.consumed_before.
        self.layout: dict[str, Any] | None = None

    def make_buckets(self) -> BucketTable:
        table = BucketTable(self.bucket_cfg, self.tokens_per_batch, self.image_ratio, self.bucket_weights)
        if self.bucket_weights is None and isinstance(self.train_spec, str):
            try:
                index = read_index(self.train_spec)
            except SoraError:
                return table
            fpss = {float(x) for x in index.get("fps_values", [])}
            table.fit_weights_from_histogram(index.get("shape_histogram", {}), self.target_fps, fpss.pop() if len(fpss) == 1 else None)
        return table

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def check_sets(self) -> None:
        """Refuse shard sets this run cannot train on, before any loader starts (latent sets:
        another VAE's); video sets are checked sample by sample as they stream."""

    def make_dataset(self, shards: str | list[str], buckets: BucketTable, train: bool) -> ShardVideoDataset:
        """The stream of one split (``train``: shuffled, endless; else one ordered pass)."""
        return ShardVideoDataset(
            shards, buckets, target_fps=self.target_fps, seed=self.seed, train=train, caption_probs=self.caption_probs,
            decoder=self.decoder, max_skip_rate=self.max_skip_rate, **({"shuffle_buffer": self.shuffle_buffer} if train else {}),
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.check_sets()
            buckets = self.make_buckets()
            self.train_set = self.make_dataset(self.train_spec, buckets, train=True)
            if self.val_spec is not None:
                self.val_set = self.make_dataset(self.val_spec, buckets, train=False)
        self.train_set.resume_next_index = dict(self.next_index)
        self.train_set.layout = self.layout

    def _loader(self, ds: ShardVideoDataset) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=None,  # the dataset yields whole bucketed batches
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=2 if self.num_workers > 0 else None,
            worker_init_fn=_worker_init if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        self.train_set.resume_next_index = dict(self.next_index)
        self.train_set.layout = self.layout
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set)

    # -- position tracking: the loader's place is part of the checkpoint ---------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "video" in batch:
            batch["video"] = video_to_float(batch["video"])  # uint8 from the workers -> float [-1, 1], on device
        trainer = getattr(self, "trainer", None)
        if isinstance(batch, dict) and "batch_index" in batch and trainer is not None and trainer.training:
            workers = max(1, self.num_workers)
            self.next_index[int(batch["worker"])] = int(batch["batch_index"]) + workers
            self.skipped_by_worker[int(batch["worker"])] = int(batch["skipped"])
        return batch

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_worker.values())

    def state_dict(self) -> dict[str, Any]:
        # world: the data-parallel rank count, so that a resume on another one can map the position.
        return {"next_index": {str(k): v for k, v in self.next_index.items()}, "num_workers": self.num_workers,
                "world": data_parallel_info()[1], "layout": self.layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Same ranks and workers: each worker continues its own stream exactly. Another number
        of data-parallel ranks or of workers (elastic resume): the global batch index goes on
        from the first batch not delivered, and the samples of the pass in progress that no
        rank consumed yet are split over the new ranks and workers: none is seen twice or
        skipped (ShardVideoDataset.consumed_before)."""
        saved = {int(k): int(v) for k, v in state.get("next_index", {}).items()}
        world = data_parallel_info()[1]
        saved_world = int(state.get("world", world))  # checkpoints from before elastic resume: taken as this one
        saved_workers = max(1, int(state.get("num_workers", self.num_workers)))
        layout = state.get("layout")
        if saved and (saved_world != world or saved_workers != max(1, self.num_workers)):
            start = min(saved.values())  # every batch before it was delivered, none after it
            origin = layout or {"world": saved_world, "num_workers": saved_workers, "start": 0, "origin": None}
            layout = {"world": world, "num_workers": max(1, self.num_workers), "start": start, "origin": origin}
            from sora_train.utils.logging import get_logger

            get_logger(__name__).warning(
                "data position: saved with %d rank(s) x %d worker(s), resumed with %d x %d; going on from global batch %d "
                "with the samples of the current pass no rank has consumed yet", saved_world, saved_workers, world,
                max(1, self.num_workers), start,
            )
            saved = {w: first_index(start, w, self.num_workers) for w in range(max(1, self.num_workers))}
        self.next_index = saved
        self.layout = layout
        if self.train_set is not None:
            self.train_set.resume_next_index = dict(saved)
            self.train_set.layout = layout


__all__ = ["VideoDataModule", "expand_shards"]
