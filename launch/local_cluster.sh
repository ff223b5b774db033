#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests and for trying the launch path by
# hand: munged + slurmctld + two slurmd ("node1", "node2"), all state in DIR. Each node runs in
# a network namespace of its own (netns mode) or all share 127.0.0.1 (loopback mode).
#
#   launch/local_cluster.sh start  DIR   # start (or find running) and wait until both nodes are idle
#   launch/local_cluster.sh status DIR   # which daemons are alive, and sinfo; exit 3 if not all
#   launch/local_cluster.sh stop   DIR   # cancel jobs, stop every process this script started
#   launch/local_cluster.sh env    DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   launch/local_cluster.sh mode   DIR   # prints "netns" or "loopback" (and the addresses)
#
#   eval "$(launch/local_cluster.sh env /tmp/soratest)" && sbatch -N 2 --wrap 'srun hostname'
#
# Needs Debian's slurm-wlm and munge (launch/install_system_deps.sh). Nothing outside DIR is
# written: slurm.conf comes from launch/templates/slurm.conf.in, the MUNGE key lives in DIR/munge
# and its socket in DIR/run, and every command is pointed at DIR through SLURM_CONF.
#
# Two slurmd on one host: Debian's Slurm is built with multiple-slurmd support, so each slurmd
# runs as `slurmd -N nodeN` with its own Port= in slurm.conf and %n in SlurmdSpoolDir,
# SlurmdPidFile and SlurmdLogFile (docs/launching.md).
#
# Network (SORA_SLURM_NET):
#   netns     a Linux bridge in the host namespace (10.A.B.1) and one network namespace per
#             daemon host, joined to it by a veth pair: soractl = 10.A.B.10 (slurmctld),
#             node1 = 10.A.B.11, node2 = 10.A.B.12; each daemon in its own mount + UTS
#             namespace too, so that its host name is its own and its /etc/hosts
#             (DIR/net/hosts, bind-mounted) resolves soractl, node1, node2 (and no DNS is
#             asked: DIR/net/resolv.conf names no server). Commands on the
#             host (sbatch, squeue) reach slurmctld over the bridge. Jobs inherit all of it: the master address
#             comes from SLURM_NODELIST and gloo traffic crosses the (virtual) network, as on
#             a real cluster. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2. A.B is
#             derived from DIR, so several clusters can run side by side. Nothing listens on
#             a non-virtual interface. Outside DIR this makes /run/netns/sora-ID-* and the
#             links; `stop` removes them.
#   loopback  every daemon on 127.0.0.1; node names do not resolve, so jobs must be told
#             MASTER_ADDR=127.0.0.1 (and GLOO_SOCKET_IFNAME=lo).
#   auto      (default) netns where it can be set up, else loopback, saying why.
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
#   SORA_SLURM_NET         netns | loopback | auto (default auto; see Network above)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
TEMPLATE="$HERE/templates/slurm.conf.in"
NODES=(node1 node2)
WAIT_S=${SORA_SLURM_WAIT_S:-60}
LIFETIME_S=${SORA_SLURM_LIFETIME_S:-14400}
OWNER_PID=${SORA_SLURM_OWNER_PID:-}
NET_MODE=${SORA_SLURM_NET:-auto}
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

# ---------------------------------------------------------------------------- network
NETDIR="$DIR/net"
NET_ID=$(printf '%s' "$DIR" | sha1sum | cut -c1-6)
BRIDGE="sorabr$NET_ID"
netns_name() { echo "sora-$NET_ID-$1"; }

# The mode the running cluster was started in: "netns PREFIX" or "loopback".
net_mode() { [[ -s $NETDIR/mode ]] && cat "$NETDIR/mode" || echo loopback; }
net_prefix() { local m; m=$(net_mode); [[ $m != netns* ]] || echo "${m#netns }"; }

# A /24 in 10.128.0.0/10 derived from DIR and not used by any address here yet.
pick_prefix() {
  local a=$((128 + 0x${NET_ID:0:2} % 64)) b=$((0x${NET_ID:2:2})) used i
  used=$(ip -4 -o addr show 2>/dev/null | awk '{print $4}')
  for i in $(seq 0 255); do
    local pfx="10.$a.$(((b + i) % 256))"
    grep -q "^$pfx\." <<<"$used" || { echo "$pfx"; return 0; }
  done
  return 1
}

# The members of the virtual network: the controller and the nodes, each in a namespace of its
# own; MEMBER:HOSTNAME:LAST_OCTET.
MEMBERS=(ctl:soractl:10 node1:node1:11 node2:node2:12)

netns_down() {
  local m
  for m in "${MEMBERS[@]}"; do
    m=${m%%:*}
    ip netns del "$(netns_name "$m")" 2>/dev/null || true  # takes its end of the veth pair along
    ip link del "sv$NET_ID${m: -1}" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -f "$NETDIR/mode"
}

# Bridge + one namespace per member; prints the reason and returns 1 when it cannot.
netns_up() {
  local pfx m name host_name octet ns host peer err
  command -v ip >/dev/null || { echo "iproute2's ip is not installed"; return 1; }
  command -v unshare >/dev/null || { echo "util-linux's unshare is not installed"; return 1; }
  pfx=$(pick_prefix) || { echo "no free 10.x.y.0/24 for the bridge"; return 1; }
  mkdir -p "$NETDIR"
  {
    ip link add "$BRIDGE" type bridge &&
      # bridged frames must not meet the host's iptables FORWARD policy (br_netfilter)
      { ip link set "$BRIDGE" type bridge nf_call_iptables 0 2>/dev/null || true; } &&
      ip addr add "$pfx.1/24" dev "$BRIDGE" &&
      ip link set "$BRIDGE" up
  } 2>"$NETDIR/err" || { err=$(head -c 200 "$NETDIR/err"); netns_down; echo "cannot create a bridge: $err"; return 1; }
  printf '127.0.0.1 localhost\n%s.1 sorabridge\n' "$pfx" >"$NETDIR/hosts"
  # No DNS inside the namespaces: the host's nameservers are not reachable from them, and a
  # name or address not in the hosts file (torch's c10d looks its peers up) would wait for a
  # DNS timeout, twice, at every start. With no nameserver, glibc asks 127.0.0.1, which
  # refuses at once.
  printf '# local test cluster: no DNS, names come from %s/hosts\noptions timeout:1 attempts:1\n' "$NETDIR" >"$NETDIR/resolv.conf"
  for m in "${MEMBERS[@]}"; do
    IFS=: read -r name host_name octet <<<"$m"
    ns=$(netns_name "$name")
    host="sv$NET_ID${name: -1}"
    peer="sp$NET_ID${name: -1}"
    {
      ip netns add "$ns" &&
        ip link add "$host" type veth peer name "$peer" &&
        ip link set "$peer" netns "$ns" &&
        ip link set "$host" master "$BRIDGE" up &&
        ip -n "$ns" link set lo up &&
        ip -n "$ns" addr add "$pfx.$octet/24" dev "$peer" &&
        ip -n "$ns" link set "$peer" up &&
        ip -n "$ns" route add default via "$pfx.1"
    } 2>"$NETDIR/err" || { err=$(head -c 200 "$NETDIR/err"); netns_down; echo "cannot make network namespace $ns: $err"; return 1; }
    printf '%s.%s %s\n' "$pfx" "$octet" "$host_name" >>"$NETDIR/hosts"
  done
  # Mount + UTS namespaces must work too (each member's host name and /etc/hosts).
  # (nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup from slurmd.)
  if ! nsenter --net="/run/netns/$(netns_name node1)" unshare --mount --uts -- sh -c \
      "mount --bind '$NETDIR/hosts' /etc/hosts && hostname node1 && [ \"\$(hostname)\" = node1 ] && getent hosts node2 | grep -q '^$pfx\.12 '" \
      2>"$NETDIR/err"; then
    err=$(head -c 200 "$NETDIR/err"); netns_down; echo "cannot give a node its own host name and /etc/hosts: $err"; return 1
  fi
  echo "netns $pfx" >"$NETDIR/mode"
}

# How a member's daemon is started: inside its namespaces with its host name (netns), or as
# is (loopback). Prints the argv NUL-separated.
member_cmd() {
  local name=$1 m host_name=""
  shift
  if [[ $(net_mode) == netns* ]]; then
    for m in "${MEMBERS[@]}"; do [[ ${m%%:*} == "$name" ]] && { host_name=${m#*:}; host_name=${host_name%%:*}; }; done
    printf '%s\0' nsenter --net=/run/netns/"$(netns_name "$name")" unshare --mount --uts -- sh -c \
      "mount --bind '$NETDIR/hosts' /etc/hosts && mount --bind '$NETDIR/resolv.conf' /etc/resolv.conf && hostname $host_name && exec \"\$0\" \"\$@\"" "$@"
  else
    printf '%s\0' "$@"
  fi
}

setup_net() {
  local why
  netns_down
  mkdir -p "$NETDIR"
  case $NET_MODE in
    loopback) echo loopback >"$NETDIR/mode" ;;
    netns) why=$(netns_up) || die "SORA_SLURM_NET=netns: $why" ;;
    auto)
      if ! why=$(netns_up); then
        log "network namespaces unavailable ($why): nodes share 127.0.0.1 (loopback mode)"
        echo loopback >"$NETDIR/mode"
      fi
      ;;
    *) die "SORA_SLURM_NET=$NET_MODE: choose netns, loopback or auto" ;;
  esac
}

write_config() {
  local ctld n1 n2
  ctld=$(free_port)
  n1=$(free_port "$ctld")
  n2=$(free_port "$ctld" "$n1")
  local pfx ctld_host=localhost ctld_addr=127.0.0.1 a1=127.0.0.1 a2=127.0.0.1
  pfx=$(net_prefix)
  [[ -z $pfx ]] || { ctld_host=soractl; ctld_addr=$pfx.10; a1=$pfx.11; a2=$pfx.12; }
  sed -e "s|@DIR@|$DIR|g" -e "s|@USER@|$(id -un)|g" -e "s|@CTLD_PORT@|$ctld|g" \
      -e "s|@NODE1_PORT@|$n1|g" -e "s|@NODE2_PORT@|$n2|g" -e "s|@MEM_MB@|$MEM_MB|g" \
      -e "s|@CTLD_HOST@|$ctld_host|g" -e "s|@CTLD_ADDR@|$ctld_addr|g" -e "s|@NODE1_ADDR@|$a1|g" -e "s|@NODE2_ADDR@|$a2|g" \
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
  setup_net
  write_config

  spawn munged munged --foreground --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$DIR/run/munged.self.pid" --seed-file="$DIR/munge/munged.seed" --num-threads=2
  wait_for 15 munged munge_ok || { dump_logs; stop_all quiet; die "munged did not come up (log: $DIR/log/munged.out)"; }

  local -a argv
  mapfile -d '' argv < <(member_cmd ctl slurmctld -D -f "$SLURM_CONF")
  spawn slurmctld "${argv[@]}"
  wait_for 30 slurmctld ctld_up || { dump_logs; stop_all quiet; die "slurmctld did not answer (log: $DIR/log/slurmctld.log)"; }

  for n in "${NODES[@]}"; do
    mapfile -d '' argv < <(member_cmd "$n" slurmd -D -N "$n" -f "$SLURM_CONF")
    spawn "slurmd-$n" "${argv[@]}"
  done

  spawn watchdog bash "$SELF" _watchdog "$DIR"

  if ! wait_for "$WAIT_S" - nodes_idle; then
    sinfo -N -l >&2 || true
    dump_logs
    stop_all quiet
    die "nodes not idle after ${WAIT_S}s"
  fi
  log "up in $((SECONDS - t0))s, $(mode_line): $(sinfo -h -N -o '%N=%T' | tr '\n' ' ')(logs in $DIR/log)"
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
  netns_down
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

mode_line() {
  local pfx
  pfx=$(net_prefix)
  if [[ -n $pfx ]]; then
    echo "netns (soractl $pfx.10, node1 $pfx.11, node2 $pfx.12 on bridge $BRIDGE $pfx.1)"
  else
    echo "loopback (every node on 127.0.0.1)"
  fi
}

case $cmd in
  start) start ;;
  mode) mode_line ;;
  stop) stop_all ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  _watchdog) watchdog ;;
  *) usage ;;
esac
