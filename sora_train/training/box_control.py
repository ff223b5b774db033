"""Box motion control in training (Boximator-style): boxes from the batch -> DiT box maps.

The DiT side is `DiT(max_boxes=...)` (its box embedder, zero at init); the data side is
`sora_train.data.boxes` (the JSON contract, interpolation, rasterising onto the latent grid).
This object holds what a training run decides: how many objects, how often boxes are dropped
(so the model still works, and text-only quality holds, without them), how often a hard box
is turned into a soft region around the object, how often only the first frames keep a box
(a box drawn on the given image of image-to-video), and whether the base stays frozen.

Config: ``control: boxes`` (conf/control/boxes.yaml); docs/architecture.md, "Box motion
control", explains the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sora_train.data.boxes import rasterise_boxes
from sora_train.utils.errors import SoraError


@dataclass
class BoxControl:
    """Args:
        max_objects: object slots the DiT gets (more objects in a request are refused).
        dropout: per training sample, the probability of training without its boxes.
        soft_prob: per object, the probability that its hard box (the object fills it) is
            grown by ``soft_margin`` on each side and marked soft (the object stays inside).
        soft_margin: (lo, hi) growth per side, fraction of the frame, drawn uniformly.
        partial_prob: per sample, the probability that only a leading span of frames keeps
            its boxes (from frame 0 alone up to all): requests that box only the first frame
            or stop early must mean something.
        freeze_base: train only the box embedder (and LoRA adapters, if any), the rest of the
            DiT frozen, as Boximator does; False trains jointly.
    """

    max_objects: int = 1
    dropout: float = 0.2
    soft_prob: float = 0.25
    soft_margin: tuple[float, float] = (0.03, 0.15)
    partial_prob: float = 0.1
    freeze_base: bool = False

    def __post_init__(self) -> None:
        self.soft_margin = tuple(float(v) for v in self.soft_margin)  # type: ignore[assignment]
        if self.max_objects < 1:
            raise SoraError(f"control.max_objects={self.max_objects} must be >= 1")
        for name in ("dropout", "soft_prob", "partial_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SoraError(f"control.{name}={getattr(self, name)} must be a probability in [0, 1]")
        lo, hi = self.soft_margin
        if not 0.0 <= lo <= hi <= 0.5:
            raise SoraError(f"control.soft_margin={list(self.soft_margin)} must be an increasing range within [0, 0.5]")

    def attach(self, dit: nn.Module) -> None:
        """Give ``dit`` box control (kept if it has it already) and freeze its base if asked."""
        if not hasattr(dit, "enable_boxes"):
            raise SoraError(f"control=boxes: {type(dit).__name__} has no box control; it needs the sora_train DiT")
        dit.enable_boxes(self.max_objects)
        if self.freeze_base:
            for name, p in dit.named_parameters():
                p.requires_grad_(name.startswith("box_embedder.") or "lora_" in name)

    def augment(self, boxes: torch.Tensor, valid: torch.Tensor, hard: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training augmentation of dense boxes (B, K, F, 4), valid (B, K, F), hard (B, K):
        dropout, soft regions, leading spans (see the class docstring)."""
        B, K, F, _ = boxes.shape
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(boxes.device)  # noqa: E731
        boxes, valid, hard = boxes.clone(), valid.clone(), hard.clone()
        soft = (rand(B, K) < self.soft_prob) & hard  # (B, K)
        lo, hi = self.soft_margin
        grow = (lo + (hi - lo) * rand(B, K, 1, 1)) * soft[..., None, None]  # (B, K, 1, 1)
        sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)  # x0, y0 out; x1, y1 out
        boxes = (boxes + grow * sign).clamp(0.0, 1.0)
        hard = hard & ~soft
        span = (rand(B) < self.partial_prob)  # (B,)
        last = (rand(B) * F).long()  # (B,) last frame kept, 0..F-1
        keep = torch.arange(F, device=boxes.device)[None] <= last[:, None]  # (B, F)
        valid = valid & torch.where(span[:, None], keep, torch.ones_like(keep))[:, None, :]
        drop = rand(B) < self.dropout  # (B,)
        valid = valid & ~drop[:, None, None]
        return boxes, valid, hard

    def maps(self, batch: dict[str, Any], grid: tuple[int, int, int], training: bool, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The batch's boxes as DiT box maps (B, 2 * max_objects, f, h, w); None when the
        batch has none. Training applies :meth:`augment`; validation uses them as they are."""
        if "boxes" not in batch:
            return None
        boxes, valid, hard = batch["boxes"].float(), batch["box_valid"].bool(), batch["box_hard"].bool()
        if boxes.shape[1] > self.max_objects:  # more objects than slots: keep the first ones
            boxes, valid, hard = boxes[:, : self.max_objects], valid[:, : self.max_objects], hard[:, : self.max_objects]
        if training:
            boxes, valid, hard = self.augment(boxes, valid, hard, generator)
        return rasterise_boxes(boxes, valid, hard, self.max_objects, grid)
