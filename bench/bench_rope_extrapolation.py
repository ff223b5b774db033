"""Frames wider than training: the model as trained against RoPE position interpolation at sampling time.

    python bench/bench_rope_extrapolation.py <dit export> --data data/shapes_native \
        --shapes 17x32x64 17x64x32 33x32x64

A shapes-world DiT trained on frames at most W tokens wide, asked for a wider frame, sees RoPE
distances it never trained on; its fastest channel pair (period 2 pi ~ 6.3 tokens) aliases a
token 6-7 tokens from the object onto one next to it, and some clips draw a fragment of a copy
at the far edge. This scores, at each shape, with the same 32 seen captions and seeds as
``sora-eval shapes --shapes`` (one object per frame; colour / shape / direction):

- **as trained**: the export's own ``rope_scale``;
- **interpolated**: position interpolation at sampling time (as LLMs and image DiTs extend
  context without training): on each axis longer than any training bucket's, the positions are
  squeezed so the longest distance is the longest trained one (``rope_scale`` times
  (trained - 1) / (asked - 1) on that axis).

The other remedy, a model trained with ``dit.rope_scale`` below 1 (a period longer than twice
the trained extent), is measured by ``bash launch/native_shapes.sh`` itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sora_train.training.pipeline import VideoPipeline
from sora_train.training.shapes_eval import ShapesEvalSettings, data_facts, make_world, split_combos
from sora_train.training.shapes_native import parse_shape, score_shape


def token_extent(pipe: VideoPipeline, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tokens along (t, h, w) of a pixel clip shape."""
    f, h, w = pipe.latent_shape(*shape)
    pt, ph, pw = pipe.dit.patch_size
    return f // pt, h // ph, w // pw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="a DiT export trained on several buckets (model.json lists train_buckets)")
    ap.add_argument("--data", required=True, help="the shapes data set it trained on (held-out pairs)")
    ap.add_argument("--shapes", nargs="+", default=["17x32x64", "17x64x32", "33x32x64"])
    ap.add_argument("--max-combos", type=int, default=32)
    args = ap.parse_args()
    settings = ShapesEvalSettings(max_combos=args.max_combos)
    pipe = VideoPipeline.from_export(Path(args.ckpt))
    facts = data_facts(Path(args.ckpt), pipe.meta, args.data, settings.seed)
    world = make_world(facts, pipe.meta)
    seen, _ = split_combos(facts["heldout_pairs"], settings.max_combos, settings.seed)
    trained = [parse_shape(b) for b in pipe.meta.get("train_buckets") or []]
    if not trained:
        raise SystemExit(f"{args.ckpt}: model.json lists no train_buckets")
    longest = [max(token_extent(pipe, s)[a] for s in trained) for a in range(3)]
    own = list(pipe.dit.rope_scale)
    print(f"trained token extents (t, h, w) up to {tuple(longest)}; rope_scale as trained {tuple(own)}")
    for text in args.shapes:
        shape = parse_shape(text)
        asked = token_extent(pipe, shape)
        squeeze = [own[a] * (longest[a] - 1) / (asked[a] - 1) if asked[a] > longest[a] else own[a] for a in range(3)]
        for name, scale in [("as trained", own), ("interpolated", squeeze)]:
            pipe.dit.rope_scale = scale
            torch.manual_seed(settings.seed)
            r, _ = score_shape(pipe, world, seen, shape, settings)
            acc = " ".join(f"{k} {100 * v:.1f}%" for k, v in r["accuracy"].items())
            print(f"{text:>10} {name:<12} rope_scale {tuple(round(v, 3) for v in scale)}: "
                  f"one object {100 * r['one_object_frac']:.1f}%  {acc}", flush=True)
        pipe.dit.rope_scale = own


if __name__ == "__main__":
    main()
