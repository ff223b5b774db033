"""Preemption of real training on the local two-node Slurm cluster: `sora-train` (experiment=smoke,
DDP over gloo, one rank per node) is signalled, saves the current step on every rank, is requeued
and continues exactly: its losses equal an uninterrupted run's step for step.

- plain sbatch (launch/sbatch/train.sbatch, `--signal=USR1@90 --requeue`, a real 2-minute time
  limit): run 0 gets Slurm's time-limit SIGUSR1 and saves step s <= 3; run 1 resumes from it, gets
  `scancel -s USR1` at step 5 and is requeued by `scontrol requeue` *during* the save of step 5
  (half written, then killed); run 2 resumes from step 4, the newest complete checkpoint;
- Hydra's submitit launcher (`sora-train -m ... launcher=slurm_cpu`, 2 nodes): `scancel -s USR2`
  at step 3; the step is saved, submitit requeues the trial, the requeued trial resumes from it.

The reference is the same training as two local DDP ranks (`trainer.devices=2 strategy=ddp`,
started at once, beside the Slurm jobs): Lightning reseeds per rank in DDP, so a one-process run
would draw other numbers. Where a run stops is fixed by a test callback (tests/launch/
preempt_hooks.py) that holds the step until the signal has come; it changes nothing computed.
Slurm itself would SIGKILL a save that outlives KillWait (30 s); the test kills it at once.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import REPO, _free_port

pytestmark = pytest.mark.slurm

MAX_STEPS, EVERY = 6, 2
HOOKS = Path(__file__).resolve().parent
TIMEOUT = 240
COMMON = ["experiment=smoke", "strategy=ddp", f"trainer.max_steps={MAX_STEPS}", f"callbacks.checkpoint.every_n_steps={EVERY}",
          "callbacks.checkpoint.keep_last=10", "callbacks.samples=null", "export=false"]  # fmt: skip


def _hold(marker_dir: Path, hold_at: list[int], torn_save_on: int | None = None) -> list[str]:
    args = ["+callbacks.hold._target_=preempt_hooks.HoldForSignal", f"+callbacks.hold.marker_dir={marker_dir}",
            f"+callbacks.hold.hold_at=[{','.join(map(str, hold_at))}]"]  # fmt: skip
    return args + ([f"+callbacks.hold.torn_save_on={torn_save_on}"] if torn_save_on is not None else [])


def _job_env(cluster, data: Path) -> dict[str, str]:
    dist = cluster.dist_env() if hasattr(cluster, "dist_env") else {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH", "")) if p)
    # c10d looks up the peer's host name when it connects; inside the local nodes' network
    # namespaces no DNS server answers, and glibc's default retries cost 20 s per run.
    resolver = {"RES_OPTIONS": "timeout:1 attempts:1"}
    return {**cluster.env, **dist, **resolver, "SORA_DATA_DIR": str(data), "WANDB_MODE": "disabled", "PYTHONPATH": pythonpath}


def _history(run_dir: Path) -> dict[int, float]:
    import json

    data = json.loads((run_dir / "plots" / "loss_history.json").read_text())
    return {int(s): float(v) for s, v in data["train/loss"]}


def _assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1)), (got, want)
    for step in want:
        assert math.isclose(got[step], want[step], rel_tol=1e-5, abs_tol=1e-7), f"step {step}: {got[step]} != {want[step]}"


def _wait_for(predicate, timeout: float, what: str, detail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(smoke_data, tmp_path_factory):
    """The uninterrupted run, two local DDP ranks; started now, read when a test needs it."""
    run_dir = tmp_path_factory.mktemp("preempt_ref") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")  # fmt: skip
    log = open(run_dir.parent / "ref.log", "w")
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "sora-train"), *COMMON, "trainer.accelerator=cpu", "trainer.devices=2",
         f"paths.data_dir={smoke_data}", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    done: dict[int, float] = {}

    def history() -> dict[int, float]:
        if not done:
            try:
                rc = proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"reference run timed out:\n{(run_dir.parent / 'ref.log').read_text()[-4000:]}") from None
            assert rc == 0, f"reference run failed ({rc}):\n{(run_dir.parent / 'ref.log').read_text()[-4000:]}"
            done.update(_history(run_dir))
            print(f"reference: done {time.monotonic() - start:.0f} s after its start")
        return done

    yield history
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


# --------------------------------------------------------------------------- plain sbatch


@pytest.fixture(scope="module")
def sbatch_job(slurm_cluster, smoke_data, reference, tmp_path_factory):
    """One train.sbatch job, three runs (see the module docstring). Asks for the reference
    only so that it starts first and runs beside the job."""
    base = tmp_path_factory.mktemp("preempt_sbatch")
    markers = base / "markers"
    markers.mkdir()
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(
        "-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=2", "--signal=USR1@90", f"--chdir={base}",
        str(REPO / "launch" / "sbatch" / "train.sbatch"), *COMMON, *_hold(markers, hold_at=[3, 5], torn_save_on=1),
        env=_job_env(slurm_cluster, smoke_data),
    )  # fmt: skip
    out = base / f"sora-train-{job}.out"
    run_dir = base / "outputs" / "runs" / job

    def output() -> str:
        return (out.read_text(errors="replace") if out.exists() else "")[-6000:]

    try:
        # Run 0: Slurm's own time-limit signal (about 30 s in); the policy saves and requeues.
        slurm_cluster.release_requeued(job, timeout=TIMEOUT, restarts=1)
        t1 = time.monotonic()
        after_run0 = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        # Run 1: held at step 5 until our USR1; its save of step 5 hangs half-written.
        _wait_for(lambda: all((markers / f"hold-r1-rank{r}").exists() for r in (0, 1)), TIMEOUT, "run 1 to hold step 5", output)
        slurm_cluster.run("scancel", "-s", "USR1", job)
        _wait_for((markers / "torn-r1").exists, 60, "run 1 to be inside the save of step 5", output)
        in_save = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        slurm_cluster.run("scontrol", "requeue", job)  # during the save
        time.sleep(1.0)
        os.kill(int((markers / "torn-r1").read_text()), signal.SIGKILL)  # what KillWait would do, 30 s later
        slurm_cluster.release_requeued(job, timeout=TIMEOUT, restarts=2)
        t2 = time.monotonic()
        info = slurm_cluster.wait(job, timeout=TIMEOUT)
        print(f"sbatch job {job}: run 0 {t1 - t0:.0f} s, run 1 {t2 - t1:.0f} s, run 2 {time.monotonic() - t2:.0f} s")  # pytest -rP
    except AssertionError as e:
        slurm_cluster.run("scancel", job, check=False)
        raise AssertionError(f"{e}\n{output()}") from None
    return {"job": job, "info": info, "log": out.read_text(errors="replace"), "run_dir": run_dir, "after_run0": after_run0, "in_save": in_save}


def _runs(log: str) -> list[str]:
    """The job's log cut into its runs (train.sbatch prints one header per run)."""
    return re.split(r"^\[train\.sbatch\] job \d+ restart \d+:.*$", log, flags=re.M)[1:]


def test_sbatch_time_limit_signal_saves_the_step_requeues_and_resumes(sbatch_job):
    info, log, run_dir = sbatch_job["info"], sbatch_job["log"], sbatch_job["run_dir"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", f"{info}\n{log[-6000:]}"
    runs = _runs(log)
    assert len(runs) == 3, log[-6000:]
    m = re.search(r"SIGUSR1: saved the checkpoint of step (\d+) \((\S+)\); requeueing the job", runs[0])
    assert m, runs[0][-4000:]
    assert runs[0].count(m.group(0)) == 2, runs[0][-4000:]  # both ranks took part in the save
    step = int(m.group(1))
    assert 1 <= step <= 3 and m.group(2) == str(run_dir / "checkpoints" / f"step={step:08d}.ckpt")
    assert f"SIGUSR1: requeued Slurm job {sbatch_job['job']}" in runs[0]
    assert f"step={step:08d}.ckpt" in sbatch_job["after_run0"] and not [n for n in sbatch_job["after_run0"] if n.endswith(".partial")]
    assert not list(run_dir.glob("hpc_ckpt_*")), "Lightning's own requeue handler ran"
    assert f"resuming from {run_dir}/checkpoints/step={step:08d}.ckpt" in runs[1], runs[1][-4000:]


def test_sbatch_requeue_during_a_save_resumes_from_the_newest_complete_step(sbatch_job):
    log, run_dir = sbatch_job["log"], sbatch_job["run_dir"]
    runs = _runs(log)
    torn = f"step={5:08d}.ckpt.partial"
    assert torn in sbatch_job["in_save"] and f"step={5:08d}.ckpt" not in sbatch_job["in_save"]
    assert f"resuming from {run_dir}/checkpoints/step={4:08d}.ckpt" in runs[2], runs[2][-4000:]
    final = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert f"step={MAX_STEPS:08d}.ckpt" in final and f"step={5:08d}.ckpt" not in final


def test_sbatch_preempted_twice_equals_an_uninterrupted_run(sbatch_job, reference):
    _assert_same_losses(_history(sbatch_job["run_dir"]), reference())


# --------------------------------------------------------------------------- submitit


def test_submitit_signal_saves_the_step_requeues_and_resumes_exactly(slurm_cluster, smoke_data, reference, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    markers = tmp_path / "markers"
    markers.mkdir()
    sweep = tmp_path / "sweep"
    log = open(tmp_path / "submit.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "sora-train"), "-m", *COMMON, "launcher=slurm_cpu", "hydra.launcher.partition=debug",
         "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", *_hold(markers, hold_at=[3])],
        cwd=tmp_path, env=_job_env(slurm_cluster, smoke_data), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def job_logs(tail: int = 2500) -> str:
        files = sorted((sweep / ".submitit").glob("*/*_log.*")) if (sweep / ".submitit").is_dir() else []
        return "\n".join(f"----- {f.name}\n{f.read_text(errors='replace')[-tail:]}" for f in files) + "\n" + (tmp_path / "submit.log").read_text()[-tail:]

    try:
        _wait_for(lambda: all((markers / f"hold-r0-rank{r}").exists() for r in (0, 1)), TIMEOUT, "the trial to hold step 3", job_logs)
        job = next(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())
        slurm_cluster.run("scancel", "-s", "USR2", job)
        t1 = time.monotonic()
        slurm_cluster.release_requeued(job, timeout=TIMEOUT)
        t2 = time.monotonic()
        rc = proc.wait(timeout=TIMEOUT)
        print(f"submitit job {job}: to step 3 {t1 - t0:.0f} s, save + requeue {t2 - t1:.0f} s, run 1 {time.monotonic() - t2:.0f} s")
    except (AssertionError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"{e}\n{job_logs()}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    logs = job_logs(tail=10**6)
    assert rc == 0, job_logs()
    run_dir = sweep / "0"
    assert logs.count("SIGUSR2: saved the checkpoint of step 3") == 2, job_logs()  # rank 0 and rank 1
    assert "Caught signal SIGUSR2" in logs, job_logs()  # then submitit's handler requeued
    assert f"resuming from {run_dir}/checkpoints/step={3:08d}.ckpt" in logs, logs
    assert slurm_cluster.job(job).get("Restarts") == "1"
    _assert_same_losses(_history(run_dir), reference())
