# shellcheck shell=bash
# Sourced by the batch scripts (not run on its own).
#
# run_requeueable CMD...: run CMD in the background. When Slurm sends USR1 before the time limit
# (`#SBATCH --signal=B:USR1@...`), pass it on to CMD, whose training processes save a checkpoint
# and stop (exit code 75); then requeue this job with `scontrol requeue`. The requeued job runs the
# same recipe again: `train.resume: auto` continues from the newest checkpoint and finished stages
# are skipped. MAX_REQUEUES bounds the loop (Slurm counts restarts in SLURM_RESTART_COUNT).
#
# To stop a job for good: `scancel --batch --signal=TERM JOBID`. TERM is passed on like USR1 (every
# node's training processes save a checkpoint and exit 75) and the job is not requeued; submitting
# it again resumes. (A plain `scancel JOBID` stops it too, within Slurm's KillWait.)
#
# What is reported comes from node 0's exit record (slurm/launch_node.sh): 75 with a checkpoint
# (training resumes from it), 75 before or outside training (nothing lost, the phase runs again),
# 130 (stopped at once), 2 (bad input), 3 (a gate failed), 1 (diverged or crashed).

exit_record() {  # exit_record KEY: that line of node 0's exit record (slurm/launch_node.sh)
    sed -n "s/^$1=//p" "$DISTILL_EXIT_PREFIX.node0" 2>/dev/null
}

stop_report() {  # what an exit code 75 stopped, from the exit record
    local checkpoint phase
    checkpoint=$(exit_record checkpoint)
    phase=$(exit_record phase)
    if [ -n "$checkpoint" ]; then
        echo "[distill-slurm] stopped${phase:+ during $phase}; training resumes from $checkpoint" >&2
        echo "checkpoint saved"
    elif [ -n "$(exit_record code)" ]; then
        echo "stopped${phase:+ during $phase} before anything was lost (nothing unfinished is marked done; a rerun does it again)"
    else
        echo "stopped by a signal (no exit record: a rerun resumes from the newest valid checkpoint, if any)"
    fi
}

failure_report() {  # why a job that is not requeued ended
    case "$1" in
        130) echo "stopped at once (a second signal or Ctrl-C); the newest checkpoint remains, submit again to resume" ;;
        2) echo "bad input (exit code 2): the message above says what to change" ;;
        3) echo "an eval gate failed (exit code 3); the report is written" ;;
        1) echo "training diverged or crashed (exit code 1), see the log above" ;;
        *) echo "training failed with exit code $1" ;;
    esac
}

run_requeueable() {
    export DISTILL_EXIT_PREFIX="${DISTILL_EXIT_PREFIX:-${TMPDIR:-/tmp}/distill-exit-${SLURM_JOB_ID:-0}-$$}"
    rm -f "$DISTILL_EXIT_PREFIX".node*
    requeue_stopping=0
    requeue_cancelled=0
    trap 'requeue_stopping=1; echo "[distill-slurm] USR1: time limit near, checkpoint and requeue" >&2; kill -USR1 "$requeue_child" 2>/dev/null' USR1
    trap 'requeue_stopping=1; requeue_cancelled=1; echo "[distill-slurm] TERM: checkpoint and stop (not requeued)" >&2; kill -TERM "$requeue_child" 2>/dev/null' TERM
    "$@" &
    requeue_child=$!
    wait "$requeue_child"
    local rc=$?
    while [ "$rc" -gt 128 ] && kill -0 "$requeue_child" 2>/dev/null; do
        wait "$requeue_child"  # `wait` returns early when a trapped signal arrives
        rc=$?
    done
    trap - USR1 TERM
    if [ "$requeue_cancelled" = 1 ]; then
        echo "[distill-slurm] $(if [ "$rc" -eq 75 ]; then stop_report; else failure_report "$rc"; fi); stopped on request, not requeued: submit the job again to resume" >&2
        rm -f "$DISTILL_EXIT_PREFIX".node*
        return "$rc"
    fi
    if [ "$rc" -eq 75 ] || { [ "$requeue_stopping" = 1 ] && [ "$rc" -ne 0 ] && [ -z "$(exit_record code)" ]; }; then
        local restarts=${SLURM_RESTART_COUNT:-0} stopped
        stopped=$(stop_report)
        rm -f "$DISTILL_EXIT_PREFIX".node*
        if [ "$restarts" -ge "${MAX_REQUEUES:-20}" ]; then
            echo "[distill-slurm] $stopped; but job $SLURM_JOB_ID was requeued $restarts times already (MAX_REQUEUES); not requeueing" >&2
            return 75
        fi
        echo "[distill-slurm] $stopped; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    rm -f "$DISTILL_EXIT_PREFIX".node*
    if [ "$rc" -ne 0 ]; then
        echo "[distill-slurm] $(failure_report "$rc") (not requeued)" >&2
    fi
    return "$rc"
}
