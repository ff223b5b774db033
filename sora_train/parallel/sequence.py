"""Ulysses sequence parallelism for the DiT, applied from outside the model.

A minute of 720p is ~1.3 million tokens: no GPU holds full 3D attention over it, so the token
sequence itself is split over the P ranks of a sequence-parallel (SP) group:

- every rank of a group sees the same sample; after patchify + embedding each rank keeps its
  contiguous 1/P of the N tokens (and the matching rows of the RoPE table: positions stay
  global) for the projections, the MLP, adaLN and cross-attention (text is replicated);
- in self-attention an all-to-all trades the token split for a head split, each rank attends
  over all N tokens with H/P heads, and a second all-to-all trades back (DeepSpeed's
  ``deepspeed.sequence.layer.DistributedAttention``, over gloo on CPU, NCCL on GPUs);
- the final layer (per token) runs on the shard too, and only its output is all-gathered, so
  unpatchify, the loss and anything downstream see the whole sample while every weight is
  used on this rank's tokens alone. The gather's backward keeps each rank's own slice of the
  gradient: summed over the group, the parameter gradients are the single-process ones.

Activation memory of the blocks per rank scales as 1/P; attention's N x N work is split by
heads. Requirements: H divisible by P, and N divisible by P for every bucket (refused, not
padded: a padded token would attend and be attended to).

Data parallelism composes around it: ``data_parallel_rank_world()`` gives loaders the rank of
the *group*, so the P ranks of a group read the same batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sora_train.utils import dist_groups
from sora_train.utils.errors import SoraError


def init_sequence_parallel(size: int) -> Any:
    """Split the world into groups of ``size`` consecutive ranks (rank // size = data-parallel
    index) and record them for loaders; returns this rank's SP group (None for size 1)."""
    size = int(size)
    if size < 1:
        raise SoraError(f"parallel.sequence_parallel_size={size}: must be >= 1")
    if size == 1:
        dist_groups.set_sequence_parallel(None, 1, 0)
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise SoraError(f"parallel.sequence_parallel_size={size} needs a distributed run (trainer.devices / num_nodes) of a multiple of {size} ranks")
    import deepspeed

    if not torch.cuda.is_available():
        from sora_train.parallel.strategies import use_deepspeed_cpu_accelerator

        use_deepspeed_cpu_accelerator()
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # DistributedAttention talks through deepspeed.comm; this wraps the existing group
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise SoraError(f"parallel.sequence_parallel_size={size} does not divide the world size {world}")
    mine = None
    for start in range(0, world, size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    dist_groups.set_sequence_parallel(mine, size, rank % size)
    return mine


class _GatherTokens(torch.autograd.Function):
    """(B, N/P, ...) per rank -> (B, N, ...) on every rank; backward: this rank's slice of the grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, size: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.n = rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)  # (B, N, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[:, ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n].contiguous(), None, None, None


class UlyssesAttention:
    """Self-attention over (B, H, N/P, Dh) shards: all-to-all to (B, N, H/P, Dh), exact
    attention, all-to-all back. A plain object so a deep copy of the DiT (the EMA) shares it
    and its process group instead of trying to copy them."""

    def __init__(self, group: Any) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        def local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H/P, N, Dh)
            return out.transpose(1, 2)  # (B, N, H/P, Dh)

        # Layout (B, N, H, Dh): scatter heads (dim 2), gather the sequence (dim 1).
        self.exchange = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.exchange(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0)  # (B, N/P, H, Dh)
        return out.transpose(1, 2)  # (B, H, N/P, Dh)

    def __deepcopy__(self, memo: dict) -> "UlyssesAttention":
        return self


def apply_sequence_parallel(dit: nn.Module, group: Any, size: int, rank: int) -> nn.Module:
    """Split ``dit``'s token sequence over the ``size`` ranks of ``group`` (this one: ``rank``).

    Works on any model whose ``blocks`` each take ``(x (B, N, D), c, context, attn_mask,
    rope=(cos, sin) (N, Dh/2))`` and hold a ``SelfAttention`` as ``attn``, followed by a
    per-token ``final_layer``: the first block's input is sliced, every block's RoPE rows are
    sliced, the final layer's output is gathered.

    Raises:
        SoraError: the head count is not divisible by ``size``.
    """
    heads = getattr(dit, "num_heads", None)
    if heads is None or not hasattr(dit, "blocks") or not hasattr(dit, "final_layer"):
        raise SoraError(f"sequence parallelism: {type(dit).__name__} has no num_heads / blocks / final_layer to split")
    if heads % size:
        raise SoraError(f"parallel.sequence_parallel_size={size} does not divide the DiT's {heads} attention heads")
    attention = UlyssesAttention(group)
    blocks = list(dit.blocks)

    def shard(module: nn.Module, args: tuple) -> tuple:
        x, c, context, attn_mask, (cos, sin) = args
        n_full = cos.shape[0]
        if n_full % size:
            raise SoraError(f"parallel.sequence_parallel_size={size} does not divide the {n_full} tokens of this clip "
                            "(choose bucket shapes whose token count is a multiple of it)")
        n = n_full // size
        if x.shape[1] == n_full:  # the first block: keep this rank's tokens
            x = x[:, rank * n : (rank + 1) * n]  # (B, N/P, D)
        return x, c, context, attn_mask, (cos[rank * n : (rank + 1) * n], sin[rank * n : (rank + 1) * n])

    def gather(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return _GatherTokens.apply(out, group, size, rank)  # (B, N, p*C)

    for block in blocks:
        block.attn.attend = attention
        block.register_forward_pre_hook(shard)
    dit.final_layer.register_forward_hook(gather)
    dit._sequence_parallel = (size, rank)
    return dit
