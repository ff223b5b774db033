"""Random-number state in checkpoints, so a resumed run draws what an uninterrupted one would.

Training draws from the global generators: caption dropout, conditioning masks, timesteps and
noise (torch), the VAE posterior sample, anything in python's ``random`` or numpy. Lightning
saves none of them, and ``seed_everything`` on restart would replay step 1's draws at step
N+1. This callback keeps, per rank, the state each generator had after the last optimizer step
and puts it back at the start of the next training batch:

- in a checkpoint: the states of every rank (gathered; DDP writes rank 0's file only), so a
  resume with the same world size continues each rank's stream exactly;
- between steps: whatever runs between two training batches (validation, sampling, a
  checkpoint save, a new DataLoader iterator drawing its base seed) cannot shift the training
  stream, so the draws of step N+1 are the same whether or not the run was restarted at N.

With more than one rank, each rank is first reseeded from ``(seed, rank)``: otherwise every
rank draws the same timesteps and noise for its different data.

Stored as tensors and ints only, so checkpoints stay readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from sora_train.utils.logging import get_logger

log = get_logger(__name__)


def collect_rng_state() -> dict[str, Any]:
    """This process's generator states: python, numpy, torch CPU, and the current CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one GPU per rank
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``collect_rng_state``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors, ints and floats only: loadable with ``torch.load(weights_only=True)``."""
    py_version, py_state, py_gauss = state["python"]
    n = state["numpy"]
    out = dict(state)
    out["python"] = {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss}
    out["numpy"] = {"key": torch.from_numpy(n["state"]["key"].astype(np.int64)), "pos": int(n["state"]["pos"]),
                    "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])}
    return out


def from_checkpoint(saved: dict[str, Any]) -> dict[str, Any]:
    py, n = saved["python"], saved["numpy"]
    state = dict(saved)
    state["python"] = (int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    state["numpy"] = {"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
                      "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])}
    return state


def seed_rank(seed: int, rank: int) -> None:
    """Seed python, numpy and torch (+CUDA) of this process from (seed, rank)."""
    derived = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


class RNGState(pl.Callback):
    """Args:
        seed: the run's seed; with several ranks each is reseeded from (seed, rank) at setup.
            None: leave the ranks as Lightning seeded them (all the same).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._state: dict[str, Any] | None = None  # this rank's state after the last training batch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The ranks of a sequence-parallel group work on one sample: one stream per group.
        sp = max(1, int(getattr(pl_module, "sequence_parallel_size", 1)))
        if stage == "fit" and self.seed is not None and trainer.world_size // sp > 1:
            seed_rank(self.seed, trainer.global_rank // sp)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._state is not None:
            set_rng_state(self._state)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning runs checkpoint callbacks last, so a save in this hook sees this state.
        self._state = collect_rng_state()

    def state_dict(self) -> dict[str, Any]:
        mine = to_checkpoint(self._state if self._state is not None else collect_rng_state())
        states = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Every rank is inside Trainer.save_checkpoint here (it is collective), so this pairs up.
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, mine)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("ranks") or []
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if world > 1 else 0
        if len(states) != world:
            log.warning("checkpoint holds random states of %d rank(s) but this run has %d: random draws after resume "
                        "differ from the interrupted run (the data order does not)", len(states), world)
            self._state = None
            return
        self._state = from_checkpoint(states[rank])
