#!/usr/bin/env bash
# System packages the test suite starts for real: Slurm (slurmctld, slurmd, client commands)
# and MUNGE, for the local two-node test cluster (launch/local_cluster.sh), and iproute2 (`ip`),
# which puts its nodes in network namespaces of their own. Debian/Ubuntu.
#
#   bash launch/install_system_deps.sh     # .ci/run calls this before `make test`
#
# Idempotent: does nothing when the binaries are already there. Installs with
# --no-install-recommends (about 4 MB of .debs on Debian 12: slurm-wlm pulls slurmctld,
# slurmd, slurm-client and slurm-wlm-basic-plugins). Installing does not start any daemon we
# use: the test cluster runs its own munged/slurmctld/slurmd with state in a temporary folder.
#
# A slow or flaky mirror is retried, and a failed `apt-get update` only warns (the install
# may still succeed from the lists already there); a failed install exits non-zero with the
# end of apt's log.
#   SORA_SKIP_SYSTEM_DEPS=1   skip entirely (the Slurm tests then skip, or fail under CI=true)
set -euo pipefail

PACKAGES=(slurm-wlm munge iproute2)
# What the tests need on PATH (daemons live in /usr/sbin). unshare and nsenter come with
# util-linux, which every Debian has.
BINARIES=(slurmctld slurmd sbatch srun squeue scontrol sinfo scancel munged mungekey munge ip)
export PATH="$PATH:/usr/sbin:/sbin"

t0=$SECONDS
log() { echo "[install_system_deps] $*"; }

if [[ ${SORA_SKIP_SYSTEM_DEPS:-0} == 1 ]]; then
  log "SORA_SKIP_SYSTEM_DEPS=1: skipping"
  exit 0
fi

missing=()
for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if ((${#missing[@]} == 0)); then
  log "Slurm $(slurmd -V 2>/dev/null | awk '{print $2}'), MUNGE and iproute2 already installed"
  exit 0
fi
log "missing: ${missing[*]}; installing ${PACKAGES[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
  log "ERROR: no apt-get on this machine; install Slurm (slurmctld, slurmd, client) and MUNGE with your package manager" >&2
  exit 1
fi
SUDO=()
if ((EUID != 0)); then
  command -v sudo >/dev/null 2>&1 || { log "ERROR: not root and no sudo: cannot install ${PACKAGES[*]}" >&2; exit 1; }
  SUDO=(sudo -n)
fi

APT_LOG=$(mktemp -t sora-apt.XXXXXX.log)
# Retries and timeouts for a slow mirror; wait for a dpkg lock held by another apt instead of
# failing at once.
APT_OPTS=(-o Acquire::Retries=5 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60 -o DPkg::Lock::Timeout=300)
apt() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q "${APT_OPTS[@]}" "$@" >>"$APT_LOG" 2>&1; }

t_update=$SECONDS
if ! apt update; then
  log "WARNING: apt-get update failed; trying the install with the package lists already here" >&2
fi
t_update=$((SECONDS - t_update))

t_install=$SECONDS
if ! apt install -y --no-install-recommends "${PACKAGES[@]}"; then
  log "install failed once; updating the package lists and retrying" >&2
  apt update || true
  if ! apt install -y --no-install-recommends "${PACKAGES[@]}"; then
    log "ERROR: apt-get install ${PACKAGES[*]} failed. End of $APT_LOG:" >&2
    tail -n 40 "$APT_LOG" >&2
    exit 1
  fi
fi
t_install=$((SECONDS - t_install))

still=()
for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || still+=("$b"); done
if ((${#still[@]})); then
  log "ERROR: installed ${PACKAGES[*]} but still missing: ${still[*]} (log: $APT_LOG)" >&2
  exit 1
fi
rm -f "$APT_LOG"
log "installed Slurm $(slurmd -V 2>/dev/null | awk '{print $2}') and MUNGE in $((SECONDS - t0))s (apt-get update ${t_update}s, install ${t_install}s)"
