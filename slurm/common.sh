# Shared code of the sbatch scripts in slurm/ (sourced inside the job on its first node, never run by itself).
# A training script is its #SBATCH defaults, two lines that find the checkout and source this file, and
#   augssl_train <experiment preset> "$@"
# Cluster-specific settings (Python environment, storage, NCCL) live in slurm/site.sh, which is sourced from here.
#
# Runtime knobs, all environment variables read at job start (sbatch exports your shell's environment):
#   AUGSSL_LAUNCHER        torchrun (default): one srun task per node running torchrun, which starts
#                          AUGSSL_NPROC_PER_NODE trainer processes; srun: one Slurm task per GPU (submit with
#                          --ntasks-per-node=<GPUs per node>), each task one trainer process.
#   AUGSSL_NPROC_PER_NODE  processes per node with torchrun (default: the GPUs Slurm gave the node, else 1)
#   AUGSSL_RUN_DIR         run directory (default $AUGSSL_RUN_ROOT/<experiment>-<job id>); set it to an earlier
#                          job's run directory to continue that run in a new job
#   AUGSSL_RUN_ROOT, AUGSSL_DATA_ROOT, AUGSSL_PYTHON: see site.sh
#   MASTER_PORT            rendezvous port (default: a free port on the first node, chosen per attempt)
#   AUGSSL_SHUTDOWN_TIMEOUT  seconds torchrun lets its workers checkpoint after a signal (240; keep it below --signal)
#   AUGSSL_REQUEUE         1 (default): after the time-limit signal, requeue the job once the trainer has checkpointed
#                          (only when that attempt wrote a new checkpoint, so a misconfigured job cannot loop, and
#                          never when $RUN_DIR/status.json says "done" or "failed")
#   AUGSSL_MAX_REQUEUES    make_shards.sh: at most this many self-requeues (10)

set -euo pipefail

augssl_log() { printf '[augssl %s] %s\n' "$(date '+%F %T')" "$*"; }
augssl_die() { augssl_log "error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || augssl_die "not inside a Slurm job: submit this script with sbatch"
[ -n "${AUGSSL_HOME:-}" ] && [ -f "$AUGSSL_HOME/slurm/common.sh" ] ||
  augssl_die "cannot find the augssl checkout (AUGSSL_HOME='${AUGSSL_HOME:-}'); export AUGSSL_HOME=/path/to/checkout"
export AUGSSL_HOME
# shellcheck source=site.sh
source "$AUGSSL_HOME/slurm/site.sh"
command -v "$AUGSSL_PYTHON" >/dev/null 2>&1 ||
  augssl_die "no Python at AUGSSL_PYTHON=$AUGSSL_PYTHON (run scripts/setup.sh in $AUGSSL_HOME, or edit slurm/site.sh)"
export AUGSSL_PYTHON

# Array tasks have their own job id but are named <array id>_<task>; a requeued job keeps its id, so it finds its
# run directory again.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  AUGSSL_JOB_TAG="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  AUGSSL_JOB_TAG="$SLURM_JOB_ID"
fi
AUGSSL_ATTEMPT="${SLURM_RESTART_COUNT:-0}"
AUGSSL_SIGNALLED=""

# augssl_open_run_dir NAME: create the run directory and send everything from here on into its log (Slurm's own
# output file gets one line pointing there). A requeued attempt appends to the same log.
augssl_open_run_dir() {
  RUN_DIR="${AUGSSL_RUN_DIR:-$AUGSSL_RUN_ROOT/$1-$AUGSSL_JOB_TAG}"
  mkdir -p "$RUN_DIR/logs" || augssl_die "cannot create the run directory $RUN_DIR"
  RUN_DIR="$(cd "$RUN_DIR" && pwd)"
  local log="$RUN_DIR/logs/slurm-$AUGSSL_JOB_TAG.out"
  augssl_log "job $AUGSSL_JOB_TAG attempt $AUGSSL_ATTEMPT: run directory $RUN_DIR, log $log"
  exec >>"$log" 2>&1
  augssl_log "=== job $AUGSSL_JOB_TAG ($SLURM_JOB_NAME) attempt $AUGSSL_ATTEMPT on ${SLURM_JOB_NODELIST:-?}" \
             "(${SLURM_JOB_NUM_NODES:-1} nodes) from $AUGSSL_HOME"
  AUGSSL_ATTEMPT_MARK="$RUN_DIR/logs/.attempt-$AUGSSL_JOB_TAG-$AUGSSL_ATTEMPT"
  touch "$AUGSSL_ATTEMPT_MARK"
  export RUN_DIR
}

# The first host of the allocation, as `scontrol show hostnames` expands the node list: the rendezvous host. The
# batch script runs there too, so a port free here is free where the rendezvous listens.
augssl_master_addr() { scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1; }
augssl_free_port() {
  "$AUGSSL_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

augssl_gpus_on_node() {
  local n="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
  n="${n##*:}"  # "a100:8" -> 8
  [[ "$n" =~ ^[0-9]+$ ]] && echo "$n" || echo 0
}

# Signals. At `--signal=B:USR1@<seconds>` before the time limit Slurm sends USR1 to this batch shell; it is passed to
# every task of the running step (torchrun forwards it to its workers too), the trainer writes a checkpoint and
# exits, and the job requeues itself. Cancellation, `scontrol requeue` and preemption send SIGTERM to every process
# of the job instead: the trainer checkpoints on that as well, and Slurm itself requeues or ends the job.
# The traps are set as soon as this file is sourced: an early USR1 must not kill the batch shell.
AUGSSL_STEP_PID=""
_augssl_on_usr1() {
  AUGSSL_SIGNALLED=USR1
  if [ -n "$AUGSSL_STEP_PID" ]; then
    augssl_log "USR1: the time limit is near; asking the trainer to checkpoint and stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || augssl_log "scancel --signal=USR1 failed"
  else
    augssl_log "USR1 before anything was launched"
  fi
}
_augssl_on_term() {
  AUGSSL_SIGNALLED="${AUGSSL_SIGNALLED:-TERM}"
  augssl_log "SIGTERM from Slurm (cancel, requeue, preemption or time limit): the trainer checkpoints and stops"
}
trap _augssl_on_usr1 USR1
trap _augssl_on_term TERM

# augssl_run_step CMD...: run CMD (an srun line) in the background so the traps fire at once, and wait for it.
augssl_run_step() {
  if [ -n "$AUGSSL_SIGNALLED" ]; then
    augssl_log "not launching: $AUGSSL_SIGNALLED arrived before the start (is the --signal lead time longer than" \
               "the job's --time?)"
    return 3
  fi
  "$@" &
  AUGSSL_STEP_PID=$!
  local rc=0
  while :; do
    wait "$AUGSSL_STEP_PID" && rc=0 || rc=$?
    kill -0 "$AUGSSL_STEP_PID" 2>/dev/null || break  # wait returned because a trap ran: keep waiting
  done
  AUGSSL_STEP_PID=""
  return "$rc"
}

# The newest complete checkpoint of the run (the trainer's layout: checkpoints/stepNNNNNNNNN/COMPLETE.json).
augssl_newest_checkpoint() {
  local marker newest=""
  for marker in "$RUN_DIR"/checkpoints/step*/COMPLETE.json; do
    [ -e "$marker" ] && newest="$marker"
  done
  echo "$newest"
}

# augssl_requeue_or_exit RC BEFORE: after the step, exit with what the trainer (rank 0) wrote to $RUN_DIR/status.json
# during this attempt (docs/exit-codes.md): "done" 0, never requeued; "failed" its exit code (3: a non-finite loss,
# which a requeue would only repeat). Otherwise, after the time-limit signal, requeue when the run made progress (a
# checkpoint newer than BEFORE, the newest one at the start): requeueing without progress would loop forever (e.g. a
# --signal lead time longer than --time). A run that stopped and is not requeued here (AUGSSL_REQUEUE=0, or Slurm's
# own SIGTERM, after which Slurm requeues or ends the job) exits 143; anything else exits RC.
augssl_requeue_or_exit() {
  local rc="$1" before="$2" after status
  # "done", "stopped", "running", "failed CODE", or "missing", "unreadable", "stale" (pipeline/engine/run_status.py)
  status="$("$AUGSSL_PYTHON" -m pipeline.engine.run_status "$RUN_DIR" --since "$AUGSSL_ATTEMPT_MARK")" ||
    status=unreadable
  case "$status" in
    done)
      augssl_log "the run finished (status.json: done)${AUGSSL_SIGNALLED:+; not requeueing}"
      exit 0 ;;
    "failed "*)
      augssl_log "the run failed (status.json: $status); not requeueing"
      exit "${status#failed }" ;;
  esac
  if [ "$AUGSSL_SIGNALLED" = USR1 ] && [ "${AUGSSL_REQUEUE:-1}" = 1 ]; then
    after="$(augssl_newest_checkpoint)"
    if [ -z "$after" ] || [ "$after" = "$before" ]; then
      augssl_log "error: stopped for the time limit without a new checkpoint; not requeueing (it would start" \
                 "over and over). Give the job more --time, or a shorter --signal lead."
      exit 1
    fi
    augssl_log "requeueing job $SLURM_JOB_ID: the next attempt resumes from ${after%/COMPLETE.json}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  if [ "$status" = stopped ]; then
    # after Slurm's SIGTERM: preemption, `scontrol requeue` and a node failure requeue the job (--requeue), scancel
    # does not
    augssl_log "the trainer stopped before the end of the run (status.json: stopped); exiting 143. If Slurm" \
               "requeues the job, the next attempt resumes from the newest checkpoint; otherwise continue it with" \
               "AUGSSL_RUN_DIR=$RUN_DIR sbatch ..."
    exit 143
  fi
  exit "$rc"
}

# augssl_train EXPERIMENT [HYDRA OVERRIDES...]: train configs/experiment/EXPERIMENT.yaml on the allocation.
augssl_train() {
  local experiment="$1"
  shift
  augssl_open_run_dir "$experiment"
  cd "$AUGSSL_HOME"

  local launcher="${AUGSSL_LAUNCHER:-torchrun}"
  local nnodes="${SLURM_JOB_NUM_NODES:-1}"
  local gpus nproc
  gpus="$(augssl_gpus_on_node)"
  nproc="${AUGSSL_NPROC_PER_NODE:-$gpus}"
  [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1
  MASTER_ADDR="$(augssl_master_addr)"
  MASTER_PORT="${MASTER_PORT:-$(augssl_free_port)}"
  export MASTER_ADDR MASTER_PORT
  local cpus="${SLURM_CPUS_PER_TASK:-1}"
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    if [ "$launcher" = torchrun ]; then OMP_NUM_THREADS=$(( cpus / nproc > 0 ? cpus / nproc : 1 ));
    else OMP_NUM_THREADS="$cpus"; fi
    export OMP_NUM_THREADS
  fi

  # the script's settings first, the user's overrides last: for a key given twice Hydra takes the last value
  local overrides=("experiment=$experiment" "run_dir=$RUN_DIR")
  [ -n "${AUGSSL_DATA_ROOT:-}" ] && overrides+=("data.root=$AUGSSL_DATA_ROOT")
  overrides+=("$@")

  local step=(srun --kill-on-bad-exit=1)
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  local cmd
  case "$launcher" in
    torchrun)
      # one task per node; the node rank is the task's node id, so PET_NODE_RANK is set per task by bash -c
      step+=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1)
      cmd=(bash -c 'PET_NODE_RANK="$SLURM_NODEID" exec "$@"' augssl-node
           "$AUGSSL_PYTHON" -m torch.distributed.run
           --nnodes="$nnodes" --nproc-per-node="$nproc" --rdzv-backend=static
           --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0
           --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
           --shutdown-timeout="${AUGSSL_SHUTDOWN_TIMEOUT:-240}"
           -m pipeline.train "${overrides[@]}")
      augssl_log "launch: $nnodes node(s) x $nproc process(es) via torchrun, rendezvous $MASTER_ADDR:$MASTER_PORT"
      ;;
    srun)
      cmd=("$AUGSSL_PYTHON" -m pipeline.train "${overrides[@]}")
      augssl_log "launch: ${SLURM_NTASKS:-1} Slurm task(s), one process each, rendezvous $MASTER_ADDR:$MASTER_PORT"
      ;;
    *) augssl_die "AUGSSL_LAUNCHER=$launcher: use torchrun or srun" ;;
  esac
  augssl_log "overrides: ${overrides[*]}"
  augssl_log "network (slurm/site.sh): GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-(unset: the address of the hostname)}" \
             "NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-(unset: NCCL chooses)}"

  local rc=0 before
  before="$(augssl_newest_checkpoint)"
  [ -n "$before" ] && augssl_log "resuming from ${before%/COMPLETE.json}"
  augssl_run_step "${step[@]}" "${cmd[@]}" || rc=$?
  augssl_log "training step ended with exit code $rc"
  augssl_requeue_or_exit "$rc" "$before"
}

# augssl_make_shards DATASET SPLIT... -- [make_shards options]: array task $SLURM_ARRAY_TASK_ID converts one split.
augssl_make_shards() {
  local dataset="$1"
  shift
  local splits=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do splits+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  local index="${SLURM_ARRAY_TASK_ID:-0}"
  augssl_open_run_dir "make_shards_$dataset"
  cd "$AUGSSL_HOME"
  if [ "$index" -ge "${#splits[@]}" ]; then
    augssl_log "array task $index: there are only ${#splits[@]} splits (${splits[*]}); nothing to do"
    exit 0
  fi
  local split="${splits[$index]}"
  local args=(tools/make_shards.py "$dataset" --out "${SHARDS_OUT:?set SHARDS_OUT: where the shards go}"
              --split "$split" --workers "${SLURM_CPUS_PER_TASK:-1}" --quiet)
  [ -n "${SHARDS_SRC:-}" ] && args+=(--src "$SHARDS_SRC")
  args+=("$@")
  augssl_log "array task $index converts $dataset/$split: ${args[*]}"
  local rc=0
  augssl_run_step srun --ntasks=1 "$AUGSSL_PYTHON" "${args[@]}" || rc=$?
  augssl_log "make_shards $dataset/$split ended with exit code $rc"
  # a conversion's progress is not visible from here: cap the requeues instead (AUGSSL_MAX_REQUEUES, default 10).
  # Never requeued: a finished conversion (0), bad input (make_shards' 2: it fails the same way again), and a step
  # that was never launched because the signal came first (augssl_run_step's 3)
  if [ "$AUGSSL_SIGNALLED" = USR1 ] && [ "${AUGSSL_REQUEUE:-1}" = 1 ] && [[ ! "$rc" =~ ^[023]$ ]] &&
     [ "$AUGSSL_ATTEMPT" -lt "${AUGSSL_MAX_REQUEUES:-10}" ]; then
    augssl_log "requeueing: the next attempt skips the shards already written"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
