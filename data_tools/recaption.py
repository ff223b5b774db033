"""`sora-data recaption`: a shard set -> a new shard set whose captions the re-writer expanded.

    sora-data recaption data/shards/mine --out data/shards/mine_rw --rewriter template
    OPENAI_API_KEY=... sora-data recaption data/shards/mine --out data/shards/mine_vlm \\
        --rewriter openai --rewriter-opt model=Qwen/Qwen2.5-VL-7B-Instruct \\
        --rewriter-opt base_url=http://gpu01:8000/v1 --visual --frames 4 --concurrency 32

The re-writer is a ``conf/rewriter/NAME.yaml`` option composed with ``--rewriter-opt``
overrides (the same composition ``sora-sample --rewriter`` uses). Samples are read in order
and sent in chunks of ``--batch-size`` to ``Rewriter.rewrite``, which runs ``concurrency``
requests at once; each chunk is written in input order through ShardSetWriter, so a
deterministic backend gives the same shards on every run. Per sample:

- every member but the json (the media) is copied byte for byte;
- ``captions`` keeps every earlier caption by source and gains ``rewritten``;
  ``captions_meta.rewritten`` records the backend identity and the status (rewritten,
  cached, identity, fallback + a one-line error). ``caption`` becomes the rewrite;
- on a fallback (the backend failed after its retries, the caption was empty, the frames did
  not decode) ``caption`` and ``captions`` stay as they were, and the sample is still written.

``--visual``: N evenly spaced frames of each clip (an image: the image) are decoded, fitted
within ``--frame-size`` pixels, encoded as JPEG/PNG and sent with the caption; the openai
backend passes them to a vision-language model as ``image_url`` parts.

Re-running into the same --out resumes: ``done.jsonl`` lists the samples of every finished
shard; those keys are skipped (no request is made for them), new samples go into new shard
files numbered after the existing ones, and index.json is rebuilt over all of them. Samples
that fell back are written too and so are not retried by a re-run: recaption the finished set
again into a new --out with a ``cache_dir`` to redo only those (the rest are cache hits).

A backend that fails for most samples (a dead server, a wrong key) would otherwise fill the
set with fallbacks: when more than ``--max-fallback-rate`` of this run's requests fell back,
the run stops before writing that chunk (exit 1); finished shards stay and a re-run resumes.

Nothing secret is written: the backend's ``identity()`` and ``config()`` name the environment
variable holding a key, never the key, and error messages are scrubbed of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from sora_train.data.shards import REJECTS_NAME, REQUIRED_META, iter_samples, read_index, sample_entry, shard_paths
from sora_train.data.shardset import ShardLedger, ShardSetSpec, ShardSetWriter
from sora_train.data.video_io import IMAGE_EXTS, VIDEO_EXTS
from sora_train.data_tools.parts import Part, add_part_argument, finish_part, part_done, part_label, resolve_part, say_done
from sora_train.data_tools.probe import display_path, print_run_summary, progress, short
from sora_train.utils import get_logger, stable_hash
from sora_train.utils.errors import SoraError

if TYPE_CHECKING:
    from sora_train.rewrite import Rewriter

log = get_logger(__name__)

TOOL = "sora-data recaption"
# Bump when the json written for the same input, options and rewrite changes.
RECAPTION_FORMAT = "sora_train.recaption/1"
CAPTION_SOURCE = "rewritten"  # the key added to each sample's ``captions``
FRAME_FORMATS = ("jpg", "png")
STATUSES = ("rewritten", "cached", "identity", "fallback")
_SECRETISH = re.compile(r"key|token|secret|passw", re.I)


class RecaptionFailed(SoraError):
    """The run could not produce a usable shard set (exit status 1, not the usage error's 2)."""

    exit_code = 1


@dataclass(frozen=True)
class RecaptionOptions:
    """Options of one recaption. The first group decides what is written (hashed with the
    re-writer's identity, recorded in index.json, and must match when resuming); the rest only how."""

    source_caption: str = "original"
    visual: bool = False
    frames: int = 4
    frame_size: int = 512  # longest side of a frame sent to the model; VLMs downscale anyway
    frame_format: str = "jpg"
    # -- how (not hashed) --
    batch_size: int = 64
    workers: int = 2
    limit: int | None = None
    max_fallback_rate: float = 0.5
    shard_max_count: int = 1000
    shard_max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        checks = [
            (bool(self.source_caption) and self.source_caption != CAPTION_SOURCE,
             f"--source-caption must name an earlier caption source (like original), not {self.source_caption!r}"),
            (self.frames >= 1, "--frames must be >= 1"),
            (self.frame_size >= 0, "--frame-size must be >= 0 (0: frames at their own size)"),
            (self.frame_format in FRAME_FORMATS, f"--frame-format must be one of {FRAME_FORMATS}"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.workers >= 1, "--workers must be >= 1"),
            (self.limit is None or self.limit >= 0, "--limit must be >= 0"),
            (0 <= self.max_fallback_rate <= 1, "--max-fallback-rate must be in [0, 1]"),
            (self.shard_max_count >= 1, "--shard-size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SoraError(msg)

    def written(self, identity: dict[str, Any]) -> dict[str, Any]:
        """The options that decide the output, with the re-writer identity that produces it."""
        out: dict[str, Any] = {"rewriter": identity, "source_caption": self.source_caption, "visual": self.visual}
        if self.visual:
            out.update(frames=self.frames, frame_size=self.frame_size, frame_format=self.frame_format)
        return out

    def options_hash(self, identity: dict[str, Any]) -> str:
        return stable_hash({"format": RECAPTION_FORMAT, **self.written(identity)})


# -- the re-writer ---------------------------------------------------------------------------
def build_rewriter(name: str, overrides: list[str], concurrency: int | None = None) -> Rewriter:
    """``conf/rewriter/NAME.yaml`` + ``key=value`` overrides -> a Rewriter (SoraError naming
    the option when it does not compose or construct)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    from sora_train.rewrite.options import rewriter_from_option

    for o in overrides:
        if "=" not in o:
            raise SoraError(f"--rewriter-opt {o!r}: expected KEY=VALUE (e.g. model=Qwen/Qwen2.5-VL-7B-Instruct)")
    if concurrency is not None:
        if concurrency < 1:
            raise SoraError(f"--concurrency {concurrency} must be >= 1")
        overrides = [*overrides, f"concurrency={concurrency}"]
    try:
        return rewriter_from_option(name, list(overrides))
    except SoraError as e:  # a bad override; do not echo what looks like a credential typed on the command line
        msg = str(e)
        for o in overrides:
            k, _, v = o.partition("=")
            if v and _SECRETISH.search(k) and k.lstrip("+~") != "api_key_env":
                msg = msg.replace(v, "***")
        raise SoraError(msg) from None
    except InstantiationException as e:
        cause = e.__cause__
        msg = str(cause) if isinstance(cause, SoraError) else f"{short(cause or e)} (check the --rewriter-opt values)"
        raise SoraError(f"--rewriter {name}: {msg}") from None
    except OmegaConfBaseException as e:
        hint = " (set it with --rewriter-opt KEY=VALUE)" if type(e).__name__ == "MissingMandatoryValue" else ""
        raise SoraError(f"--rewriter {name}: {short(e)}{hint}") from None


# -- frames for visual recaptioning ----------------------------------------------------------
def frame_indices(num_frames: int, n: int) -> list[int]:
    """``n`` evenly spaced frames of ``num_frames``: the middle of n equal spans (so never a
    fade-in first or fade-out last frame); every frame when there are no more than n."""
    if num_frames <= n:
        return list(range(max(num_frames, 1)))
    return [int((i + 0.5) * num_frames / n) for i in range(n)]


def sample_frames(data: bytes, ext: str, num_frames: int, n: int, max_side: int, fmt: str) -> list[bytes]:
    """Encoded frames (JPEG/PNG bytes) of one sample's media: n evenly spaced frames of a
    video, or the image itself, each fitted within ``max_side`` pixels (0: as they are)."""
    from PIL import Image

    from sora_train.data.video_io import decode_image, decode_video, encode_image, probe_video

    if ext in IMAGE_EXTS:
        frames = decode_image(data)  # (1, H, W, 3)
    else:
        total = num_frames if num_frames > 0 else probe_video(data).num_frames
        frames = decode_video(data, frame_indices(total, n))  # (n, H, W, 3)
    out = []
    for frame in frames:
        if max_side and max(frame.shape[:2]) > max_side:
            im = Image.fromarray(frame)
            im.thumbnail((max_side, max_side), Image.BICUBIC)
            frame = np.asarray(im)
        out.append(encode_image(frame, fmt))
    return out


# -- the ledger ------------------------------------------------------------------------------
def _ledger_entry(key: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A sample found in a shard the ledger lacks (a killed run): its rewrite status from its json."""
    status = ((meta.get("captions_meta") or {}).get(CAPTION_SOURCE) or {}).get("status", "fallback")
    return {**sample_entry(key, meta), "status": status}


# -- the run ---------------------------------------------------------------------------------
@dataclass
class _Item:
    key: str
    members: dict[str, bytes]  # every member but the json, copied untouched
    meta: dict[str, Any]
    prompt: str
    media_ext: str | None
    images: list[bytes] | None = None
    status: str | None = None  # set before the rewrite when the sample cannot be sent
    error: str | None = None


def _input_samples(shards: list[tuple[Path, str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for shard_dir, path in shards:
        for sample in iter_samples(path):
            yield f"{display_path(shard_dir)}/{Path(path).name}", sample


def _to_item(sample: dict[str, Any], source_caption: str) -> _Item | tuple[str, str]:
    """A sample to rewrite, or (reason, detail) when it cannot be written."""
    members = {k: v for k, v in sample.items() if k not in ("__key__", "json")}
    if "json" not in sample or not members:
        return "missing_media_or_json", f"members {sorted(k for k in sample if k != '__key__')}"
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return "bad_json", short(e, 120)
    if not isinstance(meta, dict):
        return "bad_json", "the json is not an object"
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        return "bad_json", f"the json lacks {missing}"
    captions = meta.get("captions") if isinstance(meta.get("captions"), dict) else {}
    prompt = captions.get(source_caption)
    if not isinstance(prompt, str) or not prompt.strip():
        prompt = meta.get("caption") if isinstance(meta.get("caption"), str) else ""
    media_ext = next((e for e in VIDEO_EXTS + IMAGE_EXTS if e in members), None)
    return _Item(sample["__key__"], members, meta, prompt, media_ext)


def _new_meta(item: _Item, status: str, error: str | None, text: str, identity: dict[str, Any], opts: RecaptionOptions) -> dict[str, Any]:
    meta = dict(item.meta)
    captions = dict(meta.get("captions") or {}) if isinstance(meta.get("captions"), dict) else {}
    if "original" not in captions and isinstance(meta.get("caption"), str) and meta["caption"]:
        captions["original"] = meta["caption"]  # a set written without captions: keep what it trained on
    info: dict[str, Any] = {"identity": identity, "status": status, "from": opts.source_caption}
    if opts.visual:
        info["frames"] = len(item.images or [])
    if status == "fallback":
        info["error"] = short(error or "unknown", 200)
    else:
        from sora_train.utils.pii import scrub

        # A re-writer's text can invent an address or a number; personal data never reaches a shard
        # (the user's own captions stay as ingest left them, --keep-pii included).
        text = scrub(text)
        captions[CAPTION_SOURCE] = text
        meta["caption"] = text
    meta["captions"] = captions
    earlier = meta.get("captions_meta") if isinstance(meta.get("captions_meta"), dict) else {}
    meta["captions_meta"] = {**earlier, CAPTION_SOURCE: info}
    return meta


def _fallback_reason(error: str | None) -> str:
    return short(error or "unknown", 100)


def recaption(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    rewriter: Rewriter,
    options: RecaptionOptions = RecaptionOptions(),
    rewriter_name: str | None = None,
    quiet: bool = False,
    part: Part | None = None,
) -> dict[str, Any]:
    """Recaption the shard sets ``inputs`` into ``out`` with ``rewriter``; returns index.json.
    With ``part``, only that part of the input shards, into ``out/parts/part-K-of-N``
    (data_tools/parts.py; `sora-data merge` joins the parts).

    Raises SoraError for bad inputs/options (exit 2) and RecaptionFailed (exit 1) when --out
    cannot be written, too many requests fell back, or the set holds no sample at the end.
    """
    t0 = time.monotonic()
    out = Path(out)
    in_dirs = [Path(p) for p in inputs]
    if not in_dirs:
        raise SoraError("give the SHARDS directory to recaption")
    in_indexes = [read_index(d) for d in in_dirs]  # SoraError when one is not a shard set
    identity = rewriter.identity()
    opts_hash = options.options_hash(identity)
    in_shards = [(d, p) for d in in_dirs for p in shard_paths(d)]
    counts = {str(Path(d) / s["name"]): int(s.get("count") or 0) for d, ix in zip(in_dirs, in_indexes) for s in ix.get("shards") or []}
    label, set_dir = f"--out {display_path(out)}", out
    if part is not None:  # the units are the input shards, in the order one run reads them
        units = [display_path(p) for _, p in in_shards]
        finished = part_done(part, out, TOOL, opts_hash, units)
        if finished is not None:
            say_done(part, out, finished, quiet)
            return finished
        in_shards, label, set_dir = part.select(in_shards), part_label(part, out), part.dir(out)
    spec = ShardSetSpec(tool=TOOL, label=label, verb="recaptioned", options=options.written(identity),
                        options_hash=opts_hash, reject_field="key", failure=RecaptionFailed, sources=tuple(in_dirs))
    shard_set = ShardSetWriter(set_dir, spec, partial(ShardLedger, describe=_ledger_entry),
                               max_count=options.shard_max_count, max_bytes=options.shard_max_bytes)
    total = sum(counts.get(str(p), 0) for _, p in in_shards)
    run: dict[str, Any] = {"inputs": [display_path(d) for d in in_dirs], "written": 0, "skipped": 0,
                           "rejected": Counter(), "status": Counter({s: 0 for s in STATUSES}), "fallback_reasons": Counter(),
                           "requests_fell_back": 0, "requests": 0}
    pool = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="recaption-frames") if options.visual else None
    done = shard_set.done  # written by earlier runs
    seen_keys: set[str] = set()  # met in this run
    stopped: str | None = None

    def flush(chunk: list[_Item], advance) -> None:
        nonlocal stopped
        if pool is not None:
            _attach_frames(chunk, pool, options)
        send = [it for it in chunk if it.status is None]
        for it in send:
            if not it.prompt.strip() and not it.images:
                it.status, it.error = "fallback", "empty caption (and no frames to describe)"
        send = [it for it in send if it.status is None]
        results = rewriter.rewrite([it.prompt for it in send], [it.images or [] for it in send] if options.visual else None) if send else []
        by_key = {it.key: r for it, r in zip(send, results)}
        run["requests"] += len(send)
        run["requests_fell_back"] += sum(1 for r in results if r.status == "fallback")
        # A dead server or a wrong key: stop before filling the set with fallbacks.
        if run["requests"] and run["requests_fell_back"] / run["requests"] > options.max_fallback_rate:
            errors = Counter(_fallback_reason(r.error) for r in results if r.status == "fallback")
            stopped = (f"{run['requests_fell_back']} of {run['requests']} rewrite requests fell back "
                       f"(more than --max-fallback-rate {options.max_fallback_rate:g}); most common: "
                       f"{errors.most_common(1)[0][0] if errors else 'unknown'}")
            return
        for it in chunk:
            r = by_key.get(it.key)
            status, error, text = (r.status, r.error, r.text) if r is not None else (it.status, it.error, it.prompt)
            if status == "fallback":  # Rewriter redacts every fallback's error before returning it
                run["fallback_reasons"][_fallback_reason(error)] += 1
            meta = _new_meta(it, status, error, text, identity, options)
            shard_set.write(it.key, it.members, meta, status=status)
            run["status"][status] += 1
            run["written"] += 1
            advance(_describe(run))

    try:
        with shard_set, progress("recaption", total) as advance:
            chunk: list[_Item] = []
            for shard_name, sample in _input_samples(in_shards):
                key = sample["__key__"]
                if key in done:  # no request for it
                    run["skipped"] += 1
                    advance()
                    continue
                if options.limit is not None and run["written"] + len(chunk) >= options.limit:
                    break
                item = _to_item(sample, options.source_caption) if key not in seen_keys else ("duplicate_key", "an earlier sample had this key")
                seen_keys.add(key)
                if isinstance(item, tuple):
                    shard_set.reject(f"{shard_name}:{key}", item[0], item[1], key=key)
                    run["rejected"][item[0]] += 1
                    advance()
                    continue
                chunk.append(item)
                if len(chunk) >= options.batch_size:
                    flush(chunk, advance)
                    chunk = []
                    if stopped:
                        break
            if chunk and not stopped:
                flush(chunk, advance)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    run["rejected"] = dict(run["rejected"].most_common())
    run["status"] = dict(run["status"])
    run["fallback_reasons"] = dict(run["fallback_reasons"].most_common())
    run["stopped"] = stopped
    run["rewriter_config"] = rewriter.config()
    run["wall_seconds"] = round(time.monotonic() - t0, 3)
    statuses = Counter({s: 0 for s in STATUSES})
    statuses.update(entry["status"] for _, entry in shard_set.ledger.entries())
    index = shard_set.close(
        run, seen_keys,
        recaption_format=RECAPTION_FORMAT,
        # config() names the env var holding a key (api_key_env), never the key itself.
        rewriter={"name": rewriter_name, "identity": identity, "config": rewriter.config()},
        inputs=[{"path": display_path(d), "tool": ix.get("tool"), "num_samples": ix.get("num_samples"),
                 "created": ix.get("created"), "options_hash": ix.get("options_hash")} for d, ix in zip(in_dirs, in_indexes)],
        rewrite_status=dict(statuses),
    )
    if not quiet:
        print_summary(index, run, set_dir)
    if stopped:
        raise RecaptionFailed(f"stopped: {stopped}; {run['written']} samples written to {display_path(set_dir)}, a re-run resumes")
    if part is not None:  # a part may hold no sample; the merge judges the whole set
        finish_part(part, out, TOOL, opts_hash, units, "shards", index)
        return index
    if index["num_samples"] == 0:
        raise RecaptionFailed(f"nothing was written to {display_path(out)}: the input holds no usable sample (see {REJECTS_NAME})")
    return index


def _describe(run: dict[str, Any]) -> str:
    s = run["status"]
    return f"recaption: {s['rewritten'] + s['cached'] + s['identity']} rewritten, {s['fallback']} fallback"


def _attach_frames(chunk: list[_Item], pool: ThreadPoolExecutor, opts: RecaptionOptions) -> None:
    """Decodes each item's frames (in worker threads: decord and PIL release the GIL)."""

    def one(it: _Item) -> None:
        if it.media_ext is None:
            it.status, it.error = "fallback", f"frames: no decodable media member (has {sorted(it.members)})"
            return
        try:
            n = int(it.meta.get("num_frames") or 0)
            it.images = sample_frames(it.members[it.media_ext], it.media_ext, n, opts.frames, opts.frame_size, opts.frame_format)
        except Exception as e:  # noqa: BLE001 - a clip that does not decode costs its rewrite, not the run
            it.status, it.error = "fallback", f"frames: {type(e).__name__}: {short(e, 120)}"

    list(pool.map(one, chunk))


def print_summary(index: dict[str, Any], run: dict[str, Any], out: Path) -> None:
    ident = index["rewriter"]["identity"]
    rows = [("samples written", run["written"], index["num_samples"])]
    rows += [(f"  {s}", run["status"].get(s, 0), index["rewrite_status"].get(s, 0)) for s in STATUSES]
    rows.append(("skipped (already in --out)", run["skipped"], ""))
    print_run_summary(f"recaption ({ident.get('backend')}: {ident.get('model')}) -> {display_path(out)}", rows, run, index,
                      top=("fallback reasons (top 10; the original caption was kept)", ("reason", "samples"), run["fallback_reasons"]))


# -- CLI -------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RecaptionOptions()
    p.add_argument("inputs", nargs="+", metavar="SHARDS", help="shard set directories (with index.json) to recaption")
    p.add_argument("--out", required=True, help="the new shard set; re-running into it adds only what is missing")
    p.add_argument("--rewriter", required=True, metavar="NAME", help="conf/rewriter option: template, openai, hf, identity")
    p.add_argument("--rewriter-opt", action="append", metavar="KEY=VALUE",
                   help="override a re-writer option, e.g. model=..., base_url=..., cache_dir=... (repeatable)")
    p.add_argument("--source-caption", default=d.source_caption, help="which caption source to rewrite (falls back to `caption`)")
    g = p.add_argument_group("visual recaptioning")
    g.add_argument("--visual", action="store_true", help="send frames of each clip with its caption (a vision-language model)")
    g.add_argument("--frames", type=int, default=d.frames, help="evenly spaced frames per clip (an image sends itself)")
    g.add_argument("--frame-size", type=int, default=d.frame_size, help="longest side of a sent frame in pixels (0: as decoded)")
    g.add_argument("--frame-format", choices=FRAME_FORMATS, default=d.frame_format, help="how frames are encoded")
    g = p.add_argument_group("how")
    g.add_argument("--concurrency", type=int, help="requests in flight (overrides the re-writer's concurrency option)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads decoding frames (--visual)")
    g.add_argument("--batch-size", type=int, help="samples per rewrite() call (default: max(64, 4 x concurrency))")
    g.add_argument("--limit", type=int, help="write at most this many new samples, then stop (a re-run continues)")
    g.add_argument("--max-fallback-rate", type=float, default=d.max_fallback_rate,
                   help="stop (exit 1) when more than this fraction of this run's requests fell back (1: never)")
    g.add_argument("--shard-size", type=int, default=d.shard_max_count, help="samples per shard")
    g.add_argument("--shard-max-mb", type=float, default=d.shard_max_bytes / 2**20, help="MiB per shard")
    add_part_argument(g)


def run(args: argparse.Namespace) -> int:
    part = resolve_part(args.part)
    options = RecaptionOptions(  # checked before composing the re-writer, which can be slow (hf loads a model)
        source_caption=args.source_caption, visual=args.visual, frames=args.frames, frame_size=args.frame_size,
        frame_format=args.frame_format, batch_size=64 if args.batch_size is None else args.batch_size, workers=args.workers,
        limit=args.limit, max_fallback_rate=args.max_fallback_rate, shard_max_count=args.shard_size,
        shard_max_bytes=int(args.shard_max_mb * 2**20),
    )
    rewriter = build_rewriter(args.rewriter, args.rewriter_opt or [], args.concurrency)
    if args.batch_size is None:  # enough samples per chunk to keep every request slot busy
        options = replace(options, batch_size=max(64, 4 * int(getattr(rewriter, "concurrency", 1))))
    recaption(args.inputs, args.out, rewriter, options, rewriter_name=args.rewriter, part=part)
    return 0
