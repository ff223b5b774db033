"""LoRA fine-tuning of any model of this package, through peft.

`add_lora` injects low-rank adapters (peft's ``inject_adapter_in_model``, no ``PeftModel``
wrapper, so the model keeps its own forward, ``config()`` and FLOP accounting) into the
chosen Linear layers and freezes everything else. `merged_state_dict` folds the adapters
back into the base weights: the export of a LoRA run is a plain model that ``sora-sample``
and ``init_from`` read like any other, and `lora_state_dict` is the adapter alone (a few MB,
written next to the export as ``adapter.safetensors``).

Names: with adapters injected, a layer ``blocks.0.attn.qkv`` holds ``base_layer.weight`` (the
frozen original) and ``lora_A.default.weight`` (r x in) / ``lora_B.default.weight`` (out x r).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sora_train.utils.errors import SoraError

ADAPTER = "default"
# The DiT's Linear layers inside the transformer blocks: self-attention qkv and output,
# cross-attention q, kv and output, MLP. Embedders, modulation and the final layer stay frozen.
DIT_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "mlp.fc1", "mlp.fc2")


def add_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DIT_TARGETS,
) -> dict[str, Any]:
    """Inject LoRA adapters into ``model`` in place and freeze every other parameter.

    ``target_modules``: suffixes of Linear layer names (peft's matching: a name equal to or
    ending in ``.<suffix>``). ``alpha`` defaults to ``rank`` (scale 1). B starts at zero, so
    the model computes exactly what it did before. Returns the LoRA settings (for the export).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # an optional extra
        raise SoraError("LoRA fine-tuning needs peft: pip install 'sora_train[lora]'") from e
    if rank < 1:
        raise SoraError(f"lora.rank must be >= 1, got {rank}")
    targets = list(target_modules)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise SoraError(f"lora.target_modules {missing} match no Linear layer of {type(model).__name__}")
    settings = {"rank": int(rank), "alpha": float(rank if alpha is None else alpha), "dropout": float(dropout), "target_modules": targets}
    config = LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"], target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_name(name))
    return settings


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_lora(model: nn.Module) -> bool:
    return any(is_lora_name(n) for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (names as in the injected model)."""
    return {k: v.detach() for k, v in model.state_dict().items() if is_lora_name(k)}


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model without adapters, each LoRA delta (B @ A * alpha / r) added
    to its base weight: it loads into a freshly built model of the same config."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER)
    out = {}
    for k, v in model.state_dict().items():
        if is_lora_name(k):
            continue
        v = v.detach()
        if k in deltas:
            v = v + deltas[k].to(v.dtype)
        out[k.replace(".base_layer.", ".")] = v
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain model (same class and ``config()``) with the adapters folded in, in eval mode."""
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no config() to rebuild it from")
    with torch.device("meta"):
        plain = type(model)(**model.config())
    plain.load_state_dict(merged_state_dict(model), assign=True)
    return plain.eval()


# A LoRA of a public base model (Wan2.1), in the file diffusers' `load_lora_weights` finds in a
# folder by default.
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"


@torch.no_grad()
def diffusers_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' peft format: ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight``
    with the layer names of the model (a `WanDiT`'s start with ``transformer.``, as diffusers'
    Wan LoRAs do). B carries the scale alpha / r, so a reader that assumes alpha = r (diffusers
    without metadata, ComfyUI) computes the same delta."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            out[f"{name}.lora_A.weight"] = module.lora_A[ADAPTER].weight.detach().clone()
            out[f"{name}.lora_B.weight"] = module.lora_B[ADAPTER].weight.detach() * module.scaling[ADAPTER]
    if not out:
        raise SoraError(f"{type(model).__name__} holds no LoRA adapters to export")
    return out
