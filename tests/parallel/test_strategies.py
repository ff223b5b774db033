"""Strategies, activation checkpointing and checkpoint consolidation.

Unit tests build every strategy and config on CPU. The multi-process tests train a tiny model
for real on two CPU ranks over gloo with DDP and every ZeRO option (1, 2, 2 + offload, 3, 3 +
offload): loss goes down, a checkpoint
is written (sharded for ZeRO), a fresh pair of processes resumes from it and continues with
exactly the losses the first run had, the checkpoint consolidates to the model's weights, and
per-rank memory shrinks as ZeRO promises. The pytest process never joins a process group: the
two ranks are separate interpreters started the way torchrun does (LOCAL_RANK per process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sora_train.parallel.strategies import (
    STRATEGY_NAMES,
    CPUDeepSpeedStrategy,
    apply_parallelism,
    build_strategy,
)
from sora_train.utils.errors import SoraError

REPO = Path(__file__).resolve().parents[2]
STRATEGY_CONF = REPO / "conf" / "strategy"
CKPT_STEP, MAX_STEPS = 10, 13


@pytest.fixture
def ds_cpu_env(monkeypatch):
    """CPUDeepSpeedStrategy switches this process's DeepSpeed to its CPU accelerator (env var and
    module global); undo both after the test so a GPU test later in the session is unaffected."""
    pytest.importorskip("deepspeed")
    from deepspeed.accelerator import real_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(real_accelerator, "ds_accelerator", real_accelerator.ds_accelerator)


# --------------------------------------------------------------------------- build_strategy


@pytest.mark.parametrize(
    ("name", "stage", "offload_optimizer", "offload_param"),
    [
        ("deepspeed_stage_1", 1, False, False),
        ("deepspeed_stage_2", 2, False, False),
        ("deepspeed_stage_3", 3, False, False),
        ("deepspeed_stage_2_offload", 2, True, False),
        ("deepspeed_stage_3_offload", 3, True, True),
    ],
)
def test_build_deepspeed_on_cpu(ds_cpu_env, name, stage, offload_optimizer, offload_param):
    strategy = build_strategy(
        name, accelerator="cpu", allgather_bucket_size=123, reduce_bucket_size=456, overlap_comm=False,
        logging_batch_size_per_gpu=4, partition_activations=True, timeout=60,
    )
    assert type(strategy) is CPUDeepSpeedStrategy
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert (zero["allgather_bucket_size"], zero["reduce_bucket_size"], zero["overlap_comm"]) == (123, 456, False)
    assert ("offload_optimizer" in zero) == offload_optimizer
    assert ("offload_param" in zero) == offload_param
    if offload_optimizer:
        assert zero["offload_optimizer"]["device"] == "cpu"
    assert strategy.config["train_micro_batch_size_per_gpu"] == 4
    assert strategy.config["activation_checkpointing"]["partition_activations"] is True
    assert strategy.config["zero_force_ds_cpu_optimizer"] is False  # torch Adam allowed on CPU
    assert strategy._process_group_backend == "gloo"
    assert strategy._timeout.total_seconds() == 60
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_cpu_deepspeed_refuses_fp16(ds_cpu_env):
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision

    strategy = build_strategy("deepspeed_stage_2", accelerator="cpu")
    strategy.precision_plugin = DeepSpeedPrecision("16-mixed")
    with pytest.raises(SoraError, match="precision='16-mixed' is not supported on CPU"):
        strategy.setup_environment()


def test_build_deepspeed_cuda_path_is_lightnings_strategy(ds_cpu_env):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = build_strategy("deepspeed_stage_3", accelerator="cuda", zero_extra={"stage3_max_live_parameters": 7})
    assert type(strategy) is DeepSpeedStrategy
    assert strategy.config["zero_optimization"]["stage3_max_live_parameters"] == 7
    assert "zero_force_ds_cpu_optimizer" not in strategy.config  # DeepSpeed's own default on GPUs


def test_build_ddp_and_auto():
    from lightning.pytorch.strategies import DDPStrategy

    ddp = build_strategy("ddp", accelerator="cpu", find_unused_parameters=True, timeout=30)
    assert type(ddp) is DDPStrategy
    assert ddp._process_group_backend == "gloo"
    assert ddp._ddp_kwargs == {"find_unused_parameters": True}
    assert build_strategy("ddp", accelerator="cuda")._process_group_backend is None  # Lightning picks nccl
    assert build_strategy("auto") == "auto"


def test_build_strategy_rejects_unknown_names_and_options():
    with pytest.raises(SoraError, match="unknown strategy 'zero9'.*ddp, deepspeed_stage_1"):
        build_strategy("zero9")
    with pytest.raises(SoraError, match="strategy ddp: unknown option.*bucket_size_mb"):
        build_strategy("ddp", bucket_size_mb=25)
    with pytest.raises(SoraError, match="deepspeed_stage_2: unknown option.*allgather_bucket"):
        build_strategy("deepspeed_stage_2", accelerator="cpu", allgather_bucket=1)
    with pytest.raises(SoraError, match="auto takes no options"):
        build_strategy("auto", timeout=5)
    with pytest.raises(SoraError, match="unknown accelerator 'tpu'"):
        build_strategy("ddp", accelerator="tpu")


def test_every_strategy_config_instantiates(ds_cpu_env):
    import hydra.utils
    from hydra import compose, initialize_config_dir

    files = sorted(STRATEGY_CONF.glob("*.yaml"))
    assert {f.stem for f in files} == set(STRATEGY_NAMES)
    for f in files:
        # Composed as Hydra does: the deepspeed_* options include _base_/deepspeed.yaml.
        with initialize_config_dir(config_dir=str(STRATEGY_CONF.parent), version_base="1.3"):
            cfg = compose(overrides=[f"+strategy={f.stem}"]).strategy
        assert cfg.name == f.stem
        strategy = hydra.utils.instantiate(cfg, accelerator="cpu")  # GPU machines too: test the CPU build
        if f.stem == "auto":
            assert strategy == "auto"
        elif f.stem == "ddp":
            assert strategy._process_group_backend == "gloo"
        else:
            assert isinstance(strategy, CPUDeepSpeedStrategy)
            assert isinstance(strategy.config, dict)  # _convert_: all -> plain containers for DeepSpeed
            if "zero_extra" in cfg:
                assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000


# --------------------------------------------------------------------------- apply_parallelism


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return x + scale * torch.tanh(self.fc(x))


class _Tower(nn.Module):
    def __init__(self, d: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(d) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=0.5)
        return x


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients():
    torch.manual_seed(0)
    plain, ckpt = _Tower(), _Tower()
    ckpt.load_state_dict(plain.state_dict())
    assert apply_parallelism(ckpt, activation_checkpointing=True) is ckpt
    apply_parallelism(ckpt, activation_checkpointing=True)  # idempotent: still one wrapper
    assert list(ckpt.state_dict()) == list(plain.state_dict())

    x = torch.randn(4, 8, requires_grad=True)
    for model in (plain, ckpt):
        model(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert [b.calls for b in plain.blocks] == [1, 1, 1]
    assert [b.calls for b in ckpt.blocks] == [2, 2, 2]  # forward, then recomputed in backward

    with torch.no_grad():  # no checkpoint wrapper work under no_grad (sampling)
        ckpt(x)
    assert [b.calls for b in ckpt.blocks] == [3, 3, 3]


def test_apply_parallelism_order_checkpoint_then_compile(monkeypatch):
    seen = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: seen.append(getattr(self, "_sora_checkpointed", False)))
    apply_parallelism(_Tower(), activation_checkpointing=True, compile=True)
    assert seen == [True, True, True]  # every block compiled, each after it was wrapped


def test_apply_parallelism_skips_models_that_checkpoint_themselves():
    tower = _Tower()
    tower.activation_checkpointing = True  # like DiT(activation_checkpointing=True)
    apply_parallelism(tower, activation_checkpointing=True)
    assert not any(getattr(b, "_sora_checkpointed", False) for b in tower.blocks)


def test_apply_parallelism_needs_blocks():
    assert apply_parallelism(nn.Linear(2, 2)) is not None  # nothing asked: no-op
    with pytest.raises(SoraError, match="no submodule with a `blocks` nn.ModuleList"):
        apply_parallelism(nn.Linear(2, 2), activation_checkpointing=True)


# --------------------------------------------------------------------------- consolidation


class _NotATensor:
    pass


def test_consolidate_plain_checkpoint_prefix_and_dtypes(tmp_path):
    from safetensors.torch import load_file

    from sora_train.parallel.consolidate import consolidate_checkpoint

    shared = torch.randn(3, 3)
    state = {
        "model.dit.w": shared.to(torch.bfloat16),
        "model.dit.tied": shared,  # tied weights share storage: safetensors refuses unless copied
        "model.dit.tied_again": shared,
        "model.count": torch.tensor([7], dtype=torch.int64),
        "ema.dit.w": torch.ones(2),
    }
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "global_step": 42, "epoch": 3, "pytorch-lightning_version": "2.6.6"}, ckpt)

    out = consolidate_checkpoint(ckpt, tmp_path / "out" / "dit.safetensors", prefix="model.dit")
    weights = load_file(out)
    assert sorted(weights) == ["tied", "tied_again", "w"]
    assert weights["w"].dtype == torch.float32
    torch.testing.assert_close(weights["tied"], shared)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["source_kind"], meta["global_step"], meta["epoch"], meta["prefix"]) == ("lightning_ckpt", 42, 3, "model.dit")
    assert meta["num_tensors"] == 3 and meta["dropped_keys"] == 2

    everything = load_file(consolidate_checkpoint(ckpt, tmp_path / "all.safetensors", prefix=None))
    assert everything["model.count"].dtype == torch.int64 and "ema.dit.w" in everything

    with pytest.raises(SoraError, match=r"no key .* starts with 'vae\.'; top-level prefixes are: ema\., model\."):
        consolidate_checkpoint(ckpt, tmp_path / "x.safetensors", prefix="vae.")


def test_consolidate_refuses_pickled_objects_and_non_checkpoints(tmp_path):
    from sora_train.parallel.consolidate import consolidate_checkpoint

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(1)}, "hyper_parameters": _NotATensor()}, evil)
    with pytest.raises(SoraError, match=r"pickled Python objects .*_NotATensor.*weights_only=True"):
        consolidate_checkpoint(evil, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()

    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SoraError, match="not a DeepSpeed checkpoint"):
        consolidate_checkpoint(tmp_path / "empty_dir", tmp_path / "w.safetensors")
    with pytest.raises(SoraError, match="does not exist"):
        consolidate_checkpoint(tmp_path / "missing.ckpt", tmp_path / "w.safetensors")
    with pytest.raises(SoraError, match=r"must end in \.safetensors"):
        consolidate_checkpoint(evil, tmp_path / "w.pt")


# --------------------------------------------------------------------------- two CPU ranks

# Run once per rank. Lightning sees LOCAL_RANK and joins the process group instead of
# launching children, exactly as under torchrun or Slurm. One launch trains every strategy in
# turn (each with its own Trainer and a freshly seeded model) so the interpreters, Lightning
# and DeepSpeed start once per launch: on two shared cores start-up is most of the time.
TRAIN_SCRIPT = r"""
import argparse, json, os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from sora_train.parallel.strategies import apply_parallelism, build_strategy

torch.set_num_threads(1)  # two ranks share the machine's cores
p = argparse.ArgumentParser()
p.add_argument("--strategies", required=True)  # comma-separated
p.add_argument("--out", required=True)  # one folder per strategy beneath
p.add_argument("--max-steps", type=int, required=True)
p.add_argument("--ckpt-every", type=int, required=True)
p.add_argument("--resume-from", default=None)  # an --out of an earlier launch
p.add_argument("--activation-checkpointing", default="")  # strategies that checkpoint blocks
args = p.parse_args()


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):  # (B, D) -> (B, D)
        return x + nn.functional.gelu(self.fc(x))


class Net(nn.Module):
    def __init__(self, d_in=32, d=256, depth=2):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(depth)])
        self.out = nn.Linear(d, d_in)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


# A fixed regression problem, one full batch of 32 per rank: the batch a step sees does not
# depend on where Lightning restarts an epoch after a resume, so losses must match exactly.
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 32, generator=g)
Y = torch.tanh(X @ torch.randn(32, 32, generator=g))


def held_numel(module, optimizer):
    # What this rank holds between steps, in elements: parameters (ZeRO-3: its partition
    # ds_tensor; the parameter itself is an empty placeholder), optimizer state (Adam moments),
    # and fp32 master copies the optimizer steps that are not the parameters themselves.
    params, ptrs = 0, set()
    for prm in module.parameters():
        t = getattr(prm, "ds_tensor", None)
        t = prm.data if t is None else t
        params += t.numel()
        ptrs.add(t.untyped_storage().data_ptr())
    inner = optimizer
    while hasattr(inner, "optimizer"):  # DeepSpeed's ZeRO optimizer wraps the torch one
        inner = inner.optimizer
    state = sum(v.numel() for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    master = sum(q.numel() for grp in inner.param_groups for q in grp["params"]
                 if q.untyped_storage().data_ptr() not in ptrs)
    full = sum(int(getattr(q, "ds_numel", q.numel())) for q in module.parameters())
    return {"params": params, "optimizer_state": state, "master": master, "model_numel": full}


class Regress(pl.LightningModule):
    def __init__(self, out, first_run, activation_checkpointing):
        super().__init__()
        self.model = apply_parallelism(Net(), activation_checkpointing=activation_checkpointing)
        self.out, self.first_run, self.losses = out, first_run, {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.losses[self.global_step] = loss.item()
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_loss = nn.functional.mse_loss(self.model(x), y).item()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32)

    val_dataloader = train_dataloader

    def on_train_start(self):
        self.start_step = self.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.first_run and self.global_step == args.ckpt_every:
            self.save_full_weights(os.path.join(self.out, "weights_at_ckpt.pt"))

    def save_full_weights(self, path):
        params = list(self.parameters())
        if hasattr(params[0], "ds_id"):  # ZeRO-3: gather the partitions (every rank takes part)
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        else:
            sd = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.global_rank == 0:
            torch.save(sd, path)

    def on_train_end(self):
        result = {"start_step": self.start_step, "final_step": self.global_step, "losses": self.losses,
                  "memory": held_numel(self, self.trainer.optimizers[0]),
                  "strategy": type(self.trainer.strategy).__name__}
        with open(os.path.join(self.out, f"rank{self.global_rank}.json"), "w") as f:
            json.dump(result, f)


def run(strategy):
    out = os.path.join(args.out, strategy)
    os.makedirs(out, exist_ok=True)
    resume = None
    if args.resume_from:
        resume = os.path.join(args.resume_from, strategy, "ckpt", f"step={args.ckpt_every}.ckpt")
    options = {"timeout": 120}  # a lost peer fails the run in 2 minutes instead of 30
    if strategy.startswith("deepspeed"):
        options["logging_batch_size_per_gpu"] = 32
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=build_strategy(strategy, accelerator="cpu", **options),
        max_steps=args.max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, check_val_every_n_epoch=10_000, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), filename="{step}",
                                   every_n_train_steps=args.ckpt_every, save_top_k=-1)],
    )
    pl.seed_everything(0)
    module = Regress(out, resume is None, strategy in args.activation_checkpointing.split(","))
    trainer.fit(module, ckpt_path=resume)
    if resume is None:
        # Stand-alone validate: for DeepSpeed a new engine without optimizer (the inference path).
        trainer.validate(module, verbose=False)
        with open(os.path.join(out, f"val{trainer.global_rank}.json"), "w") as f:
            json.dump({"val_loss": module.val_loss}, f)


for name in args.strategies.split(","):
    run(name)
# As sora-train ends (cli/train.py): left to the interpreter's exit, gloo's threads can outlive
# it and abort a finished rank ("terminate called without an active exception", seen in CI).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(script: Path, args: list[str], workdir: Path, tag: str, timeout: float = 300.0) -> None:
    """Start both ranks (like torchrun), wait for both; kill the pair on failure or timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NODE_RANK="0", DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
    )
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own connections on loopback too
    logs = [workdir / f"{tag}_rank{r}.log" for r in range(2)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=workdir,
                                          env={**env, "LOCAL_RANK": str(rank)}, stdout=f, stderr=subprocess.STDOUT))
    deadline, failed = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                failed = "a rank failed"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f}s"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if failed or any(p.returncode != 0 for p in procs):
        tails = "\n".join(f"--- {log.name} (rc={p.returncode})\n" + log.read_text()[-4000:] for p, log in zip(procs, logs))
        pytest.fail(f"two-rank run {args} {failed or 'failed'}:\n{tails}")


def _results(out: Path, name: str) -> list[dict]:
    return [json.loads((out / f"{name}{r}.json").read_text()) for r in range(2)]


TWO_RANK_STRATEGIES = ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3",
                       "deepspeed_stage_3_offload")
ZERO_STAGE = {"deepspeed_stage_1": 1, "deepspeed_stage_2": 2, "deepspeed_stage_2_offload": 2, "deepspeed_stage_3": 3,
              "deepspeed_stage_3_offload": 3}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict[str, dict]:
    """Every strategy trains 13 steps (checkpoint at 10); then fresh processes resume each from
    its step-10 checkpoint. Two launches of two ranks in all, shared by the tests below."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("two_ranks")
    script = root / "train_two_ranks.py"
    script.write_text(TRAIN_SCRIPT)
    common = [
        "--strategies", ",".join(TWO_RANK_STRATEGIES), "--max-steps", str(MAX_STEPS),
        "--ckpt-every", str(CKPT_STEP),
        "--activation-checkpointing", "deepspeed_stage_3",  # non-reentrant checkpoint under ZeRO-3 hooks
    ]
    _launch_two_ranks(script, [*common, "--out", str(root / "first")], root, "first")
    _launch_two_ranks(script, [*common, "--out", str(root / "resumed"), "--resume-from", str(root / "first")], root, "resumed")
    return {
        name: {
            "root": root / "first" / name,
            "ckpt": root / "first" / name / "ckpt" / f"step={CKPT_STEP}.ckpt",
            "first": _results(root / "first" / name, "rank"),
            "val": [v["val_loss"] for v in _results(root / "first" / name, "val")],
            "resumed": _results(root / "resumed" / name, "rank"),
        }
        for name in TWO_RANK_STRATEGIES
    }


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", TWO_RANK_STRATEGIES)
def test_two_rank_train_save_resume_consolidate(two_rank_runs, strategy):
    from safetensors.torch import load_file

    from sora_train.parallel.consolidate import consolidate_checkpoint

    run = two_rank_runs[strategy]
    expected_class = "DDPStrategy" if strategy == "ddp" else "CPUDeepSpeedStrategy"
    for first, resumed in zip(run["first"], run["resumed"]):
        assert first["strategy"] == resumed["strategy"] == expected_class
        losses = {int(k): v for k, v in first["losses"].items()}
        assert sorted(losses) == list(range(MAX_STEPS))
        assert losses[CKPT_STEP - 1] < 0.5 * losses[0], losses  # it learns

        # Resumed in new processes: the step counter continues and every loss matches the
        # uninterrupted run: step 10 proves the weights, 11 and 12 the optimizer state.
        assert (resumed["start_step"], resumed["final_step"]) == (CKPT_STEP, MAX_STEPS)
        again = {int(k): v for k, v in resumed["losses"].items()}
        assert sorted(again) == list(range(CKPT_STEP, MAX_STEPS))
        for step, loss in again.items():
            assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-7), (step, loss, losses[step])

    ckpt = run["ckpt"]
    if strategy == "ddp":
        assert ckpt.is_file()
    else:  # one optimizer shard per rank (and one model-states file per rank for ZeRO-3)
        shards = ckpt / "checkpoint"
        assert len(list(shards.glob("*_optim_states.pt"))) == 2
        assert len(list(shards.glob("zero_pp_rank_*_model_states.pt"))) == (2 if ZERO_STAGE[strategy] == 3 else 0)

    out = consolidate_checkpoint(ckpt, run["root"] / "consolidated.safetensors", prefix="model.")
    weights = load_file(out)
    reference = torch.load(run["root"] / "weights_at_ckpt.pt", weights_only=True)
    assert sorted(weights) == sorted(k.removeprefix("model.") for k in reference)
    for key, value in reference.items():
        torch.testing.assert_close(weights[key.removeprefix("model.")], value, rtol=0, atol=0)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["global_step"] == CKPT_STEP
    if strategy != "ddp":
        assert (meta["zero_stage"], meta["world_size"]) == (ZERO_STAGE[strategy], 2)
        # DeepSpeed's own shard reads are weights-only too: plant an object in rank 1's shard.
        tampered = run["root"] / "tampered.ckpt"
        shutil.copytree(ckpt, tampered)
        shard = tampered / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        from sora_train.parallel.consolidate import _safe_load

        state = _safe_load(shard, deepspeed_shard=True)  # memory-mapped: write beside, then replace
        torch.save({**state, "planted": _NotATensor()}, shard.with_suffix(".new"))
        os.replace(shard.with_suffix(".new"), shard)
        with pytest.raises(SoraError, match=r"zero_pp_rank_1.*pickled Python objects .*_NotATensor"):
            consolidate_checkpoint(tampered, run["root"] / "tampered.safetensors")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", list(ZERO_STAGE))
def test_zero_computes_what_ddp_computes(two_rank_runs, strategy):
    """Same seed, data and optimizer: sharding must not change the numbers (fp32, 2 ranks)."""
    ddp, zero = two_rank_runs["ddp"], two_rank_runs[strategy]
    for d, z in zip(ddp["first"], zero["first"]):
        for step, loss in d["losses"].items():
            assert z["losses"][step] == pytest.approx(loss, rel=1e-4), step
    assert zero["val"] == pytest.approx(ddp["val"], rel=1e-4)  # validate() after fit: the inference engine


def _held(run: dict) -> list[dict]:
    return [r["memory"] for r in run["first"]]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_holds_about_half_of_ddp_per_rank(two_rank_runs):
    ddp, zero3 = _held(two_rank_runs["ddp"]), _held(two_rank_runs["deepspeed_stage_3"])
    for d, z in zip(ddp, zero3):
        assert d["master"] == 0  # DDP: Adam steps the parameters themselves
        assert z["params"] <= z["model_numel"] // 2 + 64  # its partition (+ alignment padding)
        ratio = (z["params"] + z["optimizer_state"] + z["master"]) / (d["params"] + d["optimizer_state"])
        print(f"ZeRO-3/DDP held elements per rank (params + optimizer state + master): {ratio:.3f}")
        assert ratio < 0.65


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero2_shards_optimizer_state(two_rank_runs):
    ddp, zero2 = _held(two_rank_runs["ddp"]), _held(two_rank_runs["deepspeed_stage_2"])
    for d, z in zip(ddp, zero2):
        assert z["params"] == d["params"] == d["model_numel"]  # stage 2 keeps full parameters
        ratio = z["optimizer_state"] / d["optimizer_state"]
        print(f"ZeRO-2/DDP Adam state per rank: {ratio:.3f}; fp32 master shard {z['master']} of {z['model_numel']}")
        assert ratio < 0.55
        assert z["master"] <= z["model_numel"] // 2 + 64  # the fp32 master copy is sharded too
