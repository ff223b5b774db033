"""Provenance and privacy, measured: watermark survival and false detections, C2PA verification
and tampering, face-blur recall and its cost per clip in ingest.

    python bench/bench_provenance.py                       # everything (~3 min on 2 cores)
    python bench/bench_provenance.py --only watermark c2pa
    python bench/bench_provenance.py --opencv-data /usr/share/doc/opencv-doc/examples/data

Real footage and photos come from packages, nothing is downloaded:
- scikit-image (a dependency) ships real photos: astronaut, camera, coffee, chelsea, rocket,
  motorcycle_left, hubble_deep_field, ...;
- Debian's ``opencv-doc`` (``apt-get install opencv-doc``, or ``apt-get download opencv-doc &&
  dpkg -x opencv-doc_*.deb DIR``) ships real videos (vtest.avi: pedestrians; tree.avi) and
  photos with faces (messi5.jpg; in html/: facereg.jpg, face_swapped.jpg, person_multi_det.jpg).
  Without it, the sections that need it say so and use what scikit-image has.

Sections:
- watermark: >= 20 generated videos at 256x256 -- 10 from the real VideoPipeline (debug-size
  VAE/DiT/text, random weights: what sora-sample writes, through write_generated_video) and 10
  shapes-world clips rendered at 256x256 -- each re-encoded with H.264 at CRF 28 (mp4) and, as
  a container change, into mkv at CRF 28: bit accuracy of the 48-bit payload after the
  per-frame majority vote. Then >= 20 real clips no model made: false detections.
- c2pa: every generated file signed with a test CA made here; each verifies (Trusted), and the
  same file with one byte of the coded video (mdat) flipped fails.
- faces: detector recall on real photos with frontal faces counted by hand (listed below), the
  false boxes, and the cost per clip of ``ingest --blur-faces`` against plain ingest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av  # noqa: F401  (before decord: see data_tools/probe.py)
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "provenance"))  # the test PKI helper

MODEL_HASH = "5eed" + "0" * 60

# Real photos with faces, counted by hand (frontal or near-frontal faces >= 24 px high; crowds of
# tiny background faces are not counted). name -> (source, file, faces).
FACE_PHOTOS = {
    "astronaut": ("skimage", "astronaut", 1),
    "camera": ("skimage", "camera", 1),  # the cameraman, three-quarter view behind the camera
    "messi5": ("opencv-doc", "messi5.jpg", 1),
    "facereg": ("opencv-doc", "../../opencv4/html/facereg.jpg", 4),
    "face_swapped": ("opencv-doc", "../../opencv4/html/face_swapped.jpg", 1),
    "person_multi_det": ("opencv-doc", "../../opencv4/html/person_multi_det.jpg", 0),  # people, faces ~5 px
}


def _skimage(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return np.ascontiguousarray(np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3])


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pan_clip(img: np.ndarray, frames: int = 9, size: int = 256) -> np.ndarray:
    """A slow pan and zoom over a photo -> (F, size, size, 3): a 'real clip' from a still."""
    import cv2

    H, W = img.shape[:2]
    side = min(H, W)
    out = []
    for t in range(frames):
        s = int(side * (0.9 - 0.02 * t))
        y, x = (H - s) // 2, min(W - s, (W - s) // 2 + 2 * t)
        out.append(cv2.resize(img[y : y + s, x : x + s], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def real_clips(opencv_data: Path | None, n_frames: int = 9) -> list[tuple[str, np.ndarray]]:
    """>= 20 real clips no model made, as decoded RGB frames."""
    from sora_train.data.video_io import decode_video

    clips: list[tuple[str, np.ndarray]] = []
    if opencv_data and (opencv_data / "vtest.avi").is_file():
        for name, count in (("vtest.avi", 14), ("tree.avi", 4)):
            frames = decode_video((opencv_data / name).read_bytes(), backend="pyav")
            for i, start in enumerate(np.linspace(0, len(frames) - n_frames, count).astype(int)):
                clips.append((f"{name}[{start}:{start + n_frames}]", frames[start : start + n_frames]))
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry", "cat"):
        try:
            clips.append((f"skimage.{name} (pan)", pan_clip(_skimage(name), n_frames)))
        except Exception:  # an image a given scikit-image version lacks
            continue
    if opencv_data and (opencv_data / "messi5.jpg").is_file():
        for name in ("messi5.jpg", "baboon.jpg", "fruits.jpg", "building.jpg"):
            if (opencv_data / name).is_file():
                clips.append((f"opencv-doc {name} (pan)", pan_clip(_read_image(opencv_data / name), n_frames)))
    return clips


def generated_clips(n_pipeline: int, n_shapes: int, frames: int = 9, size: int = 256) -> list[tuple[str, np.ndarray]]:
    """Videos the project generates: VideoPipeline on debug-size models, and the shapes world."""
    import torch

    from sora_train.data.shapes import ShapesWorld
    from sora_train.models.dit import build_dit
    from sora_train.models.text import TinyTextEncoder
    from sora_train.models.vae import build_vae
    from sora_train.training.pipeline import VideoPipeline, to_uint8

    torch.manual_seed(0)
    vae = build_vae(size="debug")
    text = TinyTextEncoder(dim=128, depth=2, num_heads=4, vocab_size=4096, max_length=64)
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    pipe = VideoPipeline(vae, text, dit, meta={"weights_sha256": MODEL_HASH})
    clips = []
    prompts = ["a red circle moving left", "waves on a beach at dusk", "a city street in the rain", "a kite over a hill", "a cat on a sofa"]
    for i in range(n_pipeline):
        gen = pipe.generate([prompts[i % len(prompts)]], frames, size, size, steps=2, guidance_scale=1.0, seed=i)
        clips.append((f"pipeline seed {i}", to_uint8(gen.video)[0]))
    world = ShapesWorld(height=size, width=size, num_frames=frames)
    rng = np.random.default_rng(0)
    for i in range(n_shapes):
        attrs = world.attrs_for(i, seed=0)
        clips.append((f"shapes world {i} ({attrs.caption()})", world.render(attrs, rng)))
    return clips


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / max(1e-9, np.mean((a.astype(float) - b) ** 2))))


def bench_watermark(args) -> None:
    from sora_train.data.video_io import decode_video, encode_video
    from sora_train.provenance import Provenance, write_generated_video
    from sora_train.provenance import watermark as wm

    print("## watermark")
    gen = generated_clips(args.pipeline_videos, args.shapes_videos)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t_embed = 0.0
        for name, frames in gen:
            path = Path(tmp) / "v.mp4"
            t = time.perf_counter()
            rep = write_generated_video(path, frames, 8.0, {"prompt": name, "model_sha256": MODEL_HASH}, Provenance())
            t_embed += time.perf_counter() - t
            assert rep.watermarked, rep.notes
            written = decode_video(path.read_bytes())
            psnr = _psnr(wm.embed(frames, MODEL_HASH), frames), _psnr(written, frames)
            accs = {}
            for container in ("mp4", "mkv"):
                again = decode_video(encode_video(written, 8.0, container=container, crf=28))
                accs[container] = wm.bit_accuracy(again, MODEL_HASH)
                accs[container + "_detect"] = wm.detect(again)
            rows.append((name, psnr, accs))
    print(f"{len(rows)} generated videos, {gen[0][1].shape[0]} frames of {gen[0][1].shape[2]}x{gen[0][1].shape[1]}; "
          f"write_generated_video {1000 * t_embed / sum(len(f) for _, f in gen):.0f} ms/frame (watermark + encode)")
    print("| video | PSNR (dB): watermark alone / written file | bit acc. CRF 28 mp4 | bit acc. CRF 28 mkv | detected (mp4, mkv) | model id read |")
    print("|---|---|---|---|---|---|")
    for name, psnr, a in rows:
        d1, d2 = a["mp4_detect"], a["mkv_detect"]
        print(f"| {name} | {psnr[0]:.1f} / {psnr[1]:.1f} | {a['mp4']:.3f} | {a['mkv']:.3f} | {d1.present}, {d2.present} | {d1.model_id}, {d2.model_id} |")
    mp4 = [a["mp4"] for _, _, a in rows]
    mkv = [a["mkv"] for _, _, a in rows]
    print(f"bit accuracy after CRF 28: mp4 mean {np.mean(mp4):.4f} min {np.min(mp4):.4f}; mkv mean {np.mean(mkv):.4f} min {np.min(mkv):.4f}; "
          f"videos >= 0.95: {sum(x >= 0.95 for x in mp4)}/{len(mp4)} (mp4), {sum(x >= 0.95 for x in mkv)}/{len(mkv)} (mkv)")
    # The known limitation: mostly pure-white frames (see sora_train/provenance/watermark.py).
    white = [255 - f for _, f in gen[-2:]]
    accs = [wm.bit_accuracy(decode_video(encode_video(wm.embed(f, MODEL_HASH), 8.0, crf=28)), MODEL_HASH) for f in white]
    print(f"limitation, not in the count above: the last 2 shapes clips inverted (a shape on pure white): bit accuracy {accs[0]:.3f}, {accs[1]:.3f}")

    real = real_clips(args.opencv_data)
    print(f"\n{len(real)} real clips (no model made them), as decoded and after a CRF 28 re-encode:")
    print("| clip | magic bits matched (of 24) | after CRF 28 | detected |")
    print("|---|---|---|---|")
    false = 0
    most = 0
    for name, frames in real:
        r0 = wm.detect(frames)
        r1 = wm.detect(decode_video(encode_video(frames, 8.0, crf=28)))
        false += r0.present + r1.present
        most = max(most, r0.magic_match, r1.magic_match)
        print(f"| {name} | {r0.magic_match} | {r1.magic_match} | {r0.present or r1.present} |")
    print(f"false detections: {false} of {2 * len(real)} reads; most magic bits matched by chance: {most}/24 (threshold {wm.MAGIC_MIN_MATCH})")


def bench_c2pa(args) -> None:
    from provenance_helpers import make_pki

    from sora_train.provenance import Provenance, write_generated_video
    from sora_train.provenance.sign import load_identity
    from sora_train.provenance.verify import read_manifest

    print("\n## C2PA")
    gen = generated_clips(args.pipeline_videos, args.shapes_videos)
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp) / "pki")
        prov = Provenance(load_identity(pki.cert, pki.key))
        anchors = pki.ca.read_text()
        ok = tampered_fail = 0
        t_sign = t_verify = 0.0
        small = generated_clips(0, 4, size=32)  # also the 32x32 size the shapes recipes sample at
        for i, (name, frames) in enumerate(gen + small):
            path = Path(tmp) / f"{i}.mp4"
            t = time.perf_counter()
            rep = write_generated_video(path, frames, 8.0, {"prompt": name, "model_sha256": MODEL_HASH, "steps": 2}, prov)
            t_sign += time.perf_counter() - t
            data = path.read_bytes()
            t = time.perf_counter()
            m = read_manifest(data, "video/mp4", anchors)
            t_verify += time.perf_counter() - t
            ok += rep.signed and m.valid and m.trusted and m.ours
            bad = bytearray(data)
            j = bad.find(b"mdat") + 8 + len(bad) // 97 % 200  # a byte inside the coded frames
            bad[j] ^= 0x01
            tampered_fail += not read_manifest(bytes(bad), "video/mp4", anchors).valid
        n = len(gen) + len(small)
    print(f"{n} generated files ({len(gen)} at 256x256, {len(small)} at 32x32): {ok}/{n} verify (Trusted, claims ours); "
          f"one flipped byte in mdat: {tampered_fail}/{n} fail verification")
    print(f"write incl. watermark + sign: {1000 * t_sign / n:.0f} ms/file; verify: {1000 * t_verify / n:.0f} ms/file")


def bench_faces(args) -> None:
    from sora_train.data.faces import FaceBlur

    print("\n## face blur")
    blur = FaceBlur()
    found = total = false = 0
    print("| photo | faces (by hand) | boxes | on a face | ms |")
    print("|---|---|---|---|---|")
    for name, (src, file, faces) in FACE_PHOTOS.items():
        if src == "skimage":
            img = _skimage(file)
        else:
            if not args.opencv_data or not (args.opencv_data / file).is_file():
                print(f"| {name} | {faces} | (opencv-doc not installed) | | |")
                continue
            img = _read_image(args.opencv_data / file)
        t = time.perf_counter()
        boxes = blur.detect(img)
        ms = 1000 * (time.perf_counter() - t)
        hits = _hits_by_hand(name, boxes)
        found += min(hits, faces)
        total += faces
        false += max(0, len(boxes) - hits)
        print(f"| {name} | {faces} | {len(boxes)} | {hits} | {ms:.0f} |")
    print(f"recall {found}/{total}; boxes on no face: {false}")
    if args.opencv_data and (args.opencv_data / "vtest.avi").is_file():
        _ingest_cost(args.opencv_data / "vtest.avi")
    else:
        print("ingest cost: needs opencv-doc's vtest.avi (real footage); skipped")


# Face centres in each photo, located by hand (pixels): a box "hits" when it holds one.
_FACE_CENTRES = {
    "astronaut": [(220, 110)],
    "camera": [(230, 150)],
    "messi5": [(250, 112)],
    "facereg": [(48, 45), (52, 143), (152, 47), (143, 133)],
    "face_swapped": [(150, 135)],
    "person_multi_det": [],
}


def _hits_by_hand(name: str, boxes) -> int:
    centres = _FACE_CENTRES[name]
    return sum(any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes) for x, y in centres)


def _ingest_cost(video: Path) -> None:
    """Seconds per clip of `sora-data ingest` with and without --blur-faces, in-process."""
    from sora_train.data.video_io import decode_video, encode_video
    from sora_train.data_tools.ingest import IngestOptions, ingest

    frames = decode_video(video.read_bytes(), backend="pyav")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        n = 6
        for i in range(n):
            start = i * 100
            (src / f"c{i}.mp4").write_bytes(encode_video(frames[start : start + 20], 10))  # 2 s at 768x576
            (src / f"c{i}.txt").write_text("people walking")
        times = {}
        for blur in (False, True):
            t = time.perf_counter()
            ingest([str(src)], Path(tmp) / f"out{blur}", IngestOptions(workers=0, blur_faces=blur, min_clip_seconds=0.5), quiet=True)
            times[blur] = (time.perf_counter() - t) / n
    print(f"ingest of 2 s clips at 768x576 (vtest.avi, 20 frames): {times[False]:.2f} s/clip plain, {times[True]:.2f} s/clip with --blur-faces "
          f"({times[True] / times[False]:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=("watermark", "c2pa", "faces"), default=("watermark", "c2pa", "faces"))
    p.add_argument("--opencv-data", type=Path, default=Path("/usr/share/doc/opencv-doc/examples/data"),
                   help="opencv-doc's examples/data folder (real videos and photos)")
    p.add_argument("--pipeline-videos", type=int, default=10)
    p.add_argument("--shapes-videos", type=int, default=10)
    args = p.parse_args()
    if not args.opencv_data.is_dir():
        print(f"note: {args.opencv_data} not found (apt-get install opencv-doc): real videos and some face photos are skipped")
        args.opencv_data = None
    for name in args.only:
        {"watermark": bench_watermark, "c2pa": bench_c2pa, "faces": bench_faces}[name](args)


if __name__ == "__main__":
    main()
