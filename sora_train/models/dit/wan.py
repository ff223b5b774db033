"""Wan2.1 text-to-video as a base model: diffusers' `WanTransformer3DModel`, used as it is,
behind the `DiT` interface the training task, the sampler and exports code against.

    dit = load_wan_dit("/models/Wan2.1-T2V-1.3B-Diffusers")   # the pipeline folder
    v = dit(x, t, text, text_mask)                              # (B, 16, f, h, w) velocity

What the adapter does, and nothing else — each item is a convention of Wan's own pipeline
(diffusers `WanPipeline`), followed exactly so a base model samples as its authors sampled it:
- timestep scale: t in [0, 1] (1 = noise, our flow convention, the same as Wan's sigma) is
  passed as t * 1000 (`FlowMatchEulerDiscreteScheduler.num_train_timesteps`);
- text: the encoder's tokens, zero past each caption's length, zero-padded to ``text_len``
  (512 for the public models) and attended *without* a mask, as `WanPipeline` does;
- velocity: Wan predicts noise - x0, our convention already (x_t = (1 - t) x0 + t eps).
Latent normalisation is the VAE adapter's (models/vae/pretrained.py) and the timestep shift
and guidance are the sampler's (diffusion/samplers.py, schedule "flow_match_euler").

Another diffusers video transformer (LTX-Video, CogVideoX, HunyuanVideo) plugs in the same
way: one module like this one mapping (x, t, text, text_mask) to the model's call, and one
conf/dit YAML (docs/architecture.md, "Public backbones").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sora_train.models.local_folder import check_component, check_pipeline_folder
from sora_train.utils.errors import SoraError

# Wan's transformer reads timesteps in [0, num_train_timesteps]: sigma * 1000.
WAN_TIMESTEP_SCALE = 1000.0
# WanPipeline's max_sequence_length: every caption is zero-padded to 512 UMT5 tokens.
WAN_TEXT_LEN = 512
WAN_PIPELINES = ("WanPipeline",)
WAN_TRANSFORMER = "WanTransformer3DModel"
# Sub-folder -> accepted classes of a Wan2.1 T2V pipeline folder (() = no config.json to check).
WAN_COMPONENTS = {
    "transformer": (WAN_TRANSFORMER,),
    "vae": ("AutoencoderKLWan",),
    "text_encoder": ("UMT5EncoderModel", "umt5"),
    "tokenizer": (),
}
# peft targets: every attention projection (self and cross) and the MLP of each block — the
# names diffusers' Wan LoRAs use, so an exported adapter loads with `load_lora_weights`.
WAN_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def import_diffusers(who: str):
    try:
        import diffusers
    except ImportError as e:  # optional dependency
        raise SoraError(f"{who} needs the diffusers package: pip install 'sora_train[pretrained]'") from e
    return diffusers


def transformer_folder(path: str | Path) -> Path:
    """The transformer/ folder of a Wan pipeline folder (checked), or ``path`` itself when it
    is a transformer folder."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file() and not (p / "model_index.json").is_file():
        return check_component(p, (WAN_TRANSFORMER,), what="transformer")
    return check_pipeline_folder(p, WAN_PIPELINES, {"transformer": WAN_COMPONENTS["transformer"]}) / "transformer"


class WanDiT(nn.Module):
    """Diffusers' `WanTransformer3DModel` behind the DiT interface.

    Args:
        transformer: the transformer's diffusers config (its config.json); None reads it from
            ``base_path``. An export records it, and its weights, so nothing else is needed.
        text_len: captions are zero-padded to this many tokens (Wan: 512).
        base_path: the Wan folder (or its transformer/) the model came from; recorded only.
        load_weights: load ``base_path``'s weights (fine-tuning starts here); False builds
            the architecture for weights that come from an export.
    """

    # Its LoRAs are also exported in diffusers' format (models/lora.py), for Wan pipelines.
    diffusers_lora = True

    def __init__(self, transformer: dict[str, Any] | None = None, text_len: int = WAN_TEXT_LEN, base_path: str | None = None,
                 load_weights: bool = False):
        super().__init__()
        diffusers = import_diffusers("WanDiT")
        cls = diffusers.WanTransformer3DModel
        if transformer is None or load_weights:
            if base_path is None:
                raise SoraError("WanDiT: needs a transformer config or base_path (a Wan2.1 diffusers folder)")
            folder = transformer_folder(base_path)
            if load_weights:
                self.transformer = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32)
            else:
                self.transformer = cls.from_config(json.loads((folder / "config.json").read_text()))
        else:
            if not isinstance(transformer, dict) or transformer.get("_class_name", WAN_TRANSFORMER) != WAN_TRANSFORMER:
                raise SoraError(f"WanDiT: transformer config must be a {WAN_TRANSFORMER} config mapping")
            self.transformer = cls.from_config(dict(transformer))
        cfg = self.transformer.config
        if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
            raise SoraError("WanDiT: an image-to-video Wan transformer (image_dim set); only text-to-video is supported")
        if text_len < 1:
            raise SoraError(f"WanDiT: text_len={text_len} must be >= 1")
        self.text_len = int(text_len)
        self.base_path = None if base_path is None else str(base_path)
        self.in_channels = int(cfg.in_channels)
        self.out_channels = int(cfg.out_channels or cfg.in_channels)
        self.text_dim = int(cfg.text_dim)
        self.patch_size = tuple(int(p) for p in cfg.patch_size)
        self.hidden_size = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.depth = int(cfg.num_layers)
        self.cond_channels = 0  # text-to-video: no context frames

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's; a model built on the meta device (`merged_copy`) gets its rotary
        tables, which are computed rather than stored, rebuilt where its weights landed."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        rope = self.transformer.rope
        if any(b.is_meta for b in rope.buffers()):
            with torch.device(next(self.parameters()).device):
                self.transformer.rope = type(rope)(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
        return result

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: (B, C, f, h, w) noisy latent (Wan-normalised); h, w divisible by the patch.
            t: (B,) float timesteps in [0, 1], 1 = pure noise.
            text: (B, L, text_dim) token embeddings, L <= text_len.
            text_mask: (B, L) bool, True = real token.
            cond_mask: must be None or all False (Wan2.1 T2V takes no context frames).
        Returns:
            (B, C, f, h, w) predicted velocity.
        """
        B, C, f, h, w = x.shape
        if C != self.in_channels:
            raise SoraError(f"WanDiT: x has C={C} channels, the transformer takes {self.in_channels}")
        pt, ph, pw = self.patch_size
        if f % pt or h % ph or w % pw:
            raise SoraError(f"WanDiT: latent {f}x{h}x{w} is not divisible by the patch {self.patch_size}")
        if cond_mask is not None and bool(cond_mask.any()):
            raise SoraError("WanDiT: Wan2.1 text-to-video takes no context frames (cond_mask); use mode=t2v or edit")
        L = text.shape[1]
        if text.shape[0] != B or text.shape[2] != self.text_dim or text_mask.shape != text.shape[:2]:
            raise SoraError(f"WanDiT: text must be (B, L, {self.text_dim}) with a (B, L) mask, got {tuple(text.shape)} and {tuple(text_mask.shape)}")
        if L > self.text_len:
            if bool(text_mask[:, self.text_len:].any()):
                raise SoraError(f"WanDiT: captions of more than text_len={self.text_len} tokens; set the text encoder's max_length to {self.text_len}")
            text, text_mask, L = text[:, : self.text_len], text_mask[:, : self.text_len], self.text_len
        text = text * text_mask[..., None].to(text.dtype)  # (B, L, D): padding is zeros, as in WanPipeline
        text = F.pad(text, (0, 0, 0, self.text_len - L))  # (B, text_len, D); attended unmasked, as in WanPipeline
        timestep = t.float() * WAN_TIMESTEP_SCALE  # (B,)
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]  # (B, C, f, h, w)

    # ---- accounting ---------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            for m in (self.transformer.patch_embedding, self.transformer.condition_embedder):
                n -= sum(p.numel() for p in m.parameters())
        return n

    def flops_per_step(self, num_tokens: int, text_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs for one sample (2 per multiply-add). Wan always attends to text_len
        text tokens, whatever the captions' lengths. Per block: 8ND^2 + 4N^2D (self-attention),
        4ND^2 + 4LD^2 + 4NLD (cross-attention), 4NDM (MLP); once: patch embed, output
        projection, text MLP 2L(TD + D^2), time MLP and its 6D projection. training=True: 3x."""
        cfg = self.transformer.config
        N, L, D, M, T = num_tokens, self.text_len, self.hidden_size, int(cfg.ffn_dim), self.text_dim
        p = math.prod(self.patch_size)
        block = 8 * N * D * D + 4 * N * N * D + 4 * N * D * D + 4 * L * D * D + 4 * N * L * D + 4 * N * D * M
        once = 2 * N * p * self.in_channels * D + 2 * N * D * p * self.out_channels + 2 * L * (T * D + D * D)
        once += 2 * (int(cfg.freq_dim) * D + D * D) + 2 * D * 6 * D
        forward = self.depth * block + once
        return float(3 * forward if training else forward)

    def config(self) -> dict[str, Any]:
        """Constructor kwargs (JSON): the transformer's own config, so an export rebuilds it
        without the base folder; the weights come with the export."""
        cfg = {k: v for k, v in dict(self.transformer.config).items() if not k.startswith("_") or k == "_class_name"}
        cfg = json.loads(json.dumps(cfg, default=list))  # tuples -> lists, FrozenDict -> dict
        return {"transformer": cfg, "text_len": self.text_len, "base_path": self.base_path}


def load_wan_dit(path: str, in_channels: int | None = None, text_dim: int | None = None, text_len: int = WAN_TEXT_LEN) -> WanDiT:
    """The pretrained Wan2.1 transformer of a local diffusers folder (conf/dit/wan2.1.yaml).

    ``in_channels`` / ``text_dim`` (from the VAE and text encoder, as every DiT factory gets
    them) are checked against the transformer's: a Wan transformer paired with another VAE
    or text encoder is refused here rather than failing at the first batch."""
    dit = WanDiT(text_len=text_len, base_path=str(path), load_weights=True)
    if in_channels is not None and int(in_channels) != dit.in_channels:
        raise SoraError(f"{path}: the Wan transformer takes {dit.in_channels} latent channels, the VAE gives {in_channels}; use the folder's own vae/")
    if text_dim is not None and int(text_dim) != dit.text_dim:
        raise SoraError(f"{path}: the Wan transformer reads {dit.text_dim}-wide text, the text encoder gives {text_dim}; use the folder's own text_encoder/")
    return dit


@torch.no_grad()
def load_wan_lora(dit: WanDiT, path: str | Path, scale: float = 1.0) -> WanDiT:
    """Fold a LoRA in diffusers' format (what our Wan exports write as
    pytorch_lora_weights.safetensors, and what diffusers' Wan LoRAs are) into ``dit``'s weights.

    Every layer it names must be a Linear of this transformer with the shapes it was trained
    on: a LoRA of another base (another size, another model) is one SoraError naming the file
    and the first layer that does not fit, before any weight changes."""
    from safetensors.torch import load_file

    from sora_train.models.local_folder import check_safetensors

    path = Path(path)
    check_safetensors(path)
    state = load_file(str(path))
    layers = {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    if not layers:
        raise SoraError(f"{path}: no '<layer>.lora_A.weight' tensors; expected a LoRA in diffusers' format (pytorch_lora_weights.safetensors)")
    modules = dict(dit.named_modules())
    deltas = {}
    for layer in sorted(layers):
        name = layer if layer in modules else f"transformer.{layer}" if f"transformer.{layer}" in modules else None
        a, b = state[f"{layer}.lora_A.weight"], state.get(f"{layer}.lora_B.weight")
        linear = modules.get(name) if name else None
        if not isinstance(linear, nn.Linear):
            raise SoraError(f"{path}: a LoRA of another base: {layer!r} is not a Linear layer of this {WAN_TRANSFORMER}")
        if b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(linear.weight.shape):
            raise SoraError(f"{path}: a LoRA of another base: {layer!r} adapts a {tuple(b.shape)[:1] + tuple(a.shape)[1:]} weight, "
                            f"this model's is {tuple(linear.weight.shape)}")
        deltas[name] = (b.float() @ a.float()) * scale
    for name, delta in deltas.items():
        weight = modules[name].weight
        weight.add_(delta.to(weight.device, weight.dtype))
    return dit


__all__ = ["WAN_COMPONENTS", "WAN_LORA_TARGETS", "WAN_PIPELINES", "WAN_TEXT_LEN", "WAN_TIMESTEP_SCALE", "WanDiT", "load_wan_dit", "load_wan_lora"]
