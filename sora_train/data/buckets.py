"""Buckets: the fixed set of (frames, height, width) shapes a run trains on.

Sora-style training keeps every sample at (close to) native shape. We cannot batch ragged
tensors, so each sample goes to the bucket of its kind (image = 1 frame, or video) whose
aspect ratio is nearest to its own and whose length it can fill; each bucket has its own batch
size, chosen so every batch costs about the same number of tokens (a token budget).

Which bucket the j-th batch of an epoch comes from is drawn from a schedule that depends
only on (seed, epoch, j) - so every rank and every DataLoader worker agrees on the shape of
step j without talking to each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sora_train.utils.errors import SoraError


@dataclass(frozen=True)
class Bucket:
    num_frames: int
    height: int
    width: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.num_frames}x{self.height}x{self.width}"

    @property
    def is_image(self) -> bool:
        return self.num_frames == 1

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def pixels(self) -> int:
        return self.num_frames * self.height * self.width


# (sqrt(5) - 1) / 2: the step of the bucket schedule's low-discrepancy sequence.
_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


class BucketTable:
    """The buckets of a run and the rules for assigning samples and scheduling batches.

    Args:
        buckets: dicts with num_frames, height, width and either batch_size or nothing (then
            ``tokens_per_batch`` decides).
        tokens_per_batch: pixel-volume budget per batch, (F * H * W) summed over the batch;
            a bucket's batch size is ``max(1, tokens_per_batch // (F * H * W))``.
        image_ratio: fraction of batches drawn from image (1-frame) buckets. Any video can feed
            an image bucket with one of its frames, so the ratio holds whatever the data.
        weights: optional bucket name -> relative weight among video buckets, and among
            image buckets (default: by how many batches of the data set each bucket fills,
            from the shard index: :meth:`fit_weights_to_samples`).
    """

    def __init__(
        self,
        buckets: Sequence[dict[str, Any] | Bucket],
        tokens_per_batch: int | None = None,
        image_ratio: float = 0.0,
        weights: dict[str, float] | None = None,
    ) -> None:
        built = []
        for i, b in enumerate(buckets):
            if isinstance(b, Bucket):
                built.append(b)
                continue
            b = dict(b)
            unknown = set(b) - {"num_frames", "height", "width", "batch_size"}
            if unknown:
                raise SoraError(f"data.buckets[{i}]: unknown field(s) {sorted(unknown)}")
            try:
                f, h, w = int(b["num_frames"]), int(b["height"]), int(b["width"])
            except KeyError as e:
                raise SoraError(f"data.buckets[{i}]: missing field {e.args[0]!r} (need num_frames, height, width)") from None
            bs = b.get("batch_size")
            if bs is None:
                if not tokens_per_batch:
                    raise SoraError(f"data.buckets[{i}]: no batch_size and no data.tokens_per_batch to derive it")
                bs = max(1, int(tokens_per_batch) // (f * h * w))
            if min(f, h, w, int(bs)) < 1:
                raise SoraError(f"data.buckets[{i}]: num_frames, height, width, batch_size must be >= 1, got {b}")
            built.append(Bucket(f, h, w, int(bs)))
        if not built:
            raise SoraError("data.buckets is empty: give at least one (num_frames, height, width)")
        names = [b.name for b in built]
        if len(set(names)) != len(names):
            raise SoraError(f"data.buckets has duplicate shapes: {names}")
        if not 0.0 <= image_ratio <= 1.0:
            raise SoraError(f"data.image_ratio must be in [0, 1], got {image_ratio}")
        self.buckets = built
        self.video = [b for b in built if not b.is_image]
        self.images = [b for b in built if b.is_image]
        if image_ratio > 0 and not self.images:
            raise SoraError("data.image_ratio > 0 but no image bucket (num_frames: 1) is configured")
        if image_ratio < 1 and not self.video:
            image_ratio = 1.0
        self.image_ratio = image_ratio
        self.weights = {b.name: 1.0 for b in built}
        if weights:
            for name, wt in weights.items():
                if name not in self.weights:
                    raise SoraError(f"data.bucket_weights: unknown bucket {name!r}; buckets are {names}")
                self.weights[name] = float(wt)

    def by_name(self, name: str) -> Bucket:
        for b in self.buckets:
            if b.name == name:
                return b
        raise KeyError(name)

    def assign(self, num_frames: int, height: int, width: int, fps: float, target_fps: float | None, want_image: bool = False) -> Bucket | None:
        """The bucket for a sample of this shape, or None when it fits none.

        A video fits a video bucket when, after resampling to ``target_fps``, it has at least
        the bucket's frames; among those, nearest aspect ratio wins, then the longest clip.
        """
        if num_frames <= 1 or want_image:
            pool = self.images
        else:
            usable = num_frames if not target_fps or not fps else int(math.floor((num_frames - 1) * target_fps / fps)) + 1
            pool = [b for b in self.video if b.num_frames <= usable]
        if not pool:
            return None
        aspect = width / max(height, 1)
        return min(pool, key=lambda b: (round(abs(math.log(b.aspect / aspect)), 3), -b.num_frames, -b.height))

    def fit_weights_from_histogram(self, histogram: dict[str, int], target_fps: float | None, fps: float | None = None) -> None:
        """Weight buckets by the data set's samples each would receive (see
        :meth:`fit_weights_to_samples`); any sample feeds the image bucket nearest its aspect."""
        videos = {b.name: 0.0 for b in self.video}
        images = {b.name: 0.0 for b in self.images}
        for shape, n in histogram.items():
            f, h, w = (int(x) for x in shape.split("x"))
            b = self.assign(f, h, w, fps or 0.0, target_fps if fps else None)
            if b is None:
                continue  # fits no bucket: the loader skips it, so it feeds no image batch either
            if not b.is_image:
                videos[b.name] += n
            image = self.assign(1, h, w, 0.0, None, want_image=True)
            if image is not None:
                images[image.name] += n
        self.fit_weights_to_samples(videos, images)

    def fit_weights_to_samples(self, videos: dict[str, float], images: dict[str, float] | None = None) -> None:
        """Draw each bucket in proportion to the *batches* its samples fill (samples / batch
        size): video buckets by the clips they receive, image buckets by the samples that can
        feed them. Then every shape's samples are used at the rate they arrive, by video and
        image batches alike. Weighted by samples alone, a bucket with a small batch (a long or
        large shape under a token budget) is drawn for fewer samples than it receives, and an
        image bucket fed by few clips drains them; either way some bucket's waiting pool grows
        until the loader stops. Buckets with no samples are never drawn."""
        for group, counts in ((self.video, videos), (self.images, images)):
            if counts is None:
                continue
            batches = {b.name: float(counts.get(b.name, 0.0)) / b.batch_size for b in group}
            total = sum(batches.values())
            if total > 0:
                for name, n in batches.items():
                    self.weights[name] = n / total

    def schedule(self, seed: int, epoch: int, index: int) -> Bucket:
        """The bucket of batch ``index`` of ``epoch``: identical on every rank and worker.

        Low-discrepancy, not independent draws: batch j takes the point u_j = phase + j * phi
        (mod 1; phi the golden ratio's fraction, the phase from the seed), and [0, 1) is cut
        into one interval per bucket: image buckets share ``image_ratio`` of it, video buckets
        the rest, each by its weight. Over any n batches a bucket is drawn n * its share times,
        give or take O(log n), so every shape's samples are used at the rate they arrive. With
        independent draws the counts drift like a random walk (sqrt(n)), and the samples
        waiting for an under-drawn bucket grew without bound: a 5,000-step native-shapes run
        stopped at batch 3,704 with 4,096 samples waiting. A consumer that takes every k-th
        batch still sees a low-discrepancy sequence (step k * phi mod 1)."""
        phase = float(np.random.default_rng([seed, epoch, 0x5EED]).random())
        u = (phase + index * _GOLDEN_FRACTION) % 1.0
        # image_ratio is 1 without video buckets and 0 without image buckets (__init__)
        for pool, share in ((self.images, self.image_ratio), (self.video, 1.0 - self.image_ratio)):
            if not pool or share <= 0:
                continue
            w = np.array([self.weights[b.name] for b in pool], dtype=np.float64)
            if w.sum() <= 0:
                w = np.ones_like(w)
            edges = share * np.cumsum(w / w.sum())  # (len(pool),): right edge of each bucket's interval
            if u < edges[-1]:
                return pool[min(int(np.searchsorted(edges, u, side="right")), len(pool) - 1)]
            u -= share
        return (self.video or self.images)[-1]  # u at the top edge by rounding
