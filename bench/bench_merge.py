"""What `sora-data merge` costs next to writing the shards it joins.

    python bench/bench_merge.py                                  # ~20 s: 4 parts x 250 shards x 100 samples
    python bench/bench_merge.py --parts 32 --shards 40 --per-shard 1000   # 1.28 M samples

Writes N parts through the real writer (`ShardSetWriter`, as ingest/recaption/cache-latents do;
tiny 64-byte media, so writing is as cheap as it can be), marks them finished, then merges them
and prints the merge's wall time, samples per second, and its ratio to the time the parts took
to write. The merge renames shards (no copy) and reads every part's ledger once, so it grows with
the number of samples, not their bytes; real parts take far longer to write than these (decoding,
encoding), so the ratio printed is an upper bound.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from sora_train.data.shardset import ShardSetSpec, ShardSetWriter
from sora_train.data_tools.parts import Part, finish_part, merge


def write_parts(root: Path, parts: int, shards: int, per_shard: int) -> None:
    units = [f"input-{k}" for k in range(parts)]  # one unit per part: what finish_part records
    meta = {"caption": "a square", "captions": {"original": "a square"}, "fps": 10.0, "num_frames": 9, "width": 32, "height": 32,
            "duration": 0.9, "frame_range": [0, 9], "source": {}}
    for k in range(parts):
        part = Part(k, parts)
        spec = ShardSetSpec(tool="sora-data bench", label=part.name, verb="written", options={}, options_hash="bench")
        out = ShardSetWriter(part.dir(root), spec, max_count=per_shard)
        with out:
            for i in range(shards * per_shard):
                out.write(f"p{k:04d}_{i:08d}", {"mp4": b"\0" * 64}, meta)
        finish_part(part, root, "sora-data bench", "bench", units, "inputs", out.close({}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--shards", type=int, default=250, help="shards per part")
    ap.add_argument("--per-shard", type=int, default=100, help="samples per shard")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        t0 = time.perf_counter()
        write_parts(root / "set", args.parts, args.shards, args.per_shard)
        t1 = time.perf_counter()
        index = merge(root / "set", quiet=True)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n, write_s, merge_s = index["num_samples"], t1 - t0, t2 - t1
    print(f"{args.parts} parts, {len(index['shards'])} shards, {n} samples: write {write_s:.1f} s, merge {merge_s:.2f} s "
          f"({n / merge_s:,.0f} samples/s); merge / write = {merge_s / write_s:.3f}")


if __name__ == "__main__":
    main()
