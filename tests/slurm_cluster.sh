#!/usr/bin/env bash
# Bring up, or tear down, a real one-node SLURM cluster on this machine for tests/test_slurm.py.
#
#   tests/slurm_cluster.sh up DIR     install SLURM + munge if missing, start munged, slurmctld, slurmd
#                                     with a config, state and logs under DIR; prints SLURM_CONF=DIR/slurm.conf
#   tests/slurm_cluster.sh down DIR   cancel the jobs, stop the daemons this script started
#   tests/slurm_cluster.sh config DIR write DIR/slurm.conf only (what `up` would start the daemons with)
#
# Needs root (the daemons and the jobs run as root). Ports come from SLURMCTLD_PORT / SLURMD_PORT
# (default 6817 / 6818) and job ids start at FIRST_JOB_ID (default 1), so that two clusters can live
# side by side. Every wait is bounded.
# Facts behind the choices: ../shared/notes/slurm-local-cluster.md (Debian 12, Slurm 22.05).
set -euo pipefail

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

# wait_until SECONDS WHAT CMD...: poll CMD every 0.2 s; fail with WHAT after SECONDS.
wait_until() {
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what"
        sleep 0.2
    done
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    echo "installing slurmctld slurmd slurm-client munge" >&2
    timeout 300 apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive timeout 300 \
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
controller_up() { scontrol ping 2>/dev/null | grep -q UP; }
node_idle() { [[ $(sinfo -h -o %t 2>/dev/null) == idle ]]; }

start_munge() {
    munge_ok && return   # one is already running
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.started"
    wait_until 10 "munged" munge_ok
}

# The node's CPUs are the machine's (nproc --all), not those this shell may run on: under `taskset -c 0`
# (tests/under_load.py --cpus 0) plain nproc says 1, and the 2-task jobs were refused or pended forever.
write_config() {
    local host ctld_port=${SLURMCTLD_PORT:-6817} slurmd_port=${SLURMD_PORT:-6818}
    host=$(hostname -s)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=testcluster
FirstJobId=${FIRST_JOB_ID:-1}
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
# Credentials expire fast and the scheduler runs often, so a requeued job reruns in ~15 s.
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=1,sched_interval=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=30
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc --all) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    [[ $(id -u) == 0 ]] || die "must run as root (the SLURM daemons run as root)"
    install_packages
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    start_munge
    write_config
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    wait_until 30 "slurmctld (see $dir/log/slurmctld.log)" controller_up
    slurmd -f "$SLURM_CONF"
    wait_until 30 "the node to become idle (see $dir/log/slurmd.log)" node_idle
    echo "SLURM_CONF=$SLURM_CONF"
}

# stop_pidfile FILE: TERM the daemon named in FILE, KILL it after 10 s.
stop_pidfile() {
    local pid
    [[ -s $1 ]] || return 0
    pid=$(<"$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

down() {
    dir=$(cd "$dir" 2>/dev/null && pwd) || return 0
    export SLURM_CONF=$dir/slurm.conf
    if [[ -f $SLURM_CONF ]] && controller_up; then
        timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
        # Give the jobs' steps a moment to go before their slurmd does.
        for _ in $(seq 25); do
            [[ -z $(timeout 5 squeue -h -t RUNNING,COMPLETING 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    if [[ -f $dir/munged.started ]]; then
        # Another cluster (a test run beside this one) may still authenticate through it.
        pgrep -x slurmctld >/dev/null || stop_pidfile /run/munge/munged.pid
        rm -f "$dir/munged.started"
    fi
}

[[ $# == 2 ]] || die "usage: $0 up|down|config DIR"
dir=$2
case $1 in
    up) up ;;
    down) down ;;
    config) write_config ;;
    *) die "usage: $0 up|down|config DIR" ;;
esac
