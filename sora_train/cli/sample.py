"""sora-sample: generate videos from a trained export (safetensors; nothing is unpickled).

  text to video:   sora-sample --ckpt EXPORT --prompt "a small red circle moving left"
  batch of prompts sora-sample --ckpt EXPORT --prompts-file prompts.txt --out samples/
  image to video:  sora-sample --ckpt EXPORT --prompt "..." --image first.png
  extend:          sora-sample --ckpt EXPORT --prompt "..." --extend clip.mp4 [--backward]
  interpolate:     sora-sample --ckpt EXPORT --prompt "..." --interpolate a.png b.png
  edit:            sora-sample --ckpt EXPORT --prompt "..." --edit clip.mp4 --strength 0.6
  long clip, 8 GPUs: torchrun --nproc-per-node 8 $(which sora-sample) --ckpt EXPORT --prompt "..." --frames 241
                   (the DiT's tokens split over the ranks, as parallel.sequence_parallel_size does in training)
  a long clip:     sora-sample --ckpt EXPORT --prompt "..." --frames 481 --height 720 --width 1280
                   (the VAE decodes in chunks of 4 latent frames and 256 px tiles by default;
                   --chunk-frames N / --tile PX set them, 0 turns either off)
  expand prompts:  sora-sample --ckpt EXPORT --prompt "a kite" --rewriter template

Every video is written through sora_train.provenance: container metadata saying it is
AI-generated, with the model's hash, both the given and the expanded prompt and the sampler
settings; an invisible watermark (from 256x256 up); and a C2PA manifest when
SORA_C2PA_CERT and SORA_C2PA_KEY name a signing certificate chain and key (README: "Signing
generated videos"). Prompts are scrubbed of e-mail addresses, phone numbers, URLs and similar
personal data first. Check a file with `sora-eval provenance FILE`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.progress import Progress

from sora_train.cli.common import one_line_errors
from sora_train.rewrite.options import rewriter_from_option
from sora_train.utils.errors import SoraError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sora-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="export directory (model.json + model.safetensors), e.g. RUN_DIR/export, or a Wan2.1 diffusers folder")
    p.add_argument("--vae", help="export holding the VAE, when the DiT export has none")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    src.add_argument("--prompts-file", help="one prompt per line (blank lines and # comments skipped)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--image", help="image-to-video: the first frame")
    mode.add_argument("--extend", metavar="VIDEO", help="extend this video (forward; --backward for before it)")
    mode.add_argument("--interpolate", nargs=2, metavar=("FIRST", "LAST"), help="generate between two images")
    mode.add_argument("--edit", metavar="VIDEO", help="video-to-video edit with the prompt")
    p.add_argument("--boxes", metavar="FILE", help="box motion control: a boxes JSON (docs/data.md, \"Boxes\"); keyframes are interpolated, works with every mode")
    p.add_argument("--backward", action="store_true", help="with --extend: generate what comes before")
    p.add_argument("--strength", type=float, default=0.6, help="with --edit: noise level to restart from (0..1)")
    p.add_argument("--context-latents", type=int, help="with --extend: latent frames of the video to keep as context")
    p.add_argument("--frames", type=int, help="frames (default: the training clip length, 1 + k * temporal factor)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--steps", type=int, help="ODE steps (default: the export's)")
    p.add_argument("--method", choices=("euler", "heun"))
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--shift", type=float, help="timestep shift spacing the ODE steps (default: the export's)")
    p.add_argument("--negative-prompt", default="", help="text to steer away from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw DiT weights instead of the EMA")
    p.add_argument("--lora", metavar="FILE", help="a Wan LoRA in diffusers' format (pytorch_lora_weights.safetensors) folded into a Wan base or export")
    p.add_argument("--rewriter", help="expand prompts with this conf/rewriter option first (e.g. template, openai)")
    p.add_argument("--rewriter-opt", action="append", default=[], metavar="KEY=VALUE", help="override a re-writer option (repeatable)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-frames", type=int, metavar="N",
                   help="VAE decode in chunks of N latent frames (exact; 0 = in one go; default: 4 when the clip has more)")
    p.add_argument("--tile", type=int, metavar="PX",
                   help="VAE decode in overlapping PX x PX tiles (blended; 0 = off; default: 256 above 512 pixels)")
    p.add_argument("--out", default="outputs/samples", help="output directory")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SoraError(f"--prompts-file {path}: no such file")
        prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise SoraError(f"--prompts-file {path}: holds no prompts")
        return prompts
    if args.prompt:
        return list(args.prompt)
    raise SoraError("give --prompt TEXT (repeatable) or --prompts-file FILE")


def read_image(path: str) -> np.ndarray:
    from sora_train.data.video_io import decode_image

    p = Path(path)
    if not p.is_file():
        raise SoraError(f"image {p}: no such file")
    try:
        return decode_image(p.read_bytes())[0]  # (H, W, 3)
    except Exception as e:
        raise SoraError(f"image {p}: cannot decode ({e})") from None


def read_video(path: str) -> tuple[np.ndarray, float]:
    from sora_train.data.video_io import decode_video, probe_video

    p = Path(path)
    if not p.is_file():
        raise SoraError(f"video {p}: no such file")
    data = p.read_bytes()
    try:
        return decode_video(data), probe_video(data).fps  # (F, H, W, 3)
    except Exception as e:
        raise SoraError(f"video {p}: cannot decode ({e})") from None


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from sora_train.utils.malloc import fix_mmap_threshold

    fix_mmap_threshold()  # RSS follows live tensors through a long chunked decode (utils/malloc.py)
    import torch

    from sora_train.training.pipeline import VideoPipeline

    from sora_train.provenance import default_provenance
    from sora_train.utils.pii import scrub

    prompts = [scrub(p) for p in read_prompts(args)]
    if args.boxes:  # a malformed file fails in one line before the model loads; checked against it below
        from sora_train.data.boxes import load_boxes

        load_boxes(args.boxes, what=f"--boxes {args.boxes}")
    default_provenance().warn_if_unsigned()  # a bad or missing signing identity: one line, before the slow part
    pipe = VideoPipeline.from_export(args.ckpt, use_ema=not args.no_ema, rewriter=rewriter_from_option(args.rewriter, args.rewriter_opt), vae_path=args.vae)
    if args.lora:
        from sora_train.models.dit.wan import WanDiT, load_wan_lora

        if not isinstance(pipe.dit, WanDiT):
            raise SoraError(f"--lora {args.lora}: a diffusers-format LoRA applies to a Wan2.1 base or export; {args.ckpt} holds a {type(pipe.dit).__name__}")
        load_wan_lora(pipe.dit, args.lora)
    pipe.set_decoding("auto" if args.chunk_frames is None else args.chunk_frames, "auto" if args.tile is None else args.tile)
    writer = sequence_parallel_ranks(pipe)
    shape = pipe.meta.get("train_shape") or {}
    frames = args.frames or shape.get("num_frames") or 1 + 4 * pipe.vae.temporal_factor
    height = args.height or shape.get("height") or 32
    width = args.width or shape.get("width") or 32

    kwargs: dict = {}
    mode = "t2v"
    if args.image:
        mode, kwargs["image"] = "i2v", read_image(args.image)
    elif args.extend:
        mode = "extend_backward" if args.backward else "extend_forward"
        kwargs["video"], _ = read_video(args.extend)
        kwargs["context_latents"] = args.context_latents
    elif args.interpolate:
        mode = "interpolate"
        kwargs["image"], kwargs["last_image"] = read_image(args.interpolate[0]), read_image(args.interpolate[1])
    elif args.edit:
        mode = "edit"
        kwargs["video"], _ = read_video(args.edit)
        kwargs["strength"] = args.strength
    elif args.backward:
        raise SoraError("--backward goes with --extend VIDEO")

    if args.boxes:  # checked against the model and the clip before anything is sampled
        from sora_train.data.boxes import load_boxes

        kwargs["boxes"] = load_boxes(args.boxes, num_frames=frames, max_objects=pipe.max_boxes or None, what=f"--boxes {args.boxes}")
        pipe.box_maps(kwargs["boxes"], frames, pipe.latent_shape(frames, height, width))

    torch.set_grad_enabled(False)
    out = Path(args.out)
    written = []
    with Progress(transient=False, disable=not writer) as bar:
        task = bar.add_task(f"sampling ({mode})", total=len(prompts))
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            gen = pipe.generate(chunk, frames, height, width, mode=mode, steps=args.steps, method=args.method,
                                guidance_scale=args.guidance, negative_prompt=args.negative_prompt,
                                seed=args.seed + start, shift=args.shift, **kwargs)
            if writer:  # every rank generated the same videos (same seed); rank 0 writes them
                written += pipe.save(gen, out, fps=args.fps, stem=f"{mode}_{start:04d}")
            bar.advance(task, len(chunk))
    if not writer:
        return
    index = [{"video": str(p), "prompt": prompts[i], **({"boxes": kwargs["boxes"].to_json()} if "boxes" in kwargs else {})} for i, p in enumerate(written)]
    (out / "samples.json").write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {len(written)} videos to {out}/")


def sequence_parallel_ranks(pipe) -> bool:
    """Launched on several ranks (torchrun or srun set WORLD_SIZE): the DiT's tokens are split
    over all of them (Ulysses, as in training), so a clip too long for one GPU's attention
    samples on several. Returns whether this rank writes the outputs (rank 0)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return True
    import torch
    import torch.distributed as dist

    from sora_train.parallel.sequence import apply_sequence_parallel, init_sequence_parallel
    from sora_train.utils.dist_groups import sequence_parallel

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        for model in (pipe.dit, pipe.vae, pipe.text_encoder):
            model.to(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    apply_sequence_parallel(pipe.dit, init_sequence_parallel(world), *sequence_parallel()[1:])
    return dist.get_rank() == 0


if __name__ == "__main__":
    main()
