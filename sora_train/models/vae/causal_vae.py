"""Causal 3D video VAE: (B, 3, F, H, W) pixels in [-1, 1] <-> (B, Cz, f, h, w) latents.

Causal in time. Every temporal convolution pads only on the past side (the first frame is
repeated), so latent frame j depends on pixel frames <= j * temporal_factor and never on a
later one. Consequences the rest of the framework relies on:
- frame 0 is encoded alone, so an image is a 1-frame video and its latent is an image latent;
- a clip of 1 + k * s_t frames maps to 1 + k latent frames, and decodes back to 1 + k * s_t;
- long videos can be encoded/decoded in chunks that carry each conv's last input frames
  across chunk borders (`chunk_frames`), giving the one-shot result with flat memory.

Temporal down-sampling keeps frame 0 alone without a special case: a causal conv with kernel
k_t and stride s_t, padded k_t - 1 frames on the past side, turns 1 + k*s_t frames into
1 + k, and output j reads input frames (j*s_t - k_t + 1) .. (j*s_t): output 0 sees only
(copies of) frame 0. Temporal up-sampling mirrors it: a causal conv predicts s_t frames per
latent frame (depth-to-time), and the first s_t - 1 of the very first latent frame are
dropped, so latent frame 0 decodes to the single frame 0 and latent j >= 1 to frames
(j-1)*s_t + 1 .. j*s_t.

Normalisation is a channel-wise RMSNorm at every (f, h, w) position (or none): it has no
statistics across time or space, so chunked encode/decode is exact and spatial tiles differ
from the one-shot result only by the receptive field cut at tile borders (GroupNorm would also
couple tiles and chunks through its statistics). No attention anywhere: memory is linear in
F*H*W. Down/up-sampling and the latent projections carry parameter-free shortcuts (average
pooling, repetition, channel-group means), as in DC-AE's residual autoencoding.

Streaming state (the per-conv cache of past frames) lives on the CausalConv3d modules and is
only kept inside `CausalVAE._streaming`, which clears it on exit; outside it every call is
stateless. It is not thread-safe to stream two videos through one model at once, and
chunking is meant for no-grad encoding/decoding: activation checkpointing would recompute a
chunk without its cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import Tensor, nn

from sora_train.models.vae.base import VideoVAE
from sora_train.utils.errors import SoraError

# LDM's clamp: keeps exp(logvar) finite in fp16/bf16 at init and under bad batches.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# Initial posterior log-variance (std ~0.05): the decoder sees the signal, not unit noise,
# from step 0, which matters for short runs; the KL term moves it from there as weighted.
INIT_LOGVAR = -6.0


class DiagonalGaussian:
    """Posterior q(z | x) = N(mean, exp(logvar)), each (B, Cz, f, h, w)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample; `generator` must live on the same device as `mean`."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps  # (B, Cz, f, h, w)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) in nats, summed over C, f, h, w: shape (B,).

        Summed (not averaged) so it is the true per-sample KL; `losses.kl_loss` divides by
        the number of pixel values to put it on the scale of a per-pixel reconstruction loss.
        """
        mean, logvar = self.mean.float(), self.logvar.float()  # a sum over every latent value: fp32 even for a bf16 VAE
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, Cz, f, h, w)
        return kl.flatten(1).sum(dim=1)  # (B,)


# ----------------------------------------------------------------------------- building blocks


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else (int(v[0]), int(v[1]), int(v[2]))


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads time on the past side only (replicating frame 0) and space symmetrically.

    With temporal kernel k_t and stride s_t, output frame j reads padded inputs j*s_t ..
    j*s_t + k_t - 1, i.e. original frames j*s_t - k_t + 1 .. j*s_t. Streaming: the next chunk
    needs the last k_t - s_t padded input frames of this one, which are cached in `past`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int] = 3, stride: int | Sequence[int] = 1):
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        super().__init__(in_channels, out_channels, (kt, kh, kw), stride=(st, sh, sw), padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1
        self.cache_frames = max(kt - st, 0)
        self.streaming = False
        self.past: Tensor | None = None  # last `cache_frames` padded input frames of the previous chunk

    def forward(self, x: Tensor) -> Tensor:  # (B, C, F, H, W)
        if self.time_pad > 0:
            if self.past is None:
                pad = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)  # (B, C, k_t-1, H, W), frame 0 repeated
            else:
                pad = self.past  # (B, C, k_t-s_t, H, W) from the previous chunk
            x = torch.cat([pad, x], dim=2)  # (B, C, pad + F, H, W)
            if self.streaming:
                # clone, not a view: a view would keep this whole chunk's input alive.
                self.past = x[:, :, x.shape[2] - self.cache_frames :].clone()
        return super().forward(x)  # (B, C', (F-1)//s_t + 1, H', W') for the first chunk


class ChannelRMSNorm(nn.Module):
    """RMS-normalise over channels at each (f, h, w), with a learned gain and bias.

    Per-position, so it adds no coupling across frames or tiles (see the module docstring).
    Computed in fp32 for bf16/fp16 safety.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, F, H, W)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=1, keepdim=True) + self.eps)  # (B, C, F, H, W)
        shape = (1, -1, 1, 1, 1)
        return (xf * self.weight.view(shape) + self.bias.view(shape)).to(x.dtype)


NORMS = ("rms", "none")


def make_norm(kind: str, channels: int) -> nn.Module:
    """"rms": ChannelRMSNorm; "none": identity (norm-free, relying on zero-init residuals)."""
    return ChannelRMSNorm(channels) if kind == "rms" else nn.Identity()


class ResBlock3d(nn.Module):
    """norm -> SiLU -> causal 3x3x3 conv, twice, plus a (1x1x1-projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "rms"):
        super().__init__()
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = make_norm(norm, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, F, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, F, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, F, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve H and W; with `temporal`, also 1 + 2k frames -> 1 + k (frame 0 stays alone).

    Strided causal conv plus a parameter-free shortcut, a causal average pool over the same
    cells: frame 0 alone, then frame pairs (2j-1, 2j). The shortcut keeps the encoder
    residual end to end (DC-AE's "residual autoencoding", Chen et al. 2024); it sped up
    early training here (20.7 vs 18.4 dB after 125 overfitting steps on the debug size).
    """

    time_factor = 2

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        kt, st = (3, self.time_factor) if temporal else (1, 1)
        self.conv = CausalConv3d(channels, channels, (kt, 3, 3), stride=(st, 2, 2))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, F, H, W)
        first_chunk = self.conv.past is None  # read before the conv fills the cache
        out = self.conv(x)  # (B, C, F', H/2, W/2), F' = (F-1)//2 + 1 (first chunk) or F/2
        st = self.time_factor if self.temporal else 1
        if self.temporal and first_chunk:
            x = torch.cat([x[:, :, :1], x], dim=2)  # (B, C, F+1, H, W): frame 0 pooled with itself
        pooled = reduce(x, "b c (f t) (h p) (w q) -> b c f h w", "mean", t=st, p=2, q=2)  # (B, C, F', H/2, W/2)
        return out + pooled  # einops, not avg_pool3d: the latter lacks bf16 on CPU


class Upsample(nn.Module):
    """Double H and W; with `temporal`, also 1 + k frames -> 1 + 2k (mirror of Downsample)."""

    time_factor = 2

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        if temporal:
            # predicts `time_factor` output frames per input frame (depth-to-time).
            self.time_conv = CausalConv3d(channels, channels * self.time_factor, (3, 1, 1))
        self.conv = CausalConv3d(channels, channels, (1, 3, 3))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, f, H, W)
        shortcut = x  # parameter-free path: nearest-neighbour in time and space (see Downsample)
        if self.temporal:
            s = self.time_factor
            first_chunk = self.time_conv.past is None  # read before the conv fills the cache
            x = self.time_conv(x)  # (B, C*s, f, H, W)
            x = rearrange(x, "b (c s) f h w -> b c (f s) h w", s=s)  # (B, C, f*s, H, W)
            shortcut = shortcut.repeat_interleave(s, dim=2)  # (B, C, f*s, H, W)
            if first_chunk:  # latent frame 0 -> the single frame 0
                x, shortcut = x[:, :, s - 1 :], shortcut[:, :, s - 1 :]  # (B, C, 1 + (f-1)*s, H, W)
        x = repeat(x, "b c f h w -> b c f (h p) (w q)", p=2, q=2)  # (B, C, F, 2H, 2W), nearest
        shortcut = repeat(shortcut, "b c f h w -> b c f (h p) (w q)", p=2, q=2)  # (B, C, F, 2H, 2W)
        return self.conv(x) + shortcut


class Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, base_channels: int, channel_mults: Sequence[int], num_res_blocks: int, temporal_downsample: Sequence[bool], patch_size: int, norm: str):
        super().__init__()
        chans = [base_channels * m for m in channel_mults]
        self.patch_size = patch_size
        self.conv_in = CausalConv3d(in_channels * patch_size**2, chans[0], 3)
        layers: list[nn.Module] = []
        ch = chans[0]
        for level, level_ch in enumerate(chans):
            for _ in range(num_res_blocks):
                layers.append(ResBlock3d(ch, level_ch, norm))
                ch = level_ch
            if level < len(chans) - 1:
                layers.append(Downsample(ch, temporal=temporal_downsample[level]))
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(ResBlock3d(ch, ch, norm), ResBlock3d(ch, ch, norm))
        self.norm_out = make_norm(norm, ch)
        self.conv_out = CausalConv3d(ch, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, F, H, W)
        p = self.patch_size
        x = rearrange(x, "b c f (h p) (w q) -> b (c p q) f h w", p=p, q=p)  # (B, 3*p*p, F, H/p, W/p)
        h = self.conv_in(x)  # (B, c0, F, H/p, W/p)
        h = self.down(h)  # (B, c_top, f, h, w)
        h = self.mid(h)  # (B, c_top, f, h, w)
        h = self.norm_out(h)  # (B, c_top, f, h, w)
        moments = self.conv_out(F.silu(h))  # (B, 2*Cz, f, h, w)
        # shortcut into the mean: average each group of c_top/Cz channels (DC-AE's space-to-channel residual)
        cz = moments.shape[1] // 2
        mean_shortcut = rearrange(h, "b (z g) f h w -> b z g f h w", z=cz).mean(dim=2)  # (B, Cz, f, h, w)
        return torch.cat([moments[:, :cz] + mean_shortcut, moments[:, cz:]], dim=1)  # (B, 2*Cz, f, h, w)


class Decoder(nn.Module):
    def __init__(self, latent_channels: int, out_channels: int, base_channels: int, channel_mults: Sequence[int], num_res_blocks: int, temporal_downsample: Sequence[bool], patch_size: int, norm: str):
        super().__init__()
        chans = [base_channels * m for m in channel_mults]
        self.patch_size = patch_size
        ch = chans[-1]
        self.conv_in = CausalConv3d(latent_channels, ch, 3)
        self.mid = nn.Sequential(ResBlock3d(ch, ch, norm), ResBlock3d(ch, ch, norm))
        layers: list[nn.Module] = []
        for level in reversed(range(len(chans))):
            for _ in range(num_res_blocks + 1):  # one more than the encoder, as in LDM
                layers.append(ResBlock3d(ch, chans[level], norm))
                ch = chans[level]
            if level > 0:
                layers.append(Upsample(ch, temporal=temporal_downsample[level - 1]))
        self.up = nn.Sequential(*layers)
        self.norm_out = make_norm(norm, ch)
        self.conv_out = CausalConv3d(ch, out_channels * patch_size**2, 3)

    def forward(self, z: Tensor) -> Tensor:  # (B, Cz, f, h, w)
        groups = self.conv_in.out_channels // z.shape[1]
        h = self.conv_in(z) + z.repeat_interleave(groups, dim=1)  # (B, c_top, f, h, w); shortcut mirrors the encoder's
        h = self.mid(h)  # (B, c_top, f, h, w)
        h = self.up(h)  # (B, c0, F, H/p, W/p)
        x = self.conv_out(F.silu(self.norm_out(h)))  # (B, 3*p*p, F, H/p, W/p)
        p = self.patch_size
        return rearrange(x, "b (c p q) f h w -> b c f (h p) (w q)", p=p, q=p)  # (B, 3, F, H, W)


# ----------------------------------------------------------------------------- tiling helpers


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size); the last one ends at `size`."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool, device: torch.device) -> Tensor:
    """1-D blend weight of a tile, ramping over `overlap` positions on sides that meet another tile.

    The outer quarter of the overlap gets weight 0 (those outputs saw zero padding instead of
    the neighbour's pixels), the middle half ramps linearly, so two tiles overlapping by
    exactly `overlap` sum to 1 there.
    """
    w = torch.ones(length, device=device)
    n = min(overlap, length)
    if n > 0:
        margin = n // 4
        i = torch.arange(n, device=device, dtype=torch.float32)
        ramp = ((i + 0.5 - margin) / (n - 2 * margin)).clamp(0.0, 1.0)  # (n,)
        if ramp_start:
            w[:n] = torch.minimum(w[:n], ramp)
        if ramp_end:
            w[length - n :] = torch.minimum(w[length - n :], ramp.flip(0))
    return w


# ----------------------------------------------------------------------------- the model


class CausalVAE(VideoVAE):
    """Causal 3D convolutional VAE.

    Args:
        in_channels: pixel channels (3); the decoder outputs the same number.
        latent_channels: Cz.
        base_channels: channels of the first level; level i has base_channels * channel_mults[i].
        channel_mults: one entry per level; every level after the first halves H and W, so
            spatial_factor = 2 ** (len(channel_mults) - 1).
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        temporal_downsample: one flag per level transition (len(channel_mults) - 1); True also
            halves time there, so temporal_factor = 2 ** sum(temporal_downsample).
        patch_size: space-to-depth factor applied to the pixels before the first conv (and
            undone after the last), so spatial_factor = patch_size * 2 ** (len(channel_mults) - 1).
            2 runs the first level at half resolution, ~4x cheaper.
        norm: "rms" (channel RMSNorm, the default) or "none". In short CPU runs on 17x32x32
            moving-shape clips (shapes size, AdamW, batch 8) norm-free learned faster at lr
            1e-3 (23.2 dB PSNR after 220 steps vs 19.8 dB after 300 for "rms") but diverged
            at lr 2e-3, where "rms" trained stably (as it did from 5e-4 to 5e-3).
        latent_shift, latent_scale: per-channel latent statistics for the diffusion model
            (see `normalize`); default 0 and 1. Stored as buffers, so they travel with the weights.
    """

    display_name = "the causal VAE"

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temporal_downsample: Sequence[bool] = (False, True, True),
        patch_size: int = 1,
        norm: str = "rms",
        latent_shift: Sequence[float] | None = None,
        latent_scale: Sequence[float] | None = None,
    ):
        super().__init__()
        channel_mults = [int(m) for m in channel_mults]
        temporal_downsample = [bool(t) for t in temporal_downsample]
        if norm not in NORMS:
            raise SoraError(f"norm={norm!r}: expected one of {list(NORMS)}")
        if not channel_mults or any(m <= 0 for m in channel_mults):
            raise SoraError(f"channel_mults={channel_mults}: expected a non-empty list of positive ints")
        if len(temporal_downsample) != len(channel_mults) - 1:
            raise SoraError(
                f"temporal_downsample has {len(temporal_downsample)} flags: expected {len(channel_mults) - 1} (one per level transition of channel_mults={channel_mults})"
            )
        top = int(base_channels) * channel_mults[-1]
        if int(latent_channels) <= 0 or top % int(latent_channels) != 0:
            raise SoraError(f"latent_channels={latent_channels}: must divide the top level's width base_channels*channel_mults[-1]={top} (the latent shortcut averages channel groups)")
        for name, v in (("in_channels", in_channels), ("latent_channels", latent_channels), ("base_channels", base_channels), ("num_res_blocks", num_res_blocks), ("patch_size", patch_size)):
            if int(v) <= 0:
                raise SoraError(f"{name}={v}: must be a positive int")
        self.in_channels = int(in_channels)
        self.latent_channels = int(latent_channels)
        self.base_channels = int(base_channels)
        self.channel_mults = channel_mults
        self.num_res_blocks = int(num_res_blocks)
        self.temporal_downsample = temporal_downsample
        self.patch_size = int(patch_size)
        self.norm = str(norm)
        self.spatial_factor = self.patch_size * 2 ** (len(channel_mults) - 1)
        self.temporal_factor = 2 ** sum(temporal_downsample)

        self.encoder = Encoder(self.in_channels, 2 * self.latent_channels, self.base_channels, channel_mults, self.num_res_blocks, temporal_downsample, self.patch_size, self.norm)
        self.decoder = Decoder(self.latent_channels, self.in_channels, self.base_channels, channel_mults, self.num_res_blocks, temporal_downsample, self.patch_size, self.norm)
        self.register_buffer("latent_shift", self._stat("latent_shift", latent_shift, 0.0))
        self.register_buffer("latent_scale", self._stat("latent_scale", latent_scale, 1.0))
        self.initialize_weights()

    def _stat(self, name: str, values: Sequence[float] | None, default: float) -> Tensor:
        if values is None:
            return torch.full((self.latent_channels,), default)
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        if t.shape != (self.latent_channels,):
            raise SoraError(f"{name} has {t.numel()} values: expected latent_channels={self.latent_channels}")
        return t

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialise every weight; called by the constructor.

        - Convs: PyTorch's default kaiming-uniform (a=sqrt(5)) weights, zero biases. Zero bias
          keeps the model's output a function of the input alone at init.
        - Norms: gain 1, bias 0 (plain RMS normalisation).
        - The encoder's log-variance outputs start at INIT_LOGVAR (bias), a near-deterministic
          posterior, so early reconstructions are not drowned in sampling noise.
        - The second conv of every residual block is zero: each block starts as its skip
          path, so the deep conv stack is well-conditioned from step 0 (as Fixup / DiT's
          adaLN-Zero do for residual branches).
        Down/up-sampling and the latent in/out convs also have parameter-free shortcuts
        (average pooling / nearest repetition / channel-group mean and repeat), so at init the
        whole encoder and decoder are close to a pooling/unpooling pipeline plus residuals.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.reset_parameters()
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ChannelRMSNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock3d):
                nn.init.zeros_(m.conv2.weight)
        nn.init.constant_(self.encoder.conv_out.bias[self.latent_channels :], INIT_LOGVAR)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, video: Tensor, chunk_frames: int | None = None, tile: int | None = None, tile_overlap: int | None = None) -> DiagonalGaussian:
        """Encode (B, 3, F, H, W) in [-1, 1] into the posterior over (B, Cz, f, h, w).

        Args:
            chunk_frames: stream time in chunks to bound memory: the first chunk has
                1 + chunk_frames frames, later ones chunk_frames (a multiple of
                temporal_factor). Equal to the one-shot result up to float rounding.
                For no-grad use (see the module docstring on checkpointing).
            tile: encode spatial tiles of tile x tile pixels (a multiple of spatial_factor)
                and blend them linearly over `tile_overlap` pixels (default tile // 4,
                rounded down to a multiple of spatial_factor). Approximate: latents near tile
                borders see zero padding instead of the neighbouring pixels.
        """
        self._check_video(video)
        if chunk_frames is not None and (int(chunk_frames) <= 0 or chunk_frames % self.temporal_factor != 0):
            raise SoraError(f"chunk_frames={chunk_frames}: must be a positive multiple of the VAE's temporal_factor={self.temporal_factor}")
        moments = self._tiled(video, lambda x: self._stream(self.encoder, x, chunk_frames), tile, tile_overlap, upscale=False)
        mean, logvar = moments.chunk(2, dim=1)  # (B, Cz, f, h, w) each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor, chunk_frames: int | None = None, tile: int | None = None, tile_overlap: int | None = None) -> Tensor:
        """Decode (B, Cz, f, h, w) (un-normalised, see `denormalize`) into (B, 3, F, H, W).

        Args:
            chunk_frames: in *latent* frames: the first chunk has 1 + chunk_frames latent
                frames, later ones chunk_frames. Exact.
            tile, tile_overlap: in *pixels*, as for `encode` (the latent tile is tile // spatial_factor).
        """
        self._check_latent(z)
        if chunk_frames is not None and int(chunk_frames) <= 0:
            raise SoraError(f"chunk_frames={chunk_frames}: must be a positive number of latent frames")
        return self._tiled(z, lambda x: self._stream(self.decoder, x, chunk_frames), tile, tile_overlap, upscale=True)

    @contextlib.contextmanager
    def _streaming(self, module: nn.Module) -> Iterator[None]:
        """Make every causal conv in `module` carry its past frames from call to call."""
        convs = [m for m in module.modules() if isinstance(m, CausalConv3d)]
        for c in convs:
            c.streaming, c.past = True, None
        try:
            yield
        finally:
            for c in convs:
                c.streaming, c.past = False, None

    def _stream(self, net: nn.Module, x: Tensor, chunk_frames: int | None) -> Tensor:
        """Run `net` over time in causal chunks (1 + n, then n frames), or in one go."""
        if chunk_frames is None or x.shape[2] <= 1 + chunk_frames:
            return net(x)
        bounds = [0, 1 + chunk_frames, *range(1 + 2 * chunk_frames, x.shape[2], chunk_frames), x.shape[2]]
        with self._streaming(net):
            outs = [net(x[:, :, a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs, dim=2)  # (B, C', F', H', W')

    def _tiled(self, x: Tensor, fn: Callable[[Tensor], Tensor], tile: int | None, tile_overlap: int | None, upscale: bool) -> Tensor:
        """Apply `fn` to overlapping spatial tiles of `x` and blend the outputs linearly (see `_ramp`).

        `tile` / `tile_overlap` are in pixels; for decoding (upscale=True) the input tiles are
        in latent units and the blending happens in pixel space.
        """
        if tile is None:
            return fn(x)
        sf = self.spatial_factor
        overlap = max(sf, (tile // 4) // sf * sf) if tile_overlap is None else tile_overlap
        if tile <= 0 or tile % sf != 0:
            raise SoraError(f"tile={tile}: must be a positive multiple of the VAE's spatial_factor={sf}")
        if overlap < 0 or overlap % sf != 0 or overlap >= tile:
            raise SoraError(f"tile_overlap={overlap}: must be a multiple of spatial_factor={sf} in [0, tile={tile})")
        # input-side sizes (pixels for encode, latents for decode) and the output/input ratio
        t_in, ov_in = (tile // sf, overlap // sf) if upscale else (tile, overlap)
        H, W = x.shape[-2:]
        if H <= t_in and W <= t_in:
            return fn(x)

        def scale(n: int) -> int:
            return n * sf if upscale else n // sf

        ov_out = scale(ov_in)
        out = weight = None
        ys, xs = _tile_starts(H, t_in, t_in - ov_in), _tile_starts(W, t_in, t_in - ov_in)
        for y0 in ys:
            for x0 in xs:
                y1, x1 = min(y0 + t_in, H), min(x0 + t_in, W)
                piece = fn(x[..., y0:y1, x0:x1])  # (B, C', F', th', tw')
                if out is None:
                    out = piece.new_zeros(*piece.shape[:3], scale(H), scale(W))  # (B, C', F', H', W')
                    weight = piece.new_zeros(1, 1, 1, scale(H), scale(W))
                ph, pw = piece.shape[-2:]
                wy = _ramp(ph, ov_out, y0 > 0, y1 < H, piece.device)
                wx = _ramp(pw, ov_out, x0 > 0, x1 < W, piece.device)
                w = (wy[:, None] * wx[None, :]).to(piece.dtype)  # (th', tw')
                oy, ox = scale(y0), scale(x0)
                out[..., oy : oy + ph, ox : ox + pw] += piece * w
                weight[..., oy : oy + ph, ox : ox + pw] += w
        return out / weight

    def config(self) -> dict:
        """Constructor kwargs (plain JSON types): `CausalVAE(**vae.config())` rebuilds this model."""
        return {
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "base_channels": self.base_channels,
            "channel_mults": list(self.channel_mults),
            "num_res_blocks": self.num_res_blocks,
            "temporal_downsample": list(self.temporal_downsample),
            "patch_size": self.patch_size,
            "norm": self.norm,
            "latent_shift": [float(v) for v in self.latent_shift.tolist()],
            "latent_scale": [float(v) for v in self.latent_scale.tolist()],
        }


@torch.no_grad()
def compute_latent_stats(vae: nn.Module, batches: Iterable[Tensor | dict], max_batches: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and 1/std of the encoded latents (posterior mode) over some batches.

    Works with any model exposing `encode(video).mode()` and `latent_channels` (the pretrained
    adapters too). Batches are (B, 3, F, H, W) tensors or DataModule dicts with a "video" key.
    Returns (shift, scale), each (Cz,) float32; apply with `vae.set_latent_stats(shift, scale)`.
    """
    if max_batches < 1:
        raise SoraError(f"max_batches={max_batches}: must be >= 1")
    device = next(vae.parameters()).device
    c = vae.latent_channels
    total = torch.zeros(c, dtype=torch.float64, device=device)
    total_sq = torch.zeros(c, dtype=torch.float64, device=device)
    count = 0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        video = batch["video"] if isinstance(batch, dict) else batch
        z = vae.encode(video.to(device)).mode().double()  # (B, Cz, f, h, w)
        total += z.sum(dim=(0, 2, 3, 4))
        total_sq += z.pow(2).sum(dim=(0, 2, 3, 4))
        count += z.numel() // c
    if count == 0:
        raise SoraError("compute_latent_stats: `batches` yielded no data")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    if torch.any(std < 1e-8):
        raise SoraError(f"compute_latent_stats: latent channel(s) {torch.nonzero(std < 1e-8).flatten().tolist()} have zero variance")
    return mean.float().cpu(), (1.0 / std).float().cpu()


__all__ = ["CausalConv3d", "CausalVAE", "DiagonalGaussian", "compute_latent_stats"]
