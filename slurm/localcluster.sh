#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, from the distribution's slurm-wlm and munge packages.
#
#   slurm/localcluster.sh up       start munged, slurmctld and slurmd (idempotent); prints the SLURM_CONF export
#   slurm/localcluster.sh down     stop them (idempotent)
#   slurm/localcluster.sh status   say whether it is up
#
# Everything (config, munge key and socket, state, logs, pid files) lives under one state directory:
# $RINGBENCH_SLURM_DIR, default /tmp/ringbench-slurm. The daemons run as the calling user (root in CI);
# install the packages first: apt-get install -y slurm-wlm munge.
# RINGBENCH_SLURM_CPUS (default: max(nproc, 8)) is the CPU count the node advertises, so jobs with more
# ranks than cores can run oversubscribed, as mpiexec does locally.
# RINGBENCH_SLURMCTLD_PORT (default 6817) and RINGBENCH_SLURMD_PORT (default 6818) are the TCP ports of the
# two daemons: a second cluster on the same host (another user, a CI job) needs its own state directory and
# its own two ports. `up` refuses, with one line and exit status 1, a port that something already listens on.
set -euo pipefail

DIR=${RINGBENCH_SLURM_DIR:-/tmp/ringbench-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${RINGBENCH_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${RINGBENCH_SLURMD_PORT:-6818}
export SLURM_CONF=$CONF

die() { echo "localcluster: $*" >&2; exit 1; }
# shellcheck source=slurm/common.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"  # pid_alive, slurm_conf_body, start_munged

check_port() {  # VAR VALUE: a valid port nothing listens on (unless it is this cluster's own daemon)
    local var=$1 port=$2
    [[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
        || die "$var=$port: expected a TCP port number 1-65535"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port ($var) is in use on this host; set $var to a free port (another cluster may be running)"
    fi
}

check_ports() {
    [ "$CTLD_PORT" != "$SLURMD_PORT" ] \
        || die "RINGBENCH_SLURMCTLD_PORT and RINGBENCH_SLURMD_PORT are both $CTLD_PORT: the two daemons need two ports"
    pid_alive "$DIR/slurmctld.pid" || check_port RINGBENCH_SLURMCTLD_PORT "$CTLD_PORT"
    pid_alive "$DIR/slurmd.pid" || check_port RINGBENCH_SLURMD_PORT "$SLURMD_PORT"
}

need_binaries() {
    local missing=()
    for b in slurmctld slurmd munged mungekey scontrol sinfo; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: install them with 'apt-get install -y slurm-wlm munge'"
    export PATH=$PATH:/usr/sbin
}

is_up() {
    [ -f "$CONF" ] && scontrol ping 2>/dev/null | grep -q 'is UP'
}


write_conf() {
    local cpus mem
    cpus=$(nproc)
    cpus=${RINGBENCH_SLURM_CPUS:-$(( cpus > 8 ? cpus : 8 ))}
    mem=$(awk '/MemTotal/ {m = int($2 / 1024) - 2048; print (m > 512 ? m : 512)}' /proc/meminfo)
    {
        cat <<CONF
# written by slurm/localcluster.sh: a one-node cluster for trying ringbench submit
ClusterName=ringbench
SlurmctldHost=localhost
CONF
        slurm_conf_body "$DIR/slurmd.pid" "$DIR/slurmd.log"
        cat <<CONF
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    } > "$CONF"
}

up() {
    check_ports
    need_binaries
    if is_up; then
        echo "localcluster: already up ($DIR)"
    else
        mkdir -p "$DIR/state" "$DIR/slurmd-localhost"
        start_munged
        write_conf
        if ! pid_alive "$DIR/slurmctld.pid"; then
            setsid slurmctld -D -i -f "$CONF" </dev/null >>"$DIR/slurmctld.out" 2>&1 &
        fi
        if ! pid_alive "$DIR/slurmd.pid"; then
            setsid slurmd -D -N localhost -f "$CONF" </dev/null >>"$DIR/slurmd.out" 2>&1 &
        fi
        local ok=""
        for _ in $(seq 300); do
            if is_up && sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then ok=1; break; fi
            sleep 0.1
        done
        [ -n "$ok" ] || die "slurm did not come up within 30 s; see $DIR/slurmctld.log and $DIR/slurmd.log"
        echo "localcluster: up ($DIR)"
    fi
    echo "export SLURM_CONF=$CONF"
}

down() {
    need_binaries
    if is_up; then
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    for f in "$DIR/slurmctld.pid" "$DIR/slurmd.pid"; do
        for _ in $(seq 100); do pid_alive "$f" || break; sleep 0.1; done
        if pid_alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
    done
    if pid_alive "$DIR/munge/munged.pid"; then
        kill "$(cat "$DIR/munge/munged.pid")" 2>/dev/null || true
    fi
    rm -f "$DIR/munge/munged.pid"
    echo "localcluster: down ($DIR)"
}

status() {
    need_binaries
    if is_up; then
        echo "localcluster: up ($DIR)"
        sinfo
        echo "export SLURM_CONF=$CONF"
    else
        echo "localcluster: down ($DIR)"
        return 1
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status   (state in \$RINGBENCH_SLURM_DIR, default /tmp/ringbench-slurm; ports" \
           "\$RINGBENCH_SLURMCTLD_PORT, default 6817, and \$RINGBENCH_SLURMD_PORT, default 6818)" >&2; exit 2 ;;
esac
