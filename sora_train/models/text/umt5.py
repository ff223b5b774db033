"""Wan2.1's text encoder: the frozen UMT5 encoder and tokenizer of a Wan diffusers folder,
reading captions exactly as `WanPipeline` does.

    text = WanTextEncoder("/models/Wan2.1-T2V-1.3B-Diffusers")   # text_encoder/ + tokenizer/
    emb, mask = text(["a red ball rolls left"])                     # (B, L, 4096), (B, L)

Wan's conventions: the prompt is cleaned (HTML entities unescaped twice, ftfy when installed,
whitespace collapsed: diffusers' `prompt_clean`), tokenized with the end token, truncated at
512 tokens, and the encoder output is zero past each caption's length. The zero-padding to 512
that Wan's transformer expects is the DiT adapter's (models/dit/wan.py), so batches and cached
embeddings carry only the valid tokens.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from sora_train.models.text.hf import HFTextEncoder
from sora_train.utils.errors import SoraError

WAN_MAX_LENGTH = 512  # WanPipeline's max_sequence_length


def wan_prompt_clean(text: str) -> str:
    """diffusers' `prompt_clean` of the Wan pipelines (ftfy's fix_text when it is installed)."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder(HFTextEncoder):
    """A frozen UMT5 encoder read from a Wan folder (``path``: the pipeline root, or a folder
    with the model's config.json and ``tokenizer_path``); arguments as `HFTextEncoder`, plus
    ``sha256``: the model and tokenizer folders' hash (checked when given, computed on the
    first `config()`), so an export that records the path refuses a folder that changed."""

    def __init__(self, path: str, max_length: int = WAN_MAX_LENGTH, dtype: str = "float32", kind: str = "umt5",
                 tokenizer_path: str | None = None, pad_to_max_length: bool = False, sha256: str | None = None):
        from sora_train.models.local_folder import check_component

        root = Path(path).expanduser()
        if (root / "model_index.json").is_file():  # a pipeline folder: both components must be whole
            check_component(root / "text_encoder", ("UMT5EncoderModel", "umt5"), what="text_encoder")
            check_component(root / "tokenizer", (), what="tokenizer")
        super().__init__(path, max_length=max_length, dtype=dtype, kind=kind, tokenizer_path=tokenizer_path, pad_to_max_length=pad_to_max_length)
        self.sha256 = None
        if sha256:
            self.sha256 = self.folders_sha256()
            if self.sha256 != sha256:
                raise SoraError(f"{path}: the text encoder's files changed since the export was written (sha256 {self.sha256[:12]}…, "
                                f"recorded {sha256[:12]}…); point it at the folder the model was trained with")

    def folders_sha256(self) -> str:
        """sha256 of the model folder's and the tokenizer folder's files."""
        import hashlib

        from sora_train.models.local_folder import folder_sha256
        from sora_train.models.text.hf import resolve_folders

        model_dir, tok_dir = resolve_folders(self.path, self.tokenizer_path)
        return hashlib.sha256(f"{folder_sha256(model_dir)}|{folder_sha256(tok_dir)}".encode()).hexdigest()

    def config(self) -> dict[str, Any]:
        if self.sha256 is None:
            self.sha256 = self.folders_sha256()
        return super().config()

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str):
            return super().forward(captions)  # the parent's one-line error
        return super().forward([wan_prompt_clean(c) for c in captions])


__all__ = ["WAN_MAX_LENGTH", "WanTextEncoder", "wan_prompt_clean"]
