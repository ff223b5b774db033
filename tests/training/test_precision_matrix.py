"""Every strategy x every precision trains, and every shipped experiment trains with its own.

Strategy x precision matrix: {auto (one process), DDP, ZeRO-1, ZeRO-2, ZeRO-2 offload, ZeRO-3,
ZeRO-3 offload (two gloo ranks)} x {32-true, bf16-mixed}, each cell 2 steps at the debug
sizes of: the DiT on video shards (validation, end-of-run samples from the EMA and the export
included), the DiT on cached latents, and the VAE with its adversarial loss switched on at
step 1 (so one step without it and one with it), and the VAE without any discriminator. Checks: every logged loss is finite; under
bf16 the loss at step 1 is within BF16_REL_TOL of the fp32 loss at step 1 (step 0 cannot tell
them apart: the DiT's output is exactly zero at init, adaLN-Zero, and both runs start from the
same weights and batch); samples and an export were written.

Per experiment: each ``conf/experiment/*.yaml`` trains 2 steps with its own strategy and
precision (on CPU where it says GPU: same strategy and precision, accelerator cpu), overriding
only sizes (debug models, 9-frame 32x32 buckets, sample shape) and data paths.

Cells run through ``matrix_driver.py``: one launch per strategy (2 ranks with torchrun's
environment), each cell the real ``train(cfg)`` that sora-train runs on the real composed
config. The whole module takes about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runs import BIN, ROOT, base_env, launch_driver, smoke_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STRATEGIES = ("auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload")
PRECISIONS = {"32": "32-true", "bf16": "bf16-mixed"}
TASKS = ("dit", "dit_latents", "vae", "vae_plain")
BF16_REL_TOL = 0.03  # bf16 keeps ~3 significant digits; measured differences are <= 0.8% at step 1
TIMEOUT = 600
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def _csv_losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not files:
        return {}
    out = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                out[int(row["step"])] = float(row[key])
    return out


def _vae_export(root: Path) -> Path:
    import torch

    from sora_train.models.export import export_parts
    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    return export_parts(root / "vae_export", {"vae": build_vae("debug")}, meta={"task": "vae"})


def _export_100m(root: Path) -> Path:
    """A DiT export of the 100M size (random weights) with the smoke run's VAE and text encoder."""
    import torch

    from sora_train.diffusion import FlowMatching
    from sora_train.models.dit import build_dit
    from sora_train.models.export import export_parts
    from sora_train.models.text import TinyTextEncoder
    from sora_train.models.vae import build_vae

    torch.manual_seed(0)
    vae, text = build_vae("debug"), TinyTextEncoder(dim=32, depth=1, num_heads=2, trainable=False)
    dit = build_dit("100M", in_channels=vae.latent_channels, text_dim=text.dim)
    return export_parts(root / "export_100M", {"vae": vae, "text": text, "dit": dit}, {"task": "dit", "diffusion": FlowMatching().config()})


def _cache_latents(data: Path, vae: Path, out: Path) -> None:
    for split in ("train", "val"):
        subprocess.run([str(BIN / "sora-data"), "cache-latents", str(data / "shapes_smoke" / split), "--vae", str(vae), "--out", str(out / split),
                        "--num-frames", "9", "--height", "32", "--width", "32"], check=True, cwd=ROOT, env=base_env(), capture_output=True, timeout=300)


def _common(data: Path, devices: int, strategy: str, precision: str) -> str:
    return (f"paths.data_dir={data} trainer.accelerator=cpu trainer.devices={devices} strategy={strategy} trainer.precision={precision} "
            "trainer.max_steps=2 trainer.val_check_interval=2 trainer.limit_val_batches=1 trainer.log_every_n_steps=1 "
            "callbacks.checkpoint.every_n_steps=2 data.num_workers=0 logger=csv")


def _matrix_cells(data: Path, latents: Path, vae: Path, strategy: str, probe: Path) -> list[tuple[str, str]]:
    devices = 1 if strategy == "auto" else 2
    smoke = f"{data}/shapes_smoke"
    cells = []
    for p, precision in PRECISIONS.items():
        common = _common(data, devices, strategy, precision)
        cells.append((f"dit-{p}", f"experiment=smoke {common}"))
        cells.append((f"dit_latents-{p}", f"experiment=smoke data=latents data.train_shards={latents}/train data.val_shards={latents}/val "
                                          f"vae_ckpt={vae} data.batch_size=4 data.load_text=false ~data.prepare {common} callbacks.samples=null"))
        vae_run = (f"experiment=demo_vae vae=debug data.train_shards={smoke}/train data.val_shards={smoke}/val ~data.prepare "
               f"data.buckets=[{{num_frames:9,height:32,width:32,batch_size:4}}] {common}")
        cells.append((f"vae-{p}", f"{vae_run} task.loss.adv_weight=0.1 task.loss.adv_start_step=1"))
        cells.append((f"vae_plain-{p}", f"{vae_run} task.loss.adv_weight=0"))  # no discriminator at all
    if strategy == "deepspeed_stage_2":  # the EMA under bf16 weights, against an fp32 reference of the same weights
        cells.append(("ema-bf16", f"experiment=smoke {_common(data, devices, strategy, 'bf16-mixed')} trainer.max_steps=6 optimizer.lr=1e-2 "
                                  f"callbacks.ema.decay=0.999 callbacks.ema.warmup=false callbacks.samples=null "
                                  f"+callbacks.probe._target_=ema_probe.EMAProbe +callbacks.probe.out={probe}"))
    return cells


# Per experiment: (launch group, overrides beyond the experiment name). Only sizes and data paths.
def _experiment_overrides(name: str, data: Path, latents: Path, vae: Path, exports: Path) -> tuple[str, str]:
    smoke = f"{data}/shapes_smoke"
    bucket = "data.buckets=[{num_frames:9,height:32,width:32,batch_size:4},{num_frames:1,height:32,width:32,batch_size:8}]"
    video = f"data.train_shards={smoke}/train data.val_shards={smoke}/val {bucket}"
    small = "dit=debug vae=debug text=tiny"
    samples = "callbacks.samples.num_frames=9 callbacks.samples.height=32 callbacks.samples.width=32"
    base = f"paths.data_dir={data} trainer.max_steps=2 trainer.val_check_interval=2 trainer.limit_val_batches=1 data.num_workers=0"
    table = {
        "smoke": ("auto", ""),
        "demo": ("auto", f"{small} vae_ckpt={vae} data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false"),
        "demo_vae": ("auto", f"vae=debug {video} ~data.prepare"),
        "vae_shapes": ("auto", f"vae=debug {video} ~data.prepare"),
        "shapes_quality_vae": ("auto", f"vae=debug {video} ~data.prepare"),
        "shapes_quality": ("auto", f"{small} vae_ckpt={vae} data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false"),
        # native shapes: its buckets cut to the smoke latents' one shape and its images (a bucket with no clips would wait forever)
        "shapes_native": ("auto", f"{small} vae_ckpt={vae} data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false "
                                  "data.buckets=[{num_frames:9,height:32,width:32,batch_size:4},{num_frames:1,height:32,width:32,batch_size:8}]"),
        "scaling_shapes": ("auto", f"vae_ckpt={vae} data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false scaling.size=d32"),
        # box control on the smoke latents (their json carries the shapes world's boxes); a small random DiT instead of the base export
        "boxes_quality": ("auto", f"{small} init_from=null vae_ckpt={vae} data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false"),
        # init_from gives the architecture: no size is named (finetune_lora starts from a 100M-size export)
        "finetune_full": ("auto", f"init_from={exports}/demo/export {video}"),
        "finetune_lora": ("auto", f"init_from={exports}/../export_100M {video}"),
        # the fine-tune recipe: its pretrain as shapes_quality; its fine-tunes from the demo's export, on latents of its VAE
        "finetune_shapes_pretrain": ("auto", f"{small} vae_ckpt={vae} data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false"),
        "finetune_shapes_full": ("auto", f"init_from={exports}/demo/export data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false"),
        "finetune_shapes_lora": ("auto", f"init_from={exports}/demo/export data.train_shards={latents}/train data.val_shards={latents}/val data.load_text=false"),
        # a public base (a tiny random Wan2.1 folder written by diffusers): no size, as for init_from
        "wan_lora": ("auto", f"pretrained={exports}/../tiny_wan data.train_shards={smoke}/train data.val_shards={smoke}/val "
                             "data.buckets=[{num_frames:9,height:32,width:32,batch_size:2}] data.tokens_per_batch=null callbacks.samples.steps=2"),
        # trainer=gpu experiments: their own strategy and bf16-mixed, on 2 CPU ranks
        "pretrain_100M": ("ranks2", f"{small} trainer.accelerator=cpu trainer.devices=2 {video} {samples}"),
        "pretrain_1B": ("ranks2", f"{small} trainer.accelerator=cpu trainer.devices=2 {video} {samples}"),
        "vae_standard": ("ranks2", f"vae=debug trainer.accelerator=cpu trainer.devices=2 {video}"),
    }
    if name not in table:  # the experiment's own test fails with this message; the others still run
        return "missing", f"conf/experiment/{name}.yaml has no entry in this test: add one (sizes and data paths only)"
    group, extra = table[name]
    return group, f"experiment={name} {extra} {base}"


def _launch(out: Path, cells: list[tuple[str, str]], ranks: int, log: Path) -> None:
    launch_driver(out, cells, ranks, log, TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    data = smoke_data_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("matrix")
    vae = _vae_export(root)
    latents = root / "latents"
    _cache_latents(data, vae, latents)
    _export_100m(root)
    from sora_train.models.dit.wan_debug import write_tiny_wan

    write_tiny_wan(root / "tiny_wan")
    out = root / "runs"
    exps = root / "experiments"
    groups: dict[str, list[tuple[str, str]]] = {"auto": [], "ranks2": [], "missing": []}
    # demo first: the fine-tune experiments start from its export
    for name in sorted(EXPERIMENTS, key=lambda n: (n.startswith("finetune"), n)):
        group, overrides = _experiment_overrides(name, data, latents, vae, exps)
        groups[group].append((name, overrides))
    for strategy in STRATEGIES:
        cells = _matrix_cells(data, latents, vae, strategy, root / "ema_probe.json")
        ranks = 1 if strategy == "auto" else 2
        _launch(out / strategy, cells, ranks, root / f"{strategy}.log")
    _launch(exps, groups["auto"], 1, root / "experiments_auto.log")
    _launch(exps, groups["ranks2"], 2, root / "experiments_ranks2.log")
    return {"out": out, "exps": exps, "root": root}


def _status(run_dir: Path, log: Path) -> None:
    status = run_dir / "status.json"
    if not status.is_file():
        pytest.fail(f"{run_dir.name}: did not finish; end of {log}:\n{log.read_text()[-3000:]}")
    s = json.loads(status.read_text())
    assert s["ok"], f"{run_dir.name}: {s.get('error')}; end of {log}:\n{log.read_text()[-3000:]}"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_and_precision_trains(runs, strategy, task):
    log = runs["root"] / f"{strategy}.log"
    losses = {}
    for p in PRECISIONS:
        run_dir = runs["out"] / strategy / f"{task}-{p}"
        _status(run_dir, log)
        losses[p] = _csv_losses(run_dir)
        assert sorted(losses[p]) == [0, 1], (p, losses[p])
        assert all(math.isfinite(v) for v in losses[p].values()), (p, losses[p])
        if task == "vae":
            assert _csv_losses(run_dir, "train/disc_loss"), "the discriminator never trained"
        if task == "vae_plain":
            assert not _csv_losses(run_dir, "train/disc_loss")
        if task == "dit":
            assert list((run_dir / "samples").glob("step_*/sample_000.mp4")), "no end-of-run sample"
        assert (run_dir / "export" / "model.safetensors").is_file()
        val = _csv_losses(run_dir, "val/loss")
        assert val and all(math.isfinite(v) for v in val.values()), val
    rel = abs(losses["bf16"][1] - losses["32"][1]) / abs(losses["32"][1])
    assert rel <= BF16_REL_TOL, f"bf16 loss at step 1 {losses['bf16'][1]:.5f} vs fp32 {losses['32'][1]:.5f} ({rel:.2%})"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_trains_with_its_own_strategy_and_precision(runs, name):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    group, what = _experiment_overrides(name, Path("/x"), Path("/x"), Path("/x"), Path("/x"))
    if group == "missing":
        pytest.fail(what)
    _status(runs["exps"] / name, runs["root"] / f"experiments_{group}.log")
    losses = _csv_losses(runs["exps"] / name)
    if losses:  # experiments with the csv logger; wandb ones log offline
        assert all(math.isfinite(v) for v in losses.values()), losses
    # The run used the experiment's own strategy and precision (what the test must not change).
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sora_train.conf", version_base="1.3"):
        own = compose(config_name="train", overrides=[f"experiment={name}"])
    GlobalHydra.instance().clear()
    saved = (runs["exps"] / name / ".hydra_used.json")
    used = json.loads(saved.read_text())
    assert used["strategy"] == own.strategy.name and used["precision"] == str(own.trainer.precision), used
    if own.get("export", True) is False:  # scaling trials keep no export: their val loss is the result
        return
    assert (runs["exps"] / name / "export" / "model.json").is_file()
    if name.startswith("finetune") and name != "finetune_shapes_pretrain":  # the architecture came from init_from's model.json, not a restated size
        src = runs["root"] / ("export_100M" if name == "finetune_lora" else "experiments/demo/export")
        dit = json.loads((src / "model.json").read_text())["parts"]["dit"]
        got = json.loads((runs["exps"] / name / "export" / "model.json").read_text())["parts"]["dit"]
        assert got == dit, (got, dit)


def test_ema_accumulates_in_fp32_under_deepspeed_bf16(runs):
    """ZeRO-2 bf16, decay 0.999 without warm-up: each update is 0.1% of the difference, which a
    bf16 EMA rounds away. The EMA callback's fp32 average must equal an fp32 reference EMA of
    the same bf16 weights (recorded by ema_probe.EMAProbe after every step)."""
    r = json.loads((runs["root"] / "ema_probe.json").read_text())
    assert r["dtype"] == "torch.bfloat16" and r["has_shadow"] and r["steps"] == 6, r
    assert r["shadow_vs_ref"] <= 1e-6 * r["ref_scale"], r  # the same fp32 arithmetic in the same order
    assert r["stored_vs_ref"] <= 2**-7 * r["ref_scale"], r  # the module holds the average rounded to bf16
    assert r["moved_ref"] > 0 and abs(r["moved_shadow"] / r["moved_ref"] - 1) < 0.01, r
    # What an EMA kept in bf16 does with the same weights (measured: 70% of the reference's
    # movement after 6 steps; updates below half a bf16 step are lost): the check can fail.
    assert r["moved_naive"] < 0.9 * r["moved_ref"], r
