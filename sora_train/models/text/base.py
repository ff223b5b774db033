"""The text-encoder contract that the DiT, the sampler and `sora-data cache-latents` code against.

A text encoder turns a batch of captions into padded token embeddings and a padding mask:

    emb, mask = encoder(["a red ball rolls left", ""])   # (B, L, D) float, (B, L) bool

Every row of ``mask`` has at least one True (an empty caption still yields a start/end token),
so cross-attention never sees an all-masked row (which would softmax to NaN). Padded
positions of ``emb`` are zero, so the cached path (``encode_for_cache`` → store →
``collate_cached``) reproduces ``forward`` exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sora_train.utils.errors import SoraError


class TextEncoder(nn.Module):
    """Base class: subclasses set ``dim``, ``max_length``, ``trainable`` and implement
    ``forward`` and ``config``; caching helpers are shared.

    ``pad_to_max_length``: pad every batch to ``max_length`` instead of its longest caption
    (static shapes for ``torch.compile``; costs attention FLOPs on padding).
    """

    dim: int
    max_length: int
    trainable: bool
    pad_to_max_length: bool = False

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Returns ``(emb, mask)``: emb (B, L, D) float, zero where padded; mask (B, L) bool."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """JSON-serialisable constructor kwargs (recorded beside cached embeddings)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_for_cache(self, captions: list[str]) -> list[Tensor]:
        """Per-caption embeddings trimmed to their valid tokens: a list of (L_i, D) tensors.

        Clones each row so that storing one does not keep the whole padded batch alive.
        """
        emb, mask = self(list(captions))  # (B, L, D), (B, L)
        lengths = mask.sum(dim=1).tolist()  # CPU-GPU sync point, once per batch
        out = []
        for i, n in enumerate(lengths):
            # Valid tokens are a prefix: every encoder here pads on the right.
            out.append(emb[i, : int(n)].detach().clone())  # (L_i, D)
        return out

    def collate_cached(self, embeddings: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pads cached (L_i, D) embeddings back to ``(emb (B, L, D), mask (B, L))``.

        ``L`` is the longest entry, or ``max_length`` when ``pad_to_max_length``; this is the
        exact inverse of ``encode_for_cache`` for a frozen encoder.
        """
        if len(embeddings) == 0:
            raise SoraError("collate_cached: got an empty list of text embeddings")
        for i, e in enumerate(embeddings):
            if e.ndim != 2 or e.shape[0] < 1:
                raise SoraError(
                    f"collate_cached: embedding {i} has shape {tuple(e.shape)}; expected (L_i >= 1, D)"
                )
            if e.shape[1] != embeddings[0].shape[1]:
                raise SoraError(
                    f"collate_cached: embedding {i} has width {e.shape[1]}, embedding 0 has {embeddings[0].shape[1]}"
                )
        longest = max(e.shape[0] for e in embeddings)
        length = max(longest, self.max_length) if self.pad_to_max_length else longest
        first = embeddings[0]
        emb = first.new_zeros(len(embeddings), length, first.shape[1])  # (B, L, D)
        mask = torch.zeros(len(embeddings), length, dtype=torch.bool, device=first.device)  # (B, L)
        for i, e in enumerate(embeddings):
            emb[i, : e.shape[0]] = e.to(emb.dtype)
            mask[i, : e.shape[0]] = True
        return emb, mask

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_length={self.max_length}, trainable={self.trainable}"
