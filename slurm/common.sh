# Shared by slurm/localcluster.sh and slurm/multinode.sh (sourced, not run): the Slurm configuration lines both
# clusters write, and starting munged. Both expect DIR (the state directory), CTLD_PORT, SLURMD_PORT and die().

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

slurm_conf_body() {  # SLURMD_PID SLURMD_LOG: every line after the cluster's name and controller host
    cat <<CONF
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/slurmd-%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$1
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=4
SchedulerParameters=batch_sched_delay=0
CONF
}

start_munged() {  # munged on $DIR/munge (its key made once), unless it runs; waits for its socket
    mkdir -p "$DIR/munge"
    chmod 755 "$DIR" "$DIR/munge"
    [ -f "$DIR/munge/munge.key" ] || mungekey -c -k "$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    pid_alive "$DIR/munge/munged.pid" && return 0
    # munged daemonizes itself and writes its pid file
    munged --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" </dev/null >/dev/null 2>&1 \
        || die "munged did not start; see $DIR/munge/munged.log"
    for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket.2" ] && break; sleep 0.1; done
    [ -S "$DIR/munge/munge.socket.2" ] || die "munged did not start; see $DIR/munge/munged.log"
}
