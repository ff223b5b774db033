"""Small shared helpers: rank-zero logging, seeding, atomic writes, content hashing, errors."""

from sora_train.utils.errors import SoraError
from sora_train.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes, sha256_file, stable_hash
from sora_train.utils.logging import get_logger, is_rank_zero
from sora_train.utils.seed import seed_everything

__all__ = [
    "SoraError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "get_logger",
    "is_rank_zero",
    "seed_everything",
    "sha256_bytes",
    "sha256_file",
    "stable_hash",
]
