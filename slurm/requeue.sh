# shellcheck shell=bash
# Sourced by the batch scripts (not run on its own).
#
# run_requeueable CMD...: run CMD in the background. When Slurm sends USR1 before the time limit
# (`#SBATCH --signal=B:USR1@...`), pass it on to CMD, whose training processes save a checkpoint
# and stop (exit code 75); then requeue this job with `scontrol requeue`. The requeued job runs the
# same recipe again: `train.resume: auto` continues from the newest checkpoint and finished stages
# are skipped. MAX_REQUEUES bounds the loop (Slurm counts restarts in SLURM_RESTART_COUNT).

run_requeueable() {
    requeue_stopping=0
    trap 'requeue_stopping=1; echo "[distill-slurm] USR1: time limit near, checkpoint and requeue" >&2; kill -USR1 "$requeue_child" 2>/dev/null' USR1
    "$@" &
    requeue_child=$!
    wait "$requeue_child"
    local rc=$?
    while [ "$rc" -gt 128 ] && kill -0 "$requeue_child" 2>/dev/null; do
        wait "$requeue_child"  # `wait` returns early when a trapped signal arrives
        rc=$?
    done
    trap - USR1
    if [ "$rc" -eq 75 ] || { [ "$requeue_stopping" = 1 ] && [ "$rc" -ne 0 ]; }; then
        local restarts=${SLURM_RESTART_COUNT:-0}
        if [ "$restarts" -ge "${MAX_REQUEUES:-20}" ]; then
            echo "[distill-slurm] checkpoint saved, but job $SLURM_JOB_ID was requeued $restarts times already (MAX_REQUEUES); not requeueing" >&2
            return 75
        fi
        echo "[distill-slurm] checkpoint saved; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if [ "$rc" -ne 0 ]; then
        echo "[distill-slurm] training failed with exit code $rc (not requeued)" >&2
    fi
    return "$rc"
}
