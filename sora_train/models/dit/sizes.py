"""DiT size registry: name -> constructor kwargs (everything except in_channels / text_dim).

The one place a size's numbers live: `conf/dit/<size>.yaml` names the size and nothing else
(`dit=1B`), and tests/models/test_dit.py fails when options and sizes disagree.

Parameter counts are approximate and checked on the meta device in tests (in_channels=16,
text_dim=4096). Per block a DiT with cross-attention holds about 16*D^2 parameters:
4D^2 self-attention, 4D^2 cross-attention, 8D^2 MLP (ratio 4), plus 6D^2 adaLN with
per-block modulation. The GPU sizes (100M and up) share one adaLN projection across blocks
(adaLN-single, as PixArt-alpha and Wan2.1): a quarter fewer parameters and optimizer state,
and one step at 1,024 tokens as fast as Wan2.1's (bench/bench_dit_vs_wan.py). The CPU sizes
keep DiT's per-block adaLN, whose cost there is negligible.
Head dim stays 64-128 so 3D RoPE has enough frequencies per axis.
"""

from __future__ import annotations

import inspect

from sora_train.utils.errors import SoraError

from .dit import DiT

DIT_SIZES: dict[str, dict] = {
    # Tiny: milliseconds per step on CPU, for unit tests.
    "debug": dict(hidden_size=64, depth=2, num_heads=2, patch_size=(1, 2, 2)),
    # The CPU demo / quality runs on the shapes world (~9M params with a small text encoder).
    "shapes": dict(hidden_size=256, depth=6, num_heads=4, patch_size=(1, 2, 2)),
    # ~100M: single-GPU experiments.
    "100M": dict(hidden_size=640, depth=12, num_heads=10, patch_size=(1, 2, 2), modulation="shared"),
    # ~1B.
    "1B": dict(hidden_size=1536, depth=26, num_heads=12, patch_size=(1, 2, 2), modulation="shared"),
    # ~3B.
    "3B": dict(hidden_size=2304, depth=34, num_heads=18, patch_size=(1, 2, 2), modulation="shared"),
}

_DIT_ARGS = set(inspect.signature(DiT.__init__).parameters) - {"self"}


def build_dit(size: str, in_channels: int, text_dim: int, **overrides) -> DiT:
    """Build a DiT of a registered size; overrides replace any constructor kwarg.

    An override of None keeps the size's value (or the DiT default): conf/dit/_base_/dit.yaml
    lists the size's keys as null so that ``dit.hidden_size=...`` is a plain override.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if size not in DIT_SIZES:
        raise SoraError(f"dit size={size!r} is unknown; choose one of {sorted(DIT_SIZES)}")
    unknown = sorted(set(overrides) - _DIT_ARGS)
    if unknown:
        raise SoraError(f"dit option {unknown[0]!r} is not a DiT argument; valid: {sorted(_DIT_ARGS)}")
    kwargs = {**DIT_SIZES[size], **overrides, "in_channels": in_channels, "text_dim": text_dim}
    return DiT(**kwargs)
