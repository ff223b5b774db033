"""The training recipe: a task built from its typed parts, and its export.

Everything here takes built objects; ``sora_train.cli.build`` is the one place that turns a
composed config into them. Order of what ``build_dit_task`` does:

1. the frozen VAE: from ``vae_ckpt`` (an export), else the ``init_from`` export's, else (smoke
   runs) the configured one, untrained;
2. ``init_from``: an export's DiT (its EMA when it has one) *with the export's own
   architecture* — fine-tuning any export needs no restated sizes — and its text encoder, the
   one the DiT learned to read;
3. the task (``DiTModule``) around them;
4. LoRA adapters (peft) in the DiT's blocks, every other weight frozen;
5. the parallelism seam (``apply_parallelism``): activation checkpointing, then compile, per
   block; sharding comes last and is the strategy's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

log = get_logger("sora_train.recipe")

# Config values that may come from the environment (${oc.env:...}): the run records what they
# were, so sora-export rebuilds the same model in a shell where those variables differ.
RUN_PATH_KEYS = ("vae_ckpt", "init_from", "paths.data_dir", "data.train_shards", "data.val_shards")
RUN_PATHS_FILE = "run_paths.json"  # in RUN_DIR/.hydra, next to Hydra's unresolved config.yaml


@dataclass
class Parallelism:
    """How the trained model is wrapped before the strategy shards it (config ``parallel``).

    Args:
        activation_checkpointing: recompute each transformer block in backward instead of
            keeping its activations (about one more forward per step; the 10x memory lever
            for video, see docs/strategies.md).
        compile: ``torch.compile`` each block (off by default: compile time dominates short
            and CPU runs).
        sequence_parallel_size: split each sample's tokens over this many ranks (Ulysses,
            ``sora_train.parallel.sequence``); applied when the process group exists
            (``DiTModule.setup``), after the two above.
    """

    activation_checkpointing: bool = False
    compile: bool = False
    sequence_parallel_size: int = 1


def is_vae_task(task: Callable[..., Any]) -> bool:
    """Whether the task (a class or a partial of one) trains the VAE."""
    from sora_train.training.vae_module import VAEModule

    cls = getattr(task, "func", task)
    return isinstance(cls, type) and issubclass(cls, VAEModule)


def load_part(export: str | Path, name: str, what: str) -> nn.Module:
    from sora_train.models.export import load_parts

    part = load_parts(export, [name])[0].get(name)
    if part is None:
        raise SoraError(f"{what}={export}: the export holds no {name!r} part")
    return part


def build_vae_task(task: Callable[..., Any], *, vae: nn.Module, optimizer: Callable, scheduler: Callable | None = None,
                   init_from: str | None = None, gradient_clip_val: float | None = None):
    """The VAE task; ``init_from``: start from an export's VAE weights."""
    if init_from:
        vae.load_state_dict(load_part(init_from, "vae", "init_from").state_dict())
        log.info("VAE initialised from %s", init_from)
    return task(vae=vae, optimizer=optimizer, scheduler=scheduler, gradient_clip_val=gradient_clip_val)


def build_dit_task(task: Callable[..., Any], *, dit: Callable[..., nn.Module] | nn.Module, text: nn.Module, flow: Any, optimizer: Callable,
                   scheduler: Callable | None = None, vae: nn.Module | None = None, vae_ckpt: str | None = None, init_from: str | None = None,
                   lora: dict | None = None, parallel: Parallelism | None = None, control: Any = None):
    """The DiT task with every part in place (see the module docstring for the order).

    Args:
        task: ``DiTModule`` or a partial of it holding the task's own options.
        dit: a DiT or the config's factory ``(in_channels, text_dim) -> DiT``; ignored in favour
            of the export's architecture with ``init_from``.
        text: the text encoder (replaced by the export's with ``init_from``, keeping this
            one's ``trainable``).
        vae: the VAE to use when ``vae_ckpt`` is not set (smoke runs: an untrained VAE).
        lora: ``{rank, alpha, dropout, target_modules}`` or None.
        control: box motion control (``training.box_control.BoxControl``) or None: the DiT
            (the export's too) gains its box embedder before LoRA and parallelism wrap it.
    """
    from sora_train.models.export import load_parts, part_names

    parts: dict[str, nn.Module] = {}
    if init_from:  # the EMA when the export has one, else the DiT: never both
        trained = "ema" if "ema" in part_names(init_from) else "dit"
        parts, _ = load_parts(init_from, [trained, "text", "vae"])
    if vae_ckpt:
        vae = load_part(vae_ckpt, "vae", "vae_ckpt")
    elif "vae" in parts:  # the VAE the export's DiT was trained with
        vae = parts["vae"]
    elif vae is not None:
        log.warning("vae_ckpt is not set: the DiT trains in the latent space of an untrained VAE (fine for smoke tests only)")
    elif init_from:
        raise SoraError(f"init_from={init_from}: the export holds no 'vae' part; set vae_ckpt to the VAE export its DiT was trained with")
    if init_from:
        src = parts.get("ema") or parts.get("dit")
        if src is None:
            raise SoraError(f"init_from={init_from}: the export holds no 'dit' or 'ema' part")
        dit = src.train()  # the export's own architecture and weights
        if "text" in parts:
            trainable = getattr(text, "trainable", False)
            text = parts["text"]
            text.trainable = trainable
            text.requires_grad_(trainable)
        log.info("initialised from %s (%s, %.1f M parameters)", init_from, type(dit).__name__, sum(p.numel() for p in dit.parameters()) / 1e6)
    extra: dict[str, Any] = {}
    if control is not None:
        if not isinstance(dit, nn.Module):
            dit = dit(in_channels=vae.latent_channels, text_dim=text.dim) if vae is not None else dit
        if not isinstance(dit, nn.Module):
            raise SoraError("control=boxes needs a VAE (vae_ckpt or init_from) to size the DiT before it gains box control")
        control.attach(dit)
        extra["box_control"] = control
    module = task(vae=vae, text_encoder=text, dit=dit, flow=flow, optimizer=optimizer, scheduler=scheduler, **extra)
    if lora:
        from sora_train.models.lora import add_lora

        # Adapters into the DiT's block Linears; every other weight, the text encoder's too, frozen.
        settings = add_lora(module.dit, **dict(lora))
        if control is not None:  # the box embedder is new: it trains beside the adapters
            for p in module.dit.box_embedder.parameters():
                p.requires_grad_(True)
        module.freeze_text_encoder()
        trainable = sum(p.numel() for p in module.dit.parameters() if p.requires_grad)
        log.info("LoRA rank %d: %.2f M trainable of %.2f M DiT parameters", settings["rank"], trainable / 1e6, sum(p.numel() for p in module.dit.parameters()) / 1e6)
    if parallel is not None:
        from sora_train.parallel.strategies import apply_parallelism

        apply_parallelism(module.dit, activation_checkpointing=parallel.activation_checkpointing, compile=parallel.compile)
        module.sequence_parallel_size = int(parallel.sequence_parallel_size)
    return module


# -- export ---------------------------------------------------------------------------------------
def export_task(module: Any, out_dir: str | Path, *, datamodule: Any, step: int | None = None, latent_stats_batches: int = 8,
                lora: dict | None = None, train_shards: str | None = None) -> Path:
    """Write an export (model.json + model.safetensors, what sora-sample and init_from read).

    VAE task: the VAE with latent scale/shift measured on ``latent_stats_batches`` training
    batches. DiT task: VAE, text encoder, DiT and EMA, the flow settings as plain data, the
    training clip shape and the options the training data was written with (sora-eval shapes
    reads its held-out pairs); a LoRA run exports plain models with the adapters folded in,
    plus ``adapter.safetensors``.
    """
    from sora_train.models.export import export_parts, save_safetensors_atomic
    from sora_train.models.lora import has_lora, lora_state_dict, merged_copy
    from sora_train.training.vae_module import VAEModule

    out = Path(out_dir)
    step = int(module.global_step if step is None else step)
    if isinstance(module, VAEModule):
        from sora_train.data.transforms import video_to_float
        from sora_train.models.vae import compute_latent_stats

        loader = datamodule.train_dataloader()
        batches = (video_to_float(b["video"]) for b in loader)  # straight from the loader: uint8
        shift, scale = compute_latent_stats(module.vae, batches, max_batches=int(latent_stats_batches))
        module.vae.set_latent_stats(shift, scale)
        return export_parts(out, {"vae": module.vae}, {"task": "vae", "step": step})

    diffusion = module.flow.config()
    meta: dict[str, Any] = {"task": "dit", "step": step, "sampler": dict(diffusion["sampler"]), "diffusion": diffusion}
    buckets = datamodule.make_buckets()
    first = (buckets.video or buckets.buckets)[0]
    meta["train_shape"] = {"num_frames": first.num_frames, "height": first.height, "width": first.width}
    # every shape trained on (images are 1xHxW): sora-eval shapes --shapes tells seen from unseen shapes by it
    meta["train_buckets"] = [b.name for b in buckets.buckets]
    if train_shards:
        from sora_train.data.shards import read_index

        try:  # the shapes world's held-out pairs; for latent shards, those of the video set they were cached from
            index = read_index(train_shards)
            meta["train_data"] = index.get("source_options") or index.get("options") or {}
        except (SoraError, TypeError, OSError):
            pass
    parts = {"vae": module.vae, "text": module.text_encoder, "dit": module.dit}
    if getattr(module, "ema", None) is not None:
        parts["ema"] = module.ema
    # A text encoder or VAE rebuilt from its own folder (config "path": HF text encoders, a
    # public base's VAE and UMT5) is exported as config only.
    weights = {"text": not module.text_encoder.config().get("path"), "vae": not module.vae.config().get("path")}
    adapter = diffusers_adapter = None
    if has_lora(module.dit):
        trained = module.ema if "ema" in parts else module.dit
        adapter = lora_state_dict(trained)
        if getattr(module.dit, "diffusers_lora", False):  # a public base's: also as diffusers' load_lora_weights reads it
            from sora_train.models.lora import diffusers_lora_state_dict

            diffusers_adapter = diffusers_lora_state_dict(trained)
        parts = {k: merged_copy(m) if k in ("dit", "ema") else m for k, m in parts.items()}
        meta["lora"] = dict(lora) if lora else True
    out = export_parts(out, parts, meta, weights=weights)
    if adapter is not None:
        save_safetensors_atomic(adapter, out / "adapter.safetensors")
        if diffusers_adapter is not None:
            from sora_train.models.lora import DIFFUSERS_LORA_NAME

            save_safetensors_atomic(diffusers_adapter, out / DIFFUSERS_LORA_NAME)
    return out


def load_checkpoint_weights(module: Any, ckpt: str | Path, ema_attr: str = "dit") -> tuple[int | None, list[str]]:
    """Load a run checkpoint (Lightning ``.ckpt`` or DeepSpeed ZeRO directory, any world size)
    into ``module``, read with ``weights_only=True``; returns (the checkpoint's global step,
    the frozen parts whose weights it held).

    Frozen parts are not in checkpoints (they come back from vae_ckpt / text.path / the seed);
    checkpoints from before that hold them, and their keys are loaded into those parts. A VAE
    run's discriminator is not part of the model.
    """
    import copy

    from sora_train.parallel.consolidate import read_checkpoint_weights
    from sora_train.utils.exports import is_derived_key

    state, meta = read_checkpoint_weights(ckpt)
    loaded = []
    for name in getattr(module, "_frozen", {}):
        prefix = f"{name}."
        old = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        if old:
            getattr(module, name).load_state_dict(old)
            loaded.append(name)
    for key in [k for k in state if k.startswith("loss.")]:
        del state[key]
    if any(k.startswith("ema.") for k in state) and getattr(module, "ema", None) is None:
        module.ema = copy.deepcopy(getattr(module, ema_attr)).requires_grad_(False).eval()
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_derived_key(k)]
    if missing or unexpected:
        raise SoraError(f"{ckpt} does not match the model of the run's config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    step = meta.get("global_step")
    return (int(step) if step is not None else None), loaded


# -- what a run resolved from its environment ------------------------------------------------------
def record_run_paths(values: dict[str, Any], run_dir: str | Path) -> Path:
    """Write the resolved RUN_PATH_KEYS values (paths only, never secrets) to RUN_DIR/.hydra."""
    from sora_train.utils.io import atomic_write_json

    unknown = sorted(set(values) - set(RUN_PATH_KEYS))
    if unknown:
        raise SoraError(f"record_run_paths: {unknown[0]!r} is not a path key ({', '.join(RUN_PATH_KEYS)})")
    return atomic_write_json(Path(run_dir) / ".hydra" / RUN_PATHS_FILE, values)


def read_run_paths(run_dir: str | Path) -> dict[str, Any]:
    """What ``record_run_paths`` wrote ({} for runs from before it was recorded)."""
    path = Path(run_dir) / ".hydra" / RUN_PATHS_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except ValueError as e:
        raise SoraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise SoraError(f"{path}: expected a JSON object of paths")
    return {k: v for k, v in values.items() if k in RUN_PATH_KEYS}
