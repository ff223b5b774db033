"""Generation: text, image and video prompts -> video, for every prompting mode.

One mechanism serves all modes, the same one training uses: some latent frames are given
clean as context (``cond_mask``) and the sampler keeps them fixed while it integrates the rest.
What differs per mode is only which pixel frames are known and where they sit in the clip:

| mode              | known pixel frames of the new clip           | context latent frames |
|-------------------|----------------------------------------------|-----------------------|
| t2v               | none                                         | none                  |
| i2v               | frame 0 = the image                          | 0                     |
| extend_forward    | the first 1+(k-1)s = the given video's tail   | 0 .. k-1              |
| extend_backward   | the last k*s = the given video's head         | f-k .. f-1            |
| interpolate       | frame 0 = image A; last s frames = image B    | 0 and f-1             |
| edit              | none; the given video, noised to `strength`, is the starting point |  |

(s = the VAE's temporal factor, k = number of context latent frames.) Unknown pixel frames
are filled by repeating the nearest known frame before encoding, so the causal encoder sees a
plausible clip; only latent frames whose pixel frames are all known are marked as context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from sora_train.diffusion import FlowMatching, sample
from sora_train.provenance import AI_LABEL  # noqa: F401  re-exported: the label every generated video carries
from sora_train.utils.errors import SoraError
from sora_train.utils.pii import scrub
from sora_train.utils.precision import autocast_off, module_device, module_dtype

MODES = ("t2v", "i2v", "extend_forward", "extend_backward", "interpolate", "edit")

# Decoding a clip in one go holds the VAE decoder's activations for every frame and pixel at
# once (for the 4x8x8 VAE, 64 channels at full resolution: 16 KB per pixel per layer), so
# memory grows with the clip. Above these sizes the decode streams instead: chunks of latent
# frames (exact: the causal convs carry their past frames across chunks) and, for large
# frames, overlapping spatial tiles (blended; approximate near tile borders). "auto" in
# `set_decoding` means these; None turns a step off.
DECODE_CHUNK_FRAMES = 4  # latent frames per chunk (16 pixel frames at 4x), when a clip has more
DECODE_TILE = 256  # pixels per tile side (a multiple of every VAE's spatial factor here) ...
DECODE_TILE_ABOVE = 512  # ... when the height or width exceeds this


@dataclass
class Generation:
    video: torch.Tensor  # (B, 3, F, H, W) in [-1, 1]; for extension: the given video joined with the new frames
    prompts: list[str]  # what the model was conditioned on (after expansion)
    original_prompts: list[str]
    mode: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)


class VideoPipeline:
    """A VAE, a text encoder, a DiT and the flow objective's sampling rule, ready to generate.

    Args:
        vae, text_encoder, dit: the models (eval mode is set here).
        flow: the FlowMatching of training (its token shift is reused at sampling).
        rewriter: optional caption re-writer that expands short prompts into the dense style
            the model was trained on; both texts are kept in the output metadata.
        meta: the export's metadata (recorded into written videos).
    """

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, dit: nn.Module, flow: FlowMatching | None = None, rewriter: Any = None, meta: dict[str, Any] | None = None) -> None:
        self.vae, self.text_encoder, self.dit = vae.eval(), text_encoder.eval(), dit.eval()
        self.flow = flow or FlowMatching()
        self.rewriter = rewriter
        self.meta = dict(meta or {})

    @classmethod
    def from_export(cls, path: str | Path, use_ema: bool = True, rewriter: Any = None, vae_path: str | Path | None = None) -> "VideoPipeline":
        from sora_train.models.export import load_parts

        parts, meta = load_parts(path)
        if vae_path is not None:
            parts["vae"] = load_parts(vae_path, ["vae"])[0]["vae"]
        missing = [p for p in ("vae", "text", "dit") if p not in parts]
        if missing:
            raise SoraError(f"{path}: export lacks part(s) {missing}; sampling needs a DiT export (vae, text, dit)")
        dit = parts["ema"] if (use_ema and "ema" in parts) else parts["dit"]
        flow = FlowMatching.from_config(meta.get("diffusion"), f"{path}: model.json meta.diffusion")  # data, validated: nothing it names is called
        meta["weights"] = "ema" if dit is parts.get("ema") else "dit"
        return cls(parts["vae"], parts["text"], dit, flow, rewriter, meta)

    # -- shapes --------------------------------------------------------------------------------
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        f, h, w = self.vae.latent_shape(num_frames, height, width)
        pt, ph, pw = self.dit.patch_size
        if f % pt or h % ph or w % pw:
            raise SoraError(f"{num_frames}x{height}x{width} gives latents {f}x{h}x{w}, not divisible by the DiT patch {self.dit.patch_size}")
        return f, h, w

    # -- context ----------------------------------------------------------------------------------
    def _context(self, mode: str, F: int, H: int, W: int, image, last_image, video, k: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> (pixels (1, 3, F, H, W) or None, context latent frames (f,) bool or None)."""
        s = self.vae.temporal_factor
        f, _, _ = self.latent_shape(F, H, W)
        known = torch.zeros(F, dtype=torch.bool)
        pixels = torch.zeros(3, F, H, W)
        if mode == "t2v" or mode == "edit":
            return None, None
        if mode == "i2v":
            img = _frame(image, H, W, "image")
            pixels[:, 0], known[0] = img, True
        elif mode == "extend_forward":
            vid = _clip(video, H, W, "video")
            k = k or max(1, f // 4)
            n = 1 + (k - 1) * s
            if vid.shape[1] < n or k >= f:
                raise SoraError(f"extend: need a video of >= {n} frames and fewer context latents than {f}; got {vid.shape[1]} frames, k={k}")
            pixels[:, :n], known[:n] = vid[:, -n:], True
        elif mode == "extend_backward":
            vid = _clip(video, H, W, "video")
            k = k or max(1, f // 4)
            n = k * s
            if vid.shape[1] < n or k >= f:
                raise SoraError(f"extend backward: need a video of >= {n} frames; got {vid.shape[1]}")
            pixels[:, F - n :], known[F - n :] = vid[:, :n], True
        elif mode == "interpolate":
            a, b = _frame(image, H, W, "image"), _frame(last_image, H, W, "last image")
            pixels[:, 0], known[0] = a, True
            tail = max(1, s) if F > 1 else 0
            pixels[:, F - tail :] = b[:, None]
            known[F - tail :] = True
        else:
            raise SoraError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        # Fill unknown frames with the nearest known frame (earlier first, then later).
        idx = torch.arange(F)
        known_idx = idx[known]
        nearest = known_idx[(idx[:, None] - known_idx[None, :]).abs().argmin(dim=1)]
        pixels = pixels[:, nearest]
        # Latent frame 0 covers pixel 0; latent j >= 1 covers pixels 1+(j-1)s .. j*s.
        cond = torch.tensor([bool(known[0])] + [bool(known[1 + (j - 1) * s : 1 + j * s].all()) for j in range(1, f)])
        return pixels[None], cond

    # -- text -----------------------------------------------------------------------------------
    def expand_prompts(self, prompts: Sequence[str]) -> list[str]:
        if self.rewriter is None:
            return list(prompts)
        return [r.text for r in self.rewriter.rewrite(list(prompts))]

    @staticmethod
    def _pad_cat(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack two (emb (B, L, D), mask (B, L)) pairs of different L along the batch."""
        L = max(a[0].shape[1], b[0].shape[1])

        def pad(e: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = L - e.shape[1]
            return torch.nn.functional.pad(e, (0, 0, 0, extra)), torch.nn.functional.pad(m, (0, extra), value=False)

        (ea, ma), (eb, mb) = pad(*a), pad(*b)
        return torch.cat([ea, eb]), torch.cat([ma, mb])  # (2B, L, D), (2B, L)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        num_frames: int,
        height: int,
        width: int,
        mode: str = "t2v",
        image: Any = None,
        last_image: Any = None,
        video: Any = None,
        strength: float = 0.6,
        context_latents: int | None = None,
        steps: int | None = None,
        method: str | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        progress: bool = False,
        shift: float | None = None,
        boxes: Any = None,
    ) -> Generation:
        """Generate one video per prompt.

        Args:
            prompts: text prompts (expanded by the re-writer first, when one is set).
            num_frames, height, width: output shape; any shape the VAE and DiT accept.
            mode: one of MODES (see the module docstring).
            image: i2v / interpolate start frame: (H, W, 3) uint8 array or (3, H, W) float in [-1, 1].
            last_image: interpolate end frame, same formats.
            video: extend / edit input: (F, H, W, 3) uint8 array or (3, F, H, W) float.
            strength: edit: how much noise to add to the input video (0 = unchanged, 1 = t2v).
            context_latents: extend: how many latent frames of the given video to keep.
            steps, method, guidance_scale: sampler settings (default: the export's).
            shift: timestep shift spacing the sampler's steps (default: the export's
                sampler.shift, else the training shift for this many tokens).
            negative_prompt: the text guidance steers away from ("" = unconditional).
            seed: noise seed; the same seed, prompt and settings give the same video.
            boxes: box motion control (``sora_train.data.boxes.Boxes``, keyframes interpolated
                between) for the frames the model generates, in every mode; the DiT must have
                been trained with ``control=boxes``. Recorded in ``settings["boxes"]``.
        Returns:
            Generation with video (B, 3, F', H, W) in [-1, 1] (F' > F for extension: the given
            video joined with the new frames).
        """
        if mode not in MODES:
            raise SoraError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        defaults = dict(self.flow.sampler_defaults)
        steps = int(steps or defaults.get("steps", 30))
        method = method or defaults.get("method", "euler")
        guidance_scale = float(guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 4.0))
        # Personal data (e-mails, phone numbers, URLs, ...) never reaches the re-writer, its cache,
        # the model or the written videos.
        original = [scrub(p) for p in prompts]
        negative_prompt = scrub(negative_prompt)
        prompts = self.expand_prompts(original)
        B = len(prompts)
        f, h, w = self.latent_shape(num_frames, height, width)
        C = self.vae.latent_channels

        pixels, cond = self._context(mode, num_frames, height, width, image, last_image, video, context_latents)
        context = cond_mask = x_init = None
        start_t = 1.0
        device = module_device(self.dit)
        if pixels is not None:
            context = self._encode(pixels).to(device).expand(B, -1, -1, -1, -1)  # (B, C, f, h, w)
            cond_mask = cond[None].expand(B, -1).to(device)  # (B, f)
        if mode == "edit":
            vid = _clip(video, height, width, "video")
            if vid.shape[1] < num_frames:
                raise SoraError(f"edit: the video has {vid.shape[1]} frames, fewer than the {num_frames} requested")
            x_init = self._encode(vid[None, :, :num_frames]).to(device).expand(B, -1, -1, -1, -1)
            if not 0.0 <= strength <= 1.0:
                raise SoraError(f"edit strength must be in [0, 1], got {strength}")
            start_t = float(strength)

        # The DiT runs in its weights' dtype (bf16 after DeepSpeed's bf16 training); the sampler
        # integrates in fp32.
        dtype = module_dtype(self.dit)
        box_kw: dict[str, torch.Tensor] = {}
        if boxes is not None:
            box_kw["box_maps"] = self.box_maps(boxes, num_frames, (f, h, w)).to(device, dtype).expand(B, -1, -1, -1, -1)  # (B, 2M, f, h, w)
        cond_text = self._text(prompts, device, dtype)  # (B, L, D), (B, L)
        uncond_text = self._text([negative_prompt] * B, device, dtype)
        both_text = self._pad_cat(cond_text, uncond_text)  # (2B, L, D), (2B, L)

        def model_fn(x: torch.Tensor, t: torch.Tensor, guided: bool):
            if not guided:
                return self.dit(x.to(dtype), t, cond_text[0], cond_text[1], cond_mask, **box_kw).float()
            cm = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
            # boxes steer both branches: guidance amplifies the text, the boxes hold in each
            bk = {k: torch.cat([v, v]) for k, v in box_kw.items()}
            v = self.dit(torch.cat([x, x]).to(dtype), torch.cat([t, t]), both_text[0], both_text[1], cm, **bk).float()  # (2B, C, f, h, w)
            return v.chunk(2)

        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((B, C, f, h, w), generator=g).to(device)  # drawn on the CPU: the same video on any device
        pt, ph, pw = self.dit.patch_size
        shift = self.flow.sampling_shift((f // pt) * (h // ph) * (w // pw), shift)
        schedule = defaults.get("schedule", "uniform")  # a public base's pipeline schedule (Wan: flow_match_euler)
        x0 = sample(model_fn, noise, steps=steps, method=method, shift=shift, guidance_scale=guidance_scale,
                    context=context, cond_mask=cond_mask, start_t=start_t, x_init=x_init, progress=progress, schedule=schedule)
        out = self._decode(x0)  # (B, 3, F, H, W)

        if mode == "extend_forward":
            vid = _clip(video, height, width, "video")
            s, k = self.vae.temporal_factor, int(cond.sum())
            n = 1 + (k - 1) * s
            out = torch.cat([vid[None].expand(B, -1, -1, -1, -1), out[:, :, n:]], dim=2)
        elif mode == "extend_backward":
            vid = _clip(video, height, width, "video")
            n = int(cond.sum()) * self.vae.temporal_factor
            out = torch.cat([out[:, :, : num_frames - n], vid[None].expand(B, -1, -1, -1, -1)], dim=2)
        settings = {"steps": steps, "method": method, "guidance_scale": guidance_scale, "shift": shift, "schedule": schedule,
                    "negative_prompt": negative_prompt, "num_frames": num_frames, "height": height, "width": width}
        if mode == "edit":
            settings["strength"] = strength
        if boxes is not None:
            settings["boxes"] = boxes.to_json()
        return Generation(out, prompts, original, mode, int(seed), settings)

    @property
    def max_boxes(self) -> int:
        """Objects the DiT's box control was trained for (0: it has none)."""
        return int(getattr(self.dit, "max_boxes", 0) or 0)

    def box_maps(self, boxes: Any, num_frames: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """Checked boxes -> DiT box maps (1, 2M, f, h, w): keyframes interpolated to every
        frame, then rasterised on the latent grid."""
        from sora_train.data.boxes import rasterise_boxes

        if not self.max_boxes:
            raise SoraError(f"boxes: this model ({type(self.dit).__name__}) was not trained with box control (sora-train control=boxes)")
        if len(boxes.objects) > self.max_boxes:
            raise SoraError(f"boxes: objects has {len(boxes.objects)} objects; the model was trained for at most {self.max_boxes}")
        for i, obj in enumerate(boxes.objects):
            if obj.frames[-1] >= num_frames:
                raise SoraError(f"boxes: objects[{i}] keyframe frame {obj.frames[-1]} is past the clip (frames 0..{num_frames - 1})")
        bx, valid, hard = boxes.dense(num_frames)  # (K, F, 4), (K, F), (K,)
        return rasterise_boxes(torch.from_numpy(bx)[None], torch.from_numpy(valid)[None], torch.from_numpy(hard)[None], self.max_boxes, grid)

    # -- models at their boundaries ----------------------------------------------------------------
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, f, h, w), fp32, on the
        VAE's device; the VAE runs in its own dtype."""
        with autocast_off(module_device(self.vae)):
            z = self.vae.encode(pixels.to(module_device(self.vae), module_dtype(self.vae))).mode()
            return self.vae.normalize(z).float()

    decode_chunk_frames: int | str | None = "auto"
    decode_tile: int | str | None = "auto"

    def set_decoding(self, chunk_frames: int | str | None = "auto", tile: int | str | None = "auto") -> "VideoPipeline":
        """How the VAE decodes: latent frames per chunk and tile size in pixels; "auto" (the
        defaults above DECODE_CHUNK_FRAMES / DECODE_TILE_ABOVE), None or 0 for one go."""
        for name, v in (("chunk_frames", chunk_frames), ("tile", tile)):
            if v != "auto" and v is not None and (not isinstance(v, int) or v < 0):
                raise SoraError(f"decode {name}={v!r}: expected 'auto', None or an int >= 0 (0 = off)")
        self.decode_chunk_frames, self.decode_tile = chunk_frames or None, tile or None
        return self

    def decode_options(self, f: int, h: int, w: int) -> dict[str, int | None]:
        """The VAE decode's chunk_frames / tile for an (f, h, w) latent, from `set_decoding`."""
        chunk, tile = self.decode_chunk_frames, self.decode_tile
        if chunk == "auto":
            chunk = DECODE_CHUNK_FRAMES if f > 1 + DECODE_CHUNK_FRAMES else None
        if tile == "auto":
            sf = self.vae.spatial_factor
            tile = DECODE_TILE if max(h, w) * sf > DECODE_TILE_ABOVE and DECODE_TILE % sf == 0 else None
        return {"chunk_frames": chunk, "tile": tile}

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, F, H, W) in [-1, 1], fp32 on the CPU; chunked / tiled
        as `decode_options` says."""
        with autocast_off(module_device(self.vae)):
            z = self.vae.denormalize(latents.to(module_device(self.vae), module_dtype(self.vae)))
            return self.vae.decode(z, **self.decode_options(*z.shape[2:])).float().clamp_(-1, 1).cpu()

    def _text(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_off(module_device(self.text_encoder)):
            emb, mask = self.text_encoder(prompts)  # (B, L, D), (B, L)
        return emb.to(device, dtype), mask.to(device)

    # -- writing ----------------------------------------------------------------------------------
    def save(self, gen: Generation, out_dir: str | Path, fps: float = 8.0, stem: str = "sample", strip: bool = True, provenance: Any = None) -> list[Path]:
        """Write each video through ``provenance.write_generated_video``: the invisible watermark
        (256x256 and up), the AI-generated label with the model's hash, both prompt texts and the
        sampler settings in its container metadata, and a C2PA manifest when a signing identity
        is configured (``provenance``: a ``sora_train.provenance.Provenance``; default from the
        environment). Plus a PNG strip of frames, labelled and signed likewise."""
        from sora_train.provenance import mark_image_file, write_generated_video

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        frames_all = to_uint8(gen.video)  # (B, F, H, W, 3)
        for i, frames in enumerate(frames_all):
            claims = {
                "model_sha256": self.meta.get("weights_sha256"),
                "weights": self.meta.get("weights"),
                "prompt": gen.original_prompts[i],
                "prompt_expanded": gen.prompts[i],
                "mode": gen.mode,
                "seed": gen.seed,
                **gen.settings,
            }
            path = out / f"{stem}_{i:03d}.mp4"
            write_generated_video(path, frames, fps, claims, provenance)
            paths.append(path)
            if strip:
                png = write_strip(frames, out / f"{stem}_{i:03d}.png", title=scrub(gen.original_prompts[i]))
                mark_image_file(png, claims, provenance)
        return paths


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((video.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def write_strip(frames: np.ndarray, path: str | Path, title: str = "", max_frames: int = 9) -> Path:
    """A PNG of evenly spaced frames side by side, scaled up for small videos."""
    from PIL import Image, ImageDraw

    F, H, W, _ = frames.shape
    idx = np.linspace(0, F - 1, min(F, max_frames)).round().astype(int)
    strip = np.concatenate([frames[i] for i in idx], axis=1)  # (H, n*W, 3)
    scale = max(1, 96 // H)
    img = Image.fromarray(strip).resize((strip.shape[1] * scale, H * scale), Image.NEAREST)
    if title:
        canvas = Image.new("RGB", (img.width, img.height + 14), (255, 255, 255))
        canvas.paste(img, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), title[:120], fill=(0, 0, 0))
        img = canvas
    img.save(path)
    return Path(path)


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise SoraError(f"{what}: expected a uint8 array or a float tensor in [-1, 1], got {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x)).float().div(127.5).sub(1.0)
        return t.movedim(-1, 0)  # (..., 3) -> (3, ...)
    raise SoraError(f"{what} is required for this mode")


def _frame(x: Any, H: int, W: int, what: str) -> torch.Tensor:
    t = _as_tensor(x, what)  # (3, h, w)
    if t.ndim == 4:  # a 1-frame video
        t = t[:, 0]
    return _resize(t[:, None], H, W)[:, 0]  # (3, H, W)


def _clip(x: Any, H: int, W: int, what: str) -> torch.Tensor:
    t = _as_tensor(x, what)  # (3, F, h, w)
    if t.ndim != 4:
        raise SoraError(f"{what}: expected (F, H, W, 3) frames, got shape {tuple(t.shape)}")
    return _resize(t, H, W)  # (3, F, H, W)


def _resize(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(3, F, h, w) -> (3, F, H, W): aspect-preserving resize, centre crop."""
    from sora_train.data.transforms import resize_for_crop

    _, F, h, w = t.shape
    if (h, w) == (H, W):
        return t
    rh, rw = resize_for_crop(h, w, H, W)
    x = torch.nn.functional.interpolate(t.permute(1, 0, 2, 3), size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - H) // 2, (rw - W) // 2
    return x[:, :, top : top + H, left : left + W].permute(1, 0, 2, 3)
