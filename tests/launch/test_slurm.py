"""The Slurm launch path, against a real two-node Slurm cluster on this machine.

One session fixture (conftest.py) starts Debian's munged + slurmctld + two slurmd (node1,
node2, each in a network namespace of its own with its own address and host name; on 127.0.0.1
where namespaces are not allowed) with launch/local_cluster.sh in a temporary folder and stops
them at the end (a watchdog also stops them if pytest dies). Without Slurm installed the tests skip, except
under CI=true, where a missing Slurm is a failure: `.ci/run` installs it with
launch/install_system_deps.sh.

  - a plain 2-node sbatch job: srun runs one task on each node;
  - launch/sbatch/train.sbatch trains experiment=smoke on both nodes (DDP over gloo);
  - submitit: a Python function runs as a 2-node job and its results come back;
  - Hydra's submitit launcher: `sora-train -m experiment=smoke launcher=slurm_cpu` trains
    through Slurm and leaves checkpoints and an export in the sweep folder;
  - an Optuna sweep on Slurm: trials as jobs two at a time, data prepared once on an empty
    directory, a failed trial recorded, the study continued by the same command, one table;
  - 2-node Lightning DDP under srun: SLURMEnvironment supplies ranks and world size;
  - requeue, the plain-sbatch way: a real time-limit SIGUSR1 (--signal=USR1@75) reaches
    Lightning, which saves an HPC checkpoint and requeues; the next run resumes from it;
  - requeue, the submitit way: a time-limit SIGUSR2 reaches submitit, which checkpoints the
    callable and requeues; the next run continues from the saved state.

The two requeue tests are toys (a tiny Lightning script, a counter) that pin down what Slurm and
submitit do; sora-train handles the signals its own way (every rank saves the step, then the job
is requeued), checked in test_slurm_preemption.py.

Every wait is bounded; a failing test prints the job's output and the daemon logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import REPO

pytestmark = pytest.mark.slurm


# --------------------------------------------------------------------------- plain sbatch


def test_sbatch_two_nodes(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "--time=2", f"--chdir={tmp_path}", f"--output={out}",
        # Single quotes: the variables are the tasks', not the batch shell's.
        "--wrap", "srun bash -c 'echo rank=$SLURM_PROCID node_id=$SLURM_NODEID node=$SLURMD_NODENAME ntasks=$SLURM_NTASKS'",
    )  # fmt: skip
    info = slurm_cluster.wait(job, timeout=60)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text
    rows = [dict(kv.split("=") for kv in line.split()) for line in text.splitlines() if line.startswith("rank=")]
    assert sorted(r["rank"] for r in rows) == ["0", "1"], text
    assert sorted(r["node_id"] for r in rows) == ["0", "1"], text
    assert sorted(r["node"] for r in rows) == ["node1", "node2"], text
    assert {r["ntasks"] for r in rows} == {"2"}


def test_sbatch_template_trains_on_two_nodes(slurm_cluster, smoke_data, tmp_path):
    """launch/sbatch/train.sbatch as users submit it, made CPU-sized on the command line:
    sora-train under srun on two nodes, DDP over gloo, ranks from SLURMEnvironment."""
    env = {
        **slurm_cluster.env,
        "SORA_DATA_DIR": str(smoke_data),
        "WANDB_MODE": "disabled",
        # netns mode: nothing; Lightning takes node1 (first of SLURM_NODELIST) as the master.
        **slurm_cluster.dist_env(),
    }
    job = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10", f"--chdir={tmp_path}",
        str(REPO / "launch" / "sbatch" / "train.sbatch"), "experiment=smoke", env=env,
    )  # fmt: skip
    info = slurm_cluster.wait(job, timeout=200)
    log = (tmp_path / f"sora-train-{job}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-5000:]}"
    assert f"job {job} restart 0: 2 node(s) x 1 task(s)" in log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-5000:]
    run_dir = tmp_path / "outputs" / "runs" / job
    assert (run_dir / "checkpoints" / "last.ckpt").exists(), sorted(p.name for p in run_dir.iterdir())
    assert (run_dir / "export").is_dir()


# --------------------------------------------------------------------------- submitit


def test_submitit_function_on_two_nodes(slurm_cluster, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    for k in ("PATH", "SLURM_CONF", "OMP_NUM_THREADS"):
        monkeypatch.setenv(k, slurm_cluster.env[k])

    # A closure, so cloudpickle ships it by value (this test module is not importable in the job).
    def where(x: int) -> dict:
        import os

        return {"node": os.environ["SLURMD_NODENAME"], "rank": int(os.environ["SLURM_PROCID"]), "square": x * x}

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5, name="submitit-test")
    job = executor.submit(where, 7)
    # No slurmdbd here, so submitit's sacct calls fail (it logs a warning and goes on): it
    # sees the job finish through the result files, which done() checks first.
    deadline = time.monotonic() + 90
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.done(), f"submitit job {job.job_id} not done: {slurm_cluster.job(job.job_id)}\n{slurm_cluster.logs()}"
    results = job.results()
    assert [r["square"] for r in results] == [49, 49]
    assert sorted((r["rank"], r["node"]) for r in results) == [(0, "node1"), (1, "node2")]


# --------------------------------------------------------------------------- Hydra launcher


def test_hydra_submitit_launcher_trains_smoke(slurm_cluster, smoke_data, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    assert (REPO / "conf" / "experiment" / "smoke.yaml").exists()
    sora_train = shutil.which("sora-train", path=slurm_cluster.env["PATH"])
    cmd = [sora_train] if sora_train else [sys.executable, "-m", "sora_train.cli.train"]
    sweep = tmp_path / "sweep"
    env = {**slurm_cluster.env, "SORA_DATA_DIR": str(smoke_data), "WANDB_MODE": "disabled"}
    r = subprocess.run(
        [*cmd, "-m", "experiment=smoke", "launcher=slurm_cpu", "hydra.launcher.partition=debug", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    job_dirs = sorted(p for p in (sweep / ".submitit").glob("*") if p.name.isdigit()) if (sweep / ".submitit").is_dir() else []
    job_logs = "\n".join(f"----- {f}\n{f.read_text(errors='replace')[-3000:]}" for d in job_dirs for f in sorted(d.glob("*_log.*")))
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{job_logs}"

    assert len(job_dirs) == 1, list((sweep / ".submitit").iterdir())
    # The result file is written just before the job's process exits.
    info = slurm_cluster.wait(job_dirs[0].name, timeout=30)
    assert info["JobState"] == "COMPLETED", info
    assert info["Partition"] == "debug" and info["NumNodes"] == "1"
    run_dir = sweep / "0"
    assert (run_dir / "checkpoints" / "last.ckpt").exists(), sorted(p.name for p in run_dir.iterdir())
    assert (run_dir / "export").is_dir()
    assert list(job_dirs[0].glob("*_result.pkl")), job_logs


def test_optuna_sweep_on_slurm_continues_and_records_failures(slurm_cluster, tmp_path):
    """`sora-train -m hparams_search=... launcher=slurm_cpu`: trials as Slurm jobs, two at a
    time, on an empty data directory (both first trials find the data missing: one prepares
    it, the other waits); a trial that fails is recorded and the sweep goes on; the same
    command again continues the study from its sqlite storage; one trials.md holds every
    trial, best first. Optuna's TPE over dit_lr's space and data.num_workers in {0, -1} (-1
    fails at once): with seed 1234 the first two draws are one of each; the continued study
    is seeded 1234 + 2 (ContinuedStudySeed), whose two draws both fail, and the sweep still
    ends well. Two invocations of two trials each, ~25 s."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    optuna = pytest.importorskip("optuna")
    sora_train = shutil.which("sora-train", path=slurm_cluster.env["PATH"])
    cmd = [sora_train] if sora_train else [sys.executable, "-m", "sora_train.cli.train"]
    study = tmp_path / "study"
    env = {**slurm_cluster.env, "SORA_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "disabled"}
    args = [*cmd, "-m", "experiment=smoke", "hparams_search=dit_lr", "launcher=slurm_cpu", "hydra.launcher.partition=debug",
            "hydra.launcher.timeout_min=10", f"study_dir={study}", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.seed=1234", "data.num_workers=choice(0,-1)",
            "callbacks.samples=null", "export=false"]  # fmt: skip
    for attempt in (1, 2):
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        logs = "\n".join(f"----- {f}\n{f.read_text(errors='replace')[-2000:]}" for f in sorted(study.glob("*/.submitit/*/*_log.*")))
        assert r.returncode == 0, f"run {attempt}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{logs}"
        sweeps = sorted(p for p in study.iterdir() if p.is_dir())
        assert len(sweeps) == attempt
        tasks = sorted(p.name for p in (sweeps[-1] / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
        assert len(tasks) == 2, tasks  # one Slurm job per trial: a 2-task job array, both queued at once

    trials = optuna.load_study(study_name="dit_lr", storage=f"sqlite:///{study}/optuna.db").trials
    assert [t.number for t in trials] == [0, 1, 2, 3]  # continued, not started over
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "FAIL"], trials
    assert len({t.params["optimizer.lr"] for t in trials}) == 4  # the continuation drew new points
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)

    rows = (study / "trials.md").read_text().splitlines()[2:]
    assert len(rows) == 4, rows
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[4].split(":")[0] for c in cells] == ["ok", "failed", "failed", "failed"], rows
    assert float(cells[0][2]) == pytest.approx(best.value, rel=1e-4), (rows, best)
    assert f"optimizer.lr={best.params['optimizer.lr']}" in cells[0][3] and "data.num_workers=0" in cells[0][3]
    assert all("num_workers option should be non-negative" in c[4] for c in cells[1:]), rows


# --------------------------------------------------------------------------- Lightning on 2 nodes

LIGHTNING_COMMON = """
import json, logging, os, socket, sys, time
from pathlib import Path

import torch
import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Tiny(pl.LightningModule):
    def __init__(self, sleep_s: float = 0.0):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.sleep_s = sleep_s

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.sleep_s:
            time.sleep(self.sleep_s)  # a slow step, so the time-limit signal lands mid-training
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
"""

DDP_SCRIPT = LIGHTNING_COMMON + """

class Report(pl.Callback):
    def on_train_end(self, trainer, module):
        # A collective over the real process group: every rank adds rank + 1.
        total = trainer.strategy.reduce(torch.tensor(float(trainer.global_rank + 1)), reduce_op="sum")
        out = Path(sys.argv[1]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({
            "global_rank": trainer.global_rank, "world_size": trainer.world_size,
            "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
            "environment": type(trainer.strategy.cluster_environment).__name__,
            "node": os.environ["SLURMD_NODENAME"], "sum": float(total), "step": trainer.global_step,
            "hostname": socket.gethostname(), "address": socket.gethostbyname(socket.gethostname()),
            "master_addr": os.environ.get("MASTER_ADDR"),
        }))


trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", max_steps=5, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[Report()], default_root_dir=sys.argv[1])
trainer.fit(Tiny(), loader())
# Tear the gloo group down while the interpreter is whole: left to exit, gloo's worker threads
# can outlive it and abort the process ("terminate called without an active exception").
torch.distributed.destroy_process_group()
"""


def test_lightning_ddp_two_nodes(slurm_cluster, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "job.out"
    env = {**slurm_cluster.env, **slurm_cluster.dist_env()}
    job = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "--time=5", f"--chdir={tmp_path}", f"--output={out}",
        "--wrap", f"srun {sys.executable} {script} {tmp_path}", env=env,
    )  # fmt: skip
    info = slurm_cluster.wait(job, timeout=150)
    text = out.read_text() if out.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert [r["node_rank"] for r in ranks] == [0, 1] and [r["local_rank"] for r in ranks] == [0, 0]
    assert sorted(r["node"] for r in ranks) == ["node1", "node2"]
    assert {r["environment"] for r in ranks} == {"SLURMEnvironment"}
    assert [r["sum"] for r in ranks] == [3.0, 3.0]
    assert [r["step"] for r in ranks] == [5, 5]
    if slurm_cluster.netns:  # as on a real cluster: own host names and addresses, master from SLURM_NODELIST
        assert [r["hostname"] for r in ranks] == ["node1", "node2"], ranks
        assert len({r["address"] for r in ranks}) == 2 and not any(r["address"].startswith("127.") for r in ranks), ranks
        assert {r["master_addr"] for r in ranks} == {"node1"}, ranks


# --------------------------------------------------------------------------- requeue

# Slurm may send the time-limit signal early (observed up to ~30 s here; the sbatch man page says
# up to 60 s), possibly while the task is still importing torch, when SIGUSR1 would kill it. So
# the script notes an early signal in a handler of its own and removes it just before fit
# (Lightning only installs its handler where none is set). From the start of training until a
# few steps are done it holds Lightning's handler aside the same way, then puts it back and
# re-sends a signal that came early, so the HPC checkpoint always has steps to resume from.
REQUEUE_SCRIPT = (
    """
import signal, time
EARLY = []
signal.signal(signal.SIGUSR1, lambda *_: EARLY.append(time.time()))
"""
    + LIGHTNING_COMMON
    + """

RESTART = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
EXTRA_STEPS = 3


class Marks(pl.Callback):
    # Prints where each run starts; the requeued run stops EXTRA_STEPS after its resume step.
    def on_train_start(self, trainer, module):
        self.start = trainer.global_step
        print(f"train_start restart={RESTART} step={self.start}", flush=True)
        self.lightning_handler = signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, lambda *_: EARLY.append(time.time()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.lightning_handler is not None and trainer.global_step >= self.start + 5:
            signal.signal(signal.SIGUSR1, self.lightning_handler)
            self.lightning_handler = None
            if EARLY:
                print("early signal: re-sending it to Lightning's handler", flush=True)
                os.kill(os.getpid(), signal.SIGUSR1)
        if RESTART and trainer.global_step >= self.start + EXTRA_STEPS:
            trainer.should_stop = True


logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # Lightning's requeue messages
trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=10**6, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[Marks()], default_root_dir=sys.argv[1])
signal.signal(signal.SIGUSR1, signal.SIG_DFL)
trainer.fit(Tiny(sleep_s=0.05), loader())
print(f"done restart={RESTART} step={trainer.global_step}", flush=True)
"""
)


def test_time_limit_signal_requeues_and_resumes(slurm_cluster, tmp_path):
    """--time=2 --signal=USR1@75: slurmctld signals the job step about 45 s in (its time-limit
    checks are periodic, so give or take 15 s); Lightning's SLURM handler saves
    hpc_ckpt_1.ckpt in default_root_dir and runs `scontrol requeue`. Slurm then holds the
    requeued job for 2 minutes (EligibleTime = requeue + 120 s); the test lets it start at
    once, and the second run resumes from the HPC checkpoint."""
    script = tmp_path / "requeue.py"
    script.write_text(REQUEUE_SCRIPT)
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(
        "-N", "1", "--time=2", "--signal=USR1@75", "--requeue", "--open-mode=append",
        f"--chdir={tmp_path}", f"--output={out}", "--wrap", f"srun {sys.executable} {script} {tmp_path}",
    )  # fmt: skip

    def output() -> str:
        return out.read_text(errors="replace") if out.exists() else ""

    try:
        slurm_cluster.release_requeued(job)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{output()[-4000:]}") from None
    info = slurm_cluster.wait(job, timeout=120)
    text = output()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"

    assert "Handling auto-requeue signal" in text and f"Requeued SLURM job: {job}" in text, text[-4000:]
    assert (tmp_path / "hpc_ckpt_1.ckpt").exists()
    starts = {int(r): int(s) for r, s in re.findall(r"train_start restart=(\d+) step=(\d+)", text)}
    assert starts.get(0) == 0 and starts.get(1, 0) > 0, text[-4000:]
    done = re.findall(r"done restart=1 step=(\d+)", text)
    assert done and int(done[-1]) == starts[1] + 3, text[-4000:]


def test_submitit_time_limit_requeues_checkpointable(slurm_cluster, tmp_path, monkeypatch):
    """The path `sora-train -m launcher=slurm` takes: submitit asks for --signal=USR2@<signal_delay_s>
    and its own handler (not Lightning's, which listens on USR1) checkpoints the callable and
    requeues it. Hydra's launcher is such a callable; here a small Checkpointable counts steps,
    and the requeued run continues from the count it had at the signal."""
    submitit = pytest.importorskip("submitit")
    for k in ("PATH", "SLURM_CONF", "OMP_NUM_THREADS"):
        monkeypatch.setenv(k, slurm_cluster.env[k])

    class Counter(submitit.helpers.Checkpointable):
        def __init__(self) -> None:
            self.step = 0
            self.runs: list[dict] = []

        def __call__(self, extra_steps: int) -> dict:
            import os
            import time

            restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            self.runs.append({"restart": restart, "start": self.step})
            while not (restart and self.step >= self.runs[-1]["start"] + extra_steps):
                time.sleep(0.1)
                self.step += 1
            return {"step": self.step, "runs": self.runs}

    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    # 2 minutes with the signal 75 s before the end: USR2 about 45 s in (see the test above).
    executor.update_parameters(slurm_partition="debug", nodes=1, tasks_per_node=1, cpus_per_task=1, timeout_min=2, slurm_signal_delay_s=75, name="submitit-requeue")
    job = executor.submit(Counter(), 5)

    try:
        slurm_cluster.release_requeued(job.job_id)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{job.stderr()}") from None
    deadline = time.monotonic() + 90
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.done(), f"{slurm_cluster.job(job.job_id)}\n{job.stderr()}"
    result = job.result()
    first, second = result["runs"]
    assert first == {"restart": 0, "start": 0}
    assert second["restart"] == 1 and second["start"] > 0  # the state saved at the signal
    assert result["step"] == second["start"] + 5
    assert "Caught signal SIGUSR2" in (job.stderr() or "") + (job.stdout() or "")
