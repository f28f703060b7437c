#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` and for trying
# `--cluster slurm` without a real HPC system.
#
#   scripts/local-slurm.sh start    install (Debian/Ubuntu, as root) and start munge, slurmctld
#                                   and slurmd with a configuration written for this machine
#   scripts/local-slurm.sh status   show the node and the queue
#   scripts/local-slurm.sh stop     stop the daemons
#
# It needs root (it writes /etc/slurm/slurm.conf and starts system daemons). It refuses to
# replace a slurm.conf it did not write, so it never touches a real cluster's configuration.
# The node offers this machine's cores and memory in one partition, `debug` (and `closed`,
# which queues jobs without ever starting them), and one
# pretend GPU (a GRES without a device file) so that GPU job directives are accepted; jobs
# run as the submitting user, without cgroups.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARK="# written by deepcad-chunked scripts/local-slurm.sh"
SPOOL=/var/spool/deepcad-slurm
LOGS=/var/log/deepcad-slurm

die() { echo "local-slurm: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are not installed and apt-get is missing"
    echo "local-slurm: installing slurmctld slurmd slurm-client munge" >&2
    for attempt in 1 2 3; do
        if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; then
            return
        fi
        sleep $((attempt * 5))
    done
    die "could not install the SLURM packages"
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing it"
    fi
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    # slurmd refuses a node that claims more memory than it has: offer 90 % of it.
    memory=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p /etc/slurm "$SPOOL/ctld" "$SPOOL/d" "$LOGS"
    cat > "$CONF" <<EOF
$MARK
ClusterName=deepcad
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/deepcad-slurmctld.pid
SlurmdPidFile=/run/deepcad-slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
# accepts jobs and never runs them: for tests of a cluster whose workers never start
PartitionName=closed Nodes=$host MaxTime=INFINITE State=DOWN
EOF
    cat > "$GRES" <<EOF
$MARK
NodeName=$host Name=gpu File=/dev/null Count=1
EOF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    else
        /usr/sbin/munged --force
    fi
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not start"
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts system daemons)"
    install_packages
    write_config
    start_munge
    stop_daemons
    /usr/sbin/slurmctld
    /usr/sbin/slurmd
    local host
    host=$(hostname -s)
    for _ in $(seq 60); do
        local state
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        case $state in
            idle*|mixed*|allocated*)
                echo "local-slurm: node $host is $state (partition debug)" >&2
                return ;;
            down*|drain*)
                scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    die "the node did not come up; logs in $LOGS"
}

stop_daemons() {
    local pidfile pid
    for pidfile in /run/deepcad-slurmd.pid /run/deepcad-slurmctld.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
        fi
        rm -f "$pidfile"
    done
}

case ${1:-start} in
    start) start ;;
    stop) stop_daemons ;;
    status) sinfo && squeue ;;
    *) die "usage: $0 start|status|stop" ;;
esac
