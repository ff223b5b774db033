"""Who reads which data when ranks are grouped: the sequence-parallel layout, recorded once.

With sequence parallelism of size P the P consecutive ranks of a group split one sample's
tokens, so they must read the same batches: loaders shard data by the *data-parallel* rank
(rank // P) over the data-parallel world (world // P). ``sora_train.parallel.sequence`` sets
this when it builds the groups; everything else only reads it.
"""

from __future__ import annotations

from typing import Any

_SP: dict[str, Any] = {"group": None, "size": 1, "rank": 0}


ENV = "SORA_SEQUENCE_PARALLEL_SIZE"  # read by DataLoader workers, which have no process group


def set_sequence_parallel(group: Any, size: int, rank: int) -> None:
    import os

    _SP.update(group=group, size=int(size), rank=int(rank))
    os.environ[ENV] = str(int(size))


def sequence_parallel() -> tuple[Any, int, int]:
    """(group, size, this rank's index in it); (None, 1, 0) without sequence parallelism."""
    return _SP["group"], _SP["size"], _SP["rank"]


def data_parallel_rank_world() -> tuple[int, int]:
    """(rank, world) for sharding data: the process group's, divided by the SP size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    size = _SP["size"]
    return dist.get_rank() // size, dist.get_world_size() // size
