"""Helpers for tests that run the real CLIs in subprocesses: start/stop process groups with
timeouts, read a run's losses, generate the smoke data set once per session."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT")}
    env.update(
        WANDB_MODE="offline", WANDB_SILENT="true", PATH=f"{BIN}:{os.environ['PATH']}", PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # the same in every run (float sums depend on it) and kind to 2 shared cores
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too
    env.update(extra)
    return env


class Run:
    """One CLI process in its own process group (so signals reach it and its workers/ranks)."""

    started: list["Run"] = []

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.cmd, self.log = cmd, log
        self._f = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or base_env(), stdout=self._f, stderr=subprocess.STDOUT, start_new_session=True)
        Run.started.append(self)

    @classmethod
    def kill_all(cls) -> None:
        """SIGKILL every group still running (a fixture failed half-way): no orphans."""
        for run in cls.started:
            if run.proc.poll() is None:
                run.signal(signal.SIGKILL)
                run.proc.wait()
            run.reap()
        cls.started.clear()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float, reap: bool = True) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{' '.join(self.cmd)} timed out after {timeout:.0f}s:\n{self.output()[-4000:]}")
        finally:
            self._f.close()
            if reap:
                self.reap()

    def group_alive(self) -> bool:
        """Whether any process of the group (other ranks, workers) is still running."""
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def reap(self) -> None:
        """Kill whatever of the group is left (DataLoader workers, other ranks)."""
        if self.proc.poll() is not None:
            self.signal(signal.SIGKILL)

    def output(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.log.read_text(errors="replace")

    def ok(self, timeout: float) -> "Run":
        rc = self.wait(timeout)
        if rc != 0:
            pytest.fail(f"{' '.join(self.cmd)} failed ({rc}):\n{self.output()[-6000:]}")
        return self


def sora(tool: str, *args: str) -> list[str]:
    """Command line of a console script; falls back to ``python -m`` when the script is not
    installed yet (an editable install made before the script was added to pyproject.toml)."""
    script = BIN / tool
    if script.exists():
        return [str(script), *args]
    module = {"sora-train": "sora_train.cli.train", "sora-export": "sora_train.cli.export"}[tool]
    return [sys.executable, "-m", module, *args]


def wait_for(predicate, timeout: float, what: str, run: Run | None = None, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if run is not None and run.proc.poll() is not None:
            pytest.fail(f"run ended ({run.proc.returncode}) before {what}:\n{run.output()[-4000:]}")
        if time.monotonic() > deadline:
            if run is not None:
                run.signal(signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}" + (f":\n{run.output()[-4000:]}" if run else ""))
        time.sleep(every)


def csv_losses(run_dir: Path) -> dict[int, float]:
    """train/loss by global step from every CSVLogger version of a run (flushed rows only)."""
    out: dict[int, float] = {}
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    out[int(row["step"]) + 1] = float(row["train/loss"])  # Lightning logs step N as N-1
    return out


def history(run_dir: Path, name: str = "train/loss") -> dict[int, float]:
    data = json.loads((run_dir / "plots" / "loss_history.json").read_text())
    return {int(s): float(v) for s, v in data[name]}


def smoke_data_dir(tmp_path_factory) -> Path:
    """The smoke experiment's shard set, generated once (the CLI would generate it too, but runs
    started side by side must not race to write it)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    data = tmp_path_factory.mktemp("smoke_data")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="sora_train.conf", version_base="1.3"):
            cfg = compose(config_name="train", overrides=["experiment=smoke", f"paths.data_dir={data}"])
        instantiate(cfg.data.prepare)()
    finally:
        GlobalHydra.instance().clear()
    return data


def launch_driver(out: Path, cells: list[tuple[str, str]], ranks: int, log: Path, timeout: float) -> str:
    """tests/training/matrix_driver.py on ``ranks`` gloo ranks (torchrun's environment, a fresh
    MASTER_PORT): each cell is one sora-train run, ``train(cfg)`` as the CLI calls it; torch,
    Lightning and DeepSpeed start once per launch, not once per run (start-up is most of a debug
    run's time on two shared cores). Rank 0's output goes to ``log``; returns it."""
    env = base_env()
    args = [sys.executable, str(Path(__file__).resolve().parent / "matrix_driver.py"), "--out", str(out)]
    for name, overrides in cells:
        args += ["--cell", name, overrides]
    procs = []
    with open(log, "w") as f:
        for rank in range(ranks):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks), "NODE_RANK": "0"}
            procs.append(subprocess.Popen(args, cwd=Path(__file__).resolve().parent, env=rank_env,
                                          stdout=f if rank == 0 else subprocess.DEVNULL, stderr=subprocess.STDOUT))
        try:
            for proc in procs:
                proc.wait(timeout=timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return log.read_text(errors="replace")
