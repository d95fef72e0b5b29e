#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for fleetgen's tests and for trying `launch` without a cluster:
# nodes node1..nodeN are emulated by one `slurmd -N nodeI` each, every node declares 8 CPUs and 2 fake GPUs,
# and slurmdbd + mariadb give accounting, so `sacct` (and therefore submitit's job states) work.
# PID 1 is not systemd here, so every daemon is started by hand; each start is skipped when already running.
#
#   slurm/local_cluster.sh up [NODES]   install (once), configure, start; wait until every node is usable
#   slurm/local_cluster.sh down         stop the daemons this script started, by pid
#   slurm/local_cluster.sh status       sinfo and squeue
#
# Run as root. `up` twice in a row is fast and harmless.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
CPUS_PER_NODE=8
GPUS_PER_NODE=2
FIRST_SLURMD_PORT=17001
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
STATE_DIR=/var/lib/fleetgen-slurm   # pid files of the daemons this script started
FAKE_GPU_DIR=/var/lib/slurm/fake-gpu
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=fleetgen-local
HOSTS_MARK="# fleetgen local slurm cluster"
WAIT_S=60

log() { echo "local_cluster: $*" >&2; }

fail() {  # fail MESSAGE [LOG_FILE]
  log "error: $1"
  if [[ -n "${2:-}" && -f "$2" ]]; then
    log "last lines of $2:"
    tail -n 25 "$2" >&2
  fi
  exit 1
}

# --- installation -------------------------------------------------------------------------------------------

missing_packages() {
  local pkg
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

install_packages() {
  local missing
  missing=$(missing_packages)
  [[ -z "$missing" ]] && return
  log "installing: $(tr '\n' ' ' <<<"$missing")"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh image has no package lists; an old one may list versions the mirror no longer has.
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null || fail "apt-get install $missing failed"
}

# --- configuration ------------------------------------------------------------------------------------------

update_file() {  # update_file PATH MODE OWNER TEXT: write TEXT to PATH unless it is there already; 1 if unchanged
  local tmp
  tmp=$(mktemp)
  printf '%s\n' "$4" >"$tmp"
  if [[ -f "$1" ]] && cmp -s "$tmp" "$1"; then
    rm -f "$tmp"
    return 1
  fi
  install -m "$2" -o "$3" -g "$3" "$tmp" "$1"
  rm -f "$tmp"
}

node_range() { echo "node[1-$1]"; }

slurm_conf() {  # slurm_conf NODES
  local nodes=$1 host mem_mb ports node_line
  host=$(hostname -s)
  ports="$FIRST_SLURMD_PORT-$((FIRST_SLURMD_PORT + nodes - 1))"  # one slurmd port per emulated node
  # Memory is not a consumable resource (CR_Core), but --mem requests are checked against it: split the
  # machine's memory between the nodes, leaving a tenth for everything else.
  mem_mb=$(awk -v n="$nodes" '/^MemTotal:/ {print int($2 / 1024 * 0.9 / n)}' /proc/meminfo)
  node_line="NodeName=$(node_range "$nodes") NodeHostname=$host NodeAddr=127.0.0.1 Port=[$ports]"
  node_line+=" CPUs=$CPUS_PER_NODE RealMemory=$mem_mb Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"
  cat <<EOF
# Written by fleetgen's slurm/local_cluster.sh: $nodes emulated nodes on this machine.
ClusterName=fleetgen
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
# No cgroups in this machine's init: track processes by parent pid and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the declared CPUs (more than the machine has), so several ranks fit on each emulated node.
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
GresTypes=gpu
$node_line
PartitionName=debug Nodes=$(node_range "$nodes") Default=YES MaxTime=INFINITE State=UP
EOF
}

gres_conf() {  # gres_conf NODES
  echo "# Fake GPUs (symlinks to /dev/null): jobs asking for --gpus-per-node get CUDA_VISIBLE_DEVICES."
  echo "NodeName=$(node_range "$1") Name=gpu File=$FAKE_GPU_DIR/nvidia[0-$((GPUS_PER_NODE - 1))]"
}

slurmdbd_conf() {
  cat <<EOF
# Written by fleetgen's slurm/local_cluster.sh.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
SlurmUser=slurm
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
}

mariadb_conf() {
  cat <<EOF
# Written by fleetgen's slurm/local_cluster.sh: the settings slurmdbd asks for.
[mysqld]
bind-address=127.0.0.1
innodb_buffer_pool_size=512M
innodb_lock_wait_timeout=900
EOF
}

write_hosts() {  # node names resolve to this machine; /etc/hosts may be a bind mount, so rewrite in place
  local nodes=$1 line i
  line="127.0.0.1"
  for ((i = 1; i <= nodes; i++)); do line+=" node$i"; done
  line+=" $HOSTS_MARK"
  grep -qxF "$line" /etc/hosts && return
  { grep -vF "$HOSTS_MARK" /etc/hosts; echo "$line"; } >/tmp/fleetgen-hosts.$$
  cat /tmp/fleetgen-hosts.$$ >/etc/hosts
  rm -f /tmp/fleetgen-hosts.$$
}

configure() {  # configure NODES; prints a line (mariadb, slurmdbd, slurm) per daemon whose config changed
  local nodes=$1 i
  install -d -o slurm -g slurm "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld
  install -d "$STATE_DIR" "$FAKE_GPU_DIR" /var/spool/slurmd
  for ((i = 0; i < GPUS_PER_NODE; i++)); do ln -sfn /dev/null "$FAKE_GPU_DIR/nvidia$i"; done
  write_hosts "$nodes"
  # Generated first, so that a generator's failure stops the script before any file is touched.
  local mariadb slurmdbd slurm gres
  mariadb=$(mariadb_conf)
  slurmdbd=$(slurmdbd_conf)
  slurm=$(slurm_conf "$nodes")
  gres=$(gres_conf "$nodes")
  if update_file /etc/mysql/mariadb.conf.d/99-fleetgen.cnf 644 root "$mariadb"; then echo mariadb; fi
  if update_file "$CONF_DIR/slurmdbd.conf" 600 slurm "$slurmdbd"; then echo slurmdbd; fi
  # Both files must be written: no short-circuit between them.
  local changed=""
  if update_file "$CONF_DIR/slurm.conf" 644 root "$slurm"; then changed=yes; fi
  if update_file "$CONF_DIR/gres.conf" 644 root "$gres"; then changed=yes; fi
  if [[ -n "$changed" ]]; then echo slurm; fi
}

# --- daemons ------------------------------------------------------------------------------------------------

runs() {  # runs PID EXE_NAME: PID is alive and runs EXE_NAME (Debian's slurm binaries end in -wlm)
  [[ "$(readlink "/proc/$1/exe" 2>/dev/null)" == */"$2"* ]]
}

pid_alive() {  # pid_alive PIDFILE EXE_NAME: the pid in PIDFILE runs EXE_NAME
  local pid
  [[ -f "$1" ]] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && runs "$pid" "$2"
}

wait_for_pidfile() {  # wait_for_pidfile PIDFILE EXE_NAME LOG: then remember the pid as started by us
  local deadline=$((SECONDS + 20))
  until pid_alive "$1" "$2"; do
    ((SECONDS < deadline)) || fail "$2 did not start (no live pid in $1)" "$3"
    sleep 0.2
  done
  cp "$1" "$STATE_DIR/$(basename "$1")"
}

start_munge() {
  pid_alive /run/munge/munged.pid munged && return
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start" /var/log/munge/munged.log
  wait_for_pidfile /run/munge/munged.pid munged /var/log/munge/munged.log
}

start_mariadb() {
  if ! pid_alive /run/mysqld/mysqld.pid mariadbd; then
    install -d -o mysql -g mysql /run/mysqld
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
      </dev/null >>/var/log/mysql-fleetgen.log 2>&1 &
    wait_for_pidfile /run/mysqld/mysqld.pid mariadbd /var/log/mysql-fleetgen.log
  fi
  local deadline=$((SECONDS + 30))
  until mariadb-admin ping --silent >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "mariadb does not answer" /var/log/mysql-fleetgen.log
    sleep 0.3
  done
  mariadb -u root <<EOF || fail "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

start_slurmdbd() {
  if ! pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    /usr/sbin/slurmdbd || fail "slurmdbd did not start" "$LOG_DIR/slurmdbd.log"
    wait_for_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd "$LOG_DIR/slurmdbd.log"
  fi
  local deadline=$((SECONDS + 30))
  until sacctmgr -n list cluster >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "slurmdbd does not answer" "$LOG_DIR/slurmdbd.log"
    sleep 0.3
  done
}

start_slurmctld() {
  pid_alive "$RUN_DIR/slurmctld.pid" slurmctld && return
  /usr/sbin/slurmctld || fail "slurmctld did not start" "$LOG_DIR/slurmctld.log"
  wait_for_pidfile "$RUN_DIR/slurmctld.pid" slurmctld "$LOG_DIR/slurmctld.log"
}

start_slurmd() {  # start_slurmd NODE
  pid_alive "$RUN_DIR/slurmd-$1.pid" slurmd && return
  install -d "/var/spool/slurmd/$1"
  /usr/sbin/slurmd -N "$1" || fail "slurmd -N $1 did not start" "$LOG_DIR/slurmd-$1.log"
  wait_for_pidfile "$RUN_DIR/slurmd-$1.pid" slurmd "$LOG_DIR/slurmd-$1.log"
}

stop_pidfile() {  # stop_pidfile PIDFILE EXE_NAME: SIGTERM, wait until gone (SIGKILL after 30 s)
  local pid deadline=$((SECONDS + 30))
  if pid_alive "$1" "$2"; then
    pid=$(cat "$1")
    kill "$pid"
    while runs "$pid" "$2"; do
      if ((SECONDS >= deadline)); then
        log "$2 (pid $pid) ignored SIGTERM for 30 s; killing it"
        kill -9 "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 10))
      fi
      sleep 0.2
    done
  fi
  rm -f "$1"
}

slurmd_pidfiles() { compgen -G "$STATE_DIR/slurmd-*.pid" || true; }

stop_slurmds() {  # stop_slurmds [KEEP_NODES]: every slurmd we started for a node beyond KEEP_NODES
  local keep=${1:-0} pidfile node
  for pidfile in $(slurmd_pidfiles); do
    node=$(basename "$pidfile" .pid)
    node=${node#slurmd-}
    ((${node#node} > keep)) && stop_pidfile "$pidfile" slurmd
  done
  return 0
}

# --- node states --------------------------------------------------------------------------------------------

node_states() { sinfo -h -N -p debug -o "%N %t" 2>/dev/null | sort -u; }

# Usable: idle, or running someone's job. Anything else (down, drain, inval, unknown) is repaired below.
unusable_nodes() { node_states | awk '$2 !~ /^(idle|mix|alloc|comp)$/ {print $1, $2}'; }

repair_node() {  # repair_node NODE STATE
  if [[ "$2" == inval* ]]; then
    # A node drained under an older config cannot go from INVAL to RESUME: its slurmd must re-register first.
    stop_pidfile "$STATE_DIR/slurmd-$1.pid" slurmd
    start_slurmd "$1"
  fi
  if [[ "$2" =~ ^(down|drain|drng|fail|inval) ]]; then
    scontrol update NodeName="$1" State=RESUME 2>/dev/null || true
  fi
}

wait_until_usable() {  # wait_until_usable NODES
  local nodes=$1 deadline=$((SECONDS + WAIT_S)) repaired="" bad count
  while true; do
    count=$(node_states | wc -l)
    bad=$(unusable_nodes)
    [[ "$count" -eq "$nodes" && -z "$bad" ]] && return
    ((SECONDS < deadline)) ||
      fail "nodes not usable after ${WAIT_S} s: $(tr '\n' ' ' <<<"${bad:-only $count of $nodes nodes known}")" \
        "$LOG_DIR/slurmctld.log"
    # Give a fresh slurmd a few seconds to register before treating its node as broken.
    if [[ -n "$bad" && -z "$repaired" && $((deadline - SECONDS)) -lt $((WAIT_S - 5)) ]]; then
      while read -r node state; do
        log "resuming $node (was $state)"
        repair_node "$node" "$state"
      done <<<"$bad"
      repaired=yes
    fi
    sleep 0.5
  done
}

# --- commands -----------------------------------------------------------------------------------------------

cmd_up() {
  local nodes=${1:-2} changed i
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fail "NODES must be a positive integer, got '$nodes'"
  [[ $EUID -eq 0 ]] || fail "run as root (it installs packages and starts daemons)"
  install_packages
  changed=$(configure "$nodes")
  if grep -qx mariadb <<<"$changed"; then stop_pidfile "$STATE_DIR/mysqld.pid" mariadbd; fi
  if grep -qx slurmdbd <<<"$changed"; then stop_pidfile "$STATE_DIR/slurmdbd.pid" slurmdbd; fi
  if grep -qx slurm <<<"$changed"; then  # node list or resources changed: slurmctld and slurmds reread it
    stop_slurmds 0
    stop_pidfile "$STATE_DIR/slurmctld.pid" slurmctld
  fi
  stop_slurmds "$nodes"
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  for ((i = 1; i <= nodes; i++)); do start_slurmd "node$i"; done
  wait_until_usable "$nodes"
  echo "local slurm cluster up: $nodes nodes $(node_range "$nodes") × $CPUS_PER_NODE CPUs" \
    "× $GPUS_PER_NODE fake GPUs, partition debug; $(node_states | awk '{print $1 "=" $2}' | paste -sd ' ')"
}

cmd_down() {
  local pidfile
  for pidfile in $(slurmd_pidfiles); do stop_pidfile "$pidfile" slurmd; done
  stop_pidfile "$STATE_DIR/slurmctld.pid" slurmctld
  stop_pidfile "$STATE_DIR/slurmdbd.pid" slurmdbd
  stop_pidfile "$STATE_DIR/mysqld.pid" mariadbd
  stop_pidfile "$STATE_DIR/munged.pid" munged
  echo "local slurm cluster down"
}

cmd_status() {
  sinfo || fail "sinfo failed: is the cluster up? (slurm/local_cluster.sh up)"
  squeue
}

case "${1:-}" in
  up) cmd_up "${2:-2}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [NODES] | down | status" >&2; exit 2 ;;
esac
