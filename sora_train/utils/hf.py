"""Local Hugging Face models (the HF text encoders, the HF re-writer): transformers imported
lazily with one install hint, and the dtype names such a model is loaded in.

Imports neither torch nor transformers itself, so the re-writer package stays light to import.
"""

from __future__ import annotations

from types import ModuleType

from sora_train.utils.errors import SoraError

INSTALL_HINT = "pip install 'sora_train[text]'"
# torch dtype names (torch.<name>) a local model may be loaded in. float16 is offered for
# CLIP-style encoders stored in it; T5 overflows in float16 (use bfloat16).
HF_DTYPES = ("float32", "bfloat16", "float16")


def import_transformers(who: str) -> ModuleType:
    """``transformers``, or a SoraError saying that ``who`` needs it and how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SoraError(f"{who} needs the 'transformers' package: {INSTALL_HINT}") from e
    return transformers


def check_hf_dtype(who: str, dtype: str) -> str:
    """``dtype`` if it is one of HF_DTYPES, else a SoraError naming ``who``."""
    if dtype not in HF_DTYPES:
        raise SoraError(f"{who}: dtype={dtype!r} is not one of {list(HF_DTYPES)}")
    return dtype
