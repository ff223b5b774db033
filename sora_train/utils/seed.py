"""Seeding that covers python, numpy and torch (CPU and CUDA)."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> int:
    import torch  # lazy: data tools import utils and should not pay torch's start-up

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed
