#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests and for trying the launch path by
# hand: munged + slurmctld + two slurmd ("node1", "node2"), all on 127.0.0.1, all state in DIR.
#
#   launch/local_cluster.sh start  DIR   # start (or find running) and wait until both nodes are idle
#   launch/local_cluster.sh status DIR   # which daemons are alive, and sinfo; exit 3 if not all
#   launch/local_cluster.sh stop   DIR   # cancel jobs, stop every process this script started
#   launch/local_cluster.sh env    DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#
#   eval "$(launch/local_cluster.sh env /tmp/soratest)" && sbatch -N 2 --wrap 'srun hostname'
#
# Needs Debian's slurm-wlm and munge (launch/install_system_deps.sh). Nothing outside DIR is
# written: slurm.conf comes from launch/templates/slurm.conf.in, the MUNGE key lives in DIR/munge
# and its socket in DIR/run, and every command is pointed at DIR through SLURM_CONF.
#
# Two slurmd on one host: Debian's Slurm is built with multiple-slurmd support, so each slurmd
# runs as `slurmd -N nodeN` with its own Port= in slurm.conf and %n in SlurmdSpoolDir,
# SlurmdPidFile and SlurmdLogFile; both nodes have NodeAddr=127.0.0.1 (docs/launching.md).
#
# The daemons stop by themselves too: a watchdog stops the cluster when SORA_SLURM_OWNER_PID
# (e.g. the pytest process) exits, or after SORA_SLURM_LIFETIME_S seconds (default 4 h).
#
# Environment:
#   SORA_SLURM_WAIT_S      seconds to wait for the cluster to come up (default 60)
#   SORA_SLURM_LIFETIME_S  stop the cluster after this many seconds (default 14400)
#   SORA_SLURM_OWNER_PID   stop the cluster when this process is gone (default: unset)
# (The watchdog also stops the other daemons when slurmctld dies.)
#   SORA_SLURM_MEM_MB      RealMemory of each node in MB (default 80% of the host's memory)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
TEMPLATE="$HERE/templates/slurm.conf.in"
NODES=(node1 node2)
WAIT_S=${SORA_SLURM_WAIT_S:-60}
LIFETIME_S=${SORA_SLURM_LIFETIME_S:-14400}
OWNER_PID=${SORA_SLURM_OWNER_PID:-}
# Memory is not a consumable resource here (CR_Core), so each node may claim most of the host:
# jobs that ask for --mem (submitit's mem_gb) are then accepted as on a real node.
MEM_MB=${SORA_SLURM_MEM_MB:-$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo 2>/dev/null || echo 1024)}
# The daemons live in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

usage() {
  sed -n '2,9p' "$SELF" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

log() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }

cmd=${1:-}
[[ -n $cmd && -n ${2:-} ]] || usage
if [[ ! -d $2 ]]; then
  case $cmd in
    start) mkdir -p "$2" ;;
    stop) exit 0 ;;
    status) echo "no cluster in $2"; exit 3 ;;
    *) die "no cluster directory $2" ;;
  esac
fi
DIR=$(cd "$2" && pwd)
export SLURM_CONF="$DIR/slurm.conf"
# munged wants every directory above its socket searchable by all: not DIR/munge (0700).
SOCKET="$DIR/run/munge.socket"

pidfile() { echo "$DIR/run/$1.pid"; }

# Alive: the pid file names a live process (a zombie counts as gone).
alive() {
  local f pid state
  f=$(pidfile "$1")
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ -r /proc/$pid/stat ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

daemons() { echo munged slurmctld "${NODES[@]/#/slurmd-}"; }

# A TCP port on 127.0.0.1 that nothing listens on (connect is refused).
free_port() {
  local port taken=" $* "
  for _ in $(seq 1 200); do
    port=$((20000 + RANDOM % 20000))
    [[ $taken == *" $port "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  die "no free TCP port found on 127.0.0.1"
}

# Run a daemon in the foreground of its own session, detached from our stdio (a caller that
# captures our output must not wait on the daemons' copies of its pipes).
spawn() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$(pidfile "$name")"
}

# wait_for SECONDS DAEMON COMMAND...: retry COMMAND every 0.5 s until it succeeds; give up
# early when DAEMON ("-" for none) has died.
wait_for() {
  local deadline=$((SECONDS + $1)) daemon=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    [[ $daemon == - ]] || alive "$daemon" || return 1
    sleep 0.5
  done
}

munge_ok() { munge -S "$SOCKET" -n | unmunge -S "$SOCKET"; }
ctld_up() { scontrol ping | grep -q 'is UP'; }
nodes_idle() {
  local out
  out=$(sinfo -h -N -p debug -o '%N %T')
  for n in "${NODES[@]}"; do grep -qx "$n idle" <<<"$out" || return 1; done
}

dump_logs() {
  local f
  for f in "$DIR"/log/*; do
    [[ -s $f ]] || continue
    echo "----- $f (last 20 lines)" >&2
    tail -n 20 "$f" >&2
  done
}

write_config() {
  local ctld n1 n2
  ctld=$(free_port)
  n1=$(free_port "$ctld")
  n2=$(free_port "$ctld" "$n1")
  sed -e "s|@DIR@|$DIR|g" -e "s|@USER@|$(id -un)|g" -e "s|@CTLD_PORT@|$ctld|g" \
      -e "s|@NODE1_PORT@|$n1|g" -e "s|@NODE2_PORT@|$n2|g" -e "s|@MEM_MB@|$MEM_MB|g" \
      "$TEMPLATE" >"$SLURM_CONF.tmp"
  mv "$SLURM_CONF.tmp" "$SLURM_CONF"
  : >"$DIR/plugstack.conf"
}

start() {
  local t0=$SECONDS bin d n
  for bin in munged mungekey munge unmunge slurmctld slurmd sinfo scontrol squeue scancel sbatch srun; do
    command -v "$bin" >/dev/null || die "'$bin' not found: install Slurm and MUNGE with launch/install_system_deps.sh"
  done
  [[ -r $TEMPLATE ]] || die "missing $TEMPLATE"
  ((${#SOCKET} < 100)) || die "cluster directory path too long for a unix socket: $SOCKET (use a shorter DIR)"

  local all=1
  for d in $(daemons); do alive "$d" || all=0; done
  if ((all)); then
    log "already running in $DIR"
    nodes_idle || wait_for "$WAIT_S" - nodes_idle || true
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  # A half-dead cluster from an earlier run: clear it first.
  stop_all quiet

  mkdir -p "$DIR"/{munge,state,run,log} "${NODES[@]/#/$DIR/spool/}"
  chmod 700 "$DIR/munge"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null
  fi
  chmod 600 "$DIR/munge/munge.key"
  write_config

  spawn munged munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$DIR/run/munged.self.pid" --seed-file="$DIR/munge/munged.seed" --num-threads=2
  wait_for 15 munged munge_ok || { dump_logs; stop_all quiet; die "munged did not come up (log: $DIR/log/munged.out)"; }

  spawn slurmctld slurmctld -D -f "$SLURM_CONF"
  wait_for 30 slurmctld ctld_up || { dump_logs; stop_all quiet; die "slurmctld did not answer (log: $DIR/log/slurmctld.log)"; }

  for n in "${NODES[@]}"; do
    spawn "slurmd-$n" slurmd -D -N "$n" -f "$SLURM_CONF"
  done

  spawn watchdog bash "$SELF" _watchdog "$DIR"

  if ! wait_for "$WAIT_S" - nodes_idle; then
    sinfo -N -l >&2 || true
    dump_logs
    stop_all quiet
    die "nodes not idle after ${WAIT_S}s"
  fi
  log "up in $((SECONDS - t0))s: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')(logs in $DIR/log)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

# SIGTERM, then SIGKILL after 10 s.
terminate() {
  local name=$1 pid
  alive "$name" || { rm -f "$(pidfile "$name")"; return 0; }
  pid=$(<"$(pidfile "$name")")
  [[ $pid == "$$" ]] && return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    alive "$name" || break
    sleep 0.25
  done
  if alive "$name"; then
    log "$name ($pid) ignored SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pidfile "$name")"
}

# slurmstepd processes (and their job processes) that outlived the daemons: only those whose
# environment names this cluster's slurm.conf.
sweep_steps() {
  local p pids=()
  for p in $(pgrep -x slurmstepd || true); do
    { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$SLURM_CONF" && pids+=("$p")
  done
  ((${#pids[@]})) || return 0
  log "killing leftover job steps: ${pids[*]}"
  for p in "${pids[@]}"; do
    pkill -KILL -P "$p" 2>/dev/null || true
    kill -KILL "$p" 2>/dev/null || true
  done
}

stop_all() {
  local quiet=${1:-} d jobs
  if alive slurmctld; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null || true
      wait_for 20 - bash -c '[[ -z $(squeue -h -t R,CG,S -o %A) ]]' || log "jobs still running after 20s; stopping anyway"
    fi
  fi
  terminate watchdog
  for d in "${NODES[@]/#/slurmd-}" slurmctld munged; do terminate "$d"; done
  sweep_steps
  [[ -n $quiet ]] || log "stopped ($DIR)"
}

status() {
  local d rc=0
  for d in $(daemons) watchdog; do
    if alive "$d"; then
      echo "$d: running (pid $(<"$(pidfile "$d")"))"
    else
      echo "$d: stopped"
      [[ $d == watchdog ]] || rc=3
    fi
  done
  if alive slurmctld; then sinfo -N -o '%N %P %T %c %m' || true; fi
  return $rc
}

watchdog() {
  local deadline=$((SECONDS + LIFETIME_S))
  while ((SECONDS < deadline)); do
    if [[ -n $OWNER_PID ]] && ! kill -0 "$OWNER_PID" 2>/dev/null; then
      log "owner process $OWNER_PID is gone: stopping the cluster"
      break
    fi
    if ! alive slurmctld; then
      log "slurmctld is gone: stopping the rest"
      break
    fi
    sleep 2
  done
  ((SECONDS < deadline)) || log "lifetime of ${LIFETIME_S}s reached: stopping the cluster"
  stop_all
}

case $cmd in
  start) start ;;
  stop) stop_all ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  _watchdog) watchdog ;;
  *) usage ;;
esac
