"""Ulysses sequence parallelism: the same numbers as without it, on real gloo ranks.

- the DiT alone, 2 processes: forward equal, gradients summed over the group equal the
  single-process ones;
- through sora-train: SP=2 on 2 ranks trains with the losses of 1 rank, under DDP, ZeRO-2 and
  ZeRO-3; SP=2 x DP=2 on 4 ranks with the losses of DDP on 2 ranks (the loader gives both ranks
  of a group the same sample, the random streams follow the data-parallel rank);
- bad sizes are one-line errors at start-up.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "training"))
from cli_runs import BIN, ROOT, base_env, smoke_data_dir  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = textwrap.dedent('''
    import os, sys, json, torch, torch.distributed as dist
    from sora_train.models.dit import build_dit
    from sora_train.parallel.sequence import init_sequence_parallel, apply_sequence_parallel
    from sora_train.utils.dist_groups import sequence_parallel
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dit = build_dit("debug", in_channels=4, text_dim=32)
    with torch.no_grad():  # leave adaLN-Zero: a zero output would hide errors
        for p in dit.parameters():
            if not p.abs().max() > 0:
                p.normal_(0, 0.05)
    ref = build_dit("debug", in_channels=4, text_dim=32)
    ref.load_state_dict(dit.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 3, 8, 8, generator=g), torch.rand(2, generator=g)
    text, mask = torch.randn(2, 5, 32, generator=g), torch.ones(2, 5, dtype=torch.bool)
    cond = torch.tensor([[True, False, False], [False, False, True]])
    out_ref = ref(x, t, text, mask, cond)
    out_ref.pow(2).mean().backward()
    group = init_sequence_parallel(dist.get_world_size())
    apply_sequence_parallel(dit, group, *sequence_parallel()[1:])
    out = dit(x, t, text, mask, cond)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters()}
    for v in grads.values():
        dist.all_reduce(v)
    res = {"fwd": (out - out_ref).abs().max().item(),
           "grad": max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
           "grad_scale": max(p.grad.abs().max().item() for p in ref.parameters())}
    if dist.get_rank() == 0:
        print("RESULT", json.dumps(res))
    dist.destroy_process_group()
''')


def test_the_dit_split_over_two_ranks_computes_what_one_does(tmp_path):
    script = tmp_path / "sp.py"
    script.write_text(SCRIPT)
    env = base_env(WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    import json

    res = json.loads(next(ln for ln in outs[0].splitlines() if ln.startswith("RESULT")).split(" ", 1)[1])
    assert res["fwd"] <= 1e-6, res
    assert res["grad"] <= 1e-5 * max(1.0, res["grad_scale"]), res


def _losses(run_dir) -> tuple[list[float], list[float]]:
    rows = list(csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv")))))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")], [float(r["val/loss"]) for r in rows if r.get("val/loss")]


def _train(data, run_dir, *overrides, ok=True):
    r = subprocess.run([str(BIN / "sora-train"), "experiment=smoke", f"paths.data_dir={data}", "trainer.accelerator=cpu", "data.num_workers=0",
                        "callbacks.samples=null", "export=false", f"hydra.run.dir={run_dir}", *overrides],
                       cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return smoke_data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    """The reference: one process through the same DDP set-up (Lightning reseeds there)."""
    run = tmp_path_factory.mktemp("sp_ref")
    _train(data, run, "trainer.devices=1", "strategy=ddp")
    return _losses(run)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_sora_train_with_sp2_has_the_losses_of_one_rank(data, one_rank, tmp_path, strategy):
    _train(data, tmp_path / "sp", "trainer.devices=2", f"strategy={strategy}", "parallel.sequence_parallel_size=2")
    ref, sp = one_rank, _losses(tmp_path / "sp")
    assert len(ref[0]) == 4 and sp[0] == pytest.approx(ref[0], rel=1e-5) and sp[1] == pytest.approx(ref[1], rel=1e-5), (ref, sp)


def test_sp_groups_inside_data_parallel_groups(data, tmp_path):
    """4 ranks = 2 data-parallel groups of SP=2: the losses of plain DDP on 2 ranks."""
    _train(data, tmp_path / "dp2", "trainer.devices=2", "strategy=ddp")
    _train(data, tmp_path / "sp2dp2", "trainer.devices=4", "strategy=ddp", "parallel.sequence_parallel_size=2")
    ref, sp = _losses(tmp_path / "dp2"), _losses(tmp_path / "sp2dp2")
    assert sp[0] == pytest.approx(ref[0], rel=1e-5) and sp[1] == pytest.approx(ref[1], rel=1e-5), (ref, sp)


@pytest.mark.parametrize("overrides, message", [
    (["trainer.devices=2", "parallel.sequence_parallel_size=3"], "parallel.sequence_parallel_size=3 does not divide the world size 2"),
    (["trainer.devices=2", "parallel.sequence_parallel_size=2", "dit.hidden_size=48", "dit.num_heads=3"],
     "parallel.sequence_parallel_size=2 does not divide the DiT's 3 attention heads"),
    (["trainer.devices=2", "parallel.sequence_parallel_size=2", "data.buckets=[{num_frames:5,height:24,width:24,batch_size:4}]"],
     "does not divide the 27 tokens of bucket 5x24x24"),
])
def test_bad_sequence_parallel_sizes_are_one_line(data, tmp_path, overrides, message):
    r = _train(data, tmp_path / "bad", *overrides, ok=False)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors and message in errors[0], r.stderr[-3000:]


def test_sora_sample_on_two_ranks_draws_what_one_does(tmp_path):
    """sora-sample launched on 2 ranks (torchrun's environment) splits the DiT's tokens over
    them; rank 0 writes the same video one process writes."""
    import torch

    from sora_train.data.video_io import decode_video
    from sora_train.diffusion import FlowMatching
    from sora_train.models.dit import build_dit
    from sora_train.models.export import export_parts
    from sora_train.models.text import TinyTextEncoder
    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    vae, text = build_vae("debug"), TinyTextEncoder(dim=32, depth=1, num_heads=2, trainable=False)
    dit = build_dit("debug", in_channels=vae.latent_channels, text_dim=text.dim)
    with torch.no_grad():  # a non-zero output, so the comparison means something
        for p in dit.parameters():
            if not p.abs().max() > 0:
                p.normal_(0, 0.05)
    export = export_parts(tmp_path / "export", {"vae": vae, "text": text, "dit": dit}, {"task": "dit", "diffusion": FlowMatching().config()})
    cmd = [str(BIN / "sora-sample"), "--ckpt", str(export), "--prompt", "a red circle moving left", "--frames", "9", "--height", "32",
           "--width", "32", "--steps", "3"]
    one = subprocess.run([*cmd, "--out", str(tmp_path / "one")], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    env = base_env(WORLD_SIZE="2")
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / "two")], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    a = decode_video((tmp_path / "one" / "t2v_0000_000.mp4").read_bytes()).astype(int)
    b = decode_video((tmp_path / "two" / "t2v_0000_000.mp4").read_bytes()).astype(int)
    assert a.shape == b.shape and abs(a - b).max() <= 1
    assert a.std() > 1  # not a blank video
