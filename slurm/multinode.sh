#!/usr/bin/env bash
# An emulated cluster of K nodes on this one machine: Linux network namespaces joined by a bridge, a real MPI
# and a real Slurm across them.
#
#   slurm/multinode.sh up         make the nodes and start munged, slurmctld and one slurmd per node (idempotent)
#   slurm/multinode.sh down       stop the daemons and delete every namespace, veth and the bridge it made (idempotent)
#   slurm/multinode.sh status     say whether it is up: the nodes, their addresses, their links' byte counters, sinfo
#   slurm/multinode.sh mpiexec ARGS...   mpiexec across the nodes (hydra's -launcher ssh through a script that
#                                 enters a node's namespace; -hosts every node): e.g. `... mpiexec -ppn 2 -n 4 CMD`
#   slurm/multinode.sh net-up | net-down   only the namespaces, no Slurm (mpiexec across the nodes still works)
#   slurm/multinode.sh rate RATE|none [NODE]   reshape the running cluster's node links (benchmarks/multinode_bench.py),
#                                 or only node NODE's (1..K): a slow node among healthy ones, as `doctor` flags
#
# Node i (1..K) is the network namespace ${PREFIX}i with its own hostname (each command runs under `unshare --uts`,
# which sets the hostname to the node's name), address $SUBNET.i/24 on its eth0, a veth pair to the bridge
# ${PREFIX}br ($SUBNET.254) in this (the root) namespace. Both ends of each node's veth are shaped with
# `tc qdisc ... tbf rate $RINGBENCH_INTERNODE_RATE`, so a node sends and receives at that rate. netem is not in
# this kernel: bandwidth can be shaped, latency cannot be added (the links' latency is the kernel's, ~tens of us).
#
# MPI: ranks of one node talk over shared memory; ranks of two nodes over TCP on the veth links only when MPICH's
# netmod is ofi with its tcp provider (MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp, written into the env file): with
# the wheel's default UCX netmod ranks in different namespaces still find each other through /dev/shm (one kernel)
# and the shaped link carries nothing. Slurm: slurmctld in the root namespace on the bridge's address, one slurmd
# per node started under `nsenter --net` (not `ip netns exec`, which mounts a fresh /sys without cgroups), so
# `sbatch --nodes=2 --ntasks-per-node=2` places ranks on two hosts and `srun --mpi=pmi2` starts them.
#
# Settings (environment):
#   RINGBENCH_NODES            K, the node count (default 2)
#   RINGBENCH_INTERNODE_RATE   each node link's rate, as tc reads it (default 400mbit; "none": unshaped)
#   RINGBENCH_NODE_CPUS        CPUs each node advertises to Slurm (default max(nproc, 4))
#   RINGBENCH_MULTINODE_DIR    state (env file, launcher, Slurm config, munge, logs; default /tmp/ringbench-multinode)
#   RINGBENCH_MULTINODE_PREFIX names of the namespaces, hostnames and links (default rbnode: rbnode1.., rbnodebr)
#   RINGBENCH_MULTINODE_SUBNET the first three octets of the /24 the nodes use (default 10.217.0)
#   RINGBENCH_MULTINODE_SLURMCTLD_PORT, RINGBENCH_MULTINODE_SLURMD_PORT   (default 6827, 6828: slurm/localcluster.sh's
#                              one-node cluster keeps 6817/6818, so both can run at once)
# After `up`: `source $RINGBENCH_MULTINODE_DIR/env` sets SLURM_CONF, the MPI netmod settings and RINGBENCH_NODE_HOSTS.
# Needs root (namespaces, tc); the Slurm part needs slurm-wlm and munge (apt-get install -y slurm-wlm munge).
set -euo pipefail

DIR=${RINGBENCH_MULTINODE_DIR:-/tmp/ringbench-multinode}
K=${RINGBENCH_NODES:-2}
if [ -z "${RINGBENCH_NODES:-}" ] && [ -f "$DIR/net.up" ]; then K=$(cut -d' ' -f1 "$DIR/net.up"); fi  # the running cluster's
RATE=${RINGBENCH_INTERNODE_RATE:-400mbit}
PREFIX=${RINGBENCH_MULTINODE_PREFIX:-rbnode}
SUBNET=${RINGBENCH_MULTINODE_SUBNET:-10.217.0}
CTLD_PORT=${RINGBENCH_MULTINODE_SLURMCTLD_PORT:-6827}
SLURMD_PORT=${RINGBENCH_MULTINODE_SLURMD_PORT:-6828}
BRIDGE=${PREFIX}br
BRIDGE_IP=$SUBNET.254
CONF=$DIR/slurm.conf
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH=$PATH:/usr/sbin:/sbin

die() { echo "multinode: $*" >&2; exit 1; }
# shellcheck source=slurm/common.sh
. "$HERE/common.sh"  # pid_alive, slurm_conf_body, start_munged

check_settings() {
    [[ $K =~ ^[0-9]+$ ]] && [ "$K" -ge 1 ] && [ "$K" -le 16 ] || die "RINGBENCH_NODES=$K: expected a node count 1-16"
    [[ $PREFIX =~ ^[a-z][a-z0-9]{0,9}$ ]] || die "RINGBENCH_MULTINODE_PREFIX=$PREFIX: expected 1-10 lowercase letters and digits, a letter first"
    [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "RINGBENCH_MULTINODE_SUBNET=$SUBNET: expected three octets, e.g. 10.217.0"
    [ "$RATE" = none ] || [[ $RATE =~ ^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)$ ]] \
        || die "RINGBENCH_INTERNODE_RATE=$RATE: expected a tc rate such as 400mbit or 1gbit, or none"
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc); run it as root"
    command -v ip >/dev/null && command -v tc >/dev/null || die "needs ip and tc (apt-get install -y iproute2)"
}

node_name() { echo "$PREFIX$1"; }
node_ip() { echo "$SUBNET.$1"; }
hosts_csv() { local i out=""; for i in $(seq "$K"); do out+="${out:+,}$(node_ip "$i")"; done; echo "$out"; }
made() { [ -f "$DIR/made" ] && cat "$DIR/made" || true; }
record() { echo "$1" >> "$DIR/made"; }

# ---------------------------------------------------------------------------------------------------------
# the network: namespaces, veths, the bridge, the shaping
# ---------------------------------------------------------------------------------------------------------
shape() {  # shape [nsexec...] DEV: a tbf at RATE on DEV's egress (nothing when RATE is none)
    [ "$RATE" = none ] && return 0
    "$@" root tbf rate "$RATE" burst 256kb latency 20ms
}

net_up() {
    check_settings
    mkdir -p "$DIR"
    if [ -f "$DIR/net.up" ]; then echo "multinode: nodes already up ($DIR)"; return 0; fi
    for i in $(seq "$K"); do
        ! ip netns list | grep -qw "$(node_name "$i")" || die "namespace $(node_name "$i") exists but is not this script's (no $DIR/net.up); 'ip netns del' it or set RINGBENCH_MULTINODE_PREFIX"
    done
    ! ip link show "$BRIDGE" >/dev/null 2>&1 || die "link $BRIDGE exists but is not this script's; delete it or set RINGBENCH_MULTINODE_PREFIX"
    ! ip -4 addr show | grep -q "inet $SUBNET\." || die "the subnet $SUBNET.0/24 is in use on this host; set RINGBENCH_MULTINODE_SUBNET"
    trap 'echo "multinode: up failed; taking down what it made" >&2; net_down >/dev/null 2>&1 || true' ERR
    : > "$DIR/made"
    record "link $BRIDGE"
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in $(seq "$K"); do
        local ns veth
        ns=$(node_name "$i")
        veth=${PREFIX}v$i
        record "netns $ns"
        ip netns add "$ns"
        record "link $veth"
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
        ip -n "$ns" addr add "$(node_ip "$i")/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add default via "$BRIDGE_IP"
        shape tc qdisc add dev "$veth"                  # into the node
        shape ip netns exec "$ns" tc qdisc add dev eth0  # out of the node
    done
    write_launcher
    write_env
    echo "$K $RATE" > "$DIR/net.up"
    trap - ERR
    echo "multinode: $K nodes up ($(hosts_csv); link rate $RATE; $DIR)"
}

set_rate() {  # RATE [NODE]: reshape every node link of the running cluster (none: unshaped), and record it;
    # with NODE (1..K), only that node's link: a slow node among healthy ones (what doctor flags)
    [ -n "${1:-}" ] || die "usage: $0 rate RATE|none [NODE] (a tc rate such as 400mbit; NODE 1..$K: that node only)"
    [ -f "$DIR/net.up" ] || die "the nodes are down: run $0 up first"
    RATE=$1
    check_settings
    local nodes i ns veth
    nodes=$(seq "$K")
    if [ -n "${2:-}" ]; then
        [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] && [ "$2" -le "$K" ] || die "rate $RATE $2: expected a node number 1-$K"
        nodes=$2
    fi
    for i in $nodes; do
        ns=$(node_name "$i")
        veth=${PREFIX}v$i
        tc qdisc del dev "$veth" root 2>/dev/null || true
        ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
        shape tc qdisc add dev "$veth"
        shape ip netns exec "$ns" tc qdisc add dev eth0
    done
    if [ -n "${2:-}" ]; then
        echo "$2 $RATE" >> "$DIR/node-rates"
        echo "multinode: node $(node_name "$2")'s link at $RATE"
        return 0
    fi
    rm -f "$DIR/node-rates"
    echo "$K $RATE" > "$DIR/net.up"
    sed -i "s/^export RINGBENCH_INTERNODE_RATE=.*/export RINGBENCH_INTERNODE_RATE=$RATE/" "$DIR/env"
    echo "multinode: node links at $RATE"
}

net_down() {
    local kind name
    # the bridge last: every namespace (and with it its veth pair) first
    made | tac | while read -r kind name; do
        case $kind in
            netns) ip netns pids "$name" 2>/dev/null | xargs -r kill 2>/dev/null || true
                   ip netns del "$name" 2>/dev/null || true ;;
            link) ip link del "$name" 2>/dev/null || true ;;
        esac
    done
    rm -f "$DIR/made" "$DIR/net.up" "$DIR/node-rates"
    echo "multinode: nodes down ($DIR)"
}

write_launcher() {
    # hydra's ssh launcher calls it as `SCRIPT [ssh options] HOST COMMAND...`: drop the options, map the host
    # (a node's address or name) to its namespace, run the command there under its own hostname
    cat > "$DIR/launcher" <<EOF
#!/bin/sh
# written by slurm/multinode.sh: hydra's -launcher-exec for the emulated nodes
while [ \$# -gt 0 ]; do
    case \$1 in
        -x|-X|-q|-T|-t|-n) shift ;;
        -o|-p|-l|-i) shift 2 ;;
        *) break ;;
    esac
done
host=\$1; shift
case \$host in
$(for i in $(seq "$K"); do echo "    $(node_ip "$i")|$(node_name "$i")) ns=$(node_name "$i") ;;"; done)
    *) echo "multinode launcher: \$host is not a node of this cluster ($(hosts_csv))" >&2; exit 255 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c 'hostname "\$0"; exec sh -c "\$*"' "\$ns" "\$@"
EOF
    chmod 755 "$DIR/launcher"
    cat > "$DIR/mpiexec" <<EOF
#!/bin/sh
# written by slurm/multinode.sh: mpiexec across the emulated nodes (every node in -hosts, or RINGBENCH_MPIEXEC_HOSTS:
# e.g. 10.217.0.1:2 for two ranks on node 1 alone; add -ppn N for N ranks per node, block placement; without it hydra
# places one rank per node in turn). RINGBENCH_MPIEXEC: the mpiexec to use (default: the one on PATH).
hosts=\${RINGBENCH_MPIEXEC_HOSTS:-}
. "$DIR/env"
exec "\${RINGBENCH_MPIEXEC:-mpiexec}" -launcher ssh -launcher-exec "$DIR/launcher" -iface $BRIDGE -hosts "\${hosts:-\$RINGBENCH_NODE_HOSTS}" "\$@"
EOF
    chmod 755 "$DIR/mpiexec"
}

write_env() {
    cat > "$DIR/env" <<EOF
# written by slurm/multinode.sh up: source it to use the emulated nodes
export RINGBENCH_MULTINODE_DIR=$DIR
export RINGBENCH_NODE_HOSTS=$(hosts_csv)
export RINGBENCH_NODE_NAMES=$(for i in $(seq "$K"); do printf '%s' "$(node_name "$i")"; [ "$i" = "$K" ] || printf ,; done)
export RINGBENCH_INTERNODE_RATE=$RATE
export RINGBENCH_NODE_LINKS=$(for i in $(seq "$K"); do printf '%s' "${PREFIX}v$i"; [ "$i" = "$K" ] || printf ,; done)
# MPICH: TCP (libfabric's tcp provider) between nodes, shared memory inside a node; UCX would use /dev/shm across the
# namespaces and the node links would carry nothing
export MPIR_CVAR_CH4_NETMOD=ofi
export FI_PROVIDER=tcp
export SLURM_CONF=$CONF
EOF
}

# ---------------------------------------------------------------------------------------------------------
# Slurm: munged, slurmctld on the bridge, one slurmd per node namespace
# ---------------------------------------------------------------------------------------------------------
need_slurm() {
    local missing=() b
    for b in slurmctld slurmd munged mungekey scontrol sinfo nsenter; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}: install them with 'apt-get install -y slurm-wlm munge'"
}

slurm_is_up() { [ -f "$CONF" ] && SLURM_CONF=$CONF scontrol ping 2>/dev/null | grep -q 'is UP'; }

write_conf() {
    local cpus mem names
    cpus=$(nproc)
    cpus=${RINGBENCH_NODE_CPUS:-$(( cpus > 4 ? cpus : 4 ))}
    mem=$(awk -v k="$K" '/MemTotal/ {m = int(($2 / 1024 - 2048) / k); print (m > 256 ? m : 256)}' /proc/meminfo)
    names=$(for i in $(seq "$K"); do printf '%s' "$(node_name "$i")"; [ "$i" = "$K" ] || printf ,; done)
    {
        cat <<CONF
# written by slurm/multinode.sh: $K emulated nodes (network namespaces) on one machine
ClusterName=ringbench-multinode
SlurmctldHost=$(hostname)
SlurmctldAddr=$BRIDGE_IP
CONF
        slurm_conf_body "$DIR/slurmd-%n.pid" "$DIR/slurmd-%n.log"
        for i in $(seq "$K"); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_ip "$i") CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=nodes Nodes=$names Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF"
}

slurm_up() {
    need_slurm
    export SLURM_CONF=$CONF
    if slurm_is_up; then echo "multinode: slurm already up ($CONF)"; return 0; fi
    trap 'echo "multinode: up failed; taking everything down" >&2; down >/dev/null 2>&1 || true' ERR
    mkdir -p "$DIR/state"
    start_munged
    write_conf
    pid_alive "$DIR/slurmctld.pid" || { setsid slurmctld -D -i -f "$CONF" </dev/null >>"$DIR/slurmctld.out" 2>&1 & }
    local i ns names=""
    for i in $(seq "$K"); do
        ns=$(node_name "$i")
        names+="${names:+,}$ns"
        mkdir -p "$DIR/slurmd-$ns"
        if ! pid_alive "$DIR/slurmd-$ns.pid"; then
            setsid nsenter --net="/run/netns/$ns" unshare --uts \
                sh -c 'hostname "$1"; exec slurmd -D -N "$1" -f "$2"' sh "$ns" "$CONF" </dev/null >>"$DIR/slurmd-$ns.out" 2>&1 &
        fi
    done
    local ok="" n
    for _ in $(seq 300); do
        if slurm_is_up; then
            n=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated|drained|draining|down)' || true)
            if [ "$n" -ge "$K" ]; then
                scontrol update nodename="$names" state=resume >/dev/null 2>&1 || true
                n=$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)' || true)
                [ "$n" -ge "$K" ] && { ok=1; break; }
            fi
        fi
        sleep 0.1
    done
    [ -n "$ok" ] || die "slurm did not come up within 30 s; see $DIR/slurmctld.log and $DIR/slurmd-*.log"
    trap - ERR
    echo "multinode: slurm up, partition 'nodes' ($names)"
}

slurm_down() {
    command -v scontrol >/dev/null 2>&1 || return 0
    if slurm_is_up; then SLURM_CONF=$CONF scontrol shutdown >/dev/null 2>&1 || true; fi
    local f
    for f in "$DIR/slurmctld.pid" "$DIR"/slurmd-*.pid; do
        [ -f "$f" ] || continue
        for _ in $(seq 100); do pid_alive "$f" || break; sleep 0.1; done
        if pid_alive "$f"; then kill "$(cat "$f")" 2>/dev/null || true; fi
        rm -f "$f"
    done
    if pid_alive "$DIR/munge/munged.pid"; then kill "$(cat "$DIR/munge/munged.pid")" 2>/dev/null || true; fi
    rm -f "$DIR/munge/munged.pid"
}

# ---------------------------------------------------------------------------------------------------------
up() {
    check_settings
    check_port RINGBENCH_MULTINODE_SLURMCTLD_PORT "$CTLD_PORT"
    net_up
    slurm_up
    echo "source $DIR/env"
}

check_port() {  # VAR PORT: free on this host unless it is this cluster's own slurmctld
    [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] && [ "$2" -le 65535 ] || die "$1=$2: expected a TCP port number 1-65535"
    pid_alive "$DIR/slurmctld.pid" && return 0
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
        die "port $2 ($1) is in use on this host; set $1 to a free port"
    fi
}

down() {
    slurm_down
    net_down
}

status() {
    if [ ! -f "$DIR/net.up" ]; then echo "multinode: down ($DIR)"; return 1; fi
    echo "multinode: nodes up ($DIR): $(cat "$DIR/net.up")"
    if [ -f "$DIR/node-rates" ]; then echo "  node links reshaped (node rate): $(tr '\n' ';' < "$DIR/node-rates")"; fi
    local i
    for i in $(seq "$K"); do
        local ns=$(node_name "$i") veth=${PREFIX}v$i
        echo "  $ns $(node_ip "$i")  link $veth: rx $(cat /sys/class/net/$veth/statistics/rx_bytes) B, tx $(cat /sys/class/net/$veth/statistics/tx_bytes) B"
    done
    if slurm_is_up; then SLURM_CONF=$CONF sinfo; else echo "  slurm: down"; fi
    echo "source $DIR/env"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    net-up) net_up ;;
    net-down) slurm_down; net_down ;;
    rate) shift; set_rate "${1:-}" "${2:-}" ;;
    mpiexec) shift; [ -f "$DIR/net.up" ] || die "the nodes are down: run $0 up first"; exec "$DIR/mpiexec" "$@" ;;
    *) echo "usage: $0 up|down|status|net-up|net-down|mpiexec ARGS...   (settings: see the comment at the top of $HERE/multinode.sh)" >&2; exit 2 ;;
esac
