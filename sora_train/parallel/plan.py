"""Memory plan of one DiT training step per rank, before any cluster hours are spent.

Per rank (GPU): model states (parameters, gradients, optimizer state, by strategy and
precision: docs/strategies.md "Memory per parameter"), communication buffers, and activations
(by tokens, micro-batch, sequence-parallel size and activation checkpointing). Typed inputs
only; `sora-plan` (sora_train/cli/plan.py) composes a config into them.

Activations of one DiT block, per sample, in elements (N tokens on this rank, D width,
M = mlp_ratio * D, H heads, L text tokens), as counted by `torch.autograd.graph.saved_tensors_hooks`
on the real block (parameters excluded, shared storage counted once; torch 2.13, SDPA's
flash/"efficient" kernels, which keep no N x N matrix):

    24 N D    LayerNorm inputs/outputs x3, modulate outputs x2, qkv, QK-RMSNorm outputs, RoPE
              outputs of q and k, attention outputs and their re-layouts (self and cross),
              cross-attention q, the residual stream between the three branches
  +  2 N M    MLP: fc1's output (kept by GELU) and GELU's output (kept by fc2)
  +  5 N H    attention log-sum-exps (self, cross) and QK-RMSNorm reciprocals, fp32
  +  6 L D    cross-attention keys/values (and their norms)

= 32 N D at mlp_ratio 4: about twice Korthikanti et al.'s 34 s D *bytes* for a GPT block,
because of QK-norm, RoPE, the adaLN modulations and the cross-attention branch.
With activation checkpointing a block keeps only its input (N D); in backward one block is
recomputed at a time. While a block's backward runs, its gradients are alive too: the
working set below (2 N M + 8 N D: the MLP's hidden gradients and a few of width D) is an
estimate; with it the plan comes out 6-20% above the measured peaks of real fp32 CPU steps
(bench/bench_plan.py; tests/parallel/test_plan.py requires within 25%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sora_train.utils.errors import SoraError

GB = 1e9  # decimal gigabytes, as GPU datasheets count
GiB = 2**30

# Saved elements per block (module docstring): coefficients of N*D, N*M, N*H and L*D.
SAVED_ND, SAVED_NM, SAVED_NH, SAVED_LD = 24, 2, 5, 6
# Gradients alive while one block's backward runs, on top of what is saved (elements).
WORKING_NM, WORKING_ND = 2, 8
# Outside the blocks: patch embedding in/out, final layer, the loss's target and prediction.
OUTSIDE_ND = 6

STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
              "deepspeed_stage_2_offload", "deepspeed_stage_3_offload")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


@dataclass(frozen=True)
class DiTShape:
    """What the plan needs of a DiT (everything from `DiT.config()` / the size registry)."""

    num_params: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    block_params: int = 0  # parameters of one block (ZeRO-3 gathers a block at a time)


@dataclass(frozen=True)
class LatentGeometry:
    """The VAE's compression: a clip of 1 + k * temporal frames -> 1 + k latent frames."""

    temporal_factor: int
    spatial_factor: int

    def tokens(self, num_frames: int, height: int, width: int, patch_size: tuple[int, int, int]) -> int:
        tf, sf = self.temporal_factor, self.spatial_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            raise SoraError(f"num_frames={num_frames}: the VAE needs 1 + k*{tf} frames")
        if height % sf or width % sf:
            raise SoraError(f"{height}x{width}: height and width must be multiples of the VAE's spatial factor {sf}")
        f, h, w = 1 + (num_frames - 1) // tf, height // sf, width // sf
        pt, ph, pw = patch_size
        if f % pt or h % ph or w % pw:
            raise SoraError(f"{num_frames}x{height}x{width} gives latents {f}x{h}x{w}, not divisible by the DiT patch {tuple(patch_size)}")
        return (f // pt) * (h // ph) * (w // pw)


@dataclass(frozen=True)
class Setup:
    """How the model is trained: strategy, precision, ranks, and what activations cost.

    world_size: ranks ZeRO shards states over (all GPUs of the job). sequence_parallel_size:
    ranks one sample's tokens are split over (Ulysses: each holds N / sp tokens in every
    block). reduce_bucket_size / allgather_bucket_size: DeepSpeed's buckets, in elements.
    """

    strategy: str = "ddp"
    precision: str = "bf16-mixed"
    world_size: int = 1
    sequence_parallel_size: int = 1
    activation_checkpointing: bool = False
    micro_batch: int = 1
    text_len: int = 300
    reduce_bucket_size: float = 2e8
    allgather_bucket_size: float = 2e8

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SoraError(f"strategy={self.strategy!r} is unknown; choose one of {list(STRATEGIES)}")
        if self.precision not in PRECISIONS:
            raise SoraError(f"precision={self.precision!r}: the plan knows {list(PRECISIONS)}")
        for name in ("world_size", "sequence_parallel_size", "micro_batch"):
            if int(getattr(self, name)) < 1:
                raise SoraError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.world_size % self.sequence_parallel_size:
            raise SoraError(f"world_size={self.world_size} is not divisible by sequence_parallel_size={self.sequence_parallel_size}")


@dataclass
class MemoryPlan:
    """Bytes per rank. `gpu` is what must fit; `cpu` is what offload puts in host RAM."""

    params: float
    grads: float
    optimizer: float
    buffers: float
    activations: float
    optimizer_step: float  # temporaries of the optimizer step (activations are free by then)
    cpu: float
    tokens: int
    notes: list[str] = field(default_factory=list)
    frozen: float = 0.0  # parts outside the strategy, replicated on every rank: the VAE, a frozen text encoder

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def gpu(self) -> float:
        """Peak: states + buffers + the larger of the backward's activations and the step's temporaries."""
        return self.frozen + self.states + self.buffers + max(self.activations, self.optimizer_step)

    def fits(self, gpu_bytes: float) -> bool:
        return self.gpu <= gpu_bytes


def model_state_bytes(num_params: int, setup: Setup) -> tuple[float, float, float, float, float]:
    """(params, grads, optimizer, optimizer-step temporaries, cpu) bytes per rank, Adam(W).

    bf16 under DDP/single device: fp32 weights, fp32 gradients, Adam 8, plus autocast's bf16
    copy of the weights (2). bf16 under DeepSpeed: bf16 weights 2 and gradients 2, fp32
    master + Adam 12, each sharded by its stage. fp32: 4 + 4 + 8, DeepSpeed stages 1/2 add
    their fp32 master shard (4/N). Offload moves the optimizer (and stage 3 the parameters'
    fp32 copy) to CPU RAM.
    """
    P, n, s = float(num_params), setup.world_size, setup.strategy
    bf16 = setup.precision != "32-true"
    if s in ("auto", "ddp"):
        params = P * (4 + (2 if setup.precision == "bf16-mixed" else 0))
        grads, optim = 4 * P, 8 * P
        return params, grads, optim, 4 * P, 0.0  # torch's foreach Adam: one fp32 temporary per weight
    stage = int(s.split("_")[2])
    w = 2 if bf16 else 4  # the engine's weights and gradients
    master = 4 if (bf16 or stage < 3) else 0  # stage 3 in fp32 steps its shard in place
    optim = (8 + master) * P
    params = w * P / (n if stage >= 3 else 1)
    grads = w * P / (n if stage >= 2 else 1)
    optim_gpu = optim / (n if stage >= 1 else 1)
    cpu = 0.0
    if s.endswith("offload"):
        cpu += optim_gpu + 4 * P / n  # optimizer shard + its fp32 gradient shard
        optim_gpu = 0.0
        if stage == 3:
            cpu += w * P / n
            params = 0.0
    return params, grads, optim_gpu, (4 * P / n if not s.endswith("offload") else 0.0), cpu


def activation_bytes(dit: DiTShape, tokens: int, setup: Setup) -> float:
    """Peak activation bytes of one step per rank (micro-batch, tokens / sp, checkpointing)."""
    n = math.ceil(tokens / setup.sequence_parallel_size)
    D, H, L = dit.hidden_size, dit.num_heads, setup.text_len
    M = int(D * dit.mlp_ratio)
    bytes_per = 4 if setup.precision == "32-true" else 2
    block = SAVED_ND * n * D + SAVED_NM * n * M + SAVED_NH * n * H + SAVED_LD * L * D
    working = WORKING_NM * n * M + WORKING_ND * n * D
    if setup.activation_checkpointing:
        kept = dit.depth * n * D + block  # every block's input, and one block recomputed in backward
    else:
        kept = dit.depth * block
    return float(setup.micro_batch * (kept + working + OUTSIDE_ND * n * D) * bytes_per)


def plan_memory(dit: DiTShape, tokens: int, setup: Setup, frozen_bytes: float = 0.0) -> MemoryPlan:
    """The memory of one training step per rank; `frozen_bytes`: weights of the frozen parts."""
    params, grads, optim, step_tmp, cpu = model_state_bytes(dit.num_params, setup)
    notes = []
    buffers = 0.0
    s = setup.strategy
    if s.startswith("deepspeed"):
        gb = 2 if setup.precision != "32-true" else 4
        buffers = (setup.reduce_bucket_size + setup.allgather_bucket_size) * gb
        notes.append("buffers: DeepSpeed's reduce + all-gather buckets (lower them if a few GB short)")
        if s.startswith("deepspeed_stage_3"):
            buffers += 2 * dit.block_params * gb  # a gathered block and the prefetched next one
    if setup.sequence_parallel_size > 1:
        notes.append("sequence parallel: activations hold tokens / sp per rank; all-to-all buffers not counted")
    act = activation_bytes(dit, tokens, setup)
    return MemoryPlan(params, grads, optim, buffers, act, step_tmp, cpu, tokens, notes, float(frozen_bytes))


def longest_clip(dit: DiTShape, geometry: LatentGeometry, height: int, width: int, setup: Setup, gpu_bytes: float, max_frames: int = 1 + 4 * 2**14, frozen_bytes: float = 0.0) -> int:
    """The most frames (1 + k * temporal_factor) at height x width whose step fits in gpu_bytes; 0 if none.

    Latent frames j * p_t (j >= 1) are the valid lengths; memory grows with j, so an
    exponential then binary search over j finds the largest that fits.
    """
    tf, pt = geometry.temporal_factor, dit.patch_size[0]

    def frames(j: int) -> int:  # j * p_t latent frames
        return 1 + (j * pt - 1) * tf

    def fits(j: int) -> bool:
        return plan_memory(dit, geometry.tokens(frames(j), height, width, dit.patch_size), setup, frozen_bytes).fits(gpu_bytes)

    j_max = max(1, ((max_frames - 1) // tf + 1) // pt)
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= j_max and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, j_max + 1)
    while hi - lo > 1:  # fits(lo); hi does not fit or lies beyond the cap
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return frames(lo)


def dit_shape(dit) -> DiTShape:
    """A DiTShape from a built DiT (build it on the meta device: nothing is allocated)."""
    blocks = getattr(dit, "blocks", None)
    block_params = sum(p.numel() for p in blocks[0].parameters()) if blocks is not None and len(blocks) else 0
    return DiTShape(
        num_params=sum(p.numel() for p in dit.parameters()),
        hidden_size=dit.hidden_size, depth=dit.depth, num_heads=dit.num_heads,
        mlp_ratio=float(dit.mlp_ratio), patch_size=tuple(dit.patch_size), block_params=block_params,
    )
