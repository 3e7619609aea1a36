#!/usr/bin/env bash
# Launch fpa_megatron training with torchrun on one node or on each node of several.
#
#   launch/torchrun.sh [options] CONFIG [key.sub=value ...]
#
# Options (each also read from the environment variable in brackets; defaults are for one node):
#   --nnodes N|MIN:MAX   number of nodes; a range makes the job elastic:   [NNODES, 1]
#                        the group starts with every node that joins (MIN at least) and, when a
#                        node is lost, restarts (--max-restarts) with the rest while MIN are left;
#                        the newest checkpoint's ZeRO partitions are rewritten for the new
#                        data-parallel size (parallel.elastic=true is passed) and the global batch
#                        is kept by more micro-batches per rank
#   --node-rank R        rank of this node, 0..N-1                        [NODE_RANK, 0]
#   --master-addr HOST   address of node 0                                [MASTER_ADDR, 127.0.0.1]
#   --master-port PORT   free TCP port on node 0                          [MASTER_PORT, 29500]
#   --nproc-per-node P   processes on this node                           [NPROC_PER_NODE, #GPUs or 2]
#   --rdzv-id ID         use c10d rendezvous at MASTER_ADDR:MASTER_PORT   [RDZV_ID, unset: static]
#                        with this job id (node ranks are then assigned by torchrun; SLURM uses this)
#   --max-restarts N     restart the worker group up to N times after a   [MAX_RESTARTS, 0]
#                        worker fails (a lost rank); the restarted group resumes from the newest
#                        complete checkpoint by itself (checkpoint.resume: auto). Uses the c10d
#                        rendezvous (id fpa-MASTER_PORT unless --rdzv-id is given)
#   --external-store     the c10d rendezvous store runs outside the agents [EXTERNAL_STORE, 0]
#                        at MASTER_ADDR:MASTER_PORT, started there first with
#                        `python -m fpa_megatron.parallel.rendezvous_store --port PORT` on a
#                        host that outlives the nodes (slurm.sbatch: the batch host). Without it,
#                        node 0's agent hosts the store and losing node 0 ends the job; with it,
#                        any lost node can rejoin and the group restarts (--max-restarts)
#   --join-timeout S     seconds a restarting group waits for a lost node [JOIN_TIMEOUT, the
#                        to come back before the job fails                 config's parallel.timeout_minutes]
#   --last-call S        with --nnodes MIN:MAX: seconds the rendezvous    [LAST_CALL, 30]
#                        waits for more nodes once MIN have joined
#   --shutdown-timeout S seconds the workers get to finish the step and   [SHUTDOWN_TIMEOUT, 300]
#                        save a checkpoint after torchrun forwards SIGTERM/SIGUSR1, before SIGKILL
#   --config CONFIG      the YAML config (or give it as the first positional argument)
#   --dry-run            print the torchrun command instead of running it
# Everything after the config (or after --) is passed to the CLI as overrides.
set -euo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-}"
RDZV_ID="${RDZV_ID:-}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-300}"
EXTERNAL_STORE="${EXTERNAL_STORE:-0}"
JOIN_TIMEOUT="${JOIN_TIMEOUT:-}"
LAST_CALL="${LAST_CALL:-30}"
CONFIG=""
DRY_RUN=0
OVERRIDES=()

need_value() {
    if [[ $# -lt 2 || -z "$2" ]]; then
        echo "torchrun.sh: $1 needs a value" >&2
        exit 2
    fi
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) need_value "$@"; NNODES="$2"; shift 2 ;;
        --node-rank|--node_rank) need_value "$@"; NODE_RANK="$2"; shift 2 ;;
        --master-addr|--master_addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
        --master-port|--master_port) need_value "$@"; MASTER_PORT="$2"; shift 2 ;;
        --nproc-per-node|--nproc_per_node) need_value "$@"; NPROC_PER_NODE="$2"; shift 2 ;;
        --rdzv-id|--rdzv_id) need_value "$@"; RDZV_ID="$2"; shift 2 ;;
        --max-restarts|--max_restarts) need_value "$@"; MAX_RESTARTS="$2"; shift 2 ;;
        --shutdown-timeout|--shutdown_timeout) need_value "$@"; SHUTDOWN_TIMEOUT="$2"; shift 2 ;;
        --external-store) EXTERNAL_STORE=1; shift ;;
        --join-timeout|--join_timeout) need_value "$@"; JOIN_TIMEOUT="$2"; shift 2 ;;
        --last-call|--last_call) need_value "$@"; LAST_CALL="$2"; shift 2 ;;
        --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; OVERRIDES+=("$@"); break ;;
        -*) echo "torchrun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [[ -z "$CONFIG" ]]; then CONFIG="$1"; else OVERRIDES+=("$1"); fi
            shift ;;
    esac
done

if [[ -z "$CONFIG" ]]; then
    echo "torchrun.sh: no config given (see --help)" >&2
    exit 2
fi
if [[ -z "$NPROC_PER_NODE" ]]; then
    NPROC_PER_NODE="$(gpu_count)"
    if [[ "$NPROC_PER_NODE" -lt 1 ]]; then NPROC_PER_NODE=2; fi
fi
ELASTIC=0
if [[ "$NNODES" =~ ^([0-9]+):([0-9]+)$ ]]; then
    if (( BASH_REMATCH[1] < 1 || BASH_REMATCH[1] > BASH_REMATCH[2] )); then
        echo "torchrun.sh: --nnodes $NNODES must be MIN:MAX with 1 <= MIN <= MAX" >&2
        exit 2
    fi
    ELASTIC=1
    MIN_NODES="${BASH_REMATCH[1]}"
fi
for pair in "nnodes:${MIN_NODES:-$NNODES}" "node-rank:$NODE_RANK" "master-port:$MASTER_PORT" "nproc-per-node:$NPROC_PER_NODE" \
        "max-restarts:$MAX_RESTARTS" "shutdown-timeout:$SHUTDOWN_TIMEOUT" "last-call:$LAST_CALL"; do
    if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]]; then
        echo "torchrun.sh: --${pair%%:*} must be a non-negative integer, got '${pair#*:}'" >&2
        exit 2
    fi
done
if [[ -n "$JOIN_TIMEOUT" && ! "$JOIN_TIMEOUT" =~ ^[0-9]+$ ]]; then
    echo "torchrun.sh: --join-timeout must be a non-negative integer, got '$JOIN_TIMEOUT'" >&2
    exit 2
fi
if [[ -z "$RDZV_ID" && ( "$MAX_RESTARTS" -gt 0 || "$EXTERNAL_STORE" == 1 || "$ELASTIC" == 1 ) ]]; then
    RDZV_ID="fpa-$MASTER_PORT"  # restarts need the c10d rendezvous: the static one keeps a stale store
fi
if [[ -z "$RDZV_ID" && "$NODE_RANK" -ge "$NNODES" ]]; then
    echo "torchrun.sh: --node-rank $NODE_RANK must be smaller than --nnodes $NNODES" >&2
    exit 2
fi

if command -v torchrun >/dev/null 2>&1; then
    LAUNCHER=(torchrun)
else
    LAUNCHER=("${PYTHON:-python}" -m torch.distributed.run)
fi
# torchrun forwards these signals to every worker (SIGUSR1: SLURM's warning ahead of the time limit); the
# workers finish the step, save a checkpoint and exit with code 75. A signalled torchrun does not restart.
ARGS=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS"
    --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout "$SHUTDOWN_TIMEOUT")
if [[ -n "$RDZV_ID" ]]; then
    if [[ -z "$JOIN_TIMEOUT" ]]; then  # as long as a collective may wait for a stalled rank
        JOIN_TIMEOUT="$("${PYTHON:-python3}" -c 'import sys; from fpa_megatron.config import load_config
print(round(load_config(sys.argv[1], sys.argv[2:]).parallel.timeout_minutes * 60))' "$CONFIG" "${OVERRIDES[@]}" \
            2>/dev/null || echo 1800)"  # a bad config: fpa-train names the error itself
    fi
    RDZV_CONF="join_timeout=$JOIN_TIMEOUT"
    if [[ "$EXTERNAL_STORE" == 1 ]]; then RDZV_CONF+=",is_host=false"; fi
    if [[ "$ELASTIC" == 1 ]]; then RDZV_CONF+=",last_call_timeout=$LAST_CALL"; fi
    ARGS+=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
        --rdzv-conf "$RDZV_CONF")
    # A fresh store for every attempt: in the store torchrun shares with its workers, a restarted group can
    # read the previous attempt's addresses and fail to connect (pytorch/pytorch#135712).
    CMD=(env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "${LAUNCHER[@]}" "${ARGS[@]}")
else
    CMD=("${LAUNCHER[@]}" "${ARGS[@]}"
        --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
if [[ "$ELASTIC" == 1 ]]; then OVERRIDES+=("parallel.elastic=true"); fi  # a resume may meet another DP size
CMD+=(-m fpa_megatron.cli --config "$CONFIG" "${OVERRIDES[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
# The config and data are checked once, here, as the ranks would check them: a config error is its one line
# (fpa-train: config error: ...) and exit code 2, before torchrun starts. The check prints the run directory.
RUN_DIR="$(WORLD_SIZE=$(( ${MIN_NODES:-$NNODES} * NPROC_PER_NODE )) "${PYTHON:-python3}" -m fpa_megatron.cli \
    --check-only --config "$CONFIG" "${OVERRIDES[@]}")" || exit $?
RUN_DIR="${RUN_DIR##*$'\n'}"
mkdir -p "$RUN_DIR/launcher"
LOG="$RUN_DIR/launcher/torchrun-$(date +%Y%m%d-%H%M%S)-$(hostname)-$$.log"
: >>"$LOG"  # there before tail follows it
# One OpenMP thread per rank unless the user chose otherwise (torchrun would force 1 with a warning).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# torchrun's own stderr (its warnings, the SignalException and ChildFailedError tracebacks) and the workers'
# stderr go to LOG; the workers' log lines (`<time> [rank R] ...`, see fpa_megatron/run_log.py) are shown, and
# after torchrun ends this script says in one line what happened, the exit code and where LOG is.
# (FPA_FAULT=kill_node drills kill this script too: a lost node loses its launcher)
FPA_LAUNCHER_PID=$$ "${CMD[@]}" 2>>"$LOG" &
TORCHRUN_PID=$!
tail -s 0.2 -n +1 --pid="$TORCHRUN_PID" -f "$LOG" \
    | grep --line-buffered -E '^(fpa-train: |[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} \[rank [0-9]+\] )' \
    | grep --line-buffered -v 'ERROR: traceback of the failure:$' >&2 &
FILTER_PID=$!

# This shell takes the signals meant for the job and passes them on; torchrun forwards them to its workers,
# which finish the step, save a checkpoint and exit 75. A signalled torchrun does not restart the workers.
SIGNAL=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
    SIGNAL="${SIGNAL:-SIG$1}"  # the first one is what stopped the workers (srun may send SIGTERM after SIGUSR1)
    # a signal sent to the whole process group (Ctrl-C, SLURM's scancel) reached torchrun already: a second one
    # would cut its wait for the workers short
    sleep 1
    grep -q "Received $(kill -l "$1") death signal" "$LOG" || kill -s "$1" "$TORCHRUN_PID" 2>/dev/null || true
}
for sig in TERM INT HUP QUIT USR1; do
    # shellcheck disable=SC2064  # the signal's name is fixed now
    trap "forward $sig" "$sig"
done
while :; do
    RC=0
    wait "$TORCHRUN_PID" || RC=$?
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break  # still running: the wait was cut short by a signal
done
wait "$FILTER_PID" 2>/dev/null || true

meaning() {  # fpa_megatron/exit_codes.py's words for an exit code
    if (( $1 < 0 )); then echo "killed by SIG$(kill -l $(( -$1 )) 2>/dev/null || echo $(( -$1 )))"; return; fi
    "${PYTHON:-python3}" -c 'import sys; from fpa_megatron.exit_codes import DESCRIPTIONS
print(DESCRIPTIONS.get(int(sys.argv[1]), "not an fpa-train exit code"))' "$1" 2>/dev/null || echo "see the log"
}
# torchrun itself reports 1 for a signal or a failed worker group: the workers' own code is read from LOG
if [[ -z "$SIGNAL" ]] && NUMBER="$(grep -oE 'got signal: [0-9]+' "$LOG" | tail -n1 | grep -oE '[0-9]+$')"; then
    SIGNAL="SIG$(kill -l "$NUMBER" 2>/dev/null || echo "$NUMBER")"  # sent to torchrun directly
fi
if [[ -n "$SIGNAL" ]]; then
    CODE="$(grep -oE '\(exit code [0-9]+: ' "$LOG" | tail -n1 | grep -oE '[0-9]+' || true)"
    if [[ -n "$CODE" ]]; then
        echo "torchrun.sh: $SIGNAL reached torchrun, which passed it to the workers: they stopped with exit code" \
            "$CODE ($(meaning "$CODE")); torchrun's log: $LOG" >&2
        exit "$CODE"
    fi
    echo "torchrun.sh: $SIGNAL reached torchrun, which passed it to the workers; they did not say how they" \
        "stopped (torchrun's exit code $RC); torchrun's log: $LOG" >&2
    exit "$RC"
fi
if [[ "$RC" != 0 ]]; then
    # torchrun's failure summary names the first failed worker ("Root Cause") last
    CODE="$(grep -oE 'exitcode *: *-?[0-9]+' "$LOG" | tail -n1 | grep -oE -- '-?[0-9]+$' || true)"
    RANK="$(grep -oE '^ *rank *: *[0-9]+' "$LOG" | tail -n1 | grep -oE '[0-9]+$' || true)"
    if [[ -n "$CODE" ]]; then
        echo "torchrun.sh: the workers failed: rank ${RANK:-?}, the first, exited with code $CODE ($(meaning "$CODE"));" \
            "torchrun stopped the others; torchrun's log: $LOG" >&2
        if (( CODE > 0 )); then exit "$CODE"; fi
    else
        echo "torchrun.sh: torchrun exited with code $RC; torchrun's log: $LOG" >&2
    fi
fi
exit "$RC"
