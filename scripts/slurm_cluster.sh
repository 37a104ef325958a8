#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests marked `slurm` and for trying
# `ftlab serve executor=slurm` / `ftlab train -m launcher=slurm` without a real cluster.
#
#   sudo apt-get install -y slurm-wlm munge      # Debian's packages (checked with slurm-wlm 22.05)
#   sudo scripts/slurm_cluster.sh start          # munged, slurmctld, slurmd; waits until the node is idle
#   export SLURM_CONF=/tmp/ftlab-slurm/slurm.conf   # what `start` prints: sbatch, squeue, scancel find the cluster
#   sudo scripts/slurm_cluster.sh status | stop
#
# Runs as root (slurmd must). Everything it writes is under one folder, $FTLAB_SLURM_DIR
# (default /tmp/ftlab-slurm): slurm.conf, munge's key and socket, spool, state and logs
# (log/slurmctld.log, log/slurmd.log, log/munged.log). No file under /etc is touched.
# The node has this machine's cores (`nproc`) and its memory less 1 GiB (/proc/meminfo), in
# one partition, `debug`. `start` and `stop` are idempotent: start leaves a running cluster as
# it is, stop leaves nothing running.
set -euo pipefail

ROOT=${FTLAB_SLURM_DIR:-/tmp/ftlab-slurm}
CONF=$ROOT/slurm.conf
MUNGE_SOCKET=$ROOT/munge/munge.socket
INSTALL_HINT="apt-get install -y slurm-wlm munge   (as root)"

die() { echo "slurm_cluster: $*" >&2; exit 1; }

pid_alive() {  # pid_alive <pid file>: the daemon it names is running
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
  local host cpus mem_mib
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mib=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF.new" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node cluster on $host.
ClusterName=ftlab
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# a finished job stays visible to squeue/scontrol this long (no accounting daemon, so no sacct)
MinJobAge=600
# seconds between a job's SIGTERM and its SIGKILL: time to write a checkpoint
KillWait=30
SchedulerParameters=sched_interval=2
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
}

start_munge() {
  pid_alive "$ROOT/munge/munged.pid" && return
  install -d -o munge -g munge -m 755 "$ROOT/munge"  # clients reach the socket in it; the key is 400
  if [ ! -s "$ROOT/munge/munge.key" ]; then
    dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$ROOT/munge/munge.key"
    chmod 400 "$ROOT/munge/munge.key"
  fi
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$ROOT/munge/munge.key" \
    --pid-file="$ROOT/munge/munged.pid" --seed-file="$ROOT/munge/munged.seed" --log-file="$ROOT/log/munged.log"
}

wait_idle() {  # until the node takes jobs
  local state=""
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
    case $state in idle|mix|alloc) return 0 ;; esac
    sleep 0.5
  done
  die "the node is not idle after 30 s (state: '${state:-unknown}'); see $ROOT/log/slurmctld.log and slurmd.log"
}

start() {
  [ "$(id -u)" = 0 ] || die "run as root (slurmd must): sudo $0 start"
  for program in munged slurmctld slurmd sinfo; do
    command -v "$program" >/dev/null || [ -x "/usr/sbin/$program" ] || die "$program is missing: $INSTALL_HINT"
  done
  mkdir -p "$ROOT"/{state,spool,run,log}
  chmod 755 "$ROOT"
  export SLURM_CONF=$CONF
  if ! pid_alive "$ROOT/run/slurmctld.pid" || ! pid_alive "$ROOT/run/slurmd.pid"; then
    write_conf
  fi
  chown munge:munge "$ROOT/log"; chmod 755 "$ROOT/log"  # munged, as munge, writes its log here too
  start_munge
  pid_alive "$ROOT/run/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
  pid_alive "$ROOT/run/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
  wait_idle
  echo "slurm_cluster: up ($(sinfo -h -N -o '%N %c CPUs %m MiB %P')); export SLURM_CONF=$CONF"
}

stop_daemon() {  # stop_daemon <pid file>: SIGTERM, then wait up to 10 s
  pid_alive "$1" || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_daemon "$ROOT/run/slurmd.pid"
  stop_daemon "$ROOT/run/slurmctld.pid"
  stop_daemon "$ROOT/munge/munged.pid"
  echo "slurm_cluster: stopped"
}

status() {
  local down=0
  for daemon in munge/munged run/slurmctld run/slurmd; do
    if pid_alive "$ROOT/$daemon.pid"; then echo "${daemon#*/}: running (pid $(cat "$ROOT/$daemon.pid"))"
    else echo "${daemon#*/}: stopped"; down=1; fi
  done
  [ "$down" = 0 ] && SLURM_CONF=$CONF sinfo -N
  return "$down"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status   (state, logs and slurm.conf under $ROOT)" >&2; exit 2 ;;
esac
