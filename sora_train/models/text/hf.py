"""Frozen pretrained text encoders (T5 / mT5 / UMT5 encoder, CLIP text tower) from a local folder.

Nothing is downloaded: ``path`` is a folder written by ``save_pretrained`` (``config.json`` +
weights + tokenizer files), or a diffusers pipeline folder holding ``text_encoder/`` and
``tokenizer/``. ``transformers`` is imported lazily so the rest of the package works without it.

The encoder is frozen: parameters have ``requires_grad=False``, the module stays in eval mode
whatever ``.train()`` is called with, and ``forward`` runs under ``no_grad``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sora_train.models.text.base import TextEncoder
from sora_train.utils.errors import SoraError
from sora_train.utils.hf import check_hf_dtype, import_transformers
from sora_train.utils.kwargs import constructor_kwargs

# model_type in config.json -> the transformers class that loads only the text encoder.
# A full T5ForConditionalGeneration or CLIPModel folder loads too: the extra weights are skipped.
_ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip_text_model": "CLIPTextModel",
    "clip": "CLIPTextModel",
}


def resolve_folders(path: str | Path, tokenizer_path: str | Path | None) -> tuple[Path, Path]:
    """(model folder, tokenizer folder); accepts a diffusers pipeline root as well."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SoraError(f"text encoder path={str(path)!r} is not a folder (expected a local save_pretrained folder)")
    if (root / "config.json").is_file():
        model_dir, default_tok = root, root
    elif (root / "text_encoder" / "config.json").is_file():
        model_dir, default_tok = root / "text_encoder", root / "tokenizer"
    else:
        raise SoraError(
            f"text encoder path={str(path)!r} is not a model folder: no config.json (nor text_encoder/config.json)"
        )
    tok_dir = Path(tokenizer_path).expanduser() if tokenizer_path is not None else default_tok
    if not tok_dir.is_dir():
        raise SoraError(f"text encoder tokenizer_path={str(tok_dir)!r} is not a folder")
    return model_dir, tok_dir


class HFTextEncoder(TextEncoder):
    """A frozen T5/UMT5/CLIP text encoder loaded with transformers from ``path``.

    Args:
        path: local model folder (see module docstring).
        max_length: tokens per caption after truncation (special tokens included).
        dtype: "float32" | "bfloat16" | "float16" for weights and outputs. T5 overflows in
            float16; use bfloat16 on GPUs that have it.
        kind: "auto" (read ``model_type`` from config.json) or one of t5, mt5, umt5, clip.
        tokenizer_path: tokenizer folder when it is not ``path`` itself.
        pad_to_max_length: see ``TextEncoder``.
    """

    def __init__(
        self,
        path: str,
        max_length: int = 256,
        dtype: str = "float32",
        kind: str = "auto",
        tokenizer_path: str | None = None,
        pad_to_max_length: bool = False,
    ):
        super().__init__()
        check_hf_dtype("HFTextEncoder", dtype)
        if max_length < 1:
            raise SoraError(f"HFTextEncoder: max_length={max_length} must be >= 1")
        model_dir, tok_dir = resolve_folders(path, tokenizer_path)
        transformers = import_transformers("HFTextEncoder")

        try:
            hf_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a usable model folder"
            raise SoraError(f"text encoder path={str(path)!r}: cannot read config.json ({e})") from e
        model_type = getattr(hf_config, "model_type", None)
        if kind == "auto":
            kind = model_type
        if kind not in _ENCODER_CLASSES:
            raise SoraError(
                f"HFTextEncoder: kind={kind!r} (model_type in {model_dir}/config.json) is not one of {sorted(_ENCODER_CLASSES)}"
            )
        cls = getattr(transformers, _ENCODER_CLASSES[kind])
        try:
            model = cls.from_pretrained(model_dir, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise SoraError(f"text encoder path={str(path)!r}: cannot load {cls.__name__} or its tokenizer ({e})") from e

        text_config = getattr(model.config, "text_config", None) or model.config
        limit = getattr(text_config, "max_position_embeddings", None)  # CLIP has absolute positions (77)
        if kind.startswith("clip") and limit is not None and max_length > limit:
            raise SoraError(f"HFTextEncoder: max_length={max_length} exceeds this CLIP model's {limit} positions")

        self.path = str(path)
        self.tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self.kind = kind
        self.dtype_name = dtype
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.trainable = False
        self.dim = int(getattr(text_config, "d_model", None) or text_config.hidden_size)
        self.tokenizer = tokenizer
        self.model = model.to(getattr(torch, dtype))
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "HFTextEncoder":
        # Frozen: dropout stays off even when the surrounding LightningModule calls .train().
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str):
            raise SoraError("HFTextEncoder: captions must be a list of strings, got a single str")
        tokens = self.tokenizer(
            list(captions),
            padding="max_length" if self.pad_to_max_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids = tokens["input_ids"].to(device)  # (B, L)
        mask = tokens["attention_mask"].to(device).bool()  # (B, L)
        # A tokenizer without start/end tokens gives "" no token at all; keep one position
        # valid so cross-attention never sees an all-masked row.
        mask[:, 0] = True
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        emb = emb * mask[..., None].to(emb.dtype)  # (B, L, D); zero padding for exact cache round trips
        return emb, mask

    def config(self) -> dict[str, Any]:
        return constructor_kwargs(self, dtype=self.dtype_name)
