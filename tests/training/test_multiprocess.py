"""Two CPU ranks (gloo) through the real CLI, for DDP, ZeRO-2 and ZeRO-3: train, checkpoint,
resume=auto, sample videos at the end (every rank takes part under ZeRO-3, where a forward
gathers parameters with collectives), export (consolidated from the sharded checkpoint under
DeepSpeed), and sora-export on a ZeRO-3 checkpoint. The three strategies must compute the same
thing: losses, weights and EMA weights agree.

Each strategy: run 1 trains 2 steps (checkpoint at 2), except DDP's, which trains on until a
SIGTERM to rank 0 alone (the other rank learns of it at the end of the step): both ranks save
that step and stop, rank 0 with status 75. Run 2 resumes and trains to step 4 (or one step past
the SIGTERM). The three strategies run side by side.
"""

from __future__ import annotations

import json
import math
import re
import signal

import pytest
import torch

from cli_runs import Run, csv_losses, history, smoke_data_dir, sora, wait_for
from sora_train.training.callbacks.checkpoint import PREEMPTED_EXIT_CODE

STRATEGIES = ("ddp", "deepspeed_stage_2", "deepspeed_stage_3")
TIMEOUT = 480

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def mp_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    data = smoke_data_dir(tmp_path_factory)
    base = tmp_path_factory.mktemp("multiprocess")
    common = ["experiment=smoke", f"paths.data_dir={data}", "trainer.accelerator=cpu", "trainer.devices=2", "data.num_workers=0",
              "callbacks.checkpoint.every_n_steps=2", "callbacks.checkpoint.keep_last=10"]
    dirs = {s: base / s for s in STRATEGIES}
    try:
        first = {s: Run(sora("sora-train", *common, f"strategy={s}", f"hydra.run.dir={dirs[s]}", "callbacks.samples=null", "export=false",
                             "trainer.max_steps=100" if s == "ddp" else "trainer.max_steps=2", "+logger.csv.flush_logs_every_n_steps=1"),
                        base / f"{s}_1.log") for s in STRATEGIES}
        wait_for(lambda: len(csv_losses(dirs["ddp"])) >= 2, TIMEOUT, "2 DDP steps", first["ddp"])
        first["ddp"].proc.send_signal(signal.SIGTERM)  # rank 0 only (the launching process)
        rc_sigterm = first["ddp"].wait(TIMEOUT, reap=False)
        try:  # rank 1 (rank 0's child, same process group) must stop too, not train on alone
            wait_for(lambda: not first["ddp"].group_alive(), 120, "rank 1 to exit after the SIGTERM")
            rank1_exited = True
        except pytest.fail.Exception:
            rank1_exited = False
        first["ddp"].reap()
        for s in STRATEGIES[1:]:
            first[s].ok(TIMEOUT)
        m = re.search(r"SIGTERM: saved the checkpoint of step (\d+)", first["ddp"].output())
        resumed_at = {s: 2 for s in STRATEGIES}
        resumed_at["ddp"] = int(m.group(1)) if m else -1
        last_step = max(4, resumed_at["ddp"] + 1)
        # Meanwhile, sora-export on the ZeRO-3 run's step-2 checkpoint (a directory of per-rank shards).
        # The resumed run only reads it (it writes later steps and last.ckpt, and deletes nothing).
        z3_export, z3_step2 = base / "z3_step2_export", dirs["deepspeed_stage_3"] / "checkpoints" / "step=00000002.ckpt"
        exp = Run(sora("sora-export", str(dirs["deepspeed_stage_3"]), "--ckpt", str(z3_step2), "--out", str(z3_export)), base / "export.log")
        second = [Run(sora("sora-train", *common, f"strategy={s}", f"hydra.run.dir={dirs[s]}", f"trainer.max_steps={last_step}", "resume=auto"),
                      base / f"{s}_2.log") for s in STRATEGIES]
        for r in [*second, exp]:
            r.ok(TIMEOUT)
    finally:
        Run.kill_all()
    return {"dirs": dirs, "logs": {s: r.output() for s, r in zip(STRATEGIES, second)}, "z3_export": z3_export, "export_log": exp.output(),
            "rc_sigterm": rc_sigterm, "sigterm_log": first["ddp"].output(), "rank1_exited": rank1_exited, "resumed_at": resumed_at, "last_step": last_step}


def _export(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors")), json.loads((path / "model.json").read_text())


def test_sigterm_to_rank_0_stops_both_ranks_after_saving(mp_runs):
    step = mp_runs["resumed_at"]["ddp"]
    assert mp_runs["rc_sigterm"] == PREEMPTED_EXIT_CODE, mp_runs["sigterm_log"][-4000:]
    assert step >= 2 and (mp_runs["dirs"]["ddp"] / "checkpoints" / f"step={step:08d}.ckpt").is_file()
    assert mp_runs["rank1_exited"]  # it learnt of the SIGTERM at the end of the step, saved its part and stopped


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_save_resume_sample_export(mp_runs, strategy):
    run_dir, last = mp_runs["dirs"][strategy], mp_runs["last_step"]
    log = mp_runs["logs"][strategy]
    assert f"resuming from {run_dir}/checkpoints/step={mp_runs['resumed_at'][strategy]:08d}.ckpt" in log
    ckpts = {p.name: p for p in (run_dir / "checkpoints").iterdir()}
    assert {"step=00000002.ckpt", f"step={last:08d}.ckpt", "last.ckpt"} <= set(ckpts) and not [n for n in ckpts if n.endswith(".partial")]
    assert ckpts[f"step={last:08d}.ckpt"].is_dir() == strategy.startswith("deepspeed")  # ZeRO: per-rank shards
    assert sorted(history(run_dir)) == list(range(1, last + 1))  # one curve across the restart
    videos = sorted((run_dir / "samples").rglob("*.mp4"))
    assert len(videos) == 1  # rank 0 wrote it, once
    tensors, spec = _export(run_dir / "export")
    assert set(spec["parts"]) >= {"vae", "text", "dit", "ema"} and spec["meta"]["step"] == last
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def _parts(tensors: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".")}


def test_zero_computes_what_ddp_computes_including_the_ema(mp_runs):
    dirs = mp_runs["dirs"]
    ddp_loss = history(dirs["ddp"])
    ddp, _ = _export(dirs["ddp"] / "export")
    ddp_dit, ddp_ema = _parts(ddp, "dit"), _parts(ddp, "ema")
    assert ddp_dit.keys() == ddp_ema.keys()
    assert max((ddp_dit[k] - ddp_ema[k]).abs().max().item() for k in ddp_dit) > 1e-6  # the EMA lags the weights
    for strategy in ("deepspeed_stage_2", "deepspeed_stage_3"):
        loss = history(dirs[strategy])
        assert all(math.isclose(loss[s], ddp_loss[s], rel_tol=1e-4) for s in ddp_loss), (strategy, loss, ddp_loss)
        tensors, _ = _export(dirs[strategy] / "export")
        for part in ("dit", "ema", "vae", "text"):
            got, want = _parts(tensors, part), _parts(ddp, part)
            assert got.keys() == want.keys(), (strategy, part)
            for k in want:
                assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5), f"{strategy} {part}.{k}: {(got[k] - want[k]).abs().max()}"


def test_ranks_draw_different_noise_and_keep_their_own_random_state(mp_runs):
    from sora_train.parallel.consolidate import _safe_load

    ckpt = _safe_load(mp_runs["dirs"]["ddp"] / "checkpoints" / "step=00000002.ckpt")  # weights_only: no object unpickled
    (rng,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("RNGState")]
    assert len(rng["ranks"]) == 2
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])  # seeded from (seed, rank)


def test_sora_export_consolidates_a_zero3_checkpoint(mp_runs):
    from sora_train.parallel.consolidate import read_checkpoint_weights

    tensors, spec = _export(mp_runs["z3_export"])
    assert spec["meta"]["step"] == 2
    ddp_state, _ = read_checkpoint_weights(mp_runs["dirs"]["ddp"] / "checkpoints" / "step=00000002.ckpt")
    for part in ("dit", "ema"):
        got = _parts(tensors, part)
        want = {k[len(part) + 1 :]: v for k, v in ddp_state.items() if k.startswith(part + ".")}
        assert got.keys() == want.keys() and got
        for k in want:
            assert torch.allclose(got[k], want[k].float(), rtol=1e-4, atol=1e-5), f"{part}.{k}"
