"""A built-in, trainable text encoder that needs no download: the ``debug`` size for tests,
the demo and the shapes world.

Tokenizer: lowercase, split on anything that is not a letter or digit, and map each word to
``2 + blake2b(word) mod (vocab_size - 2)``. The hash is stable across processes and machines
(python's ``hash()`` is salted per process), so cached ids and checkpoints stay valid. Id 0 is
padding and id 1 the start token every caption begins with, so "" still has one token.
Hash collisions merge rare words; at the vocab sizes used for captions of the shapes world
(a few dozen words) they do not happen in practice.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sora_train.models.text.base import TextEncoder
from sora_train.utils.errors import SoraError
from sora_train.utils.kwargs import constructor_kwargs

PAD_ID = 0
START_ID = 1
_FIRST_WORD_ID = 2  # ids below this are reserved for PAD and START
_WORD = re.compile(r"[^\W_]+")  # runs of unicode letters/digits


def word_id(word: str, vocab_size: int) -> int:
    """Stable id of one (already lowercased) word in ``[2, vocab_size)``."""
    digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
    return _FIRST_WORD_ID + int.from_bytes(digest, "little") % (vocab_size - _FIRST_WORD_ID)


def hash_tokenize(text: str, vocab_size: int, max_length: int) -> list[int]:
    """``[START, word ids...]`` truncated to ``max_length`` tokens (start token included)."""
    words = _WORD.findall(text.lower())
    return [START_ID] + [word_id(w, vocab_size) for w in words[: max_length - 1]]


class _Block(nn.Module):
    """Pre-norm transformer encoder block: x + attn(LN(x)); x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x))  # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, N, D/heads)
        # Keys that are padding are masked out; every row has a START key, so no row is empty.
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, N) broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, D/heads)
        x = x + self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class TinyTextEncoder(TextEncoder):
    """Hashing word tokenizer + learned embeddings + a small pre-norm transformer encoder."""

    def __init__(
        self,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        vocab_size: int = 4096,
        max_length: int = 64,
        pad_to_max_length: bool = False,
        trainable: bool = True,
    ):
        super().__init__()
        if dim <= 0 or dim % num_heads != 0:
            raise SoraError(f"TinyTextEncoder: dim={dim} must be positive and divisible by num_heads={num_heads}")
        if depth < 0:
            raise SoraError(f"TinyTextEncoder: depth={depth} must be >= 0")
        if vocab_size <= _FIRST_WORD_ID:
            raise SoraError(f"TinyTextEncoder: vocab_size={vocab_size} must be > {_FIRST_WORD_ID} (pad and start ids)")
        if max_length < 1:
            raise SoraError(f"TinyTextEncoder: max_length={max_length} must be >= 1 (the start token)")
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.pad_to_max_length = pad_to_max_length
        self.trainable = bool(trainable)

        self.tok_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Parameter(torch.zeros(max_length, dim))
        self.blocks = nn.ModuleList([_Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # GPT-2 style: small normal embeddings keep the residual stream O(1) at init;
        # linears get xavier so attention logits start near uniform; biases zero.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) long and mask (B, L) bool, on the module's device."""
        if isinstance(captions, str):
            raise SoraError("TinyTextEncoder: captions must be a list of strings, got a single str")
        seqs = [hash_tokenize(c, self.vocab_size, self.max_length) for c in captions]
        length = self.max_length if self.pad_to_max_length else max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), length), PAD_ID, dtype=torch.long)  # (B, L)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        device = self.tok_emb.weight.device
        return ids.to(device), (ids != PAD_ID).to(device)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenize(captions)  # (B, L), (B, L)
        L = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb[:L]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)  # (B, L, D)
        x = self.norm(x) * mask[..., None]  # (B, L, D); padding zeroed so cache round trips are exact
        return x, mask

    def config(self) -> dict[str, Any]:
        return constructor_kwargs(self)
