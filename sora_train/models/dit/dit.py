"""Spacetime-patch diffusion transformer (DiT) for video latents, predicting flow velocity.

One model for images and videos of any shape: a latent (B, C, f, h, w) is cut into
p_t x p_h x p_w spacetime patches, each patch becomes one token, and positions enter
through 3D rotary embeddings computed from the actual token grid on every call, so there is
no learned position table and unseen durations / aspect ratios / resolutions are accepted.
RoPE is relative: alone, it does not tell a token where the frame's edges are, and a model
trained on square frames draws a second copy of its subject in each half of a 2:1 frame.
``normalized_positions=True`` adds what it lacks: an embedding of each token's place as a
fraction of the clip's duration, height and width (0 at the first frame / top / left edge,
1 at the last / bottom / right), the same range at every shape.
RoPE's fastest channel pair turns one radian per token: its period is 2*pi ~ 6.3 tokens. A
model that trained on frames at most 6 tokens wide never saw a distance past one period, and
on an 8-token-wide frame a token 6 or 7 tokens from the subject looks, to that pair, as if it
were next to it: the model draws a fragment of a copy there. ``rope_scale`` multiplies the
token positions per axis before the rotation (0.5: a 12.6-token period), so a small-grid
model can be asked for frames up to about twice the extent it trained on without aliasing.

Block (DiT with adaLN-Zero, plus PixArt-style cross-attention to text):
    x = x + gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))   # 3D RoPE on q, k
    x = x + CrossAttn(LN_affine(x), text)                               # key padding mask
    x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
Conditioning c = TimestepMLP(t) + PooledTextMLP(masked_mean(text)) drives every shift /
scale / gate, either through a Linear(D -> 6D) per block (modulation="per_block", DiT) or
through one Linear(D -> 6D) shared by all blocks plus a learned (6, D) table per block
(modulation="shared", PixArt-alpha's adaLN-single, also Wan2.1's design): same function
class for the timestep, 6D^2 parameters instead of 6D^2 per block (a quarter of a 100M
model's parameters and optimizer state). Both start at zero, so each block is the
identity at init (adaLN-Zero). Conditioning frames (image-to-video, extension, interpolation) enter as
`cond_channels` extra input channels holding the per-frame 0/1 cond mask.

Axis names: B, C, f, h, w for latents; N, D for tokens; L for text tokens; H heads of Dh.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sora_train.utils.errors import SoraError
from sora_train.utils.kwargs import constructor_kwargs

# t in [0, 1] is scaled to [0, 1000] before the sinusoidal embedding so that its frequencies
# (periods 1 .. 10000) resolve small timestep differences, as in DiT's integer timesteps.
TIMESTEP_SCALE = 1000.0
# Width of the sinusoidal timestep features fed to the timestep MLP (DiT's value).
FREQUENCY_EMBEDDING_SIZE = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift with (B, 1, D) shift/scale; one fused kernel."""
    return torch.addcmul(shift, x, 1 + scale)


# --------------------------------------------------------------------------------------
# 3D rotary position embedding
# --------------------------------------------------------------------------------------


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Split a head's channels among the (t, h, w) axes: h and w get 2*(Dh//6) each, t the
    rest (t gets the spare channels: durations vary most across training data)."""
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def grid_positions(grid: tuple[int, int, int], device=None, scale=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """(t, h, w) coordinates of every token of an (f', h', w') grid, row-major: (N, 3); the
    token index along each axis times that axis's ``scale`` (the DiT's ``rope_scale``)."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) * float(s) for n, s in zip(grid, scale)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)


# Octaves of the normalized-position features: sin / cos(pi 2^k u), k < 4, per axis.
NORMALIZED_POSITION_OCTAVES = 4


def normalized_position_features(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Each token's place in its clip as a fraction, as Fourier features: (N, 3 * 2 * octaves).

    u_t = i / (f' - 1): the first token frame at 0, the last at 1 (0 for a single frame); with
    a causal VAE of temporal stride s, latent frame i >= 1 ends pixel frame s*i of s*(f' - 1),
    so u_t is the same fraction of the clip in pixels. u_h, u_w = (i + 0.5) / n: cell centres,
    the edges at 0 and 1. Each u in [0, 1] gives sin and cos of pi 2^k u (cos(pi u) alone is
    monotone on [0, 1])."""
    axes = [
        (torch.arange(n, device=device, dtype=torch.float32) / max(n - 1, 1)) if a == 0
        else (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        for a, n in enumerate(grid)
    ]
    u = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    freqs = math.pi * 2.0 ** torch.arange(NORMALIZED_POSITION_OCTAVES, device=device, dtype=torch.float32)  # (K,)
    angles = u[..., None] * freqs  # (N, 3, K)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(u.shape[0], -1)  # (N, 6K)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotation angles for (N, 3) positions: two (N, Dh/2) float32 tensors.

    Each axis a with d_a channels rotates d_a/2 channel pairs at frequencies theta^(-2i/d_a).
    """
    angles = []
    for axis, dim in enumerate(rope_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)  # (d/2,)
        angles.append(positions[:, axis, None].float() * freqs)  # (N, d/2)
    angles = torch.cat(angles, dim=-1)  # (N, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x (..., N, Dh) by the angles behind cos/sin (N, Dh/2).

    The score <rope(q, m), rope(k, n)> depends only on m - n (relative positions).
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-op in float32; tiny (N, Dh/2) cast in bf16
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (..., N, Dh/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # (..., N, Dh)


# --------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> sinusoidal features -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half  # (dim/2,)
        freqs = torch.exp(-math.log(max_period) * exponents)  # (dim/2,)
        args = (t.float() * TIMESTEP_SCALE)[:, None] * freqs  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (B, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


# --------------------------------------------------------------------------------------
# Attention, MLP, block, final layer
# --------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention over all N spacetime tokens: fused qkv, QK-RMSNorm, 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh), strided views
        q = apply_rope(self.q_norm(q), *rope)  # (B, H, N, Dh)
        k = apply_rope(self.k_norm(k), *rope)  # (B, H, N, Dh)
        x = self.attend(q, k, v)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)  # (B, N, D)

    # Exact attention over the tokens given; sequence parallelism replaces it from outside with
    # an exchange that gives each rank all tokens for a share of the heads.
    attend = staticmethod(F.scaled_dot_product_attention)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; padded text tokens are masked out of the keys."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        L = context.shape[1]
        q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(context).view(B, L, 2, self.num_heads, self.head_dim)  # (B, L, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, L, Dh)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention + cross-attention + MLP (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, shared_modulation: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shared_modulation:
            # Added to the shared Linear's (B, 6D) output, which the DiT passes in as `c`.
            self.modulation_table = nn.Parameter(torch.zeros(6 * dim))
        else:
            # Takes SiLU(c), computed once per forward for all blocks (DiT's SiLU -> Linear).
            self.adaLN_modulation = nn.Linear(dim, 6 * dim)
        self.uses_shared_modulation = shared_modulation

    def forward(self, x, c, context, attn_mask, rope):
        """c: SiLU(conditioning) (B, D), or with shared modulation the shared projection (B, 6D)."""
        mod = (c + self.modulation_table if self.uses_shared_modulation else self.adaLN_modulation(c)).unsqueeze(1)  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope))  # (B, N, D)
        x = x + self.cross_attn(self.norm2(x), context, attn_mask)  # (B, N, D)
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp)))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear to one patch of output channels per token."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)  # takes SiLU(c)
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p_t*p_h*p_w*C_out)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Spacetime-patch diffusion transformer: (noisy latent, t, text, cond mask) -> velocity.

    Args:
        in_channels: latent channels C (from the VAE).
        patch_size: (p_t, p_h, p_w) spacetime patch; f, h, w of every input must divide by it.
        hidden_size, depth, num_heads, mlp_ratio: transformer width D, blocks, heads, MLP width / D.
        text_dim: width of the text encoder's token embeddings.
        qk_norm: RMSNorm on q and k per head (keeps attention logits bounded at scale).
        cond_channels: extra input channels carrying the per-frame cond mask (0 disables it).
        rope_theta: base period of the rotary embedding.
        modulation: "per_block" (a D -> 6D adaLN Linear in every block, DiT) or "shared"
            (one D -> 6D Linear for all blocks plus a per-block table, adaLN-single).
        out_channels: predicted channels (default: in_channels).
        max_boxes: object slots of box motion control (0: none, the model is unchanged).
            The box maps (B, 2 * max_boxes, f, h, w) (``sora_train.data.boxes.rasterise_boxes``:
            per slot, hard- and soft-box coverage of each latent cell) are cut into the same
            spacetime patches as the latent and embedded by a small MLP whose output layer
            starts at zero, then added to the patch tokens: a model gaining box control
            starts out computing exactly what it did before, and a sample without boxes
            (all-zero maps) adds nothing, so box dropout in training is "no boxes".
        normalized_positions: add an embedding of each token's place as a fraction of the
            clip's duration, height and width (``normalized_position_features``; a small MLP
            whose output layer starts at zero) to the patch tokens, beside RoPE: the model
            knows where the frame's edges and the clip's ends are at any shape.
        rope_scale: (t, h, w) multipliers of the token positions RoPE rotates by (1: one
            position per token). Below 1 stretches every channel pair's period in tokens,
            so extents past the trained ones do not alias onto near distances (see the
            module docstring); part of the model (it trains and samples with the same).
    """

    # Constructor arguments of earlier versions that exports may still record; ignored on load.
    # activation_checkpointing: applied from outside now (parallel.activation_checkpointing).
    RETIRED_CONFIG_KEYS = ("activation_checkpointing",)

    def __init__(
        self,
        in_channels: int,
        patch_size=(1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        text_dim: int = 4096,
        qk_norm: bool = True,
        cond_channels: int = 1,
        rope_theta: float = 10000.0,
        out_channels: int | None = None,
        modulation: str = "per_block",
        max_boxes: int = 0,
        normalized_positions: bool = False,
        rope_scale=(1.0, 1.0, 1.0),
    ):
        super().__init__()
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise SoraError(f"DiT patch_size must be three positive ints (p_t, p_h, p_w), got {patch_size}")
        if hidden_size % num_heads:
            raise SoraError(f"DiT hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        head_dim = hidden_size // num_heads
        if head_dim % 2 or min(rope_dims(head_dim)) < 2:
            raise SoraError(f"DiT head dim hidden_size/num_heads={head_dim} must be even and >= 6 for 3D RoPE")
        if cond_channels < 0:
            raise SoraError(f"DiT cond_channels must be >= 0, got {cond_channels}")
        if max_boxes < 0:
            raise SoraError(f"DiT max_boxes must be >= 0, got {max_boxes}")
        try:
            scale = None if isinstance(rope_scale, str) else [float(v) for v in rope_scale]
        except (TypeError, ValueError):
            scale = None
        if scale is None or len(scale) != 3 or not all(math.isfinite(v) and v > 0 for v in scale):
            raise SoraError(f"DiT rope_scale must be three positive numbers (t, h, w), got {rope_scale!r}")
        if modulation not in ("per_block", "shared"):
            raise SoraError(f"DiT modulation must be 'per_block' or 'shared', got {modulation!r}")
        self.modulation = modulation
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.text_dim, self.qk_norm, self.cond_channels = text_dim, qk_norm, cond_channels
        self.rope_theta = rope_theta
        self.rope_scale = scale
        self.head_dim = head_dim
        p = math.prod(patch_size)

        self.x_embedder = nn.Linear(p * (in_channels + cond_channels), hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.text_embedder = nn.Sequential(  # per-token projection into the model width
            nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_text_embedder = nn.Sequential(  # masked-mean text -> added to the timestep conditioning
            nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        shared = modulation == "shared"
        # adaLN-single: the one projection of SiLU(c) to every block's 6 shift/scale/gate rows.
        self.shared_modulation = nn.Linear(hidden_size, 6 * hidden_size) if shared else None
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, shared_modulation=shared) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, p * self.out_channels)
        self.normalized_positions = bool(normalized_positions)
        self.position_embedder = (
            nn.Sequential(nn.Linear(6 * NORMALIZED_POSITION_OCTAVES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            if normalized_positions else None
        )
        self.max_boxes = 0
        self.box_embedder: nn.Module | None = None
        self.initialize_weights()
        if max_boxes:
            self.enable_boxes(max_boxes)

    def enable_boxes(self, max_boxes: int) -> "DiT":
        """Add box motion control for ``max_boxes`` objects (a base model gains it before
        fine-tuning; see the class docstring). Idempotent for the same count."""
        if self.max_boxes:
            if self.max_boxes != max_boxes:
                raise SoraError(f"DiT already has box control for {self.max_boxes} objects; cannot change it to {max_boxes}")
            return self
        p, D = math.prod(self.patch_size), self.hidden_size
        ref = self.x_embedder.weight
        self.box_embedder = nn.Sequential(nn.Linear(p * 2 * max_boxes, D), nn.SiLU(), nn.Linear(D, D)).to(ref.device, ref.dtype)
        nn.init.xavier_uniform_(self.box_embedder[0].weight)
        nn.init.zeros_(self.box_embedder[0].bias)
        nn.init.zeros_(self.box_embedder[2].weight)  # zero output: gaining control changes nothing until trained
        nn.init.zeros_(self.box_embedder[2].bias)
        self.max_boxes = int(max_boxes)
        return self

    def initialize_weights(self) -> None:
        # Every Linear starts Xavier-uniform with zero bias (DiT); the patch embedding is a
        # Linear on flattened patches, so it gets the same, like a ViT's conv patch embedding.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Timestep and text MLPs: small normal weights (DiT / PixArt), so the conditioning
        # starts near zero and does not saturate the SiLU / GELU.
        for mlp in (self.t_embedder.mlp, self.text_embedder, self.pooled_text_embedder):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: the modulation layers output 0, so every shift/scale is 0 and every gate
        # is 0 -> self-attention and MLP branches are multiplied by 0 and each block is the
        # identity at init; the gates receive gradient immediately and open during training.
        # The cross-attention branch has no gate, so its output projection is zeroed instead
        # (PixArt-alpha), which also makes it contribute exactly 0 at init.
        # With shared modulation the shared Linear and every block's table start at 0 instead.
        if self.shared_modulation is not None:
            nn.init.zeros_(self.shared_modulation.weight)
            nn.init.zeros_(self.shared_modulation.bias)
        for block in self.blocks:
            if not block.uses_shared_modulation:
                nn.init.zeros_(block.adaLN_modulation.weight)
                nn.init.zeros_(block.adaLN_modulation.bias)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        # Zero final layer: the model predicts exactly 0 velocity at init (DiT), so early
        # training does not start from large random outputs.
        nn.init.zeros_(self.final_layer.adaLN_modulation.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # Normalized positions start at zero too: a model gaining them computes what it did.
        if self.position_embedder is not None:
            nn.init.zeros_(self.position_embedder[2].weight)
            nn.init.zeros_(self.position_embedder[2].bias)
        # QK RMSNorm gains start at 1 (nn.RMSNorm's default), LayerNorm affine at (1, 0).

    # ---- patches ------------------------------------------------------------------------

    def _check_divisible(self, x: torch.Tensor, what: str = "x") -> None:
        if x.ndim != 5:
            raise SoraError(f"DiT {what} must be (B, C, f, h, w), got shape {tuple(x.shape)}")
        for name, size, p in zip(("f", "h", "w"), x.shape[2:], self.patch_size):
            if size % p:
                raise SoraError(
                    f"DiT {what} latent {name}={size} is not divisible by patch_size {name}={p} "
                    f"(patch_size={self.patch_size}, {what} shape {tuple(x.shape)})"
                )

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, f, h, w) -> tokens (B, N, p_t*p_h*p_w*C) and the token grid (f', h', w')."""
        self._check_divisible(x)
        p_t, p_h, p_w = self.patch_size
        grid = (x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w)
        pattern = "b c (f pt) (h ph) (w pw) -> b (f h w) (pt ph pw c)"
        tokens = rearrange(x, pattern, pt=p_t, ph=p_h, pw=p_w)  # (B, N, p*C)
        return tokens, grid

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """tokens (B, N, p_t*p_h*p_w*C) on grid (f', h', w') -> (B, C, f, h, w)."""
        p_t, p_h, p_w = self.patch_size
        f, h, w = grid
        pattern = "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)"
        return rearrange(tokens, pattern, f=f, h=h, w=w, pt=p_t, ph=p_h, pw=p_w)  # (B, C, f, h, w)

    # ---- forward ------------------------------------------------------------------------

    def _check_inputs(self, x, t, text, text_mask, cond_mask) -> None:
        self._check_divisible(x)
        B, C, f = x.shape[:3]
        if C != self.in_channels:
            raise SoraError(f"DiT x has C={C} channels but the model was built with in_channels={self.in_channels}")
        if t.shape != (B,):
            raise SoraError(f"DiT t must have shape (B,)=({B},), got {tuple(t.shape)}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.text_dim:
            raise SoraError(f"DiT text must be (B, L, text_dim)=({B}, L, {self.text_dim}), got {tuple(text.shape)}")
        if text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise SoraError(
                f"DiT text_mask must be bool (B, L)={tuple(text.shape[:2])}, got {text_mask.dtype} {tuple(text_mask.shape)}"
            )
        if cond_mask is not None:
            if self.cond_channels == 0:
                raise SoraError("DiT got a cond_mask but was built with cond_channels=0")
            if cond_mask.shape != (B, f):
                raise SoraError(f"DiT cond_mask must be (B, f)=({B}, {f}), got {tuple(cond_mask.shape)}")

    def forward(self, x, t, text, text_mask, cond_mask=None, box_maps=None) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: (B, C, f, h, w) noisy latent; f, h, w divisible by patch_size.
            t: (B,) float timesteps in [0, 1], 1 = pure noise.
            text: (B, L, text_dim) text-encoder token embeddings.
            text_mask: (B, L) bool, True = real token; every row should have one (a row with
                none attends to all L positions rather than producing NaNs).
            cond_mask: (B, f) bool, True = latent frame given clean as context; None = none.
            box_maps: (B, 2 * max_boxes, f, h, w) rasterised boxes; None or all-zero rows = none.
        Returns:
            (B, C_out, f, h, w) predicted velocity.
        """
        self._check_inputs(x, t, text, text_mask, cond_mask)
        B, _, f, h, w = x.shape
        if self.cond_channels:
            cond = x.new_zeros(B, f) if cond_mask is None else cond_mask.to(x.dtype)  # (B, f)
            cond = cond[:, None, :, None, None].expand(B, self.cond_channels, f, h, w)  # (B, cc, f, h, w)
            x = torch.cat([x, cond], dim=1)  # (B, C + cc, f, h, w)
        x, grid = self.patchify(x)  # (B, N, p*(C + cc))
        x = self.x_embedder(x)  # (B, N, D)
        if box_maps is not None:
            x = x + self._box_tokens(box_maps, x.shape[:2])  # (B, N, D)
        if self.position_embedder is not None:
            features = normalized_position_features(grid, x.device).to(self.x_embedder.weight.dtype)  # (N, 6K)
            x = x + self.position_embedder(features)  # (B, N, D) + (N, D)
        rope = rope_angles(grid_positions(grid, x.device, self.rope_scale), self.head_dim, self.rope_theta)  # 2 x (N, Dh/2)

        has_text = text_mask.any(dim=1, keepdim=True)  # (B, 1)
        attn_mask = (text_mask | ~has_text)[:, None, None, :]  # (B, 1, 1, L); no fully-masked row
        context = self.text_embedder(text)  # (B, L, D)
        weights = text_mask.to(text.dtype)  # (B, L)
        pooled = (text * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)  # (B, text_dim)
        c = self.t_embedder(t) + self.pooled_text_embedder(pooled)  # (B, D)
        c = F.silu(c)  # (B, D): the SiLU of every adaLN "SiLU -> Linear", computed once
        block_c = c if self.shared_modulation is None else self.shared_modulation(c)  # (B, D) or (B, 6D)

        for block in self.blocks:  # activation checkpointing and compile wrap blocks from outside (apply_parallelism)
            x = block(x, block_c, context, attn_mask, rope)  # (B, N, D)
        x = self.final_layer(x, c)  # (B, N, p*C_out)
        return self.unpatchify(x, grid)  # (B, C_out, f, h, w)

    def _box_tokens(self, box_maps: torch.Tensor, tokens: tuple[int, int]) -> torch.Tensor:
        """(B, 2M, f, h, w) box maps -> (B, N, D) tokens to add; zero for a sample without boxes."""
        if self.box_embedder is None:
            raise SoraError("DiT got box_maps but has no box control (built with max_boxes=0)")
        if box_maps.shape[:2] != (tokens[0], 2 * self.max_boxes):
            raise SoraError(f"DiT box_maps must be (B, 2 * max_boxes, f, h, w) = ({tokens[0]}, {2 * self.max_boxes}, ...), got {tuple(box_maps.shape)}")
        patches, _ = self.patchify(box_maps.to(self.x_embedder.weight.dtype))  # (B, N, p*2M)
        if patches.shape[1] != tokens[1]:
            raise SoraError(f"DiT box_maps {tuple(box_maps.shape)} give {patches.shape[1]} tokens, the latent {tokens[1]}: rasterise them on the latent's (f, h, w)")
        present = box_maps.flatten(1).ne(0).any(dim=1).to(patches.dtype)  # (B,)
        return self.box_embedder(patches) * present[:, None, None]  # (B, N, D)

    # ---- accounting ---------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the input embedders (patch, timestep,
        text and pooled text, box and normalized position), leaving the transformer blocks and
        the final layer."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            embedders = (self.x_embedder, self.t_embedder, self.text_embedder, self.pooled_text_embedder,
                         self.box_embedder, self.position_embedder)
            for m in embedders:
                if m is None:  # no box control / normalized positions
                    continue
                n -= sum(p.numel() for p in m.parameters())
        return n

    def flops_per_step(self, num_tokens: int, text_len: int, training: bool = True) -> float:
        """Model FLOPs for one sample: every matmul (2 FLOPs per multiply-add), attention included.

        With N video tokens, L text tokens, D width, M = mlp_ratio*D, P_in / P_out the
        patch widths in and out, T the text width and 256 the timestep feature width:
            per block  8ND^2        self-attn qkv + out
                     + 4N^2D        self-attn scores QK^T and weighted sum AV
                     + 4ND^2 + 4LD^2 + 4NLD   cross-attn q, out, kv, scores + AV
                     + 4NDM         MLP
                     + 12D^2        adaLN (per sample, not per token; once with shared modulation)
            once       2N*P_in*D + 2N*D*P_out + 4D^2   patch embed, final linear + adaLN
                     + 2L(TD + D^2) + 2(TD + D^2) + 2(256D + D^2)   text, pooled text, time MLPs
                     + 2N*2M*p*D + 2ND^2   box embedder, with box control for M objects
        training=True returns 3x forward (backward costs twice the forward). Elementwise ops
        and norms are not counted, nor the normalized-position MLP (2N*24*D + 2ND^2 once per
        batch: it embeds the token grid, which every sample shares); activation
        checkpointing's recompute is not counted either (MFU counts model FLOPs, not hardware
        FLOPs).
        """
        N, L, D = num_tokens, text_len, self.hidden_size
        M, T = int(D * self.mlp_ratio), self.text_dim
        p = math.prod(self.patch_size)
        p_in, p_out = p * (self.in_channels + self.cond_channels), p * self.out_channels
        block = 8 * N * D * D + 4 * N * N * D  # self-attention
        block += 4 * N * D * D + 4 * L * D * D + 4 * N * L * D  # cross-attention
        shared = self.modulation == "shared"
        block += 4 * N * D * M + (0 if shared else 12 * D * D)  # MLP, per-block adaLN
        once = 2 * N * p_in * D + 2 * N * D * p_out + 4 * D * D + (12 * D * D if shared else 0)
        once += 2 * L * (T * D + D * D) + 2 * (T * D + D * D) + 2 * (FREQUENCY_EMBEDDING_SIZE * D + D * D)
        if self.max_boxes:  # box embedder MLP on every token (counted whether or not a sample has boxes)
            once += 2 * N * p * 2 * self.max_boxes * D + 2 * N * D * D
        forward = self.depth * block + once
        return float(3 * forward if training else forward)

    def config(self) -> dict:
        """Constructor kwargs, JSON-serialisable: DiT(**model.config()) rebuilds the model."""
        return constructor_kwargs(self, patch_size=list(self.patch_size))
