#!/bin/sh
# PID 1 of the augssl training containers (installed in the image as /usr/local/bin/augssl-entrypoint):
#   augssl-entrypoint torchrun ... -m pipeline.train ...      or      augssl-entrypoint python -m pipeline.train ...
#
# Kubernetes sends SIGTERM to PID 1 only (pod deletion, eviction, preemption) and then waits
# terminationGracePeriodSeconds. This passes SIGTERM/SIGINT/SIGUSR1 on to the command (torchrun forwards them to
# the trainers, which checkpoint and exit) and waits for it.
#
# When one pod is stopped, the trainers of all pods agree to checkpoint and stop at the same step. A torchrun whose
# own trainers stopped without being signalled would then wait up to 5 minutes in its exit barrier for the agent of
# the deleted pod. So a signalled pod also touches $RUN_DIR/.augssl-stop (the run directory is shared by all pods),
# and every pod whose entrypoint started before that file was touched stops its command the same way.
#
# The exit status (docs/exit-codes.md) is what the Job or PyTorchJob controller sees, so it never says "finished" for
# a run that only stopped. How the run ended is read from $RUN_DIR/status.json, which the trainer (rank 0, in
# whichever pod) writes; a status.json not written since this container started is an earlier attempt's and counts
# as not finished:
#   - when this container was told to stop (signal or stop file), it exits 143 whatever the command returned;
#   - when the trainer wrote a code to $AUGSSL_EXIT_FILE (2 bad config, 3 non-finite loss, 4 unusable data, 5 no room
#     for a checkpoint) and the command failed, it exits with that, though torchrun reports any failed worker as 1;
#   - status "done": 0; "stopped" (the trainers of all pods checkpointed and stopped because one pod was signalled):
#     143; "failed": the exit code in status.json;
#   - otherwise (no status of this attempt, or "running"): the command's exit status, but 143 instead of 0.
# 143 is retryable under every restart policy: the pod (or container) comes back and resumes from the checkpoint.
set -u
stop=""
child=""
watcher=""
poll="${AUGSSL_STOP_POLL_SECONDS:-2}"
stop_file="${RUN_DIR:+$RUN_DIR/.augssl-stop}"

# A torchrun whose workers have all exited (they checkpointed and stopped) waits in its exit barrier for the agents
# of the other pods, up to 5 minutes, inside a call that does not see signals; when one of those pods was deleted,
# that agent never comes. So once a stop was forwarded to torchrun, it is ended as soon as it has had no worker
# processes for two polls: its workers' checkpoint is complete by then, and torchrun holds nothing else. Needs
# /proc/PID/task/TID/children (Linux >= 3.5); without it torchrun is left to its own timeout.
end_idle_torchrun() {
  idle=0
  while sleep "$poll" && kill -0 "$1" 2>/dev/null; do
    if [ -n "$(cat /proc/"$1"/task/*/children 2>/dev/null)" ]; then idle=0; continue; fi
    idle=$((idle + 1))
    if [ "$idle" -ge 2 ]; then
      echo "augssl-entrypoint: torchrun's workers have exited; ending it instead of waiting for other pods" >&2
      kill -s KILL "$1" 2>/dev/null || true
      return
    fi
  done
}

forward() {
  if [ -z "$stop" ] && [ -n "$stop_file" ] && [ "$1" != STOPFILE ]; then
    touch "$stop_file" 2>/dev/null || true  # tell the other pods
  fi
  if [ -n "$watcher" ]; then kill "$watcher" 2>/dev/null || true; watcher=""; fi
  if [ -z "$stop" ]; then
    stop="$1"
    if [ "$1" = STOPFILE ]; then sig=TERM; else sig="$1"; fi
    if [ -n "$child" ]; then
      kill -s "$sig" "$child" 2>/dev/null || true
      if [ "$launcher" = torchrun ] && [ -r "/proc/$$/task/$$/children" ]; then end_idle_torchrun "$child" & fi
    fi
  fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1
trap 'forward STOPFILE' USR2

if [ $# -eq 0 ]; then
  echo "usage: augssl-entrypoint COMMAND [ARGS...]" >&2
  exit 2
fi
launcher="$(basename "$1")"
# the start time as a file's mtime; in the run directory when there is one, so that it is compared with the stop
# file and status.json by the same (file server's) clock
if [ -n "${RUN_DIR:-}" ] && mkdir -p "$RUN_DIR" 2>/dev/null &&
   started="$RUN_DIR/.augssl-start-$(hostname 2>/dev/null || echo pod)-$$" && : > "$started" 2>/dev/null; then :
else
  started="$(mktemp "${TMPDIR:-/tmp}/augssl-start.XXXXXX")"
fi
# pipeline.train writes 2 (bad config) or 3 (non-finite loss) here before exiting, because torchrun would report
# either as 1; the Indexed Job's podFailurePolicy fails the job at once on those two
exit_file="${TMPDIR:-/tmp}/augssl-exit.$$"
rm -f "$exit_file"
export AUGSSL_EXIT_FILE="$exit_file"
"$@" &
child=$!
if [ -n "$stop_file" ]; then
  self=$$
  (
    trap - TERM INT USR1 USR2
    # ends with this script too: killed outright outside a container (in a pod the container would go with it)
    while sleep "$poll" && kill -0 "$self" 2>/dev/null; do
      if [ "$stop_file" -nt "$started" ]; then
        echo "augssl-entrypoint: another pod of this run was stopped ($stop_file): stopping too" >&2
        kill -s USR2 "$self"
        break
      fi
    done
  ) &
  watcher=$!
fi
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # wait was interrupted by a trap: keep waiting for the command
done
if [ -n "$watcher" ]; then kill "$watcher" 2>/dev/null || true; fi

if [ -n "$stop" ]; then
  echo "augssl-entrypoint: stopped ($stop; command exit $rc); exiting 143 so the run is resumed, not counted as finished" >&2
  rc=143
elif [ "$rc" -ne 0 ] && [ -s "$exit_file" ]; then
  rc=$(cat "$exit_file")
elif [ -n "${RUN_DIR:-}" ]; then
  # "done", "stopped", "running", "failed CODE", or "missing", "unreadable", "stale" (see pipeline/engine/run_status.py)
  run_status="$(python3 -m pipeline.engine.run_status "$RUN_DIR" --since "$started")" || run_status=unreadable
  case "$run_status" in
    done) rc=0 ;;
    stopped)
      echo "augssl-entrypoint: the trainers checkpointed and stopped before the end of the run (status.json:" \
           "stopped); exiting 143 so it is resumed" >&2
      rc=143 ;;
    "failed "*) rc="${run_status#failed }" ;;
    *)
      if [ "$rc" -eq 0 ]; then
        echo "augssl-entrypoint: the command exited 0 but the run did not finish (status.json: $run_status);" \
             "exiting 143 so it is resumed" >&2
        rc=143
      fi ;;
  esac
fi
rm -f "$started" "$exit_file"
exit "$rc"
