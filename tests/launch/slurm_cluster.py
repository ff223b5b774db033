"""Driving the local two-node Slurm cluster from tests: paths, job states and the Cluster
handle (submit, wait, release a requeued job, daemon logs). The session fixtures that start
it are in conftest.py next to this file."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "launch" / "local_cluster.sh"
SBIN = "/usr/sbin:/sbin"
NEEDED = ("sbatch", "srun", "squeue", "scontrol", "slurmctld", "slurmd", "munged")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]
    # How the nodes are networked (launch/local_cluster.sh): "netns ..." (each node in a network
    # namespace of its own, with its own address and host name) or "loopback ..." (all on
    # 127.0.0.1, the fallback where namespaces are not allowed).
    mode: str = "loopback"

    @property
    def netns(self) -> bool:
        return self.mode.startswith("netns")

    def dist_env(self) -> dict[str, str]:
        """What a multi-node torch.distributed job needs on top of Slurm's own variables. With
        namespaces, nothing: the master address is the first node of SLURM_NODELIST (Lightning's
        SLURMEnvironment; node names resolve inside the nodes) and the port comes from the job id,
        as on a real cluster. On loopback the node names do not resolve and every node is
        127.0.0.1, so the address and the interface are forced."""
        if self.netns:
            return {}
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "GLOO_SOCKET_IFNAME": "lo"}

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", *args], env=env or self.env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge=600 s)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until=lambda info: info.get("JobState") in DONE_STATES) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.5)
        info = self.job(job_id)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not done after {timeout:.0f}s: {info}\n{self.logs()}")

    def release_requeued(self, job_id: str, timeout: float = 150, restarts: int = 1) -> None:
        """Wait until the job has been requeued (``restarts`` times in all) and let it start now
        rather than after Slurm's 2 minute hold, with a 10 minute limit so that the run after
        the requeue is not sent the time-limit signal again (Slurm re-arms it for every run)."""

        def requeued(info: dict[str, str]) -> bool:
            return (info.get("JobState") == "PENDING" and int(info.get("Restarts") or 0) >= restarts) or info.get("JobState") in DONE_STATES

        info = self.wait(job_id, timeout, until=requeued)
        assert info["JobState"] == "PENDING", f"job {job_id} was not requeued: {info}"
        # slurmd refuses a launch credential issued in the same second as the requeue revoked
        # the job's old one ("Job credential revoked"); part of what the hold is for.
        time.sleep(2.5)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", "TimeLimit=10")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {f.name}\n" + "\n".join(tail))
        return "\n".join(parts)
