"""The local two-node Slurm cluster every test under tests/launch/ runs on: one per pytest
session, started by launch/local_cluster.sh in a temporary folder and stopped at the end (a
watchdog also stops it if pytest dies), and the smoke data set the Slurm runs share.

The nodes run in network namespaces of their own where the machine allows it (root), else on
127.0.0.1; SORA_SLURM_NET=netns|loopback forces one. The summary line at the end of the run
says which mode ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import LOCAL_CLUSTER, NEEDED, SBIN, Cluster, _under_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from cli_runs import smoke_data_dir  # noqa: E402


_MODES: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Say which network mode the Slurm tests ran in (netns, or the loopback fallback)."""
    for mode in _MODES:
        terminalreporter.write_line(f"local Slurm cluster: {mode}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Cluster]:
    path = f"{os.environ.get('PATH', '')}:{SBIN}"
    missing = [b for b in NEEDED if shutil.which(b, path=path) is None]
    if missing:
        msg = f"Slurm/MUNGE not installed (missing {', '.join(missing)}): run launch/install_system_deps.sh"
        if _under_ci():
            pytest.fail(f"CI={os.environ['CI']}: {msg}")
        pytest.skip(msg)

    d = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        # The job environment: this venv's python and sora-train first, and the daemons' dir.
        "PATH": f"{Path(sys.executable).parent}:{path}",
        "SLURM_CONF": str(d / "slurm.conf"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # each node has one CPU
    }
    start_env = {**env, "SORA_SLURM_OWNER_PID": str(os.getpid()), "SORA_SLURM_LIFETIME_S": "1800", "SORA_SLURM_WAIT_S": "60"}
    r = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", str(d)], env=start_env, capture_output=True, text=True, timeout=150)
    if r.returncode != 0:
        pytest.fail(f"local cluster did not start:\n{r.stdout}\n{r.stderr}")
    mode = subprocess.run(["bash", str(LOCAL_CLUSTER), "mode", str(d)], env=env, capture_output=True, text=True, timeout=30).stdout.strip()
    _MODES.append(mode)
    try:
        yield Cluster(dir=d, env=env, mode=mode)
    finally:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(d)], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """The data of experiment=smoke, generated once from the real config. Shared by the
    Slurm runs so that a two-node run does not generate it on both nodes at once: the
    datamodule prepares data once per node, and the two local nodes share one filesystem."""
    return smoke_data_dir(tmp_path_factory)
