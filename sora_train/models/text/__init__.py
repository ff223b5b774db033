"""Text encoders: captions -> (embeddings (B, L, D), mask (B, L)) for the DiT's cross-attention.

``TinyTextEncoder`` is built in (trainable, no download); ``HFTextEncoder`` loads a frozen
T5/UMT5/CLIP text model from a local folder (needs ``pip install 'sora_train[text]'``).
"""

from sora_train.models.text.base import TextEncoder
from sora_train.models.text.hf import HFTextEncoder
from sora_train.models.text.tiny import TinyTextEncoder, hash_tokenize

__all__ = ["HFTextEncoder", "TextEncoder", "TinyTextEncoder", "hash_tokenize"]
