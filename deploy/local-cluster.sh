#!/usr/bin/env bash
# A two-node Ray cluster plus an MLflow tracking server on this machine, all on 127.0.0.1.
#
#   deploy/local-cluster.sh up     [--dir DIR] [--head-cpus N] [--worker-cpus N] [--object-store]
#   deploy/local-cluster.sh status [--dir DIR]
#   deploy/local-cluster.sh down   [--dir DIR]
#   deploy/local-cluster.sh kill-worker    [--dir DIR]
#   deploy/local-cluster.sh restart-worker [--dir DIR]
#
# `up` starts, each in its own process group (setsid):
#   * MLflow:       mlflow server on SQLite (DIR/mlflow.db), artifacts served from DIR/artifacts
#   * Ray head:     ray start --head --block, custom resource {"node1": 1}, dashboard + job server
#   * Ray worker:   ray start --block --address <head>, custom resource {"node2": 1}
#   * with --object-store, first: an S3-compatible server (moto's standalone server) on
#     127.0.0.1 with a bucket `noisyseg`; MLflow's artifacts then live in s3://noisyseg/mlflow,
#     and both Ray nodes (so every job) get the endpoint and credentials in their environment,
#     exactly as a KubeRay pod gets them from the noisyseg-object-store Secret.
# Every port is picked free at start-up (nothing collides with other Ray clusters on the
# machine). Each Ray node gets its own short, unique --temp-dir under /tmp/nsr-<id>/ (Unix
# socket paths must stay under ~107 characters, so DIR itself is not used). `down` stops exactly
# those process groups, then anything whose command line still names the unique temp dir.
# It never runs `ray stop` and never kills by process name.
#
# Fault drills (the node-loss test, tests/deploy/test_local_cluster_faults.py):
#   kill-worker     SIGKILL the worker node's process group and every process whose command line
#                   names that node's temp dir (raylet, agents, the trial/Train workers it ran):
#                   a lost machine, not a graceful stop. Returns once the head has marked the
#                   node DEAD (its health check; typically 10-30 s).
#   restart-worker  start the worker node again with the settings of `up` (CPUs, {"node2": 1},
#                   object store, the cluster.env environment), on fresh ports and a fresh temp
#                   dir under the same /tmp/nsr-<id>/; returns once the head counts it ALIVE.
#
# It writes DIR/cluster.env to `source`:
#   RAY_ADDRESS=http://127.0.0.1:<dashboard>   (for `ray job submit` / JobSubmissionClient)
#   RAY_GCS_ADDRESS=127.0.0.1:<gcs>            (for ray.init(address=...))
#   MLFLOW_TRACKING_URI=http://127.0.0.1:<port>
#   RAY_AUTH_MODE=disabled|token  (+ RAY_AUTH_TOKEN_PATH in token mode)
#   with --object-store: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
#   AWS_DEFAULT_REGION, NOISYSEG_BUCKET=s3://noisyseg
#
# Environment knobs:
#   RAY_AUTH_MODE        "disabled" (default here: loopback only) or "token". In token mode a
#                        fresh random token is written to DIR/auth_token (mode 600) unless
#                        RAY_AUTH_TOKEN_PATH already names one; ~/.ray/auth_token is never touched.
#   NOISYSEG_PYTHON      python whose bin/ holds ray, mlflow, noisyseg (default: the repo's .venv,
#                        else python3 on PATH)
#   OBJECT_STORE_BYTES   object store per node (default 200000000)
#   STARTUP_TIMEOUT      seconds to wait for each service (default 90)
#   NODE_START_ATTEMPTS  tries of each Ray node start (default 3): Ray gives a starting node a
#                        fixed 30 s to register, which a loaded machine can miss
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

die() { echo "local-cluster: $*" >&2; exit 1; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

CMD=${1:-}
[[ -n "$CMD" ]] || { usage; exit 2; }
shift
DIR=${NOISYSEG_CLUSTER_DIR:-$REPO_DIR/.local-cluster}
HEAD_CPUS=1
WORKER_CPUS=1
OBJECT_STORE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --worker-cpus) WORKER_CPUS=$2; shift 2 ;;
    --object-store) OBJECT_STORE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
STATE="$DIR/state"
ENV_FILE="$DIR/cluster.env"

if [[ -n "${NOISYSEG_PYTHON:-}" ]]; then
  PYTHON=$NOISYSEG_PYTHON
elif [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
  PYTHON=$REPO_DIR/.venv/bin/python
else
  PYTHON=$(command -v python3) || die "no python3 found; set NOISYSEG_PYTHON"
fi
BIN_DIR=$(dirname "$PYTHON")
RAY="$BIN_DIR/ray"
MLFLOW="$BIN_DIR/mlflow"
MOTO="$BIN_DIR/moto_server"
BUCKET=noisyseg
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-90}
NODE_START_ATTEMPTS=${NODE_START_ATTEMPTS:-3}
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-200000000}

# ----------------------------------------------------------------------------------- helpers
# Free TCP ports in 20000-32767 (below Linux's ephemeral range, so the kernel will not hand
# them to outgoing connections meanwhile); the last two blocks are worker-port ranges.
pick_ports() {  # pick_ports N_SINGLE N_RANGES RANGE_LEN
  "$PYTHON" - "$@" <<'EOF'
import random, socket, sys
n_single, n_ranges, range_len = map(int, sys.argv[1:])
taken = set()
def free(port):
    if port in taken:
        return False
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True
out = []
while len(out) < n_single:
    p = random.randint(20000, 32767)
    if free(p):
        taken.add(p); out.append(str(p))
for _ in range(n_ranges):
    for _attempt in range(200):
        base = random.randint(20000, 32767 - range_len)
        block = range(base, base + range_len)
        if all(free(p) for p in block):
            taken.update(block); out.append(f"{base}:{base + range_len - 1}")
            break
    else:
        sys.exit("no free port range")
print(" ".join(out))
EOF
}

# http_get URL [TOKEN] -> body on stdout, rc 0 on HTTP 200
http_get() {
  "$PYTHON" - "$@" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2 and sys.argv[2]:
    req.add_header("Authorization", f"Bearer {sys.argv[2]}")
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        sys.stdout.write(r.read().decode())
except Exception:
    sys.exit(1)
EOF
}

alive_nodes() {  # number of ALIVE nodes the state API reports
  http_get "http://127.0.0.1:$DASH_PORT/api/v0/nodes?limit=100" "$(auth_token)" | "$PYTHON" -c '
import json, sys
data = json.load(sys.stdin)
rows = data.get("data", {}).get("result", {}).get("result", [])
print(sum(1 for r in rows if r.get("state") == "ALIVE"))' 2>/dev/null || echo 0
}

auth_token() {
  if [[ "${RAY_AUTH_MODE:-disabled}" == token && -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    cat "$RAY_AUTH_TOKEN_PATH"
  fi
}

# The process group of a child started as `setsid CMD &`: setsid makes the child the leader of a
# new group whose id is its pid, but only once it has run; reading the group at once can catch the
# child before that and return *this* shell's group (which `down` would then kill). So wait (up to
# 5 s) until the child leads its own group, and name that group by the child's pid either way.
pgid_of() {
  local i
  for i in $(seq 50); do
    [[ "$(ps -o pgid= -p "$1" 2>/dev/null | tr -d ' ')" == "$1" ]] && break
    sleep 0.1
  done
  echo "$1"
}

# pids_of TEMP_DIR PGID...: pids whose command line names TEMP_DIR (followed by "/" or the end of
# an argument: .../w does not match .../w2), plus every member of the given process groups
pids_of() {
  "$PYTHON" - "$@" <<'EOF'
import os, re, sys
temp = sys.argv[1].encode()
pattern = re.compile(re.escape(temp) + rb"(/|\x00|$)") if temp else None
pgids = {int(g) for g in sys.argv[2:] if g}
me = {os.getpid(), os.getppid()}
for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) in me:
        continue
    pid = int(entry)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        continue
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":  # zombie: already dead, waiting for its parent
        continue
    if int(fields[2]) in pgids or (pattern is not None and pattern.search(cmdline)):
        print(pid)
EOF
}

# pids whose command line names TEMP_ROOT, plus every member of the recorded process groups
our_pids() {
  pids_of "${TEMP_ROOT:-}" "${HEAD_PGID:-}" "${WORKER_PGID:-}" "${MLFLOW_PGID:-}" "${S3_PGID:-}"
}

# await_ready PID COMMAND...: 0 once COMMAND succeeds, 1 if PID exits first, 2 after
# STARTUP_TIMEOUT seconds
await_ready() {
  local pid=$1; shift
  local deadline=$((SECONDS + STARTUP_TIMEOUT))
  until "$@"; do
    kill -0 "$pid" 2>/dev/null || return 1
    (( SECONDS > deadline )) && return 2
    sleep 0.5
  done
}

# On a failed start wait_for calls $ON_START_FAILURE: stop_all (`up`: nothing half-started is left)
# or stop_worker_node (`restart-worker`: the rest of the cluster stays up).
wait_for() {  # wait_for DESCRIPTION PID LOG COMMAND...: await_ready, or clean up and die
  local what=$1 pid=$2 log=$3 rc=0; shift 3
  await_ready "$pid" "$@" || rc=$?
  (( rc == 0 )) && return 0
  tail -n 30 "$log" >&2 || true
  "${ON_START_FAILURE:-stop_all}"
  (( rc == 1 )) && die "$what exited during start-up (log: $log)"
  die "$what not ready after ${STARTUP_TIMEOUT}s (log: $log)"
}

load_state() {
  [[ -f "$STATE" ]] || return 1
  # shellcheck disable=SC1090
  source "$STATE"
}

wait_gone() {  # wait_gone SECONDS PID... : true once none of the pids is alive (zombies count as gone)
  local deadline=$((SECONDS + $1)) pid left; shift
  while true; do
    left=""
    for pid in "$@"; do
      if [[ -r /proc/$pid/stat ]] && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; then
        left="$left $pid"
      fi
    done
    [[ -z "$left" ]] && return 0
    (( SECONDS >= deadline )) && return 1
    sleep 0.3
  done
}

# Worker node first (its `ray start --block` tears down its raylet and agents on SIGTERM), then
# the head, then MLflow's whole group; anything left after the grace period gets SIGKILL, found
# by process group and by the unique temp dir in its command line.
stop_all() {
  local pgid pids
  for pgid in ${WORKER_PGID:-} ${HEAD_PGID:-}; do
    kill -TERM "$pgid" 2>/dev/null || true
    wait_gone 20 "$pgid" || true
  done
  if [[ -n "${MLFLOW_PGID:-}" ]]; then
    kill -TERM -- "-$MLFLOW_PGID" 2>/dev/null || true
    wait_gone 15 "$MLFLOW_PGID" || true
  fi
  if [[ -n "${S3_PGID:-}" ]]; then
    kill -TERM -- "-$S3_PGID" 2>/dev/null || true
    wait_gone 15 "$S3_PGID" || true
  fi
  # shellcheck disable=SC2046
  wait_gone 5 $(our_pids) || true
  pids=$(our_pids)
  if [[ -n "$pids" ]]; then
    echo "local-cluster: SIGKILL to leftover processes:" $pids >&2
    for pgid in ${WORKER_PGID:-} ${HEAD_PGID:-} ${MLFLOW_PGID:-} ${S3_PGID:-}; do
      kill -KILL -- "-$pgid" 2>/dev/null || true
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $pids || true
  fi
  if [[ -n "${TEMP_ROOT:-}" && "$TEMP_ROOT" == /tmp/nsr-* ]]; then
    rm -rf -- "$TEMP_ROOT"
  fi
  rm -f -- "$STATE" "$ENV_FILE"
  pids=$(our_pids)
  [[ -z "$pids" ]] || die "processes still running after down:" $pids
}

# The state file (sourced by every verb): what `down` needs to stop everything, and what
# `restart-worker` needs to start the worker node again as `up` did.
write_state() {
  cat > "$STATE" <<EOF
TEMP_ROOT=$TEMP_ROOT
GCS_PORT=$GCS_PORT
DASH_PORT=$DASH_PORT
MLFLOW_PORT=$MLFLOW_PORT
RAY_AUTH_MODE=$RAY_AUTH_MODE
RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-}
MLFLOW_PGID=${MLFLOW_PGID:-}
HEAD_PGID=${HEAD_PGID:-}
WORKER_PGID=${WORKER_PGID:-}
WORKER_TEMP=${WORKER_TEMP:-}
WORKER_STARTS=${WORKER_STARTS:-0}
S3_PGID=${S3_PGID:-}
S3_PORT=${S3_PORT:-}
OBJECT_STORE=$OBJECT_STORE
HEAD_CPUS=$HEAD_CPUS
WORKER_CPUS=$WORKER_CPUS
OBJECT_STORE_BYTES=$OBJECT_STORE_BYTES
EOF
}

# kill_node PGID TEMP_DIR: SIGKILL a Ray node's process group and every process whose command line
# names its temp dir (what its raylet started elsewhere); true once none of them is left (10 s).
kill_node() {
  local pgid=$1 temp=$2 pids
  [[ -z "$pgid" ]] || kill -KILL -- "-$pgid" 2>/dev/null || true
  pids=$(pids_of "$temp" "$pgid")
  [[ -z "$pids" ]] && return 0
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  # shellcheck disable=SC2086
  wait_gone 10 $pids
}

# The worker node only (a restart that failed): SIGTERM to its group, then SIGKILL to what is left
# of it (by group and by its temp dir).
stop_worker_node() {
  if [[ -n "${WORKER_PGID:-}" ]]; then
    kill -TERM -- "-$WORKER_PGID" 2>/dev/null || true
    wait_gone 20 "$WORKER_PGID" || true
  fi
  kill_node "${WORKER_PGID:-}" "${WORKER_TEMP:-}" || true
  WORKER_PGID=""
  write_state
}

# The S3-compatible server, its credentials in the environment (inherited by MLflow and both
# Ray nodes), and the bucket. Credentials are random per cluster, like a KubeRay Secret's.
start_object_store() {
  [[ -x "$MOTO" ]] || die "moto_server not found at $MOTO (pip install 'moto[server]')"
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  AWS_ACCESS_KEY_ID="nsr$("$PYTHON" -c 'import secrets; print(secrets.token_hex(6))')"
  AWS_SECRET_ACCESS_KEY="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(16))')"
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION=us-east-1
  # MLflow's S3 artifact client reads this one.
  export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"
  setsid "$MOTO" -H 127.0.0.1 -p "$S3_PORT" > "$DIR/logs/s3.log" 2>&1 < /dev/null &
  local s3_pid=$!
  S3_PGID=$(pgid_of "$s3_pid"); write_state
  wait_for "object store" "$s3_pid" "$DIR/logs/s3.log" \
    eval 'http_get "$AWS_ENDPOINT_URL" > /dev/null'
  "$PYTHON" -c "import boto3; boto3.client('s3').create_bucket(Bucket='$BUCKET')" \
    || die "could not create bucket $BUCKET at $AWS_ENDPOINT_URL"
}

# The environment and flags both Ray nodes start with.
node_env() {
  export RAY_USAGE_STATS_ENABLED=0
  # A local node has nothing to drain: SIGTERM tears it down at once instead of waiting 30 s.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  # Jobs run `noisyseg ...` from the same environment as ray itself.
  export PATH="$BIN_DIR:$PATH"
  RAY_COMMON=(--block --node-ip-address 127.0.0.1 --disable-usage-stats
              --object-store-memory "$OBJECT_STORE_BYTES" --num-gpus 0)
}

# Ray gives a starting node 30 s to register with the GCS (hard-coded in ray/_private/node.py);
# on a loaded machine a node can miss that and its `ray start` exits. retry_node_start cleans such
# a start up (its process group and whatever names its temp dir) and tries again, with a fresh
# temp dir, NODE_START_ATTEMPTS times in all; a node that is still starting after
# STARTUP_TIMEOUT is not retried.
#   retry_node_start WHAT PGID_VAR TEMP_VAR LAUNCH READY...
# LAUNCH ATTEMPT starts the node in the background (setsid) and sets NODE_PID, NODE_TEMP, NODE_LOG.
retry_node_start() {
  local what=$1 pgid_var=$2 temp_var=$3 launch=$4 attempt rc; shift 4
  for (( attempt = 1; attempt <= NODE_START_ATTEMPTS; attempt++ )); do
    "$launch" "$attempt"
    printf -v "$pgid_var" '%s' "$(pgid_of "$NODE_PID")"
    printf -v "$temp_var" '%s' "$NODE_TEMP"
    write_state
    rc=0
    await_ready "$NODE_PID" "$@" || rc=$?
    (( rc == 0 )) && return 0
    if (( rc == 1 && attempt < NODE_START_ATTEMPTS )); then
      echo "local-cluster: $what exited during start-up (attempt $attempt of" \
        "$NODE_START_ATTEMPTS; log: $NODE_LOG): $(tail -n 1 "$NODE_LOG")" >&2
      kill_node "${!pgid_var}" "$NODE_TEMP" || true
      continue
    fi
    tail -n 30 "$NODE_LOG" >&2 || true
    "${ON_START_FAILURE:-stop_all}"
    (( rc == 1 )) && die "$what exited during start-up $attempt times (log: $NODE_LOG)"
    die "$what not ready after ${STARTUP_TIMEOUT}s (log: $NODE_LOG)"
  done
}

# launch_head ATTEMPT: the head node (`ray start --head --block`, {"node1": 1}, dashboard and job
# server on 127.0.0.1) in its own process group, temp dir $TEMP_ROOT/h (h2, h3 on retries).
launch_head() {
  local hw_min hw_max
  IFS=: read -r hw_min hw_max <<< "$H_WORKERS"
  NODE_TEMP="$TEMP_ROOT/h"
  (( $1 > 1 )) && NODE_TEMP="$TEMP_ROOT/h$1"
  NODE_LOG="$DIR/logs/ray-head.log"
  mkdir -p "$NODE_TEMP"
  setsid "$RAY" start --head "${RAY_COMMON[@]}" --port "$GCS_PORT" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --ray-client-server-port "$CLIENT_PORT" \
    --node-manager-port "$H_NM" --object-manager-port "$H_OM" \
    --dashboard-agent-listen-port "$H_AGENT" --dashboard-agent-grpc-port "$H_AGENT_GRPC" \
    --runtime-env-agent-port "$H_RTENV" --metrics-export-port "$H_METRICS" \
    --min-worker-port "$hw_min" --max-worker-port "$hw_max" \
    --temp-dir "$NODE_TEMP" --num-cpus "$HEAD_CPUS" --resources '{"node1": 1}' \
    >> "$NODE_LOG" 2>&1 < /dev/null &
  NODE_PID=$!
}

# launch_worker ATTEMPT: the worker node (`ray start --block --address <head>`, {"node2": 1})
# in its own process group, temp dir $TEMP_ROOT/w (w2, w3, ... on restarts and retries), on the
# ports in WORKER_PORTS ("NM OM AGENT AGENT_GRPC RTENV METRICS MIN:MAX").
launch_worker() {
  local nm om agent agent_grpc rtenv metrics range ww_min ww_max
  read -r nm om agent agent_grpc rtenv metrics range <<< "$WORKER_PORTS"
  IFS=: read -r ww_min ww_max <<< "$range"
  WORKER_STARTS=$(( ${WORKER_STARTS:-0} + 1 ))
  NODE_TEMP="$TEMP_ROOT/w"
  NODE_LOG="$DIR/logs/ray-worker.log"
  if (( WORKER_STARTS > 1 )); then
    NODE_TEMP="$TEMP_ROOT/w$WORKER_STARTS"
    NODE_LOG="$DIR/logs/ray-worker-$WORKER_STARTS.log"
  fi
  mkdir -p "$NODE_TEMP"
  setsid "$RAY" start "${RAY_COMMON[@]}" --address "127.0.0.1:$GCS_PORT" \
    --node-manager-port "$nm" --object-manager-port "$om" \
    --dashboard-agent-listen-port "$agent" --dashboard-agent-grpc-port "$agent_grpc" \
    --runtime-env-agent-port "$rtenv" --metrics-export-port "$metrics" \
    --min-worker-port "$ww_min" --max-worker-port "$ww_max" \
    --temp-dir "$NODE_TEMP" --num-cpus "$WORKER_CPUS" --resources '{"node2": 1}' \
    > "$NODE_LOG" 2>&1 < /dev/null &
  NODE_PID=$!
}

# start_worker_node "NM OM AGENT AGENT_GRPC RTENV METRICS MIN:MAX": the worker node; returns once
# the head counts 2 ALIVE nodes. Expects the environment of `up` (PATH, AWS_*,
# MLFLOW_TRACKING_URI, RAY_* knobs).
start_worker_node() {
  WORKER_PORTS=$1
  retry_node_start "ray worker node" WORKER_PGID WORKER_TEMP launch_worker \
    eval '[[ "$(alive_nodes)" -ge 2 ]]'
}

# ----------------------------------------------------------------------------------- verbs
cmd_up() {
  if load_state; then
    if [[ -n "$(our_pids)" ]]; then
      die "already up in $DIR (run: $0 down --dir $DIR)"
    fi
    stop_all
  fi
  [[ -x "$RAY" ]] || die "ray not found at $RAY (set NOISYSEG_PYTHON)"
  [[ -x "$MLFLOW" ]] || die "mlflow not found at $MLFLOW (set NOISYSEG_PYTHON)"
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
  case "$RAY_AUTH_MODE" in
    disabled) unset RAY_AUTH_TOKEN_PATH RAY_AUTH_TOKEN ;;
    token)
      if [[ -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
        (umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' \
          > "$RAY_AUTH_TOKEN_PATH")
      fi
      unset RAY_AUTH_TOKEN ;;
    *) die "RAY_AUTH_MODE must be 'disabled' or 'token', got '$RAY_AUTH_MODE'" ;;
  esac

  local ports
  ports=$(pick_ports 17 2 40) || die "could not find free ports"
  read -r GCS_PORT DASH_PORT CLIENT_PORT MLFLOW_PORT S3_PORT \
    H_NM H_OM H_AGENT H_AGENT_GRPC H_RTENV H_METRICS \
    W_NM W_OM W_AGENT W_AGENT_GRPC W_RTENV W_METRICS H_WORKERS W_WORKERS <<< "$ports"
  TEMP_ROOT="/tmp/nsr-$("$PYTHON" -c 'import secrets; print(secrets.token_hex(4))')"
  mkdir -p "$DIR/logs" "$DIR/artifacts"
  WORKER_STARTS=0

  # Written before anything starts so that `down` can always clean up a half start.
  write_state

  local artifacts="$DIR/artifacts"
  if (( OBJECT_STORE )); then
    start_object_store
    artifacts="s3://$BUCKET/mlflow"
  fi

  # MLflow first, so the Ray nodes (and every job they run) inherit MLFLOW_TRACKING_URI.
  export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$MLFLOW" server \
    --backend-store-uri "sqlite:///$DIR/mlflow.db" \
    --artifacts-destination "$artifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    > "$DIR/logs/mlflow.log" 2>&1 < /dev/null &
  local mlflow_pid=$!
  MLFLOW_PGID=$(pgid_of "$mlflow_pid"); write_state

  # MLflow ready before the head starts: both at once can starve the head past Ray's 30 s.
  wait_for "mlflow server" "$mlflow_pid" "$DIR/logs/mlflow.log" \
    eval 'http_get "$MLFLOW_TRACKING_URI/health" > /dev/null'
  node_env
  retry_node_start "ray head" HEAD_PGID HEAD_TEMP launch_head eval '[[ "$(alive_nodes)" -ge 1 ]]'

  start_worker_node "$W_NM $W_OM $W_AGENT $W_AGENT_GRPC $W_RTENV $W_METRICS $W_WORKERS"

  {
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT"
    echo "export RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ "$RAY_AUTH_MODE" == token ]]; then
      echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    fi
    if (( OBJECT_STORE )); then
      echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL"
      echo "export MLFLOW_S3_ENDPOINT_URL=$AWS_ENDPOINT_URL"
      echo "export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID"
      echo "export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY"
      echo "export AWS_DEFAULT_REGION=$AWS_DEFAULT_REGION"
      echo "export NOISYSEG_BUCKET=s3://$BUCKET"
    fi
  } > "$ENV_FILE"
  chmod 600 "$ENV_FILE"
  local extra=""
  (( OBJECT_STORE )) && extra=", S3 at $AWS_ENDPOINT_URL (bucket s3://$BUCKET)"
  echo "local cluster up: 2 Ray nodes (head $HEAD_CPUS CPU, worker $WORKER_CPUS CPU), MLflow$extra"
  echo "  source $ENV_FILE"
  cat "$ENV_FILE" | sed 's/^/  /'
}

cmd_status() {
  load_state || { echo "down (no state in $DIR)"; return 3; }
  export RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH
  local nodes mlflow=down
  nodes=$(alive_nodes)
  http_get "http://127.0.0.1:$MLFLOW_PORT/health" > /dev/null && mlflow=up
  echo "ray nodes alive: $nodes  dashboard: http://127.0.0.1:$DASH_PORT"
  echo "mlflow: $mlflow  http://127.0.0.1:$MLFLOW_PORT"
  if [[ "${OBJECT_STORE:-0}" == 1 ]]; then
    local s3=down
    http_get "http://127.0.0.1:$S3_PORT" > /dev/null && s3=up
    echo "object store: $s3  http://127.0.0.1:$S3_PORT"
  fi
  echo "processes: $(our_pids | wc -l)  temp dir: $TEMP_ROOT"
  [[ "$nodes" -ge 2 && "$mlflow" == up ]]
}

cmd_kill_worker() {
  load_state || die "nothing recorded in $DIR (run: $0 up --dir $DIR)"
  [[ -n "${WORKER_PGID:-}" && -n "${WORKER_TEMP:-}" ]] \
    || die "no worker node is running in $DIR (run: $0 restart-worker --dir $DIR)"
  export RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH
  local before
  before=$(alive_nodes)
  # The whole group at once, then whatever it started elsewhere (the raylet's workers): nothing
  # of the node gets to say goodbye to the head.
  kill_node "$WORKER_PGID" "$WORKER_TEMP" \
    || die "worker node processes survived SIGKILL:" $(pids_of "$WORKER_TEMP" "$WORKER_PGID")
  echo "local-cluster: worker node killed (process group $WORKER_PGID, temp dir $WORKER_TEMP)"
  WORKER_PGID=""
  write_state
  local deadline=$((SECONDS + STARTUP_TIMEOUT))
  until (( $(alive_nodes) < before )); do
    (( SECONDS > deadline )) && die "the head still counts $before ALIVE nodes after ${STARTUP_TIMEOUT}s"
    sleep 0.5
  done
  echo "local-cluster: the head marked the worker node DEAD ($(alive_nodes) node(s) alive)"
}

cmd_restart_worker() {
  load_state || die "nothing recorded in $DIR (run: $0 up --dir $DIR)"
  [[ -n "${HEAD_PGID:-}" ]] || die "no head recorded in $DIR (run: $0 up --dir $DIR)"
  if [[ -n "${WORKER_PGID:-}" && -n "$(pids_of "" "$WORKER_PGID")" ]]; then
    die "the worker node is still running (process group $WORKER_PGID; run: $0 kill-worker)"
  fi
  # The environment `up` gave the nodes: cluster.env (MLflow, auth, object store), without the
  # client-side addresses, which `up` never put in a node's environment.
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  unset RAY_ADDRESS RAY_GCS_ADDRESS
  [[ "$RAY_AUTH_MODE" == token ]] || unset RAY_AUTH_TOKEN_PATH RAY_AUTH_TOKEN
  node_env
  ON_START_FAILURE=stop_worker_node
  local ports
  ports=$(pick_ports 6 1 40) || die "could not find free ports"
  start_worker_node "$ports"
  echo "local-cluster: worker node restarted ({\"node2\": 1}, $WORKER_CPUS CPU, temp dir $WORKER_TEMP)"
}

cmd_down() {
  if ! load_state; then
    echo "local cluster: nothing recorded in $DIR"
    return 0
  fi
  stop_all
  echo "local cluster down ($DIR)"
}

case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kill-worker) cmd_kill_worker ;;
  restart-worker) cmd_restart_worker ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
