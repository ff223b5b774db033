"""sora-plan: will this training config fit on a GPU? Memory per rank, before any cluster hours.

  sora-plan experiment=pretrain_1B --gpu-mem 80
  sora-plan experiment=pretrain_1B --gpu-mem 80 --gpus 8 strategy=deepspeed_stage_3
  sora-plan experiment=pretrain_100M --gpu-mem 24 --frames 65 --height 256 --width 256 parallel.activation_checkpointing=true

Composes the config as sora-train does (same overrides), builds the DiT on the meta device
(nothing allocated) and prints per rank: parameters, gradients, optimizer state (by ZeRO
stage and offload), buffers, activations (by tokens, sequence-parallel size and activation
checkpointing), whether it fits, and the longest clip at the resolution that fits at batch 1.
The arithmetic lives in sora_train/parallel/plan.py; docs/strategies.md explains it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sora_train.cli.common import CONFIG_MODULE, one_line_errors, validate_overrides
from sora_train.utils.errors import SoraError

# Text width assumed when an HF encoder's folder is not readable here (T5-XXL / UMT5-XXL).
DEFAULT_TEXT_DIM = 4096


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sora-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides, as for sora-train (experiment=pretrain_1B dit=3B ...)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GPU memory in GB (10^9 bytes), e.g. 80 for an H100 (default 80)")
    p.add_argument("--gpus", type=int, help="ranks the job runs on (ZeRO shards over them; default: trainer.devices x nodes, 8 when 'all')")
    p.add_argument("--sp", type=int, help="sequence-parallel size (default: parallel.sequence_parallel_size, else 1)")
    p.add_argument("--frames", type=int, help="clip length to plan (default: the config's longest bucket)")
    p.add_argument("--height", type=int, help="clip height (default: the planned bucket's)")
    p.add_argument("--width", type=int, help="clip width (default: the planned bucket's)")
    p.add_argument("--batch", type=int, help="micro-batch per rank (default: data.tokens_per_batch // (F*H*W), at least 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    return p


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SoraError(f"{bad[0]!r} is not a config override (key=value); flags start with --")
    validate_overrides("train", overrides)  # unknown experiment / option: one line, exit 2
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return hydra_compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def text_dim(text_cfg) -> tuple[int, str | None]:
    """Width of the text encoder's token embeddings, and a note when it is assumed."""
    if text_cfg.get("dim"):
        return int(text_cfg.dim), None
    path = text_cfg.get("path")
    try:
        cfg = json.loads((Path(str(path)) / "config.json").read_text())
        return int(cfg.get("d_model") or cfg.get("hidden_size") or cfg["text_config"]["hidden_size"]), None
    except Exception:
        return DEFAULT_TEXT_DIM, f"text width {DEFAULT_TEXT_DIM} assumed (text.path not readable here); it changes only the text projection"


# T5-v1_1-XXL's encoder (4.76e9 parameters), assumed when a frozen HF encoder's folder is not
# readable here: the text encoder of the pretrain_* experiments.
DEFAULT_TEXT_PARAMS = 4.76e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def text_params(text_cfg) -> tuple[float, str | None]:
    """Parameters of a frozen HF text encoder: T5/UMT5 encoders counted from config.json
    (embedding + per layer 4 d_model d_kv heads attention + 3 d_model d_ff gated MLP)."""
    try:
        c = json.loads((Path(str(text_cfg.get("path"))) / "config.json").read_text())
        d, layers, heads, d_kv, d_ff = c["d_model"], c["num_layers"], c["num_heads"], c["d_kv"], c["d_ff"]
        mlp = (3 if c.get("is_gated_act", "gated" in str(c.get("feed_forward_proj", ""))) else 2) * d * d_ff
        return float(c["vocab_size"] * d + layers * (4 * d * d_kv * heads + mlp)), None
    except Exception:
        return DEFAULT_TEXT_PARAMS, (f"frozen text encoder assumed T5-XXL-sized ({DEFAULT_TEXT_PARAMS / 1e9:.2f}B params; "
                                     "text.path not readable here)")


def frozen_bytes(cfg, vae, notes: list[str]) -> float:
    """Weights of the parts outside the strategy, on every rank: the VAE (task.vae_dtype) and a
    frozen text encoder (task.text_dtype, else text.dtype). A trainable tiny encoder is trained
    with the DiT and small; it is left out."""
    from omegaconf import OmegaConf

    vae_dtype = str(OmegaConf.select(cfg, "task.vae_dtype", default="float32") or "float32")
    total = sum(p.numel() for p in vae.parameters()) * DTYPE_BYTES.get(vae_dtype, 4)
    trainable = OmegaConf.select(cfg, "text.trainable", default=None)
    if not OmegaConf.select(cfg, "text.dim", default=None) and trainable is not True:  # an HF encoder, frozen
        n, note = text_params(cfg.text)
        if note:
            notes.append(note)
        dtype = str(OmegaConf.select(cfg, "task.text_dtype", default=None) or OmegaConf.select(cfg, "text.dtype", default="float32"))
        total += n * DTYPE_BYTES.get(dtype, 4)
    return float(total)


def world_size(cfg, gpus: int | None) -> int:
    from omegaconf import OmegaConf

    if gpus is not None:
        return gpus
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1)
    if devices in (-1, "auto", "-1") or devices is None:
        devices = 8
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return int(devices) * nodes


def init_from(cfg) -> str | None:
    """The run's ``init_from`` (an export or base folder whose architecture the run trains), or None."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, "init_from", default=None)
    except Exception:  # e.g. ${pretrained} with pretrained: ??? (experiment=wan_lora)
        raise SoraError("init_from is not set: this experiment fine-tunes a given model (e.g. pretrained=FOLDER); "
                        "sora-plan reads its architecture from that folder") from None
    return None if value in (None, "") else str(value)


def models_from_export(path: str, vae):
    """(vae, dit) on the meta device from an export's model.json: fine-tuning trains the
    export's architecture, not the config's ``dit`` size (docs/architecture.md)."""
    from sora_train.models.bases import is_base_folder
    from sora_train.models.dit.dit import DiT
    from sora_train.models.vae.causal_vae import CausalVAE
    from sora_train.utils.exports import read_export_spec

    if is_base_folder(path):
        raise SoraError(f"init_from={path}: a public base model's folder; sora-plan knows the activations of sora_train's DiT only")
    try:
        parts = read_export_spec(path)["parts"]
    except SoraError as e:
        raise SoraError(f"init_from={path}: the run trains that export's architecture, and it is not readable here ({e})") from None
    def path_of(cls: type) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    dit_part = parts.get("dit") or {}
    if dit_part.get("target") != path_of(DiT):
        raise SoraError(f"init_from={path}: its DiT is {dit_part.get('target')!r}; sora-plan knows sora_train's DiT only")
    config = {k: v for k, v in (dit_part.get("config") or {}).items() if k not in DiT.RETIRED_CONFIG_KEYS}
    vae_part = parts.get("vae") or {}
    if vae_part.get("target") == path_of(CausalVAE):
        vae = CausalVAE(**vae_part.get("config", {}))
    return vae, DiT(**config)


def plan_from_config(cfg, args: argparse.Namespace) -> dict:
    """Everything the table shows, as plain values."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sora_train.parallel.plan import LatentGeometry, Setup, dit_shape, longest_clip, plan_memory

    if args.gpu_mem <= 0:
        raise SoraError(f"--gpu-mem {args.gpu_mem:g}: must be a positive number of GB")
    if str(OmegaConf.select(cfg, "task._target_", default="")).endswith("VAEModule"):
        raise SoraError("sora-plan plans DiT training; this config trains the VAE (task=vae)")
    notes: list[str] = []
    base = init_from(cfg)
    with torch.device("meta"):
        vae = instantiate(cfg.vae)
        if base:
            vae, dit = models_from_export(base, vae)
            notes.append(f"architecture from init_from={base}")
        else:
            tdim, note = text_dim(cfg.text)
            dit = instantiate(cfg.dit)(in_channels=vae.latent_channels, text_dim=tdim)
            if note:
                notes.append(note)
    if OmegaConf.select(cfg, "lora", default=None):
        notes.append("LoRA: only the adapters train, so gradients and optimizer state are far below these "
                     "(the plan counts full training: an upper bound)")
    if not all(hasattr(dit, a) for a in ("hidden_size", "depth", "num_heads", "patch_size")):
        raise SoraError(f"sora-plan knows the activations of sora_train's DiT; {type(dit).__name__} is not one")
    shape = dit_shape(dit)
    geometry = LatentGeometry(vae.temporal_factor, vae.spatial_factor)

    buckets = OmegaConf.to_container(cfg.data.buckets, resolve=True) if OmegaConf.select(cfg, "data.buckets") else []
    bucket = max(buckets, key=lambda b: b["num_frames"] * b["height"] * b["width"]) if buckets else {}
    F = args.frames or bucket.get("num_frames") or OmegaConf.select(cfg, "data.num_frames", default=None)
    H = args.height or bucket.get("height") or OmegaConf.select(cfg, "data.height", default=None)
    W = args.width or bucket.get("width") or OmegaConf.select(cfg, "data.width", default=None)
    if not (F and H and W):
        raise SoraError("the config names no clip shape (data.buckets); give --frames, --height and --width")
    tpb = OmegaConf.select(cfg, "data.tokens_per_batch", default=None)
    batch = args.batch or (max(1, int(tpb) // (F * H * W)) if tpb else int(OmegaConf.select(cfg, "data.batch_size", default=1) or 1))
    if batch < 1:
        raise SoraError(f"--batch {batch}: must be >= 1")
    strategy = str(OmegaConf.select(cfg, "strategy.name", default="auto") or "auto")
    sp = args.sp or int(OmegaConf.select(cfg, "parallel.sequence_parallel_size", default=1) or 1)
    setup_kwargs = dict(
        strategy=strategy,
        precision=str(OmegaConf.select(cfg, "trainer.precision", default="32-true")),
        world_size=world_size(cfg, args.gpus),
        sequence_parallel_size=sp,
        activation_checkpointing=bool(OmegaConf.select(cfg, "parallel.activation_checkpointing", default=False)),
        text_len=int(OmegaConf.select(cfg, "text.max_length", default=300) or 300),
        reduce_bucket_size=float(OmegaConf.select(cfg, "strategy.reduce_bucket_size", default=2e8) or 0),
        allgather_bucket_size=float(OmegaConf.select(cfg, "strategy.allgather_bucket_size", default=2e8) or 0),
    )
    setup = Setup(micro_batch=batch, **setup_kwargs)
    tokens = geometry.tokens(F, H, W, shape.patch_size)
    frozen = frozen_bytes(cfg, vae, notes)
    plan = plan_memory(shape, tokens, setup, frozen)
    gpu_bytes = args.gpu_mem * 1e9
    max_frames = 1 + geometry.temporal_factor * 2**14  # 16k latent frames: hours of video
    longest = longest_clip(shape, geometry, H, W, Setup(micro_batch=1, **setup_kwargs), gpu_bytes, max_frames=max_frames, frozen_bytes=frozen)
    fps = OmegaConf.select(cfg, "data.target_fps", default=None)
    return {
        "dit": {"params": shape.num_params, "hidden_size": shape.hidden_size, "depth": shape.depth, "num_heads": shape.num_heads},
        "setup": {**setup_kwargs, "micro_batch": batch, "gpu_mem_gb": args.gpu_mem},
        "clip": {"num_frames": F, "height": H, "width": W, "tokens": tokens},
        "bytes": {"frozen": plan.frozen, "params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer, "buffers": plan.buffers,
                  "activations": plan.activations, "optimizer_step": plan.optimizer_step, "gpu": plan.gpu, "cpu": plan.cpu},
        "fits": plan.fits(gpu_bytes),
        "longest_clip": {"num_frames": longest, "height": H, "width": W, "at_least": longest >= max_frames - geometry.temporal_factor * shape.patch_size[0],
                         "seconds": round((longest - 1) / float(fps), 2) if (fps and longest) else None},
        "notes": notes + plan.notes,
    }


def print_table(p: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s, c, b = p["setup"], p["clip"], p["bytes"]
    gb = lambda v: f"{v / 1e9:,.2f}"  # noqa: E731
    title = (f"{p['dit']['params'] / 1e9:.3f}B-param DiT (D={p['dit']['hidden_size']}, {p['dit']['depth']} blocks) · {s['strategy']} · "
             f"{s['precision']} · {s['world_size']} ranks · sp={s['sequence_parallel_size']} · "
             f"checkpointing {'on' if s['activation_checkpointing'] else 'off'}")
    t = Table(title=title, title_justify="left")
    t.add_column("per rank")
    t.add_column("GB", justify="right")
    t.add_column("what")
    t.add_row("frozen parts", gb(b["frozen"]), "VAE and a frozen text encoder, outside the strategy: on every rank")
    t.add_row("parameters", gb(b["params"]), "the DiT's weights held on the GPU")
    t.add_row("gradients", gb(b["grads"]), "")
    t.add_row("optimizer state", gb(b["optimizer"]), "Adam moments (+ fp32 master under DeepSpeed)")
    t.add_row("buffers", gb(b["buffers"]), "communication buckets, gathered ZeRO-3 blocks")
    t.add_row("activations", gb(b["activations"]),
              f"{s['micro_batch']} x {c['num_frames']}x{c['height']}x{c['width']} = {c['tokens']:,} tokens / sp")
    t.add_row("optimizer step", gb(b["optimizer_step"]), "temporaries once activations are freed (the peak takes the larger)")
    t.add_row("[bold]peak[/bold]", f"[bold]{gb(b['gpu'])}[/bold]", f"of {s['gpu_mem_gb']:g} GB: " + ("[green]fits[/green]" if p["fits"] else "[red]does not fit[/red]"))
    if b["cpu"]:
        t.add_row("CPU RAM (offload)", gb(b["cpu"]), "per rank, in host memory")
    console = Console()
    console.print(t)
    lc = p["longest_clip"]
    if lc["num_frames"]:
        secs = f" ({lc['seconds']} s at data.target_fps)" if lc["seconds"] is not None else ""
        more = " or more (the search stops there)" if lc["at_least"] else ""
        console.print(f"longest clip that fits at {lc['height']}x{lc['width']}, batch 1: {lc['num_frames']} frames{more}{secs}")
    else:
        console.print(f"no clip fits at {lc['height']}x{lc['width']}, batch 1: the model states alone are too big; raise the ZeRO stage or offload")
    for n in p["notes"]:
        console.print(f"note: {n}")


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come after flags
    if args.gpu_mem <= 0:
        raise SoraError(f"--gpu-mem {args.gpu_mem:g}: must be a positive number of GB")
    cfg = compose(args.overrides)
    p = plan_from_config(cfg, args)
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print_table(p)


if __name__ == "__main__":
    main()
