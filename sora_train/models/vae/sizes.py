"""Named CausalVAE sizes: the one place their numbers live. `conf/vae/<size>.yaml` names a
size and nothing else (`build_vae(size=...)`); a test checks options and sizes match.

| size               | space / time | Cz | params | use                                             |
|--------------------|--------------|----|--------|-------------------------------------------------|
| debug              | 4x / 2x      | 4  | 0.17M  | tests; milliseconds per clip on CPU             |
| shapes             | 4x / 2x      | 4  | 0.47M  | the demo's 17x32x32 shapes-world clips, on CPU  |
| standard_4x8x8_16c | 8x / 4x      | 16 | 59.3M  | real footage; the compression of current open video models |

`param_count(size)` computes the exact number without allocating weights (debug 165,091;
shapes 467,620; standard_4x8x8_16c 59,339,107).
"""

from __future__ import annotations

import inspect

import torch

from sora_train.models.vae.causal_vae import CausalVAE
from sora_train.utils.errors import SoraError

VAE_SIZES: dict[str, dict] = {
    # Tiny: every code path (temporal + spatial down/up-sampling, chunk cache) at toy width.
    "debug": dict(latent_channels=4, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, False)),
    # 17x32x32 clips -> 9x8x8x4 latents (24x compression), sized for a 2-core CPU: ~0.5 s
    # per training step on 8 clips with one thread. patch_size=2 runs the first level at
    # 16x16, which cuts the step time ~4x against a 3-level net of the same factors.
    "shapes": dict(latent_channels=4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, temporal_downsample=(True,), patch_size=2),
    # 4x temporal, 8x8 spatial, 16 channels (48x compression). Time is halved at the two
    # deeper transitions, so full-resolution layers keep every frame (motion detail).
    "standard_4x8x8_16c": dict(latent_channels=16, base_channels=64, channel_mults=(1, 2, 4, 4), num_res_blocks=2, temporal_downsample=(False, True, True)),
}


def build_vae(size: str, **overrides) -> CausalVAE:
    """CausalVAE of a named size; `overrides` replace constructor kwargs (e.g. latent_channels).

    An override of None keeps the size's value (or the CausalVAE default): conf/vae/_base_/vae.yaml
    lists the size's keys as null so that ``vae.latent_channels=8`` is a plain override.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if size not in VAE_SIZES:
        raise SoraError(f"vae size {size!r}: unknown, expected one of {sorted(VAE_SIZES)}")
    allowed = set(inspect.signature(CausalVAE.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise SoraError(f"vae override {unknown[0]!r}: not a CausalVAE argument, expected one of {sorted(allowed)}")
    return CausalVAE(**{**VAE_SIZES[size], **overrides})


def param_count(size: str, **overrides) -> int:
    """Parameters of a named size, counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_vae(size, **overrides).num_params()
