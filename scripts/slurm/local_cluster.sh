#!/usr/bin/env bash
# A one-machine Slurm cluster on loopback, for tests: munged + slurmctld + slurmd, everything
# (config, key, sockets, state, logs) under one private directory, nothing under /etc or /run.
#
#   scripts/slurm/local_cluster.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm/local_cluster.sh stop DIR    # stops the three daemons started in DIR
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge packages (scripts/setup_slurm.sh
# installs them where apt works) and root, since slurmd starts jobs as their owner. No cgroups:
# proctrack/linuxproc and task/none, so it also runs inside an unprivileged container.
# Client commands (sbatch, squeue, sinfo, scontrol) find the cluster through $SLURM_CONF.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
ACTION=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
PY=${PYTHON:-python3}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local host node ctld_port slurmd_port
  host=$(hostname -s)
  # The node's real sockets/cores/memory, so slurmd does not drain it for a mismatch.
  node=$(slurmd -C | head -n1 | sed "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/")
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=videodit-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=5
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  rm -f "$DIR/munge.key"
  dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none &&
    chmod 0400 "$DIR/munge.key" &&
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
      --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
}

wait_idle() {
  local i
  for i in $(seq 1 60); do
    if [ "$(sinfo -h -o %t 2>/dev/null | head -n1)" = "idle" ]; then return 0; fi
    sleep 0.5
  done
  echo "local_cluster.sh: the node did not become idle in 30 s; sinfo says:" >&2
  sinfo >&2 || true
  tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
  return 1
}

start() {
  mkdir -p "$DIR/state" "$DIR/spool"
  chmod 0700 "$DIR"
  write_conf
  export SLURM_CONF=$DIR/slurm.conf
  # Whatever fails, stop what did start: no daemon is left behind by a failed start.
  if ! { start_munge && slurmctld -f "$SLURM_CONF" && slurmd -f "$SLURM_CONF" && wait_idle; }; then
    echo "local_cluster.sh: the cluster did not start; logs in $DIR" >&2
    stop
    exit 1
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {
  local f=$1 pid i
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_pid "$DIR/slurmd.pid"
  stop_pid "$DIR/slurmctld.pid"
  stop_pid "$DIR/munged.pid"
}

case $ACTION in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
